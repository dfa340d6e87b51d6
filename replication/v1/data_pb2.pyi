from replication.v1 import common_pb2 as _common_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class HashMapRequest(_message.Message):
    __slots__ = ("volume", "block_size", "covered_size")
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    COVERED_SIZE_FIELD_NUMBER: _ClassVar[int]
    volume: str
    block_size: int
    covered_size: int
    def __init__(self, volume: _Optional[str] = ..., block_size: _Optional[int] = ..., covered_size: _Optional[int] = ...) -> None: ...

class HashMapChunk(_message.Message):
    __slots__ = ("first_block", "digests", "volume_size", "block_count")
    FIRST_BLOCK_FIELD_NUMBER: _ClassVar[int]
    DIGESTS_FIELD_NUMBER: _ClassVar[int]
    VOLUME_SIZE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_COUNT_FIELD_NUMBER: _ClassVar[int]
    first_block: int
    digests: bytes
    volume_size: int
    block_count: int
    def __init__(self, first_block: _Optional[int] = ..., digests: _Optional[bytes] = ..., volume_size: _Optional[int] = ..., block_count: _Optional[int] = ...) -> None: ...

class SessionState(_message.Message):
    __slots__ = ("session", "persisted_seq", "received_seq", "mac")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    PERSISTED_SEQ_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_SEQ_FIELD_NUMBER: _ClassVar[int]
    MAC_FIELD_NUMBER: _ClassVar[int]
    session: _common_pb2.SessionId
    persisted_seq: int
    received_seq: int
    mac: bytes
    def __init__(self, session: _Optional[_Union[_common_pb2.SessionId, _Mapping]] = ..., persisted_seq: _Optional[int] = ..., received_seq: _Optional[int] = ..., mac: _Optional[bytes] = ...) -> None: ...

class OpenSession(_message.Message):
    __slots__ = ("session", "block_size", "volume_size", "protocol")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    VOLUME_SIZE_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    session: _common_pb2.SessionId
    block_size: int
    volume_size: int
    protocol: int
    def __init__(self, session: _Optional[_Union[_common_pb2.SessionId, _Mapping]] = ..., block_size: _Optional[int] = ..., volume_size: _Optional[int] = ..., protocol: _Optional[int] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("seq", "frame")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    seq: int
    frame: bytes
    def __init__(self, seq: _Optional[int] = ..., frame: _Optional[bytes] = ...) -> None: ...

class CloseSession(_message.Message):
    __slots__ = ("last_seq",)
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    last_seq: int
    def __init__(self, last_seq: _Optional[int] = ...) -> None: ...

class SourceMessage(_message.Message):
    __slots__ = ("open", "frame", "close")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    open: OpenSession
    frame: Frame
    close: CloseSession
    def __init__(self, open: _Optional[_Union[OpenSession, _Mapping]] = ..., frame: _Optional[_Union[Frame, _Mapping]] = ..., close: _Optional[_Union[CloseSession, _Mapping]] = ...) -> None: ...

from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Feature(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FEATURE_UNSPECIFIED: _ClassVar[Feature]
    FEATURE_ZSTD: _ClassVar[Feature]
    FEATURE_HASHMAP_RESYNC: _ClassVar[Feature]
    FEATURE_RECEIVED_ACK: _ClassVar[Feature]
    FEATURE_EPOCH_MARKERS: _ClassVar[Feature]
    FEATURE_SESSION_ORDER: _ClassVar[Feature]
    FEATURE_ACK_MAC: _ClassVar[Feature]

class Role(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLE_UNSPECIFIED: _ClassVar[Role]
    ROLE_SOURCE: _ClassVar[Role]
    ROLE_PROCESS_SERVER: _ClassVar[Role]
    ROLE_MASTER_TARGET: _ClassVar[Role]
    ROLE_ORCHESTRATOR: _ClassVar[Role]

class AckLevel(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACK_LEVEL_UNSPECIFIED: _ClassVar[AckLevel]
    RECEIVED: _ClassVar[AckLevel]
    PERSISTED: _ClassVar[AckLevel]
FEATURE_UNSPECIFIED: Feature
FEATURE_ZSTD: Feature
FEATURE_HASHMAP_RESYNC: Feature
FEATURE_RECEIVED_ACK: Feature
FEATURE_EPOCH_MARKERS: Feature
FEATURE_SESSION_ORDER: Feature
FEATURE_ACK_MAC: Feature
ROLE_UNSPECIFIED: Role
ROLE_SOURCE: Role
ROLE_PROCESS_SERVER: Role
ROLE_MASTER_TARGET: Role
ROLE_ORCHESTRATOR: Role
ACK_LEVEL_UNSPECIFIED: AckLevel
RECEIVED: AckLevel
PERSISTED: AckLevel

class Hello(_message.Message):
    __slots__ = ("protocol_min", "protocol_max", "features", "agent_version", "role")
    PROTOCOL_MIN_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_MAX_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    protocol_min: int
    protocol_max: int
    features: int
    agent_version: str
    role: Role
    def __init__(self, protocol_min: _Optional[int] = ..., protocol_max: _Optional[int] = ..., features: _Optional[int] = ..., agent_version: _Optional[str] = ..., role: _Optional[_Union[Role, str]] = ...) -> None: ...

class SessionId(_message.Message):
    __slots__ = ("volume", "session")
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    volume: str
    session: bytes
    def __init__(self, volume: _Optional[str] = ..., session: _Optional[bytes] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("session", "seq", "level", "mac")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    MAC_FIELD_NUMBER: _ClassVar[int]
    session: SessionId
    seq: int
    level: AckLevel
    mac: bytes
    def __init__(self, session: _Optional[_Union[SessionId, _Mapping]] = ..., seq: _Optional[int] = ..., level: _Optional[_Union[AckLevel, str]] = ..., mac: _Optional[bytes] = ...) -> None: ...

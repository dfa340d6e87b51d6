from replication.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TagRequest(_message.Message):
    __slots__ = ("kind", "name", "group", "disks", "timeout_seconds")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    DISKS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    kind: str
    name: str
    group: str
    disks: _containers.RepeatedScalarFieldContainer[str]
    timeout_seconds: float
    def __init__(self, kind: _Optional[str] = ..., name: _Optional[str] = ..., group: _Optional[str] = ..., disks: _Optional[_Iterable[str]] = ..., timeout_seconds: _Optional[float] = ...) -> None: ...

class TagReply(_message.Message):
    __slots__ = ("disks", "held_seconds")
    DISKS_FIELD_NUMBER: _ClassVar[int]
    HELD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    disks: _containers.RepeatedScalarFieldContainer[str]
    held_seconds: float
    def __init__(self, disks: _Optional[_Iterable[str]] = ..., held_seconds: _Optional[float] = ...) -> None: ...

class ListPointsRequest(_message.Message):
    __slots__ = ("volume",)
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    volume: str
    def __init__(self, volume: _Optional[str] = ...) -> None: ...

class RecoveryPoint(_message.Message):
    __slots__ = ("id", "time", "kind", "tag", "group", "manifest_root")
    ID_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_ROOT_FIELD_NUMBER: _ClassVar[int]
    id: int
    time: float
    kind: str
    tag: str
    group: str
    manifest_root: str
    def __init__(self, id: _Optional[int] = ..., time: _Optional[float] = ..., kind: _Optional[str] = ..., tag: _Optional[str] = ..., group: _Optional[str] = ..., manifest_root: _Optional[str] = ...) -> None: ...

class ListPointsResponse(_message.Message):
    __slots__ = ("points",)
    POINTS_FIELD_NUMBER: _ClassVar[int]
    points: _containers.RepeatedCompositeFieldContainer[RecoveryPoint]
    def __init__(self, points: _Optional[_Iterable[_Union[RecoveryPoint, _Mapping]]] = ...) -> None: ...

class ProduceDiskRequest(_message.Message):
    __slots__ = ("volume", "point", "name", "subformat")
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    POINT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SUBFORMAT_FIELD_NUMBER: _ClassVar[int]
    volume: str
    point: str
    name: str
    subformat: str
    def __init__(self, volume: _Optional[str] = ..., point: _Optional[str] = ..., name: _Optional[str] = ..., subformat: _Optional[str] = ...) -> None: ...

class ProducedDisk(_message.Message):
    __slots__ = ("volume", "point")
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    POINT_FIELD_NUMBER: _ClassVar[int]
    volume: Volume
    point: RecoveryPoint
    def __init__(self, volume: _Optional[_Union[Volume, _Mapping]] = ..., point: _Optional[_Union[RecoveryPoint, _Mapping]] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AgentStatus(_message.Message):
    __slots__ = ("role", "agent_version", "uptime_seconds", "pairs", "volumes", "spool_bytes", "problems")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PAIRS_FIELD_NUMBER: _ClassVar[int]
    VOLUMES_FIELD_NUMBER: _ClassVar[int]
    SPOOL_BYTES_FIELD_NUMBER: _ClassVar[int]
    PROBLEMS_FIELD_NUMBER: _ClassVar[int]
    role: _common_pb2.Role
    agent_version: str
    uptime_seconds: int
    pairs: _containers.RepeatedCompositeFieldContainer[PairStatus]
    volumes: _containers.RepeatedCompositeFieldContainer[Volume]
    spool_bytes: int
    problems: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, role: _Optional[_Union[_common_pb2.Role, str]] = ..., agent_version: _Optional[str] = ..., uptime_seconds: _Optional[int] = ..., pairs: _Optional[_Iterable[_Union[PairStatus, _Mapping]]] = ..., volumes: _Optional[_Iterable[_Union[Volume, _Mapping]]] = ..., spool_bytes: _Optional[int] = ..., problems: _Optional[_Iterable[str]] = ...) -> None: ...

class ListVolumesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListVolumesResponse(_message.Message):
    __slots__ = ("volumes",)
    VOLUMES_FIELD_NUMBER: _ClassVar[int]
    volumes: _containers.RepeatedCompositeFieldContainer[Volume]
    def __init__(self, volumes: _Optional[_Iterable[_Union[Volume, _Mapping]]] = ...) -> None: ...

class Volume(_message.Message):
    __slots__ = ("name", "size", "format", "subformat")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    SUBFORMAT_FIELD_NUMBER: _ClassVar[int]
    name: str
    size: int
    format: str
    subformat: str
    def __init__(self, name: _Optional[str] = ..., size: _Optional[int] = ..., format: _Optional[str] = ..., subformat: _Optional[str] = ...) -> None: ...

class CreateVolumeRequest(_message.Message):
    __slots__ = ("name", "size", "subformat")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SUBFORMAT_FIELD_NUMBER: _ClassVar[int]
    name: str
    size: int
    subformat: str
    def __init__(self, name: _Optional[str] = ..., size: _Optional[int] = ..., subformat: _Optional[str] = ...) -> None: ...

class ReleaseVolumeRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class StartPairRequest(_message.Message):
    __slots__ = ("disk", "volume")
    DISK_FIELD_NUMBER: _ClassVar[int]
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    disk: str
    volume: str
    def __init__(self, disk: _Optional[str] = ..., volume: _Optional[str] = ...) -> None: ...

class StopPairRequest(_message.Message):
    __slots__ = ("disk",)
    DISK_FIELD_NUMBER: _ClassVar[int]
    disk: str
    def __init__(self, disk: _Optional[str] = ...) -> None: ...

class MovePairRequest(_message.Message):
    __slots__ = ("disk", "process_server", "process_server_host")
    DISK_FIELD_NUMBER: _ClassVar[int]
    PROCESS_SERVER_FIELD_NUMBER: _ClassVar[int]
    PROCESS_SERVER_HOST_FIELD_NUMBER: _ClassVar[int]
    disk: str
    process_server: str
    process_server_host: str
    def __init__(self, disk: _Optional[str] = ..., process_server: _Optional[str] = ..., process_server_host: _Optional[str] = ...) -> None: ...

class PairStatus(_message.Message):
    __slots__ = ("disk", "volume", "state", "blocks_total", "blocks_done", "persisted_seq", "error", "mode", "rpo_seconds", "process_server")
    DISK_FIELD_NUMBER: _ClassVar[int]
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_DONE_FIELD_NUMBER: _ClassVar[int]
    PERSISTED_SEQ_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    RPO_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PROCESS_SERVER_FIELD_NUMBER: _ClassVar[int]
    disk: str
    volume: str
    state: str
    blocks_total: int
    blocks_done: int
    persisted_seq: int
    error: str
    mode: str
    rpo_seconds: float
    process_server: str
    def __init__(self, disk: _Optional[str] = ..., volume: _Optional[str] = ..., state: _Optional[str] = ..., blocks_total: _Optional[int] = ..., blocks_done: _Optional[int] = ..., persisted_seq: _Optional[int] = ..., error: _Optional[str] = ..., mode: _Optional[str] = ..., rpo_seconds: _Optional[float] = ..., process_server: _Optional[str] = ...) -> None: ...

"""The one place where protobuf types meet the library (``*_pb2`` stop here).

Agents' servicers call these functions to turn requests into domain values and
domain values into responses; nothing else imports ``replication.v1``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from .errors import RemoteProtocolError
from .protocol import AckLevel, Hello
from .v1 import common_pb2, control_pb2, data_pb2

__all__ = [
    "AckMsg",
    "CloseMsg",
    "FrameMsg",
    "HashMapPiece",
    "OpenMsg",
    "ack_from_pb",
    "ack_to_pb",
    "hashmap_from_pb",
    "hashmap_request_to_pb",
    "hashmap_to_pb",
    "hello_from_pb",
    "hello_to_pb",
    "source_message_from_pb",
    "source_message_to_pb",
]

_ROLES = {
    "source": common_pb2.ROLE_SOURCE,
    "process-server": common_pb2.ROLE_PROCESS_SERVER,
    "master-target": common_pb2.ROLE_MASTER_TARGET,
    "orchestrator": common_pb2.ROLE_ORCHESTRATOR,
}
_ROLE_NAMES = {v: k for k, v in _ROLES.items()}


@dataclass(frozen=True)
class OpenMsg:
    volume: str
    session: bytes
    block_size: int
    volume_size: int
    protocol: int


@dataclass(frozen=True)
class FrameMsg:
    seq: int
    frame: bytes


@dataclass(frozen=True)
class CloseMsg:
    last_seq: int


@dataclass(frozen=True)
class AckMsg:
    volume: str
    session: bytes
    seq: int
    level: AckLevel
    mac: bytes = b""  # the master target's, on PERSISTED (replication.acks)


@dataclass(frozen=True)
class HashMapPiece:
    first_block: int
    digests: bytes  # n x 16 bytes
    volume_size: int
    block_count: int


SourceMsg = OpenMsg | FrameMsg | CloseMsg


def hello_to_pb(h: Hello) -> common_pb2.Hello:
    return common_pb2.Hello(
        protocol_min=h.protocol_min,
        protocol_max=h.protocol_max,
        features=h.features,
        agent_version=h.agent_version,
        role=_ROLES.get(h.role, common_pb2.ROLE_UNSPECIFIED),
    )


def hello_from_pb(m: common_pb2.Hello) -> Hello:
    return Hello(
        protocol_min=m.protocol_min,
        protocol_max=m.protocol_max,
        features=m.features,
        agent_version=m.agent_version,
        role=_ROLE_NAMES.get(m.role, ""),
    )


def source_message_to_pb(msg: SourceMsg) -> data_pb2.SourceMessage:
    if isinstance(msg, FrameMsg):
        return data_pb2.SourceMessage(frame=data_pb2.Frame(seq=msg.seq, frame=msg.frame))
    if isinstance(msg, OpenMsg):
        sid = common_pb2.SessionId(volume=msg.volume, session=msg.session)
        return data_pb2.SourceMessage(
            open=data_pb2.OpenSession(
                session=sid,
                block_size=msg.block_size,
                volume_size=msg.volume_size,
                protocol=msg.protocol,
            )
        )
    return data_pb2.SourceMessage(close=data_pb2.CloseSession(last_seq=msg.last_seq))


def source_message_from_pb(m: data_pb2.SourceMessage) -> SourceMsg:
    kind = m.WhichOneof("body")
    if kind == "frame":
        return FrameMsg(seq=m.frame.seq, frame=m.frame.frame)
    if kind == "open":
        o = m.open
        return OpenMsg(
            volume=o.session.volume,
            session=o.session.session,
            block_size=o.block_size,
            volume_size=o.volume_size,
            protocol=o.protocol,
        )
    if kind == "close":
        return CloseMsg(last_seq=m.close.last_seq)
    raise RemoteProtocolError("empty SourceMessage")


def opened_volume(m: data_pb2.SourceMessage) -> str | None:
    """The volume a SourceMessage opens a session on; None for frames and closes (cheap)."""
    return m.open.session.volume if m.WhichOneof("body") == "open" else None


def ack_to_pb(a: AckMsg) -> common_pb2.Ack:
    sid = common_pb2.SessionId(volume=a.volume, session=a.session)
    return common_pb2.Ack(session=sid, seq=a.seq, level=int(a.level), mac=a.mac)


def ack_from_pb(m: common_pb2.Ack) -> AckMsg:
    if m.level not in (AckLevel.RECEIVED, AckLevel.PERSISTED):
        raise RemoteProtocolError(f"ack with unknown level {m.level}")
    return AckMsg(
        volume=m.session.volume,
        session=m.session.session,
        seq=m.seq,
        level=AckLevel(m.level),
        mac=m.mac,
    )


def hashmap_request_to_pb(volume: str, block_size: int, covered: int) -> data_pb2.HashMapRequest:
    return data_pb2.HashMapRequest(volume=volume, block_size=block_size, covered_size=covered)


def hashmap_request_from_pb(m: data_pb2.HashMapRequest) -> tuple[str, int, int]:
    return m.volume, m.block_size, m.covered_size


def hashmap_to_pb(p: HashMapPiece) -> data_pb2.HashMapChunk:
    return data_pb2.HashMapChunk(
        first_block=p.first_block,
        digests=p.digests,
        volume_size=p.volume_size,
        block_count=p.block_count,
    )


def hashmap_from_pb(chunks: Iterator[data_pb2.HashMapChunk]) -> Iterator[HashMapPiece]:
    for c in chunks:
        if len(c.digests) % 16:
            raise RemoteProtocolError("hash map chunk is not a whole number of digests")
        yield HashMapPiece(c.first_block, c.digests, c.volume_size, c.block_count)


def session_id_to_pb(volume: str, session: bytes) -> common_pb2.SessionId:
    return common_pb2.SessionId(volume=volume, session=session)


def session_id_from_pb(m: common_pb2.SessionId) -> tuple[str, bytes]:
    return m.volume, m.session


def session_state_to_pb(
    volume: str, session: bytes, persisted: int, received: int = 0, mac: bytes = b""
) -> data_pb2.SessionState:
    return data_pb2.SessionState(
        session=session_id_to_pb(volume, session),
        persisted_seq=persisted,
        received_seq=received,
        mac=mac,
    )


def session_state_from_pb(m: data_pb2.SessionState) -> tuple[int, int]:
    """Return (persisted_seq, received_seq)."""
    return m.persisted_seq, m.received_seq


def session_state_mac_from_pb(m: data_pb2.SessionState) -> bytes:
    """Return the master target's MAC of ``persisted_seq`` (empty: none relayed)."""
    return m.mac


def volume_to_pb(name: str, size: int, fmt: str, subformat: str) -> control_pb2.Volume:
    return control_pb2.Volume(name=name, size=size, format=fmt, subformat=subformat)


# --- control service -------------------------------------------------------


@dataclass(frozen=True)
class VolumeInfo:
    """A master-target volume as the control service reports it."""

    name: str
    size: int
    format: str
    subformat: str


@dataclass(frozen=True)
class PairInfo:
    """A source agent's replication pair as the control service reports it."""

    disk: str
    volume: str
    state: str
    blocks_total: int = 0
    blocks_done: int = 0
    persisted_seq: int = 0
    error: str = ""
    mode: str = ""
    rpo_seconds: float = 0.0
    process_server: str = ""


@dataclass(frozen=True)
class AgentInfo:
    """What ``Control.Status`` answers: the agent, its pairs, volumes and problems."""

    role: str
    agent_version: str
    uptime_seconds: int
    pairs: tuple[PairInfo, ...] = ()
    volumes: tuple[VolumeInfo, ...] = ()
    spool_bytes: int = 0
    problems: tuple[str, ...] = ()


def volume_from_pb(m: control_pb2.Volume) -> VolumeInfo:
    return VolumeInfo(m.name, m.size, m.format, m.subformat)


def pair_to_pb(p: PairInfo) -> control_pb2.PairStatus:
    return control_pb2.PairStatus(
        disk=p.disk,
        volume=p.volume,
        state=p.state,
        blocks_total=p.blocks_total,
        blocks_done=p.blocks_done,
        persisted_seq=p.persisted_seq,
        error=p.error,
        mode=p.mode,
        rpo_seconds=p.rpo_seconds,
        process_server=p.process_server,
    )


def pair_from_pb(m: control_pb2.PairStatus) -> PairInfo:
    return PairInfo(
        m.disk,
        m.volume,
        m.state,
        m.blocks_total,
        m.blocks_done,
        m.persisted_seq,
        m.error,
        m.mode,
        m.rpo_seconds,
        m.process_server,
    )


def agent_status_to_pb(a: AgentInfo) -> control_pb2.AgentStatus:
    return control_pb2.AgentStatus(
        role=_ROLES[a.role],
        agent_version=a.agent_version,
        uptime_seconds=a.uptime_seconds,
        pairs=[pair_to_pb(p) for p in a.pairs],
        volumes=[volume_to_pb(v.name, v.size, v.format, v.subformat) for v in a.volumes],
        spool_bytes=a.spool_bytes,
        problems=list(a.problems),
    )


def agent_status_from_pb(m: control_pb2.AgentStatus) -> AgentInfo:
    return AgentInfo(
        role=_ROLE_NAMES.get(m.role, "unknown"),
        agent_version=m.agent_version,
        uptime_seconds=m.uptime_seconds,
        pairs=tuple(pair_from_pb(p) for p in m.pairs),
        volumes=tuple(volume_from_pb(v) for v in m.volumes),
        spool_bytes=m.spool_bytes,
        problems=tuple(m.problems),
    )


def volumes_from_pb(m: control_pb2.ListVolumesResponse) -> list[VolumeInfo]:
    return [volume_from_pb(v) for v in m.volumes]


def create_volume_to_pb(name: str, size: int, subformat: str) -> control_pb2.CreateVolumeRequest:
    return control_pb2.CreateVolumeRequest(name=name, size=size, subformat=subformat)


def release_volume_to_pb(name: str) -> control_pb2.ReleaseVolumeRequest:
    return control_pb2.ReleaseVolumeRequest(name=name)


def start_pair_to_pb(disk: str, volume: str) -> control_pb2.StartPairRequest:
    return control_pb2.StartPairRequest(disk=disk, volume=volume)


def move_pair_to_pb(disk: str, address: str, host: str) -> control_pb2.MovePairRequest:
    return control_pb2.MovePairRequest(disk=disk, process_server=address, process_server_host=host)


def stop_pair_to_pb(disk: str) -> control_pb2.StopPairRequest:
    return control_pb2.StopPairRequest(disk=disk)


def status_request_pb() -> control_pb2.StatusRequest:
    return control_pb2.StatusRequest()


def list_volumes_request_pb() -> control_pb2.ListVolumesRequest:
    return control_pb2.ListVolumesRequest()


@dataclass(frozen=True)
class TagSpec:
    """A tagged cut asked of a source agent (Tag, PrepareCut, CommitCut)."""

    kind: str
    name: str
    group: str = ""
    disks: tuple[str, ...] = ()
    timeout_seconds: float = 0.0


@dataclass(frozen=True)
class PointMsg:
    """A recovery point as the control service reports it."""

    id: int
    time: float
    kind: str
    tag: str
    group: str
    manifest_root: str


def tag_to_pb(t: TagSpec) -> control_pb2.TagRequest:
    return control_pb2.TagRequest(
        kind=t.kind,
        name=t.name,
        group=t.group,
        disks=list(t.disks),
        timeout_seconds=t.timeout_seconds,
    )


def tag_from_pb(m: control_pb2.TagRequest) -> TagSpec:
    return TagSpec(m.kind, m.name, m.group, tuple(m.disks), m.timeout_seconds)


def tag_reply_to_pb(disks: list[str], held: float) -> control_pb2.TagReply:
    return control_pb2.TagReply(disks=disks, held_seconds=held)


def tag_reply_from_pb(m: control_pb2.TagReply) -> tuple[list[str], float]:
    return list(m.disks), m.held_seconds


def point_to_pb(p: PointMsg) -> control_pb2.RecoveryPoint:
    return control_pb2.RecoveryPoint(
        id=p.id, time=p.time, kind=p.kind, tag=p.tag, group=p.group, manifest_root=p.manifest_root
    )


def point_from_pb(m: control_pb2.RecoveryPoint) -> PointMsg:
    return PointMsg(m.id, m.time, m.kind, m.tag, m.group, m.manifest_root)


def list_points_request_pb(volume: str) -> control_pb2.ListPointsRequest:
    return control_pb2.ListPointsRequest(volume=volume)


def points_to_pb(points: list[PointMsg]) -> control_pb2.ListPointsResponse:
    return control_pb2.ListPointsResponse(points=[point_to_pb(p) for p in points])


def points_from_pb(m: control_pb2.ListPointsResponse) -> list[PointMsg]:
    return [point_from_pb(p) for p in m.points]


def produce_request_pb(
    volume: str, point: str, name: str, subformat: str
) -> control_pb2.ProduceDiskRequest:
    return control_pb2.ProduceDiskRequest(
        volume=volume, point=point, name=name, subformat=subformat
    )


def produced_to_pb(v: VolumeInfo, p: PointMsg) -> control_pb2.ProducedDisk:
    return control_pb2.ProducedDisk(
        volume=volume_to_pb(v.name, v.size, v.format, v.subformat), point=point_to_pb(p)
    )


def produced_from_pb(m: control_pb2.ProducedDisk) -> tuple[VolumeInfo, PointMsg]:
    return volume_from_pb(m.volume), point_from_pb(m.point)

"""Master target servicers: thin adapters from gRPC to ``replication.applier``.

Each method converts the request with ``replication.wire``, calls the library, and
converts back; a :class:`ReplicationError` becomes a gRPC status with its stable
code. The applier is not thread-safe, so one lock serialises every call into it
(one master target applies a few sessions at a time; fsync dominates anyway).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc

from replication import metrics, tls, wire
from replication.disks import open_disk
from replication.errors import RemoteProtocolError, ReplicationError
from replication.protocol import AckLevel, Hello
from replication.server import abort_with, answer_handshake
from replication.streams import batches
from replication.v1 import control_pb2, control_pb2_grpc, data_pb2_grpc

ROLE = "master-target"


class MasterTargetService(data_pb2_grpc.MasterTargetServicer):
    """Data service: hash maps, session state, and applying frames."""

    def __init__(self, applier, lock: threading.Lock) -> None:
        self._applier = applier
        self._lock = lock

    def Handshake(self, request, context):
        tls.require_role(context, "process-server")
        return answer_handshake(request, context, ROLE)

    def GetHashMap(self, request, context):
        tls.require_role(context, "process-server")
        volume, block_size, covered = wire.hashmap_request_from_pb(request)
        try:
            with self._lock:
                chunks = list(self._applier.hash_map_chunks(volume, block_size, covered))
        except ReplicationError as err:
            abort_with(context, err)
        for first, digests, size, count in chunks:
            yield wire.hashmap_to_pb(wire.HashMapPiece(first, digests, size, count))

    def GetSessionState(self, request, context):
        tls.require_role(context, "process-server")
        volume, session = wire.session_id_from_pb(request)
        try:
            with self._lock:
                persisted = self._applier.session_state(volume, session)
        except ReplicationError as err:
            abort_with(context, err)
        return wire.session_state_to_pb(volume, session, persisted)

    def Apply(self, request_iterator, context):
        tls.require_role(context, "process-server")
        try:
            yield from self._apply_stream(request_iterator)
        except ReplicationError as err:
            abort_with(context, err)

    def _apply_stream(self, requests: Iterator) -> Iterator:
        opened: tuple[str, bytes] | None = None
        for batch in batches(requests):
            with self._lock:
                for pb in batch:
                    opened = self._handle(wire.source_message_from_pb(pb), opened)
                persisted = self._applier.commit()  # fsync, then record: ack after both
            if opened is not None and opened in persisted:
                volume, session = opened
                yield wire.ack_to_pb(
                    wire.AckMsg(volume, session, persisted[opened], AckLevel.PERSISTED)
                )

    def _handle(self, msg, opened):
        if isinstance(msg, wire.OpenMsg):
            self._applier.open_session(msg.volume, msg.session, msg.block_size, msg.volume_size)
            return (msg.volume, msg.session)
        if opened is None:
            raise RemoteProtocolError("frame before OpenSession")
        if isinstance(msg, wire.FrameMsg):
            try:
                self._applier.apply(opened[0], opened[1], msg.seq, msg.frame)
            except ReplicationError as err:
                metrics.REJECTED.labels(err.code).inc()
                raise
            metrics.FRAMES.labels("in").inc()
            metrics.BYTES.labels("in").inc(len(msg.frame))
        return opened


class ControlService(control_pb2_grpc.ControlServicer):
    """Control service of a master target: status and volumes."""

    def __init__(self, registry, applier, lock: threading.Lock) -> None:
        self._registry = registry
        self._applier = applier
        self._lock = lock
        self._started = time.monotonic()

    def Status(self, request, context):
        tls.require_role(context, "orchestrator", "source", "process-server")
        return control_pb2.AgentStatus(
            role=3,
            agent_version=Hello().agent_version,
            uptime_seconds=int(time.monotonic() - self._started),
            volumes=[_volume_pb(v) for v in self._registry.list()],
        )

    def ListVolumes(self, request, context):
        tls.require_role(context, "orchestrator", "process-server")
        return control_pb2.ListVolumesResponse(
            volumes=[_volume_pb(v) for v in self._registry.list()]
        )

    def CreateVolume(self, request, context):
        tls.require_role(context, "orchestrator")
        try:
            with self._lock:
                info = self._registry.create(
                    request.name, request.size, request.subformat or "monolithicSparse"
                )
        except ReplicationError as err:
            abort_with(context, err)
        return _volume_pb(info)

    def ListPoints(self, request, context):
        tls.require_role(context, "orchestrator", "process-server", "source")
        try:
            with self._lock:
                points = self._applier.points(request.volume)
        except ReplicationError as err:
            abort_with(context, err)
        return wire.points_to_pb([_point_msg(p) for p in points])

    def ProduceDisk(self, request, context):
        tls.require_role(context, "orchestrator")
        try:
            with self._lock:  # nothing is applied to the volume while it is copied
                point, info = self._produce(request)
        except ReplicationError as err:
            abort_with(context, err)
        return wire.produced_to_pb(
            wire.VolumeInfo(info.name, info.size, info.format, info.subformat), _point_msg(point)
        )

    def _produce(self, request):
        source = self._registry.get(request.volume)
        info = self._registry.create(
            request.name, source.size, request.subformat or "monolithicSparse"
        )
        with open_disk(self._registry.path(info.name), writable=True) as out:
            point = self._applier.produce(request.volume, request.point or "latest", out)
        return point, info

    def StartPair(self, request, context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "pairs are started on a source agent")

    def StopPair(self, request, context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "pairs are stopped on a source agent")


def _volume_pb(info):
    return wire.volume_to_pb(info.name, info.size, info.format, info.subformat)


def _point_msg(p) -> wire.PointMsg:
    return wire.PointMsg(p.id, p.time, p.kind, p.tag, p.group, p.manifest_root)

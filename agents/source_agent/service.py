"""Source agent control servicer: status, start and stop of replication pairs.

Thin: it checks the caller's role, converts with ``replication.wire`` and calls
the pair table; a :class:`ReplicationError` becomes a gRPC status with its code.
"""

from __future__ import annotations

import time

import grpc

from replication import tls, wire
from replication.errors import ReplicationError
from replication.protocol import Hello
from replication.server import abort_with
from replication.v1 import control_pb2_grpc

from .pairs import PairState, PairTable
from .tags import CutCoordinator

ROLE = "source"


def pair_info(p: PairState) -> wire.PairInfo:
    return wire.PairInfo(
        p.disk,
        p.volume,
        p.state,
        p.blocks_total,
        p.blocks_done,
        p.persisted_seq,
        p.error,
        p.mode,
        p.rpo_seconds,
        p.process_server,
    )


class SourceControlService(control_pb2_grpc.ControlServicer):
    """Control service of a source agent."""

    def __init__(self, pairs: PairTable, cuts: CutCoordinator) -> None:
        self._pairs = pairs
        self._cuts = cuts
        self._started = time.monotonic()

    def Status(self, request, context):
        tls.require_role(context, "orchestrator", "process-server", "master-target")
        states = self._pairs.states()
        problems = tuple(f"{p.disk}: {p.error}" for p in states if p.state == "error")
        return wire.agent_status_to_pb(
            wire.AgentInfo(
                role=ROLE,
                agent_version=Hello().agent_version,
                uptime_seconds=int(time.monotonic() - self._started),
                pairs=tuple(pair_info(p) for p in states),
                problems=problems,
            )
        )

    def StartPair(self, request, context):
        tls.require_role(context, "orchestrator")
        try:
            state = self._pairs.start(request.disk, request.volume)
        except ReplicationError as err:
            abort_with(context, err)
        return wire.pair_to_pb(pair_info(state))

    def StopPair(self, request, context):
        tls.require_role(context, "orchestrator")
        try:
            state = self._pairs.stop(request.disk)
        except ReplicationError as err:
            abort_with(context, err)
        return wire.pair_to_pb(pair_info(state))

    def MovePair(self, request, context):
        tls.require_role(context, "orchestrator")
        try:
            state = self._pairs.move(
                request.disk, request.process_server, request.process_server_host
            )
        except ReplicationError as err:
            abort_with(context, err)
        return wire.pair_to_pb(pair_info(state))

    def Tag(self, request, context):
        return self._cut(context, self._cuts.tag, request)

    def PrepareCut(self, request, context):
        return self._cut(context, self._cuts.prepare, request)

    def CommitCut(self, request, context):
        return self._cut(context, self._cuts.commit, request)

    def _cut(self, context, step, request):
        tls.require_role(context, "orchestrator")
        try:
            disks, held = step(wire.tag_from_pb(request))
        except ReplicationError as err:
            abort_with(context, err)
        return wire.tag_reply_to_pb(disks, held)

    def ListPoints(self, request, context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "recovery points are kept by a master target")

    def ProduceDisk(self, request, context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "disks are produced by a master target")

    def ListVolumes(self, request, context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "volumes are listed by a master target")

    def CreateVolume(self, request, context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "volumes are created on a master target")

"""A client of the agents' control service (the scenario's port 443 role).

What the ``replication agent`` CLI and an orchestrator use to command running
agents: status, volumes of a master target, creating a volume on its datastore or
releasing one (handing its disk over), starting and stopping pairs on a source
agent. It speaks only the wire contract (``proto/replication/v1/control.proto``)
and never imports agent modules. Every
call has a deadline; a refusal comes back as the typed error the agent raised.
"""

from __future__ import annotations

import grpc

from . import wire
from .certs import Identity
from .errors import ServerRoleError
from .server import error_from_rpc
from .tls import secure_channel
from .v1 import control_pb2_grpc

__all__ = ["ControlClient", "consistent_cut"]


class ControlClient:
    """Commands one agent's control service over mutual TLS."""

    def __init__(
        self,
        address: str,
        identity: Identity,
        *,
        server_host: str = "localhost",
        timeout: float = 30.0,
        role: str | None = None,
    ) -> None:
        """``role``: the agent's role this client expects (``source``, ``master-target``,
        ``process-server``); every call then fails with ServerRoleError unless the
        server proves it (``replication.tls.RoleCheck``)."""
        self.address = address
        self.timeout = timeout
        self._channel = secure_channel(address, identity, server_host=server_host, expect_role=role)
        self._stub = control_pb2_grpc.ControlStub(self._channel)

    def status(self) -> wire.AgentInfo:
        """The agent's role, version, pairs, volumes, spool and problems."""
        reply = self._call("status", self._stub.Status, wire.status_request_pb())
        return wire.agent_status_from_pb(reply)

    def list_volumes(self) -> list[wire.VolumeInfo]:
        """The volumes a master target may write."""
        reply = self._call("list volumes", self._stub.ListVolumes, wire.list_volumes_request_pb())
        return wire.volumes_from_pb(reply)

    def create_volume(
        self, name: str, size: int, subformat: str = "monolithicSparse"
    ) -> wire.VolumeInfo:
        """Create a new VMDK on a master target's datastore (idempotent for one size)."""
        request = wire.create_volume_to_pb(name, size, subformat)
        return wire.volume_from_pb(
            self._call(f"create volume {name}", self._stub.CreateVolume, request)
        )

    def release_volume(self, name: str) -> wire.VolumeInfo:
        """Make a master target let go of a volume (its disk handed to another writer).

        Refused with VolumeInUseError (retryable) while a session on it is open;
        idempotent once released; CreateVolume with the same name and size takes it back.
        """
        request = wire.release_volume_to_pb(name)
        return wire.volume_from_pb(
            self._call(f"release volume {name}", self._stub.ReleaseVolume, request)
        )

    def start_pair(self, disk: str, volume: str) -> wire.PairInfo:
        """Start replicating a source agent's disk into a volume."""
        request = wire.start_pair_to_pb(disk, volume)
        return wire.pair_from_pb(self._call(f"start pair {disk}", self._stub.StartPair, request))

    def move_pair(
        self, disk: str, process_server: str, server_host: str = "localhost"
    ) -> wire.PairInfo:
        """Send a pair's next sessions through another process server (no resync)."""
        request = wire.move_pair_to_pb(disk, process_server, server_host)
        return wire.pair_from_pb(self._call(f"move pair {disk}", self._stub.MovePair, request))

    def stop_pair(self, disk: str) -> wire.PairInfo:
        """Stop a pair once what it already sent is PERSISTED (bounded)."""
        request = wire.stop_pair_to_pb(disk)
        return wire.pair_from_pb(self._call(f"stop pair {disk}", self._stub.StopPair, request))

    def tag(self, spec: wire.TagSpec) -> tuple[list[str], float]:
        """Cut a tagged epoch on a source agent's disks; return them and the hold time."""
        reply = self._call(f"tag {spec.name}", self._stub.Tag, wire.tag_to_pb(spec))
        return wire.tag_reply_from_pb(reply)

    def prepare_cut(self, spec: wire.TagSpec) -> tuple[list[str], float]:
        """Phase one of a group cut: pre-hook, then hold new writes (until commit/timeout)."""
        reply = self._call(f"prepare {spec.name}", self._stub.PrepareCut, wire.tag_to_pb(spec))
        return wire.tag_reply_from_pb(reply)

    def commit_cut(self, spec: wire.TagSpec) -> tuple[list[str], float]:
        """Phase two: cut the tagged epoch, release the writes, post-hook."""
        reply = self._call(f"commit {spec.name}", self._stub.CommitCut, wire.tag_to_pb(spec))
        return wire.tag_reply_from_pb(reply)

    def list_points(self, volume: str) -> list[wire.PointMsg]:
        """The recovery points of a master target's volume, oldest first."""
        reply = self._call(
            f"list points of {volume}", self._stub.ListPoints, wire.list_points_request_pb(volume)
        )
        return wire.points_from_pb(reply)

    def produce_disk(
        self, volume: str, point: str, name: str, subformat: str = "monolithicSparse"
    ) -> tuple[wire.VolumeInfo, wire.PointMsg]:
        """Write ``volume`` at ``point`` into a new verified VMDK ``name`` (master target)."""
        request = wire.produce_request_pb(volume, point, name, subformat)
        return wire.produced_from_pb(
            self._call(f"produce {volume}@{point}", self._stub.ProduceDisk, request)
        )

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, what: str, method, request):
        try:
            return method(request, timeout=self.timeout)
        except ServerRoleError as err:  # typed already; say where
            raise ServerRoleError(
                f"{what} at {self.address}: {err.message}", hint=err.hint
            ) from None
        except grpc.RpcError as err:
            raise error_from_rpc(err, f"{what} at {self.address}") from None


def consistent_cut(clients: list[ControlClient], spec: wire.TagSpec) -> float:
    """One tagged cut across several source agents (a multi-VM consistency group).

    Every agent is prepared (writes held) before any is cut, so no write that
    follows the cut on one disk can be included while one it depends on is not
    (control.proto explains the protocol). If a prepare fails its error is raised
    and no disk is cut: the agents already prepared release their writes when their
    prepare timeout passes. Returns the longest hold time.
    """
    prepared = []
    for client in clients:
        client.prepare_cut(spec)
        prepared.append(client)
    held = 0.0
    for client in prepared:
        _disks, seconds = client.commit_cut(spec)
        held = max(held, seconds)
    return held

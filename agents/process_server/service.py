"""Process server servicers: thin adapters from gRPC to :class:`Relay`.

:class:`ProcessServerService` is the data service sources talk to;
:class:`ProcessServerControl` answers ``Control.Status`` (spool size and problems:
parked sessions, forwarding being retried, a full spool device or a spool at its
limit, an unreachable master target). The other control methods belong to the
master target and the source agent: UNIMPLEMENTED.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

import grpc

from replication import tls, wire
from replication.errors import RelayTargetError, RemoteProtocolError, ReplicationError
from replication.protocol import AckLevel, Hello
from replication.server import abort_with, answer_handshake, error_code_of, status_for
from replication.streams import batches
from replication.tls import ERROR_CODE_METADATA
from replication.v1 import common_pb2, control_pb2, control_pb2_grpc, data_pb2_grpc

from .relay import Relay

ROLE = "process-server"
log = logging.getLogger("process-server")
_DONE = object()
#: frames read ahead of the spool, and the largest group commit: the process server
#: holds at most about twice this many frames in memory beyond the spool's limit
#: before gRPC flow control pushes back on the source (design W6)
READ_AHEAD_FRAMES = 8
#: seconds GetSessionState waits for the master target's (authenticated) state
STATE_TIMEOUT = 5.0


class ProcessServerService(data_pb2_grpc.ProcessServerServicer):
    """The data service sources talk to (port 9443)."""

    def __init__(self, relay: Relay, target_stub) -> None:
        self._relay = relay
        self._target_stub = target_stub
        self.streams = _StreamCount()

    def Handshake(self, request, context):
        tls.require_role(context, "source")
        return answer_handshake(request, context, ROLE)

    def GetHashMap(self, request, context):
        tls.require_role(context, "source")
        # relayed as is. Known limit: XXH3 digests are not ciphertext; they reveal
        # which blocks are equal (and which are zero) to the relay, never their content.
        try:
            yield from self._target_stub().GetHashMap(request, timeout=600)
        except (grpc.RpcError, ReplicationError) as err:
            relay_failure(context, err)

    def GetSessionState(self, request, context):
        tls.require_role(context, "source")
        volume, session = wire.session_id_from_pb(request)
        received, persisted = self._relay.state((volume, session))
        mac = b""
        try:  # the master target's word, with its MAC: the only one a source acts on
            target = self._target_stub().GetSessionState(request, timeout=STATE_TIMEOUT)
            if target.persisted_seq >= persisted:
                persisted, mac = target.persisted_seq, wire.session_state_mac_from_pb(target)
        except grpc.RpcError as err:  # answer what we know: the source then resends more
            log.info("event=target_state_unknown volume=%s status=%s", volume, err.code())
        return wire.session_state_to_pb(volume, session, persisted, received, mac)

    def Replicate(self, request_iterator, context):
        tls.require_role(context, "source")
        outbox: queue.Queue[object] = queue.Queue()
        state: dict[str, object] = {}
        worker = threading.Thread(
            target=self._ingest, args=(request_iterator, outbox, state), daemon=True
        )
        worker.start()
        self.streams.opened()
        try:
            while context.is_active():
                try:
                    item = outbox.get(timeout=0.5)
                except queue.Empty:
                    continue
                if item is _DONE:
                    break
                if isinstance(item, ReplicationError):
                    abort_with(context, item)
                yield wire.ack_to_pb(item)
        finally:
            self.streams.closed()
            key, sub = state.get("key"), state.get("sub")
            if key is not None and sub is not None:
                self._relay.unsubscribe(key, sub)  # type: ignore[arg-type]

    def _ingest(self, requests, outbox: queue.Queue[object], state: dict[str, object]) -> None:
        """Reader: spool frames batch by batch and queue a RECEIVED ack per batch."""
        try:
            for batch in batches(
                requests, max_items=READ_AHEAD_FRAMES, queue_size=READ_AHEAD_FRAMES
            ):
                self._ingest_batch(batch, outbox, state)
        except ReplicationError as err:
            outbox.put(err)
        except grpc.RpcError:
            pass  # the source went away: its stream simply ends
        except Exception as err:  # a bug: say so, and end the stream with an error
            log.exception("event=ingest_failed")
            outbox.put(ReplicationError(f"process server failed: {err}"))
        finally:
            outbox.put(_DONE)

    def _ingest_batch(self, batch, outbox, state) -> None:
        frames: list[wire.FrameMsg] = []
        key = state.get("key")
        log.debug("event=ingest_batch messages=%d", len(batch))
        for pb in batch:
            msg = wire.source_message_from_pb(pb)
            if isinstance(msg, wire.OpenMsg):
                key = self._relay.open(msg)
                state["key"] = key
                state["sub"] = self._relay.subscribe(key, outbox)
            elif key is None:
                raise RemoteProtocolError("frame before OpenSession")
            elif isinstance(msg, wire.FrameMsg):
                frames.append(msg)
            else:
                self._relay.close(key, msg.last_seq)  # type: ignore[arg-type]
        if frames and key is not None:
            received = self._relay.accept(key, frames)  # type: ignore[arg-type]
            outbox.put(wire.AckMsg(key[0], key[1], received, AckLevel.RECEIVED))  # type: ignore[index]


#: statuses of a master target that could not be reached: worth the source's retry
_UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def relay_failure(context: grpc.ServicerContext, err: grpc.RpcError | ReplicationError) -> None:
    """End the source's call with the master target's status and error code (never returns).

    Without this gRPC ends a relayed server stream with UNKNOWN ("Exception iterating
    responses") and no code, and the source cannot tell ``volume.unknown`` from an
    outage: it would retry a permanent refusal as if it were transient. Three cases:

    * the master target refused with a code: its status and code, as they came;
    * a typed error of our own channel to it (``tls.server_role``: the server at
      that address is not a master target): its code and status, said to be ours;
    * no code, and it could not be reached (``UNAVAILABLE``, ``DEADLINE_EXCEEDED``:
      down, or a TLS handshake between us and it refused): its status, with
      ``relay.target_unreachable`` (retryable), so the source never takes a TLS
      failure of this hop for a refusal of its own certificate (design F5); any
      other status without a code (a master target's bug) goes as it came.
    """
    if isinstance(err, ReplicationError):
        log.warning("event=relay_failed code=%s error=%s", err.code, err.message)
        context.set_trailing_metadata(((ERROR_CODE_METADATA, err.code),))
        context.abort(status_for(err), f"[{err.code}] process server -> master target: {err}")
    code = error_code_of(err)
    status = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = str(err.details() if hasattr(err, "details") else err)
    if code is None:
        details = f"master target: {getattr(status, 'name', status)}: {details}"
        if status in _UNREACHABLE:
            code = RelayTargetError.code
    if code is not None:
        context.set_trailing_metadata(((ERROR_CODE_METADATA, code),))
    log.warning("event=relay_failed status=%s code=%s", getattr(status, "name", status), code)
    context.abort(status, details)


class _StreamCount:
    """Replicate streams open now; each new high-water mark is logged (``streams_peak``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.open = 0
        self.peak = 0

    def opened(self) -> None:
        with self._lock:
            self.open += 1
            if self.open <= self.peak:
                return
            self.peak = self.open
        log.info("event=streams_peak streams=%d", self.peak)

    def closed(self) -> None:
        with self._lock:
            self.open -= 1


class ProcessServerControl(control_pb2_grpc.ControlServicer):
    """Control service of a process server: ``Status`` only."""

    def __init__(self, relay: Relay, probe=None) -> None:
        self._relay = relay
        self._probe = probe  # a TargetProbe (watchdog.py), or None: not probed
        self._started = time.monotonic()

    def Status(self, request, context):
        tls.require_role(context, "orchestrator", "source", "master-target")
        return control_pb2.AgentStatus(
            role=common_pb2.ROLE_PROCESS_SERVER,
            agent_version=Hello().agent_version,
            uptime_seconds=int(time.monotonic() - self._started),
            spool_bytes=self._relay.spool_bytes(),
            problems=self._problems(),
        )

    def _problems(self) -> list[str]:
        """The master target's reachability first, then the relay's own lines."""
        probed = self._probe.problems() if self._probe is not None else []
        return probed + self._relay.problems()

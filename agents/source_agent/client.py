"""Source agent: resync one disk into one volume through a process server.

The library decides what to send (``replication.source.SourceSession``); this
module only moves messages: it fetches the target's hash map, streams frames on a
``Replicate`` call while reading acks, and after a cut reconnects, asks where the
session stands, and resends the kept frames after the persisted sequence. Every
loop is bounded by ``deadline`` seconds. A ``cancel`` event stops sealing new
frames; the frames already sent are still brought to PERSISTED (within a grace),
so a stopped pair leaves nothing half-acknowledged behind. A token bucket, when
given, spaces the frames on the wire (``--bandwidth-limit``).

Security (docs/security.md): the process server must prove its role (its
certificate says ``process-server``), and must offer SESSION_ORDER and ACK_MAC, or
it is refused. Every session then takes a new order number (durable, per volume,
:class:`~replication.ordering.SessionCounter`), and a PERSISTED ack is acted on only
with the master target's MAC: a forged one ends the session with
:class:`~replication.errors.ForgedAckError` (counted in ``replication_rejected_acks``)
and nothing is dropped.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import numpy as np

from replication import metrics, wire
from replication.blocks import block_count
from replication.certs import Identity
from replication.errors import ERRORS_BY_CODE, ForgedAckError, PairFailedError
from replication.hashmap import WINDOW_BLOCKS, map_windows
from replication.ordering import SessionCounter
from replication.protocol import REQUIRED_BY_SOURCE, Agreed, Feature, Hello, negotiate
from replication.server import error_code_of, error_from_rpc
from replication.source import SourceSession
from replication.throttle import TokenBucket
from replication.tls import secure_channel
from replication.v1 import data_pb2_grpc

log = logging.getLogger("source-agent")

_STOP = object()

#: seconds a cancelled session still waits for the acks of frames already sent
CANCEL_GRACE = 30.0
#: session order numbers of an agent run without a state directory (clock and memory)
_VOLATILE_COUNTER = SessionCounter(None)
#: one XXH3-128 digest, as the hash map's arrays hold it
_DIGEST = np.dtype((np.void, 16))


@dataclass
class PairOptions:
    """How one replication session runs (from the agent's settings)."""

    block_size: int
    address: str = ""  # the process server, HOST:PORT
    server_host: str = "localhost"
    deadline: float = 3600.0
    throttle: TokenBucket | None = None
    cancel: threading.Event | None = None
    #: called with the session after planning and after every ack (status, metrics)
    on_progress: Callable[[SourceSession], None] | None = None
    #: order numbers of new sessions (durable with ``--state-dir``)
    session_counter: SessionCounter | None = None
    #: called with one line each time a step fails and is retried (status says why)
    on_retry: Callable[[str], None] | None = None


class TargetMapStream:
    """The target volume's hash map as it streams in, taken a window at a time.

    The master target sends its map in order, in pieces of at most 65536 digests;
    :meth:`take` returns the digests of the next ``count`` blocks, so no more than a
    window (and one piece) is ever held. A piece out of order, or a map longer or
    shorter than the source disk, fails the pair: a block left unknown must not be
    taken for zeros.
    """

    def __init__(self, pieces: Iterator[wire.HashMapPiece], blocks: int) -> None:
        self._pieces = pieces
        self._blocks = blocks
        self._next = 0  # the first block not yet taken
        self._received = 0  # blocks received so far (taken or held)
        self._held = np.empty(0, dtype=_DIGEST)

    def take(self, first: int, count: int) -> np.ndarray:
        """Return the digests of blocks ``[first, first + count)`` (the next ones)."""
        assert first == self._next, "windows are taken in order"
        out = np.empty(count, dtype=self._held.dtype)
        filled = 0
        while filled < count:
            if not len(self._held):
                self._held = self._piece()
            n = min(count - filled, len(self._held))
            out[filled : filled + n] = self._held[:n]
            self._held = self._held[n:]
            filled += n
        self._next += count
        return out

    def _piece(self) -> np.ndarray:
        piece = next(self._pieces, None)
        if piece is None:
            raise PairFailedError("target hash map is shorter than the source disk")
        digests = np.frombuffer(piece.digests, dtype=self._held.dtype)
        if piece.first_block != self._received:
            raise PairFailedError(
                f"target hash map: a piece at block {piece.first_block}, expected {self._received}"
            )
        self._received += len(digests)
        if self._received > self._blocks:
            raise PairFailedError("target hash map is longer than the source disk")
        return digests

    def finish(self) -> None:
        """Check that the map held no more than the source disk's blocks."""
        if len(self._held) or next(self._pieces, None) is not None:
            raise PairFailedError("target hash map is longer than the source disk")


def fetch_target_map(stub, volume: str, block_size: int, covered: int) -> TargetMapStream:
    """Start streaming the target volume's hash map through the process server."""
    request = wire.hashmap_request_to_pb(volume, block_size, covered)
    pieces = wire.hashmap_from_pb(stub.GetHashMap(request, timeout=600))
    return TargetMapStream(pieces, block_count(covered, block_size))


class Replicator:
    """Drive one SourceSession over one process server channel until PERSISTED."""

    def __init__(
        self, session: SourceSession, stub, options: PairOptions, *, reconnect=None
    ) -> None:
        self.session = session
        self.stub = stub
        self.options = options
        # after a failure, a fresh channel: a half-dead connection must not be reused
        self._reconnect = reconnect
        self._reported = (0, 0)  # frames and bytes already added to the counters
        self.deadline = time.monotonic() + options.deadline
        self._cancel = options.cancel or threading.Event()
        self._acked = threading.Condition()

    def _check_cancel(self) -> None:
        """On cancel: seal nothing more, and give the sent frames a bounded grace."""
        if self._cancel.is_set() and not self.session.done_sealing():
            with self._acked:
                self.session.stop_sealing()
            self.deadline = min(self.deadline, time.monotonic() + CANCEL_GRACE)

    def run(self) -> None:
        """Send everything, surviving cuts, until every frame is PERSISTED."""
        first = True
        attempt = 0
        self._update_metrics()
        while not self.session.complete():
            self._check_cancel()
            if self.session.complete():
                break
            if time.monotonic() > self.deadline:
                raise PairFailedError(
                    f"gave up: persisted {self.session.stats.persisted_seq} of "
                    f"{self.session.last_seq} frames before the deadline"
                )
            try:
                resend = [] if first else self._resume_point()
                first = False  # every later stream, even after a failed first one, resumes
                self._stream(resend)
            except grpc.RpcError as err:
                attempt += 1
                refused = ERRORS_BY_CODE.get(error_code_of(err) or "")
                if refused is not None and not refused.retryable:
                    raise PairFailedError(f"refused: {err.details()}") from None
                log.warning("event=stream_cut attempt=%d status=%s", attempt, err.code())
                self._cancel.wait(min(2.0, 0.1 * attempt))
                if self._reconnect is not None:
                    self.stub = self._reconnect()

    def _update_metrics(self) -> None:
        """Publish the session's counters (counters only ever grow by the new part)."""
        s = self.session.stats
        metrics.FRAMES.labels("out").inc(s.frames_sent - self._reported[0])
        metrics.BYTES.labels("out").inc(s.bytes_framed - self._reported[1])
        self._reported = (s.frames_sent, s.bytes_framed)
        metrics.RESYNC_BLOCKS.labels("total").set(s.blocks_total)
        metrics.RESYNC_BLOCKS.labels("to_send").set(s.blocks_to_send)
        metrics.BACKLOG_FRAMES.set(self.session.last_seq - s.persisted_seq)
        if s.bytes_framed:
            metrics.COMPRESSION_RATIO.set(s.bytes_plain / s.bytes_framed)
        if self.options.on_progress is not None:
            self.options.on_progress(self.session)

    def _resume_point(self) -> list[tuple[int, bytes]]:
        sid = wire.session_id_to_pb(self.session.volume, self.session.session)
        state = self.stub.GetSessionState(sid, timeout=10)
        persisted, _received = wire.session_state_from_pb(state)
        log.info("event=resume persisted_seq=%d", persisted)
        with _counting_forgeries():
            return self.session.resend_after(persisted, wire.session_state_mac_from_pb(state))

    def _stream(self, resend: list[tuple[int, bytes]]) -> None:
        out: queue.Queue[object] = queue.Queue()
        for seq, frame in resend:
            out.put(wire.FrameMsg(seq, frame))
        stop = threading.Event()
        sender = threading.Thread(target=self._produce, args=(out, stop), daemon=True)
        call = self.stub.Replicate(
            self._requests(out), timeout=max(1.0, self.deadline - time.monotonic())
        )
        sender.start()
        try:
            for pb in call:
                ack = wire.ack_from_pb(pb)
                log.debug("event=ack seq=%d level=%s", ack.seq, ack.level.name)
                with self._acked, _counting_forgeries():
                    self.session.on_ack(ack.seq, ack.level, ack.mac)
                    self._acked.notify_all()
                self._update_metrics()
                if self.session.complete():
                    break
        finally:
            # the producer must be gone before a resume: a frame it sealed into this
            # dead stream's queue would otherwise be missing from the next stream
            stop.set()
            with self._acked:
                self._acked.notify_all()
            sender.join(timeout=30)
            out.put(_STOP)
            call.cancel()

    def _requests(self, out: queue.Queue[object]) -> Iterator:
        s = self.session
        yield wire.source_message_to_pb(
            wire.OpenMsg(s.volume, s.session, s.block_size, s.disk.virtual_size, 1)
        )
        while True:
            item = out.get()
            if item is _STOP:
                return
            if self.options.throttle is not None and isinstance(item, wire.FrameMsg):
                # the request iterator runs on gRPC's sending thread: waiting here
                # spaces frames on the wire (resends included) without a timer thread
                self.options.throttle.take(len(item.frame))
            log.debug("event=send %s", getattr(item, "seq", item))
            yield wire.source_message_to_pb(item)

    def _produce(self, out: queue.Queue[object], stop: threading.Event) -> None:
        """Seal frames while the window allows; wait for acks when it is full."""
        s = self.session
        while not s.done_sealing():
            with self._acked:
                while s.window_full() and not stop.is_set() and time.monotonic() < self.deadline:
                    self._acked.wait(0.5)
                if stop.is_set():
                    return  # sealed frames stay in the session's unacked list
                if self._cancel.is_set():
                    s.stop_sealing()
                    break
                frames = s.next_frames()
            for seq, frame in frames:
                out.put(wire.FrameMsg(seq, frame))
        if not stop.is_set():
            out.put(wire.CloseMsg(s.last_seq))


@contextlib.contextmanager
def _counting_forgeries() -> Iterator[None]:
    """Count a ForgedAckError in ``replication_rejected_acks`` on its way up."""
    try:
        yield
    except ForgedAckError as err:
        metrics.REJECTED_ACKS.labels(err.code).inc()
        log.error("event=forged_ack error=%s", err.message)
        raise


def handshake(stub) -> Agreed:
    """Negotiate with the process server (raises ProtocolVersionError on mismatch).

    A process server without SESSION_ORDER and ACK_MAC is refused: it is the party
    both protect against, so a relay that leaves them out cannot be trusted as before.
    """
    reply = stub.Handshake(wire.hello_to_pb(Hello(role="source")), timeout=30)
    agreed = negotiate(Hello(role="source"), wire.hello_from_pb(reply))
    agreed.require(REQUIRED_BY_SOURCE, "process server")
    return agreed


def replicate_once(
    disk,
    volume: str,
    secret: bytes,
    address: str,
    identity: Identity,
    options: PairOptions,
    *,
    plan: Callable[[SourceSession, object], None] | None = None,
) -> SourceSession:
    """Bring ``volume`` level with ``disk`` and return the finished session.

    ``plan(session, stub)`` chooses the blocks to send; by default the source and
    target hash maps are compared (a resync).
    """
    channels = []

    def connect():
        for old in channels:
            # grpc's close() can block for long on a channel whose peer died mid-call;
            # never let it hold up the resume
            threading.Thread(target=old.close, daemon=True).start()
        channels[:] = [
            secure_channel(
                address, identity, server_host=options.server_host, expect_role="process-server"
            )
        ]
        return data_pb2_grpc.ProcessServerStub(channels[0])

    def prepare() -> tuple[object, SourceSession]:
        stub = connect()
        agreed = handshake(stub)
        counter = options.session_counter or _VOLATILE_COUNTER
        session = SourceSession(
            disk,
            volume,
            secret,
            block_size=options.block_size,
            order=counter.next(volume),
            authenticate_acks=True,
        )
        session.markers_allowed = agreed.has(Feature.EPOCH_MARKERS)
        (plan or plan_by_hash_compare)(session, stub)
        return stub, session

    try:
        stub, session = _with_retries(prepare, options, f"plan {volume}")
        log.info(
            "event=plan volume=%s blocks_total=%d blocks_to_send=%d",
            volume,
            session.stats.blocks_total,
            session.stats.blocks_to_send,
        )
        Replicator(session, stub, options, reconnect=connect).run()
        return session
    except grpc.RpcError as err:
        raise error_from_rpc(err, f"replicate {volume} via {address}") from None
    finally:
        for channel in channels:
            channel.close()


def _with_retries(step, options: PairOptions, what: str):
    """Run ``step`` until it succeeds, retrying transient failures until the deadline.

    Nothing has been sent before the plan exists, so a process server or master
    target that is down or restarting at that moment only delays the session; a
    refusal the peer marks permanent (unknown volume, wrong role...) ends it at once.
    """
    deadline = time.monotonic() + options.deadline
    cancel = options.cancel or threading.Event()
    attempt = 0
    while True:
        try:
            return step()
        except grpc.RpcError as err:
            attempt += 1
            if not _worth_retrying(err):
                raise
            if time.monotonic() > deadline or cancel.is_set():
                raise
            log.warning("event=retry step=%r attempt=%d status=%s", what, attempt, err.code())
            if options.on_retry is not None:
                status = getattr(err.code(), "name", err.code())
                options.on_retry(
                    f"{what}: attempt {attempt} failed, retrying: {status}: {err.details()}"
                )
            cancel.wait(min(2.0, 0.2 * attempt))


def _worth_retrying(err: grpc.RpcError) -> bool:
    """Whether a failed plan step may pass if tried again.

    A failure with an error code is sorted by the registry alone: the process server
    attaches one to whatever it relays (``relay.target_unreachable`` when its own hop
    to the master target failed, even a TLS handshake there), so only a failure
    *without* a code is this source's own channel, whose text tells a TLS refusal
    (permanent) from an outage.
    """
    code = error_code_of(err)
    if code is not None:
        refused = ERRORS_BY_CODE.get(code)
        return refused is None or refused.retryable
    return not (_tls_refused(err) or _relayed_refusal(err))


def _tls_refused(err: grpc.RpcError) -> bool:
    """A failed TLS handshake of this source's channel (foreign CA, expired or wrong
    certificate) is no outage: retrying cannot help, and the operator must hear of it
    at once."""
    details = (err.details() or "").lower() if hasattr(err, "details") else ""
    if "reset by peer" in details or "connection refused" in details:
        return False  # a peer dying mid-handshake is an outage, not a refusal
    return "certificate" in details or "ssl_error_ssl" in details or "alert" in details


def _relayed_refusal(err: grpc.RpcError) -> bool:
    """A master target's refusal that a process server relayed without its code (an
    older build).

    The relay of a server stream surfaces as UNKNOWN ("Exception iterating
    responses: ...") with the master target's own status in the text: an outage
    (UNAVAILABLE, DEADLINE_EXCEEDED) is worth retrying, anything else (NOT_FOUND for
    an unknown volume...) is not.
    """
    if err.code() != grpc.StatusCode.UNKNOWN:
        return False
    details = (err.details() or "").upper()
    return "UNAVAILABLE" not in details and "DEADLINE_EXCEEDED" not in details


def plan_by_hash_compare(
    session: SourceSession, stub, hash_disk=None, *, window_blocks: int = WINDOW_BLOCKS
) -> None:
    """Plan a resync: stream the target's hash map, hash the disk, send what differs.

    ``hash_disk`` is the Disk to hash when the session reads through another object
    (a live, tracked disk); by default the session's own disk. Both maps are taken a
    window of ``window_blocks`` at a time (16 bytes per block each) and compared as
    they come; what is kept is one bit per block of the disk (the plan).
    """
    disk = hash_disk or session.disk
    bs, size = session.block_size, disk.virtual_size
    target = fetch_target_map(stub, session.volume, bs, size)
    differing = np.zeros(-(-block_count(size, bs) // 8), dtype=np.uint8)
    for first, (source,) in map_windows([disk], size, bs, window_blocks=window_blocks):
        packed = np.packbits(source.digests != target.take(first, len(source)), bitorder="little")
        differing[first // 8 : first // 8 + len(packed)] = packed
    target.finish()
    session.plan_bitmap(differing, block_count(size, bs))

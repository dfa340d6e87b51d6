"""Process server core: spool what sources send, forward it in order, relay acks.

One :class:`Relay` per process server. Sources' frames go into the durable spool
(``replication.spool``); a RECEIVED ack is sent only after the spool is fsynced.
One forwarder thread per session streams spooled frames to the master target in
sequence order and turns its PERSISTED acks into ``mark_persisted`` (which frees
spool space) and into PERSISTED acks for the source, if it is still connected.
After a restart, every session with unforwarded frames gets its forwarder back
(``resume_all``), so nothing spooled is lost. The relay never holds a frame key.

Failures are sorted by the error registry's ``retryable`` flag, decided where the
error was born (``replication.errors``):

* forwarding: a retryable failure (master target unreachable, its disk full) is
  retried with backoff, the frames staying spooled; a permanent refusal (wrong
  key, unknown volume, replayed seq) *parks* the session (``parking.py``): no more
  attempts, frames kept, the source told with the typed error, the reason in
  ``problems()``, a log line and the parked-sessions gauge;
* spooling: the spool's byte limit pushes back (the source's stream is not read
  until forwarding frees space, design W6); a full *device* is answered at once
  with the retryable ``spool.disk_full``, so the source backs off and resends.
"""

from __future__ import annotations

import errno
import itertools
import json
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc

from replication import metrics, wire
from replication.durable import write_atomically
from replication.errors import (
    ERRORS_BY_CODE,
    RemoteProtocolError,
    ReplicationError,
    SpoolDiskFullError,
    SpoolError,
    SpoolFullError,
)
from replication.frame import peek_header
from replication.protocol import AckLevel
from replication.server import error_code_of

from .parking import ParkingLot

log = logging.getLogger("process-server")

SessionKey = tuple[str, bytes]


@dataclass(frozen=True)
class SessionMeta:
    """What a forwarder needs to open the session at the master target."""

    volume: str
    session_hex: str
    block_size: int
    volume_size: int
    last_seq: int = 0  # set when the source closed the session

    @property
    def key(self) -> SessionKey:
        return (self.volume, bytes.fromhex(self.session_hex))


class SessionBook:
    """Sessions known to this process server, kept in ``sessions.json`` (write-then-rename)."""

    def __init__(self, directory: Path) -> None:
        self._path = directory / "sessions.json"
        self._sessions: dict[SessionKey, SessionMeta] = {}
        if self._path.exists():
            for rec in json.loads(self._path.read_text()):
                meta = SessionMeta(**rec)
                self._sessions[meta.key] = meta

    def put(self, meta: SessionMeta) -> None:
        """Record ``meta`` durably; on failure nothing changes (a typed spool error)."""
        old = self._sessions.get(meta.key)
        self._sessions[meta.key] = meta
        doc = json.dumps([asdict(m) for m in self._sessions.values()])
        try:
            write_atomically(self._path, doc.encode())
        except OSError as err:
            # not durable, so not known: the source's next Open or Close writes it again
            if old is None:
                del self._sessions[meta.key]
            else:
                self._sessions[meta.key] = old
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise SpoolDiskFullError(f"no space to save {self._path}") from err
            raise SpoolError(f"save {self._path}: {err}") from err

    def get(self, key: SessionKey) -> SessionMeta | None:
        return self._sessions.get(key)

    def all(self) -> list[SessionMeta]:
        return list(self._sessions.values())


class Relay:
    """Spool, forwarders and ack fan-out of one process server."""

    def __init__(self, spool, spool_dir: Path, target_stub: Callable[[], object]) -> None:
        self._spool = spool
        self._book = SessionBook(spool_dir)
        self._target_stub = target_stub
        self._lock = threading.Condition()
        self._forwarders: dict[SessionKey, threading.Thread] = {}
        self._subscribers: dict[SessionKey, queue.Queue[object]] = {}
        self._stopping = threading.Event()
        self.parking = ParkingLot()

    # -- source side -----------------------------------------------------------------

    def open(self, msg: wire.OpenMsg) -> SessionKey:
        meta = SessionMeta(msg.volume, msg.session.hex(), msg.block_size, msg.volume_size)
        self._refuse_if_parked(meta.key)
        with self._lock:
            known = self._book.get(meta.key)
            if known is None:
                self._book.put(meta)
            self._start_forwarder(meta.key)
        return meta.key

    def accept(self, key: SessionKey, frames: list[wire.FrameMsg]) -> int:
        """Spool frames durably; return the highest contiguous RECEIVED seq.

        Raises the parked session's refusal, and :class:`SpoolDiskFullError` when the
        spool's device is full (retryable: the source resends after a backoff).
        """
        self._refuse_if_parked(key)
        try:
            synced, appended = self._spool_frames(key, frames)
        except SpoolDiskFullError as err:
            self.parking.spool_trouble(f"[{err.code}] {err.message}")
            log.warning("event=spool_disk_full volume=%s error=%s", key[0], err.message)
            raise
        if appended:  # new bytes went down: the device has room again
            self.parking.spool_trouble(None)
        with self._lock:
            received = synced.get(key, self._spool.state(*key)[0])
            metrics.SPOOL_BYTES.set(self._spool.used_bytes)
            metrics.BACKLOG_FRAMES.set(received - self._spool.state(*key)[1])
        metrics.FRAMES.labels("in").inc(len(frames))
        metrics.BYTES.labels("in").inc(sum(len(f.frame) for f in frames))
        log.debug(
            "event=spooled volume=%s frames=%d received_seq=%d", key[0], len(frames), received
        )
        return received

    def _spool_frames(
        self, key: SessionKey, frames: list[wire.FrameMsg]
    ) -> tuple[dict[SessionKey, int], bool]:
        """Append every frame (waiting for space under the limit), then sync once.

        Return what the sync made durable, and whether any frame was new (not a resend).
        """
        appended = False
        for msg in frames:
            header = peek_header(msg.frame)  # validates the header; no key needed
            if header.seq != msg.seq or header.salt != key[1]:
                raise RemoteProtocolError("frame header does not match its session or seq")
            appended |= self._append_waiting_for_space(key, msg)
        with self._lock:
            synced = self._spool.sync()
            self._lock.notify_all()  # forwarders: new frames to send
        return synced, appended

    def _append_waiting_for_space(self, key: SessionKey, msg: wire.FrameMsg) -> bool:
        """Spool one frame; return True if it was new (False: a resend already spooled)."""
        while True:
            with self._lock:
                self._refuse_if_parked(key)  # a parked session never frees its space
                try:
                    result = self._spool.append(key[0], key[1], msg.seq, msg.frame)
                    return result.status == "appended"
                except SpoolDiskFullError:
                    raise  # the device, not our limit: only an operator frees it
                except SpoolFullError:
                    if self._stopping.is_set():
                        raise
                    # Backpressure: stop reading the source until forwarding frees space.
                    # Sync first: forwarders send only durable frames, and the frames of
                    # this batch already appended may be all that could free it.
                    self._spool.sync()
                    self._lock.notify_all()
                    self._lock.wait(0.5)

    def _refuse_if_parked(self, key: SessionKey) -> None:
        refusal = self.parking.refusal(key)
        if refusal is not None:
            raise refusal

    def close(self, key: SessionKey, last_seq: int) -> None:
        with self._lock:
            meta = self._book.get(key)
            if meta is not None and meta.last_seq != last_seq:
                self._book.put(SessionMeta(**{**asdict(meta), "last_seq": last_seq}))
            self._lock.notify_all()

    def subscribe(self, key: SessionKey, q: queue.Queue[object]) -> queue.Queue[object]:
        """Send this session's PERSISTED acks to ``q`` (starting with the current one)."""
        with self._lock:
            self._subscribers[key] = q
            persisted = self._spool.state(*key)[1]
        if persisted:
            q.put(wire.AckMsg(key[0], key[1], persisted, AckLevel.PERSISTED))
        return q

    def unsubscribe(self, key: SessionKey, q: queue.Queue[object]) -> None:
        with self._lock:
            if self._subscribers.get(key) is q:
                del self._subscribers[key]

    def spool_bytes(self) -> int:
        """Bytes the spool holds now (what its limit bounds)."""
        with self._lock:
            return self._spool.used_bytes

    def state(self, key: SessionKey) -> tuple[int, int]:
        """Return (received_seq, persisted_seq) as this process server knows them."""
        with self._lock:
            return self._spool.state(*key)

    # -- forwarding ------------------------------------------------------------------

    def resume_all(self) -> None:
        """After a restart: forward every session that still has spooled frames."""
        with self._lock:
            for meta in self._book.all():
                received, persisted = self._spool.state(*meta.key)
                if received > persisted:
                    self._start_forwarder(meta.key)

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            self._lock.notify_all()
            threads = list(self._forwarders.values())
        for t in threads:
            t.join(timeout=10)

    def _start_forwarder(self, key: SessionKey) -> None:
        t = self._forwarders.get(key)
        if t is not None and t.is_alive():
            return
        t = threading.Thread(
            target=self._forward_loop, args=(key,), daemon=True, name=f"forward-{key[0]}"
        )
        self._forwarders[key] = t
        t.start()

    def _forward_loop(self, key: SessionKey) -> None:
        """Forward until finished: retry what may pass with backoff, park the rest."""
        attempt = 0  # failed attempts since the last progress
        while not self._stopping.is_set() and not self._finished(key):
            before = self.state(key)[1]
            try:
                self._forward_once(key)
                failure: BaseException | None = None
            except Exception as err:  # every failure is sorted below; the thread never dies
                failure = err
            progressed = self.state(key)[1] > before
            if failure is None:
                attempt = 0 if progressed else attempt + 1
                self._stopping.wait(min(2.0, 0.1 * attempt))  # ended early: not too eagerly
                continue
            refusal = _refusal(failure, key)
            if refusal is not None:
                self._park(key, refusal)
                return
            attempt = 1 if progressed else attempt + 1
            reason = _describe(failure)
            self.parking.retrying(key, attempt, reason)
            log.warning("event=forward_cut volume=%s attempt=%d reason=%s", key[0], attempt, reason)
            if not isinstance(failure, grpc.RpcError | ReplicationError):
                log.error("event=forward_failed volume=%s", key[0], exc_info=failure)
            self._stopping.wait(min(2.0, 0.1 * attempt))

    def _park(self, key: SessionKey, refusal: ReplicationError) -> None:
        """Stop forwarding ``key`` for good; keep its frames; tell its source and the operator."""
        parked = self.parking.park(key, refusal)
        metrics.PARKED_SESSIONS.set(parked)
        log.error(
            "event=session_parked volume=%s session=%s code=%s reason=%s",
            key[0],
            key[1].hex(),
            refusal.code,
            refusal.message,
        )
        with self._lock:
            sub = self._subscribers.get(key)
            self._lock.notify_all()  # an ingest waiting for spool space gives up
        if sub is not None:
            sub.put(self.parking.refusal(key))  # its Replicate call ends with this error

    def _finished(self, key: SessionKey) -> bool:
        with self._lock:
            meta = self._book.get(key)
            _, persisted = self._spool.state(*key)
        return meta is not None and meta.last_seq > 0 and persisted >= meta.last_seq

    def _forward_once(self, key: SessionKey) -> None:
        stub = self._target_stub()
        log.debug("event=forward_start volume=%s persisted_seq=%d", key[0], self.state(key)[1])
        call = stub.Apply(self._apply_requests(key))
        try:
            for pb in call:
                ack = wire.ack_from_pb(pb)
                self._persisted(key, ack.seq)
                if self._finished(key):
                    return
        finally:
            call.cancel()

    def _persisted(self, key: SessionKey, seq: int) -> None:
        log.debug("event=persisted volume=%s seq=%d", key[0], seq)
        self.parking.recovered(key)
        with self._lock:
            try:
                self._spool.mark_persisted(key[0], key[1], seq)
            except SpoolDiskFullError as err:
                # The cursor is right in memory and its file is retried at the next sync
                # or ack; only the segments it would free stay until then.
                log.warning("event=cursor_not_saved volume=%s error=%s", key[0], err.message)
            metrics.SPOOL_BYTES.set(self._spool.used_bytes)
            self._lock.notify_all()  # sources waiting for spool space
            sub = self._subscribers.get(key)
        if sub is not None:
            sub.put(wire.AckMsg(key[0], key[1], seq, AckLevel.PERSISTED))

    def _apply_requests(self, key: SessionKey) -> Iterator:
        meta = self._book.get(key)
        assert meta is not None
        yield wire.source_message_to_pb(
            wire.OpenMsg(meta.volume, key[1], meta.block_size, meta.volume_size, 1)
        )
        sent = self.state(key)[1]
        while not self._stopping.is_set():
            with self._lock:
                batch = list(itertools.islice(self._spool.pending(key[0], key[1], sent), 16))
                if not batch:
                    if self._finished(key):
                        return
                    self._lock.wait(0.5)
                    continue
            for seq, frame in batch:
                yield wire.source_message_to_pb(wire.FrameMsg(seq, frame))
                metrics.FRAMES.labels("out").inc()
                metrics.BYTES.labels("out").inc(len(frame))
                sent = seq


def _refusal(failure: BaseException, key: SessionKey) -> ReplicationError | None:
    """Return the permanent error behind a failed forward, or None if a retry may pass.

    The master target's error code is looked up in the registry: only a code whose
    class is not retryable is permanent. No code (unreachable, cancelled, a crash)
    is worth another try. A local error (the spool) carries its own flag.
    """
    if isinstance(failure, grpc.RpcError):
        cls = ERRORS_BY_CODE.get(error_code_of(failure) or "")
        if cls is None or cls.retryable:
            return None
        return cls(
            f"volume {key[0]}: the master target refused the session: {_details(failure)}",
            hint="its frames stay spooled; fix the cause, then restart the process server",
        )
    if isinstance(failure, ReplicationError) and not failure.retryable:
        return failure
    return None


def _describe(failure: BaseException) -> str:
    """One line for logs and status: the stable code when there is one, else the status."""
    if isinstance(failure, grpc.RpcError):
        code = error_code_of(failure)
        if code is not None:
            return f"[{code}] {_details(failure)}"
        status = getattr(failure.code(), "name", "UNKNOWN")  # type: ignore[attr-defined]
        return f"master target: {status}: {_details(failure)}"
    if isinstance(failure, ReplicationError):
        return f"[{failure.code}] {failure.message}"
    return f"{type(failure).__name__}: {failure}"


def _details(err: grpc.RpcError) -> str:
    """The peer's message without the ``[code]`` prefix ``abort_with`` puts first."""
    text = str(err.details() or "")  # type: ignore[attr-defined]
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    return text

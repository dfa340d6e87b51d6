"""Process server core: spool what sources send, forward it in order, relay acks.

One :class:`Relay` per process server. Sources' frames go into the durable spool
(``replication.spool``); a RECEIVED ack is sent only after the spool is fsynced.
One forwarder thread per session streams spooled frames to the master target in
sequence order and turns its PERSISTED acks into ``mark_persisted`` (which frees
spool space) and into PERSISTED acks for the source, if it is still connected.
After a restart, every session with unforwarded frames gets its forwarder back
(``resume_all``), so nothing spooled is lost. The relay never holds a frame key.

Frames just spooled are also kept in memory (up to ``FORWARD_CACHE_BYTES`` for all
sessions) and forwarded from there, so a master target that keeps up never makes
the relay read its spool back. Only frames the spool's fsync made durable enter
the cache (the same ones ``Spool.pending`` would yield), byte for byte what was
spooled; the spool stays the durable copy, used after a cut, a restart, or when
the cache was full.

Failures are sorted by the error registry's ``retryable`` flag, decided where the
error was born (``replication.errors``):

* forwarding: a retryable failure (master target unreachable, its disk full) is
  retried with backoff, the frames staying spooled; a permanent refusal (wrong
  key, unknown volume, replayed seq) *parks* the session (``parking.py``): no more
  attempts, frames kept, the source told with the typed error, the reason in
  ``problems()``, a log line and the parked-sessions gauge;
* spooling: the spool's byte limit pushes back (the source's stream is not read
  until forwarding frees space, design W6; a ``spool:`` problem line says so while
  a source waits); a full *device* is answered at once with the retryable
  ``spool.disk_full``, so the source backs off and resends.

A silent master target (a stalled or half-open link, a peer that stops reading)
raises no error by itself: the :class:`CallWatchdog` cancels an ``Apply`` call that
brought no PERSISTED ack within the progress deadline while frames waited, and the
forward fails with the retryable ``relay.stalled`` (design F4, ``liveness.py``).
Every failed attempt is counted in ``replication_forward_failures_total``; the
sessions being retried are the ``replication_forward_retrying_sessions`` gauge.
"""

from __future__ import annotations

import errno
import itertools
import json
import logging
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc

from replication import metrics, wire
from replication.durable import write_atomically
from replication.errors import (
    ERRORS_BY_CODE,
    ForwardStalledError,
    RemoteProtocolError,
    ReplicationError,
    SpoolDiskFullError,
    SpoolError,
    SpoolFullError,
    StaleSessionError,
)
from replication.frame import peek_header
from replication.protocol import AckLevel
from replication.server import error_code_of

from .parking import ParkingLot
from .watchdog import CallWatchdog

log = logging.getLogger("process-server")

SessionKey = tuple[str, bytes]

#: seconds a PERSISTED seq may wait before it is written to the spool's cursor (acks of
#: one session within it share one cursor write); sources get their acks at once
MARK_INTERVAL = 0.2
#: bytes of spooled frames kept in memory for the forwarders (all sessions together)
FORWARD_CACHE_BYTES = 16 << 20
#: frames a forwarder takes per turn (from memory or from the spool)
FORWARD_BATCH = 16


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
    """Sessions known to this process server, kept in ``sessions.json`` (write-then-rename).

    :meth:`put` changes memory only; :meth:`save` makes every change so far durable,
    outside the relay's lock, and concurrent savers share one write (group commit):
    a saver whose change another saver's write already covered returns at once.
    Thread-safe.
    """

    def __init__(self, directory: Path) -> None:
        self._path = directory / "sessions.json"
        self._sessions: dict[SessionKey, SessionMeta] = {}
        self._mem = threading.Lock()
        self._save_lock = threading.Lock()
        self._changes = 0  # puts and forgets so far
        self._saved = 0  # changes covered by the file
        if self._path.exists():
            for rec in json.loads(self._path.read_text()):
                meta = SessionMeta(**rec)
                self._sessions[meta.key] = meta

    def put(self, meta: SessionMeta) -> None:
        """Record ``meta`` in memory (durable after the next :meth:`save`)."""
        with self._mem:
            self._sessions[meta.key] = meta
            self._changes += 1

    def forget(self, key: SessionKey) -> None:
        """Drop ``key`` from memory; the next :meth:`save` writes the book without it."""
        with self._mem:
            if self._sessions.pop(key, None) is not None:
                self._changes += 1

    def save(self) -> None:
        """Make every change made before this call durable; raise a typed spool error."""
        with self._mem:
            wanted = self._changes
        with self._save_lock:
            if self._saved >= wanted:
                return  # written meanwhile by another saver
            with self._mem:
                doc = json.dumps([asdict(m) for m in self._sessions.values()])
                version = self._changes
            try:
                write_atomically(self._path, doc.encode())
            except OSError as err:
                if err.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise SpoolDiskFullError(f"no space to save {self._path}") from err
                raise SpoolError(f"save {self._path}: {err}") from err
            self._saved = version

    def get(self, key: SessionKey) -> SessionMeta | None:
        with self._mem:
            return self._sessions.get(key)

    def all(self) -> list[SessionMeta]:
        with self._mem:
            return list(self._sessions.values())


class Relay:
    """Spool, forwarders and ack fan-out of one process server."""

    def __init__(
        self,
        spool,
        spool_dir: Path,
        target_stub: Callable[[], object],
        *,
        alive: Callable[[], None] | None = None,
    ) -> None:
        self._spool = spool
        self._book = SessionBook(spool_dir)
        self._target_stub = target_stub
        self._alive = alive  # told at every ack: the master target is up (TargetProbe)
        # one mutex; sources waiting for spool space wait on _lock, each forwarder on
        # its own condition (a new frame wakes only its forwarder, not all of them)
        self._mutex = threading.RLock()
        self._lock = threading.Condition(self._mutex)
        self._ready: dict[SessionKey, threading.Condition] = {}
        self._forwarders: dict[SessionKey, threading.Thread] = {}
        self._subscribers: dict[SessionKey, queue.Queue[object]] = {}
        self._stopping = threading.Event()
        self.parking = ParkingLot()
        # durable frames not forwarded yet, in memory: session -> seq -> frame
        self._recent: dict[SessionKey, OrderedDict[int, bytes]] = {}
        self._recent_bytes = 0
        # PERSISTED seqs from the master target; those not yet in the spool's cursor
        self._acked: dict[SessionKey, int] = {}
        # the master target's MAC of the latest PERSISTED ack: (seq, mac), relayed as is
        self._ack_macs: dict[SessionKey, tuple[int, bytes]] = {}
        self._unmarked: dict[SessionKey, int] = {}
        self._space_waiters = 0  # ingests waiting for spool space (the limit)
        self._mark_due = threading.Event()
        self._mark_now = threading.Event()
        self._marker = threading.Thread(target=self._mark_loop, daemon=True, name="mark")
        self._marker.start()
        self._watchdog = CallWatchdog(self._progress_of)
        metrics.SPOOL_LIMIT_BYTES.set(spool.limit_bytes)

    # -- source side -----------------------------------------------------------------

    def open(self, msg: wire.OpenMsg) -> SessionKey:
        meta = SessionMeta(msg.volume, msg.session.hex(), msg.block_size, msg.volume_size)
        self._refuse_if_parked(meta.key)
        with self._lock:
            new = self._book.get(meta.key) is None
            if new:
                self._prune_finished()  # the next save writes the book without them
                self._book.put(meta)
        if new:
            try:
                self._book.save()  # durable before any frame of it is RECEIVED
            except ReplicationError:
                # not durable, so not known: the source's next Open writes it again
                with self._lock:
                    self._book.forget(meta.key)
                raise
        with self._lock:
            self._start_forwarder(meta.key)
        return meta.key

    def _prune_finished(self) -> None:
        """Forget sessions that are closed, all persisted, and no longer forwarded (lock held).

        Every epoch of a tracked disk is a new session: without this the book, and
        the file rewritten at every open, would grow by one entry per epoch forever.
        A forgotten session's spool state stays (``GetSessionState`` still answers).
        """
        for meta in self._book.all():
            forwarder = self._forwarders.get(meta.key)
            if (forwarder is None or not forwarder.is_alive()) and self._finished_locked(meta.key):
                self._book.forget(meta.key)
                self._forwarders.pop(meta.key, None)
                self._ready.pop(meta.key, None)
                if meta.key not in self._unmarked:  # the spool's cursor has it now
                    self._acked.pop(meta.key, None)
                    self._ack_macs.pop(meta.key, None)

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
        new: list[wire.FrameMsg] = []
        for msg in frames:
            header = peek_header(msg.frame)  # validates the header; no key needed
            if header.seq != msg.seq or header.salt != key[1]:
                raise RemoteProtocolError("frame header does not match its session or seq")
            if self._append_waiting_for_space(key, msg):
                new.append(msg)
        with self._lock:
            synced = self._spool.sync()
            self._remember(key, new)  # durable now: the forwarder may send them
            self._ready_for(key).notify()  # its forwarder: new frames to send
        return synced, bool(new)

    def _ready_for(self, key: SessionKey) -> threading.Condition:
        """The condition ``key``'s forwarder waits on for new frames (lock held)."""
        cond = self._ready.get(key)
        if cond is None:
            cond = self._ready[key] = threading.Condition(self._mutex)
        return cond

    def _wake_forwarders(self) -> None:
        for cond in self._ready.values():
            cond.notify_all()

    def _remember(self, key: SessionKey, frames: list[wire.FrameMsg]) -> None:
        """Keep durable frames in memory for the forwarder, while the budget allows."""
        recent = self._recent.setdefault(key, OrderedDict())
        for msg in frames:
            if self._recent_bytes + len(msg.frame) > FORWARD_CACHE_BYTES:
                return  # the forwarder reads the rest from the spool
            recent[msg.seq] = msg.frame
            self._recent_bytes += len(msg.frame)

    def _take_recent(self, key: SessionKey, after: int) -> list[tuple[int, bytes]]:
        """Pop the frames ``after + 1, after + 2, ...`` kept in memory (lock held)."""
        recent = self._recent.get(key)
        taken: list[tuple[int, bytes]] = []
        while recent and len(taken) < FORWARD_BATCH:
            frame = recent.pop(after + 1 + len(taken), None)
            if frame is None:
                break
            self._recent_bytes -= len(frame)
            taken.append((after + len(taken) + 1, frame))
        return taken

    def _forget_recent(self, key: SessionKey, upto: int | None = None) -> None:
        """Drop kept frames of ``key`` at or below ``upto`` (all of them: None; lock held)."""
        recent = self._recent.get(key)
        if recent is None:
            return
        for seq in [s for s in recent if upto is None or s <= upto]:
            self._recent_bytes -= len(recent.pop(seq))
        if not recent:
            del self._recent[key]

    def _append_waiting_for_space(self, key: SessionKey, msg: wire.FrameMsg) -> bool:
        """Spool one frame; return True if it was new (False: a resend already spooled)."""
        waiting = False  # counted in _space_waiters while this ingest waits
        try:
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
                        if not waiting:
                            waiting = True
                            self._space_waiters += 1  # later acks are marked at once
                        self._make_room()
                        self._lock.wait(0.5)
        finally:
            if waiting:
                with self._lock:
                    self._space_waiters -= 1

    def _make_room(self) -> None:
        """Backpressure: the source's stream waits until forwarding frees space (lock held).

        Sync first: forwarders send only durable frames, and the frames of this batch
        already appended may be all that could free it.
        """
        self._spool.sync()
        self._wake_forwarders()  # every session's appends are durable now
        for unmarked in list(self._unmarked.items()):  # frees what it can
            self._mark(*unmarked)
        self._unmarked.clear()

    def _refuse_if_parked(self, key: SessionKey) -> None:
        refusal = self.parking.refusal(key)
        if refusal is not None:
            raise refusal

    def close(self, key: SessionKey, last_seq: int) -> None:
        with self._lock:
            meta = self._book.get(key)
            changed = meta is not None and meta.last_seq != last_seq
            if changed:
                self._book.put(SessionMeta(**{**asdict(meta), "last_seq": last_seq}))
            self._ready_for(key).notify_all()  # its forwarder may be finished now
        if changed:
            self._book.save()  # (a failure leaves memory right; the next save retries)

    def subscribe(self, key: SessionKey, q: queue.Queue[object]) -> queue.Queue[object]:
        """Send this session's PERSISTED acks to ``q`` (starting with the current one)."""
        with self._lock:
            self._subscribers[key] = q
            persisted = self._state_locked(key)[1]
            mac_seq, mac = self._ack_macs.get(key, (0, b""))
        if persisted:
            # the master target's MAC when this process still has it (else none: the
            # source then asks GetSessionState, which the master target answers)
            mac = mac if mac_seq == persisted else b""
            q.put(wire.AckMsg(key[0], key[1], persisted, AckLevel.PERSISTED, mac))
        return q

    def unsubscribe(self, key: SessionKey, q: queue.Queue[object]) -> None:
        with self._lock:
            if self._subscribers.get(key) is q:
                del self._subscribers[key]

    def problems(self) -> list[str]:
        """Lines for ``Status.problems``: parked, retried, the spool's device, its limit."""
        lines = self.parking.problems()
        with self._lock:
            waiters, used = self._space_waiters, self._spool.used_bytes
        if waiters:
            lines.append(
                f"spool: full at its limit ({used} of {self._spool.limit_bytes} bytes, "
                f"--spool-limit): {waiters} source stream(s) wait for forwarding to free space"
            )
        return lines

    def spool_bytes(self) -> int:
        """Bytes the spool holds now (what its limit bounds)."""
        with self._lock:
            return self._spool.used_bytes

    def state(self, key: SessionKey) -> tuple[int, int]:
        """Return (received_seq, persisted_seq) as this process server knows them."""
        with self._lock:
            return self._state_locked(key)

    def _state_locked(self, key: SessionKey) -> tuple[int, int]:
        received, persisted = self._spool.state(*key)
        return received, max(persisted, self._acked.get(key, 0))

    def _progress_of(self, key: SessionKey) -> tuple[int, bool]:
        """(persisted seq, frames waiting to be forwarded) of ``key``, for the watchdog."""
        received, persisted = self.state(key)
        return persisted, received > persisted

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
        self._mark_due.set()
        self._mark_now.set()
        with self._lock:
            self._lock.notify_all()
            self._wake_forwarders()
            threads = list(self._forwarders.values())
        for t in threads:
            t.join(timeout=10)
        self._marker.join(timeout=10)
        self._watchdog.stop()
        self._mark_pending()  # what the last acks persisted

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
            if isinstance(refusal, StaleSessionError) and self._drop_stale(key, refusal):
                return
            if refusal is not None:
                self._park(key, refusal)
                return
            attempt = 1 if progressed else attempt + 1
            reason = _describe(failure)
            self.parking.retrying(key, attempt, reason)
            metrics.FORWARD_FAILURES.labels(_reason_code(failure)).inc()
            metrics.FORWARD_RETRYING.set(self.parking.retrying_count())
            log.warning("event=forward_cut volume=%s attempt=%d reason=%s", key[0], attempt, reason)
            if not isinstance(failure, grpc.RpcError | ReplicationError):
                log.error("event=forward_failed volume=%s", key[0], exc_info=failure)
            self._stopping.wait(min(2.0, 0.1 * attempt))

    def _park(self, key: SessionKey, refusal: ReplicationError) -> None:
        """Stop forwarding ``key`` for good; keep its frames; tell its source and the operator."""
        parked = self.parking.park(key, refusal)
        metrics.PARKED_SESSIONS.set(parked)
        metrics.FORWARD_RETRYING.set(self.parking.retrying_count())
        log.error(
            "event=session_parked volume=%s session=%s code=%s reason=%s",
            key[0],
            key[1].hex(),
            refusal.code,
            refusal.message,
        )
        with self._lock:
            self._forget_recent(key)  # never forwarded again by this process
            sub = self._subscribers.get(key)
            self._lock.notify_all()  # an ingest waiting for spool space gives up
        if sub is not None:
            sub.put(self.parking.refusal(key))  # its Replicate call ends with this error

    def _drop_stale(self, key: SessionKey, refusal: StaleSessionError) -> bool:
        """Drop a session the master target refused as stale; False: it could not be.

        Its frames can never be applied (the order of a volume's sessions only grows)
        and are no one's only copy: a source keeps a block dirty until a PERSISTED ack
        with the master target's MAC covers it (W7, T3), and none ever will for these,
        so the newer session, or one after it, sends those blocks (design F6). Parked,
        they would hold spool space and a problem line for ever.
        """
        refusal = StaleSessionError(
            refusal.message, hint="a newer session of this volume covers its blocks: dropped"
        )
        self.parking.drop(key, refusal)  # from here on no ingest appends to it
        with self._lock:
            try:
                frames = self._release_locked(key)
            except ReplicationError as err:  # the spool's device: park, and say so
                log.warning("event=stale_drop_failed volume=%s error=%s", key[0], err.message)
                return False
            sub = self._forget_locked(key)
        try:
            self._book.save()
        except ReplicationError as err:  # memory is right; the next save writes it
            log.warning("event=sessions_not_saved error=%s", err.message)
        metrics.STALE_SESSIONS_DROPPED.inc()
        metrics.FORWARD_RETRYING.set(self.parking.retrying_count())
        log.warning(
            "event=stale_session_dropped volume=%s session=%s frames=%d reason=%s",
            key[0],
            key[1].hex(),
            frames,
            refusal.message,
        )
        if sub is not None:
            sub.put(self.parking.refusal(key))  # its Replicate call ends with session.stale
        return True

    def _release_locked(self, key: SessionKey) -> int:
        """Free the spool of every frame of ``key`` (lock held); return how many."""
        self._spool.sync()  # what an ingest appended before the drop is counted too
        received = self._spool.state(*key)[0]
        frames = received - self._state_locked(key)[1]
        # the cursor is the spool's only way to release frames: "done with" here; the
        # source never acts on the relay's own persisted seq, only on the MAC'd one (W7)
        self._spool.mark_persisted(key[0], key[1], received)
        metrics.SPOOL_BYTES.set(self._spool.used_bytes)
        return frames

    def _forget_locked(self, key: SessionKey) -> queue.Queue[object] | None:
        """Forget ``key`` in memory and in the book (saved by the caller); lock held.

        Return its source's subscription, if one is connected.
        """
        self._forget_recent(key)
        self._book.forget(key)
        self._forwarders.pop(key, None)  # the calling forwarder, about to end
        self._ready.pop(key, None)
        for table in (self._acked, self._ack_macs, self._unmarked):
            table.pop(key, None)
        self._lock.notify_all()  # an ingest waiting for spool space gives up
        return self._subscribers.get(key)

    def _finished(self, key: SessionKey) -> bool:
        with self._lock:
            return self._finished_locked(key)

    def _finished_locked(self, key: SessionKey) -> bool:
        meta = self._book.get(key)
        persisted = self._state_locked(key)[1]
        return meta is not None and meta.last_seq > 0 and persisted >= meta.last_seq

    def _forward_once(self, key: SessionKey) -> None:
        stub = self._target_stub()
        log.debug("event=forward_start volume=%s persisted_seq=%d", key[0], self.state(key)[1])
        call = stub.Apply(self._apply_requests(key))
        try:
            with self._watchdog.watching(key, call):
                for pb in call:
                    ack = wire.ack_from_pb(pb)
                    self._persisted(key, ack.seq, ack.mac)
                    if self._finished(key):
                        return
        except grpc.RpcError as err:
            waited = self._watchdog.overdue(key)
            if waited is None:
                raise
            raise ForwardStalledError(
                f"volume {key[0]}: no PERSISTED ack from the master target for {waited:.1f} s "
                "while frames waited (progress deadline): call cancelled"
            ) from err
        finally:
            call.cancel()

    def _persisted(self, key: SessionKey, seq: int, mac: bytes = b"") -> None:
        """The master target PERSISTED ``key`` up to ``seq``: tell the source at once.

        The spool's cursor follows within ``MARK_INTERVAL`` (:meth:`_mark_loop`): a
        cursor write costs two fsyncs under the relay's lock, and acks of one
        session coming close together then share one. Until then this process
        answers from memory (``_acked``); after a crash the frames in between are
        forwarded again and the master target recognises them (design W2).
        """
        log.debug("event=persisted volume=%s seq=%d", key[0], seq)
        if self._alive is not None:
            self._alive()  # before the source hears of it: its report is gone by then
        self.parking.recovered(key)
        metrics.FORWARD_RETRYING.set(self.parking.retrying_count())
        with self._lock:
            if seq > self._acked.get(key, 0):
                self._acked[key] = seq
                self._unmarked[key] = seq
            if seq >= self._ack_macs.get(key, (0, b""))[0]:
                self._ack_macs[key] = (seq, mac)
            self._forget_recent(key, seq)
            sub = self._subscribers.get(key)
            space_wanted = self._space_waiters > 0
        if space_wanted:
            self._mark_now.set()  # a source waits for space: no coalescing delay
        self._mark_due.set()
        if sub is not None:
            sub.put(wire.AckMsg(key[0], key[1], seq, AckLevel.PERSISTED, mac))

    def _mark_loop(self) -> None:
        """Write the PERSISTED seqs of the acks received into the spool's cursor."""
        while not self._stopping.is_set():
            self._mark_due.wait()
            self._mark_now.wait(MARK_INTERVAL)  # let close acks of a session coalesce
            self._mark_due.clear()
            self._mark_now.clear()
            self._mark_pending()

    def _mark_pending(self) -> None:
        with self._lock:
            marks, self._unmarked = self._unmarked, {}
        for key, seq in marks.items():
            with self._lock:  # released between marks: ingests and forwarders go on
                self._mark(key, seq)
                if self._book.get(key) is None and key not in self._unmarked:
                    self._acked.pop(key, None)  # pruned meanwhile: the cursor has it
                    self._ack_macs.pop(key, None)
        with self._lock:
            metrics.SPOOL_BYTES.set(self._spool.used_bytes)
            self._lock.notify_all()  # sources waiting for spool space

    def _mark(self, key: SessionKey, seq: int) -> None:
        """``mark_persisted`` (lock held); never past what this spool made durable."""
        seq = min(seq, self._spool.state(*key)[0])
        try:
            self._spool.mark_persisted(key[0], key[1], seq)
        except SpoolDiskFullError as err:
            # The cursor is right in memory and its file is retried at the next sync
            # or ack; only the segments it would free stay until then.
            log.warning("event=cursor_not_saved volume=%s error=%s", key[0], err.message)

    def _apply_requests(self, key: SessionKey) -> Iterator:
        meta = self._book.get(key)
        assert meta is not None
        yield wire.source_message_to_pb(
            wire.OpenMsg(meta.volume, key[1], meta.block_size, meta.volume_size, 1)
        )
        sent = self.state(key)[1]
        while not self._stopping.is_set():
            with self._lock:
                batch = self._take_recent(key, sent)
                if not batch and self._spool.state(*key)[0] > sent:  # durable, not in memory
                    pending = self._spool.pending(key[0], key[1], sent)
                    batch = list(itertools.islice(pending, FORWARD_BATCH))
                if not batch:
                    if self._finished(key):
                        return
                    self._ready_for(key).wait(0.5)
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


def _reason_code(failure: BaseException) -> str:
    """The ``reason`` label of a failed forward: its error code, else the gRPC status.

    Bounded: codes come from the registry, statuses from gRPC's enum.
    """
    if isinstance(failure, grpc.RpcError):
        return error_code_of(failure) or getattr(failure.code(), "name", "UNKNOWN")  # type: ignore[attr-defined]
    if isinstance(failure, ReplicationError):
        return failure.code
    return "internal"


def _details(err: grpc.RpcError) -> str:
    """The peer's message without the ``[code]`` prefix ``abort_with`` puts first."""
    text = str(err.details() or "")  # type: ignore[attr-defined]
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    return text

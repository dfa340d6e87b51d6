"""Process server core: spool what sources send, forward it in order, relay acks.

One :class:`Relay` per process server. Sources' frames go into the durable spool
(``replication.spool``); a RECEIVED ack is sent only after the spool is fsynced.
One forwarder thread per session streams spooled frames to the master target in
sequence order and turns its PERSISTED acks into ``mark_persisted`` (which frees
spool space) and into PERSISTED acks for the source, if it is still connected.
After a restart, every session with unforwarded frames gets its forwarder back
(``resume_all``), so nothing spooled is lost. The relay never holds a frame key.
"""

from __future__ import annotations

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
from replication.errors import RemoteProtocolError
from replication.frame import peek_header
from replication.protocol import AckLevel

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
        self._sessions[meta.key] = meta
        doc = json.dumps([asdict(m) for m in self._sessions.values()])
        write_atomically(self._path, doc.encode())

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

    # -- source side -----------------------------------------------------------------

    def open(self, msg: wire.OpenMsg) -> SessionKey:
        meta = SessionMeta(msg.volume, msg.session.hex(), msg.block_size, msg.volume_size)
        with self._lock:
            known = self._book.get(meta.key)
            if known is None:
                self._book.put(meta)
            self._start_forwarder(meta.key)
        return meta.key

    def accept(self, key: SessionKey, frames: list[wire.FrameMsg]) -> int:
        """Spool frames durably; return the highest contiguous RECEIVED seq."""
        for msg in frames:
            header = peek_header(msg.frame)  # validates the header; no key needed
            if header.seq != msg.seq or header.salt != key[1]:
                raise RemoteProtocolError("frame header does not match its session or seq")
            self._append_waiting_for_space(key, msg)
        with self._lock:
            synced = self._spool.sync()
            self._lock.notify_all()  # forwarders: new frames to send
            received = synced.get(key, self._spool.state(*key)[0])
            metrics.SPOOL_BYTES.set(self._spool.used_bytes)
            metrics.BACKLOG_FRAMES.set(received - self._spool.state(*key)[1])
        metrics.FRAMES.labels("in").inc(len(frames))
        metrics.BYTES.labels("in").inc(sum(len(f.frame) for f in frames))
        log.debug(
            "event=spooled volume=%s frames=%d received_seq=%d", key[0], len(frames), received
        )
        return received

    def _append_waiting_for_space(self, key: SessionKey, msg: wire.FrameMsg) -> None:
        from replication.errors import SpoolFullError

        while True:
            with self._lock:
                try:
                    self._spool.append(key[0], key[1], msg.seq, msg.frame)
                    return
                except SpoolFullError:
                    if self._stopping.is_set():
                        raise
                    # backpressure: stop reading the source until forwarding frees space
                    self._lock.wait(0.5)

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
        attempt = 0
        while not self._stopping.is_set() and not self._finished(key):
            try:
                self._forward_once(key)
                attempt = 0
            except grpc.RpcError as err:
                attempt += 1
                log.warning(
                    "event=forward_cut volume=%s attempt=%d status=%s", key[0], attempt, err.code()
                )
                self._stopping.wait(min(2.0, 0.1 * attempt))

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
        with self._lock:
            self._spool.mark_persisted(key[0], key[1], seq)
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

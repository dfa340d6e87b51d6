"""The source side of a replication session, sans-I/O.

Theory of operation
-------------------
A session starts with a fresh frame key (a new random salt, so a restarted source
never reuses a nonce) and a plan: the blocks whose digests differ between the
source disk and the target's hash map. :meth:`SourceSession.next_frames` reads and
seals those blocks, in offset order, as frames with sequence numbers 1, 2, ...;
each sealed frame is kept (``unacked``) until the master target acknowledges it
PERSISTED, so that after a cut the very same bytes are sent again
(:meth:`resend_after`): re-sealing would reuse a nonce if the disk had changed in
between. The window of kept frames is bounded by ``window_bytes``: a caller stops
asking for frames while :meth:`window_full` is true and resumes on acks.

With ``order`` the session is ordered (its salt carries the number, design S7), and
with ``authenticate_acks`` a PERSISTED ack, or a persisted seq to resume after, is
acted on only with the master target's MAC (:mod:`replication.acks`): one without a
MAC is ignored, one with a wrong MAC raises :class:`ForgedAckError`. Either way no
frame is dropped for it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from .acks import AckAuthenticator
from .blocks import bitmap_count, bitmap_runs, block_runs
from .disks import Disk
from .errors import ForgedAckError
from .frame import FrameEncoder
from .hashmap import HashMap
from .protocol import AckLevel
from .volumes import volume_disk_id

__all__ = ["SourceSession", "SourceStats"]

#: plaintext bytes per frame (a run of adjacent differing blocks)
RUN_BYTES = 1 << 20
#: threads that compress frames (zstd is ~86 % of a source's CPU, perf-limits.md;
#: it releases the GIL, so two threads seal about twice as fast on two cores)
SEAL_WORKERS = 2

T = TypeVar("T")
R = TypeVar("R")

_pool_lock = threading.Lock()
_pools: dict[int, ThreadPoolExecutor] = {}


def _seal_pool(helpers: int) -> ThreadPoolExecutor:
    """One small pool per size for the whole process (sessions come and go per epoch)."""
    with _pool_lock:
        pool = _pools.get(helpers)
        if pool is None:
            pool = _pools[helpers] = ThreadPoolExecutor(helpers, thread_name_prefix="seal")
        return pool


def _sealing_map(workers: int) -> Callable[[Callable[[T], R], list[T]], list[R]]:
    """A ``map`` that runs the first item on the calling thread, the others on helpers.

    The caller would only wait otherwise: one hand-off fewer per group. The helpers
    are shared by every session of the process (a fan-in generator runs a hundred):
    an item no helper has started by then is run by the caller, so a busy pool
    never makes a session slower than sealing alone.
    """

    def run(fn: Callable[[T], R], items: list[T]) -> list[R]:
        pool = _seal_pool(workers - 1)
        rest = [pool.submit(fn, item) for item in items[1:]]
        out = [fn(items[0])]
        for item, future in zip(items[1:], rest, strict=True):
            # not started yet (the helpers serve other sessions too): do it here
            out.append(fn(item) if future.cancel() else future.result())
        return out

    return run


@dataclass
class SourceStats:
    """Counters of a session (for status and metrics)."""

    blocks_total: int = 0
    blocks_to_send: int = 0
    frames_sent: int = 0
    bytes_plain: int = 0
    bytes_framed: int = 0
    blocks_persisted: int = 0
    persisted_seq: int = 0
    received_seq: int = 0
    #: PERSISTED acks (or resume points) ignored: no MAC where one is required
    unauthenticated_acks: int = 0


class SourceSession:
    """Plan and produce the frames that bring a target volume level with a disk."""

    def __init__(
        self,
        disk: Disk,
        volume: str,
        secret: bytes,
        *,
        block_size: int,
        zstd_level: int = 1,
        window_bytes: int = 64 << 20,
        order: int | None = None,
        authenticate_acks: bool = False,
        seal_workers: int = SEAL_WORKERS,
    ) -> None:
        self.disk = disk
        self._seal_workers = max(1, seal_workers)
        self.volume = volume
        self.block_size = block_size
        self._encoder = FrameEncoder(secret, volume_disk_id(volume), level=zstd_level, order=order)
        self._acks = AckAuthenticator(secret, volume, self._encoder.session_salt)
        self._authenticate_acks = authenticate_acks
        self._window = window_bytes
        # seq -> (frame, blocks it carries); kept until PERSISTED, for resends
        self._unacked: OrderedDict[int, tuple[bytes, int]] = OrderedDict()
        self._unacked_bytes = 0
        self._runs: Iterator[tuple[int, int]] = iter(())
        self._held: tuple[int, int] | None = None  # a run taken from _runs, not sealed yet
        self._seq = 0
        self._sealed_all = False
        self._marker: bytes | None = None  # sealed after the last block frame
        #: whether the peers agreed on EPOCH_MARKERS; without it markers are not sent
        self.markers_allowed = True
        self.stats = SourceStats()

    @property
    def session(self) -> bytes:
        """The 16-byte session id (the frames' salt)."""
        return self._encoder.session_salt

    @property
    def last_seq(self) -> int:
        """The highest sequence number sealed so far."""
        return self._seq

    def plan(self, source_map: HashMap, target_map: HashMap) -> np.ndarray:
        """Set the blocks to send: those whose digests differ; return their indexes."""
        differing = source_map.diff(target_map)
        self.plan_blocks(differing, len(source_map))
        return differing

    def plan_blocks(self, indexes: np.ndarray, blocks_total: int) -> None:
        """Set the blocks to send directly (sorted indexes, e.g. from change tracking)."""
        self.stats.blocks_total = blocks_total
        self.stats.blocks_to_send = len(indexes)
        self._runs = block_runs(indexes, max(1, RUN_BYTES // self.block_size))
        self._held = None
        # nothing to send: complete at once (a stream would wait for an ack of seq 0)
        self._sealed_all = len(indexes) == 0 and self._marker is None

    def plan_bitmap(self, bitmap: np.ndarray, blocks_total: int) -> None:
        """Set the blocks to send as a packed bitmap (block i = bit i & 7 of byte i >> 3).

        The bitmap is kept (1 bit per block) and expanded into runs a piece at a time
        while frames are sealed: no index array as large as the plan is ever built.
        """
        self.plan_blocks(np.empty(0, dtype=np.int64), blocks_total)
        self.stats.blocks_to_send = bitmap_count(bitmap)
        self._runs = bitmap_runs(bitmap, max(1, RUN_BYTES // self.block_size))
        self._sealed_all = self.stats.blocks_to_send == 0 and self._marker is None

    def set_marker(self, record: bytes) -> None:
        """Close the plan with a marker frame (an epoch boundary); call before planning."""
        if self.markers_allowed:
            self._marker = record

    def stop_sealing(self) -> None:
        """Seal nothing more: the session completes once the sealed frames are PERSISTED."""
        self._runs = iter(())
        self._held = None
        self._marker = None  # an epoch cut short has no boundary to mark
        self._sealed_all = True

    def window_full(self) -> bool:
        """True while the unacknowledged frames fill the window."""
        return self._unacked_bytes >= self._window

    def done_sealing(self) -> bool:
        """True once every planned block has been sealed into a frame."""
        return self._sealed_all

    def next_frames(self, limit: int = 16) -> list[tuple[int, bytes]]:
        """Seal up to ``limit`` more frames (fewer when the window fills or plan ends).

        Frames are sealed a few at a time (up to one per seal worker): read here,
        in order, then compressed on the workers. A group takes another run only
        while the window would stay open even if every frame so far were as large
        as its plaintext, so the window is still passed by at most one frame.
        """
        out: list[tuple[int, bytes]] = []
        while len(out) < limit and not self.window_full():
            runs = self._take_runs(min(self._seal_workers, limit - len(out)))
            if not runs:  # the plan ended
                if self._marker is not None:
                    out.append(self._seal_marker())
                self._sealed_all = True
                break
            out.extend(self._seal(runs))
        return out

    def _take_runs(self, most: int) -> list[tuple[int, int]]:
        runs: list[tuple[int, int]] = []
        planned = self._unacked_bytes
        while len(runs) < most:
            run = self._held if self._held is not None else next(self._runs, None)
            self._held = None
            if run is None:
                break
            if runs and planned >= self._window:
                self._held = run  # the next group's first run
                break
            runs.append(run)
            planned += run[1] * self.block_size
        return runs

    def _seal(self, runs: list[tuple[int, int]]) -> list[tuple[int, bytes]]:
        reads = []  # every read first: a failed one consumes no seq (no gap)
        for first, count in runs:
            offset = first * self.block_size
            length = min(count * self.block_size, self.disk.virtual_size - offset)
            reads.append((offset, self.disk.read(offset, length)))
        items = [(self._seq + 1 + i, offset, data) for i, (offset, data) in enumerate(reads)]
        self._seq = items[-1][0]
        if len(items) == 1:
            frames = [self._encoder.encode(*items[0])]
        else:
            frames = self._encoder.encode_batch(items, _sealing_map(self._seal_workers))
        out = []
        for (seq, _offset, data), frame, (_first, count) in zip(items, frames, runs, strict=True):
            self._unacked[seq] = (frame, count)
            self._unacked_bytes += len(frame)
            self.stats.frames_sent += 1
            self.stats.bytes_plain += len(data)
            self.stats.bytes_framed += len(frame)
            out.append((seq, frame))
        return out

    def _seal_marker(self) -> tuple[int, bytes]:
        record, self._marker = self._marker, None
        self._seq += 1
        frame = self._encoder.encode_marker(self._seq, record)
        self._unacked[self._seq] = (frame, 0)
        self._unacked_bytes += len(frame)
        self.stats.frames_sent += 1
        self.stats.bytes_framed += len(frame)
        return self._seq, frame

    def on_ack(self, seq: int, level: AckLevel, mac: bytes = b"") -> bool:
        """Record an acknowledgement; PERSISTED releases the frames it covers.

        Returns whether the ack was acted on. With ``authenticate_acks`` a PERSISTED
        ack without a MAC is not (counted in ``stats.unauthenticated_acks``) and one
        with a wrong MAC raises :class:`ForgedAckError`, before anything changes.
        """
        if level == AckLevel.RECEIVED:  # the relay's own word: display and flow only
            self.stats.received_seq = max(self.stats.received_seq, seq)
            return True
        if self._authenticate_acks and not self._acks.check(seq, level, mac):
            self.stats.unauthenticated_acks += 1
            return False
        if seq > self._seq:
            # the master target cannot have persisted what was never sealed
            raise ForgedAckError(
                f"PERSISTED ack of seq {seq} on {self.volume!r}: only {self._seq} were sent"
            )
        self.stats.persisted_seq = max(self.stats.persisted_seq, seq)
        while self._unacked and next(iter(self._unacked)) <= seq:
            _, (frame, blocks) = self._unacked.popitem(last=False)
            self._unacked_bytes -= len(frame)
            self.stats.blocks_persisted += blocks
        return True

    def resend_after(self, persisted_seq: int, mac: bytes = b"") -> list[tuple[int, bytes]]:
        """Return the kept frames after ``persisted_seq``, to send again after a cut.

        An unauthenticated ``persisted_seq`` (see :meth:`on_ack`) releases nothing:
        every kept frame is sent again, and the master target acknowledges those it
        already has without applying them.
        """
        self.on_ack(persisted_seq, AckLevel.PERSISTED, mac)
        return [(seq, frame) for seq, (frame, _blocks) in self._unacked.items()]

    def complete(self) -> bool:
        """True when every planned frame was sealed and is PERSISTED."""
        return self._sealed_all and not self._unacked and self.stats.persisted_seq == self._seq

"""Consistent epochs on a live disk: a cut, and copy-on-write until the epoch is read.

Theory of operation
-------------------
Change tracking (:mod:`replication.tracking`) says *which* blocks changed; this
module makes the content sent for them *consistent*. An epoch is cut atomically
with respect to writes (:meth:`LiveDisk.cut`): the tracker hands over its dirty set
and a :class:`EpochSnapshot` of those blocks is installed. From then on, a write to a
block of the snapshot that the sender has not read yet first copies the block's old
content aside (copy-on-write, into a spill file in the state directory, so memory
stays bounded whatever the backlog). The sender reads every block either from that
copy or, if untouched since the cut, from the disk. So an epoch carries exactly the
disk's content *at the cut* for its blocks, and a target that was equal to the disk
at the previous cut becomes equal to it at this cut: every epoch boundary is a
crash-consistent state (docs/design.md, "Epochs").

Writes are serialised with the sender's reads by one lock per disk: a write waits
at most for one run read (<= 1 MiB) by the sender.

The time of the first write after each cut is kept: it is the oldest write of the
next epoch, from which the RPO is measured once that epoch is PERSISTED.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .disks.base import Disk
from .errors import UsageError

__all__ = ["EpochSnapshot", "LiveDisk"]


class EpochSnapshot:
    """The blocks of one epoch as they were at its cut (read them once each)."""

    def __init__(
        self, disk: Disk, blocks: np.ndarray, block_size: int, spill_dir: str | os.PathLike[str]
    ) -> None:
        self.disk = disk
        self.block_size = block_size
        self.blocks = np.asarray(blocks, dtype=np.int64)
        self.virtual_size = disk.virtual_size
        # blocks whose cut-time content is still only on the disk (not read, not copied)
        self._pending = np.zeros(-(-disk.virtual_size // block_size), dtype=bool)
        self._pending[self.blocks] = True
        self._saved: dict[int, int] = {}  # block -> offset in the spill file
        # closed by close(); unlinked at once, so a crash leaves nothing behind
        self._spill = tempfile.TemporaryFile(dir=spill_dir, prefix="epoch-cow-")  # noqa: SIM115
        self._spill_end = 0
        self.copied_blocks = 0

    def preserve(self, offset: int, length: int) -> None:
        """Copy aside the cut-time content of unread blocks that a write will change."""
        first, end = offset // self.block_size, -(-(offset + length) // self.block_size)
        for b in np.flatnonzero(self._pending[first:end]) + first:
            self._save(int(b))

    def _save(self, block: int) -> None:
        data = self._read_disk(block)
        self._spill.seek(self._spill_end)
        self._spill.write(data)
        self._saved[block] = self._spill_end
        self._spill_end += len(data)
        self._pending[block] = False
        self.copied_blocks += 1

    def _read_disk(self, block: int, count: int = 1) -> bytes:
        offset = block * self.block_size
        return self.disk.read(offset, min(count * self.block_size, self.virtual_size - offset))

    def read(self, offset: int, length: int) -> bytes:
        """Read cut-time content of whole blocks of the epoch (the session's reads)."""
        if offset % self.block_size:
            raise UsageError("epoch reads are block-aligned")
        first, end = offset // self.block_size, -(-(offset + length) // self.block_size)
        if not any(b in self._saved for b in range(first, end)):
            data = self._read_disk(first, end - first)
        else:
            data = b"".join(self._read_block(b) for b in range(first, end))
        self._pending[first:end] = False
        return data[:length]

    def _read_block(self, block: int) -> bytes:
        at = self._saved.get(block)
        if at is None:
            return self._read_disk(block)
        n = min(self.block_size, self.virtual_size - block * self.block_size)
        self._spill.seek(at)
        return self._spill.read(n)

    def close(self) -> None:
        self._spill.close()


class _SnapshotReader:
    """What a SourceSession reads from: the snapshot, under the disk's lock."""

    def __init__(self, live: LiveDisk, snapshot: EpochSnapshot) -> None:
        self._live = live
        self._snapshot = snapshot
        self.virtual_size = snapshot.virtual_size

    def read(self, offset: int, length: int) -> bytes:
        with self._live.lock:
            return self._snapshot.read(offset, length)


class LiveDisk:
    """A tracked disk that writers write to and a sender cuts epochs from.

    ``disk`` is a :class:`~replication.tracking.TrackedDisk` (its writes mark the
    tracker before reaching the disk); ``tracker`` its DirtyTracker.
    """

    def __init__(
        self,
        disk: Disk,
        tracker,
        spill_dir: str | os.PathLike[str],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.disk = disk
        self.tracker = tracker
        self.block_size = tracker.block_size
        self.virtual_size = disk.virtual_size
        self.lock = threading.Lock()
        self._spill_dir = Path(spill_dir)
        self._clock = clock
        self._snapshot: EpochSnapshot | None = None
        self._first_write: float | None = None  # first write since the last cut
        self._written = threading.Condition(self.lock)
        self._wake = False  # a cut is wanted now, writes or not (a tag)
        self._held = False  # new writes wait (a consistency-group cut is being made)
        self._unheld = threading.Condition(self.lock)

    # --- the writer's side (NBD front end, embedded API) ---------------------------

    @property
    def writable(self) -> bool:
        return self.disk.writable

    def read(self, offset: int, length: int) -> bytes:
        with self.lock:
            return self.disk.read(offset, length)

    def read_into(self, offset: int, buf: bytearray | memoryview) -> None:
        with self.lock:
            self.disk.read_into(offset, buf)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        with self.lock:
            self._wait_unheld()
            self._before_write(offset, len(data))
            self.disk.write(offset, data)

    def write_zeroes(self, offset: int, length: int) -> None:
        with self.lock:
            self._wait_unheld()
            self._before_write(offset, length)
            self.disk.write_zeroes(offset, length)

    def _wait_unheld(self) -> None:
        # the writer is not acknowledged while held: that is what makes a group cut
        # consistent across disks (control.proto, "multi-VM consistent cut")
        while self._held:
            self._unheld.wait()

    def hold_writes(self) -> None:
        """Make new writes wait (those in progress finish first: they hold the lock)."""
        with self.lock:
            self._held = True

    def release_writes(self) -> None:
        with self.lock:
            self._held = False
            self._unheld.notify_all()

    @property
    def writes_held(self) -> bool:
        return self._held

    def flush(self) -> None:
        self.disk.flush()

    def _before_write(self, offset: int, length: int) -> None:
        if self._snapshot is not None:
            self._snapshot.preserve(offset, length)
        if self._first_write is None:
            self._first_write = self._clock()
        self._written.notify_all()

    # --- the sender's side ------------------------------------------------------------

    def wait_for_writes(self, timeout: float) -> bool:
        """Wait (bounded) until something was written since the last cut, or a wake."""
        with self.lock:
            if self._first_write is None and not self._wake:
                self._written.wait(timeout)
            woken, self._wake = self._wake, False
            return woken or self._first_write is not None

    def wake(self) -> None:
        """Make the sender cut now (a tag), even without writes."""
        with self.lock:
            self._wake = True
            self._written.notify_all()

    def cut(self):
        """Cut an epoch now: return (epoch, reader, oldest_write_time).

        ``epoch`` is the tracker's Epoch (commit once PERSISTED, abort otherwise);
        ``reader`` reads its blocks as they were at this instant.
        """
        with self.lock:
            self.release()
            epoch = self.tracker.begin_epoch()
            oldest, self._first_write = self._first_write, None
            snapshot = EpochSnapshot(self.disk, epoch.blocks(), self.block_size, self._spill_dir)
            self._snapshot = snapshot
        return epoch, _SnapshotReader(self, snapshot), oldest

    def release(self) -> None:
        """Drop the current snapshot (its epoch was sent or abandoned)."""
        if self._snapshot is not None:
            self._snapshot.close()
            self._snapshot = None

    def close(self) -> None:
        with self.lock:
            self.release()

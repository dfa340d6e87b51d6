"""Where new grains wait before they are appended: reused, aligned memory and O_DIRECT.

A sparse extent collects new grains in memory (allocate.py) and appends them in
one batch. On the VMs this engine runs on, *fresh* memory is what costs: a new
zeroed ``bytearray`` per grain page-faults on every 4 KiB, and a buffered append
then copies every byte into new page-cache pages (docs/benchmarks.md measured
2.7 s of system CPU for 745 MB appended that way, 0.06 s with ``O_DIRECT`` from
one reused buffer). So:

* :class:`GrainSlots` hands out whole-grain slots carved from page-aligned
  ``mmap`` chunks that are returned to a small process-wide pool when the batch
  is on disk, and taken again (warm) by the next batch of any extent;
* :func:`write_direct` appends the slots through a second descriptor opened with
  ``O_DIRECT`` (the grains are fsynced right after anyway, rule D5), falling back
  to the buffered descriptor where the file system or the alignment refuses it.

A slot is reused after its batch is flushed, so a reader must not run beside the
extent's single writer (it never could: a read racing a flush may see neither the
pending grain nor its table entry).
"""

from __future__ import annotations

import errno
import mmap
import os
import threading

from ..base import io_error

__all__ = ["DIRECT_ALIGN", "GrainSlots", "open_direct", "write_direct"]

#: bytes per pool chunk (a grain larger than this gets a chunk of its own size)
CHUNK_BYTES = 4 << 20
#: free chunks the pool keeps for the next batch; more are unmapped
POOL_KEEP_BYTES = 64 << 20
#: offset, length and address alignment O_DIRECT is given here (page size: enough
#: for every logical block size this engine meets)
DIRECT_ALIGN = 4096
#: IOV_MAX on Linux
_IOV_MAX = 1024


class _Pool:
    """Free page-aligned chunks, by size, shared by every extent of the process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: dict[int, list[mmap.mmap]] = {}
        self._bytes = 0

    def take(self, size: int) -> mmap.mmap:
        with self._lock:
            chunks = self._free.get(size)
            if chunks:
                self._bytes -= size
                return chunks.pop()
        return mmap.mmap(-1, size)  # anonymous: page-aligned, zero-filled

    def give(self, chunk: mmap.mmap) -> None:
        size = len(chunk)
        with self._lock:
            if self._bytes + size <= POOL_KEEP_BYTES:
                self._free.setdefault(size, []).append(chunk)
                self._bytes += size
        # else dropped: unmapped once the last view of it is gone

    def free_bytes(self) -> int:
        with self._lock:
            return self._bytes


POOL = _Pool()


class GrainSlots:
    """Whole-grain buffers for one extent's pending grains (contents not cleared)."""

    def __init__(self, grain_bytes: int) -> None:
        self.grain_bytes = grain_bytes
        self.per_chunk = max(CHUNK_BYTES // grain_bytes, 1)
        self._chunks: list[mmap.mmap] = []
        self._used = 0

    def take(self) -> memoryview:
        """A slot of ``grain_bytes``: old bytes of an earlier grain, the caller fills it all."""
        c, s = divmod(self._used, self.per_chunk)
        if c == len(self._chunks):
            self._chunks.append(POOL.take(self.per_chunk * self.grain_bytes))
        self._used += 1
        gb = self.grain_bytes
        return memoryview(self._chunks[c])[s * gb : (s + 1) * gb]

    def release(self) -> None:
        """Every slot is free again (the pending grains are on disk or dropped)."""
        chunks, self._chunks, self._used = self._chunks, [], 0
        for chunk in chunks:
            POOL.give(chunk)


def open_direct(fd: int) -> int:
    """A write-only O_DIRECT descriptor of the file open as ``fd``, or -1 if refused.

    Reopened through ``/proc/self/fd`` so it is the same inode even if the path
    was renamed or replaced meanwhile (never by path).
    """
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return -1
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | flag | os.O_CLOEXEC)
    except OSError:
        return -1  # e.g. tmpfs (EINVAL), no /proc: the buffered descriptor does the work


def write_direct(fd: int, bufs: list[memoryview], offset: int, path: str) -> bool:
    """Write ``bufs`` back to back at ``offset`` through O_DIRECT ``fd``.

    Returns False, having written nothing the caller cannot simply write again,
    when the alignment does not allow O_DIRECT or the kernel refuses it (EINVAL):
    the caller then writes the same bytes at the same offset through its buffered
    descriptor. Other errors are the engine's typed disk errors.
    """
    if offset % DIRECT_ALIGN or any(len(b) % DIRECT_ALIGN for b in bufs):
        return False
    pending = list(bufs)
    pos = offset
    while pending:
        try:
            n = os.pwritev(fd, pending[:_IOV_MAX], pos)
        except OSError as err:
            if err.errno == errno.EINVAL:
                return False
            raise io_error(f"write {path} at {pos}", err) from err
        if n <= 0:
            return False  # no progress: let the buffered path report what is wrong
        pos += n
        while n and pending:
            if n >= len(pending[0]):
                n -= len(pending[0])
                pending.pop(0)
            else:  # a short write: go on from there (EINVAL above if now misaligned)
                pending[0] = pending[0][n:]
                n = 0
    return True

"""Writes to a hosted sparse extent: in place, or by allocating grains crash-safely.

Order of a batch (oracles.md 2.7; VirtualBox's vmdkAllocGrain does the same):

1. grains already allocated are overwritten in place (no metadata change);
2. missing grain tables: zeroed GTs and RGTs are appended, **fsync**, then the GD and
   RGD entries are set, **fsync** (a crash in between leaves only unused sectors);
3. new grains (whole grains: new data, zeros elsewhere) are appended at
   ``round_up(EOF, grain)`` with one ``pwritev`` (``O_DIRECT`` from reused slots
   where the file system allows it, grainbuf.py), **fsync**;
4. their entries are written to the primary GTs, then to the redundant GTs (one
   write per table each), **fsync**.

So after a crash a GTE never points to unwritten data, and every grain reads its old
or its new content. A grain whose final content is all zeros is never allocated,
and zero writes never allocate.
"""

from __future__ import annotations

import numpy as np

from ...faults import crash_point
from ..base import zero_buffer
from .extent import fsync, pwrite_full, pwritev_full
from .grainbuf import GrainSlots, open_direct, write_direct
from .header import SECTOR
from .sparse import DATA, SparseExtent

__all__ = ["PENDING_BYTES", "flush_pending", "write_sparse", "zero_sparse"]

#: a long write is cut into batches of this many bytes: bounds memory and tables touched
_BATCH = 32 << 20
#: new grains wait in memory (as whole grains) until this many bytes, or a flush, so
#: that scattered small writes (a 1% delta sync) still allocate in few large batches
PENDING_BYTES = 32 << 20
_ZERO_CHUNK = 1 << 20


def write_sparse(ext: SparseExtent, offset: int, view: memoryview) -> None:
    """Store ``view`` at extent offset ``offset``."""
    pos = 0
    while pos < len(view):
        n = min(len(view) - pos, _BATCH - (offset + pos) % _BATCH)
        _write_batch(ext, offset + pos, view[pos : pos + n])
        pos += n


def zero_sparse(ext: SparseExtent, offset: int, length: int) -> None:
    """Make a range read as zeros without allocating: zero allocated grains in place."""
    gb, end = ext.grain_bytes, offset + length
    for g in range(offset // gb, -(-end // gb)) if ext.pending else ():
        buf = ext.pending.get(g)
        if buf is not None:  # a new grain not yet on disk
            lo, hi = max(offset, g * gb), min(end, (g + 1) * gb)
            buf[lo - g * gb : hi - g * gb] = zero_buffer(hi - lo)
            ext.maybe_zero.add(g)
    for kind, g, count, sector in ext.runs(offset // gb, -(-end // gb)):
        if kind != DATA:
            continue  # unallocated and zeroed grains already read as zeros (no parent)
        lo, hi = max(offset, g * gb), min(end, (g + count) * gb)
        file_pos = sector * SECTOR + lo - g * gb
        while lo < hi:
            n = min(_ZERO_CHUNK, hi - lo)
            pwrite_full(ext.fd, zero_buffer(n), file_pos, ext.path)
            lo, file_pos = lo + n, file_pos + n


def _is_zero(buf: memoryview | bytearray) -> bool:
    if buf[0] or buf[-1]:  # data usually shows at either end: no scan (len >= 1 here)
        return False
    dtype = np.uint64 if len(buf) % 8 == 0 else np.uint8  # wide words are faster
    return not np.frombuffer(buf, dtype=dtype).any()


def _write_batch(ext: SparseExtent, offset: int, view: memoryview) -> None:
    gb, end = ext.grain_bytes, offset + len(view)
    inplace: list[list[int]] = []  # [file offset, view start, view end], merged when contiguous
    entries = ext.tables.entries(offset // gb, -(-end // gb))  # a batch: a few tables
    kinds = ext._kinds(entries)
    for k, g in enumerate(range(offset // gb, -(-end // gb))):
        lo, hi = max(offset, g * gb), min(end, (g + 1) * gb)
        if kinds[k] == DATA:
            file_pos = int(entries[k]) * SECTOR + lo - g * gb
            last = inplace[-1] if inplace else None
            # merge only when contiguous both in the file and in the caller's buffer
            if last and last[2] == lo - offset and last[0] + (last[2] - last[1]) == file_pos:
                last[2] = hi - offset
            else:
                inplace.append([file_pos, lo - offset, hi - offset])
            continue
        piece = view[lo - offset : hi - offset]
        buf = ext.pending.get(g)
        if buf is None:
            if _is_zero(piece):
                continue  # zeros onto a hole or a zeroed grain: already reads as zeros
            buf = ext.pending[g] = _new_grain(ext, lo - g * gb, hi - g * gb)
        else:  # a grain written again may now be all zeros: checked at the flush
            ext.maybe_zero.add(g)
        buf[lo - g * gb : hi - g * gb] = piece
    for file_pos, a, b in inplace:
        pwrite_full(ext.fd, view[a:b], file_pos, ext.path)
        ext.file_size = max(ext.file_size, file_pos + b - a)
    if len(ext.pending) * gb >= PENDING_BYTES:
        flush_pending(ext)


def _new_grain(ext: SparseExtent, a: int, b: int) -> memoryview:
    """A pending grain whose bytes ``[a, b)`` the caller fills; the rest reads as zeros."""
    if ext.slots is None:
        ext.slots = GrainSlots(ext.grain_bytes)
    buf = ext.slots.take()  # reused memory: clear what the write does not cover
    if a:
        buf[:a] = zero_buffer(a)
    if b < len(buf):
        buf[b:] = zero_buffer(len(buf) - b)
    return buf


def flush_pending(ext: SparseExtent) -> None:
    """Allocate every pending new grain in one batch (all-zero ones are dropped).

    A grain was non-zero when it became pending (its first piece was checked);
    only one written again or zeroed since (``maybe_zero``) is scanned again.
    """
    if not ext.pending:
        return
    maybe = ext.maybe_zero
    new = [
        (g, buf)
        for g, buf in sorted(ext.pending.items())
        if not (g in maybe and _is_zero(buf)) and ext.tables.get(g) <= 1
    ]
    if new:
        _allocate_grains(ext, new)  # on failure the grains stay pending, as before
    ext.pending.clear()
    maybe.clear()
    if ext.slots is not None:
        ext.slots.release()  # on disk now: the next batch reuses the memory


def _allocate_grains(ext: SparseExtent, new: list[tuple[int, memoryview]]) -> None:
    n = ext.header.num_gtes_per_gt
    grains = np.array([g for g, _ in new], dtype=np.int64)
    missing = sorted({int(t) for t in grains // n if ext.gd[t] == 0})
    if missing:
        _allocate_tables(ext, missing)
    start = _round_up(ext.file_size, ext.grain_bytes)
    _append(ext, [buf for _, buf in new], start)
    ext.file_size = start + len(new) * ext.grain_bytes
    fsync(ext.fd, ext.path)
    crash_point("vmdk.grains_written")
    first_sector = start // SECTOR
    ext.tables.set(grains, first_sector + np.arange(len(new), dtype=np.int64) * ext.grain_sectors)
    tables = np.unique(grains // n)
    spans = [(int(t), grains[grains // n == t] % n) for t in tables]
    for directory in (ext.gd, ext.rgd):  # primary tables first, then redundant ones
        if directory is None:
            continue
        for t, idx in spans:
            lo, hi = int(idx.min()), int(idx.max()) + 1
            entries = ext.tables.row(t)[lo:hi].astype("<u4").tobytes()
            pwrite_full(ext.fd, entries, int(directory[t]) * SECTOR + lo * 4, ext.path)
    fsync(ext.fd, ext.path)


def _append(ext: SparseExtent, bufs: list[memoryview], start: int) -> None:
    """Append new grains: O_DIRECT (no page-cache copy) where allowed, else buffered."""
    if ext.direct_fd == -2:  # not tried yet
        ext.direct_fd = open_direct(ext.fd)
    if ext.direct_fd >= 0:
        if write_direct(ext.direct_fd, bufs, start, ext.path):
            return
        ext.close_direct()  # refused (alignment, file system): buffered from now on
    pwritev_full(ext.fd, bufs, start, ext.path)  # the same bytes again, if any were written


def _allocate_tables(ext: SparseExtent, tables: list[int]) -> None:
    """Append zeroed GTs (and RGTs), fsync, then point GD (and RGD) at them, fsync."""
    gt_bytes = ext.header.gt_sectors * SECTOR
    copies = 2 if ext.rgd is not None else 1
    start = _round_up(ext.file_size, SECTOR)
    pwrite_full(ext.fd, bytes(copies * len(tables) * gt_bytes), start, ext.path)
    ext.file_size = start + copies * len(tables) * gt_bytes
    fsync(ext.fd, ext.path)
    first = start // SECTOR
    for i, t in enumerate(tables):
        ext.tables.add(t)  # zeros, as on disk
        ext.gd[t] = first + i * ext.header.gt_sectors
        if ext.rgd is not None:
            ext.rgd[t] = first + (len(tables) + i) * ext.header.gt_sectors
    lo, hi = tables[0], tables[-1] + 1
    h = ext.header
    pwrite_full(
        ext.fd, ext.gd[lo:hi].astype("<u4").tobytes(), h.gd_offset * SECTOR + lo * 4, ext.path
    )
    if ext.rgd is not None:
        rgd = ext.rgd[lo:hi].astype("<u4").tobytes()
        pwrite_full(ext.fd, rgd, h.rgd_offset * SECTOR + lo * 4, ext.path)
    fsync(ext.fd, ext.path)


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step

"""Hosted sparse extents (``KDMV``): header, grain directory and tables, reads.

The grain tables the grain directory points at are loaded at open into a
:class:`~.tables.GrainTables` (one row per allocated table), so memory follows the
tables the file holds, never the capacity its header claims. Every table is
validated against the file size first: a GD entry must point inside the file,
tables must not overlap, grains must lie between ``overHead`` and the end of the file.

GTE meaning: 0 = unallocated (parent or zeros), 1 = zeroed grain (only with
version >= 2 and flags bit 2), otherwise the sector of the grain in this file.
Writes live in :mod:`.allocate`; compressed (streamOptimized) grains in :mod:`.stream`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import numpy as np

from ...errors import CorruptHeaderError, DiskReadOnlyError
from .extent import (
    HoleFiller,
    VmdkExtent,
    fsync,
    pread_bytes,
    pread_full,
    pwrite_full,
    zero_fill,
)
from .grainbuf import GrainSlots
from .header import GD_AT_END, SECTOR, UNCLEAN_SHUTDOWN_OFFSET, SparseHeader
from .tables import GrainTables

log = logging.getLogger(__name__)

__all__ = ["SparseExtent", "read_sparse_header"]

#: read at most this many bytes of contiguous grain tables per pread at open
_TABLE_READ = 8 << 20

# grain kinds, per grain
HOLE, ZERO, DATA = 0, 1, 2


def read_sparse_header(fd: int, file_size: int, where: str) -> SparseHeader:
    """Read and validate the header (and the footer copy for GD_AT_END files)."""
    header = SparseHeader.parse(pread_bytes(fd, SECTOR, 0, where), where)
    header.validate(file_size, where)
    if header.gd_offset == GD_AT_END:
        # streamOptimized written by VMware: the footer (a header copy with the real
        # gdOffset) sits at EOF-1024, followed by the end-of-stream marker.
        if file_size < 3 * SECTOR:
            raise CorruptHeaderError(f"{where}: GD_AT_END but the file has no footer")
        footer = SparseHeader.parse(pread_bytes(fd, SECTOR, file_size - 2 * SECTOR, where), where)
        footer.validate(file_size, f"{where} (footer)", footer=True)
        header = header.with_gd_offset(footer.gd_offset)
    header.validate(file_size, where, footer=True)
    return header


class SparseExtent(VmdkExtent):
    """One hosted sparse extent file."""

    kind = "sparse"

    def __init__(self, path: str, fd: int, header: SparseHeader, length: int, *, writable: bool):
        super().__init__(path, fd, length, writable=writable)
        self.header = header
        self.grain_bytes = header.grain_bytes
        self.grain_sectors = header.grain_size
        self.file_size = os.fstat(fd).st_size
        self.gd = np.zeros(0, dtype=np.uint32)
        self.rgd: np.ndarray | None = None
        self.tables = GrainTables(header.num_gtes_per_gt, header.grains, 0, 0)
        self.session_open = False  # uncleanShutdown set on disk
        self.hole_is_zero = True  # False for a child: holes read the parent
        # new grains written but not yet allocated (see allocate.py): slots of reused
        # memory (grainbuf.py), so only the single writer reads or changes them
        self.pending: dict[int, memoryview] = {}
        self.maybe_zero: set[int] = set()  # pending grains to scan again at the flush
        self.slots: GrainSlots | None = None
        self.direct_fd = -2  # O_DIRECT descriptor for appends; -2 not opened, -1 none
        self._stream = None
        if header.compressed:
            from .stream import CompressedGrains

            self._stream = CompressedGrains(self)
        self._load_tables()

    # -- loading and validation -----------------------------------------------------------

    def _load_tables(self) -> None:
        h = self.header
        self.gd = self._read_directory(h.gd_offset, "grain directory")
        if h.redundant and self.writable:
            self.rgd = self._read_directory(h.rgd_offset, "redundant grain directory")
        self._validate_directory(self.gd, "GD")
        if self.rgd is not None:
            self._validate_directory(self.rgd, "RGD")
            if not np.array_equal(self.gd == 0, self.rgd == 0):
                self._repair_torn_table_allocation()
        allocated = int(np.count_nonzero(self.gd))
        self.tables = GrainTables(h.num_gtes_per_gt, h.grains, h.gd_entries, allocated)
        self._read_tables()
        self._validate_entries()

    @property
    def gte(self) -> np.ndarray:
        """Every entry as one read-only array (tests and diagnostics: 4 B per grain)."""
        dense = self.tables.entries(0, self.header.grains)
        dense.flags.writeable = False
        return dense

    def _repair_torn_table_allocation(self) -> None:
        """Undo a grain-table allocation cut between its GD and RGD entry writes.

        allocate.py appends zeroed tables, fsyncs, then sets the GD and the RGD
        entries and fsyncs again; a crash in between can leave one directory pointing
        at a new table and the other not. Such a table is still all zeros (grains are
        written only after that second fsync), so nothing is lost by dropping the
        one-sided entries: their tables become unused sectors. Anything else where
        the directories disagree is corruption.
        """
        h, where = self.header, self.path
        assert self.rgd is not None
        one_sided = np.flatnonzero((self.gd == 0) != (self.rgd == 0))
        for t in one_sided:
            table = int(self.gd[t] or self.rgd[t])
            raw = pread_bytes(self.fd, h.num_gtes_per_gt * 4, table * SECTOR, self.path)
            if any(raw):
                raise CorruptHeaderError(f"{where}: GD and redundant GD disagree")
        for directory, offset in ((self.gd, h.gd_offset), (self.rgd, h.rgd_offset)):
            for t in one_sided:
                if directory[t]:
                    directory[t] = 0
                    pwrite_full(self.fd, bytes(4), offset * SECTOR + int(t) * 4, self.path)
        fsync(self.fd, self.path)
        log.warning(
            "event=vmdk_repaired path=%s torn_table_allocations=%d", self.path, len(one_sided)
        )

    def _read_directory(self, sector: int, what: str) -> np.ndarray:
        n = self.header.gd_entries
        raw = pread_bytes(self.fd, n * 4, sector * SECTOR, self.path)
        return np.frombuffer(raw, dtype="<u4").astype(np.uint32)

    def _validate_directory(self, gd: np.ndarray, name: str) -> None:
        """GD entries must point at distinct, non-overlapping tables inside the file."""
        h, where = self.header, self.path
        used = np.sort(gd[gd != 0].astype(np.int64))
        if used.size == 0:
            return
        if used[-1] + h.gt_sectors > self.file_size // SECTOR:
            raise CorruptHeaderError(f"{where}: {name} entry points past end of file")
        if used[0] < 1:
            raise CorruptHeaderError(f"{where}: {name} entry points into the header")
        if used.size > 1 and np.any(np.diff(used) < h.gt_sectors):
            raise CorruptHeaderError(f"{where}: {name} entries share or overlap grain tables")

    def _read_tables(self) -> None:
        """Read every allocated grain table, coalescing tables that follow each other."""
        h = self.header
        n, gt_bytes = h.num_gtes_per_gt, h.gt_sectors * SECTOR
        idx = np.flatnonzero(self.gd)
        i = 0
        while i < len(idx):
            j = i + 1  # extend the run while the next table follows on disk and in index
            while (
                j < len(idx)
                and idx[j] == idx[j - 1] + 1
                and int(self.gd[idx[j]]) == int(self.gd[idx[j - 1]]) + h.gt_sectors
                and (j - i + 1) * gt_bytes <= _TABLE_READ
            ):
                j += 1
            first, count = int(idx[i]), j - i
            raw = pread_bytes(self.fd, count * gt_bytes, int(self.gd[first]) * SECTOR, self.path)
            tables = np.frombuffer(raw, dtype="<u4").reshape(count, gt_bytes // 4)[:, :n]
            self.tables.load(first, tables)
            i = j

    def _validate_entries(self) -> None:
        h, where = self.header, self.path
        loaded = self.tables.loaded()
        data = loaded[self._kinds(loaded) == DATA].astype(np.int64)
        if data.size == 0:
            return
        if data.min() < max(h.overhead, 1):
            raise CorruptHeaderError(f"{where}: grain table entry points into metadata")
        if data.max() >= self.file_size // SECTOR:
            raise CorruptHeaderError(f"{where}: grain table entry points past end of file")
        if self.writable:
            self._validate_no_overlap(np.sort(data))

    def _validate_no_overlap(self, grains: np.ndarray) -> None:
        """Before writing in place: no grain may overlap another grain or any metadata.

        (Readers may tolerate such files; a writer would destroy tables or other grains.)
        """
        h, where, gs = self.header, self.path, self.grain_sectors
        meta = [(0, max(1, h.descriptor_offset + h.descriptor_size)), (h.gd_offset, h.gd_sectors)]
        if self.rgd is not None:
            meta.append((h.rgd_offset, h.gd_sectors))
        for directory in (self.gd, self.rgd):
            if directory is not None:
                meta += [(int(t), h.gt_sectors) for t in directory[directory != 0]]
        starts = np.array([m[0] for m in meta], dtype=np.int64)
        ends = starts + np.array([m[1] for m in meta], dtype=np.int64)
        order = np.argsort(starts)
        starts, ends = starts[order], ends[order]
        if np.any(starts[1:] < ends[:-1]):
            raise CorruptHeaderError(f"{where}: grain tables overlap other metadata")
        if grains.size > 1 and np.any(np.diff(grains) < gs):
            raise CorruptHeaderError(f"{where}: two grain table entries share or overlap grains")
        # the last metadata region starting before each grain's end must end before its start
        idx = np.searchsorted(starts, grains + gs, side="left") - 1
        if np.any((idx >= 0) & (ends[np.maximum(idx, 0)] > grains)):
            raise CorruptHeaderError(f"{where}: a grain overlaps the grain directory or tables")

    def _kinds(self, entries: np.ndarray) -> np.ndarray:
        kinds = np.full(entries.shape, DATA, dtype=np.uint8)
        kinds[entries == 0] = HOLE
        if self.header.zeroed_grain:
            kinds[entries == 1] = ZERO
        return kinds

    # -- reads ------------------------------------------------------------------------------

    def runs(self, first: int, last: int) -> Iterator[tuple[int, int, int, int]]:
        """Yield (kind, first grain, grain count, sector) for grains [first, last).

        A DATA run holds grains stored back to back in the file, so it is one read.
        A run may be cut where the tables are walked in pieces (see tables.py).
        """
        for start, end, entries in self.tables.chunks(first, last):
            if entries is None:  # no table: one hole, however large the claim
                yield HOLE, start, end - start, 0
            else:
                yield from self._runs_of(start, entries.astype(np.int64))

    def _runs_of(self, first: int, ent: np.ndarray) -> Iterator[tuple[int, int, int, int]]:
        kinds = self._kinds(ent)
        brk = kinds[1:] != kinds[:-1]
        if self._stream is None:  # consecutive grains contiguous in the file
            brk |= (kinds[1:] == DATA) & (ent[1:] != ent[:-1] + self.grain_sectors)
        else:  # each compressed grain is read on its own
            brk |= kinds[1:] == DATA
        starts = np.concatenate(([0], np.flatnonzero(brk) + 1, [len(ent)]))
        for a, b in zip(starts[:-1].tolist(), starts[1:].tolist(), strict=True):
            yield int(kinds[a]), first + a, b - a, int(ent[a])

    def read_into(self, offset: int, view: memoryview, hole: HoleFiller = zero_fill) -> None:
        gb = self.grain_bytes
        end = offset + len(view)
        for kind, g, count, sector in self.runs(offset // gb, -(-end // gb)):
            lo, hi = max(offset, g * gb), min(end, (g + count) * gb)
            sub = view[lo - offset : hi - offset]
            if kind == HOLE:
                hole(lo, sub)
            elif kind == ZERO:
                zero_fill(lo, sub)
            elif self._stream is not None:
                self._stream.read_grain(g, sector, lo - g * gb, sub)
            else:
                pread_full(self.fd, sub, sector * SECTOR + lo - g * gb, self.path)
        if self.pending:
            self._overlay_pending(offset, view)

    def _overlay_pending(self, offset: int, view: memoryview) -> None:
        """Copy grains that wait in memory for allocation over what was read."""
        gb, end = self.grain_bytes, offset + len(view)
        for g in range(offset // gb, -(-end // gb)):
            buf = self.pending.get(g)
            if buf is not None:
                lo, hi = max(offset, g * gb), min(end, (g + 1) * gb)
                view[lo - offset : hi - offset] = buf[lo - g * gb : hi - g * gb]

    def iter_extents(self) -> Iterator[tuple[int, int, bool]]:
        gb, cur = self.grain_bytes, None  # cur: [first grain, end grain, holds data]
        for first, nonzero in self._nonzero_pieces():
            brk = np.flatnonzero(nonzero[1:] != nonzero[:-1]) + 1
            starts = np.concatenate(([0], brk, [len(nonzero)]))
            for a, b in zip(starts[:-1].tolist(), starts[1:].tolist(), strict=True):
                flag = bool(nonzero[a])
                if cur is not None and cur[2] == flag:
                    cur[1] = first + b
                    continue
                if cur is not None:
                    yield from self._byte_range(cur, gb)
                cur = [first + a, first + b, flag]
        if cur is not None:
            yield from self._byte_range(cur, gb)

    def _byte_range(self, run: list, gb: int) -> Iterator[tuple[int, int, bool]]:
        lo, hi = run[0] * gb, min(run[1] * gb, self.length)
        if hi > lo:
            yield (lo, hi - lo, not run[2])

    def _nonzero_pieces(self) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (first grain, bool per grain: may hold data) in bounded pieces."""
        pending = np.array(sorted(self.pending), dtype=np.int64)
        grains = min(self.header.grains, -(-self.length // self.grain_bytes))
        for first, end, entries in self.tables.chunks(0, grains):
            count = end - first
            if entries is None:  # a child's holes show the parent: data, not zeros
                nonzero = np.full(count, not self.hole_is_zero)
            else:
                kinds = self._kinds(entries)
                nonzero = kinds == DATA
                if not self.hole_is_zero:
                    nonzero |= kinds == HOLE
            lo, hi = np.searchsorted(pending, [first, first + count])
            nonzero[pending[lo:hi] - first] = True
            yield first, nonzero

    def allocated_bytes(self) -> int:
        loaded = self.tables.loaded()
        allocated = int(np.count_nonzero(self._kinds(loaded) == DATA)) + len(self.pending)
        return allocated * self.grain_bytes

    # -- writes (see allocate.py) --------------------------------------------------------------

    def _require_writable(self) -> None:
        if not self.writable or self._stream is not None:
            raise DiskReadOnlyError(f"{self.path}: extent is read-only")

    def write(self, offset: int, view: memoryview) -> None:
        from .allocate import write_sparse

        self._require_writable()
        self.begin_session()
        write_sparse(self, offset, view)

    def write_zeroes(self, offset: int, length: int) -> None:
        from .allocate import zero_sparse

        self._require_writable()
        self.begin_session()
        zero_sparse(self, offset, length)

    def begin_session(self) -> None:
        """Set uncleanShutdown=1 before the first change (VMware semantics)."""
        if not self.session_open:
            self._set_unclean(1)
            self.session_open = True
        self.dirty = True

    def flush(self) -> None:
        """Allocate pending grains, fsync, then clear uncleanShutdown and fsync again."""
        from .allocate import flush_pending

        flush_pending(self)
        if not self.dirty:
            return
        fsync(self.fd, self.path)
        if self.session_open:
            self._set_unclean(0)
            fsync(self.fd, self.path)
            self.session_open = False
        self.dirty = False

    def close_direct(self) -> None:
        if self.direct_fd >= 0:
            os.close(self.direct_fd)
        self.direct_fd = -1

    def close(self) -> None:
        self.close_direct()
        if self.slots is not None:  # grains never flushed are dropped with the handle
            self.pending.clear()
            self.slots.release()
        super().close()

    def _set_unclean(self, value: int) -> None:
        from .extent import pwrite_full

        pwrite_full(self.fd, bytes([value]), UNCLEAN_SHUTDOWN_OFFSET, self.path)

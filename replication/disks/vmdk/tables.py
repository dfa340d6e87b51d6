"""The grain table entries of one hosted sparse extent, held per allocated table.

A header may claim up to ``MAX_GRAINS`` grains (2 TiB of 64 KiB grains: 128 MiB of
entries) in a file of a few KiB. So entries are not kept as one array per grain of
the claim: each grain table that the grain directory points at (and that therefore
lies in the file, see ``SparseExtent._validate_directory``) is one row of ``rows``,
and ``slot`` maps a GD index to its row (-1: no table, every entry 0). Memory is
the size of the tables in the file plus 4 bytes per GD entry (also in the file),
never the claimed capacity.

Entry values are the on-disk ones: 0 unallocated, 1 zeroed grain (when the header
says so), otherwise the grain's sector. Walks over the whole disk go through
:meth:`GrainTables.chunks`, which yields bounded dense pieces and skips stretches
without tables in O(1) per piece.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

__all__ = ["CHUNK_GRAINS", "GrainTables"]

#: grains per dense piece of a walk (1 MiB of entries): bounds the temporaries
CHUNK_GRAINS = 1 << 18


class GrainTables:
    """Grain table entries: ``rows[slot[t]]`` is table ``t``; absent tables read as 0."""

    def __init__(self, per_table: int, grains: int, tables: int, allocated: int) -> None:
        self.per_table = per_table
        self.grains = grains  # entries past this (the last table's tail) are kept at 0
        self.slot = np.full(tables, -1, dtype=np.int32)
        self.rows = np.zeros((max(allocated, 1), per_table), dtype=np.uint32)
        self.count = 0  # rows in use

    # -- tables -------------------------------------------------------------------------

    def has(self, table: int) -> bool:
        return bool(self.slot[table] >= 0)

    def load(self, first: int, tables: np.ndarray) -> None:
        """Store ``tables`` (one row of entries each) as tables ``first, first + 1, ...``."""
        count = len(tables)
        if np.any(self.slot[first : first + count] >= 0):
            raise ValueError(f"grain tables from {first} are already loaded")
        self._reserve(count)
        rows = self.rows[self.count : self.count + count]
        rows[:] = tables
        tail = self.grains - (first + count - 1) * self.per_table
        if tail < self.per_table:
            rows[-1, max(tail, 0) :] = 0  # past the capacity: never a grain, never counted
        self.slot[first : first + count] = np.arange(self.count, self.count + count)
        self.count += count

    def add(self, table: int) -> None:
        """Give ``table`` a row of zeros (a table a writer appended)."""
        self.load(table, np.zeros((1, self.per_table), dtype=np.uint32))

    def _reserve(self, count: int) -> None:
        if self.count + count > len(self.rows):  # a writer appends: grow geometrically
            rows = max(2 * len(self.rows), self.count + count)
            grown = np.zeros((rows, self.per_table), dtype=np.uint32)
            grown[: self.count] = self.rows[: self.count]
            self.rows = grown

    def row(self, table: int) -> np.ndarray:
        """The entries of an allocated table (a view: writes go to the table)."""
        s = int(self.slot[table])
        if s < 0:
            raise KeyError(table)
        return self.rows[s]

    def loaded(self) -> np.ndarray:
        """Every entry of every allocated table (a view; tails past capacity are 0)."""
        return self.rows[: self.count].reshape(-1)

    # -- entries --------------------------------------------------------------------------

    def get(self, grain: int) -> int:
        s = int(self.slot[grain // self.per_table])
        return 0 if s < 0 else int(self.rows[s, grain % self.per_table])

    def set(self, grains: np.ndarray, values: np.ndarray) -> None:
        """Set the entries of ``grains``, whose tables must all have rows."""
        n = self.per_table
        slots = self.slot[grains // n]
        if np.any(slots < 0):
            raise KeyError("a grain of an unallocated table")
        self.rows[slots, grains % n] = values

    def entries(self, first: int, last: int) -> np.ndarray:
        """A dense copy of the entries of grains ``[first, last)``."""
        found = self.entries_or_none(first, last)
        return np.zeros(last - first, dtype=np.uint32) if found is None else found

    def entries_or_none(self, first: int, last: int) -> np.ndarray | None:
        """As :meth:`entries`, or None when no table covers ``[first, last)`` (all 0)."""
        n = self.per_table
        t0, t1 = first // n, -(-last // n)
        if t1 - t0 == 1:  # the common case (a write batch, a read): one slice
            s = int(self.slot[t0])
            return None if s < 0 else self.rows[s, first - t0 * n : last - t0 * n].copy()
        slots = self.slot[t0:t1]
        present = slots >= 0
        if not present.any():
            return None
        dense = np.zeros((t1 - t0, n), dtype=np.uint32)
        dense[present] = self.rows[slots[present]]
        return dense.reshape(-1)[first - t0 * n : last - t0 * n]

    def chunks(self, first: int, last: int) -> Iterator[tuple[int, int, np.ndarray | None]]:
        """Yield ``(start, end, entries)`` covering ``[first, last)`` in bounded pieces.

        ``entries`` is None for a piece without any allocated table (all entries 0),
        so a walk over a claimed capacity costs one step per piece, not per grain.
        """
        step = max(CHUNK_GRAINS // self.per_table, 1) * self.per_table
        pos = first
        while pos < last:
            end = min(last, (pos // step + 1) * step)
            yield pos, end, self.entries_or_none(pos, end)
            pos = end

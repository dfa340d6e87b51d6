"""Dynamic VHDs: BAT-mapped blocks, crash-safe batched allocation (see ``vhd.py``)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np

from ..errors import UnsupportedFormatError
from .base import Extent, io_error, zero_buffer
from .vhd_disk import VhdDisk, _fsync, _is_zero, _pread_full, _preadv_full, _pwrite_full
from .vhd_format import BAT_UNUSED, FOOTER_SIZE, SECTOR, DynamicHeader, Footer, bitmap_size

__all__ = ["DynamicVhdDisk"]

_FULL, _PARTIAL = 1, 2
_COMMIT_AFTER = 512  # pending new blocks before an automatic commit (1 GiB of 2 MiB blocks)
_MAX_RESERVE = 64  # blocks reserved ahead per footer move
_IOV_MAX = 512


class DynamicVhdDisk(VhdDisk):
    """A dynamic VHD: BAT-mapped blocks, each a sector bitmap and data."""

    subformat = "dynamic"

    def __init__(
        self,
        path: str,
        fd: int,
        footer: Footer,
        header: DynamicHeader,
        bat: np.ndarray,
        footer_pos: int,
        *,
        writable: bool,
        parent: VhdDisk | None = None,
    ) -> None:
        super().__init__(path, fd, footer, writable=writable)
        if parent is not None:
            self.parent = parent
            self.subformat = "differencing"
        self.header = header
        self._bat = bat  # native uint32, in-memory view (ahead of the file until committed)
        self._bs = header.block_size
        self._bm = bitmap_size(self._bs)
        self._total = self._bm + self._bs
        self._nblocks = -(-footer.current_size // self._bs)
        self._state = np.zeros(len(bat), dtype=np.int8)  # 0 unknown, _FULL, _PARTIAL
        self._partial: dict[int, np.ndarray] = {}
        self._footer_pos = footer_pos  # where the trailing footer is now
        self._next_free = footer_pos  # where the next new block goes
        self._pending: set[int] = set()  # allocated blocks whose BAT entry is not on disk
        self._ones = b"\xff" * (self._bs // SECTOR // 8) + bytes(self._bm - self._bs // SECTOR // 8)

    # -- reading ------------------------------------------------------------------------

    def _bitmap_state(self, idx: int, sec: int) -> int:
        state = int(self._state[idx])
        if state:
            return state
        nbytes = self._bs // SECTOR // 8
        bmp = _pread_full(self._fd, nbytes, sec * SECTOR, self.path)
        if bmp == self._ones[:nbytes]:
            state = _FULL
        else:
            self._partial[idx] = np.unpackbits(np.frombuffer(bmp, dtype=np.uint8)).astype(bool)
            state = _PARTIAL
        self._state[idx] = state
        return state

    def _read_into(self, offset: int, view: memoryview) -> None:
        bs, bat, end = self._bs, self._bat, offset + len(view)
        run: list[memoryview] = []
        run_start = run_next = -1
        gap = memoryview(bytearray(self._bm))
        pos = offset
        while pos < end:
            idx, within = divmod(pos, bs)
            n = min(bs - within, end - pos)
            dst = view[pos - offset : pos - offset + n]
            sec = int(bat[idx])
            foff = sec * SECTOR + self._bm + within
            if sec != BAT_UNUSED and self._bitmap_state(idx, sec) == _FULL:
                if run and foff == run_next:
                    run.append(dst)
                elif run and within == 0 and foff == run_next + self._bm:
                    run += [gap, dst]
                else:
                    if run:
                        _preadv_full(self._fd, run, run_start, self.path)
                    run, run_start = [dst], foff
                run_next = foff + n
                if len(run) >= _IOV_MAX:
                    _preadv_full(self._fd, run, run_start, self.path)
                    run = []
            elif sec == BAT_UNUSED:
                self._read_below(pos, dst)
            else:
                self._read_partial(idx, foff, within, dst)
            pos += n
        if run:
            _preadv_full(self._fd, run, run_start, self.path)

    def _read_below(self, pos: int, dst: memoryview) -> None:
        """Bytes this disk does not hold: the parent's, or zeros."""
        have = 0
        if self.parent is not None:
            have = max(0, min(len(dst), self.parent.virtual_size - pos))
            if have:
                self.parent.read_into(pos, dst[:have])
        if have < len(dst):
            dst[have:] = zero_buffer(len(dst) - have)

    def _read_partial(self, idx: int, foff: int, within: int, dst: memoryview) -> None:
        _preadv_full(self._fd, [dst], foff, self.path)
        bits = self._partial.get(idx)
        if bits is None:  # normalised by a writer meanwhile
            return
        first, last = within // SECTOR, (within + len(dst) - 1) // SECTOR
        clear = np.concatenate(([False], ~bits[first : last + 1], [False]))
        edges = np.flatnonzero(clear[1:] != clear[:-1]).tolist()
        base = idx * self._bs + within
        for a, b in zip(edges[0::2], edges[1::2], strict=True):  # runs of 0-bit sectors
            lo = max(0, (first + a) * SECTOR - within)
            hi = min(len(dst), (first + b) * SECTOR - within)
            self._read_below(base + lo, dst[lo:hi])

    def _block_runs(self) -> Iterator[tuple[int, int, bool]]:
        alloc = self._bat[: self._nblocks] != BAT_UNUSED
        changes = np.flatnonzero(alloc[1:] != alloc[:-1]) + 1
        starts = [0, *changes.tolist()]
        ends = [*changes.tolist(), self._nblocks]
        for s, e in zip(starts, ends, strict=True):
            yield s * self._bs, min(e * self._bs, self.virtual_size), bool(alloc[s])

    def _extents(self) -> Iterator[Extent]:
        if self.parent is None:
            for lo, hi, alloc in self._block_runs():
                yield Extent(lo, hi - lo, zero=not alloc)
            return
        below = [*self.parent.extents(), Extent(self.parent.virtual_size, 1 << 62, zero=True)]
        out: list[Extent] = []
        i = 0
        for lo, hi, alloc in self._block_runs():
            if alloc:
                out.append(Extent(lo, hi - lo, zero=False))
                continue
            while below[i].end <= lo:
                i += 1
            j = i
            while j < len(below) and below[j].offset < hi:
                a, b = max(lo, below[j].offset), min(hi, below[j].end)
                out.append(Extent(a, b - a, zero=below[j].zero))
                j += 1
        merged: list[Extent] = []
        for e in out:
            if merged and merged[-1].zero == e.zero and merged[-1].end == e.offset:
                merged[-1] = Extent(merged[-1].offset, merged[-1].length + e.length, e.zero)
            else:
                merged.append(e)
        yield from merged

    # -- writing ------------------------------------------------------------------------

    def _write(self, offset: int, view: memoryview) -> None:
        self._write_blocks(offset, view, zeroes=False)

    def _write_zeroes(self, offset: int, length: int) -> None:
        self._write_blocks(offset, None, zeroes=True, length=length)

    def _write_blocks(
        self, offset: int, view: memoryview | None, *, zeroes: bool, length: int = 0
    ) -> None:
        bs = self._bs
        end = offset + (length if view is None else len(view))
        pos = offset
        while pos < end:
            idx, within = divmod(pos, bs)
            n = min(bs - within, end - pos)
            chunk = zero_buffer(n) if view is None else view[pos - offset : pos - offset + n]
            sec = int(self._bat[idx])
            if sec != BAT_UNUSED:
                if not zeroes:  # zeros over a 0-bit sector need no bitmap change
                    self._make_full(idx, sec)
                _pwrite_full(self._fd, chunk, sec * SECTOR + self._bm + within, self.path)
            elif not zeroes and not _is_zero(chunk):
                self._allocate(idx, within, chunk)
            pos += n
        if len(self._pending) >= _COMMIT_AFTER:
            self._commit()

    def _make_full(self, idx: int, sec: int) -> None:
        """Give a block with a partial bitmap an all-ones bitmap without changing its content."""
        if self._bitmap_state(idx, sec) == _FULL:
            return
        bits = self._partial[idx]
        data = sec * SECTOR + self._bm
        for s in np.flatnonzero(~bits).tolist():
            _pwrite_full(self._fd, zero_buffer(SECTOR), data + s * SECTOR, self.path)
        _fsync(self._fd, self.path)  # zeros under the 0 bits first, then the bits
        _pwrite_full(self._fd, self._ones, sec * SECTOR, self.path)
        _fsync(self._fd, self.path)
        self._state[idx] = _FULL
        self._partial.pop(idx, None)

    def _allocate(self, idx: int, within: int, chunk: memoryview) -> None:
        start = self._next_free
        if (start + self._total) // SECTOR > BAT_UNUSED - 1:
            raise UnsupportedFormatError(f"{self.path}: VHD file would grow past 2 TiB")
        if start + self._total > self._footer_pos:
            self._reserve(start + self._total)
        # The new block's region lies past the file's original end, so it reads as
        # zeros except a stale footer at its first sector, which the bitmap overwrites.
        _pwrite_full(self._fd, self._ones, start, self.path)
        _pwrite_full(self._fd, chunk, start + self._bm + within, self.path)
        self._next_free = start + self._total
        self._state[idx] = _FULL
        self._pending.add(idx)
        self._bat[idx] = start // SECTOR  # readers see the block only once it is written

    def _reserve(self, need_end: int) -> None:
        """Move the trailing footer past ``need_end`` (and some blocks more), durably."""
        free = int(np.count_nonzero(self._bat[: self._nblocks] == BAT_UNUSED)) - 1
        ahead = max(0, min(len(self._pending), _MAX_RESERVE, free))
        pos = need_end + ahead * self._total
        _pwrite_full(self._fd, self.footer.raw, pos, self.path)
        _fsync(self._fd, self.path)
        self._footer_pos = pos

    def _commit(self) -> None:
        """Make pending blocks durable, then reference them in the BAT on disk."""
        _fsync(self._fd, self.path)
        if self._pending:
            idxs = sorted(self._pending)
            # write each touched BAT sector once, from the in-memory table
            spans: list[list[int]] = []
            for i in idxs:
                lo = i - i % (SECTOR // 4)
                if spans and lo <= spans[-1][1]:
                    spans[-1][1] = lo + SECTOR // 4
                else:
                    spans.append([lo, lo + SECTOR // 4])
            for lo, hi in spans:
                hi = min(hi, len(self._bat))
                data = self._bat[lo:hi].astype(">u4").tobytes()
                _pwrite_full(self._fd, data, self.header.table_offset + 4 * lo, self.path)
        shrink = self._footer_pos > self._next_free
        if shrink:
            _pwrite_full(self._fd, self.footer.raw, self._next_free, self.path)
        if self._pending or shrink:
            _fsync(self._fd, self.path)
        self._pending.clear()
        if shrink:
            try:
                os.ftruncate(self._fd, self._next_free + FOOTER_SIZE)
            except OSError as err:
                raise io_error(f"truncate {self.path}", err) from err
            self._footer_pos = self._next_free
            _fsync(self._fd, self.path)

    def _flush(self) -> None:
        self._commit()

    def _close(self) -> None:
        try:
            if self.writable and (self._pending or self._footer_pos > self._next_free):
                self._commit()
        finally:
            super()._close()

    # -- info ---------------------------------------------------------------------------

    def _allocated_blocks(self) -> int:
        return int(np.count_nonzero(self._bat[: self._nblocks] != BAT_UNUSED))

    def _allocated_bytes(self) -> int:
        return self._allocated_blocks() * self._bs

    def _grain_size(self) -> int | None:
        return self._bs

    def _extra(self) -> dict[str, object]:
        return {
            "block_size": self._bs,
            "allocated_blocks": self._allocated_blocks(),
            "total_blocks": self._nblocks,
            "bat_offset": self.header.table_offset,
            "file_bytes": os.fstat(self._fd).st_blocks * 512,
        }

"""Flat extents (FLAT, VMFS: raw bytes in a file at a sector offset) and ZERO extents.

Flat extents have no metadata: virtual offset ``x`` of the extent lives at file
offset ``start + x``. Holes in the (usually sparse) flat file are reported as zero
ranges with ``SEEK_DATA``/``SEEK_HOLE`` so hashing a thin-on-disk thick image does
not read gigabytes of holes.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

from ...errors import DiskReadOnlyError
from ..base import zero_buffer
from .extent import HoleFiller, VmdkExtent, pread_full, pwrite_full, zero_fill

__all__ = ["FlatExtent", "ZeroExtent"]

_ZERO_CHUNK = 1 << 20


class FlatExtent(VmdkExtent):
    """A FLAT or VMFS extent: ``length`` bytes at ``start`` bytes into ``path``."""

    kind = "flat"

    def __init__(self, path: str, fd: int, start: int, length: int, *, writable: bool) -> None:
        super().__init__(path, fd, length, writable=writable)
        self.start = start

    def read_into(self, offset: int, view: memoryview, hole: HoleFiller = zero_fill) -> None:
        pread_full(self.fd, view, self.start + offset, self.path)

    def write(self, offset: int, view: memoryview) -> None:
        self.dirty = True
        pwrite_full(self.fd, view, self.start + offset, self.path)

    def write_zeroes(self, offset: int, length: int) -> None:
        # A flat extent has no "unallocated" state: zeros must be stored.
        self.dirty = True
        pos = offset
        while pos < offset + length:
            n = min(_ZERO_CHUNK, offset + length - pos)
            pwrite_full(self.fd, zero_buffer(n), self.start + pos, self.path)
            pos += n

    def iter_extents(self) -> Iterator[tuple[int, int, bool]]:
        pos = 0
        while pos < self.length:
            try:
                data = os.lseek(self.fd, self.start + pos, os.SEEK_DATA) - self.start
            except OSError as err:
                # ENXIO: only a hole follows; anything else: no SEEK_DATA support
                yield (pos, self.length - pos, err.errno == errno.ENXIO)
                return
            data = min(data, self.length)
            if data > pos:
                yield (pos, data - pos, True)
            if data >= self.length:
                return
            hole = min(os.lseek(self.fd, self.start + data, os.SEEK_HOLE) - self.start, self.length)
            yield (data, hole - data, False)
            pos = hole


class ZeroExtent(VmdkExtent):
    """A ZERO extent: reads as zeros, has no file, cannot be written."""

    kind = "zero"

    def __init__(self, length: int) -> None:
        super().__init__("<zero>", -1, length, writable=False)

    def read_into(self, offset: int, view: memoryview, hole: HoleFiller = zero_fill) -> None:
        zero_fill(offset, view)

    def write(self, offset: int, view: memoryview) -> None:
        raise DiskReadOnlyError("a ZERO extent reads as zeros and stores nothing")

    def write_zeroes(self, offset: int, length: int) -> None:
        raise DiskReadOnlyError("a ZERO extent reads as zeros and stores nothing")

    def iter_extents(self) -> Iterator[tuple[int, int, bool]]:
        yield (0, self.length, True)

    def allocated_bytes(self) -> int:
        return 0

"""What every VMDK extent offers the disk, plus positional I/O helpers.

An extent maps ``[0, length)`` of its own byte range onto one file. Offsets passed
to extent methods are relative to the extent's start in the virtual disk.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import numpy as np

from ..base import io_error

__all__ = ["HoleFiller", "VmdkExtent", "pread_full", "pwrite_full", "pwritev_full"]

#: called with (extent-relative offset, view) to fill a range the extent does not hold
HoleFiller = Callable[[int, memoryview], None]

#: IOV_MAX on Linux; pwritev takes at most this many buffers per call
IOV_MAX = 1024


def zero_fill(_offset: int, view: memoryview) -> None:
    """The default hole filler: unallocated space reads as zeros."""
    np.frombuffer(view, dtype=np.uint8)[:] = 0


class VmdkExtent:
    """Base class of sparse, flat and zero extents."""

    kind = "?"

    def __init__(self, path: str, fd: int, length: int, *, writable: bool) -> None:
        self.path = path
        self.fd = fd
        self.length = length  # virtual bytes covered
        self.writable = writable
        self.dirty = False  # written since the last flush

    def read_into(self, offset: int, view: memoryview, hole: HoleFiller = zero_fill) -> None:
        raise NotImplementedError

    def write(self, offset: int, view: memoryview) -> None:
        raise NotImplementedError

    def write_zeroes(self, offset: int, length: int) -> None:
        raise NotImplementedError

    def iter_extents(self) -> Iterator[tuple[int, int, bool]]:
        """Yield (offset, length, zero) covering [0, length); zero=True promises zeros."""
        yield (0, self.length, False)

    def allocated_bytes(self) -> int:
        return self.length

    def flush(self) -> None:
        """fsync the file if it was written since the last flush."""
        if self.dirty and self.fd >= 0:
            try:
                os.fsync(self.fd)
            except OSError as err:
                raise io_error(f"flush {self.path}", err) from err
            self.dirty = False

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def pread_full(fd: int, view: memoryview, offset: int, path: str) -> None:
    """Fill ``view`` from ``offset``; bytes past the end of the file read as zeros."""
    done = 0
    while done < len(view):
        try:
            n = os.preadv(fd, [view[done:]], offset + done)
        except OSError as err:
            raise io_error(f"read {path} at {offset + done}", err) from err
        if n == 0:
            view[done:] = bytes(len(view) - done)
            return
        done += n


def pread_bytes(fd: int, length: int, offset: int, path: str) -> bytes:
    """Return ``length`` bytes at ``offset`` (zeros past the end of the file)."""
    buf = bytearray(length)
    pread_full(fd, memoryview(buf), offset, path)
    return bytes(buf)


def pwrite_full(fd: int, data: bytes | bytearray | memoryview, offset: int, path: str) -> None:
    """Write all of ``data`` at ``offset``."""
    pwritev_full(fd, [memoryview(data)], offset, path)


def pwritev_full(fd: int, bufs: list[memoryview], offset: int, path: str) -> None:
    """Write the concatenation of ``bufs`` at ``offset`` with as few syscalls as possible."""
    pending = [memoryview(b).cast("B") for b in bufs if len(b)]
    pos = offset
    while pending:
        batch = pending[:IOV_MAX]
        try:
            n = os.pwritev(fd, batch, pos)
        except OSError as err:
            raise io_error(f"write {path} at {pos}", err) from err
        pos += n
        # drop fully written buffers, trim a partly written one
        while n and pending:
            if n >= len(pending[0]):
                n -= len(pending[0])
                pending.pop(0)
            else:
                pending[0] = pending[0][n:]
                n = 0


def fsync(fd: int, path: str) -> None:
    """fsync ``fd``, wrapping OSError in the engine's typed error."""
    try:
        os.fsync(fd)
    except OSError as err:
        raise io_error(f"flush {path}", err) from err

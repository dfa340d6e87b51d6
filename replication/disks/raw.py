"""Raw disks: a plain image file or a block device, byte for byte.

Virtual offset == file offset. Holes in a sparse file are reported as zero extents
(``SEEK_DATA``/``SEEK_HOLE``), so a 64 GiB mostly-empty image is hashed without
reading its holes. A block device's size comes from seeking to its end.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator

from ..errors import DiskIOError, UnsupportedFormatError
from .base import Disk, DiskInfo, Extent, file_generation, io_error, stamp_files

__all__ = ["RawDisk", "create_raw", "open_raw"]


class RawDisk(Disk):
    """A raw image file or block device."""

    format_name = "raw"

    def __init__(self, path: str, fd: int, size: int, *, writable: bool, device: bool) -> None:
        super().__init__(path, size, writable=writable)
        self._fd = fd
        self._device = device

    def _read_into(self, offset: int, view: memoryview) -> None:
        done = 0
        while done < len(view):
            try:
                n = os.preadv(self._fd, [view[done:]], offset + done)
            except OSError as err:
                raise io_error(f"read {self.path} at {offset + done}", err) from err
            if n == 0:  # the file shrank under us: the rest reads as zeros
                view[done:] = bytes(len(view) - done)
                return
            done += n

    def _write(self, offset: int, view: memoryview) -> None:
        done = 0
        while done < len(view):
            try:
                done += os.pwritev(self._fd, [view[done:]], offset + done)
            except OSError as err:
                raise io_error(f"write {self.path} at {offset + done}", err) from err

    def _flush(self) -> None:
        try:
            os.fsync(self._fd)
        except OSError as err:
            raise io_error(f"flush {self.path}", err) from err

    def _extents(self) -> Iterator[Extent]:
        if self._device:
            yield Extent(0, self.virtual_size, zero=False)
            return
        yield from _seek_extents(self._fd, self.virtual_size)

    def generation(self) -> str | None:
        if self._device:
            return None
        return file_generation([self.path], extra="raw")

    def mark_generation(self) -> str | None:
        if self._device:
            return None
        stamp_files([self.path])
        return self.generation()

    def info(self) -> DiskInfo:
        allocated = self.virtual_size
        if not self._device:
            allocated = os.fstat(self._fd).st_blocks * 512
        return DiskInfo(
            path=self.path,
            format="raw",
            subformat="block-device" if self._device else "file",
            virtual_size=self.virtual_size,
            allocated_bytes=allocated,
            files=(self.path,),
        )

    def _close(self) -> None:
        os.close(self._fd)


def _seek_extents(fd: int, size: int) -> Iterator[Extent]:
    """Yield data/hole extents of a regular file using SEEK_DATA/SEEK_HOLE."""
    pos = 0
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as err:
            if err.errno == errno.ENXIO:  # no data after pos: the rest is a hole
                yield Extent(pos, size - pos, zero=True)
                return
            yield Extent(pos, size - pos, zero=False)  # file system without SEEK_DATA
            return
        data = min(data, size)
        if data > pos:
            yield Extent(pos, data - pos, zero=True)
        if data >= size:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), size)
        yield Extent(data, hole - data, zero=False)
        pos = hole


def open_raw(path: str, *, writable: bool = False) -> RawDisk:
    """Open a raw image file or block device."""
    flags = os.O_RDWR if writable else os.O_RDONLY
    try:
        fd = os.open(path, flags | os.O_CLOEXEC)
    except OSError as err:
        raise io_error(f"open {path}", err) from err
    try:
        st = os.fstat(fd)
        if stat.S_ISBLK(st.st_mode):
            size, device = os.lseek(fd, 0, os.SEEK_END), True
        elif stat.S_ISREG(st.st_mode):
            size, device = st.st_size, False
        else:
            raise UnsupportedFormatError(f"{path}: not a regular file or block device")
    except BaseException:
        os.close(fd)
        raise
    return RawDisk(path, fd, size, writable=writable, device=device)


def create_raw(path: str, size: int) -> RawDisk:
    """Create a sparse raw image of ``size`` bytes (refuses to overwrite) and open it."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        os.ftruncate(fd, size)
    except OSError as err:
        raise DiskIOError(f"create {path}: {err.strerror}") from err
    return RawDisk(path, fd, size, writable=True, device=False)

"""VHD disk classes: the common part and fixed disks (dynamic ones are in vhd_dynamic)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np

from ..errors import CorruptHeaderError
from .base import Disk, DiskInfo, Extent, file_generation, io_error, stamp_files, zero_buffer
from .raw import _seek_extents
from .vhd_format import DISK_TYPES, MAX_CHS, Footer

__all__ = ["FixedVhdDisk", "VhdDisk"]

MiB = 1 << 20
AZURE_MIN, AZURE_MAX = 20 * MiB, 32 << 40


def _pread_full(fd: int, length: int, offset: int, path: str) -> bytes:
    try:
        data = os.pread(fd, length, offset)
    except OSError as err:
        raise io_error(f"read {path} at {offset}", err) from err
    if len(data) != length:
        raise CorruptHeaderError(f"{path}: file ends inside VHD metadata at {offset}")
    return data


def _preadv_full(fd: int, bufs: list[memoryview], offset: int, path: str) -> None:
    """Fill every buffer from ``offset`` on; bytes past EOF read as zeros."""
    while bufs:
        try:
            n = os.preadv(fd, bufs, offset)
        except OSError as err:
            raise io_error(f"read {path} at {offset}", err) from err
        if n == 0:
            for b in bufs:
                b[:] = zero_buffer(len(b))
            return
        offset += n
        while bufs and n >= len(bufs[0]):
            n -= len(bufs[0])
            bufs.pop(0)
        if bufs and n:
            bufs[0] = bufs[0][n:]


def _pwrite_full(fd: int, data: bytes | memoryview, offset: int, path: str) -> None:
    view = memoryview(data)
    done = 0
    while done < len(view):
        try:
            done += os.pwrite(fd, view[done:], offset + done)
        except OSError as err:
            raise io_error(f"write {path} at {offset + done}", err) from err


def _fsync(fd: int, path: str) -> None:
    try:
        os.fsync(fd)
    except OSError as err:
        raise io_error(f"flush {path}", err) from err


def _is_zero(view: memoryview) -> bool:
    return not np.frombuffer(view, dtype=np.uint8).any()


class VhdDisk(Disk):
    """Common part of fixed and dynamic VHDs."""

    format_name = "vhd"
    subformat = "?"

    def __init__(self, path: str, fd: int, footer: Footer, *, writable: bool) -> None:
        super().__init__(path, footer.current_size, writable=writable)
        self._fd = fd
        self.footer = footer
        self._notes: list[str] = []
        self.parent: VhdDisk | None = None  # differencing disks only (read-only)

    def files(self) -> tuple[str, ...]:
        """This disk's file, then its parents' files."""
        return (self.path, *(self.parent.files() if self.parent else ()))

    def generation(self) -> str | None:
        return file_generation(list(self.files()), extra=f"vhd:{self.footer.unique_id}")

    def mark_generation(self) -> str | None:
        stamp_files([self.path])
        return self.generation()

    def _allocated_bytes(self) -> int:
        return os.fstat(self._fd).st_blocks * 512

    def _extra(self) -> dict[str, object]:
        return {}

    def info(self) -> DiskInfo:
        self._check_open()
        size, ft = self.virtual_size, self.footer
        mib_ok = size % MiB == 0
        notes = list(self._notes)
        if mib_ok:
            notes.append("azure: size is a whole number of MiB")
        else:
            notes.append(
                f"azure: size {size} is not a whole number of MiB; Azure will reject this disk"
            )
        if not AZURE_MIN <= size <= AZURE_MAX:
            notes.append("azure: size is outside Azure's range of 20 MiB to 32 TiB")
        if ft.saved_state:
            notes.append("the VHD is marked as being in a saved state (a suspended VM's disk)")
        if self.subformat != "fixed":
            notes.append("azure: only fixed VHDs can be uploaded to Azure")
        if ft.chs_size != size and ft.geometry != MAX_CHS:
            notes.append(
                f"CHS geometry {ft.geometry} gives {ft.chs_size} bytes; using the current size "
                f"{size} (old qemu reads creator {ft.creator_text!r} disks by CHS)"
            )
        extra: dict[str, object] = {
            "azure_size_ok": mib_ok,
            "azure_upload_ok": mib_ok and self.subformat == "fixed" and size >= AZURE_MIN,
            "creator_app": ft.creator_text,
            "creator_version": f"{ft.creator_version >> 16}.{ft.creator_version & 0xFFFF}",
            "creator_host_os": ft.creator_os.decode("latin-1"),
            "disk_type": ft.disk_type,
            "disk_type_name": DISK_TYPES[ft.disk_type],
            "geometry": list(ft.geometry),
            "original_size": ft.original_size,
            "file_size": os.fstat(self._fd).st_size,
            **self._extra(),
        }
        return DiskInfo(
            path=self.path,
            format="vhd",
            subformat=self.subformat,
            virtual_size=size,
            allocated_bytes=self._allocated_bytes(),
            grain_size=self._grain_size(),
            uuid=str(ft.unique_id),
            parent=self.parent.path if self.parent else None,
            files=self.files(),
            writable=self.parent is None,
            notes=tuple(notes),
            extra=extra,
        )

    def _grain_size(self) -> int | None:
        return None

    def _close(self) -> None:
        try:
            if self.parent is not None:
                self.parent.close()
        finally:
            os.close(self._fd)


class FixedVhdDisk(VhdDisk):
    """A fixed VHD: raw bytes, then the footer."""

    subformat = "fixed"

    def _read_into(self, offset: int, view: memoryview) -> None:
        _preadv_full(self._fd, [view], offset, self.path)

    def _write(self, offset: int, view: memoryview) -> None:
        _pwrite_full(self._fd, view, offset, self.path)

    def _flush(self) -> None:
        _fsync(self._fd, self.path)

    def _extents(self) -> Iterator[Extent]:
        yield from _seek_extents(self._fd, self.virtual_size)

"""Disk formats behind one :class:`Disk` interface, and format detection.

``open_disk(path)`` recognises the format from the bytes themselves:

* ``KDMV`` at offset 0, or a text descriptor (``# Disk DescriptorFile`` / ``createType=``)
  in the first sector: VMDK;
* ``COWD`` at offset 0: a VMFS snapshot delta extent (VMDK, refused as a target);
* ``conectix`` in the last 512 bytes (fixed) or at offset 0 (dynamic): VHD;
* anything else: raw.

``format=`` forces a format (``"raw"`` lets a raw disk that happens to end in a VHD
footer be treated as raw).

A path of the form ``pageblob+https://ACCOUNT.blob.core.windows.net/CONTAINER/BLOB``
(or ``pageblob:CONTAINER/BLOB`` with ``AZURE_STORAGE_CONNECTION_STRING``) is an Azure
page blob, opened as a fixed VHD or raw (see :mod:`replication.disks.pageblob`).
"""

from __future__ import annotations

import os

from ..errors import UnsupportedFormatError
from .base import Disk, DiskInfo, Extent
from .raw import RawDisk, create_raw, open_raw

__all__ = [
    "FORMATS",
    "Disk",
    "DiskInfo",
    "Extent",
    "RawDisk",
    "create_disk",
    "detect_format",
    "open_disk",
]

FORMATS = ("raw", "vhd", "vmdk")


def detect_format(path: str) -> str:
    """Return "raw", "vhd" or "vmdk" from the content of ``path``."""
    try:
        with open(path, "rb") as f:
            head = f.read(1024)
            size = f.seek(0, os.SEEK_END)
            tail = b""
            if size >= 512:
                f.seek(size - 512)
                tail = f.read(512)
    except OSError:
        return "raw"  # let open_raw report the real error
    if head[:4] in (b"KDMV", b"COWD") or _looks_like_descriptor(head):
        return "vmdk"
    if tail[:8] == b"conectix" or head[:8] == b"conectix":
        return "vhd"
    return "raw"


def _looks_like_descriptor(head: bytes) -> bool:
    """A VMDK text descriptor: its usual first line, or printable text naming createType."""
    text = head.split(b"\0", 1)[0]
    if text.startswith(b"# Disk DescriptorFile"):
        return True
    printable = all(32 <= c < 127 or c in (9, 10, 13) for c in text)
    return printable and b"createType" in text


def open_disk(path: str, *, writable: bool = False, format: str | None = None) -> Disk:
    """Open ``path`` as a :class:`Disk`, detecting its format unless ``format`` is given."""
    if isinstance(path, str) and path.startswith(("pageblob+", "pageblob:")):
        from .pageblob import open_pageblob

        return open_pageblob(path, writable=writable, format=format)
    fmt = format or detect_format(path)
    if fmt == "raw":
        return open_raw(path, writable=writable)
    if fmt == "vhd":
        from .vhd import open_vhd

        return open_vhd(path, writable=writable)
    if fmt == "vmdk":
        from .vmdk import open_vmdk

        return open_vmdk(path, writable=writable)
    raise UnsupportedFormatError(f"unknown disk format {fmt!r}; expected one of {FORMATS}")


def create_disk(path: str, size: int, *, format: str = "raw", subformat: str | None = None) -> Disk:
    """Create a new, empty disk image and open it for writing."""
    if isinstance(path, str) and path.startswith(("pageblob+", "pageblob:")):
        from .pageblob import create_pageblob

        return create_pageblob(path, size, format=format, subformat=subformat)
    if format == "raw":
        return create_raw(path, size)
    if format == "vhd":
        from .vhd import create_vhd

        return create_vhd(path, size, subformat=subformat or "fixed")
    if format == "vmdk":
        from .vmdk import create_vmdk

        return create_vmdk(path, size, subformat=subformat or "monolithicSparse")
    raise UnsupportedFormatError(f"unknown disk format {format!r}; expected one of {FORMATS}")

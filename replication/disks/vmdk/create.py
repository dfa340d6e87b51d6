"""``create_vmdk``: new, empty VMDK disks in qemu's layout.

Sparse extent layout (sectors), as ``qemu-img create`` makes it: 0 header, 1-20
embedded descriptor (empty in the pieces of a twoGbMaxExtentSparse disk), then the
redundant GD, the redundant GTs, the GD, the GTs (all preallocated, so qemu can
also write the file: oracles.md 3.9), padded to a grain boundary (= overHead).
GT space is left as a file hole: it reads as zeros without being written.
"""

from __future__ import annotations

import os
import secrets
import uuid

import numpy as np

from ...durable import fsync_dir
from ...errors import DiskIOError, UnsupportedFormatError, UsageError
from ..base import Disk
from .extent import pwrite_full
from .header import (
    FLAG_NEWLINE_TEST,
    FLAG_REDUNDANT_GD,
    MAGIC_KDMV,
    MAX_GRAINS,
    SECTOR,
    SparseHeader,
)

__all__ = ["SUBFORMATS", "create_vmdk"]

SUBFORMATS = (
    "monolithicSparse",
    "twoGbMaxExtentSparse",
    "monolithicFlat",
    "twoGbMaxExtentFlat",
    "vmfs",
)
GRAIN_SECTORS = 128
GTES_PER_GT = 512
DESC_SECTORS = 20
#: qemu splits twoGbMaxExtent* disks at exactly 2 GiB
SPLIT_SECTORS = (2 << 30) // SECTOR


def create_vmdk(path: str, size: int, *, subformat: str = "monolithicSparse") -> Disk:
    """Create an empty VMDK of ``size`` bytes (refuses to overwrite) and open it writable."""
    from .open import open_vmdk

    if subformat not in SUBFORMATS:
        raise UnsupportedFormatError(
            f"cannot create VMDK subformat {subformat!r}; choose one of {', '.join(SUBFORMATS)}"
        )
    if size <= 0 or size % SECTOR:
        raise UsageError(f"VMDK size must be a positive multiple of 512 bytes, not {size}")
    sectors = size // SECTOR
    if subformat == "monolithicSparse" and -(-sectors // GRAIN_SECTORS) > MAX_GRAINS:
        raise UnsupportedFormatError("monolithicSparse is limited to 2 TiB; use vmfs")
    stem = path[:-5] if path.lower().endswith(".vmdk") else path
    base = os.path.basename(stem)
    created: list[str] = []
    try:
        if subformat == "monolithicSparse":
            _create_sparse(
                path,
                sectors,
                created,
                _descriptor(
                    subformat, [f'RW {sectors} SPARSE "{os.path.basename(path)}"'], sectors
                ),
            )
        else:
            lines = _make_extents(stem, base, subformat, sectors, created)
            _create_file(path, created, _descriptor(subformat, lines, sectors))
        _fsync_dir(path)
    except BaseException:
        for p in created:
            os.unlink(p)
        raise
    return open_vmdk(path, writable=True)


def _make_extents(
    stem: str, base: str, subformat: str, sectors: int, created: list[str]
) -> list[str]:
    """Create the extent files of a descriptor-based disk; return the extent lines."""
    if subformat in ("monolithicFlat", "vmfs"):
        _create_file(f"{stem}-flat.vmdk", created, size=sectors * SECTOR)
        if subformat == "vmfs":
            return [f'RW {sectors} VMFS "{base}-flat.vmdk"']
        return [f'RW {sectors} FLAT "{base}-flat.vmdk" 0']
    lines = []
    for i, pos in enumerate(range(0, sectors, SPLIT_SECTORS), 1):
        n = min(SPLIT_SECTORS, sectors - pos)
        if subformat == "twoGbMaxExtentFlat":
            _create_file(f"{stem}-f{i:03d}.vmdk", created, size=n * SECTOR)
            lines.append(f'RW {n} FLAT "{base}-f{i:03d}.vmdk" 0')
        else:
            _create_sparse(f"{stem}-s{i:03d}.vmdk", n, created, b"")
            lines.append(f'RW {n} SPARSE "{base}-s{i:03d}.vmdk"')
    return lines


def _descriptor(subformat: str, extent_lines: list[str], sectors: int) -> bytes:
    heads, adapter = (255, "lsilogic") if subformat == "vmfs" else (16, "ide")
    cid = f"{secrets.randbits(32) & 0xFFFFFFFE:08x}"  # never ffffffff
    u = uuid.uuid4().hex
    pretty = " ".join(u[i : i + 2] for i in range(0, 16, 2)) + "-"
    pretty += " ".join(u[i : i + 2] for i in range(16, 32, 2))
    text = "\n".join([
        "# Disk DescriptorFile",
        "version=1",
        f"CID={cid}",
        "parentCID=ffffffff",
        f'createType="{subformat}"',
        "",
        "# Extent description",
        *extent_lines,
        "",
        "# The Disk Data Base",
        "#DDB",
        "",
        'ddb.virtualHWVersion = "4"',
        f'ddb.geometry.cylinders = "{sectors // (heads * 63)}"',
        f'ddb.geometry.heads = "{heads}"',
        'ddb.geometry.sectors = "63"',
        f'ddb.adapterType = "{adapter}"',
        f'ddb.uuid = "{pretty}"',
        'ddb.toolsVersion = "2147483647"',
        "",
    ])  # fmt: skip
    return text.encode()


def sparse_layout(capacity: int) -> SparseHeader:
    """The header of an empty sparse extent of ``capacity`` sectors (qemu's layout)."""
    grains = -(-capacity // GRAIN_SECTORS)
    gd_entries = -(-grains // GTES_PER_GT)
    gd_sectors = -(-gd_entries * 4 // SECTOR)
    gt_sectors = GTES_PER_GT * 4 // SECTOR
    rgd = 1 + DESC_SECTORS
    gd = rgd + gd_sectors + gd_entries * gt_sectors
    end = gd + gd_sectors + gd_entries * gt_sectors
    overhead = -(-end // GRAIN_SECTORS) * GRAIN_SECTORS
    return SparseHeader(
        MAGIC_KDMV, 1, FLAG_NEWLINE_TEST | FLAG_REDUNDANT_GD, capacity, GRAIN_SECTORS,
        1, DESC_SECTORS, GTES_PER_GT, rgd, gd, overhead, 0, b"\n \r\n", 0,
    )  # fmt: skip


def _create_sparse(path: str, capacity: int, created: list[str], desc: bytes) -> None:
    h = sparse_layout(capacity)
    if len(desc) > DESC_SECTORS * SECTOR:
        raise UsageError(f"{path}: descriptor too long")
    fd = _open_new(path, created)
    try:
        os.ftruncate(fd, h.overhead * SECTOR)
        pwrite_full(fd, h.pack(), 0, path)
        pwrite_full(fd, desc, SECTOR, path)
        n, gt = h.gd_entries, h.gt_sectors
        for directory, tables in ((h.rgd_offset, h.rgd_offset + h.gd_sectors),
                                  (h.gd_offset, h.gd_offset + h.gd_sectors)):  # fmt: skip
            entries = (tables + np.arange(n, dtype=np.int64) * gt).astype("<u4").tobytes()
            pwrite_full(fd, entries, directory * SECTOR, path)
        os.fsync(fd)
    except OSError as err:
        raise DiskIOError(f"create {path}: {err.strerror}") from err
    finally:
        os.close(fd)


def _create_file(path: str, created: list[str], data: bytes = b"", size: int = 0) -> None:
    fd = _open_new(path, created)
    try:
        if size:
            os.ftruncate(fd, size)
        if data:
            pwrite_full(fd, data, 0, path)
        os.fsync(fd)
    except OSError as err:
        raise DiskIOError(f"create {path}: {err.strerror}") from err
    finally:
        os.close(fd)


def _open_new(path: str, created: list[str]) -> int:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except OSError as err:
        raise DiskIOError(f"create {path}: {err.strerror}") from err
    created.append(path)
    return fd


def _fsync_dir(path: str) -> None:
    """fsync the directory that holds ``path``."""
    fsync_dir(os.path.dirname(os.path.abspath(path)))

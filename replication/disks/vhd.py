"""VHD disks (Azure page blobs, Hyper-V): fixed and dynamic, read and write.

* **Fixed**: the raw bytes followed by a 512-byte footer; virtual offset == file
  offset, and the footer is never touched by writes. Azure only accepts fixed
  VHDs whose size is a whole number of MiB (file = N MiB + 512).
* **Dynamic**: footer copy, ``cxsparse`` header, block allocation table (BAT),
  then blocks of ``sector bitmap + block_size`` bytes, then the footer. Unallocated
  blocks read as zeros and sectors whose bitmap bit is 0 read as zeros.

Allocation is crash-safe and batched. New blocks go where the trailing footer was.
Before a block may overwrite the trailing footer, the file is extended by writing
the (unchanged) footer further out and syncing it, so the file always ends in a
valid footer. Block data is written, then on :meth:`flush` (or when many blocks
are pending) the data is synced, the BAT entries written and synced, and any
unused reserved space is cut off again. A crash can only leave an unreferenced
block, never a BAT entry that points at garbage. All-zero writes never allocate.

Sizes always follow the footer's *current size* (new disks carry the maximum CHS
geometry, which makes qemu trust the current size too).
"""

from __future__ import annotations

import os
import stat
import uuid

import numpy as np

from ..errors import (
    CorruptHeaderError,
    DiskIOError,
    UnsupportedFormatError,
    UsageError,
)
from .base import io_error
from .vhd_chain import check_link, find_children, parent_candidates, snapshot_error
from .vhd_disk import FixedVhdDisk, VhdDisk, _fsync, _pread_full, _pwrite_full
from .vhd_dynamic import DynamicVhdDisk
from .vhd_format import (
    BAT_UNUSED,
    DEFAULT_BLOCK_SIZE,
    FOOTER_SIZE,
    HEADER_SIZE,
    MAX_VIRTUAL_SIZE,
    SECTOR,
    DynamicHeader,
    Footer,
    bitmap_size,
    build_dynamic_header,
    build_footer,
    parse_dynamic_header,
    parse_footer,
)

__all__ = ["DynamicVhdDisk", "FixedVhdDisk", "VhdDisk", "create_vhd", "open_vhd"]

MAX_CHAIN = 32  # parents, at most
MAX_DYNAMIC_SIZE = 2040 << 30  # the VHD specification's limit (BAT offsets are 32-bit sectors)


# -- opening ------------------------------------------------------------------------------


def open_vhd(path: str, *, writable: bool = False) -> VhdDisk:
    """Open a fixed, dynamic or (read-only) differencing VHD with its parents."""
    return _open_path(path, writable, ())


def _open_path(path: str, writable: bool, chain: tuple[tuple[int, int], ...]) -> VhdDisk:
    flags = os.O_RDWR if writable else os.O_RDONLY
    try:
        fd = os.open(path, flags | os.O_CLOEXEC)
    except OSError as err:
        raise io_error(f"open {path}", err) from err
    try:
        disk = _open_fd(path, fd, writable, chain)
    except BaseException:
        os.close(fd)
        raise
    if writable:
        children = find_children(path, disk.footer.unique_id)
        if children:
            disk.close()
            names = ", ".join(os.path.basename(c) for c in children[:3])
            raise snapshot_error(path, f"differencing disk(s) {names} use it as their parent")
    return disk


def _open_fd(
    path: str, fd: int, writable: bool, chain: tuple[tuple[int, int], ...] = ()
) -> VhdDisk:
    st = os.fstat(fd)
    if len(chain) >= MAX_CHAIN:
        raise CorruptHeaderError(f"{path}: VHD parent chain is deeper than {MAX_CHAIN} disks")
    if (st.st_dev, st.st_ino) in chain:
        raise CorruptHeaderError(f"{path}: VHD parent chain loops back to this file")
    chain = (*chain, (st.st_dev, st.st_ino))
    if not stat.S_ISREG(st.st_mode):
        raise UnsupportedFormatError(f"{path}: a VHD must be a regular file")
    size = st.st_size
    if size < FOOTER_SIZE:
        raise CorruptHeaderError(f"{path}: file of {size} bytes is too small for a VHD footer")
    notes: list[str] = []
    tail_ok = True
    try:
        footer = parse_footer(_pread_full(fd, FOOTER_SIZE, size - FOOTER_SIZE, path), path)
    except CorruptHeaderError:
        # A dynamic disk keeps a copy at offset 0; an interrupted append can lose the tail.
        try:
            footer = parse_footer(_pread_full(fd, FOOTER_SIZE, 0, path), f"{path} (offset 0)")
        except (CorruptHeaderError, UnsupportedFormatError):
            footer = None
        if footer is None or footer.disk_type == 2:
            raise
        tail_ok = False
        notes.append("the trailing VHD footer is damaged; used the copy at offset 0")
    if footer.disk_type == 2:
        if size != footer.current_size + FOOTER_SIZE:
            raise CorruptHeaderError(
                f"{path}: fixed VHD of current size {footer.current_size} must be a file of "
                f"{footer.current_size + FOOTER_SIZE} bytes, not {size}"
            )
        disk: VhdDisk = FixedVhdDisk(path, fd, footer, writable=writable)
    else:
        disk = _open_dynamic(path, fd, footer, size, tail_ok, writable, chain)
    disk._notes = notes + disk._notes
    return disk


def _open_dynamic(
    path: str,
    fd: int,
    footer: Footer,
    size: int,
    tail_ok: bool,
    writable: bool,
    chain: tuple[tuple[int, int], ...],
) -> DynamicVhdDisk:
    hdr_off = footer.data_offset
    if hdr_off < FOOTER_SIZE or hdr_off % SECTOR or hdr_off + HEADER_SIZE > size - FOOTER_SIZE:
        raise CorruptHeaderError(f"{path}: VHD dynamic header offset {hdr_off} is outside the file")
    header = parse_dynamic_header(_pread_full(fd, HEADER_SIZE, hdr_off, path), path, footer, size)
    if footer.disk_type == 4 and writable:
        parent = header.parent_name or str(header.parent_uuid)
        raise snapshot_error(path, f"it is a differencing disk on top of {parent!r}")
    if footer.current_size > MAX_DYNAMIC_SIZE:
        raise CorruptHeaderError(f"{path}: dynamic VHD size {footer.current_size} exceeds 2040 GiB")
    n = header.max_table_entries
    raw = _pread_full(fd, 4 * n, header.table_offset, path)
    bat = np.frombuffer(raw, dtype=">u4").astype(np.uint32)
    footer_pos = size - FOOTER_SIZE if tail_ok else size
    meta_end = max(
        hdr_off + HEADER_SIZE,
        header.table_offset + 4 * n,
        *(off + length for _c, off, length in header.locators),
    )
    _check_bat(path, bat, meta_end, footer_pos, bitmap_size(header.block_size) + header.block_size)
    footer_pos = -(-footer_pos // SECTOR) * SECTOR
    if writable and not tail_ok:  # repair: end the file with a footer again
        _pwrite_full(fd, footer.raw, footer_pos, path)
        _fsync(fd, path)
    notes = []
    if tail_ok and _pread_full(fd, FOOTER_SIZE, 0, path) != footer.raw:
        notes.append("the footer copy at offset 0 differs from the trailing footer")
    parent = _open_parent(path, fd, header, chain) if footer.disk_type == 4 else None
    disk = DynamicVhdDisk(
        path, fd, footer, header, bat, footer_pos, writable=writable, parent=parent
    )
    disk._notes = notes
    return disk


def _open_parent(
    path: str, fd: int, header: DynamicHeader, chain: tuple[tuple[int, int], ...]
) -> VhdDisk:
    candidates = parent_candidates(path, fd, header)
    found = next((c for c in candidates if os.path.isfile(c)), None)
    if found is None:
        name = header.parent_name or str(header.parent_uuid)
        raise CorruptHeaderError(
            f"{path}: the parent {name!r} of this differencing VHD was not found "
            f"(looked for {', '.join(repr(c) for c in candidates) or 'no usable locator'})"
        )
    parent = _open_path(found, False, chain)
    try:
        check_link(path, found, parent.footer.unique_id, header.parent_uuid)
    except BaseException:
        parent.close()
        raise
    return parent


def _check_bat(path: str, bat: np.ndarray, meta_end: int, limit: int, total: int) -> None:
    """Every allocated block must lie between the metadata and the footer, without overlap."""
    used = np.flatnonzero(bat != BAT_UNUSED)
    if not len(used):
        return
    starts = bat[used].astype(np.int64) * SECTOR
    order = np.argsort(starts, kind="stable")
    starts, used = starts[order], used[order]
    if starts[0] < meta_end:
        raise CorruptHeaderError(
            f"{path}: VHD BAT entry {int(used[0])} points into the metadata (offset "
            f"{int(starts[0])})"
        )
    if starts[-1] + total > limit:
        raise CorruptHeaderError(
            f"{path}: VHD BAT entry {int(used[-1])} points past the end of the data "
            f"(block at {int(starts[-1])}, data ends at {limit})"
        )
    overlap = np.flatnonzero(np.diff(starts) < total)
    if len(overlap):
        i = int(overlap[0]) + 1
        raise CorruptHeaderError(f"{path}: VHD BAT entry {int(used[i])} overlaps another block")


# -- creating -----------------------------------------------------------------------------


def create_vhd(path: str, size: int, *, subformat: str = "fixed") -> VhdDisk:
    """Create an empty fixed or dynamic VHD of ``size`` bytes (refuses to overwrite); open it."""
    if subformat not in ("fixed", "dynamic"):
        raise UnsupportedFormatError(f"VHD subformat {subformat!r}; expected fixed or dynamic")
    limit = MAX_DYNAMIC_SIZE if subformat == "dynamic" else MAX_VIRTUAL_SIZE
    if size <= 0 or size % SECTOR or size > limit:
        raise UsageError(
            f"VHD size {size} must be a positive multiple of 512 bytes up to {limit} bytes"
        )
    uid = uuid.uuid4()
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except OSError as err:
        raise DiskIOError(f"create {path}: {err.strerror}") from err
    try:
        if subformat == "fixed":
            os.ftruncate(fd, size)
            _pwrite_full(fd, build_footer(size, 2, 0xFFFFFFFFFFFFFFFF, uid), size, path)
        else:
            entries = -(-size // DEFAULT_BLOCK_SIZE)
            table_off = FOOTER_SIZE + HEADER_SIZE
            table_len = -(-4 * entries // SECTOR) * SECTOR
            footer = build_footer(size, 3, FOOTER_SIZE, uid)
            header = build_dynamic_header(table_off, entries, DEFAULT_BLOCK_SIZE)
            body = footer + header + b"\xff" * table_len + footer
            _pwrite_full(fd, body, 0, path)
        _fsync(fd, path)
    except OSError as err:
        os.close(fd)
        raise io_error(f"create {path}", err) from err
    except BaseException:
        os.close(fd)
        raise
    try:
        return _open_fd(path, fd, True)
    except BaseException:
        os.close(fd)
        raise

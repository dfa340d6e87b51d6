"""``open_vmdk``: find the descriptor, check the chain rules, open every extent.

``path`` may be a text descriptor, a monolithic sparse file (descriptor embedded) or
a bare sparse extent (read-only). Everything that decides whether the disk may be
written (snapshot chain, streamOptimized, read-only or ZERO extents) is checked
*before* a file is opened for writing, so a refused disk is left byte-for-byte
unchanged. Extent files must lie in the descriptor's directory (:func:`_confined`).
"""

from __future__ import annotations

import os
from contextlib import ExitStack, suppress

from ...errors import (
    CorruptHeaderError,
    DiskReadOnlyError,
    UnsupportedFormatError,
)
from ..base import io_error
from .chain import (
    SNAPSHOT_EXTENT_TYPES,
    read_embedded_descriptor,
    refuse_snapshots,
    resolve_hint,
    snapshot_error,
)
from .descriptor import (
    MAX_DESCRIPTOR_BYTES,
    Descriptor,
    ExtentLine,
    looks_like_descriptor,
    parse_descriptor,
)
from .disk import VmdkDisk
from .extent import VmdkExtent
from .flat import FlatExtent, ZeroExtent
from .header import MAGIC_COWD, MAGIC_KDMV, SECTOR
from .sparse import SparseExtent, read_sparse_header

__all__ = ["open_vmdk"]

#: createTypes whose extents are devices or raw partitions: never ours to open
_DEVICE_TYPES = frozenset(
    {"fullDevice", "partitionedDevice", "vmfsRDM", "vmfsRDMP", "vmfsRaw", "vmfsRawDeviceMap"}
)
_MAX_CHAIN = 32


def open_vmdk(path: str, *, writable: bool = False) -> VmdkDisk:
    """Open a VMDK disk (descriptor or monolithic sparse file)."""
    return _open(path, writable=writable, seen=set())


def _open(path: str, *, writable: bool, seen: set[tuple[int, int]]) -> VmdkDisk:
    desc, embedded = _read_descriptor(path, writable)
    if desc is not None:
        _check_descriptor(path, desc, writable)
    paths = _extent_paths(path, desc, embedded)
    if writable and desc is not None:
        refuse_snapshots(path, desc, [path, *paths])
    with ExitStack() as stack:  # closes the extent files if anything fails
        extents = _open_extents(path, desc, paths, writable, stack)
        sparse = extents[0] if isinstance(extents[0], SparseExtent) else None
        disk = VmdkDisk(
            path,
            path,
            desc,
            extents,
            writable=writable,
            embedded_in=sparse if embedded and desc is not None else None,
        )
        if writable and any(isinstance(e, SparseExtent) and e.header.version == 3 for e in extents):
            raise DiskReadOnlyError(
                f"{path}: version 3 sparse extents (streamOptimized or change-tracked) are "
                "read-only"
            )
        stack.pop_all()  # the disk owns the files now
    if desc is not None and desc.has_parent():
        try:
            _attach_parent(disk, desc, seen)
        except BaseException:
            disk.close()
            raise
    return disk


def _read_descriptor(path: str, writable: bool) -> tuple[Descriptor | None, bool]:
    """Return (descriptor, embedded?); None for a bare sparse extent."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        raise io_error(f"open {path}", err) from err
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, 4096, 0)
        if head[:4] == MAGIC_KDMV:
            read_sparse_header(fd, size, path)  # validate before trusting descriptor fields
            desc = read_embedded_descriptor(head, fd, path)
            if desc is not None and (len(desc.extents) != 1 or desc.extents[0].type != "SPARSE"):
                raise CorruptHeaderError(f"{path}: embedded descriptor must name one SPARSE extent")
            return desc, True
        if head[:4] == MAGIC_COWD:
            if writable:
                raise snapshot_error(path, "it is a vmfsSparse (COWD) snapshot delta extent")
            raise UnsupportedFormatError(
                f"{path}: a vmfsSparse (COWD) snapshot extent; open its descriptor instead"
            )
        if not looks_like_descriptor(head):
            raise CorruptHeaderError(f"{path}: neither a VMDK descriptor nor a sparse extent")
        if size > MAX_DESCRIPTOR_BYTES:
            raise CorruptHeaderError(f"{path}: descriptor file of {size} B is too large")
        return parse_descriptor(os.pread(fd, size, 0), path), False
    except OSError as err:
        raise io_error(f"read {path}", err) from err
    finally:
        os.close(fd)


def _check_descriptor(path: str, desc: Descriptor, writable: bool) -> None:
    """Flat list of checks on what the descriptor asks for."""
    if desc.create_type in _DEVICE_TYPES:
        raise UnsupportedFormatError(f"{path}: createType {desc.create_type} (raw device)")
    for ext in desc.extents:
        if ext.type in SNAPSHOT_EXTENT_TYPES and not writable:
            raise UnsupportedFormatError(
                f"{path}: {ext.type} snapshot extents cannot be read; consolidate the snapshots"
            )
        if ext.type not in {"SPARSE", "FLAT", "VMFS", "ZERO"} | SNAPSHOT_EXTENT_TYPES:
            raise UnsupportedFormatError(f"{path}: extent type {ext.type} is not supported")
        if ext.access == "NOACCESS":
            raise UnsupportedFormatError(f"{path}: extent with NOACCESS")
        if writable and ext.access != "RW":
            raise DiskReadOnlyError(f"{path}: the descriptor marks an extent {ext.access}")
        if writable and ext.type == "ZERO":
            raise DiskReadOnlyError(f"{path}: a ZERO extent reads as zeros and stores nothing")
    if writable and desc.create_type == "streamOptimized":
        raise DiskReadOnlyError(
            f"{path}: streamOptimized VMDKs are read-only (compressed, append-only grains); "
            "convert it to monolithicSparse or vmfs to use it as a target"
        )


def _extent_paths(path: str, desc: Descriptor | None, embedded: bool) -> list[str]:
    """Resolve extent file names; a monolithic sparse file is its own single extent."""
    if embedded or desc is None:
        return [path]
    base = os.path.dirname(os.path.abspath(path))
    paths = []
    for ext in desc.extents:
        if ext.type == "ZERO":
            paths.append("")
            continue
        assert ext.filename is not None  # checked by the descriptor parser
        paths.append(_confined(path, base, ext.filename))
    return paths


def _confined(path: str, base: str, name: str) -> str:
    """Resolve an extent file name inside the descriptor's directory, or refuse it.

    VMware and qemu write extent names relative to the descriptor, in its directory.
    A descriptor is input we do not trust (a disk may come from anywhere): an absolute
    name, a ``..`` component or a symlink leading out would make a reader (or, for a
    target, a writer) use a file that is no part of the disk.
    """
    parts = name.replace("\\", "/").split("/")
    if os.path.isabs(name) or ".." in parts:
        raise CorruptHeaderError(
            f"{path}: extent file {name!r} is not a name inside the descriptor's directory",
            hint="extent files must sit beside their descriptor (or below it), named relatively",
        )
    resolved = os.path.join(base, name)
    root = os.path.realpath(base)
    real = os.path.realpath(resolved)
    if real == root or os.path.commonpath([root, real]) != root:
        raise CorruptHeaderError(
            f"{path}: extent file {name!r} resolves to {real!r}, not to a file inside the "
            "descriptor's directory (a symlink leads out)"
        )
    return resolved


def _open_extents(
    path: str, desc: Descriptor | None, paths: list[str], writable: bool, stack: ExitStack
) -> list[VmdkExtent]:
    # an extent naming the descriptor itself, or one file named twice, is a loop
    seen = set() if paths == [path] else {_inode(path, path)}
    extents: list[VmdkExtent] = []
    lines: list[ExtentLine | None] = list(desc.extents) if desc is not None else [None]
    for line, ext_path in zip(lines, paths, strict=True):
        if line is not None and line.type == "ZERO":
            extents.append(ZeroExtent(line.sectors * SECTOR))
            continue
        ident = _inode(path, ext_path)
        if ident in seen:
            raise CorruptHeaderError(f"{path}: extent {ext_path!r} is used twice (loop)")
        seen.add(ident)
        ext = _open_one(ext_path, line, writable, stack)
        extents.append(ext)
    if desc is None and writable:
        raise UnsupportedFormatError(f"{path}: a bare sparse extent; open its descriptor")
    return extents


def _open_one(
    ext_path: str, line: ExtentLine | None, writable: bool, stack: ExitStack
) -> VmdkExtent:
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
    try:
        fd = os.open(ext_path, flags)
    except OSError as err:
        raise io_error(f"open extent {ext_path}", err) from err
    stack.callback(_close_quietly, fd)
    size = os.fstat(fd).st_size
    if line is None or line.type == "SPARSE":
        header = read_sparse_header(fd, size, ext_path)
        length = header.capacity * SECTOR
        if line is not None:
            if line.sectors > header.capacity:
                raise CorruptHeaderError(
                    f"{ext_path}: extent line says {line.sectors} sectors, header {header.capacity}"
                )
            length = line.sectors * SECTOR
        return SparseExtent(ext_path, fd, header, length, writable=writable)
    start = line.offset * SECTOR if line.type == "FLAT" else 0
    length = line.sectors * SECTOR
    if size < start + length:
        raise CorruptHeaderError(
            f"{ext_path}: flat extent file has {size} B, the descriptor needs {start + length} B"
        )
    return FlatExtent(ext_path, fd, start, length, writable=writable)


def _attach_parent(disk: VmdkDisk, desc: Descriptor, seen: set[tuple[int, int]]) -> None:
    """Open the parent read-only and check the CID link (parent CID == our parentCID)."""
    if desc.parent_hint is None:
        raise CorruptHeaderError(f"{disk.path}: snapshot delta without parentFileNameHint")
    if len(seen) >= _MAX_CHAIN:
        raise CorruptHeaderError(f"{disk.path}: snapshot chain deeper than {_MAX_CHAIN}")
    seen.add(_inode(disk.path, disk.path))
    parent_path = resolve_hint(disk.path, desc.parent_hint)
    if not os.path.exists(parent_path):
        raise CorruptHeaderError(f"{disk.path}: parent disk {parent_path!r} not found")
    if _inode(disk.path, parent_path) in seen:
        raise CorruptHeaderError(f"{disk.path}: snapshot chain loops back to {parent_path!r}")
    parent = _open(parent_path, writable=False, seen=seen)
    disk.parent = parent
    # CIDs are hex numbers: qemu writes parentCID without leading zeros ("3655a02"),
    # VMware and we write eight digits ("03655a02"); compare the numbers
    if int(parent.cid, 16) != int(desc.parent_cid, 16):
        raise CorruptHeaderError(
            f"{disk.path}: parentCID {desc.parent_cid} does not match the CID {parent.cid} of "
            f"parent {parent_path!r} (the parent was modified after the snapshot)"
        )
    for ext in disk.vmdk_extents:
        if isinstance(ext, SparseExtent):
            ext.hole_is_zero = False


def _inode(where: str, path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError as err:
        if isinstance(err, FileNotFoundError):
            raise CorruptHeaderError(f"{where}: extent file {path!r} not found") from err
        raise io_error(f"stat {path}", err) from err
    return (st.st_dev, st.st_ino)


def _close_quietly(fd: int) -> None:
    with suppress(OSError):
        os.close(fd)

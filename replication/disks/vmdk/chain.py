"""Snapshot chains: find a disk's parent, and find children that point at a disk.

Product rule: a VM with snapshots cannot be a replication target. Writing a
snapshot delta bypasses the VM's view of its disk, and writing a base disk that has
children changes its CID, which breaks every child (qemu and libvmdk refuse the
chain afterwards, oracles.md 2.6). So a writable open is refused when the disk *is*
a child, or when any ``*.vmdk`` in its directory names it as parent.
"""

from __future__ import annotations

import os

from ...errors import DiskHasSnapshotsError, ReplicationError
from .descriptor import Descriptor, looks_like_descriptor, parse_descriptor
from .header import MAGIC_COWD, MAGIC_KDMV, SECTOR, SparseHeader

__all__ = [
    "SNAPSHOT_EXTENT_TYPES",
    "find_children",
    "read_embedded_descriptor",
    "refuse_snapshots",
    "resolve_hint",
    "snapshot_error",
]

#: extent types that only exist in snapshot deltas (ESXi vmfsSparse and seSparse)
SNAPSHOT_EXTENT_TYPES = frozenset({"VMFSSPARSE", "SESPARSE"})
_FIX = (
    "consolidate or delete the VM's snapshots (vSphere: Snapshots > Delete All) "
    "before using it as a replication target"
)
_SCAN_BYTES = 64 * 1024


def snapshot_error(path: str, why: str) -> DiskHasSnapshotsError:
    """The error for a disk that belongs to a snapshot chain."""
    return DiskHasSnapshotsError(f"{path}: the disk belongs to a snapshot chain ({why})", hint=_FIX)


def resolve_hint(desc_path: str, hint: str) -> str:
    """Resolve a parentFileNameHint (relative to the child's directory, or absolute)."""
    if os.path.isabs(hint):
        return hint
    return os.path.join(os.path.dirname(os.path.abspath(desc_path)), hint)


def refuse_snapshots(desc_path: str, desc: Descriptor, own_files: list[str]) -> None:
    """Raise DiskHasSnapshotsError if the disk is a child or has children beside it."""
    if desc.parent_cid != "ffffffff":
        raise snapshot_error(desc_path, f"it is a snapshot delta: parentCID={desc.parent_cid}")
    if desc.parent_hint is not None:
        raise snapshot_error(desc_path, f"it has a parent disk {desc.parent_hint!r}")
    for ext in desc.extents:
        if ext.type in SNAPSHOT_EXTENT_TYPES:
            raise snapshot_error(desc_path, f"it has a {ext.type} snapshot extent")
    children = find_children(desc_path, own_files)
    if children:
        names = ", ".join(os.path.basename(c) for c in children[:3])
        raise snapshot_error(desc_path, f"snapshot disk(s) {names} use it as their parent")


def find_children(desc_path: str, own_files: list[str]) -> list[str]:
    """Return the ``*.vmdk`` files beside ``desc_path`` whose parent hint names it."""
    directory = os.path.dirname(os.path.abspath(desc_path))
    try:
        me = os.stat(desc_path)
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    own = {_inode(p) for p in own_files}
    children = []
    for name in names:
        path = os.path.join(directory, name)
        if not name.lower().endswith(".vmdk") or _inode(path) in own:
            continue
        desc = _descriptor_of(path)
        if desc is None or desc.parent_hint is None:
            continue
        try:
            parent = os.stat(resolve_hint(path, desc.parent_hint))
        except OSError:
            continue
        if (parent.st_dev, parent.st_ino) == (me.st_dev, me.st_ino):
            children.append(path)
    return children


def read_embedded_descriptor(data: bytes, fd: int, where: str) -> Descriptor | None:
    """Parse the descriptor embedded in a KDMV file (``data`` = its first sector)."""
    header = SparseHeader.parse(data, where)
    if header.descriptor_offset == 0 or header.descriptor_size == 0:
        return None
    size = min(header.descriptor_size * SECTOR, _SCAN_BYTES)
    raw = os.pread(fd, size, header.descriptor_offset * SECTOR)
    if not raw.split(b"\0", 1)[0].strip():
        return None  # an extent of a twoGbMaxExtentSparse disk: no descriptor inside
    return parse_descriptor(raw, where)


def _descriptor_of(path: str) -> Descriptor | None:
    """The descriptor of another file in the directory, or None (junk is ignored)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        head = os.pread(fd, _SCAN_BYTES, 0)
        if head[:4] == MAGIC_KDMV:
            return read_embedded_descriptor(head, fd, path)
        if head[:4] != MAGIC_COWD and looks_like_descriptor(head):
            return parse_descriptor(head, path)
    except (OSError, OverflowError, ValueError, ReplicationError):
        return None
    finally:
        os.close(fd)
    return None


def _inode(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)

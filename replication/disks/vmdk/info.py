"""``disk info`` for VMDK disks: sizes, identity, chain position and findings."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..base import DiskInfo
from .chain import SNAPSHOT_EXTENT_TYPES, find_children
from .sparse import SparseExtent

if TYPE_CHECKING:
    from .disk import VmdkDisk

__all__ = ["disk_info", "target_problems"]


def target_problems(disk: VmdkDisk) -> list[str]:
    """Why this disk cannot be written (empty when it can)."""
    problems = []
    desc = disk.desc
    sparse = [e for e in disk.vmdk_extents if isinstance(e, SparseExtent)]
    if desc is None:
        problems.append("a bare sparse extent without descriptor: open the descriptor .vmdk")
    elif desc.has_parent():
        problems.append(
            f"snapshot delta of {desc.parent_hint!r} (parentCID={desc.parent_cid}): "
            "consolidate or delete the VM's snapshots before using it as a target"
        )
    if desc is not None and any(e.type in SNAPSHOT_EXTENT_TYPES for e in desc.extents):
        problems.append("has snapshot (vmfsSparse/seSparse) extents")
    if any(e.header.compressed for e in sparse):
        problems.append("streamOptimized (compressed) VMDKs are read-only")
    if desc is not None and any(e.access != "RW" for e in desc.extents):
        problems.append("has read-only extents")
    if desc is not None and any(e.type == "ZERO" for e in desc.extents):
        problems.append("has ZERO extents (they store nothing)")
    children = find_children(disk.desc_path, disk.own_files())
    if children:
        problems.append(
            f"has {len(children)} snapshot child disk(s) beside it: consolidate or delete "
            "the VM's snapshots before using it as a target"
        )
    return problems


def disk_info(disk: VmdkDisk) -> DiskInfo:
    """Build the DiskInfo of an open VMDK disk."""
    sparse = [e for e in disk.vmdk_extents if isinstance(e, SparseExtent)]
    problems = target_problems(disk)
    notes = list(problems)
    if any(e.header.unclean_shutdown for e in sparse) and not disk.writable:
        notes.append("uncleanShutdown is set: the last writer did not close the disk cleanly")
    desc = disk.desc
    extra: dict[str, object] = {
        "extents": [
            {"kind": e.kind, "file": e.path, "length": e.length} for e in disk.vmdk_extents
        ],
    }
    if desc is not None:
        extra["parent_cid"] = desc.parent_cid
        extra["adapter_type"] = desc.fields.get("ddb.adapterType")
    if sparse:
        extra["sparse_version"] = sparse[0].header.version
    return DiskInfo(
        path=disk.path,
        format="vmdk",
        subformat=_subformat(disk),
        virtual_size=disk.virtual_size,
        allocated_bytes=sum(e.allocated_bytes() for e in disk.vmdk_extents),
        grain_size=sparse[0].grain_bytes if sparse else None,
        parent=desc.parent_hint if desc else None,
        uuid=desc.fields.get("ddb.uuid") if desc else None,
        cid=disk.cid,
        files=tuple(disk.own_files()),
        writable=not problems,
        notes=tuple(notes),
        extra=extra,
    )


def _subformat(disk: VmdkDisk) -> str:
    if disk.desc is not None:
        return disk.desc.create_type
    sparse = disk.vmdk_extents[0]
    if isinstance(sparse, SparseExtent) and sparse.header.compressed:
        return "streamOptimized"
    return "monolithicSparse"

"""Differencing VHDs (Hyper-V checkpoints, ``.avhd``): find the parent, find children.

A differencing disk names its parent by UUID (checked against the parent's footer)
and by *parent locators*: a relative Windows path (``W2ru``), an absolute one
(``W2ku``), a Mac file URL (``MacX``) and the header's parent name. Windows paths
cannot be used as such on Linux, so the file name is also looked for beside the child.

Product rule (as for VMDK): a disk in a snapshot chain is never a replication target.
A differencing disk is read-only, and a base disk with a differencing child beside it
is refused for writing (writing it would silently change every checkpoint).
"""

from __future__ import annotations

import os
import struct
import uuid

from ..errors import CorruptHeaderError, DiskHasSnapshotsError
from .vhd_format import FOOTER_SIZE, HEADER_SIZE, DynamicHeader

__all__ = ["SNAPSHOT_HINT", "find_children", "parent_candidates", "snapshot_error"]

SNAPSHOT_HINT = (
    "delete or merge the VM's checkpoints (Hyper-V: Delete Checkpoint) so that one "
    "fixed or dynamic VHD remains"
)
_SUFFIXES = (".vhd", ".avhd")
_MAX_SCAN = 10_000


def snapshot_error(path: str, why: str) -> DiskHasSnapshotsError:
    """The error for a VHD that belongs to a snapshot (checkpoint) chain."""
    return DiskHasSnapshotsError(
        f"{path}: the disk belongs to a snapshot chain ({why}); writing it would corrupt the chain",
        hint=SNAPSHOT_HINT,
    )


def _decode(code: bytes, data: bytes) -> str:
    if code in (b"W2ru", b"W2ku"):
        return data.decode("utf-16-le", "replace")
    if code == b"MacX":
        text = data.decode("utf-8", "replace")
        return text[len("file://") :] if text.startswith("file://") else text
    return data.decode("latin-1")


def parent_candidates(path: str, fd: int, header: DynamicHeader) -> list[str]:
    """Return the paths where the parent may be, most specific first."""
    here = os.path.dirname(os.path.abspath(path))
    names: list[str] = []
    for code, off, length in header.locators:
        try:
            data = os.pread(fd, length, off)
        except OSError:
            continue
        text = _decode(code, data).split("\0", 1)[0].strip()
        if text:
            names.append(text)
    if header.parent_name:
        names.append(header.parent_name)
    out: list[str] = []
    for name in names:
        posix = name.replace("\\", "/")
        if posix.startswith("/"):
            out.append(posix)
        elif not (len(posix) > 1 and posix[1] == ":"):  # not a Windows drive path
            out.append(os.path.normpath(os.path.join(here, posix)))
        out.append(os.path.join(here, posix.rsplit("/", 1)[-1]))
    seen: set[str] = set()
    return [p for p in out if not (p in seen or seen.add(p))]


def find_children(path: str, unique_id: uuid.UUID) -> list[str]:
    """Return the ``*.vhd``/``*.avhd`` files beside ``path`` whose parent UUID is ``unique_id``."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        me = os.stat(path)
        names = sorted(os.listdir(directory))[:_MAX_SCAN]
    except OSError:
        return []
    children = []
    for name in names:
        if not name.lower().endswith(_SUFFIXES):
            continue
        other = os.path.join(directory, name)
        try:
            st = os.stat(other)
            if (st.st_dev, st.st_ino) == (me.st_dev, me.st_ino):
                continue
            with open(other, "rb") as f:
                head = f.read(FOOTER_SIZE + HEADER_SIZE)
        except OSError:
            continue
        if _parent_uuid(head) == unique_id:
            children.append(other)
    return children


def _parent_uuid(head: bytes) -> uuid.UUID | None:
    """The parent UUID of a differencing VHD whose header follows the footer copy at 0."""
    if len(head) < FOOTER_SIZE + HEADER_SIZE or head[:8] != b"conectix":
        return None
    (disk_type,) = struct.unpack_from(">I", head, 60)
    (data_offset,) = struct.unpack_from(">Q", head, 16)
    if disk_type != 4 or data_offset != FOOTER_SIZE or head[512:520] != b"cxsparse":
        return None
    return uuid.UUID(bytes=head[512 + 40 : 512 + 56])


def check_link(path: str, parent_path: str, parent_uuid: uuid.UUID, want: uuid.UUID) -> None:
    """The parent found must be the one the child was made from."""
    if parent_uuid != want:
        raise CorruptHeaderError(
            f"{path}: parent {parent_path!r} has UUID {parent_uuid}, but the differencing "
            f"disk was made from {want}"
        )

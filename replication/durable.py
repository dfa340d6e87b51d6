"""Durable file updates: write-then-rename, and the directory fsync that makes it stick.

A rename is atomic but not durable until the directory entry itself reaches the
disk, so every metadata file of the engine (hash maps, manifests, cursors,
descriptors, certificates) goes through :func:`write_atomically`.
"""

from __future__ import annotations

import fcntl
import os
import secrets
from collections.abc import Callable
from pathlib import Path

__all__ = ["fsync_dir", "lock_exclusive", "write_atomically"]


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync the directory ``path`` (after creating, renaming or deleting in it)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data``: temporary file, fsync, rename, fsync directory.

    After a crash the file holds either its old or its new content, never a mix.
    Raises ``OSError``; the temporary file is removed on failure.
    """
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        try:
            os.fchmod(fd, mode)  # the umask may have removed bits we want
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def lock_exclusive(
    path: str | os.PathLike[str], busy: Callable[[], Exception], *, mode: int = 0o644
) -> int:
    """Open (creating) the lock file ``path`` and hold an exclusive flock; return its fd.

    One writer per directory (a spool, a journal, a tracker's state): a second
    process gets ``busy()`` raised at once instead of waiting. The lock goes with the
    fd (close it to release), and so with the process on a crash.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, mode)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as err:
        os.close(fd)
        raise busy() from err
    except BaseException:
        os.close(fd)
        raise
    return fd

"""A cache of target hash maps, trusted only while the disk's generation matches.

After a sync the target's content is known exactly: it is the source's. Keeping
that map lets the next sync read only the source. The map is trusted only when
the target's :meth:`~replication.disks.Disk.generation` token still equals the one
recorded right after our last flush: any write by anyone in between (a VM booted
from the disk, qemu, VMware bumping the CID) changes the token and the map is
recomputed from the disk. Block devices have no usable token and are always read.

Entries live in ``$REPLICATION_CACHE_DIR`` (default ``~/.cache/replication``),
``maps/<sha256 of the disk's key, block size, covered size>.rmap``, written with
write-then-rename. A local disk's key is its real path; a page blob's is its URL
(account included, no SAS): the same blob named by a URL or by ``pageblob:C/B``
shares one entry, and neither depends on the working directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

from .disks.base import Disk
from .disks.pageblob import PageBlobDisk, is_pageblob_spec
from .errors import HashMapFormatError
from .hashmap import HashMap

__all__ = ["MapCache", "default_cache_dir", "disk_key"]


def default_cache_dir() -> Path:
    """Return the cache directory from the environment (or ``~/.cache/replication``)."""
    env = os.environ.get("REPLICATION_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(xdg) / "replication"


def disk_key(disk: Disk) -> str:
    """What names ``disk`` in the cache: the blob's URL, or the file's real path."""
    if isinstance(disk, PageBlobDisk):
        return disk.identity
    if is_pageblob_spec(disk.path):  # a wrapper around a blob: its path is already a URL
        return disk.path
    return os.path.realpath(disk.path)


class MapCache:
    """Stores and returns hash maps of disks keyed by path and geometry."""

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        self.directory = Path(directory) if directory is not None else default_cache_dir()

    def _entry(self, disk: Disk, block_size: int, covered_size: int) -> Path:
        key = f"{disk_key(disk)}\0{block_size}\0{covered_size}"
        name = hashlib.sha256(key.encode()).hexdigest()[:32]
        return self.directory / "maps" / f"{name}.rmap"

    def load_trusted(self, disk: Disk, block_size: int, covered_size: int) -> HashMap | None:
        """Return the cached map if the disk has not changed since it was stored."""
        current = disk.generation()
        if current is None:
            return None
        path = self._entry(disk, block_size, covered_size)
        if not path.exists():
            return None
        try:
            hmap = HashMap.load(str(path))
        except HashMapFormatError:
            self._remove(path)  # a damaged entry is only a cache miss
            return None
        if hmap.generation != current or hmap.block_size != block_size:
            return None
        if hmap.covered_size != covered_size:
            return None
        return hmap

    def invalidate(self, disk: Disk, block_size: int, covered_size: int) -> None:
        """Drop the entry before writing the disk, so a crash cannot leave it trusted."""
        self._remove(self._entry(disk, block_size, covered_size))

    def store(self, disk: Disk, hmap: HashMap, generation: str | None) -> None:
        """Record ``hmap`` as the content of ``disk`` at ``generation``."""
        if generation is None:
            return
        path = self._entry(disk, hmap.block_size, hmap.covered_size)
        path.parent.mkdir(parents=True, exist_ok=True)
        hmap.generation = generation
        hmap.save(str(path))

    @staticmethod
    def _remove(path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

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

An entry is the map file format of :mod:`replication.hashmap`; it is read
(:meth:`MapCache.open_trusted`) and written (:meth:`MapCache.writer`) a window at a
time, so a cached map of a 2 TiB disk (512 MiB at 64 KiB blocks) is never in memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

from .disks.base import Disk
from .disks.pageblob import PageBlobDisk, is_pageblob_spec
from .errors import HashMapFormatError
from .hashmap import HashMap, MapFileReader, MapFileWriter

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

    def open_trusted(self, disk: Disk, block_size: int, covered_size: int) -> MapFileReader | None:
        """Open the cached map if the disk has not changed since it was stored.

        The caller reads it a window at a time and closes it. A damaged entry is
        removed and reported as a miss.
        """
        current = disk.generation()
        if current is None:
            return None
        path = self._entry(disk, block_size, covered_size)
        if not path.exists():
            return None
        try:
            reader = MapFileReader(path)
        except HashMapFormatError:
            self._remove(path)  # a damaged entry is only a cache miss
            return None
        geometry = (reader.block_size, reader.covered_size)
        if reader.generation != current or geometry != (block_size, covered_size):
            reader.close()
            return None
        return reader

    def invalidate(self, disk: Disk, block_size: int, covered_size: int) -> None:
        """Drop the entry before writing the disk, so a crash cannot leave it trusted."""
        self._remove(self._entry(disk, block_size, covered_size))

    def store(self, disk: Disk, hmap: HashMap, generation: str | None) -> None:
        """Record ``hmap`` as the content of ``disk`` at ``generation``."""
        writer = self.writer(disk, hmap.block_size, hmap.covered_size, generation)
        if writer is not None:
            with writer:
                writer.append(hmap.digests)
                writer.commit()

    def writer(
        self, disk: Disk, block_size: int, covered_size: int, generation: str | None
    ) -> MapFileWriter | None:
        """Return a writer of ``disk``'s entry at ``generation`` (None: nothing to store).

        The entry replaces the old one only on the writer's ``commit``.
        """
        if generation is None:
            return None
        path = self._entry(disk, block_size, covered_size)
        path.parent.mkdir(parents=True, exist_ok=True)
        return MapFileWriter(path, block_size, covered_size, generation)

    @staticmethod
    def _remove(path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

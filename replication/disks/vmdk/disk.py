"""``VmdkDisk``: extents composed into one virtual disk, CID and session handling.

The disk owns the descriptor (separate text file or embedded in a monolithic sparse
extent) and an ordered list of extents. On the first write after open it gives the
disk a new random CID (as VMware and qemu do), so that anyone holding a token of the
old content, or a child made from it, can tell that the content changed.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterator

from ...durable import write_atomically
from ...errors import UnsupportedFormatError
from ..base import Disk, DiskInfo, Extent, file_generation, stamp_files
from .descriptor import Descriptor, new_cid, render_descriptor
from .extent import HoleFiller, VmdkExtent, fsync, pwrite_full, zero_fill
from .header import SECTOR
from .sparse import SparseExtent

__all__ = ["VmdkDisk"]


class VmdkDisk(Disk):
    """A VMDK disk: descriptor + extents (+ a read-only parent for snapshot children)."""

    format_name = "vmdk"

    def __init__(
        self,
        path: str,
        desc_path: str,
        desc: Descriptor | None,
        extents: list[VmdkExtent],
        *,
        writable: bool,
        embedded_in: SparseExtent | None = None,
        parent: VmdkDisk | None = None,
    ) -> None:
        super().__init__(path, sum(e.length for e in extents), writable=writable)
        self.desc_path = desc_path
        self.desc = desc
        self.vmdk_extents = extents
        self.embedded_in = embedded_in  # the extent file holding the descriptor, if any
        self.parent = parent
        self._starts = []
        pos = 0
        for ext in extents:
            self._starts.append(pos)
            pos += ext.length
        self._session = False  # CID already renewed in this open session

    # -- properties -------------------------------------------------------------------------

    @property
    def cid(self) -> str | None:
        return self.desc.cid if self.desc else None

    @property
    def create_type(self) -> str:
        return self.desc.create_type if self.desc else "monolithicSparse"

    def own_files(self) -> list[str]:
        """The descriptor and every extent file, without duplicates, in order."""
        files = [self.desc_path]
        for ext in self.vmdk_extents:
            if ext.fd >= 0 and ext.path not in files:
                files.append(ext.path)
        return files

    def chain_files(self) -> list[str]:
        files = self.own_files()
        if self.parent is not None:
            files += self.parent.chain_files()
        return files

    # -- I/O --------------------------------------------------------------------------------

    def _pieces(self, offset: int, length: int) -> Iterator[tuple[int, int, int, int]]:
        """Yield (extent index, extent start, extent-relative offset, length)."""
        i = bisect.bisect_right(self._starts, offset) - 1
        pos, end = offset, offset + length
        while pos < end:
            start = self._starts[i]
            n = min(end, start + self.vmdk_extents[i].length) - pos
            yield i, start, pos - start, n
            pos += n
            i += 1

    def _read_into(self, offset: int, view: memoryview) -> None:
        done = 0
        for i, start, rel, n in self._pieces(offset, len(view)):
            self.vmdk_extents[i].read_into(rel, view[done : done + n], self._hole(start))
            done += n

    def _hole(self, start: int) -> HoleFiller:
        """The filler for unallocated grains: the parent's bytes, or zeros."""
        parent = self.parent
        if parent is None:
            return zero_fill

        def fill(rel: int, view: memoryview) -> None:
            pos = start + rel
            inside = max(0, min(len(view), parent.virtual_size - pos))
            if inside:
                parent.read_into(pos, view[:inside])
            if inside < len(view):
                zero_fill(0, view[inside:])

        return fill

    def _write(self, offset: int, view: memoryview) -> None:
        self._begin_session()
        done = 0
        for i, _start, rel, n in self._pieces(offset, len(view)):
            self.vmdk_extents[i].write(rel, view[done : done + n])
            done += n

    def _write_zeroes(self, offset: int, length: int) -> None:
        self._begin_session()
        for i, _start, rel, n in self._pieces(offset, length):
            self.vmdk_extents[i].write_zeroes(rel, n)

    def _flush(self) -> None:
        for ext in self.vmdk_extents:
            ext.flush()

    def _extents(self) -> Iterator[Extent]:
        cur: Extent | None = None
        for ext, start in zip(self.vmdk_extents, self._starts, strict=True):
            for rel, n, zero in ext.iter_extents():
                if cur is not None and cur.zero == zero and cur.end == start + rel:
                    cur = Extent(cur.offset, cur.length + n, zero)
                    continue
                if cur is not None:
                    yield cur
                cur = Extent(start + rel, n, zero)
        if cur is not None:
            yield cur

    def _close(self) -> None:
        try:
            if self.writable:
                self._flush()
        finally:
            for ext in self.vmdk_extents:
                ext.close()
            if self.parent is not None:
                self.parent.close()

    # -- CID / session ------------------------------------------------------------------------

    def _begin_session(self) -> None:
        """Give the disk a new CID before its first change in this open session."""
        if self._session or self.desc is None:
            return
        desc = self.desc.with_cid(new_cid(avoid=self.desc.cid))
        if self.embedded_in is not None:
            self._write_embedded(desc, self.embedded_in)
        else:
            _replace_file(self.desc_path, render_descriptor(desc))
        self.desc = desc
        self._session = True

    @staticmethod
    def _write_embedded(desc: Descriptor, ext: SparseExtent) -> None:
        h = ext.header
        area = h.descriptor_size * SECTOR
        text = render_descriptor(desc)
        if len(text) > area:
            raise UnsupportedFormatError(
                f"{ext.path}: new descriptor ({len(text)} B) does not fit in {area} B"
            )
        pwrite_full(ext.fd, text + bytes(area - len(text)), h.descriptor_offset * SECTOR, ext.path)
        fsync(ext.fd, ext.path)

    # -- generation and info ----------------------------------------------------------------

    def generation(self) -> str | None:
        if any(getattr(e, "pending", None) for e in self.vmdk_extents):
            return None  # new grains still in memory: the files do not show them yet
        return file_generation(self.chain_files(), extra=f"vmdk:{self.cid}")

    def mark_generation(self) -> str | None:
        stamp_files(self.own_files())
        return self.generation()

    def info(self) -> DiskInfo:
        self._check_open()
        from .info import disk_info

        return disk_info(self)


def _replace_file(path: str, data: bytes) -> None:
    """Atomically replace ``path`` with ``data``: temp file, fsync, rename, fsync dir."""
    from ..base import io_error

    try:
        write_atomically(path, data, mode=os.stat(path).st_mode & 0o7777)
    except OSError as err:
        raise io_error(f"rewrite descriptor {path}", err) from err

"""Compressed grains of streamOptimized extents (read only).

A GTE points at a *grain marker*: ``uint64 lba`` (sectors), ``uint32 size``, then
``size`` bytes of a zlib stream that inflates to one grain. The footer/GD_AT_END
handling is in :func:`.sparse.read_sparse_header`. Decompressed grains are kept in a
small LRU cache because callers often read one grain in several small pieces.
"""

from __future__ import annotations

import struct
import threading
import zlib
from collections import OrderedDict
from typing import TYPE_CHECKING

from ...errors import CorruptHeaderError
from .extent import pread_bytes
from .header import FLAG_MARKERS, SECTOR

if TYPE_CHECKING:
    from .sparse import SparseExtent

__all__ = ["CompressedGrains"]

_MARKER = struct.Struct("<QI")
_CACHE_GRAINS = 32


class CompressedGrains:
    """Reads and inflates the grains of one streamOptimized extent."""

    def __init__(self, ext: SparseExtent) -> None:
        self.ext = ext
        self.markers = bool(ext.header.flags & FLAG_MARKERS)
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def read_grain(self, grain: int, sector: int, start: int, view: memoryview) -> None:
        """Copy bytes ``[start, start+len(view))`` of ``grain`` (stored at ``sector``)."""
        data = self._grain(grain, sector)
        view[:] = data[start : start + len(view)]

    def _grain(self, grain: int, sector: int) -> bytes:
        with self._lock:
            data = self._cache.get(grain)
            if data is not None:
                self._cache.move_to_end(grain)
                return data
        data = self._inflate(grain, sector)
        with self._lock:
            self._cache[grain] = data
            if len(self._cache) > _CACHE_GRAINS:
                self._cache.popitem(last=False)
        return data

    def _inflate(self, grain: int, sector: int) -> bytes:
        ext, gb = self.ext, self.ext.grain_bytes
        where = f"{ext.path}: grain {grain} at sector {sector}"
        pos = sector * SECTOR
        head = pread_bytes(ext.fd, _MARKER.size, pos, ext.path)
        lba, size = _MARKER.unpack(head)
        # zlib never expands a grain by more than a few bytes per 16 KiB block
        if size == 0 or size > gb + gb // 8 + 1024:
            raise CorruptHeaderError(f"{where}: compressed size {size} is invalid")
        if pos + _MARKER.size + size > ext.file_size:
            raise CorruptHeaderError(f"{where}: compressed grain runs past end of file")
        if self.markers and lba != grain * ext.grain_sectors:
            raise CorruptHeaderError(f"{where}: marker says LBA {lba}")
        payload = pread_bytes(ext.fd, size, pos + _MARKER.size, ext.path)
        try:
            inflater = zlib.decompressobj()
            data = inflater.decompress(payload, gb)
        except zlib.error as err:
            raise CorruptHeaderError(f"{where}: cannot inflate grain: {err}") from err
        if len(data) < gb:  # a short last grain: the rest of the grain is zeros
            data += bytes(gb - len(data))
        return data

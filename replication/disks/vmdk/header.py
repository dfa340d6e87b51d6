"""The hosted sparse extent header (``KDMV``, 512 bytes, little-endian, packed).

``SparseHeader.parse`` decodes the bytes; ``validate`` checks every field against the
file size *before* anything is allocated from a claimed size, so a hostile header
becomes a typed error rather than a crash, a hang or a huge allocation.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace

from ...errors import CorruptHeaderError, UnsupportedFormatError

__all__ = [
    "FLAG_COMPRESSED",
    "FLAG_MARKERS",
    "FLAG_NEWLINE_TEST",
    "FLAG_REDUNDANT_GD",
    "FLAG_ZEROED_GRAIN",
    "GD_AT_END",
    "MAGIC_COWD",
    "MAGIC_KDMV",
    "SECTOR",
    "SparseHeader",
]

SECTOR = 512
MAGIC_KDMV = b"KDMV"
MAGIC_COWD = b"COWD"
GD_AT_END = 0xFFFFFFFFFFFFFFFF

FLAG_NEWLINE_TEST = 1 << 0
FLAG_REDUNDANT_GD = 1 << 1
FLAG_ZEROED_GRAIN = 1 << 2
FLAG_COMPRESSED = 1 << 16
FLAG_MARKERS = 1 << 17
_KNOWN_INCOMPATIBLE = FLAG_COMPRESSED | FLAG_MARKERS

_STRUCT = struct.Struct("<4sIIQQQQIQQQB4sH")
_NEWLINES = b"\n \r\n"
UNCLEAN_SHUTDOWN_OFFSET = 72

#: grain size bound: VMware uses 128 sectors; qemu accepts up to 1 GiB, we take 32 MiB
MAX_GRAIN_SECTORS = 1 << 16
#: grain count bound: 2 TiB (the hosted sparse limit) of 64 KiB grains; GT memory <= 128 MiB
MAX_GRAINS = 1 << 25
#: descriptor embedded in the extent: qemu writes 20 sectors; more than 1 MiB is hostile
MAX_DESCRIPTOR_SECTORS = 2048


@dataclass(frozen=True)
class SparseHeader:
    """The fields of a SparseExtentHeader; offsets and sizes are in sectors."""

    magic: bytes
    version: int
    flags: int
    capacity: int
    grain_size: int
    descriptor_offset: int
    descriptor_size: int
    num_gtes_per_gt: int
    rgd_offset: int
    gd_offset: int
    overhead: int
    unclean_shutdown: int
    newlines: bytes
    compress_algorithm: int

    @classmethod
    def parse(cls, data: bytes, where: str) -> SparseHeader:
        """Decode the first 79 bytes of ``data``."""
        if len(data) < _STRUCT.size:
            raise CorruptHeaderError(f"{where}: file too short for a sparse extent header")
        return cls(*_STRUCT.unpack_from(data))

    def pack(self) -> bytes:
        """Return the 512-byte on-disk header."""
        raw = _STRUCT.pack(
            self.magic, self.version, self.flags, self.capacity, self.grain_size,
            self.descriptor_offset, self.descriptor_size, self.num_gtes_per_gt,
            self.rgd_offset, self.gd_offset, self.overhead, self.unclean_shutdown,
            self.newlines, self.compress_algorithm,
        )  # fmt: skip
        return raw + bytes(SECTOR - len(raw))

    def with_gd_offset(self, gd_offset: int) -> SparseHeader:
        return replace(self, gd_offset=gd_offset)

    # -- derived values -----------------------------------------------------------------

    @property
    def compressed(self) -> bool:
        return bool(self.flags & FLAG_COMPRESSED)

    @property
    def zeroed_grain(self) -> bool:
        """GTE 1 means "zeroed grain" only with version >= 2 and flags bit 2."""
        return self.version >= 2 and bool(self.flags & FLAG_ZEROED_GRAIN)

    @property
    def redundant(self) -> bool:
        return bool(self.flags & FLAG_REDUNDANT_GD) and not self.compressed

    @property
    def grain_bytes(self) -> int:
        return self.grain_size * SECTOR

    @property
    def grains(self) -> int:
        return -(-self.capacity // self.grain_size)

    @property
    def gd_entries(self) -> int:
        return -(-self.grains // self.num_gtes_per_gt)

    @property
    def gt_sectors(self) -> int:
        return -(-self.num_gtes_per_gt * 4 // SECTOR)

    @property
    def gd_sectors(self) -> int:
        return -(-self.gd_entries * 4 // SECTOR)

    # -- validation -----------------------------------------------------------------------

    def validate(self, file_size: int, where: str, *, footer: bool = False) -> None:
        """Check every field against ``file_size`` (bytes); raise a typed error.

        ``footer=False`` accepts GD_AT_END (the real gdOffset is in the footer).
        """
        self._validate_fields(where)
        self._validate_layout(file_size // SECTOR, where, footer)

    def _validate_fields(self, where: str) -> None:
        """Flat list of checks of the fields on their own."""
        g = self.grain_size
        if self.magic != MAGIC_KDMV:
            raise CorruptHeaderError(f"{where}: bad magic {self.magic!r}, expected b'KDMV'")
        if self.version not in (1, 2, 3):
            raise UnsupportedFormatError(f"{where}: sparse extent version {self.version}")
        if self.flags & 0xFFFF0000 & ~_KNOWN_INCOMPATIBLE:
            raise UnsupportedFormatError(f"{where}: unknown incompatible flags {self.flags:#x}")
        self._validate_compression(where)
        if self.flags & FLAG_NEWLINE_TEST and self.newlines != _NEWLINES:
            raise CorruptHeaderError(f"{where}: newline test bytes mangled (text-mode copy?)")
        if g <= 0 or g & (g - 1) or g > MAX_GRAIN_SECTORS:
            raise CorruptHeaderError(f"{where}: grain size {g} sectors is invalid")
        if self.capacity <= 0:
            raise CorruptHeaderError(f"{where}: capacity {self.capacity} is invalid")
        if self.capacity > (1 << 63) // SECTOR or self.grains > MAX_GRAINS:
            raise CorruptHeaderError(f"{where}: capacity {self.capacity} sectors is too large")
        if not 1 <= self.num_gtes_per_gt <= 512:
            raise CorruptHeaderError(f"{where}: numGTEsPerGT {self.num_gtes_per_gt} invalid")

    def _validate_compression(self, where: str) -> None:
        """streamOptimized: compressed grains (DEFLATE) always come with markers."""
        if bool(self.flags & FLAG_MARKERS) and not self.compressed:
            raise UnsupportedFormatError(f"{where}: grain markers without compression")
        if self.compressed and not self.flags & FLAG_MARKERS:
            raise UnsupportedFormatError(f"{where}: compressed grains without markers")
        if self.compressed and self.compress_algorithm != 1:
            raise UnsupportedFormatError(f"{where}: compression {self.compress_algorithm}")
        if not self.compressed and self.compress_algorithm != 0:
            raise CorruptHeaderError(f"{where}: compressAlgorithm set on uncompressed extent")

    def _validate_layout(self, sectors: int, where: str, footer: bool) -> None:
        """Flat list of checks that every region lies inside the file of ``sectors``."""
        if self.descriptor_size > MAX_DESCRIPTOR_SECTORS:
            raise CorruptHeaderError(f"{where}: descriptor size {self.descriptor_size} too big")
        if self.descriptor_offset and self.descriptor_offset + self.descriptor_size > sectors:
            raise CorruptHeaderError(f"{where}: embedded descriptor lies past end of file")
        if self.gd_offset == GD_AT_END and not footer:
            return  # the real header is in the footer; validated again from there
        if self.gd_offset == 0 or self.gd_offset + self.gd_sectors > sectors:
            raise CorruptHeaderError(f"{where}: grain directory lies past end of file")
        if self.redundant and (self.rgd_offset == 0 or self.rgd_offset + self.gd_sectors > sectors):
            raise CorruptHeaderError(f"{where}: redundant grain directory past end of file")
        if self.overhead > sectors:
            raise CorruptHeaderError(f"{where}: overHead {self.overhead} past end of file")

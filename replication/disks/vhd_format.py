"""VHD on-disk structures: the footer, the dynamic-disk header and their checksums.

Every field is big-endian. The 512-byte *footer* sits at the end of every VHD (a
dynamic disk keeps an identical copy at offset 0); a dynamic disk's 1024-byte
``cxsparse`` header (at ``footer.data_offset``) locates the block allocation table
(BAT). Parsing validates every field a hostile file could use to make us read out
of bounds, allocate huge buffers or loop: such files raise
:class:`~replication.errors.CorruptHeaderError`.
"""

from __future__ import annotations

import struct
import time
import uuid
from dataclasses import dataclass

from ..errors import CorruptHeaderError, UnsupportedFormatError

__all__ = [
    "BAT_UNUSED",
    "DEFAULT_BLOCK_SIZE",
    "DISK_TYPES",
    "FOOTER_SIZE",
    "HEADER_SIZE",
    "MAX_CHS",
    "DynamicHeader",
    "Footer",
    "bitmap_size",
    "build_dynamic_header",
    "build_footer",
    "checksum",
    "parse_dynamic_header",
    "parse_footer",
]

FOOTER_SIZE = 512
HEADER_SIZE = 1024
SECTOR = 512
COOKIE = b"conectix"
HEADER_COOKIE = b"cxsparse"
FORMAT_VERSION = 0x00010000
NO_DATA_OFFSET = 0xFFFFFFFFFFFFFFFF
BAT_UNUSED = 0xFFFFFFFF
DEFAULT_BLOCK_SIZE = 2 << 20
MIN_BLOCK_SIZE = 4096  # 8 sectors: the smallest block whose bitmap is a whole byte
MAX_BLOCK_SIZE = 256 << 20
MAX_TABLE_ENTRIES = 1 << 24  # 64 MiB BAT; 2 TiB at 128 KiB blocks
MAX_VIRTUAL_SIZE = 64 << 40  # sanity bound: Azure's largest disk is 32 TiB
MAX_CHS = (65535, 16, 255)  # tells qemu (and others) to trust current_size
DISK_TYPES = {2: "fixed", 3: "dynamic", 4: "differencing"}
CREATOR_APP = b"rpln"
CREATOR_VERSION = 0x00010000
CREATOR_OS = b"Wi2k"
_EPOCH_2000 = 946684800

_FOOTER = struct.Struct(">8sIIQI4sI4sQQHBBII16sB")
_HEADER = struct.Struct(">8sQQIIII16sI")
_LOCATOR = struct.Struct(">4sIIIQ")
MAX_LOCATOR = 64 * 1024


def checksum(buf: bytes | bytearray, field_offset: int) -> int:
    """One's complement of the byte sum of ``buf`` with the 4-byte checksum field zeroed."""
    total = sum(buf) - sum(buf[field_offset : field_offset + 4])
    return (~total) & 0xFFFFFFFF


@dataclass(frozen=True)
class Footer:
    """The fields of a VHD footer that the engine uses."""

    raw: bytes  # the 512 bytes as found (rewritten unchanged when the file grows)
    data_offset: int
    timestamp: int
    creator_app: bytes
    creator_version: int
    creator_os: bytes
    original_size: int
    current_size: int
    geometry: tuple[int, int, int]
    disk_type: int
    unique_id: uuid.UUID
    saved_state: int

    @property
    def chs_size(self) -> int:
        c, h, s = self.geometry
        return c * h * s * SECTOR

    @property
    def creator_text(self) -> str:
        return self.creator_app.decode("latin-1")


def parse_footer(buf: bytes, where: str) -> Footer:
    """Parse and validate a 512-byte footer; ``where`` names it in error messages."""
    if len(buf) < FOOTER_SIZE:
        raise CorruptHeaderError(f"{where}: truncated VHD footer ({len(buf)} of 512 bytes)")
    buf = bytes(buf[:FOOTER_SIZE])
    f = _FOOTER.unpack_from(buf)
    cookie, _features, version, data_offset, ts, app, app_ver, host, orig, cur = f[:10]
    cyl, heads, secs, disk_type, cks, uid, saved = f[10:]
    if cookie != COOKIE:
        raise CorruptHeaderError(f"{where}: VHD footer cookie is {cookie!r}, not b'conectix'")
    if checksum(buf, 64) != cks:
        raise CorruptHeaderError(
            f"{where}: VHD footer checksum mismatch (stored {cks:#010x}, "
            f"computed {checksum(buf, 64):#010x})"
        )
    if version >> 16 != 1:
        raise UnsupportedFormatError(
            f"{where}: VHD file format version {version:#x} (expected 1.x)"
        )
    if disk_type not in DISK_TYPES:
        raise UnsupportedFormatError(f"{where}: VHD disk type {disk_type} is not 2, 3 or 4")
    if cur <= 0 or cur % SECTOR or cur > MAX_VIRTUAL_SIZE:
        raise CorruptHeaderError(f"{where}: VHD current size {cur} is not a plausible disk size")
    return Footer(
        raw=buf,
        data_offset=data_offset,
        timestamp=ts,
        creator_app=app,
        creator_version=app_ver,
        creator_os=host,
        original_size=orig,
        current_size=cur,
        geometry=(cyl, heads, secs),
        disk_type=disk_type,
        unique_id=uuid.UUID(bytes=uid),
        saved_state=saved,
    )


def build_footer(size: int, disk_type: int, data_offset: int, unique_id: uuid.UUID) -> bytes:
    """Return a footer for a new disk of ``size`` bytes (current-size semantics)."""
    ts = max(0, int(time.time()) - _EPOCH_2000) & 0xFFFFFFFF
    cyl, heads, secs = MAX_CHS
    buf = bytearray(FOOTER_SIZE)
    _FOOTER.pack_into(
        buf, 0, COOKIE, 2, FORMAT_VERSION, data_offset, ts, CREATOR_APP, CREATOR_VERSION,
        CREATOR_OS, size, size, cyl, heads, secs, disk_type, 0, unique_id.bytes, 0,
    )  # fmt: skip
    struct.pack_into(">I", buf, 64, checksum(buf, 64))
    return bytes(buf)


@dataclass(frozen=True)
class DynamicHeader:
    """The fields of a dynamic-disk header that the engine uses."""

    table_offset: int
    max_table_entries: int
    block_size: int
    parent_uuid: uuid.UUID
    parent_name: str
    #: differencing disks: (platform code, data offset, data length) of each parent locator
    locators: tuple[tuple[bytes, int, int], ...] = ()


def bitmap_size(block_size: int) -> int:
    """Bytes of the sector bitmap in front of each block (rounded up to a sector)."""
    bits = block_size // SECTOR
    return ((bits + 7) // 8 + SECTOR - 1) // SECTOR * SECTOR


def parse_dynamic_header(buf: bytes, where: str, footer: Footer, file_size: int) -> DynamicHeader:
    """Parse and validate the ``cxsparse`` header against the footer and the file size."""
    if len(buf) < HEADER_SIZE:
        raise CorruptHeaderError(f"{where}: truncated VHD dynamic header")
    cookie, _data_off, table_off, version, entries, bsize, cks, puid, _pts = _HEADER.unpack_from(
        buf
    )
    if cookie != HEADER_COOKIE:
        raise CorruptHeaderError(f"{where}: VHD dynamic header cookie is {cookie!r}")
    if checksum(buf[:HEADER_SIZE], 36) != cks:
        raise CorruptHeaderError(f"{where}: VHD dynamic header checksum mismatch")
    if version >> 16 != 1:
        raise UnsupportedFormatError(f"{where}: VHD dynamic header version {version:#x}")
    if bsize < MIN_BLOCK_SIZE or bsize > MAX_BLOCK_SIZE or bsize & (bsize - 1):
        raise CorruptHeaderError(f"{where}: VHD block size {bsize} is not a power of two in range")
    needed = -(-footer.current_size // bsize)
    if entries < needed or entries > MAX_TABLE_ENTRIES:
        raise CorruptHeaderError(
            f"{where}: VHD BAT has {entries} entries but {needed} are needed for "
            f"{footer.current_size} bytes in {bsize}-byte blocks"
        )
    end = table_off + 4 * entries
    if table_off < FOOTER_SIZE or table_off % SECTOR or end > file_size - FOOTER_SIZE:
        raise CorruptHeaderError(f"{where}: VHD BAT [{table_off}, {end}) lies outside the file")
    hdr = footer.data_offset
    if table_off < hdr + HEADER_SIZE and end > hdr:
        raise CorruptHeaderError(f"{where}: VHD BAT overlaps the dynamic header")
    name, locators = "", ()
    if footer.disk_type == 4:
        name = bytes(buf[64:576]).decode("utf-16-be", "replace").split("\0", 1)[0]
        locators = _parse_locators(buf, where, file_size)
    return DynamicHeader(
        table_offset=table_off,
        max_table_entries=entries,
        block_size=bsize,
        parent_uuid=uuid.UUID(bytes=bytes(puid)),
        parent_name=name,
        locators=locators,
    )


def _parse_locators(buf: bytes, where: str, file_size: int) -> tuple[tuple[bytes, int, int], ...]:
    """The parent locators of a differencing disk: (platform code, offset, length)."""
    out = []
    for i in range(8):
        code, _space, length, _res, off = _LOCATOR.unpack_from(buf, 576 + 24 * i)
        if code == bytes(4) or length == 0:
            continue
        if length > MAX_LOCATOR or off < FOOTER_SIZE or off + length > file_size - FOOTER_SIZE:
            raise CorruptHeaderError(
                f"{where}: VHD parent locator {i} [{off}, {off + length}) is outside the file"
            )
        out.append((code, off, length))
    return tuple(out)


def build_dynamic_header(table_offset: int, entries: int, block_size: int) -> bytes:
    """Return a ``cxsparse`` header for a new dynamic disk."""
    buf = bytearray(HEADER_SIZE)
    _HEADER.pack_into(
        buf, 0, HEADER_COOKIE, NO_DATA_OFFSET, table_offset, FORMAT_VERSION, entries,
        block_size, 0, bytes(16), 0,
    )  # fmt: skip
    struct.pack_into(">I", buf, 36, checksum(buf, 36))
    return bytes(buf)

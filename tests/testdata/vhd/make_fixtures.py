#!/usr/bin/env python3
"""Generate the hostile VHD fixtures ``bad-*.vhd`` and ``cases.json`` in this folder.

Self-contained (stdlib only, independent of the code under test): it builds tiny
valid VHDs (a 64 KiB fixed disk; a 64 KiB dynamic disk with 4 KiB blocks) and
breaks one thing in each. ``cases.json`` maps each file to the error code that
``open_vhd`` (and ``replication disk info``) must report; ``"format": "vhd"`` marks
files that format detection cannot recognise (their cookie is gone), so the CLI
needs ``--format vhd``. ``"writable_code"`` is the code for a writable open when
it differs. Run: ``python3 tests/testdata/vhd/make_fixtures.py``.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SIZE = 64 * 1024
BLOCK = 4096
ENTRIES = SIZE // BLOCK
NO_OFFSET = 0xFFFFFFFFFFFFFFFF
UID = bytes(range(16))
FOOTER = struct.Struct(">8sIIQI4sI4sQQHBBII16sB")
HEADER = struct.Struct(">8sQQIIII16sI")


def checksum(buf: bytes | bytearray, at: int) -> int:
    return (~(sum(buf) - sum(buf[at : at + 4]))) & 0xFFFFFFFF


def footer(
    size: int = SIZE,
    disk_type: int = 2,
    data_offset: int = NO_OFFSET,
    *,
    cookie: bytes = b"conectix",
    version: int = 0x00010000,
    good_checksum: bool = True,
    uid: bytes = UID,
) -> bytes:
    buf = bytearray(512)
    FOOTER.pack_into(
        buf, 0, cookie, 2, version, data_offset, 0, b"test", 0x00010000, b"Wi2k", size, size,
        65535, 16, 255, disk_type, 0, uid, 0,
    )  # fmt: skip
    cks = checksum(buf, 64) ^ (0 if good_checksum else 0x5A5A)
    struct.pack_into(">I", buf, 64, cks)
    return bytes(buf)


def header(
    table: int = 1536,
    entries: int = ENTRIES,
    block: int = BLOCK,
    *,
    cookie: bytes = b"cxsparse",
    good_checksum: bool = True,
    parent: str = "",
    parent_uid: bytes = UID,
    locators: tuple[tuple[bytes, int, int], ...] = (),
) -> bytes:
    buf = bytearray(1024)
    HEADER.pack_into(
        buf, 0, cookie, NO_OFFSET, table, 0x00010000, entries, block, 0, parent_uid, 0
    )  # fmt: skip
    name = parent.encode("utf-16-be")
    buf[64 : 64 + len(name)] = name
    for i, (code, off, length) in enumerate(locators):
        struct.pack_into(">4sIIIQ", buf, 576 + 24 * i, code, 1, length, 0, off)
    cks = checksum(buf, 36) ^ (0 if good_checksum else 0x5A5A)
    struct.pack_into(">I", buf, 36, cks)
    return bytes(buf)


def fixed(**kw: object) -> bytes:
    ft = footer(**kw)  # type: ignore[arg-type]
    return bytes(SIZE) + ft


def dynamic(
    bat: dict[int, int] | None = None,
    hdr: bytes | None = None,
    ft: bytes | None = None,
    disk_type: int = 3,
    data_offset: int = 512,
    size: int = SIZE,
) -> bytes:
    """A dynamic disk; ``bat`` maps block -> sector (default: blocks 0 and 5 allocated)."""
    ft = ft or footer(size, disk_type, data_offset)
    hdr = hdr or header()
    table = bytearray(b"\xff" * 512)
    bat = {0: 4, 5: 4 + 9} if bat is None else bat
    for i, sec in bat.items():
        struct.pack_into(">I", table, 4 * i, sec)
    body = bytearray(ft + hdr + table)
    nblocks = len(bat)
    for k in range(nblocks):  # two allocated blocks: bitmap (512) + 4 KiB data each
        blk = b"\xff" * 512 + bytes([0x41 + k]) * BLOCK
        body += blk
    return bytes(body + ft)


def differencing(
    size: int,
    parent_uid: bytes,
    blocks: dict[int, tuple[bytes, bytes]],
    *,
    block: int = BLOCK,
    parent_name: str = "",
    locators: dict[bytes, str] | None = None,
    uid: bytes = bytes(range(16, 32)),
) -> bytes:
    """A differencing disk: ``blocks`` maps block -> (sector bitmap, data); locators by code."""
    entries = -(-size // block)
    table_len = -(-4 * entries // 512) * 512
    loc_data, locs = b"", []
    for code, text in (locators or {}).items():
        enc = text.encode("utf-16-le" if code in (b"W2ru", b"W2ku") else "utf-8")
        locs.append((code, 1536 + table_len + len(loc_data), len(enc)))
        loc_data += enc + bytes(-len(enc) % 512)
    bitmap_len = -(-(block // 512 // 8) // 512) * 512
    table = bytearray(b"\xff" * table_len)
    body = b""
    for idx, (bitmap, data) in sorted(blocks.items()):
        struct.pack_into(
            ">I", table, 4 * idx, (1536 + table_len + len(loc_data) + len(body)) // 512
        )
        body += bitmap.ljust(bitmap_len, b"\0") + data.ljust(block, b"\0")
    ft = footer(size, 4, 512, uid=uid)
    hdr = header(
        1536, entries, block, parent=parent_name, parent_uid=parent_uid, locators=tuple(locs)
    )
    return ft + hdr + bytes(table) + loc_data + body + ft


CORRUPT, UNSUPPORTED = "disk.corrupt_header", "disk.unsupported_format"
SNAPSHOTS = "disk.has_snapshots"


def cases() -> dict[str, tuple[bytes, dict[str, str]]]:
    dyn = dynamic()
    both_bad = bytearray(dyn)
    both_bad[64] ^= 1
    both_bad[-512 + 64] ^= 1
    return {
        "bad-cookie-fixed.vhd": (fixed(cookie=b"conectiy"), {"code": CORRUPT, "format": "vhd"}),
        "bad-checksum-fixed.vhd": (fixed(good_checksum=False), {"code": CORRUPT}),
        "bad-checksum-dynamic.vhd": (bytes(both_bad), {"code": CORRUPT}),
        "bad-size-exabytes.vhd": (bytes(SIZE) + footer(1 << 60), {"code": CORRUPT}),
        "bad-size-zero.vhd": (bytes(SIZE) + footer(0), {"code": CORRUPT}),
        "bad-size-mismatch.vhd": (bytes(SIZE) + footer(2 * SIZE), {"code": CORRUPT}),
        "bad-disk-type.vhd": (bytes(SIZE) + footer(disk_type=7), {"code": UNSUPPORTED}),
        "bad-version.vhd": (fixed(version=0x00020000), {"code": UNSUPPORTED}),
        "bad-truncated-footer.vhd": (footer()[:300], {"code": CORRUPT}),
        "bad-truncated-dynamic.vhd": (dyn[:1636], {"code": CORRUPT}),
        "bad-data-offset.vhd": (dynamic(data_offset=1 << 62), {"code": CORRUPT}),
        "bad-header-cookie.vhd": (dynamic(hdr=header(cookie=b"cxsparsX")), {"code": CORRUPT}),
        "bad-header-checksum.vhd": (dynamic(hdr=header(good_checksum=False)), {"code": CORRUPT}),
        "bad-bat-offset.vhd": (dynamic(hdr=header(table=1 << 40)), {"code": CORRUPT}),
        "bad-max-entries-small.vhd": (dynamic(hdr=header(entries=3)), {"code": CORRUPT}),
        "bad-max-entries-huge.vhd": (dynamic(hdr=header(entries=0xFFFFFFFF)), {"code": CORRUPT}),
        "bad-block-size-zero.vhd": (dynamic(hdr=header(block=0)), {"code": CORRUPT}),
        "bad-block-size-npot.vhd": (dynamic(hdr=header(block=6144)), {"code": CORRUPT}),
        "bad-block-size-huge.vhd": (dynamic(hdr=header(block=1 << 31)), {"code": CORRUPT}),
        "bad-bat-past-eof.vhd": (dynamic(bat={0: 4, 5: 1 << 20}), {"code": CORRUPT}),
        "bad-bat-into-metadata.vhd": (dynamic(bat={0: 1, 5: 13}), {"code": CORRUPT}),
        "bad-bat-overlap.vhd": (dynamic(bat={0: 4, 5: 8}), {"code": CORRUPT}),
        "bad-differencing-no-parent.vhd": (
            dynamic(disk_type=4, hdr=header(parent="C:\\vms\\no-such-parent.vhd")),
            {"code": CORRUPT, "writable_code": SNAPSHOTS},
        ),
        "bad-differencing-loop.vhd": (  # its own parent: same UUID, names itself
            dynamic(disk_type=4, hdr=header(parent="bad-differencing-loop.vhd")),
            {"code": CORRUPT, "writable_code": SNAPSHOTS},
        ),
        "bad-parent-locator.vhd": (
            dynamic(disk_type=4, hdr=header(locators=((b"W2ru", 1 << 30, 40),))),
            {"code": CORRUPT},
        ),
    }


def main() -> int:
    table = {}
    for name, (data, expect) in cases().items():
        (HERE / name).write_bytes(data)
        table[name] = expect
    (HERE / "cases.json").write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")
    print(f"wrote {len(table)} fixtures to {HERE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

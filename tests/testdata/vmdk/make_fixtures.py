"""Generate the hostile VMDK fixtures in this directory (and ``cases.json``).

Run from the repository root: ``python tests/testdata/vmdk/make_fixtures.py``.
Self-contained on purpose (struct + json only, no project code), so the fixtures do
not change when the reader changes. Each ``bad-*.vmdk`` is tiny (a 1 MiB or 2 MiB
disk) and must make ``open_vmdk`` (and ``replication disk info``) fail with the
error code recorded in ``cases.json``. Files named ``extent-*`` / ``base-*`` are
helpers referenced by a ``bad-*`` descriptor, not cases of their own.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

HERE = Path(__file__).resolve().parent
SECTOR = 512
HEADER = struct.Struct("<4sIIQQQQIQQQB4sH")
CORRUPT = "disk.corrupt_header"
UNSUPPORTED = "disk.unsupported_format"


def descriptor(name: str, sectors: int, *, cid: str = "1234abcd", parent: str = "ffffffff",
               hint: str | None = None, create_type: str = "monolithicSparse",
               extents: list[str] | None = None) -> bytes:  # fmt: skip
    lines = ["# Disk DescriptorFile", "version=1", f"CID={cid}", f"parentCID={parent}",
             f'createType="{create_type}"']  # fmt: skip
    if hint:
        lines.append(f'parentFileNameHint="{hint}"')
    lines += ["", "# Extent description"]
    lines += extents if extents is not None else [f'RW {sectors} SPARSE "{name}"']
    lines += ["", "# The Disk Data Base", "#DDB", "", 'ddb.adapterType = "ide"', ""]
    return "\n".join(lines).encode()


def sparse(name: str, capacity: int = 2048, *, grain: int = 8, ngte: int = 128,
           desc: bytes | None = None, data: dict[int, bytes] | None = None,
           **fields: int) -> bytearray:  # fmt: skip
    """A hosted sparse extent in qemu's layout; ``fields`` override header fields."""
    grains = -(-capacity // grain)
    gd_entries = -(-grains // ngte)
    gd_sectors = -(-gd_entries * 4 // SECTOR)
    gt_sectors = -(-ngte * 4 // SECTOR)
    rgd = 21
    gd = rgd + gd_sectors + gd_entries * gt_sectors
    overhead = -(-(gd + gd_sectors + gd_entries * gt_sectors) // grain) * grain
    h = {"magic": b"KDMV", "version": 1, "flags": 3, "capacity": capacity, "grain": grain,
         "desc_off": 1, "desc_size": 20, "ngte": ngte, "rgd": rgd, "gd": gd,
         "overhead": overhead, "unclean": 0, "nl": b"\n \r\n", "compress": 0}  # fmt: skip
    img = bytearray(overhead * SECTOR)
    for directory in (rgd, gd):
        tables = directory + gd_sectors
        for i in range(gd_entries):
            struct.pack_into("<I", img, directory * SECTOR + 4 * i, tables + i * gt_sectors)
    img[SECTOR : SECTOR + 20 * SECTOR] = bytes(20 * SECTOR)
    text = desc if desc is not None else descriptor(name, capacity)
    img[SECTOR : SECTOR + len(text)] = text
    for index, payload in sorted((data or {}).items()):  # allocate grains at EOF
        sector = len(img) // SECTOR
        img += payload.ljust(grain * SECTOR, b"\0")
        for directory in (rgd, gd):
            gt = struct.unpack_from("<I", img, directory * SECTOR + 4 * (index // ngte))[0]
            struct.pack_into("<I", img, gt * SECTOR + 4 * (index % ngte), sector)
    h.update(fields)
    img[: HEADER.size] = HEADER.pack(*h.values())
    return img


def gd_offset(img: bytearray) -> int:
    return struct.unpack_from("<Q", img, 56)[0] * SECTOR


def put(name: str, data: bytes | bytearray) -> None:
    (HERE / name).write_bytes(bytes(data))


def main() -> None:
    for old in HERE.glob("*.vmdk"):
        old.unlink()
    cases: dict[str, str] = {}

    def case(name: str, code: str, data: bytes | bytearray) -> None:
        put(name, data)
        cases[name] = code

    case("bad-grain-zero.vmdk", CORRUPT, _with(sparse("bad-grain-zero.vmdk"), 20, "<Q", 0))
    case("bad-grain-not-pow2.vmdk", CORRUPT, _with(sparse("bad-grain-not-pow2.vmdk"), 20, "<Q", 96))
    case("bad-grain-huge.vmdk", CORRUPT, _with(sparse("bad-grain-huge.vmdk"), 20, "<Q", 1 << 30))
    case("bad-gtes-zero.vmdk", CORRUPT, _with(sparse("bad-gtes-zero.vmdk"), 44, "<I", 0))
    case("bad-gtes-huge.vmdk", CORRUPT, _with(sparse("bad-gtes-huge.vmdk"), 44, "<I", 1 << 20))
    case("bad-capacity-exabytes.vmdk", CORRUPT,
         _with(sparse("bad-capacity-exabytes.vmdk"), 12, "<Q", 1 << 60))  # fmt: skip
    case("bad-capacity-zero.vmdk", CORRUPT, _with(sparse("bad-capacity-zero.vmdk"), 12, "<Q", 0))
    case("bad-gd-past-eof.vmdk", CORRUPT, _with(sparse("bad-gd-past-eof.vmdk"), 56, "<Q", 1 << 30))
    img = sparse("bad-gt-past-eof.vmdk")
    case("bad-gt-past-eof.vmdk", CORRUPT, _with(img, gd_offset(img), "<I", 0x7FFFFFF0))
    img = sparse("bad-gts-overlap.vmdk")
    first = struct.unpack_from("<I", img, gd_offset(img))[0]
    case("bad-gts-overlap.vmdk", CORRUPT, _with(img, gd_offset(img) + 4, "<I", first))
    img = sparse("bad-gte-past-eof.vmdk", data={3: b"data" * 100})
    gt = struct.unpack_from("<I", img, gd_offset(img))[0] * SECTOR
    case("bad-gte-past-eof.vmdk", CORRUPT, _with(img, gt + 4 * 3, "<I", 1 << 24))
    img = sparse("bad-gte-in-metadata.vmdk", data={3: b"data" * 100})
    case("bad-gte-in-metadata.vmdk", CORRUPT, _with(img, gt + 4 * 5, "<I", 2))
    case("bad-truncated.vmdk", CORRUPT, sparse("bad-truncated.vmdk")[:2048])
    img = sparse("bad-newline.vmdk")
    img[73:77] = b"\r\n\n\n"
    case("bad-newline.vmdk", CORRUPT, img)
    case("bad-version.vmdk", UNSUPPORTED, _with(sparse("bad-version.vmdk"), 4, "<I", 7))
    case("bad-flags.vmdk", UNSUPPORTED, _with(sparse("bad-flags.vmdk"), 8, "<I", 3 | 1 << 20))
    case("bad-compression.vmdk", UNSUPPORTED,
         sparse("bad-compression.vmdk", version=3, flags=0x30003, compress=7))  # fmt: skip
    case("bad-embedded-desc-size.vmdk", CORRUPT,
         _with(sparse("bad-embedded-desc-size.vmdk"), 36, "<Q", 1 << 40))  # fmt: skip
    case("bad-embedded-desc-garbage.vmdk", CORRUPT,
         sparse("x", desc=b'# Disk DescriptorFile\ncreateType="x"\n\x01\x02 bad\n'))  # fmt: skip
    case("bad-descriptor-garbage.vmdk", CORRUPT,
         b"# Disk DescriptorFile\nversion=1\nCID=1\n@@@ not a line\n\xff\xfe\n")  # fmt: skip
    case("bad-descriptor-huge.vmdk", CORRUPT,
         b"# Disk DescriptorFile\n" + b"# padding padding padding\n" * 3000)  # fmt: skip
    case("bad-descriptor-no-extents.vmdk", CORRUPT,
         descriptor("x", 2048, create_type="monolithicFlat", extents=[]))  # fmt: skip
    case("bad-descriptor-cid.vmdk", CORRUPT,
         descriptor("x", 2048, cid="zz!", create_type="monolithicFlat",
                    extents=['RW 2048 FLAT "extent-flat-1m.vmdk" 0']))  # fmt: skip
    put("extent-flat-1m.vmdk", bytes(1 << 20))
    case("bad-extent-missing.vmdk", CORRUPT,
         descriptor("x", 2048, create_type="monolithicFlat",
                    extents=['RW 2048 FLAT "../no-such-dir/extent-missing.vmdk" 0']))  # fmt: skip
    case("bad-extent-loop.vmdk", CORRUPT,
         descriptor("x", 1, create_type="monolithicFlat",
                    extents=['RW 1 FLAT "bad-extent-loop.vmdk" 0']))  # fmt: skip
    case("bad-extent-twice.vmdk", CORRUPT,
         descriptor("x", 2048, create_type="twoGbMaxExtentFlat",
                    extents=['RW 1024 FLAT "extent-flat-1m.vmdk" 0',
                             'RW 1024 FLAT "extent-flat-1m.vmdk" 1024']))  # fmt: skip
    case("bad-flat-short.vmdk", CORRUPT,
         descriptor("x", 4096, create_type="monolithicFlat",
                    extents=['RW 4096 FLAT "extent-flat-1m.vmdk" 0']))  # fmt: skip
    case("bad-extent-type.vmdk", UNSUPPORTED,
         descriptor("x", 2048, create_type="vmfsRDM",
                    extents=['RW 2048 VMFSRDM "extent-flat-1m.vmdk"']))  # fmt: skip
    put("extent-bad-magic.vmdk", _with(sparse("extent-bad-magic.vmdk", desc=b""), 0, "4s", b"KDMX"))
    case("bad-magic.vmdk", CORRUPT,
         descriptor("x", 2048, create_type="twoGbMaxExtentSparse",
                    extents=['RW 2048 SPARSE "extent-bad-magic.vmdk"']))  # fmt: skip
    put("extent-sparse-1m.vmdk", sparse("extent-sparse-1m.vmdk", desc=b""))
    case("bad-capacity-mismatch.vmdk", CORRUPT,
         descriptor("x", 4096, create_type="twoGbMaxExtentSparse",
                    extents=['RW 4096 SPARSE "extent-sparse-1m.vmdk"']))  # fmt: skip
    cowd = bytearray(4096)
    cowd[:12] = b"COWD" + struct.pack("<II", 1, 3)
    case("bad-cowd-delta.vmdk", UNSUPPORTED, cowd)
    case("bad-parent-missing.vmdk", CORRUPT,
         sparse("bad-parent-missing.vmdk",
                desc=descriptor("bad-parent-missing.vmdk", 2048, parent="0badcafe",
                                hint="no-such-parent.vmdk")))  # fmt: skip
    put("base-for-bad-parent-cid.vmdk",
        sparse("base-for-bad-parent-cid.vmdk",
               desc=descriptor("base-for-bad-parent-cid.vmdk", 2048, cid="11111111")))  # fmt: skip
    case("bad-parent-cid.vmdk", CORRUPT,
         sparse("bad-parent-cid.vmdk",
                desc=descriptor("bad-parent-cid.vmdk", 2048, parent="22222222",
                                hint="base-for-bad-parent-cid.vmdk")))  # fmt: skip
    (HERE / "cases.json").write_text(json.dumps(cases, indent=2, sort_keys=True) + "\n")


def _with(img: bytes | bytearray, offset: int, fmt: str, value: object) -> bytearray:
    out = bytearray(img)
    struct.pack_into(fmt, out, offset, value)
    return out


if __name__ == "__main__":
    main()

"""VmdkDisk without external oracles: create, write, read, extents, CID, allocation.

``sparse_table_problems`` is our own small structure checker (independent struct
parsing, no project code); the oracle tests reuse it.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import struct
import threading
from pathlib import Path

import numpy as np
import pytest

from replication.disks import create_disk, open_disk
from replication.disks.vmdk import SUBFORMATS, create_vmdk, open_vmdk
from replication.disks.vmdk import create as create_mod
from replication.disks.vmdk.descriptor import parse_descriptor
from replication.errors import (
    CorruptHeaderError,
    DiskHasSnapshotsError,
    DiskIOError,
    DiskReadOnlyError,
    OutOfRangeError,
    UnsupportedFormatError,
    UsageError,
)
from tests.helpers import MiB, qemu_check, qemu_compare, qemu_map, realistic_bytes

SECTOR = 512
GRAIN = 65536


# --- our own structure checker ------------------------------------------------------------


def sparse_table_problems(path: str | Path) -> list[str]:
    """Check a KDMV extent: GD/RGD agree, each GT equals its RGT, grains are sane."""
    data = Path(path).read_bytes()
    if data[:4] != b"KDMV":
        return ["not a sparse extent"]
    (flags,) = struct.unpack_from("<I", data, 8)
    capacity, grain = struct.unpack_from("<QQ", data, 12)
    (ngte,) = struct.unpack_from("<I", data, 44)
    rgd_off, gd_off, overhead = struct.unpack_from("<QQQ", data, 48)
    grains = -(-capacity // grain)
    n_gd = -(-grains // ngte)
    gt_bytes = -(-ngte * 4 // SECTOR) * SECTOR
    gd = struct.unpack_from(f"<{n_gd}I", data, gd_off * SECTOR)
    rgd = struct.unpack_from(f"<{n_gd}I", data, rgd_off * SECTOR) if flags & 2 else None
    problems, grains, tables = [], [], []
    for i, g in enumerate(gd):
        if rgd is not None and (g == 0) != (rgd[i] == 0):
            problems.append(f"GD[{i}]={g} but RGD[{i}]={rgd[i]}")
        if g == 0:
            continue
        gt = data[g * SECTOR : g * SECTOR + gt_bytes]
        tables.append((g * SECTOR, g * SECTOR + gt_bytes))
        if rgd is not None:
            rgt = data[rgd[i] * SECTOR : rgd[i] * SECTOR + gt_bytes]
            tables.append((rgd[i] * SECTOR, rgd[i] * SECTOR + gt_bytes))
            if gt != rgt:
                problems.append(f"GT {i} differs from its redundant GT")
        grains += [e for e in struct.unpack_from(f"<{ngte}I", gt) if e > 1]
    if len(set(grains)) != len(grains):
        problems.append("two GTEs share a grain")
    for e in grains:
        start, end = e * SECTOR, (e + grain) * SECTOR
        if e < overhead or end > len(data):
            problems.append(f"grain at sector {e} outside [overHead, EOF)")
        if any(a < end and start < b for a, b in tables):
            problems.append(f"grain at sector {e} overlaps a grain table")
    return problems


def sha_files(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def random_writes(disk, expected: bytearray, count: int, seed: int) -> set[int]:
    """Random unaligned writes, grain-spanning writes, zero writes and write_zeroes.

    Returns the indexes of the 64 KiB grains that received non-zero bytes.
    """
    rng = random.Random(seed)
    size = len(expected)
    touched: set[int] = set()
    for _ in range(count):
        off = rng.randrange(0, size - 1)
        n = min(size - off, rng.choice([1, 511, 4096, 65536, 70000, 300000, 2 * MiB + 3]))
        mode = rng.random()
        if mode < 0.15:
            disk.write_zeroes(off, n)
            buf = bytes(n)
        else:
            buf = bytes(n) if mode < 0.3 else rng.randbytes(n)
            disk.write(off, buf)
            if mode >= 0.3:
                touched.update(range(off // GRAIN, -(-(off + n) // GRAIN)))
        expected[off : off + n] = buf
    return touched


@pytest.fixture
def small_split(monkeypatch: pytest.MonkeyPatch) -> None:
    """Split twoGbMaxExtent* disks every 4 MiB, so small disks have several extents."""
    monkeypatch.setattr(create_mod, "SPLIT_SECTORS", 4 * MiB // SECTOR)


# --- create / write / read ---------------------------------------------------------------------


@pytest.mark.parametrize("subformat", SUBFORMATS)
def test_create_write_reopen_roundtrip(tmp_path: Path, subformat: str, small_split: None) -> None:
    path = str(tmp_path / "d.vmdk")
    size = 10 * MiB + 4096  # not a multiple of the grain or of the split
    expected = bytearray(size)
    with create_vmdk(path, size, subformat=subformat) as disk:
        assert disk.virtual_size == size and disk.writable
        random_writes(disk, expected, 60, seed=3)
        assert disk.read(0, size) == expected
        disk.flush()
    with open_vmdk(path) as disk:
        assert disk.read(0, size) == expected
        info = disk.info()
        assert info.format == "vmdk" and info.subformat == subformat
        assert info.virtual_size == size and info.writable and info.cid
        assert all(os.path.exists(f) for f in info.files)
    if subformat.startswith("twoGb"):
        assert len(info.files) == 1 + 3  # descriptor + 3 extents of <= 4 MiB
    for f in info.files:
        if Path(f).read_bytes()[:4] == b"KDMV":
            assert sparse_table_problems(f) == []


def test_open_disk_detects_vmdk_and_create_disk(tmp_path: Path) -> None:
    path = str(tmp_path / "d.vmdk")
    with create_disk(path, 4 * MiB, format="vmdk") as disk:
        disk.write(0, b"x" * 1000)
    with open_disk(path) as disk:
        assert disk.format_name == "vmdk" and disk.read(0, 1000) == b"x" * 1000


def test_zero_writes_never_allocate(tmp_path: Path) -> None:
    path = tmp_path / "d.vmdk"
    with create_vmdk(str(path), 8 * MiB) as disk:
        size0 = path.stat().st_size
        disk.write(0, bytes(8 * MiB))
        disk.write_zeroes(0, 8 * MiB)
        disk.write(3 * GRAIN + 17, bytes(5000))
        assert path.stat().st_size == size0
        assert disk.info().allocated_bytes == 0
        assert next(iter(disk.extents())).zero and len(list(disk.extents())) == 1
        disk.write(GRAIN + 100, b"\1" * 10)  # allocates one grain
        assert disk.info().allocated_bytes == GRAIN
        size1 = path.stat().st_size
        disk.write_zeroes(0, 4 * GRAIN)  # zeroed in place, nothing allocated
        disk.write(GRAIN, bytes(GRAIN))
        assert path.stat().st_size == size1
        assert disk.read(0, 8 * MiB) == bytes(8 * MiB)
    assert sparse_table_problems(path) == []


def test_partial_grain_write_keeps_rest_zero_and_aligns_grain(tmp_path: Path) -> None:
    path = tmp_path / "d.vmdk"
    with create_vmdk(str(path), 4 * MiB) as disk:
        disk.write(100_000, b"abc" * 1000)
        disk.flush()
        assert disk.read(GRAIN, GRAIN) == bytes(100_000 - GRAIN) + b"abc" * 1000 + bytes(
            2 * GRAIN - 103_000
        )
        grain_entries = disk.vmdk_extents[0].gte
        (sector,) = grain_entries[grain_entries > 1]
        assert int(sector) * SECTOR % GRAIN == 0
        exts = list(disk.extents())
    assert [(e.offset, e.length, e.zero) for e in exts] == [
        (0, GRAIN, True),
        (GRAIN, GRAIN, False),
        (2 * GRAIN, 4 * MiB - 2 * GRAIN, True),
    ]


def test_extents_promise_zeros(tmp_path: Path) -> None:
    path = str(tmp_path / "d.vmdk")
    size = 40 * MiB  # two grain tables
    data = realistic_bytes(size, seed=7)
    with create_vmdk(path, size) as disk:
        for off in range(0, size, 4 * MiB):
            disk.write(off, data[off : off + 4 * MiB])
    with open_vmdk(path) as disk:
        exts = list(disk.extents())
        assert exts[0].offset == 0 and exts[-1].end == size
        assert all(a.end == b.offset and a.zero != b.zero for a, b in itertools.pairwise(exts))
        for e in exts:
            chunk = data[e.offset : e.end]
            if e.zero:
                assert chunk.count(0) == len(chunk)
        # every grain that is all zeros in the data stayed unallocated
        zero_grains = sum(1 for g in range(0, size, GRAIN) if data[g : g + GRAIN].count(0) == GRAIN)
        assert disk.info().allocated_bytes == size - zero_grains * GRAIN


def test_big_write_batches_syncs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "d.vmdk")
    with create_vmdk(path, 64 * MiB) as disk:
        disk.write(0, b"warm")  # the first write also renews the CID
        disk.flush()
        calls = {"fsync": 0, "pwritev": 0}
        real_fsync, real_pwritev = os.fsync, os.pwritev

        def fsync(fd: int) -> None:
            calls["fsync"] += 1
            real_fsync(fd)

        def pwritev(fd: int, bufs, offset: int) -> int:
            calls["pwritev"] += 1
            return real_pwritev(fd, bufs, offset)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "pwritev", pwritev)
        last = os.urandom(GRAIN)
        for i in range(256):  # 256 scattered new grains, as a 1% delta sync writes them
            disk.write((400 + 2 * i) * GRAIN, last)
        assert calls["fsync"] == 0  # nothing is forced to disk before flush
        assert disk.read(910 * GRAIN, GRAIN) == last  # pending grains are readable
        head = os.urandom(16 * MiB)
        disk.write(0, head)  # 255 more new grains, one call
        disk.flush()
        assert calls["fsync"] <= 4  # grains, tables, flush, uncleanShutdown cleared
        assert calls["pwritev"] <= 8
        assert disk.read(0, 16 * MiB) == head and disk.read(910 * GRAIN, GRAIN) == last
    with open_vmdk(path) as disk:
        assert disk.read(0, 16 * MiB) == head and disk.read(910 * GRAIN, GRAIN) == last


def test_threaded_reads(tmp_path: Path) -> None:
    path = str(tmp_path / "d.vmdk")
    size = 16 * MiB
    data = realistic_bytes(size, seed=9)
    with create_vmdk(path, size) as disk:
        disk.write(0, data)
    errors: list[str] = []
    with open_vmdk(path) as disk:

        def worker(seed: int) -> None:
            rng = random.Random(seed)
            for _ in range(200):
                off = rng.randrange(size)
                n = rng.randrange(1, min(size - off, 300_000) + 1)
                if disk.read(off, n) != data[off : off + n]:
                    errors.append(f"{off}+{n}")

        threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []


def test_lazy_grain_table_allocation(tmp_path: Path) -> None:
    """A GD entry of 0 is legal: the writer appends a zeroed GT and RGT, then sets GD/RGD."""
    path = tmp_path / "d.vmdk"
    create_vmdk(str(path), 96 * MiB).close()  # three grain tables
    raw = bytearray(path.read_bytes())
    rgd_off, gd_off = struct.unpack_from("<QQ", raw, 48)
    for table in (1, 2):
        struct.pack_into("<I", raw, gd_off * SECTOR + 4 * table, 0)
        struct.pack_into("<I", raw, rgd_off * SECTOR + 4 * table, 0)
    path.write_bytes(raw)
    payload = os.urandom(3 * GRAIN)
    with open_vmdk(str(path), writable=True) as disk:
        assert disk.read(32 * MiB, GRAIN) == bytes(GRAIN)
        disk.write(32 * MiB + 10, payload)  # table 1
        disk.write(64 * MiB - 5, b"xyz" * 10)  # crosses from table 1 into table 2
    raw = path.read_bytes()
    gd = struct.unpack_from("<3I", raw, gd_off * SECTOR)
    rgd = struct.unpack_from("<3I", raw, rgd_off * SECTOR)
    assert all(gd) and all(rgd) and len(set(gd) | set(rgd)) == 6
    assert sparse_table_problems(path) == []
    with open_vmdk(str(path)) as disk:
        assert disk.read(32 * MiB + 10, len(payload)) == payload
        assert disk.read(64 * MiB - 5, 30) == b"xyz" * 10
        assert disk.read(0, 32 * MiB) == bytes(32 * MiB)


# --- CID, generation, session ------------------------------------------------------------------


def _embedded_cid(path: Path) -> str:
    return parse_descriptor(path.read_bytes()[SECTOR : 21 * SECTOR], "t").cid


def test_cid_renewed_once_per_session_and_unclean_flag(tmp_path: Path) -> None:
    path = tmp_path / "d.vmdk"
    create_vmdk(str(path), 4 * MiB).close()
    cid0 = _embedded_cid(path)
    with open_vmdk(str(path), writable=True) as disk:
        gen0 = disk.generation()
        disk.write(0, b"a")
        cid1 = _embedded_cid(path)
        assert cid1 != cid0 and disk.cid == cid1
        assert path.read_bytes()[72] == 1  # uncleanShutdown during the session
        disk.write(GRAIN * 3, b"b")
        assert _embedded_cid(path) == cid1
        disk.flush()
        assert path.read_bytes()[72] == 0
        gen1 = disk.mark_generation()
        assert gen1 != gen0 and disk.generation() == gen1 and cid1 in gen1
        disk.write(7 * GRAIN, b"pending")  # a new grain, still in memory
        assert disk.generation() is None
        disk.flush()
        gen1 = disk.mark_generation()
        assert gen1 is not None and disk.generation() == gen1
    with open_vmdk(str(path)) as disk:
        assert disk.generation() == gen1
    with open_vmdk(str(path), writable=True) as disk:
        disk.write(5, b"c")
        assert disk.generation() != gen1


def test_separate_descriptor_cid_and_long_content_id(tmp_path: Path) -> None:
    path = tmp_path / "d.vmdk"
    create_vmdk(str(path), 4 * MiB, subformat="vmfs").close()
    text = path.read_text().replace(
        "#DDB\n", '#DDB\nddb.longContentID = "00112233445566778899aabb12345678"\n'
    )
    path.write_text(text.replace(f"CID={parse_descriptor(text, 't').cid}", "CID=12345678"))
    with open_vmdk(str(path), writable=True) as disk:
        disk.write(0, b"data")
        cid = disk.cid
    desc = parse_descriptor(path.read_bytes(), "t")
    assert desc.cid == cid != "12345678"
    assert desc.fields["ddb.longContentID"] == "00112233445566778899aabb" + cid
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# --- errors --------------------------------------------------------------------------------------


def test_read_only_range_and_closed_errors(tmp_path: Path) -> None:
    path = str(tmp_path / "d.vmdk")
    create_vmdk(path, 4 * MiB).close()
    before = sha_files(tmp_path)
    disk = open_vmdk(path)
    with pytest.raises(DiskReadOnlyError):
        disk.write(0, b"x")
    with pytest.raises(DiskReadOnlyError):
        disk.write_zeroes(0, 10)
    with pytest.raises(OutOfRangeError):
        disk.read(4 * MiB - 1, 2)
    disk.close()
    disk.close()
    with pytest.raises(ValueError):
        disk.read(0, 1)
    assert sha_files(tmp_path) == before
    with create_vmdk(str(tmp_path / "w.vmdk"), 4 * MiB) as w, pytest.raises(OutOfRangeError):
        w.write(4 * MiB, b"x")


def test_create_rejects_bad_arguments(tmp_path: Path) -> None:
    path = str(tmp_path / "d.vmdk")
    with pytest.raises(UsageError):
        create_vmdk(path, 1000)
    with pytest.raises(UnsupportedFormatError):
        create_vmdk(path, MiB, subformat="streamOptimized")
    with pytest.raises(UnsupportedFormatError):
        create_vmdk(path, 4 << 40)  # monolithicSparse is limited to 2 TiB
    create_vmdk(path, MiB).close()
    with pytest.raises(DiskIOError):
        create_vmdk(path, MiB)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.vmdk"]


def test_two_gb_split_default(tmp_path: Path) -> None:
    path = tmp_path / "d.vmdk"
    size = (2 << 30) + MiB
    with create_vmdk(str(path), size, subformat="twoGbMaxExtentSparse") as disk:
        disk.write(size - 1000 - (2 << 30) + (2 << 30) - 10, b"q" * 20)
        disk.write(size - 100, b"end")
        files = disk.info().files
    desc = parse_descriptor(path.read_bytes(), "t")
    assert [e.sectors for e in desc.extents] == [(2 << 30) // SECTOR, MiB // SECTOR]
    assert [os.path.basename(f) for f in files] == ["d.vmdk", "d-s001.vmdk", "d-s002.vmdk"]
    with open_vmdk(str(path)) as disk:
        assert disk.read(size - 100, 3) == b"end"
        assert disk.read(size - 1010, 20) == b"q" * 20


def test_gte_arrays_are_uint32(tmp_path: Path) -> None:
    path = str(tmp_path / "d.vmdk")
    with create_vmdk(path, 4 * MiB) as disk:
        ext = disk.vmdk_extents[0]
        assert ext.gte.dtype == np.uint32 and ext.gd.dtype == np.uint32
        assert len(ext.gte) == 4 * MiB // GRAIN


@pytest.mark.parametrize("etype", ["VMFSSPARSE", "SESPARSE"])
def test_snapshot_extent_types(tmp_path: Path, etype: str) -> None:
    (tmp_path / "d-delta.vmdk").write_bytes(b"COWD" + bytes(4092))
    desc = tmp_path / "d-000001.vmdk"
    desc.write_text(
        f'# Disk DescriptorFile\nCID=11112222\nparentCID=ffffffff\ncreateType="vmfsSparse"\n'
        f'RW 8 {etype} "d-delta.vmdk"\n'
    )
    before = sha_files(tmp_path)
    with pytest.raises(DiskHasSnapshotsError, match="snapshot"):
        open_vmdk(str(desc), writable=True)
    with pytest.raises(UnsupportedFormatError, match="snapshot"):
        open_vmdk(str(desc))
    assert sha_files(tmp_path) == before


def test_version3_uncompressed_is_read_only(tmp_path: Path) -> None:
    path = tmp_path / "d.vmdk"
    with create_vmdk(str(path), MiB) as disk:
        disk.write(0, b"v3")
    raw = bytearray(path.read_bytes())
    struct.pack_into("<I", raw, 4, 3)
    path.write_bytes(raw)
    before = sha_files(tmp_path)
    with pytest.raises(DiskReadOnlyError, match="version 3"):
        open_vmdk(str(path), writable=True)
    with open_vmdk(str(path)) as disk:
        assert disk.read(0, 2) == b"v3"
    assert sha_files(tmp_path) == before


def test_info_of_created_disk(tmp_path: Path) -> None:
    path = tmp_path / "d.vmdk"
    with create_vmdk(str(path), 8 * MiB) as disk:
        disk.write(3 * GRAIN, b"x" * 10)
        disk.write(5 * GRAIN - 1, b"yz")  # spans two grains
        disk.flush()
        info = disk.info()
    assert info.format == "vmdk" and info.subformat == "monolithicSparse"
    assert info.grain_size == GRAIN and info.allocated_bytes == 3 * GRAIN
    assert info.virtual_size == 8 * MiB and info.parent is None
    assert info.uuid and len(info.uuid.replace("-", " ").split()) == 16
    assert info.cid == parse_descriptor(path.read_bytes()[SECTOR : 21 * SECTOR], "t").cid
    assert info.files == (str(path),) and info.writable and info.notes == ()
    assert info.to_dict()["files"] == [str(path)]


@pytest.mark.parametrize("target", ["gt", "neighbour", "half"])
def test_writable_open_refuses_overlapping_grains(tmp_path: Path, target: str) -> None:
    """A GTE pointing into a grain table or into another grain is refused for writing."""
    path = tmp_path / "d.vmdk"
    with create_vmdk(str(path), 4 * MiB) as disk:
        disk.write(0, b"a" * (2 * GRAIN))
    raw = bytearray(path.read_bytes())
    _rgd_off, gd_off = struct.unpack_from("<QQ", raw, 48)
    (gt,) = struct.unpack_from("<I", raw, gd_off * SECTOR)
    (first,) = struct.unpack_from("<I", raw, gt * SECTOR)
    value = {"gt": gt, "neighbour": first, "half": first + 64}[target]
    raw.extend(bytes(GRAIN))  # keep every pointer inside the file
    struct.pack_into("<I", raw, gt * SECTOR + 4 * 5, value)
    path.write_bytes(raw)
    before = sha_files(tmp_path)
    with pytest.raises(CorruptHeaderError):
        open_vmdk(str(path), writable=True)
    assert sha_files(tmp_path) == before


@pytest.mark.parametrize("direct", [True, False], ids=["o_direct", "buffered"])
def test_reused_grain_slots_hold_only_what_was_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct: bool
) -> None:
    """Pending grains live in reused memory (grainbuf.py): nothing of an earlier grain
    may show through, a grain written back to zeros is never allocated (D4), and
    the file is the same whether grains are appended through O_DIRECT or not."""
    from replication.disks.vmdk import allocate, grainbuf

    if not direct:
        monkeypatch.setattr(allocate, "open_direct", lambda fd: -1)
    path = tmp_path / "d.vmdk"
    size = 32 * MiB
    expected = bytearray(size)
    rng = random.Random(5)

    def put(disk, offset: int, data: bytes) -> None:
        disk.write(offset, data)
        expected[offset : offset + len(data)] = data

    with create_vmdk(str(path), size) as disk:
        put(disk, 0, rng.randbytes(64 * GRAIN))  # fills slots with random bytes
        disk.flush()  # ... which go back to the pool, warm and dirty
        assert grainbuf.POOL.free_bytes() > 0
        put(disk, 100 * GRAIN + 10, b"\x01" * 100)  # a new grain in a reused slot
        put(disk, 101 * GRAIN - 7, b"\x02" * 14)  # the end of one grain, start of next
        put(disk, 200 * GRAIN, rng.randbytes(GRAIN))
        put(disk, 200 * GRAIN, bytes(GRAIN))  # written back to zeros while pending
        put(disk, 201 * GRAIN, rng.randbytes(GRAIN))
        disk.write_zeroes(201 * GRAIN, GRAIN)  # zeroed while pending
        expected[201 * GRAIN : 202 * GRAIN] = bytes(GRAIN)
        put(disk, 202 * GRAIN + GRAIN // 2, rng.randbytes(GRAIN))  # two half grains
        assert disk.read(0, size) == expected  # pending grains read back from the slots
        ext = disk.vmdk_extents[0]
        disk.flush()
        assert (ext.direct_fd >= 0) is direct  # the path this case is about was taken
        assert disk.read(0, size) == expected
    raw = tmp_path / "expected.raw"
    raw.write_bytes(expected)
    assert qemu_compare(raw, path, "vmdk").returncode == 0
    assert qemu_check(path).returncode == 0
    # 64 grains + 100, 101 + 202, 203; never 200 nor 201 (zeros)
    allocated = {
        (e["start"] // GRAIN) + i
        for e in qemu_map(path, "vmdk")
        if e["data"] and e["depth"] == 0
        for i in range(e["length"] // GRAIN)
    }
    assert allocated == set(range(64)) | {100, 101, 202, 203}

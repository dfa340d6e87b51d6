"""VMDK reader and writer judged by external oracles: qemu-img (compare, check, map,
info) and libvmdk (Debian's python3-libvmdk through /usr/bin/python3).

Images are made by ``qemu-img convert`` from realistic content (qemu as *creator*
only), or by our ``create_vmdk``; the vmfs layout is a hand-written descriptor
beside a raw ``-flat.vmdk`` (qemu cannot create it).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from replication.disks.vmdk import create as create_mod
from replication.disks.vmdk import create_vmdk, open_vmdk
from replication.errors import CorruptHeaderError, DiskHasSnapshotsError, DiskReadOnlyError
from tests.helpers import (
    SYSTEM_PYTHON,
    MiB,
    make_raw,
    mutate_blocks,
    qemu_check,
    qemu_compare,
    qemu_convert,
    qemu_info,
    qemu_map,
    realistic_bytes,
    require,
    run,
    write_raw,
)
from tests.unit.test_vmdk_disk import random_writes, sha_files, sparse_table_problems

pytestmark = pytest.mark.oracle

SIZE = 32 * MiB
GRAIN = 65536
QEMU_SUBFORMATS = [
    "monolithicSparse",
    "twoGbMaxExtentSparse",
    "monolithicFlat",
    "twoGbMaxExtentFlat",
    "streamOptimized",
]
WRITABLE = [
    "monolithicSparse",
    "twoGbMaxExtentSparse",
    "monolithicFlat",
    "twoGbMaxExtentFlat",
    "vmfs",
]

_LIBVMDK_SHA = textwrap.dedent(
    """
    import hashlib, os, sys
    import pyvmdk
    keep = []  # libvmdk does not keep parent handles alive by itself
    def open_chain(path):
        h = pyvmdk.handle(); h.open(path); h.open_extent_data_files(); keep.append(h)
        parent = h.get_parent_filename()
        if parent:
            h.set_parent(open_chain(os.path.join(os.path.dirname(os.path.abspath(path)), parent)))
        return h
    h = open_chain(sys.argv[1])
    size, off, digest = h.get_media_size(), 0, hashlib.sha256()
    while off < size:
        n = min(4 << 20, size - off)
        digest.update(h.read_buffer_at_offset(n, off)); off += n
    print(size, digest.hexdigest())
    """
)


# --- helpers -----------------------------------------------------------------------------------


def libvmdk_read(path: Path) -> tuple[int, str]:
    """(media size, sha256 of the content) as libvmdk reads them."""
    require(SYSTEM_PYTHON)
    out = run(SYSTEM_PYTHON, "-c", _LIBVMDK_SHA, path).stdout.split()
    return int(out[0]), out[1]


def make_vmfs(raw: Path, out: Path) -> None:
    """A createType="vmfs" disk: raw ``-flat.vmdk`` plus a hand-written descriptor."""
    flat = out.with_name(out.stem + "-flat.vmdk")
    shutil.copyfile(raw, flat)
    sectors = flat.stat().st_size // 512
    out.write_text(
        '# Disk DescriptorFile\nversion=1\nencoding="UTF-8"\nCID=5eed0001\n'
        'parentCID=ffffffff\ncreateType="vmfs"\n\n# Extent description\n'
        f'RW {sectors} VMFS "{flat.name}"\n\n# The Disk Data Base\n#DDB\n\n'
        'ddb.adapterType = "lsilogic"\nddb.virtualHWVersion = "14"\n'
    )


def make_image(raw: Path, out: Path, subformat: str) -> None:
    if subformat == "vmfs":
        make_vmfs(raw, out)
    else:
        qemu_convert(raw, out, "vmdk", f"subformat={subformat}")


def extent_files(path: Path) -> list[Path]:
    return sorted(p for p in path.parent.glob(f"{path.stem}*.vmdk"))


def allocated_grains(path: Path) -> set[int]:
    """Grain indexes qemu reports as stored in this file (depth 0, data)."""
    grains = set()
    for e in qemu_map(path, "vmdk"):
        if e["data"] and e["depth"] == 0:
            start, length = int(e["start"]), int(e["length"])  # type: ignore[call-overload]
            grains.update(range(start // GRAIN, -(-(start + length) // GRAIN)))
    return grains


def judge(path: Path, expected: bytes | bytearray, tmp: Path, *, sparse: bool) -> None:
    """Every oracle must agree that ``path`` holds ``expected``."""
    exp = write_raw(tmp / "expected.raw", expected)
    info = qemu_info(path, "vmdk")
    assert info["virtual-size"] == len(expected)
    cmp = qemu_compare(exp, path, "vmdk")
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    chk = qemu_check(path)
    assert chk.returncode == 0, chk.stdout + chk.stderr
    assert libvmdk_read(path) == (len(expected), hashlib.sha256(expected).hexdigest())
    kdmv = [p for p in extent_files(path) if p.read_bytes()[:4] == b"KDMV"]
    assert bool(kdmv) == sparse
    for p in kdmv:
        assert sparse_table_problems(p) == [], p
    with open_vmdk(str(path)) as disk:
        assert disk.read(0, len(expected)) == expected


def assert_no_zero_grain_allocated(path: Path, before: set[int], nonzero: set[int]) -> None:
    """Grains we allocated (absent before) all received non-zero data from a write.

    (A grain that was given data and later zeroed stays allocated: zeros are written
    in place, never by freeing.)
    """
    new = allocated_grains(path) - before
    assert new, "the writes allocated nothing: the test proves nothing"
    assert sorted(new - nonzero) == [], "grains allocated by zero-only writes"


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytearray]:
    d = tmp_path_factory.mktemp("src")
    data = make_raw(d / "src.raw", SIZE, seed=11)
    return d / "src.raw", data


# --- reads -------------------------------------------------------------------------------------


@pytest.mark.parametrize("subformat", [*QEMU_SUBFORMATS, "vmfs"])
def test_read_matches_source(subformat: str, source, tmp_path: Path) -> None:
    raw, data = source
    path = tmp_path / "d.vmdk"
    make_image(raw, path, subformat)
    with open_vmdk(str(path)) as disk:
        assert disk.virtual_size == SIZE
        assert disk.read(0, SIZE) == data
        for off in range(12345, SIZE, 4 * MiB + 777):  # unaligned 4 MiB chunks
            n = min(4 * MiB, SIZE - off)
            assert disk.read(off, n) == data[off : off + n]
        exts = list(disk.extents())
        info = disk.info()
    assert exts[0].offset == 0 and exts[-1].end == SIZE
    for e in exts:
        if e.zero:
            assert data[e.offset : e.end].count(0) == e.length
    assert info.subformat == subformat
    assert info.writable == (subformat != "streamOptimized")
    if subformat in ("monolithicSparse", "twoGbMaxExtentSparse"):
        assert info.allocated_bytes == len(allocated_grains(path)) * GRAIN
        assert sum(e.length for e in exts if not e.zero) == info.allocated_bytes


def test_read_zeroed_grain_entries(source, tmp_path: Path) -> None:
    raw, data = source
    path = tmp_path / "z.vmdk"
    qemu_convert(raw, path, "vmdk", "subformat=monolithicSparse", "zeroed_grain=on")
    run(require("qemu-io"), "-f", "vmdk", "-c", "write -z 0 1M", "-c", "write -z 5M 256k", path)
    expected = bytearray(data)
    expected[0:MiB] = bytes(MiB)
    expected[5 * MiB : 5 * MiB + 256 * 1024] = bytes(256 * 1024)
    with open_vmdk(str(path)) as disk:
        assert int((disk.vmdk_extents[0].gte == 1).sum()) >= 16  # really zeroed-grain GTEs
        assert disk.read(0, SIZE) == expected
        assert next(iter(disk.extents())).zero
    with open_vmdk(str(path), writable=True) as disk:  # a partial write into a zeroed grain
        disk.write(GRAIN + 100, b"new data")
    expected[GRAIN + 100 : GRAIN + 108] = b"new data"
    exp = write_raw(tmp_path / "exp.raw", expected)
    assert qemu_compare(exp, path, "vmdk").returncode == 0
    assert qemu_check(path).returncode == 0


def test_read_snapshot_child_through_parent(source, tmp_path: Path) -> None:
    raw, data = source
    base, child = tmp_path / "base.vmdk", tmp_path / "child.vmdk"
    qemu_convert(raw, base, "vmdk", "subformat=monolithicSparse")
    run(require("qemu-img"), "create", "-q", "-f", "vmdk", "-b", base.name, "-F", "vmdk", child)
    run(require("qemu-io"), "-f", "vmdk", "-c", "write -P 0xab 1M 64k",
        "-c", "write -P 0xcd 100000 3000", "-c", "write -z 20M 64k", child)  # fmt: skip
    expected = bytearray(data)
    expected[MiB : MiB + GRAIN] = b"\xab" * GRAIN
    expected[100000:103000] = b"\xcd" * 3000
    expected[20 * MiB : 20 * MiB + GRAIN] = bytes(GRAIN)
    with open_vmdk(str(child)) as disk:
        assert disk.read(0, SIZE) == expected
        for e in disk.extents():
            if e.zero:
                assert expected[e.offset : e.end].count(0) == e.length
        info = disk.info()
        assert not info.writable and info.parent == "base.vmdk"
        assert any("snapshot" in n for n in info.notes)
    assert libvmdk_read(child)[1] == hashlib.sha256(expected).hexdigest()
    # the base changes behind the child's back: its CID no longer matches parentCID
    run(require("qemu-io"), "-f", "vmdk", "-c", "write -P 0x99 10M 4k", base)
    with pytest.raises(CorruptHeaderError, match="parentCID"):
        open_vmdk(str(child))


def test_stream_optimized_is_read_only_and_corrupt_grain_is_typed(
    source,
    tmp_path: Path,
) -> None:
    raw, _data = source
    path = tmp_path / "s.vmdk"
    qemu_convert(raw, path, "vmdk", "subformat=streamOptimized")
    before = sha_files(tmp_path)
    with pytest.raises(DiskReadOnlyError, match="streamOptimized"):
        open_vmdk(str(path), writable=True)
    assert sha_files(tmp_path) == before
    with open_vmdk(str(path)) as disk:
        ext = disk.vmdk_extents[0]
        sector = int(ext.gte[ext.gte > 1][0])
        grain = int((ext.gte == sector).nonzero()[0][0])
    img = bytearray(path.read_bytes())
    img[sector * 512 + 12 : sector * 512 + 40] = b"\x55" * 28  # break the zlib stream
    path.write_bytes(img)
    with open_vmdk(str(path)) as disk, pytest.raises(CorruptHeaderError):
        disk.read(grain * GRAIN, 4096)


def test_read_stream_optimized_with_footer(source, tmp_path: Path) -> None:
    """VMware style: gdOffset = GD_AT_END in the header, the real one in the footer."""
    raw, data = source
    path = tmp_path / "s.vmdk"
    qemu_convert(raw, path, "vmdk", "subformat=streamOptimized")
    img = bytearray(path.read_bytes())
    img += bytes(-len(img) % 512)
    footer = bytes(img[:512])
    img += struct.pack("<QII", 1, 0, 3).ljust(512, b"\0")  # footer marker
    img += footer + bytes(512)  # footer (header copy with the real gdOffset), EOS marker
    struct.pack_into("<Q", img, 56, 0xFFFFFFFFFFFFFFFF)
    path.write_bytes(img)
    assert qemu_compare(raw, path, "vmdk").returncode == 0  # qemu agrees the file is valid
    with open_vmdk(str(path)) as disk:
        assert disk.read(0, SIZE) == data
    img[-1024:-512] = bytes(512)  # footer gone: typed error, not a crash
    path.write_bytes(img)
    with pytest.raises(CorruptHeaderError):
        open_vmdk(str(path))


# --- writes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("subformat", WRITABLE)
def test_write_qemu_image_matches_oracles(subformat: str, source, tmp_path: Path) -> None:
    raw, data = source
    path = tmp_path / "d.vmdk"
    make_image(raw, path, subformat)
    sparse = "Sparse" in subformat
    before = allocated_grains(path) if sparse else set()
    expected = bytearray(data)
    with open_vmdk(str(path), writable=True) as disk:
        nonzero = random_writes(disk, expected, 40, seed=21)
        changed = bytearray(expected)
        for block in mutate_blocks(changed, 0.01, seed=22):  # a 1% delta sync, 64 KiB blocks
            content = changed[block * GRAIN : (block + 1) * GRAIN]
            disk.write(block * GRAIN, content)
            if content.count(0) != GRAIN:
                nonzero.add(block)
        expected = changed
        disk.flush()
    judge(path, expected, tmp_path, sparse=sparse)
    if sparse:
        assert_no_zero_grain_allocated(path, before, nonzero)


@pytest.mark.parametrize("subformat", WRITABLE)
def test_created_target_matches_oracles(
    subformat: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(create_mod, "SPLIT_SECTORS", 8 * MiB // 512)  # 3 extents for twoGb*
    size = 20 * MiB + 4096
    data = realistic_bytes(size, seed=31)
    path = tmp_path / "t.vmdk"
    nonzero = {
        g
        for g in range(-(-size // GRAIN))
        if data[g * GRAIN : (g + 1) * GRAIN].count(0) != len(data[g * GRAIN : (g + 1) * GRAIN])
    }
    with create_vmdk(str(path), size, subformat=subformat) as disk:
        for off in range(0, size, 4 * MiB):
            disk.write(off, data[off : off + 4 * MiB])
        nonzero |= random_writes(disk, data, 20, seed=32)
    assert qemu_info(path, "vmdk")["format-specific"]["data"]["create-type"] == subformat
    sparse = "Sparse" in subformat
    judge(path, data, tmp_path, sparse=sparse)
    if sparse:
        assert_no_zero_grain_allocated(path, set(), nonzero)
    # qemu can keep writing our files (all grain tables are preallocated, oracles.md 3.9)
    run(require("qemu-io"), "-f", "vmdk", "-c", "write -P 0x5a 9M 64k", path)
    data[9 * MiB : 9 * MiB + GRAIN] = b"\x5a" * GRAIN
    judge(path, data, tmp_path, sparse=sparse)


# --- snapshots ---------------------------------------------------------------------------------


@pytest.mark.parametrize("base_format", ["monolithicSparse", "twoGbMaxExtentSparse"])
def test_snapshot_chain_refused_as_target(base_format: str, source, tmp_path: Path) -> None:
    raw, _data = source
    base, child = tmp_path / "base.vmdk", tmp_path / "base-000001.vmdk"
    qemu_convert(raw, base, "vmdk", f"subformat={base_format}")
    run(require("qemu-img"), "create", "-q", "-f", "vmdk", "-b", base.name, "-F", "vmdk", child)
    before = sha_files(tmp_path)
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    with pytest.raises(DiskHasSnapshotsError) as err:
        open_vmdk(str(child), writable=True)
    assert "snapshot" in str(err.value) and "Delete All" in str(err.value)
    with pytest.raises(DiskHasSnapshotsError, match=r"base-000001\.vmdk"):
        open_vmdk(str(base), writable=True)
    assert sha_files(tmp_path) == before
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == stamps
    with open_vmdk(str(base)) as disk:  # read-only use is fine
        info = disk.info()
        assert not info.writable and any("snapshot" in n for n in info.notes)
    assert qemu_compare(raw, child, "vmdk").returncode == 0  # the chain is intact


# --- crash safety --------------------------------------------------------------------------------


def test_crash_at_any_point_leaves_old_or_new_blocks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replay every prefix of our writer's writes (and reordered windows) into copies."""
    size, block = 72 * MiB, 4096  # grain tables 0, 1 and 2
    path = tmp_path / "c.vmdk"
    with create_vmdk(str(path), size) as disk:
        disk.write(0, os.urandom(3 * GRAIN))
    raw = bytearray(path.read_bytes())
    rgd_off, gd_off = struct.unpack_from("<QQ", raw, 48)
    for i in (1, 2):  # grain tables 1 and 2 unallocated: the writer must create them
        struct.pack_into("<I", raw, gd_off * 512 + 4 * i, 0)
        struct.pack_into("<I", raw, rgd_off * 512 + 4 * i, 0)
    path.write_bytes(raw)
    initial = bytes(raw)
    with open_vmdk(str(path)) as disk:
        old = disk.read(0, size)

    ops: list[tuple[str, int, bytes]] = []
    real_pwritev, real_fsync = os.pwritev, os.fsync

    def pwritev(fd: int, bufs, offset: int) -> int:
        payload = b"".join(bytes(b) for b in bufs)
        ops.append(("w", offset, payload))
        return real_pwritev(fd, bufs, offset)

    def fsync(fd: int) -> None:
        ops.append(("s", 0, b""))
        real_fsync(fd)

    monkeypatch.setattr(os, "pwritev", pwritev)
    monkeypatch.setattr(os, "fsync", fsync)
    new = bytearray(old)
    with open_vmdk(str(path), writable=True) as disk:
        for off, n in [
            (4096, 8192),
            (40 * MiB, MiB + 8192),
            (70 * MiB - 4096, 3 * 4096),
            (5 * GRAIN, GRAIN),
        ]:
            payload = os.urandom(n)
            disk.write(off, payload)
            new[off : off + n] = payload
    monkeypatch.undo()
    old_blocks = np.frombuffer(old, np.uint8).reshape(-1, block)
    new_blocks = np.frombuffer(bytes(new), np.uint8).reshape(-1, block)
    assert sum(1 for kind, _, _ in ops if kind == "s") >= 6

    got = bytearray(size)
    states = _crash_states(initial, ops)
    assert len(states) > 20
    for label, image, barrier in states:
        path.write_bytes(image)
        with open_vmdk(str(path)) as disk:
            disk.read_into(0, got)
        blocks = np.frombuffer(got, np.uint8).reshape(-1, block)
        ok = (blocks == old_blocks).all(axis=1) | (blocks == new_blocks).all(axis=1)
        assert ok.all(), f"{label}: blocks {np.flatnonzero(~ok)[:5] * block} torn"
        if barrier:
            assert sparse_table_problems(path) == [], label
            assert qemu_check(path).returncode == 0, label
    assert got == new  # the last state is the finished session


def _crash_states(
    initial: bytes, ops: list[tuple[str, int, bytes]]
) -> list[tuple[str, bytes, bool]]:
    """Images after every prefix of the writes, plus each window's writes in reverse order."""
    states = []
    image = bytearray(initial)
    window: list[tuple[int, bytes]] = []
    for i, (kind, offset, payload) in enumerate(ops):
        if kind == "s":
            states.append((f"barrier before op {i}", bytes(image), True))
            window = []
            continue
        base = bytes(image)
        window.append((offset, payload))
        _apply(image, offset, payload)
        states.append((f"after op {i}", bytes(image), False))
        if len(window) > 1:  # the disk may persist a window's writes in any order
            reordered = bytearray(base)
            for w_off, w_payload in reversed(window[1:]):
                _apply(reordered, w_off, w_payload)
            states.append((f"window reordered at op {i}", bytes(reordered), False))
    states.append(("end", bytes(image), True))
    return states


def _apply(image: bytearray, offset: int, payload: bytes) -> None:
    if len(image) < offset:
        image.extend(bytes(offset - len(image)))
    image[offset : offset + len(payload)] = payload


# --- speed -------------------------------------------------------------------------------------


def test_read_speed_monolithic_sparse(tmp_path: Path) -> None:
    """Sequential 4 MiB reads from page cache coalesce grains into few preads."""
    size = 128 * MiB
    path = tmp_path / "p.vmdk"
    with create_vmdk(str(path), size) as disk:
        chunk = os.urandom(4 * MiB)
        for off in range(0, size, 4 * MiB):
            disk.write(off, chunk)
    buf = bytearray(4 * MiB)
    with open_vmdk(str(path)) as disk:
        for off in range(0, size, 4 * MiB):  # warm the page cache
            disk.read_into(off, buf)
        start = time.perf_counter()
        for _ in range(2):
            for off in range(0, size, 4 * MiB):
                disk.read_into(off, buf)
        rate = 2 * size / (time.perf_counter() - start)
    assert buf == chunk
    assert rate > 400e6, f"{rate / 1e6:.0f} MB/s"

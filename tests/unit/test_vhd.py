"""VHD disks: layout of new disks, reads/writes against a model, allocation order."""

from __future__ import annotations

import importlib.util
import os
import random
import shutil
import struct
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest

from replication.disks import detect_format, open_disk
from replication.disks import vhd_dynamic as vhd_dynamic_mod
from replication.disks.vhd import DynamicVhdDisk, FixedVhdDisk, create_vhd, open_vhd
from replication.errors import (
    DiskReadOnlyError,
    OutOfRangeError,
    UnsupportedFormatError,
    UsageError,
)

FIXTURES = Path(__file__).resolve().parents[1] / "testdata" / "vhd"


def _load_fixture_builder():
    spec = importlib.util.spec_from_file_location(
        "vhd_make_fixtures", FIXTURES / "make_fixtures.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


make_fixtures = _load_fixture_builder()

MiB = 1 << 20
BLOCK = 2 * MiB
TOTAL = BLOCK + 512  # bitmap + data


def is_zero(buf: bytes | bytearray) -> bool:
    return not np.frombuffer(buf, dtype=np.uint8).any()


def vhd_checksum(buf: bytes, at: int) -> int:
    return (~(sum(buf) - sum(buf[at : at + 4]))) & 0xFFFFFFFF


def footer_fields(buf: bytes) -> dict[str, object]:
    f = struct.unpack(">8sIIQI4sI4sQQHBBII16sB", buf[:85])
    return {
        "cookie": f[0],
        "version": f[2],
        "data_offset": f[3],
        "creator": f[5],
        "current_size": f[9],
        "geometry": (f[10], f[11], f[12]),
        "disk_type": f[13],
        "checksum_ok": vhd_checksum(buf[:512], 64) == f[14],
        "uid": uuid.UUID(bytes=f[15]),
    }


def on_disk_bat(path: Path) -> np.ndarray:
    """The BAT as stored in the file (not the open disk's in-memory view)."""
    data = path.read_bytes()
    (table,) = struct.unpack(">Q", data[512 + 16 : 512 + 24])
    (entries,) = struct.unpack(">I", data[512 + 28 : 512 + 32])
    return np.frombuffer(data[table : table + 4 * entries], dtype=">u4")


def tail_footer_ok(path: Path) -> bool:
    data = path.read_bytes()
    return footer_fields(data[-512:])["checksum_ok"] and data[-512:][:8] == b"conectix"


# --- new disks --------------------------------------------------------------------------


def test_create_fixed_layout(tmp_path: Path) -> None:
    p = tmp_path / "f.vhd"
    with create_vhd(str(p), 3 * MiB, subformat="fixed") as d:
        assert isinstance(d, FixedVhdDisk)
        info = d.info()
    assert p.stat().st_size == 3 * MiB + 512
    ft = footer_fields(p.read_bytes()[-512:])
    assert ft["cookie"] == b"conectix" and ft["checksum_ok"]
    assert ft["disk_type"] == 2 and ft["current_size"] == 3 * MiB
    assert ft["data_offset"] == 0xFFFFFFFFFFFFFFFF and ft["version"] == 0x00010000
    assert ft["geometry"] == (65535, 16, 255)  # makes qemu trust the current size
    assert info.uuid == str(ft["uid"]) and info.subformat == "fixed"
    assert info.extra["azure_size_ok"] is True
    with open_vhd(str(p)) as d:
        assert d.read(0, 3 * MiB) == bytes(3 * MiB)
        assert [(e.offset, e.length, e.zero) for e in d.extents()] == [(0, 3 * MiB, True)]
    assert detect_format(str(p)) == "vhd"


def test_create_dynamic_layout(tmp_path: Path) -> None:
    p = tmp_path / "d.vhd"
    with create_vhd(str(p), 5 * MiB, subformat="dynamic") as d:
        assert isinstance(d, DynamicVhdDisk)
        info = d.info()
    data = p.read_bytes()
    assert len(data) == 512 + 1024 + 512 + 512  # copy, header, BAT (3 entries, padded), footer
    assert data[:512] == data[-512:]
    ft = footer_fields(data[-512:])
    assert ft["checksum_ok"] and ft["disk_type"] == 3 and ft["data_offset"] == 512
    hdr = data[512:1536]
    assert hdr[:8] == b"cxsparse"
    assert vhd_checksum(hdr, 36) == struct.unpack(">I", hdr[36:40])[0]
    table, _ver, entries, bsize = struct.unpack(">QIII", hdr[16:36])
    assert (table, entries, bsize) == (1536, 3, BLOCK)
    assert (on_disk_bat(p) == 0xFFFFFFFF).all()
    assert info.grain_size == BLOCK and info.allocated_bytes == 0
    with open_vhd(str(p)) as d:
        assert [(e.offset, e.length, e.zero) for e in d.extents()] == [(0, 5 * MiB, True)]


def test_create_refuses_bad_arguments(tmp_path: Path) -> None:
    p = tmp_path / "x.vhd"
    with pytest.raises(UsageError):
        create_vhd(str(p), 1000)
    with pytest.raises(UsageError):
        create_vhd(str(p), 0, subformat="dynamic")
    with pytest.raises(UsageError):
        create_vhd(str(p), 4 << 40, subformat="dynamic")  # past the 2040 GiB VHD limit
    with pytest.raises(UnsupportedFormatError):
        create_vhd(str(p), MiB, subformat="differencing")
    assert not p.exists()
    create_vhd(str(p), MiB).close()
    with pytest.raises(Exception, match="exists"):
        create_vhd(str(p), MiB)


@pytest.mark.parametrize(
    ("size", "ok"), [(16 * MiB, True), (16 * MiB + 512, False), (20 * MiB + 3 * 512, False)]
)
def test_azure_size_rule_reported(tmp_path: Path, size: int, ok: bool) -> None:
    with create_vhd(str(tmp_path / "a.vhd"), size) as d:
        info = d.info()
    assert info.extra["azure_size_ok"] is ok
    if ok:
        assert "azure: size is a whole number of MiB" in info.notes
    else:
        assert (
            f"azure: size {size} is not a whole number of MiB; Azure will reject this disk"
            in info.notes
        )


# --- reads and writes against a model --------------------------------------------------


def _random_ops(d, model: bytearray, rng: random.Random, count: int) -> None:
    size = len(model)
    for _ in range(count):
        kind = rng.random()
        off = rng.randrange(0, size - 1)
        n = min(size - off, rng.choice([1, 511, 4096, 70000, BLOCK + 1234]))
        if kind < 0.6:
            data = rng.randbytes(n)
            d.write(off, data)
        elif kind < 0.8:
            data = bytes(n)
            d.write(off, data)
        else:
            data = bytes(n)
            d.write_zeroes(off, n)
        model[off : off + n] = data


def _check_against(d, model: bytearray, rng: random.Random) -> None:
    assert d.read(0, len(model)) == model
    for _ in range(20):
        off = rng.randrange(0, len(model))
        n = rng.randrange(0, len(model) - off + 1)
        assert d.read(off, n) == model[off : off + n]
    pos = 0
    for e in d.extents():
        assert e.offset == pos and e.length > 0
        if e.zero:
            assert is_zero(model[e.offset : e.end])
        pos = e.end
    assert pos == len(model)


@pytest.mark.parametrize("subformat", ["fixed", "dynamic"])
def test_random_writes_match_model_across_reopen(tmp_path: Path, subformat: str) -> None:
    size = 9 * MiB + 512 * 7  # last block partial, size not MiB-aligned
    p = tmp_path / "m.vhd"
    model = bytearray(size)
    rng = random.Random(7)
    with create_vhd(str(p), size, subformat=subformat) as d:
        _random_ops(d, model, rng, 40)
        _check_against(d, model, rng)  # before flush: reads see our writes
        d.flush()
    assert tail_footer_ok(p)
    with open_vhd(str(p), writable=True) as d:
        _check_against(d, model, rng)
        _random_ops(d, model, rng, 20)
    with open_vhd(str(p)) as d:
        _check_against(d, model, rng)


def test_zero_writes_never_allocate(tmp_path: Path) -> None:
    p = tmp_path / "z.vhd"
    with create_vhd(str(p), 8 * MiB, subformat="dynamic") as d:
        before = p.stat().st_size
        d.write(0, bytes(8 * MiB))
        d.write(3 * MiB + 5, bytes(100))
        d.write_zeroes(0, 8 * MiB)
        d.flush()
        assert p.stat().st_size == before
        assert d.info().allocated_bytes == 0
        d.write(2 * MiB + 10, b"x" * 10)  # allocates block 1 only
        d.write_zeroes(2 * MiB, 2 * MiB)  # zeroes in place, no new block
        d.write_zeroes(4 * MiB, 4 * MiB)
        d.flush()
        assert d.read(0, 8 * MiB) == bytes(8 * MiB)
    bat = on_disk_bat(p)
    assert [i for i in range(4) if bat[i] != 0xFFFFFFFF] == [1]
    assert p.stat().st_size == before + TOTAL


def test_partial_block_write_pads_block_with_zeros(tmp_path: Path) -> None:
    p = tmp_path / "pad.vhd"
    with create_vhd(str(p), 4 * MiB, subformat="dynamic") as d:
        d.write(BLOCK - 3, b"abcdef")  # spans blocks 0 and 1
    with open_vhd(str(p)) as d:
        got = d.read(0, 4 * MiB)
    assert got[BLOCK - 3 : BLOCK + 3] == b"abcdef"
    assert got.count(0) == 4 * MiB - 6
    data = p.read_bytes()
    bat = on_disk_bat(p)
    for b in (0, 1):
        start = int(bat[b]) * 512
        assert data[start : start + 512] == b"\xff" * 512  # sector bitmap all ones


def test_unflushed_allocations_leave_a_valid_file(tmp_path: Path) -> None:
    """Before flush the file ends in a footer and the on-disk BAT is untouched."""
    p = tmp_path / "c.vhd"
    d = create_vhd(str(p), 32 * MiB, subformat="dynamic")
    for b in range(0, 16, 3):
        d.write(b * BLOCK + 4096, b"\x01" * 8192)
    crash = tmp_path / "crash.vhd"
    shutil.copyfile(p, crash)  # what a crash before flush could leave at most
    assert tail_footer_ok(crash)
    assert (on_disk_bat(crash) == 0xFFFFFFFF).all()
    with open_vhd(str(crash)) as c:  # opens cleanly, new blocks still unreferenced
        assert c.read(0, 32 * MiB) == bytes(32 * MiB)
    d.flush()
    bat = on_disk_bat(p)
    assert sorted(i for i in range(16) if bat[i] != 0xFFFFFFFF) == list(range(0, 16, 3))
    # the reserved space was cut off again: the file is exactly metadata + blocks + footer
    assert p.stat().st_size == 2048 + 6 * TOTAL + 512
    assert tail_footer_ok(p)
    d.close()


def test_allocation_syncs_are_batched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "s.vhd"
    calls = []
    real = os.fsync
    d = create_vhd(str(p), 128 * MiB, subformat="dynamic")
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd)))
    for b in range(64):
        d.write(b * BLOCK + 512, b"\x02" * 4096)
    during = len(calls)
    d.flush()
    d.close()
    assert during <= 8, f"{during} fsyncs while allocating 64 blocks"
    assert len(calls) <= during + 4
    with open_vhd(str(p)) as d2:
        assert d2.info().extra["allocated_blocks"] == 64


def test_many_pending_blocks_commit_without_flush(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(vhd_dynamic_mod, "_COMMIT_AFTER", 4)
    p = tmp_path / "a.vhd"
    with create_vhd(str(p), 32 * MiB, subformat="dynamic") as d:
        for b in range(10):
            d.write(b * BLOCK, b"\x03" * 512)
        bat = on_disk_bat(p)  # before flush/close
        assert int(np.count_nonzero(bat != 0xFFFFFFFF)) == 8
        assert tail_footer_ok(p)


def test_close_commits_pending_blocks(tmp_path: Path) -> None:
    p = tmp_path / "cl.vhd"
    with create_vhd(str(p), 8 * MiB, subformat="dynamic") as d:
        d.write(5 * MiB, b"z" * 100)
    with open_vhd(str(p)) as d:
        assert d.read(5 * MiB, 100) == b"z" * 100


def test_concurrent_reads(tmp_path: Path) -> None:
    p = tmp_path / "t.vhd"
    rng = random.Random(3)
    model = bytearray(16 * MiB)
    with create_vhd(str(p), len(model), subformat="dynamic") as d:
        _random_ops(d, model, rng, 30)
    errors: list[str] = []
    with open_vhd(str(p)) as d:

        def reader(seed: int) -> None:
            r = random.Random(seed)
            for _ in range(50):
                off = r.randrange(0, len(model))
                n = r.randrange(0, min(3 * MiB, len(model) - off) + 1)
                if d.read(off, n) != model[off : off + n]:
                    errors.append(f"{off}+{n}")

        threads = [threading.Thread(target=reader, args=(s,)) for s in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []


# --- sector bitmaps ---------------------------------------------------------------------


def test_sector_bitmap_zero_bits_read_as_zeros_and_writes_normalise(tmp_path: Path) -> None:
    p = tmp_path / "bm.vhd"
    with create_vhd(str(p), 4 * MiB, subformat="dynamic") as d:
        d.write(0, b"\x07" * BLOCK)
    start = int(on_disk_bat(p)[0]) * 512
    with open(p, "r+b") as f:  # clear the bits of sectors 8..15 and 100
        f.seek(start + 1)
        f.write(b"\x00")
        f.seek(start + 12)
        f.write(bytes([0xFF & ~(0x80 >> 4)]))
    model = bytearray(b"\x07" * BLOCK + bytes(BLOCK))
    model[8 * 512 : 16 * 512] = bytes(8 * 512)
    model[100 * 512 : 101 * 512] = bytes(512)
    with open_vhd(str(p), writable=True) as d:
        assert d.read(0, 4 * MiB) == model
        assert d.read(9 * 512 + 7, 1000) == bytes(1000)
        d.write(10 * 512 + 3, b"new")  # inside a 0-bit sector
        model[10 * 512 + 3 : 10 * 512 + 6] = b"new"
        assert d.read(0, 4 * MiB) == model
    data = p.read_bytes()
    assert data[start : start + 512] == b"\xff" * 512  # bitmap made all ones
    assert data[start + 512 : start + 512 + BLOCK] == model[:BLOCK]  # 0-bit sectors zeroed
    with open_vhd(str(p)) as d:
        assert d.read(0, 4 * MiB) == model


# --- refusals, errors, damaged files ----------------------------------------------------


def test_range_readonly_and_closed(tmp_path: Path) -> None:
    p = tmp_path / "r.vhd"
    create_vhd(str(p), 2 * MiB, subformat="dynamic").close()
    size_before = p.stat().st_size
    with open_vhd(str(p)) as d:
        with pytest.raises(DiskReadOnlyError):
            d.write(0, b"x")
        with pytest.raises(OutOfRangeError):
            d.read(2 * MiB - 1, 2)
    with open_vhd(str(p), writable=True) as d:
        with pytest.raises(OutOfRangeError):
            d.write(2 * MiB, b"x")
        with pytest.raises(OutOfRangeError):
            d.write_zeroes(-1, 2)
    assert p.stat().st_size == size_before
    d.close()  # idempotent
    with pytest.raises(ValueError):
        d.read(0, 1)


def test_fixed_writes_never_touch_footer(tmp_path: Path) -> None:
    p = tmp_path / "f.vhd"
    with create_vhd(str(p), MiB) as d:
        footer = p.read_bytes()[-512:]
        d.write(MiB - 4, b"\xee" * 4)
        with pytest.raises(OutOfRangeError):
            d.write(MiB - 4, b"\xee" * 5)
    data = p.read_bytes()
    assert data[-512:] == footer and data[MiB - 4 : MiB] == b"\xee" * 4


def test_damaged_trailing_footer_uses_copy_and_is_repaired(tmp_path: Path) -> None:
    p = tmp_path / "dmg.vhd"
    good = make_fixtures.dynamic()
    p.write_bytes(good[:-512] + b"\x00" * 512)  # e.g. an interrupted append by another tool
    with open_vhd(str(p)) as d:
        assert any("copy at offset 0" in n for n in d.info().notes)
        assert d.read(0, 4096) == b"A" * 4096 and d.read(5 * 4096, 4096) == b"B" * 4096
    with open_vhd(str(p), writable=True):
        pass
    assert tail_footer_ok(p)
    with open_vhd(str(p)) as d:
        assert not any("copy at offset 0" in n for n in d.info().notes)
        assert d.read(5 * 4096, 4096) == b"B" * 4096


def test_small_block_fixture_reads(tmp_path: Path) -> None:
    """The fixture builder's valid base disk (4 KiB blocks) reads as built."""
    p = tmp_path / "ok.vhd"
    p.write_bytes(make_fixtures.dynamic())
    with open_disk(str(p)) as d:
        assert isinstance(d, DynamicVhdDisk)
        want = bytearray(64 * 1024)
        want[0:4096] = b"A" * 4096
        want[5 * 4096 : 6 * 4096] = b"B" * 4096
        assert d.read(0, len(want)) == want
        assert [(e.offset, e.zero) for e in d.extents()] == [
            (0, False),
            (4096, True),
            (5 * 4096, False),
            (6 * 4096, True),
        ]


def test_generation_changes_on_write(tmp_path: Path) -> None:
    p = tmp_path / "g.vhd"
    with create_vhd(str(p), 4 * MiB, subformat="dynamic") as d:
        d.flush()
        g1 = d.mark_generation()
        assert g1 is not None and g1 == d.generation()
        d.write(0, b"q")
        d.flush()
        assert d.generation() != g1

"""``replication.verify``: two disks, or a disk and a recovery point, block for block.

What is proven here: the verdict and the reported ranges are exact for any window
size and across formats; a block written while the first pass read it (a write in
flight) is not reported, a block that stays different is; holes are not read; the
memory of a comparison does not grow with a disk's claimed size; a manifest store
is read, never created, and a verify beside its running owner (a master target
writing its next point) removes and writes nothing in it.
"""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from replication import verify as verify_mod
from replication.disks import create_disk, open_disk
from replication.errors import ManifestError, ManifestNotFoundError, UsageError
from replication.hashmap import HashMap
from replication.history import VolumeHistory
from replication.manifest import ManifestStore
from replication.verify import (
    VerifyOptions,
    verify_disks,
    verify_manifest,
    verify_manifest_path,
    verify_paths,
)
from tests.helpers import MiB, mutate_blocks, realistic_bytes

BS = 65536
SIZE = 6 * MiB
FAST = VerifyOptions(recheck_delay=0.0)


def make_disk(path: Path, data: bytes | bytearray, fmt: str = "raw") -> Path:
    """Create a disk of ``fmt`` holding ``data``; zero blocks stay unallocated."""
    sub = "dynamic" if fmt == "vhd" else None
    with create_disk(str(path), len(data), format=fmt, subformat=sub) as disk:
        for off in range(0, len(data), BS):
            chunk = bytes(data[off : off + BS])
            if chunk.count(0) != len(chunk):
                disk.write(off, chunk)
        disk.flush()
    return path


def expected_ranges(indexes: list[int]) -> list[tuple[int, int]]:
    runs: list[list[int]] = []
    for i in sorted(indexes):
        if runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1][1] += 1
        else:
            runs.append([i, 1])
    return [(a, n) for a, n in runs]


@pytest.fixture(scope="module")
def content() -> bytes:
    return bytes(realistic_bytes(SIZE, seed=41))


@pytest.mark.parametrize(("src_fmt", "tgt_fmt"), [("raw", "vmdk"), ("vhd", "raw"), ("vmdk", "vhd")])
def test_equal_disks_of_any_format_are_equal(tmp_path, content, src_fmt, tgt_fmt):
    src = make_disk(tmp_path / f"s.{src_fmt}", content, src_fmt)
    tgt = make_disk(tmp_path / f"t.{tgt_fmt}", content, tgt_fmt)
    report = verify_paths(str(src), str(tgt), FAST)
    assert report.equal and report.blocks_differing == report.first_pass_blocks == 0
    assert report.compared_bytes == SIZE and report.blocks_compared == SIZE // BS


@pytest.mark.parametrize("window_blocks", [1, 3, 7, 1000])
def test_differences_are_reported_exactly_for_any_window(tmp_path, content, window_blocks):
    changed = bytearray(content)
    picked = mutate_blocks(changed, 0.15, seed=43)
    changed[40 * BS : 44 * BS] = os.urandom(4 * BS)  # a run across window boundaries
    picked = sorted(set(picked) | {40, 41, 42, 43})
    src = make_disk(tmp_path / "s.raw", content)
    tgt = make_disk(tmp_path / "t.vmdk", changed, "vmdk")
    options = VerifyOptions(recheck_delay=0.0, window_bytes=window_blocks * BS)
    report = verify_paths(str(src), str(tgt), options)
    assert not report.equal
    assert report.blocks_differing == report.first_pass_blocks == len(picked)
    assert [(r.first, r.blocks) for r in report.ranges] == expected_ranges(picked)
    assert report.ranges_total == len(report.ranges)
    for r in report.ranges:
        assert (r.offset, r.length) == (r.first * BS, r.blocks * BS)


def test_a_short_last_block_and_a_larger_or_smaller_target(tmp_path, content):
    data = content[: SIZE - 1536]  # not a whole number of blocks
    src = make_disk(tmp_path / "s.raw", data)
    bigger = make_disk(tmp_path / "big.raw", data + bytes(3 * BS))
    report = verify_paths(str(src), str(bigger), FAST)
    assert report.equal and report.extra_bytes == 3 * BS and report.missing_bytes == 0
    smaller = make_disk(tmp_path / "small.raw", data[: 40 * BS])
    report = verify_paths(str(src), str(smaller), FAST)
    assert not report.equal and report.blocks_differing == 0
    assert report.missing_bytes == len(data) - 40 * BS and report.compared_bytes == 40 * BS
    last = bytearray(data)
    last[-1] ^= 1
    report = verify_paths(str(src), str(make_disk(tmp_path / "l.raw", last)), FAST)
    (r,) = report.ranges
    assert (r.first, r.blocks, r.offset + r.length) == (len(data) // BS, 1, len(data))


def test_a_write_in_flight_is_rechecked_not_reported(tmp_path, content, monkeypatch):
    """The replication writes block 9 to the target after the first pass read it."""
    stale = bytearray(content)
    stale[9 * BS : 10 * BS] = os.urandom(BS)
    stale[30 * BS] ^= 0xFF  # really different: stays reported
    src = make_disk(tmp_path / "s.raw", content)
    tgt = make_disk(tmp_path / "t.raw", stale)
    real = verify_mod.compute_maps

    def first_pass_then_catch_up(*args, **kwargs):
        maps = real(*args, **kwargs)
        with open_disk(str(tgt), writable=True) as disk:
            disk.write(9 * BS, content[9 * BS : 10 * BS])
        return maps

    monkeypatch.setattr(verify_mod, "compute_maps", first_pass_then_catch_up)
    report = verify_paths(str(src), str(tgt), VerifyOptions(recheck_delay=0.05))
    assert report.first_pass_blocks == 2
    assert report.blocks_differing == 1 and [r.first for r in report.ranges] == [30]
    assert report.seconds >= 0.05  # the re-check waited
    # without re-checks the block in flight is reported
    with open_disk(str(tgt), writable=True) as disk:
        disk.write(9 * BS, stale[9 * BS : 10 * BS])
    report = verify_paths(str(src), str(tgt), VerifyOptions(rechecks=0))
    assert [r.first for r in report.ranges] == [9, 30]


@pytest.mark.parametrize("fresh", [True, False])
def test_grains_a_writer_allocates_meanwhile_are_seen_by_the_recheck(
    tmp_path, content, monkeypatch, fresh
):
    """A live sparse VMDK: its grain tables are read at open, so re-checks reopen it."""
    src = make_disk(tmp_path / "s.raw", content)
    lagging = bytearray(content)
    lagging[12 * BS : 14 * BS] = bytes(2 * BS)  # not yet replicated: holes in the VMDK
    tgt = make_disk(tmp_path / "t.vmdk", lagging, "vmdk")
    real = verify_mod.compute_maps

    def first_pass_then_the_master_target_writes(*args, **kwargs):
        maps = real(*args, **kwargs)
        with open_disk(str(tgt), writable=True) as disk:  # new grains, new grain entries
            disk.write(12 * BS, content[12 * BS : 14 * BS])
        return maps

    monkeypatch.setattr(verify_mod, "compute_maps", first_pass_then_the_master_target_writes)
    if fresh:  # verify_paths: each re-check round opens both disks again
        report = verify_paths(str(src), str(tgt), FAST)
        assert report.first_pass_blocks == 2 and report.equal
    else:  # long-lived handles keep the tables of their open: the new grains stay holes
        with open_disk(str(src)) as s, open_disk(str(tgt)) as t:
            report = verify_disks(s, t, FAST)
        assert report.blocks_differing == 2


def test_recheck_compares_bytes_and_runs_every_round(tmp_path, content, monkeypatch):
    changed = bytearray(content)
    changed[5 * BS : 8 * BS] = bytes(3 * BS)
    src = make_disk(tmp_path / "s.raw", content)
    tgt = make_disk(tmp_path / "t.raw", changed)
    rounds = []
    real = verify_mod._DiskPair.__call__

    def counting(self, indexes):
        rounds.append(indexes.tolist())
        return real(self, indexes)

    monkeypatch.setattr(verify_mod._DiskPair, "__call__", counting)
    report = verify_paths(str(src), str(tgt), VerifyOptions(rechecks=3, recheck_delay=0.0))
    assert rounds == [[5, 6, 7]] * 3
    assert report.blocks_differing == 3


def test_ranges_are_truncated_but_every_block_counted(tmp_path, content):
    changed = bytearray(content)
    for i in range(0, SIZE // BS, 2):
        changed[i * BS] ^= 1
    src = make_disk(tmp_path / "s.raw", content)
    tgt = make_disk(tmp_path / "t.raw", changed)
    report = verify_paths(str(src), str(tgt), VerifyOptions(recheck_delay=0, max_ranges=3))
    assert [r.first for r in report.ranges] == [0, 2, 4]
    assert report.ranges_total == report.blocks_differing == SIZE // BS // 2
    assert report.ranges_truncated and report.to_dict()["ranges_truncated"]


def test_holes_are_not_read(tmp_path):
    size = 512 * MiB
    for name in ("s.raw", "t.raw"):
        with create_disk(str(tmp_path / name), size) as disk:
            disk.write(300 * MiB, b"data" * 1000)
    with open_disk(str(tmp_path / "s.raw")) as s, open_disk(str(tmp_path / "t.raw")) as t:
        read = []
        for d in (s, t):
            real = d.read_into
            d.read_into = lambda off, buf, real=real: read.append(len(buf)) or real(off, buf)
        options = VerifyOptions(recheck_delay=0, window_bytes=16 * MiB)
        assert verify_disks(s, t, options).equal
    assert sum(read) <= 2 * MiB  # one block, and the short gaps hashing reads around it


def test_memory_does_not_grow_with_a_claimed_size(tmp_path):
    """A 100-byte descriptor claims 1 TiB of zeros: windows keep the maps small."""
    for name in ("a.vmdk", "b.vmdk"):
        (tmp_path / name).write_text(
            "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n"
            'createType="monolithicFlat"\nRW 2147483648 ZERO\n'
        )
    tracemalloc.start()
    try:
        report = verify_paths(str(tmp_path / "a.vmdk"), str(tmp_path / "b.vmdk"), FAST)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert report.equal and report.compared_bytes == 1 << 40
    # one window's two maps: 2 x 1 MiB of digests (whole-disk maps would be 2 x 256 MiB)
    assert peak < 16 * MiB, peak


@pytest.mark.parametrize(
    "options",
    [
        VerifyOptions(block_size=1000),
        VerifyOptions(rechecks=-1),
        VerifyOptions(workers=0),
        VerifyOptions(window_bytes=BS + 1),
    ],
)
def test_bad_options_are_usage_errors(tmp_path, content, options):
    src = make_disk(tmp_path / "s.raw", content[:BS])
    with pytest.raises(UsageError):
        verify_paths(str(src), str(src), options)


# --- against a recovery point's manifest ----------------------------------------------


def history_with_a_point(tmp_path: Path, content: bytes):
    """A master-target-like layout: DATA/history/VOL/{journal,manifests}, one point."""
    vol = make_disk(tmp_path / "vol.raw", content)
    disk = open_disk(str(vol), writable=True)
    history = VolumeHistory(tmp_path / "data" / "history" / "vol", "vol", disk, BS)
    return vol, disk, history


def test_a_disk_equals_its_point_and_later_writes_differ(tmp_path, content):
    vol, disk, history = history_with_a_point(tmp_path, content)
    try:
        point = history.add_point("crash")
        store = str(tmp_path / "data" / "history" / "vol" / "manifests")
        # verified while the history (journal lock and all) is open: the owner runs
        report = verify_manifest_path(str(vol), store, point.manifest_root, FAST)
        assert report.equal and report.mode == "manifest"
        assert report.blocks_compared == SIZE // BS and report.target.endswith(point.manifest_root)
        history.before_write(disk, 7 * BS, 100)
        disk.write(7 * BS, b"n" * 100)
        history.after_write(7 * BS, b"n" * 100, disk.read)
        disk.flush()
        report = verify_manifest_path(str(vol), store, point.manifest_root, FAST)
        assert [(r.first, r.blocks) for r in report.ranges] == [(7, 1)]
        # the point restored into a new disk is equal to it again
        out = create_disk(str(tmp_path / "out.vmdk"), SIZE, format="vmdk")
        history.journal.restore_into(point, disk, out)
        out.close()
        assert verify_manifest_path(str(tmp_path / "out.vmdk"), store, point.manifest_root).equal
    finally:
        history.close()
        disk.close()


def test_manifest_mismatch_is_rechecked(tmp_path, content, monkeypatch):
    vol = make_disk(tmp_path / "vol.raw", content)
    store = ManifestStore(tmp_path / "m")
    with open_disk(str(vol)) as d:
        root = store.commit(HashMap.compute(d, BS).digests, BS, SIZE)
    original = content[3 * BS : 4 * BS]
    with open_disk(str(vol), writable=True) as d:
        d.write(3 * BS, os.urandom(BS))  # in flight: put back after the first pass
    real = ManifestStore.verify_disk

    def first_pass_then_put_back(self, *args, **kwargs):
        runs = real(self, *args, **kwargs)
        with open_disk(str(vol), writable=True) as d:
            d.write(3 * BS, original)
        return runs

    monkeypatch.setattr(ManifestStore, "verify_disk", first_pass_then_put_back)
    with open_disk(str(vol)) as d:
        report = verify_manifest(d, store, root, FAST)
    assert report.first_pass_blocks == 1 and report.equal


def test_a_disk_smaller_than_the_manifest_differs(tmp_path, content):
    store = ManifestStore(tmp_path / "m")
    with open_disk(str(make_disk(tmp_path / "a.raw", content))) as d:
        root = store.commit(HashMap.compute(d, BS).digests, BS, SIZE)
    small = make_disk(tmp_path / "b.raw", content[: SIZE - BS])
    report = verify_manifest_path(str(small), str(tmp_path / "m"), root, FAST)
    assert not report.equal and report.missing_bytes == BS


def test_a_store_is_opened_never_created(tmp_path, content):
    vol = make_disk(tmp_path / "vol.raw", content[:BS])
    with pytest.raises(ManifestError, match="not a manifest store"):
        verify_manifest_path(str(vol), str(tmp_path / "typo"), "0" * 64)
    assert not (tmp_path / "typo").exists()
    ManifestStore(tmp_path / "m")
    with pytest.raises(ManifestNotFoundError):
        verify_manifest_path(str(vol), str(tmp_path / "m"), "0" * 64)
    with pytest.raises(UsageError):
        verify_manifest_path(str(vol), str(tmp_path / "m"), "0" * 63 + "G")


def test_opening_a_store_beside_its_owner_does_not_break_its_commit(tmp_path, monkeypatch):
    """verify opens the store while its owner's next point is written but not renamed."""
    vol = make_disk(tmp_path / "vol.raw", bytes(SIZE))
    owner = ManifestStore(tmp_path / "m")
    first = owner.commit(HashMap.empty(SIZE, BS).digests, BS, SIZE)
    changed = HashMap.empty(SIZE, BS)
    changed.digests[5] = np.frombuffer(b"x" * 16, dtype=changed.digests.dtype)[0]
    objects = tmp_path / "m" / "objects"
    real_replace = os.replace
    seen = []

    def verify_runs_meanwhile(src, dst, *args, **kwargs):
        # the owner has written and fsynced its temporary file; a verifier starts now
        seen.append(sorted(p.name for p in objects.iterdir()))
        report = verify_manifest_path(str(vol), str(tmp_path / "m"), first, FAST)
        assert report.equal
        assert sorted(p.name for p in objects.iterdir()) == seen[-1]  # nothing removed
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", verify_runs_meanwhile)
    second = owner.commit(changed.digests, BS, SIZE, parent=first)
    monkeypatch.undo()
    assert any(name.endswith(".tmp") for name in seen[0])  # the write in flight was there
    assert owner.exists(second) and owner.load(second).digests[5] == changed.digests[5]


def test_a_read_only_store_creates_removes_and_writes_nothing(tmp_path):
    with pytest.raises(ManifestError, match="not a manifest store"):
        ManifestStore.open_read_only(tmp_path / "typo")
    assert not (tmp_path / "typo").exists()
    owner = ManifestStore(tmp_path / "m")
    root = owner.commit(HashMap.empty(SIZE, BS).digests, BS, SIZE)
    leftover = tmp_path / "m" / "objects" / ".left.tmp"
    leftover.write_bytes(b"an interrupted write")
    reader = ManifestStore.open_read_only(tmp_path / "m")
    assert leftover.exists() and reader.exists(root) and reader.roots() == [root]
    assert reader.load(root).digests.tobytes() == HashMap.empty(SIZE, BS).digests.tobytes()
    with pytest.raises(ManifestError, match="read-only"):
        reader.commit(HashMap.empty(SIZE, BS).digests, BS, SIZE + BS)
    with pytest.raises(ManifestError, match="read-only"):
        reader.gc([])
    assert sorted(p.name for p in (tmp_path / "m" / "objects").iterdir()) == [".left.tmp", root]
    ManifestStore(tmp_path / "m")  # the owner's open removes its leftovers
    assert not leftover.exists()


def test_report_to_dict_is_json_ready(tmp_path, content):
    import json

    src = make_disk(tmp_path / "s.raw", content)
    record = json.loads(json.dumps(verify_paths(str(src), str(src), FAST).to_dict()))
    assert record["equal"] is True and record["ranges"] == []
    assert set(record) >= {"mode", "block_size", "blocks_differing", "missing_bytes"}
    assert np.int64(record["blocks_compared"]) == SIZE // BS

"""Sync between raw images: correctness, minimal writes, dry run, kept maps."""

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replication.disks import open_disk
from replication.errors import DiskSizeMismatchError, UsageError
from replication.sync import SyncOptions, sync_disks, sync_paths
from tests.helpers import mutate_blocks, realistic_bytes, write_raw

BS = 65536


def make_pair(tmp_path, size=128 * BS, fraction=0.05, seed=1):
    src = realistic_bytes(size, seed=seed)
    tgt = bytearray(src)
    changed = mutate_blocks(src, fraction, seed=seed + 1)
    return write_raw(tmp_path / "src.raw", src), write_raw(tmp_path / "tgt.raw", tgt), changed


def test_sync_makes_target_equal_and_moves_only_changed_blocks(tmp_path):
    src, tgt, changed = make_pair(tmp_path)
    report = sync_paths(str(src), str(tgt))
    assert tgt.read_bytes() == src.read_bytes()
    assert report.blocks_differing == len(changed)
    assert report.bytes_written + report.bytes_zeroed == len(changed) * BS
    assert report.target_map == "computed"
    assert 0 < report.bytes_wire < report.bytes_written + report.bytes_zeroed + 16 * 128 + 4096


def test_dry_run_changes_nothing(tmp_path):
    src, tgt, changed = make_pair(tmp_path)
    before = tgt.read_bytes()
    stat_before = os.stat(tgt)
    report = sync_paths(str(src), str(tgt), SyncOptions(dry_run=True))
    assert tgt.read_bytes() == before
    assert os.stat(tgt).st_mtime_ns == stat_before.st_mtime_ns
    assert report.dry_run and report.blocks_differing == len(changed)
    assert report.bytes_written == 0


def test_second_sync_trusts_kept_map_and_reads_only_source(tmp_path):
    src, tgt, _ = make_pair(tmp_path)
    sync_paths(str(src), str(tgt))
    data = bytearray(src.read_bytes())
    data[5 * BS : 5 * BS + 10] = b"0123456789"
    write_raw(src, data)
    report = sync_paths(str(src), str(tgt))
    assert report.target_map == "cached"
    assert report.blocks_differing == 1
    assert tgt.read_bytes() == bytes(data)


def test_kept_map_is_distrusted_after_a_foreign_write(tmp_path):
    src, tgt, _ = make_pair(tmp_path)
    sync_paths(str(src), str(tgt))
    with open(tgt, "r+b") as f:  # someone else writes the target right after our sync
        f.seek(9 * BS)
        f.write(b"intruder")
    report = sync_paths(str(src), str(tgt))
    assert report.target_map == "computed"
    assert report.blocks_differing == 1
    assert tgt.read_bytes() == src.read_bytes()


def test_verify_ignores_kept_map(tmp_path):
    src, tgt, _ = make_pair(tmp_path)
    sync_paths(str(src), str(tgt))
    report = sync_paths(str(src), str(tgt), SyncOptions(use_map_cache=False))
    assert report.target_map == "computed" and report.blocks_differing == 0


def test_bigger_target_keeps_its_tail(tmp_path):
    src_data = realistic_bytes(10 * BS + 300, seed=4)
    tail = os.urandom(3 * BS)
    tgt_data = bytes(10 * BS + 300) + tail
    src = write_raw(tmp_path / "s", src_data)
    tgt = write_raw(tmp_path / "t", tgt_data)
    sync_paths(str(src), str(tgt))
    out = tgt.read_bytes()
    assert out[: len(src_data)] == bytes(src_data)
    assert out[len(src_data) :] == tail


def test_smaller_target_is_refused_and_untouched(tmp_path):
    src = write_raw(tmp_path / "s", realistic_bytes(4 * BS, seed=5))
    tgt = write_raw(tmp_path / "t", bytes(3 * BS))
    with pytest.raises(DiskSizeMismatchError):
        sync_paths(str(src), str(tgt))
    assert tgt.read_bytes() == bytes(3 * BS)


def test_same_file_is_refused(tmp_path):
    src = write_raw(tmp_path / "s", realistic_bytes(4 * BS, seed=5))
    with pytest.raises(UsageError):
        sync_paths(str(src), str(src))


def test_zero_blocks_leave_holes_in_a_sparse_raw_target(tmp_path):
    src = tmp_path / "s"
    with open(src, "wb") as f:
        f.truncate(64 * BS)
    tgt = write_raw(tmp_path / "t", bytes(64 * BS))
    report = sync_paths(str(src), str(tgt))
    assert report.blocks_differing == 0 and report.bytes_written == 0
    assert os.stat(tgt).st_blocks == 0


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    size=st.integers(min_value=1, max_value=40 * 4096),
    writes=st.lists(
        st.tuples(st.integers(0, 40 * 4096), st.binary(min_size=1, max_size=9000)), max_size=8
    ),
    block_size=st.sampled_from([4096, 8192, 65536]),
)
def test_target_equals_source_after_any_writes(tmp_path, size, writes, block_size):
    src_data = bytearray(realistic_bytes(size, seed=size))
    tgt_data = bytes(src_data)
    for off, blob in writes:
        off = min(off, size - 1)
        blob = blob[: size - off]
        src_data[off : off + len(blob)] = blob
    s = write_raw(tmp_path / "hs", src_data)
    t = write_raw(tmp_path / "ht", tgt_data)
    # random content could look like a VMDK descriptor or a VHD footer: say it is raw
    with (
        open_disk(str(s), format="raw") as ds,
        open_disk(str(t), writable=True, format="raw") as dt,
    ):
        sync_disks(ds, dt, SyncOptions(block_size=block_size, use_map_cache=False))
    assert t.read_bytes() == bytes(src_data)

"""Changed-block tracking: marks, epochs, eviction, restarts, trust, threads, fsync count."""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path

import numpy as np
import pytest

from replication import tracking
from replication.disks import create_disk
from replication.errors import (
    EpochError,
    OutOfRangeError,
    TrackingBrokenError,
    TrackingBusyError,
    UsageError,
)
from replication.tracking import (
    STATE_FILE,
    DirtyTracker,
    TrackedDisk,
    TrustReason,
    dirty_blocks,
    read_state,
)

BS = 4096
EXTENT = 8 * BS  # 8 blocks per extent: the smallest geometry allowed
SIZE = 64 * EXTENT  # 512 blocks, 64 extents
ID = "disk-1"


def open_tracker(path: Path, **kw) -> tuple[DirtyTracker, tracking.TrustState]:
    opts = {"disk_id": ID, "size": SIZE, "block_size": BS, "extent_size": EXTENT, "al_slots": 4}
    return DirtyTracker.open(path, **(opts | kw))


def trusted_tracker(path: Path, **kw) -> DirtyTracker:
    """A tracker past its initial full resync (a missing state is untrusted until then)."""
    t, trust = open_tracker(path, **kw)
    if not trust.trusted:
        with t.begin_epoch() as epoch:
            assert epoch.full_resync
            epoch.commit()
    return t


def recovered(path: Path, **kw) -> tuple[tracking.TrustState, set[int]]:
    """What a reopen would find, without touching the file."""
    trust, bits = read_state(path, disk_id=ID, size=SIZE, block_size=BS, **kw)
    return trust, set() if bits is None else set(dirty_blocks(bits).tolist())


def blocks(first: int, last: int) -> set[int]:
    return set(range(first, last + 1))


def extent_blocks(*extents: int) -> set[int]:
    return set().union(*(blocks(x * 8, x * 8 + 7) for x in extents))


# --- marking ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offset", "length", "expected"),
    [
        (0, 1, blocks(0, 0)),
        (BS - 1, 2, blocks(0, 1)),
        (3 * BS, BS, blocks(3, 3)),
        (5, 20 * BS, blocks(0, 20)),
        (SIZE - 1, 1, blocks(511, 511)),
        (0, SIZE, blocks(0, 511)),
    ],
)
def test_mark_sets_exactly_the_touched_blocks(tmp_path, offset, length, expected) -> None:
    t = trusted_tracker(tmp_path / "s", al_slots=64)
    t.mark(offset, length)
    assert set(t.begin_epoch().blocks().tolist()) == expected


def test_mark_checks_the_range_and_ignores_empty_writes(tmp_path) -> None:
    t = trusted_tracker(tmp_path / "s")
    with pytest.raises(OutOfRangeError):
        t.mark(SIZE - 1, 2)
    with pytest.raises(OutOfRangeError):
        t.mark(-1, 1)
    t.mark(SIZE, 0)
    assert t.statistics().dirty_blocks == 0


def test_a_short_last_block_is_tracked(tmp_path) -> None:
    size = SIZE - 100
    t, _ = DirtyTracker.open(tmp_path / "s", disk_id=ID, size=size, block_size=BS)
    t.begin_epoch().commit()
    t.mark(size - 1, 1)
    t.close()
    _, bits = read_state(tmp_path / "s", disk_id=ID, size=size, block_size=BS)
    assert dirty_blocks(bits).tolist() == [511]


def test_bad_geometry_is_refused(tmp_path) -> None:
    with pytest.raises(UsageError):
        open_tracker(tmp_path / "s", extent_size=4 * BS)  # extents must be whole bytes of bits
    with pytest.raises(UsageError):
        open_tracker(tmp_path / "s", block_size=1000)
    with pytest.raises(UsageError):
        open_tracker(tmp_path / "s", disk_id="")


# --- epochs -----------------------------------------------------------------------------


def test_epoch_takes_the_set_and_later_marks_go_to_the_next(tmp_path) -> None:
    t = trusted_tracker(tmp_path / "s")
    t.mark(0, BS)
    epoch = t.begin_epoch()
    t.mark(10 * BS, BS)
    assert epoch.blocks().tolist() == [0] and epoch.count() == 1
    assert list(epoch.runs(16)) == [(0, 1)]
    epoch.commit()
    assert t.begin_epoch().blocks().tolist() == [10]


def test_commit_clears_durably_and_abort_gives_back(tmp_path) -> None:
    path = tmp_path / "s"
    t = trusted_tracker(path)
    t.mark(0, BS)
    t.mark(BS, BS)
    epoch = t.begin_epoch()
    epoch.abort()
    epoch = t.begin_epoch()
    assert epoch.blocks().tolist() == [0, 1]
    t.mark(20 * BS, BS)
    epoch.commit()
    t.close()
    trust, dirty = recovered(path)
    assert trust.reason == TrustReason.CLEAN and dirty == {20}


def test_a_crash_before_commit_keeps_the_epoch_dirty(tmp_path) -> None:
    path = tmp_path / "s"
    t = trusted_tracker(path, al_slots=1)
    t.mark(0, BS)
    t.mark(9 * EXTENT, BS)  # evicts extent 0: its bit now lives in the AL record only
    epoch = t.begin_epoch()
    t.mark(20 * EXTENT, BS)  # evicts extent 9 while its bit is in flight
    t.abandon()
    trust, dirty = recovered(path)
    assert trust.reason == TrustReason.RECOVERED
    assert {0, 72} <= dirty and set(epoch.blocks().tolist()) <= dirty


def test_a_crash_after_commit_keeps_only_hot_extents(tmp_path) -> None:
    path = tmp_path / "s"
    t = trusted_tracker(path, al_slots=1)
    t.mark(0, BS)
    t.mark(9 * EXTENT, BS)
    t.begin_epoch().commit()
    t.abandon()
    _, dirty = recovered(path)
    assert dirty == extent_blocks(9)  # extent 0 was cleared, extent 9 is still hot


def test_one_epoch_at_a_time_and_each_ends_once(tmp_path) -> None:
    t = trusted_tracker(tmp_path / "s")
    epoch = t.begin_epoch()
    with pytest.raises(EpochError):
        t.begin_epoch()
    epoch.commit()
    with pytest.raises(EpochError):
        epoch.commit()
    with pytest.raises(EpochError):
        epoch.abort()


def test_leaving_an_epoch_block_without_commit_aborts_it(tmp_path) -> None:
    t = trusted_tracker(tmp_path / "s")
    t.mark(0, BS)
    with pytest.raises(RuntimeError), t.begin_epoch():
        raise RuntimeError("transfer failed")
    assert t.begin_epoch().blocks().tolist() == [0]


def test_the_epoch_bitmap_is_a_snapshot(tmp_path) -> None:
    t = trusted_tracker(tmp_path / "s")
    t.mark(0, BS)
    epoch = t.begin_epoch()
    epoch.commit()
    assert epoch.blocks().tolist() == [0]
    assert not epoch.bitmap.flags.writeable


# --- the activity log -------------------------------------------------------------------


def test_eviction_writes_the_extent_bits_not_the_whole_extent(tmp_path) -> None:
    path = tmp_path / "s"
    t = trusted_tracker(path, al_slots=2)
    t.mark(BS, BS)  # extent 0, block 1
    t.mark(EXTENT, BS)  # extent 1
    t.mark(2 * EXTENT, BS)  # extent 2: evicts extent 0
    assert t.statistics().evictions == 1
    t.abandon()
    trust, dirty = recovered(path)
    assert trust.trusted
    assert dirty == {1} | extent_blocks(1, 2)


def test_log_is_folded_into_a_checkpoint(tmp_path) -> None:
    path = tmp_path / "s"
    t = trusted_tracker(path, al_slots=2, checkpoint_records=3)
    before = t.statistics().checkpoints
    for x in range(10):
        t.mark(x * EXTENT, BS)
    stats = t.statistics()
    assert stats.checkpoints - before == 3 and stats.activations == 10
    size = path.stat().st_size
    t.abandon()
    assert size < 400  # a checkpoint plus at most three records
    _, dirty = recovered(path)
    assert {x * 8 for x in range(10)} <= dirty


def test_hot_marks_do_not_fsync(tmp_path, monkeypatch) -> None:
    t = trusted_tracker(tmp_path / "s", al_slots=4)
    calls: list[int] = []
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        calls.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    t.mark(0, BS)
    assert len(calls) == 1  # the AL record that makes extent 0 hot
    for i in range(1000):
        t.mark(i % 8 * BS, BS)
    assert len(calls) == 1
    for x in range(1, 4):
        t.mark(x * EXTENT, 10)
    assert len(calls) == 4  # one per newly hot extent
    t.mark(4 * EXTENT, 10)  # AL full: evicting extent 0 costs one fsync, not more
    assert len(calls) == 5
    assert t.statistics().fsyncs == 5


# --- restarts and trust -----------------------------------------------------------------


def test_clean_restart_is_exact(tmp_path) -> None:
    path = tmp_path / "s"
    t = trusted_tracker(path)
    for offset in (0, 7 * EXTENT + BS, SIZE - BS):
        t.mark(offset, BS)
    t.close()
    t.close()  # idempotent
    t, trust = open_tracker(path)
    assert trust.trusted and trust.reason == "clean"
    assert t.begin_epoch().blocks().tolist() == [0, 57, 511]


def test_unclean_restart_is_a_superset(tmp_path) -> None:
    path = tmp_path / "s"
    t = trusted_tracker(path)
    t.mark(3 * BS, BS)
    t.abandon()
    t, trust = open_tracker(path)
    assert trust.trusted and trust.reason == "recovered"
    assert set(t.begin_epoch().blocks().tolist()) == extent_blocks(0)


def test_missing_state_is_untrusted_until_a_full_resync_commits(tmp_path) -> None:
    path = tmp_path / "s"
    t, trust = open_tracker(path)
    assert not trust.trusted and trust.reason == TrustReason.MISSING
    t.mark(0, BS)
    epoch = t.begin_epoch()
    assert epoch.full_resync
    t.abandon()  # crash during the resync: it must be done again
    t, trust = open_tracker(path)
    assert not trust.trusted and trust.reason == TrustReason.MISSING
    t.begin_epoch().abort()
    t.close()
    t, trust = open_tracker(path)
    assert trust.reason == TrustReason.MISSING
    epoch = t.begin_epoch()
    epoch.commit()
    assert t.trust.trusted and t.trust.reason == TrustReason.RESYNCED
    assert not t.begin_epoch().full_resync
    t.close()
    assert open_tracker(path)[1].reason == TrustReason.CLEAN


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"disk_id": "disk-2"}, TrustReason.OTHER_DISK),
        ({"size": SIZE * 2}, TrustReason.GEOMETRY_CHANGED),
        ({"block_size": 2 * BS, "extent_size": 2 * EXTENT}, TrustReason.GEOMETRY_CHANGED),
        ({"untracked_writes": True}, TrustReason.UNTRACKED_WRITES),
    ],
)
def test_identity_mismatch_is_untrusted_with_a_reason(tmp_path, change, reason) -> None:
    path = tmp_path / "s"
    t = trusted_tracker(path)
    t.mark(0, BS)
    t.close()
    t, trust = open_tracker(path, **change)
    assert not trust.trusted and trust.reason == reason and trust.detail
    assert t.statistics().dirty_blocks == 0  # nothing carried over from a foreign state
    t.close()
    assert open_tracker(path, **change)[1].reason == reason  # persisted until resynced


def test_a_changed_generation_after_a_clean_close_is_untracked_writes(tmp_path) -> None:
    path = tmp_path / "s"
    trusted_tracker(path).close(disk_generation="g2")
    t, trust = open_tracker(path, disk_generation="g2")
    assert trust.reason == TrustReason.CLEAN
    t.abandon()
    t, trust = open_tracker(path, disk_generation="g3")  # an unclean stop cannot tell
    assert trust.reason == TrustReason.RECOVERED
    t.close(disk_generation="g3")
    assert open_tracker(path, disk_generation="g4")[1].reason == TrustReason.UNTRACKED_WRITES


@pytest.mark.parametrize("where", ["magic", "version", "disk_id", "bitmap", "checksum", "short"])
def test_a_corrupt_state_is_untrusted_and_kept_aside(tmp_path, where) -> None:
    path = tmp_path / "s"
    t = trusted_tracker(path)
    t.mark(0, SIZE)
    t.close()
    data = bytearray(path.read_bytes())
    offset = {"magic": 0, "version": 4, "disk_id": 56, "bitmap": 70, "checksum": -1}
    if where == "short":
        del data[40:]
    else:
        data[offset[where]] ^= 0x10
    path.write_bytes(bytes(data))
    t, trust = open_tracker(path)
    assert not trust.trusted and trust.reason == TrustReason.CORRUPT, trust
    assert (tmp_path / "s.corrupt").read_bytes() == bytes(data)
    t.mark(0, BS)  # the new state tracks from now on
    t.close()
    assert open_tracker(path)[1].reason == TrustReason.CORRUPT


def test_a_second_tracker_on_the_same_state_is_refused(tmp_path) -> None:
    t, _ = open_tracker(tmp_path / "s")
    with pytest.raises(TrackingBusyError):
        open_tracker(tmp_path / "s")
    t.close()
    open_tracker(tmp_path / "s")[0].close()


def test_a_failed_fsync_breaks_the_tracker(tmp_path, monkeypatch) -> None:
    path = tmp_path / "s"
    t = trusted_tracker(path)
    t.mark(0, BS)

    def failing_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(TrackingBrokenError):
        t.mark(EXTENT, BS)
    monkeypatch.undo()
    with pytest.raises(TrackingBrokenError):
        t.mark(0, BS)  # even a hot extent: nothing is certain any more
    t.close()  # writes nothing
    t, trust = open_tracker(path)
    assert trust.reason == TrustReason.RECOVERED
    assert 0 in set(t.begin_epoch().blocks().tolist())


def test_closed_tracker_refuses_marks(tmp_path) -> None:
    t = trusted_tracker(tmp_path / "s")
    t.close()
    with pytest.raises(ValueError):
        t.mark(0, 1)


# --- threads ----------------------------------------------------------------------------


def test_concurrent_marks_and_epochs_lose_nothing(tmp_path) -> None:
    path = tmp_path / "s"
    t = trusted_tracker(path, al_slots=3, checkpoint_records=20)
    marked: list[set[int]] = [set() for _ in range(6)]
    stop = threading.Event()

    def writer(i: int) -> None:
        rng = random.Random(i)
        for _ in range(100):
            # Mostly within six extents: hot hits, evictions and re-activations all happen.
            span = SIZE if rng.random() < 0.1 else 6 * EXTENT
            offset = rng.randrange(span - 3 * BS)
            length = rng.randrange(1, 3 * BS)
            t.mark(offset, length)
            marked[i] |= blocks(offset // BS, (offset + length - 1) // BS)

    taken: set[int] = set()

    def replicator() -> None:
        while not stop.is_set():
            epoch = t.begin_epoch()
            taken.update(epoch.blocks().tolist())
            epoch.commit()
            stop.wait(0.002)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(6)]
    rep = threading.Thread(target=replicator)
    rep.start()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    stop.set()
    rep.join()
    last = t.begin_epoch()
    taken.update(last.blocks().tolist())
    assert taken == set().union(*marked)
    t.abandon()
    _, dirty = recovered(path)
    assert set(last.blocks().tolist()) <= dirty


# --- the disk wrapper -------------------------------------------------------------------


def test_tracked_disk_marks_writes_and_restarts_clean(tmp_path) -> None:
    image, state = tmp_path / "disk.raw", tmp_path / "state"
    create_disk(str(image), SIZE).close()
    with TrackedDisk.open(str(image), state, block_size=BS) as d:
        assert d.trust.reason == TrustReason.MISSING
        with d.tracker.begin_epoch() as epoch:
            epoch.commit()  # the initial full resync
        d.write(BS, b"x" * 10)
        d.write_zeroes(10 * BS, 2 * BS)
        assert d.read(BS, 3) == b"xxx"
        with pytest.raises(OutOfRangeError):
            d.write(SIZE, b"y")
        assert d.info().format == "raw" and d.virtual_size == SIZE
    with TrackedDisk.open(str(image), state, block_size=BS) as d:
        assert d.trust.reason == TrustReason.CLEAN
        assert d.tracker.begin_epoch().blocks().tolist() == [1, 10, 11]


def test_a_write_while_untracked_is_noticed(tmp_path) -> None:
    image, state = tmp_path / "disk.raw", tmp_path / "state"
    create_disk(str(image), SIZE).close()
    with TrackedDisk.open(str(image), state, block_size=BS) as d:
        d.tracker.begin_epoch().commit()
    with TrackedDisk.open(str(image), state, block_size=BS) as d:
        assert d.trust.reason == TrustReason.CLEAN
    with open(image, "r+b") as f:  # someone writes while the agent is stopped
        f.write(b"z")
    with TrackedDisk.open(str(image), state, block_size=BS) as d:
        assert d.trust.reason == TrustReason.UNTRACKED_WRITES


def test_tracked_disk_marks_durably_before_writing(tmp_path) -> None:
    image, state = tmp_path / "disk.raw", tmp_path / "state"
    create_disk(str(image), SIZE).close()
    d = TrackedDisk.open(str(image), state, block_size=BS, disk_id=ID)
    d.tracker.begin_epoch().commit()  # the initial full resync
    inner_write = d.disk.write
    seen: list[set[int]] = []

    def spying_write(offset: int, data: memoryview) -> None:
        seen.append(recovered(state / STATE_FILE)[1])  # what a crash right now would find
        inner_write(offset, data)

    d.disk.write = spying_write  # type: ignore[method-assign]
    d.write(5 * EXTENT, b"a")
    assert 40 in seen[0]
    d.close()


def test_a_write_in_flight_at_begin_epoch_stays_dirty(tmp_path) -> None:
    image, state = tmp_path / "disk.raw", tmp_path / "state"
    create_disk(str(image), SIZE).close()
    d = TrackedDisk.open(str(image), state, block_size=BS)
    epochs = []
    inner_write = d.disk.write

    def racing_write(offset: int, data: memoryview) -> None:
        # The replicator takes the set (and may read the old content) mid-write.
        epochs.append(d.tracker.begin_epoch())
        inner_write(offset, data)

    d.disk.write = racing_write  # type: ignore[method-assign]
    d.write(3 * BS, b"new")
    assert epochs[0].blocks().tolist() == [3]
    epochs[0].commit()
    assert d.tracker.begin_epoch().blocks().tolist() == [3]  # read again next epoch
    d.close()


def test_dirty_blocks_of_a_large_sparse_bitmap() -> None:
    bits = np.zeros((2 << 40) // (64 << 10) // 8, dtype=np.uint8)  # 2 TiB at 64 KiB: 4 MiB
    bits[[0, 1000, len(bits) - 1]] = [0x81, 0x02, 0x80]
    assert dirty_blocks(bits).tolist() == [0, 7, 8001, len(bits) * 8 - 1]

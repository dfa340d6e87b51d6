"""The retention journal: points, undo against a reference model, retention, crash safety."""

from __future__ import annotations

import errno
import importlib.util
import itertools
import json
import os
import random
import shutil
import struct
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replication import journal as jmod
from replication.disks import create_disk
from replication.errors import (
    ERRORS_BY_CODE,
    JournalBusyError,
    JournalCorruptError,
    JournalDiskFullError,
    JournalError,
    PointNotFoundError,
    ReplicationError,
    UsageError,
)
from replication.hashmap import HashMap
from replication.journal import Journal, PointInfo
from replication.manifest import ManifestStore

ROOT = "ab" * 32
VOLUME = "vol1"
GOLDEN = Path(__file__).resolve().parents[1] / "testdata" / "journal"
CASES: dict[str, dict[str, object]] = json.loads((GOLDEN / "cases.json").read_text())


class Clock:
    """An injectable clock: seconds since the epoch, moved by hand."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def open_journal(path: Path, clock: Clock | None = None, **kw: object) -> Journal:
    kw.setdefault("retention_bytes", 1 << 30)
    return Journal.open(path, volume=VOLUME, clock=clock or Clock(), **kw)  # type: ignore[arg-type]


class Model:
    """A volume as a bytearray, journaled like the master target would do it."""

    def __init__(self, journal: Journal, size: int = 65536) -> None:
        self.journal = journal
        self.data = bytearray(size)
        self.snapshots: dict[int, bytes] = {}

    def write(self, offset: int, new: bytes) -> None:
        for start, length in self.journal.uncovered(offset, len(new)):
            self.journal.record_undo(start, self.data[start : start + length])
        self.journal.sync()  # rule J1: undo durable before the volume write
        self.data[offset : offset + len(new)] = new

    def point(self, kind: str = "crash", **kw: str) -> PointInfo:
        p = self.journal.add_point(kind, manifest_root=ROOT, **kw)
        self.snapshots[p.id] = bytes(self.data)
        return p


def undo_image(journal: Journal, live: bytes, point: PointInfo | int) -> bytes:
    img = bytearray(live)
    for rec in journal.undo_records_after(point):
        img[rec.offset : rec.offset + len(rec.data)] = rec.data
    return bytes(img)


def change_image(journal: Journal, live: bytes, point: PointInfo | int) -> bytes:
    img = bytearray(live)
    for offset, data in journal.image_changes(point):
        img[offset : offset + len(data)] = data
    return bytes(img)


def random_writes(model: Model, rng: random.Random, count: int) -> None:
    size = len(model.data)
    for _ in range(count):
        offset = rng.randrange(size)
        length = min(rng.randrange(1, 6000), size - offset)
        model.write(offset, rng.randbytes(length))


# --- points ------------------------------------------------------------------------------


def test_find_by_every_spec(tmp_path: Path) -> None:
    clock = Clock(1_764_072_000.0)  # 2025-11-25T12:00:00Z
    with open_journal(tmp_path, clock) as j:
        kinds = ["crash", "app", "crash", "crash", "app", "crash"]
        points = []
        for i, kind in enumerate(kinds):
            points.append(j.add_point(kind, manifest_root=ROOT, tag=f"t{i % 2}", group=f"g{i}"))
            clock.now += 300
        assert j.points() == points
        assert j.find("latest") == points[5]
        assert j.find("latest-app") == points[4]
        assert j.find("latest-crash") == points[5]
        assert j.find(points[2].id) == points[2]
        assert j.find(str(points[2].id)) == j.find(f"id:{points[2].id}") == points[2]
        assert j.find("group:g3") == points[3]
        assert j.find("tag:t0") == points[4]
        # a time: the latest point at or before it
        assert j.find(points[1].time) == points[1]
        assert j.find(points[1].time + 299.0) == points[1]
        assert j.find(datetime.fromtimestamp(points[3].time + 1, UTC)) == points[3]
        assert j.find("2025-11-25T12:05:30+00:00") == points[1]
        for missing in (points[0].time - 1, 10**9, "group:nope", "tag:nope"):
            with pytest.raises(PointNotFoundError):
                j.find(missing)
        with pytest.raises(UsageError):
            j.find("yesterday")
        with pytest.raises(UsageError):
            j.find(True)


def test_point_fields_survive_reopen_and_clock_never_goes_back(tmp_path: Path) -> None:
    clock = Clock()
    with open_journal(tmp_path, clock) as j:
        a = j.add_point("app", manifest_root=ROOT, tag="sql", group="cut-1")
        clock.now -= 3600  # the clock stepped back
        b = j.add_point("crash", manifest_root="cd" * 32)
    assert b.time_ns == a.time_ns
    with open_journal(tmp_path, clock) as j:
        assert j.points() == [a, b]
        assert (a.kind, a.tag, a.group, a.manifest_root) == ("app", "sql", "cut-1", ROOT)


def test_add_point_validates(tmp_path: Path) -> None:
    with open_journal(tmp_path) as j:
        for kw in (
            {"kind": "snapshot", "manifest_root": ROOT},
            {"kind": "crash", "manifest_root": "AB" * 32},
            {"kind": "crash", "manifest_root": ROOT, "tag": "x" * 256},
        ):
            with pytest.raises(UsageError):
                j.add_point(**kw)


def test_a_group_cut_is_found_in_every_volume(tmp_path: Path) -> None:
    journals = [
        Journal.open(tmp_path / name, volume=name, retention_bytes=1 << 20) for name in ("a", "b")
    ]
    for j in journals:
        j.add_point("crash", manifest_root=ROOT)
        j.add_point("app", manifest_root=ROOT, group="cut-42", tag="nightly")
        j.add_point("crash", manifest_root=ROOT)
    assert [j.find("group:cut-42").tag for j in journals] == ["nightly", "nightly"]
    for j in journals:
        j.close()


# --- undo against a reference model -------------------------------------------------------

write_op = st.tuples(st.integers(0, 65535), st.integers(1, 9000), st.integers(0, 2**32))
step = st.one_of(write_op, st.sampled_from(["crash", "app", "reopen"]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(step, min_size=1, max_size=30))
def test_undo_restores_every_point_exactly(steps: list) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        j = open_journal(path, segment_bytes=8192)
        model = Model(j)
        model.point()
        for s in steps:
            if s == "reopen":
                j.close()
                j = model.journal = open_journal(path, segment_bytes=8192)
            elif isinstance(s, str):
                model.point(s)
            else:
                offset, length, seed = s
                length = min(length, len(model.data) - offset)
                model.write(offset, random.Random(seed).randbytes(length))
        for pid, snapshot in model.snapshots.items():
            assert undo_image(j, model.data, pid) == snapshot
            assert change_image(j, model.data, pid) == snapshot
        j.close()


def test_uncovered_journals_a_range_once_per_point(tmp_path: Path) -> None:
    with open_journal(tmp_path) as j:
        j.add_point("crash", manifest_root=ROOT)
        assert j.uncovered(100, 50) == [(100, 50)]
        j.record_undo(100, bytes(50))
        j.record_undo(300, bytes(10))
        assert j.uncovered(0, 400) == [(0, 100), (150, 150), (310, 90)]
        assert j.uncovered(120, 10) == []
        j.add_point("crash", manifest_root=ROOT)
        assert j.uncovered(100, 50) == [(100, 50)]


def test_preserve_reads_only_what_is_not_journaled(tmp_path: Path) -> None:
    disk = create_disk(str(tmp_path / "v.raw"), 1 << 20)
    disk.write(0, b"\x01" * (1 << 20))
    reads: list[tuple[int, int]] = []
    original = disk.read

    def counting_read(offset: int, length: int) -> bytes:
        reads.append((offset, length))
        return original(offset, length)

    disk.read = counting_read  # type: ignore[method-assign]
    with open_journal(tmp_path / "j") as j:
        j.add_point("crash", manifest_root=ROOT)
        assert j.preserve(disk, 4096, 8192) == 8192
        assert j.preserve(disk, 0, 16384) == 8192  # [0, 4096) and [12288, 16384)
        assert reads == [(4096, 8192), (0, 4096), (12288, 4096)]
    disk.close()


def test_large_ranges_are_split_and_zeros_compress(tmp_path: Path) -> None:
    with open_journal(tmp_path) as j:
        j.add_point("crash", manifest_root=ROOT)
        before = j.statistics().bytes
        lsn = j.record_undo(0, bytes(10 << 20))  # 10 MiB of zeros: three records
        assert lsn == 4
        assert j.statistics().bytes - before < 4096
        records = list(j.undo_records_after(1))
        assert [(r.offset, len(r.data)) for r in records] == [
            (8 << 20, 2 << 20),
            (4 << 20, 4 << 20),
            (0, 4 << 20),
        ]


def test_restore_into_a_copy_and_verify_its_manifest(tmp_path: Path) -> None:
    """Journal + manifest end to end: a restored copy hashes to the point's root."""
    size, bs = 1 << 20, 65536
    live = create_disk(str(tmp_path / "live.raw"), size)
    store = ManifestStore(tmp_path / "manifests", leaf_digests=4, fanout=2)
    rng = random.Random(5)
    expected: dict[int, bytes] = {}
    parent = None
    with open_journal(tmp_path / "j", segment_bytes=16384) as j:
        for _ in range(4):
            for _ in range(6):
                offset = rng.randrange(size - 70000)
                data = rng.randbytes(rng.randrange(1, 70000))
                j.preserve(live, offset, len(data))
                j.sync()
                live.write(offset, data)
            live.flush()
            root = store.commit(HashMap.compute(live, bs).digests, bs, size, parent=parent)
            parent = root
            point = j.add_point("crash", manifest_root=root)
            expected[point.id] = live.read(0, size)
        for _ in range(5):  # writes after the last point
            j.preserve(live, 1000, 5000)
            j.sync()
            live.write(1000, rng.randbytes(5000))
        for p in j.points():
            out = create_disk(str(tmp_path / f"p{p.id}.raw"), size)
            j.restore_into(p, live, out)
            assert out.read(0, size) == expected[p.id]
            assert store.verify_disk(out, p.manifest_root) == []
            out.close()
    live.close()


# --- in-place rollback ---------------------------------------------------------------------


def build_volume(tmp_path: Path) -> tuple[Journal, Model, object]:
    disk = create_disk(str(tmp_path / "live.raw"), 65536)
    j = open_journal(tmp_path / "j", segment_bytes=4096)
    model = Model(j)
    rng = random.Random(9)
    model.point()
    for kind in ("crash", "app", "crash"):
        random_writes(model, rng, 8)
        model.point(kind)
    random_writes(model, rng, 8)
    disk.write(0, bytes(model.data))
    disk.flush()
    return j, model, disk


def test_rollback_in_place_discards_later_points(tmp_path: Path) -> None:
    j, model, disk = build_volume(tmp_path)
    target = j.points()[1]
    j.rollback(target, disk)
    assert disk.read(0, 65536) == model.snapshots[target.id]
    kept = j.points()
    assert len(kept) == 2 and j.find("latest") == target
    # the journal goes on from the point, across a reopen
    model.data = bytearray(model.snapshots[target.id])
    random_writes(model, random.Random(3), 5)
    later = model.point()
    assert j.points() == [*kept, later]
    j.close()
    j = model.journal = open_journal(tmp_path / "j", segment_bytes=4096)
    for p in j.points():
        assert undo_image(j, model.data, p) == model.snapshots[p.id]
    j.close()
    disk.close()


def test_a_crashed_rollback_must_be_finished(tmp_path: Path, monkeypatch) -> None:
    j, model, disk = build_volume(tmp_path)
    target = j.points()[0]

    def crash() -> None:
        raise OSError(errno.EIO, "power cut")

    monkeypatch.setattr(disk, "flush", crash)  # volume half rolled back, records intact
    with pytest.raises(OSError):
        j.rollback(target, disk)
    monkeypatch.undo()
    j._close_active()  # the process died: its descriptors and lock go with it
    j._unlock()
    j = open_journal(tmp_path / "j", segment_bytes=4096)
    assert j.recovery.pending_rollback == target.id
    with pytest.raises(JournalError):
        j.record_undo(0, b"x")
    with pytest.raises(JournalError):
        j.rollback(j.points()[2], disk)
    j.rollback(target, disk)
    assert disk.read(0, 65536) == model.snapshots[target.id]
    assert j.points() == [target] and j.recovery.pending_rollback is None
    j.record_undo(0, b"x")
    j.close()
    disk.close()


def test_an_intent_left_after_the_cut_is_cleared_at_open(tmp_path: Path) -> None:
    j, _, disk = build_volume(tmp_path)
    target = j.points()[2]
    j.rollback(target, disk)
    j.close()
    (tmp_path / "j" / jmod.ROLLBACK_FILE).write_text(json.dumps({"point": target.id}))
    with open_journal(tmp_path / "j") as j:
        assert j.recovery.pending_rollback is None
        assert not (tmp_path / "j" / jmod.ROLLBACK_FILE).exists()
    disk.close()


# --- retention -------------------------------------------------------------------------------


def five_minute_points(tmp_path: Path, clock: Clock, count: int, **kw: object) -> Model:
    j = open_journal(tmp_path, clock, segment_bytes=4096, **kw)
    model = Model(j)
    rng = random.Random(11)
    for _ in range(count):
        model.point()
        random_writes(model, rng, 3)
        clock.now += 300
    return model


def assert_kept_points_restore(model: Model) -> None:
    for p in model.journal.points():
        assert undo_image(model.journal, model.data, p) == model.snapshots[p.id]


def test_prune_by_time_keeps_the_window(tmp_path: Path) -> None:
    clock = Clock()
    model = five_minute_points(tmp_path, clock, 12, retention_seconds=1200)
    j = model.journal
    segments = j.statistics().segments
    result = j.prune()
    cutoff = clock.now - 1200
    assert result.oldest_kept == next(p for p in j.points() if p.time >= cutoff)
    assert result.dropped_segments > 0 and j.statistics().segments < segments
    assert result.dropped_points > 0 and not result.over_budget
    assert j.points()[0].id <= result.oldest_kept.id  # only whole segments go
    assert_kept_points_restore(model)
    assert j.prune().dropped_segments == 0  # idempotent
    j.close()


def test_prune_never_drops_the_newest_point(tmp_path: Path) -> None:
    clock = Clock()
    model = five_minute_points(tmp_path, clock, 6, retention_seconds=0, retention_bytes=0)
    j = model.journal
    clock.now += 10 * 86400
    result = j.prune()
    newest = max(model.snapshots)
    assert result.oldest_kept is not None and result.oldest_kept.id == newest
    assert result.over_budget
    assert j.find("latest").id == newest
    assert_kept_points_restore(model)
    j.close()


def test_prune_by_size(tmp_path: Path) -> None:
    clock = Clock()
    model = five_minute_points(tmp_path, clock, 12)
    j = model.journal
    budget = j.statistics().bytes // 3
    j.retention_bytes = budget
    result = j.prune()
    assert j.statistics().bytes <= budget and not result.over_budget
    assert result.oldest_kept is not None
    assert_kept_points_restore(model)
    j.close()


def test_last_good_point_survives_a_resync_over_budget(tmp_path: Path) -> None:
    """A resync writes the whole volume after the last point: the point stays usable."""
    clock = Clock()
    model = five_minute_points(tmp_path, clock, 3, retention_bytes=20000)
    j = model.journal
    good = max(model.snapshots)
    rng = random.Random(1)
    for offset in range(0, 65536, 4096):  # resync: every block, twice
        model.write(offset, rng.randbytes(4096))
        model.write(offset, rng.randbytes(4096))
    result = j.prune()
    assert result.oldest_kept is not None and result.oldest_kept.id == good
    assert result.over_budget
    assert undo_image(j, model.data, good) == model.snapshots[good]
    # journaled once per range: about one volume of undo, not two
    assert j.statistics().bytes < 2 * 65536
    j.close()


def test_prune_without_points_drops_closed_segments(tmp_path: Path) -> None:
    with open_journal(tmp_path, segment_bytes=4096) as j:
        for i in range(10):
            j.record_undo(i * 1000, random.Random(i).randbytes(1000))
        before = j.statistics().segments
        assert before > 1
        assert j.prune().dropped_segments == before - 1
        assert j.statistics().segments == 1


# --- crash safety ----------------------------------------------------------------------------


def small_journal(path: Path) -> tuple[list[int], Model]:
    """Three points and random writes, synced record by record; return record offsets."""
    with open_journal(path) as j:
        model = Model(j, size=4096)
        rng = random.Random(4)
        model.point()
        random_writes(model, rng, 3)
        model.point("app")
        model.write(100, rng.randbytes(60))
    seg = path / "journal-00000001.seg"
    data = seg.read_bytes()
    offsets, pos = [], 56 + len(VOLUME)
    while pos < len(data):
        offsets.append(pos)
        pos += struct.unpack_from(">I", data, pos + 8)[0]
    return offsets, model


def test_a_torn_tail_is_cut_at_every_byte(tmp_path: Path) -> None:
    offsets, model = small_journal(tmp_path / "orig")
    seg_name = "journal-00000001.seg"
    full = (tmp_path / "orig" / seg_name).read_bytes()
    last = offsets[-1]
    for cut in range(last, len(full)):
        case = tmp_path / f"cut{cut}"
        shutil.copytree(tmp_path / "orig", case)
        os.truncate(case / seg_name, cut)
        with open_journal(case) as j:
            report = j.recovery
            if cut == last:
                assert report.truncated_file is None
            else:
                assert (report.truncated_file, report.truncated_at) == (seg_name, last)
                assert report.dropped_bytes == cut - last
            assert (case / seg_name).stat().st_size == last
            # the torn undo was never synced, so its volume write never happened
            live = model.snapshots[max(model.snapshots)]
            for p in j.points():
                assert undo_image(j, live, p) == model.snapshots[p.id]
            j.record_undo(0, b"after")  # appends continue at the cut
        with open_journal(case) as j:
            assert j.recovery.truncated_file is None
        shutil.rmtree(case)


def test_a_flipped_bit_before_the_tail_is_corruption(tmp_path: Path) -> None:
    offsets, _ = small_journal(tmp_path / "orig")
    seg_name = "journal-00000001.seg"
    full = (tmp_path / "orig" / seg_name).read_bytes()
    bounds = [*offsets, len(full)]
    # every record but the last: a later record's `synced` proves it was fsynced
    for start, end in itertools.pairwise(bounds[:-1]):
        for pos in sorted({start, start + 8, start + 16, start + 33, start + 41, end - 1}):
            case = tmp_path / f"flip{pos}"
            shutil.copytree(tmp_path / "orig", case)
            data = bytearray(full)
            data[pos] ^= 0x04
            (case / seg_name).write_bytes(data)
            with pytest.raises(JournalCorruptError) as info:
                open_journal(case)
            assert f"{seg_name} at offset {start}" in info.value.message
            shutil.rmtree(case)
    # the segment header: the file has records after it, so it was made durable
    (tmp_path / "orig" / seg_name).write_bytes(full[:20] + b"\xff" + full[21:])
    with pytest.raises(JournalCorruptError):
        open_journal(tmp_path / "orig")


def test_a_flipped_bit_in_the_unproven_last_record_is_reported_as_torn(tmp_path: Path) -> None:
    """No record after it proves it was synced: cut and reported, as a torn write."""
    offsets, _ = small_journal(tmp_path)
    seg = tmp_path / "journal-00000001.seg"
    data = bytearray(seg.read_bytes())
    data[-5] ^= 0x01
    seg.write_bytes(data)
    with open_journal(tmp_path) as j:
        assert j.recovery.truncated_at == offsets[-1]
        assert "checksum" in j.recovery.reason


def test_corruption_in_an_earlier_segment_is_never_a_torn_tail(tmp_path: Path) -> None:
    with open_journal(tmp_path, segment_bytes=4096) as j:
        for i in range(8):
            j.record_undo(i * 1000, random.Random(i).randbytes(1000))
        j.sync()
    first = tmp_path / "journal-00000001.seg"
    data = bytearray(first.read_bytes())
    data[-3] ^= 0x01  # the last record of a segment that is not the last one
    first.write_bytes(data)
    with pytest.raises(JournalCorruptError):
        open_journal(tmp_path)


def test_a_corrupt_record_found_while_reading_is_typed(tmp_path: Path) -> None:
    with open_journal(tmp_path) as j:
        j.add_point("crash", manifest_root=ROOT)
        j.record_undo(0, random.Random(1).randbytes(500))
        j.sync()
        seg = tmp_path / "journal-00000001.seg"
        data = bytearray(seg.read_bytes())
        data[-100] ^= 0x01  # damaged on disk after open
        seg.write_bytes(data)
        with pytest.raises(JournalCorruptError):
            list(j.undo_records_after(1))


def test_a_torn_segment_creation_is_removed(tmp_path: Path) -> None:
    with open_journal(tmp_path, segment_bytes=4096) as j:
        j.record_undo(0, random.Random(1).randbytes(3000))
        j.record_undo(0, random.Random(2).randbytes(3000))
    second = tmp_path / "journal-00000002.seg"
    assert second.exists()
    os.truncate(second, 20)  # header torn, no record
    with open_journal(tmp_path) as j:
        assert j.recovery.truncated_file == second.name
        assert j.statistics().segments == 1 and j.statistics().next_lsn == 2


def test_a_missing_segment_is_corruption_and_lsns_are_never_reused(tmp_path: Path) -> None:
    with open_journal(tmp_path, segment_bytes=4096) as j:
        for i in range(6):  # one record per segment
            j.record_undo(0, random.Random(i).randbytes(3000))
    (tmp_path / "journal-00000003.seg").unlink()
    with pytest.raises(JournalCorruptError, match="a segment is missing"):
        open_journal(tmp_path)
    for n in (1, 2, 4, 5):
        (tmp_path / f"journal-{n:08d}.seg").unlink()
    os.truncate(tmp_path / "journal-00000006.seg", 56 + len(VOLUME) + 10)  # its record torn
    with open_journal(tmp_path) as j:
        assert j.recovery.truncated_at == 56 + len(VOLUME)
        assert j.record_undo(0, b"next") == 6  # the header remembers where LSNs stand


def test_a_segment_of_another_journal_is_refused(tmp_path: Path) -> None:
    for name in ("a", "b"):
        with open_journal(tmp_path / name, segment_bytes=4096) as j:
            j.record_undo(0, random.Random(1).randbytes(3000))
            j.record_undo(0, random.Random(2).randbytes(3000))
    shutil.copy(tmp_path / "b" / "journal-00000002.seg", tmp_path / "a")
    with pytest.raises(JournalCorruptError):
        open_journal(tmp_path / "a")


def test_another_volume_and_a_second_owner_are_refused(tmp_path: Path) -> None:
    with open_journal(tmp_path), pytest.raises(JournalBusyError):
        open_journal(tmp_path)
    with pytest.raises(JournalError, match="belongs to volume"):
        Journal.open(tmp_path, volume="other", retention_bytes=1)


def test_a_failed_fsync_needs_a_reopen(tmp_path: Path, monkeypatch) -> None:
    j = open_journal(tmp_path)
    j.record_undo(0, b"abc")

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(jmod.os, "fsync", no_space)
    with pytest.raises(JournalDiskFullError):
        j.sync()
    monkeypatch.undo()
    with pytest.raises(JournalError, match="reopened"):
        j.record_undo(0, b"abc")
    j.close()
    with open_journal(tmp_path) as j:
        assert j.statistics().next_lsn == 2  # the record the kernel still had is kept


def test_a_failed_write_leaves_no_partial_record(tmp_path: Path, monkeypatch) -> None:
    with open_journal(tmp_path) as j:
        j.record_undo(0, b"first")
        size = j.statistics().bytes
        real_write = os.write

        def half_then_full(fd: int, data: memoryview) -> int:
            real_write(fd, bytes(data[:10]))
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(jmod.os, "write", half_then_full)
        with pytest.raises(JournalDiskFullError):
            j.record_undo(0, b"second")
        monkeypatch.undo()
        assert (tmp_path / "journal-00000001.seg").stat().st_size == size
        assert j.record_undo(0, b"third") == 2


# --- golden fixtures -------------------------------------------------------------------------


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("journal_fixtures", GOLDEN / "make_fixtures.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_golden_fixtures_are_reproduced_byte_for_byte() -> None:
    gen = load_generator()
    files, cases = gen.build()
    same_zstd = CASES["good-zstd"]["zstd_version"] == gen.ZSTD_VERSION
    cases["good-zstd"]["zstd_version"] = CASES["good-zstd"]["zstd_version"]
    assert cases == CASES
    assert {str(p.relative_to(GOLDEN)) for p in GOLDEN.glob("*/*")} == set(files)
    for name, content in files.items():
        if name.startswith("good-zstd/") and not same_zstd:
            continue  # zstd output may change between libzstd versions
        assert (GOLDEN / name).read_bytes() == content, name


def test_golden_layout_decodes_by_the_documented_offsets() -> None:
    """Read good-raw with struct at the offsets of docs/journal.md, not with the module."""
    gen = load_generator()
    data = (GOLDEN / "good-raw" / "journal-00000001.seg").read_bytes()
    assert data[0:8] == b"RPLJSEG\0" and data[8] == 1
    vlen, hlen = struct.unpack_from(">HI", data, 10)
    assert data[16:32] == gen.JOURNAL_ID and struct.unpack_from(">QQ", data, 32) == (1, 1)
    checksum = struct.unpack_from(">Q", data, 48)[0]
    assert xxhash.xxh3_64_intdigest(data[:48] + data[56:hlen]) == checksum
    assert data[56:hlen].decode() == gen.VOLUME and hlen == 56 + vlen
    records = []
    pos = hlen
    while pos < len(data):
        magic, version, rtype, flags, _, length, _, lsn, synced = struct.unpack_from(
            ">4sBBBBIIQQ", data, pos
        )
        assert (magic, version) == (b"RPLJ", 1)
        body = data[pos + 40 : pos + length]
        checksum = xxhash.xxh3_64_intdigest(data[pos : pos + 32] + body)
        assert struct.unpack_from(">Q", data, pos + 32)[0] == checksum
        records.append((rtype, flags, lsn, synced, body))
        pos += length
    assert [(r[0], r[2]) for r in records] == [(2, 1), (1, 2), (1, 3), (2, 4)]
    assert [r[3] for r in records] == [hlen, hlen + 92, hlen + 92, hlen + 92 + 156 + 104]
    time_ns, kind, _, glen, tlen, _, root = struct.unpack_from(">QBBHHH32s", records[3][4])
    assert (time_ns, kind, root.hex()) == (round((gen.T0 + 300.5) * 1e9), 2, gen.ROOT_B)
    assert records[3][4][48:].decode() == "cut-7" + "sql-flush" and (glen, tlen) == (5, 9)
    offset, length, stored = struct.unpack_from(">QII", records[1][4])
    assert (offset, length, stored, records[1][1]) == (65536, 100, 100, 0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_case_opens_as_recorded(case: str, tmp_path: Path) -> None:
    expected = CASES[case]
    shutil.copytree(GOLDEN / case, tmp_path / case)

    def open_case() -> Journal:
        return Journal.open(tmp_path / case, volume="vol-golden", retention_bytes=1 << 20)

    if expected["error_code"] is not None:
        with pytest.raises(ReplicationError) as info:
            open_case()
        assert type(info.value) is ERRORS_BY_CODE[str(expected["error_code"])]
        assert f"at offset {expected['offset']}" in info.value.message
        return
    with open_case() as j:
        points = j.points()
        if case == "torn-tail":
            assert j.recovery.truncated_at == expected["truncated_at"]
            assert j.recovery.dropped_bytes == expected["dropped"]
            assert [p.tag for p in points] == ["boot"]
            return
        assert [(p.id, p.kind, p.tag, p.group) for p in points] == [
            (1, "crash", "boot", ""),
            (4, "app", "sql-flush", "cut-7"),
        ]
        records = list(j.undo_records_after(1))
        assert [(r.lsn, r.offset, len(r.data)) for r in records] == [
            (3, 4096, 512 if expected["zstd"] else 48),
            (2, 65536, 100),
        ]
        if expected["zstd"]:
            assert records[0].data == bytes(512)
        rng = random.Random(20251125)
        assert records[1].data == rng.randbytes(100)
        assert np.frombuffer(records[1].data, np.uint8).any()

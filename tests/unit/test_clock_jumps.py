"""Recovery points under clock jumps: times stay ordered, finds behave, the schedule goes on.

Two clocks matter. The *source's* clock stamps the epoch-end marker (``cut_time``,
``oldest_write``: RPO figures only); the *master target's* clock (injected into
``VolumeHistory`` and ``Journal.open`` with ``clock=``) stamps the points. Both are
wall clocks and both can step: an NTP correction, a VM resumed from suspend, an
operator's mistake. The scenario used throughout: points every ``STEP`` seconds,
then the clock steps back by an hour, then forward by a day.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest

from replication.disks import create_disk, open_disk
from replication.errors import PointNotFoundError
from replication.history import HistoryPolicy, VolumeHistory
from replication.journal import Journal

BLOCK = 65536
SIZE = 1 << 20
HOUR = 3600.0
DAY = 24 * HOUR
STEP = 61.0  # between epoch ends: more than the crash interval
CRASH_INTERVAL = 60.0
T0 = 1_700_000_000.0


class Clock:
    """A settable wall clock; integer steps keep point times exact in nanoseconds."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def volume(tmp_path):
    """A raw volume with a history whose clock the test sets; yields (disk, open_history)."""
    raw = tmp_path / "vol.raw"
    with create_disk(str(raw), SIZE, format="raw"):
        pass
    disk = open_disk(str(raw), writable=True)
    opened: list[VolumeHistory] = []

    def open_history(clock: Clock) -> VolumeHistory:
        for h in opened:
            h.close()
        policy = HistoryPolicy(crash_interval=CRASH_INTERVAL)
        opened.append(VolumeHistory(tmp_path / "journal", "vol1", disk, BLOCK, policy, clock=clock))
        return opened[-1]

    yield disk, open_history
    opened[-1].close()
    disk.close()


def epoch(disk, history: VolumeHistory, rng: random.Random, *, cut_time: float, tag=None):
    """One epoch: a write, then its end marker record (as the source stamps it)."""
    offset = rng.randrange(SIZE // BLOCK) * BLOCK
    data = rng.randbytes(BLOCK)
    history.before_write(disk, offset, len(data))
    disk.write(offset, data)
    history.after_write(offset, data, disk.read)
    record = {
        "type": "epoch-end",
        "epoch": 1,
        "consistent": True,
        "cut_time": cut_time,
        "oldest_write": cut_time - 0.5,
        "tag": tag,
    }
    return history.on_epoch_end(record)


def jumps(clock: Clock):
    """Steps of the scenario: (label, clock change before the epoch), 24 epochs."""
    for i in range(24):
        if i == 8:
            yield "back an hour", -HOUR
        elif i == 16:
            yield "forward a day", DAY
        else:
            yield "tick", STEP


def assert_ordered_and_findable(history: VolumeHistory) -> None:
    """Ids and times never go backwards; 'latest' and time-based finds pick the right one."""
    points = history.points()
    ids = [p.id for p in points]
    times = [p.time_ns for p in points]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert times == sorted(times), [(p.id, p.time) for p in points]
    assert history.find("latest").id == ids[-1]
    for p in points:
        # the newest point at or before its time: itself, or a later one stamped the same
        newest_same = max(q.id for q in points if q.time_ns == p.time_ns)
        assert history.find(p.time).id == newest_same
        iso = datetime.fromtimestamp(p.time, UTC).isoformat()
        assert history.find(iso).id == newest_same
    with pytest.raises(PointNotFoundError):
        history.find(points[0].time - 1)


def test_point_times_never_go_backwards_when_the_master_targets_clock_jumps(volume):
    disk, open_history = volume
    clock = Clock()
    history = open_history(clock)
    rng = random.Random(1)
    made, made_before_jump = [], 0
    for n, (label, change) in enumerate(jumps(clock)):
        clock.now += change
        if label == "back an hour":
            made_before_jump = len(made)
        tag = {"kind": "app", "name": f"t{n}"} if n % 3 == 0 else None
        point = epoch(disk, history, rng, cut_time=clock.now, tag=tag)
        if point is not None:
            made.append(point)
            assert point.time_ns >= max(p.time_ns for p in made)
    assert len(made) >= 12
    assert_ordered_and_findable(history)
    # the first point after the backward jump is stamped with the time of the one before
    assert made[made_before_jump].time_ns == made[made_before_jump - 1].time_ns
    # a reopened journal (with the clock still behind) keeps the order and its floor
    clock.now -= DAY + HOUR
    history = open_history(clock)
    assert [p.id for p in history.points()] == [p.id for p in made]
    late = history.add_point("app", tag="after reopen")
    assert late.time_ns == made[-1].time_ns
    assert_ordered_and_findable(history)


def test_the_sources_clock_does_not_order_the_points(volume):
    """The marker's cut_time jumps back and forth: point times come from the MT's clock."""
    disk, open_history = volume
    clock = Clock()
    history = open_history(clock)
    rng = random.Random(2)
    source_clock = T0
    for n, (_label, change) in enumerate(jumps(clock)):
        clock.now += STEP
        source_clock += -change if change != STEP else STEP  # the source jumps the other way
        epoch(disk, history, rng, cut_time=source_clock, tag={"kind": "app", "name": f"t{n}"})
    points = history.points()
    assert [p.time for p in points] == [T0 + STEP * (n + 1) for n in range(24)]
    assert_ordered_and_findable(history)


def test_a_forward_jump_makes_a_crash_point_due_at_once(volume):
    disk, open_history = volume
    clock = Clock()
    history = open_history(clock)
    rng = random.Random(3)
    assert epoch(disk, history, rng, cut_time=clock.now).kind == "crash"
    clock.now += 1
    assert epoch(disk, history, rng, cut_time=clock.now) is None  # not due yet
    clock.now += DAY
    jumped = epoch(disk, history, rng, cut_time=clock.now)
    assert jumped is not None and jumped.kind == "crash" and jumped.time == clock.now
    assert history.find("latest").id == jumped.id
    assert history.find(clock.now - 1).id != jumped.id  # the time before the jump: the older one


@pytest.mark.parametrize("steps", [[-HOUR], [DAY, -DAY]], ids=["back an hour", "forward then back"])
def test_crash_points_keep_coming_after_the_clock_steps_back(volume, steps):
    disk, open_history = volume
    clock = Clock()
    history = open_history(clock)
    rng = random.Random(4)
    for change in steps:
        assert epoch(disk, history, rng, cut_time=clock.now) is not None
        clock.now += change + STEP
    made = []
    for _ in range(10):  # ten epochs, each more than the crash interval after the last
        made.append(epoch(disk, history, rng, cut_time=clock.now))
        clock.now += STEP
    assert sum(p is not None for p in made) >= 9, made
    assert_ordered_and_findable(history)


def test_journal_point_times_are_floored_by_the_last_point_across_a_reopen(tmp_path):
    clock = Clock()
    root = "a" * 64
    with Journal.open(tmp_path, volume="v", retention_bytes=1 << 30, clock=clock) as journal:
        first = journal.add_point("crash", manifest_root=root)
        clock.now += DAY
        ahead = journal.add_point("crash", manifest_root=root)
    clock.now -= DAY + HOUR  # the clock corrected, below even the first point
    with Journal.open(tmp_path, volume="v", retention_bytes=1 << 30, clock=clock) as journal:
        behind = journal.add_point("app", manifest_root=root, tag="t")
        assert [p.id for p in journal.points()] == [first.id, ahead.id, behind.id]
        assert behind.time_ns == ahead.time_ns > first.time_ns
        assert journal.find("latest").id == behind.id
        assert journal.find(ahead.time).id == behind.id  # the newest stamped at that time
        assert journal.find(first.time).id == first.id

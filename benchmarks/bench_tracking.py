"""Changed-block tracking: marks/s for hot and cold extents, and an epoch of a 2 TiB disk.

Run: ``.venv/bin/pytest -q benchmarks/bench_tracking.py --benchmark-only``. Each case
reports ``marks/s`` (from the median) in ``extra_info``. A hot mark sets bits in memory
only; a cold mark appends one activity-log record and waits for its fsync, so its rate
is the state device's fsync rate. Nothing here asserts on time.
"""

from __future__ import annotations

import itertools
import threading
from pathlib import Path

import pytest

from replication.tracking import DirtyTracker

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
BLOCK = 64 * KiB
EXTENT = 4 * MiB
SLOTS = 64
BATCH = 1000


def _tracker(tmp_path: Path, size: int) -> DirtyTracker:
    tracker, _ = DirtyTracker.open(tmp_path / "bench.cbt", disk_id="bench", size=size)
    tracker.begin_epoch().commit()  # past the initial resync: a steady-state tracker
    return tracker


def _report(benchmark, marks: int) -> None:
    if benchmark.stats is not None:
        benchmark.extra_info["marks/s"] = round(marks / benchmark.stats.stats.median)


@pytest.mark.parametrize("length", [4 * KiB, 64 * KiB, 1 * MiB])
def test_mark_hot(benchmark, tmp_path: Path, length: int) -> None:
    """Writes spread over the 64 hot extents (256 MiB): no I/O at all."""
    tracker = _tracker(tmp_path, 64 * GiB)
    offsets = [(i * 7919 * BLOCK) % (SLOTS * EXTENT - length) for i in range(BATCH)]
    for x in range(SLOTS):
        tracker.mark(x * EXTENT, 1)

    def run() -> None:
        for offset in offsets:
            tracker.mark(offset, length)

    benchmark(run)
    assert tracker.statistics().activations == SLOTS
    _report(benchmark, BATCH)
    tracker.close()


def test_mark_hot_4_threads(benchmark, tmp_path: Path) -> None:
    """Four writers marking hot extents at once: the cost of the shared lock."""
    tracker = _tracker(tmp_path, 64 * GiB)
    for x in range(SLOTS):
        tracker.mark(x * EXTENT, 1)

    def writer(i: int) -> None:
        for n in range(BATCH // 4):
            tracker.mark(((n * 4 + i) * BLOCK) % (SLOTS * EXTENT), BLOCK)

    def run() -> None:
        threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    benchmark(run)
    _report(benchmark, BATCH)
    tracker.close()


def test_mark_cold(benchmark, tmp_path: Path) -> None:
    """Every mark lands in a cold extent and evicts one: one record and one fsync each."""
    tracker = _tracker(tmp_path, 2 * TiB)
    extents = itertools.count()
    batch = 50

    def run() -> None:
        for _ in range(batch):
            tracker.mark(next(extents) * EXTENT % (2 * TiB), BLOCK)

    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    _report(benchmark, batch)
    tracker.close()


def test_epoch_of_a_2tib_disk(benchmark, tmp_path: Path) -> None:
    """begin_epoch + blocks() + commit with 1 % of a 2 TiB disk dirty (4 MiB bitmap)."""
    tracker = _tracker(tmp_path, 2 * TiB)
    dirty = range(0, 2 * TiB, 100 * BLOCK)

    def setup() -> None:
        for offset in dirty:
            tracker._dirty.set_range(offset // BLOCK, offset // BLOCK + 1)  # no AL cost here

    def run() -> None:
        epoch = tracker.begin_epoch()
        assert len(epoch.blocks()) == len(dirty)
        epoch.commit()

    benchmark.pedantic(run, setup=setup, rounds=5)
    tracker.close()

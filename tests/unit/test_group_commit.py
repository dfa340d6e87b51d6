"""The master target's group commit: one flush and one state transaction for many streams."""

from __future__ import annotations

import threading
import time

import pytest

from agents.master_target.service import GroupCommit
from replication.errors import DiskIOError, VolumeDiskFullError


class FakeApplier:
    """``commit_each`` of whatever was "applied" since the last call; slow, like fsyncs."""

    def __init__(self) -> None:
        self.applied: dict[tuple[str, bytes], int] = {}
        self.rounds: list[dict] = []
        self.failing: dict[str, Exception] = {}
        self.record_error: Exception | None = None

    def commit_each(self):
        time.sleep(0.05)
        if self.record_error is not None:
            raise self.record_error
        done = {k: v for k, v in self.applied.items() if k[0] not in self.failing}
        self.rounds.append(done)
        self.applied.clear()
        return done, {v: e for v, e in self.failing.items()}


def run_streams(group: GroupCommit, applier: FakeApplier, lock, volumes: list[str]):
    """One thread per volume: apply seq 7 of its session, then wait for the commit."""
    results: dict[str, object] = {}
    start = threading.Barrier(len(volumes))

    def stream(volume: str) -> None:
        key = (volume, b"s" * 16)
        start.wait()
        with lock:
            applier.applied[key] = 7
            ticket = group.ticket(key)
        try:
            results[volume] = group.wait(ticket, key)
        except Exception as err:
            results[volume] = err

    threads = [threading.Thread(target=stream, args=(v,)) for v in volumes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def test_many_streams_share_commits_and_each_learns_its_seq():
    applier, lock = FakeApplier(), threading.Lock()
    group = GroupCommit(applier, lock)
    volumes = [f"v{i}" for i in range(20)]
    results = run_streams(group, applier, lock, volumes)
    assert results == {v: 7 for v in volumes}
    assert len(applier.rounds) < len(volumes)  # rounds were shared
    assert sum(len(r) for r in applier.rounds) == len(volumes)


def test_a_volume_that_fails_to_flush_fails_only_its_streams():
    applier, lock = FakeApplier(), threading.Lock()
    applier.failing["v3"] = DiskIOError("flush v3: injected")
    group = GroupCommit(applier, lock)
    results = run_streams(group, applier, lock, [f"v{i}" for i in range(6)])
    assert isinstance(results.pop("v3"), DiskIOError)
    assert results == {f"v{i}": 7 for i in (0, 1, 2, 4, 5)}


def test_a_state_that_cannot_be_recorded_fails_every_stream_of_the_round():
    applier, lock = FakeApplier(), threading.Lock()
    applier.record_error = VolumeDiskFullError("record progress: no space left on device")
    group = GroupCommit(applier, lock)
    results = run_streams(group, applier, lock, ["a", "b", "c"])
    assert all(isinstance(r, VolumeDiskFullError) and r.retryable for r in results.values())
    applier.record_error = None  # space is back: the next round commits
    assert run_streams(group, applier, lock, ["a"]) == {"a": 7}


def test_an_open_tells_the_persisted_seq_without_a_new_commit():
    applier, lock = FakeApplier(), threading.Lock()
    group = GroupCommit(applier, lock)
    key = ("v", b"s" * 16)
    group.known(key, 42)
    with lock:
        ticket = group.ticket(key)
    assert group.wait(ticket, key) == 42
    group.forget([key])
    with pytest.raises(KeyError):
        group._persisted[key]

"""Tagged cuts on a source agent, with fake pairs: hooks, holds and their release."""

from __future__ import annotations

import threading

import pytest

from agents.source_agent.tags import CutCoordinator
from replication.errors import TagFailedError
from replication.wire import TagSpec


class FakeLive:
    def __init__(self) -> None:
        self.held = False

    def hold_writes(self) -> None:
        self.held = True

    def release_writes(self) -> None:
        self.held = False


class FakePairs:
    def __init__(self, cut_ok: bool) -> None:
        self.lives = {"d": FakeLive()}
        self.cut_ok = cut_ok
        self.cuts: list[dict] = []

    def tracked_disks(self) -> list[str]:
        return list(self.lives)

    def live(self, disk: str) -> FakeLive:
        return self.lives[disk]

    def request_cut(self, disk: str, tag: dict) -> threading.Event:
        if not self.cut_ok:
            raise TagFailedError("disk 'd' is resyncing")
        assert self.lives[disk].held, "a cut is only made while writes are held"
        self.cuts.append(tag)
        done = threading.Event()
        done.set()
        return done


def coordinator(tmp_path, pairs, *, pre_ok=True) -> tuple[CutCoordinator, object]:
    trace = tmp_path / "trace"
    pre = f"sh -c 'echo pre >> {trace}; exit {0 if pre_ok else 3}'"
    post = f"sh -c 'echo post >> {trace}'"
    return CutCoordinator(pairs, pre_hook=pre, post_hook=post), trace


def test_an_app_tag_runs_pre_then_cut_then_post_and_releases_writes(tmp_path):
    pairs = FakePairs(cut_ok=True)
    cuts, trace = coordinator(tmp_path, pairs)
    disks, _held = cuts.tag(TagSpec("app", "t1", group="g"))
    assert disks == ["d"] and pairs.cuts == [{"kind": "app", "name": "t1", "group": "g"}]
    assert trace.read_text().split() == ["pre", "post"]
    assert not pairs.lives["d"].held


def test_a_failed_cut_still_thaws_the_application_and_releases_writes(tmp_path):
    pairs = FakePairs(cut_ok=False)
    cuts, trace = coordinator(tmp_path, pairs)
    with pytest.raises(TagFailedError, match="resyncing"):
        cuts.tag(TagSpec("app", "t1"))
    assert trace.read_text().split() == ["pre", "post"]
    assert not pairs.lives["d"].held


def test_a_failing_pre_hook_holds_nothing_and_cuts_nothing(tmp_path):
    pairs = FakePairs(cut_ok=True)
    cuts, _trace = coordinator(tmp_path, pairs, pre_ok=False)
    with pytest.raises(TagFailedError, match="pre-hook"):
        cuts.tag(TagSpec("app", "t1"))
    assert not pairs.lives["d"].held and pairs.cuts == []


def test_a_prepared_cut_without_commit_releases_the_writes_at_its_timeout(tmp_path):
    pairs = FakePairs(cut_ok=True)
    cuts, _trace = coordinator(tmp_path, pairs)
    cuts.prepare(TagSpec("crash", "g1", timeout_seconds=0.2))
    assert pairs.lives["d"].held
    for _ in range(100):
        if not pairs.lives["d"].held:
            break
        threading.Event().wait(0.05)
    assert not pairs.lives["d"].held and pairs.cuts == []
    with pytest.raises(TagFailedError, match="timed out"):
        cuts.commit(TagSpec("crash", "g1"))

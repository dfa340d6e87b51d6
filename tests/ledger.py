"""What the proving-ground tests tried, for the run's summary (``tests/conftest.py``).

A test records as it goes: ``tried(kind, what, n)`` for trials and faults
(``kind`` such as "crash points", "random kills", "network faults", "hostile
inputs"), ``wire(proxy)`` for what a :class:`~tests.proxy.FaultProxy` counted on the
wire, and ``lost_nothing(kind)`` *after* the assertions that nothing was lost, so a
test that failed before them never claims it. The summary prints "lost: 0" for a
kind only when every test that tried something of it got that far ("NOT
ASSERTED" when some did not; "no claim" for kinds whose tests assert no loss, such
as fuzzed disk images, which must not crash, hang or allocate beyond a bound).

Each process keeps its own records (pytest-xdist workers hand theirs to the
controller through ``workeroutput``, see conftest.py); records name the test from
``PYTEST_CURRENT_TEST``.
"""

from __future__ import annotations

import os
from collections import defaultdict

#: kind -> what -> count
TRIED: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
#: kind -> test ids that tried something of it; that asserted nothing was lost
TESTS: dict[str, set[str]] = defaultdict(set)
ASSERTED: dict[str, set[str]] = defaultdict(set)


def _test_id() -> str:
    return os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" (", 1)[0]


def tried(kind: str, what: str, n: int = 1) -> None:
    """Count ``n`` trials of ``what`` (a crash point, an agent killed, a fault) in ``kind``."""
    TRIED[kind][what] += n
    TESTS[kind].add(_test_id())


def lost_nothing(kind: str) -> None:
    """Call after the assertions that nothing was lost: the summary may say so."""
    ASSERTED[kind].add(_test_id())


def wire(proxy) -> None:
    """Add what a FaultProxy counted from outside the agents (bytes, connections)."""
    TRIED["wire (at the test's proxy)"]["bytes up"] += proxy.bytes_up
    TRIED["wire (at the test's proxy)"]["bytes down"] += proxy.bytes_down
    TRIED["wire (at the test's proxy)"]["connections"] += proxy.connections


def dump() -> dict:
    """This process's records, as plain JSON-able data."""
    return {
        "tried": {k: dict(v) for k, v in TRIED.items()},
        "tests": {k: sorted(v) for k, v in TESTS.items()},
        "asserted": {k: sorted(v) for k, v in ASSERTED.items()},
    }


def merge(records: dict) -> None:
    """Add another process's :func:`dump` to this one's."""
    for kind, counts in records.get("tried", {}).items():
        for what, n in counts.items():
            TRIED[kind][what] += n
    for kind, ids in records.get("tests", {}).items():
        TESTS[kind].update(ids)
    for kind, ids in records.get("asserted", {}).items():
        ASSERTED[kind].update(ids)


def summary() -> list[str]:
    """One line per kind: its counts, and what was lost (only if asserted)."""
    lines = []
    for kind in sorted(TRIED):
        counts = ", ".join(f"{what}: {n}" for what, n in sorted(TRIED[kind].items()))
        if kind in TESTS:  # trials: their total first (wire counts have no total)
            counts = f"{sum(TRIED[kind].values())} ({counts})"
        lines.append(f"{kind}: {counts}{_lost(kind)}")
    return lines


def _lost(kind: str) -> str:
    tests = TESTS.get(kind)
    if not tests:
        return ""  # wire counts: no claim of their own
    asserted = len(tests & ASSERTED.get(kind, set()))
    if asserted == 0:
        return "; lost: no claim (these tests assert other things)"
    if asserted == len(tests):
        return f"; lost: 0 (asserted by all {len(tests)} tests)"
    return f"; lost: NOT ASSERTED by {len(tests) - asserted} of {len(tests)} tests"

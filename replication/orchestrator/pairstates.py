"""The state of a replication pair, as the orchestrator records it: one table.

A pair's stored state says how far the journey took it. The source agent reports
four *live* states (``starting``, ``resyncing``, ``protected``, ``error``:
``agents/source_agent/pairs.py``); failover adds three of the orchestrator's own
(``drained``, ``stopped``, ``failed-over``). :data:`PAIR_TRANSITIONS` lists every
allowed change as (state, event, next state); the store checks each write against
it (:func:`check_change`, inside the writing transaction) and refuses any other
change with :class:`~replication.errors.PairStateError`, so no code path can strand
a pair in a state no command leaves. ``NEW`` is the pseudo-state of a pair not yet
recorded.

Each event names the CLI verbs that perform it (:data:`EVENTS`). A state with no
way out is terminal (:data:`TERMINAL`: a failback pair once failed over; the VM
goes on with new ``forward`` pairs). The unit tests check that every state is
reachable and every other state has an exit to another state that a verb
performs; the diagram in docs/orchestrator.md is generated from this table
(:mod:`.diagrams`, ``make docs``).
"""

from __future__ import annotations

from ..errors import PairStateError

__all__ = [
    "EVENTS",
    "INITIAL",
    "LIVE_STATES",
    "NEW",
    "PAIR_STATES",
    "PAIR_TRANSITIONS",
    "TERMINAL",
    "check_change",
    "exits",
]

NEW = "[*]"
STARTING, RESYNCING, PROTECTED, ERROR = "starting", "resyncing", "protected", "error"
DRAINED, STOPPED, FAILED_OVER = "drained", "stopped", "failed-over"
PAIR_STATES = (STARTING, RESYNCING, PROTECTED, ERROR, DRAINED, STOPPED, FAILED_OVER)
#: the states the source agent reports (``status`` copies them into the store)
LIVE_STATES = (STARTING, RESYNCING, PROTECTED, ERROR)

START, SEEN_PROTECTED, OBSERVE = "start", "wait", "observe"
DRAIN, STOP, FAIL_OVER = "drain", "stop", "fail-over"

#: event -> (the ``replication orchestrate`` verbs that perform it, what happens)
EVENTS: dict[str, tuple[tuple[str, ...], str]] = {
    START: (("reprotect", "reverse-reprotect"), "StartPair; the step records the pair"),
    SEEN_PROTECTED: (
        ("reprotect", "reverse-reprotect", "failover"),
        "the step's wait saw the source agent report the pair protected",
    ),
    OBSERVE: (("status",), "status records the state the source agent reports"),
    DRAIN: (
        ("failover",),
        "the failover's cut is PERSISTED on the volume (or a last comparison after "
        "the writes stopped ended protected)",
    ),
    STOP: (("failover",), "StopPair"),
    FAIL_OVER: (
        ("failover",),
        "failover recorded: the volume holds the VM's data (a pair whose source "
        "agent is gone is left running as it was)",
    ),
}

#: (state, event, next state): every change of a pair's stored state
PAIR_TRANSITIONS: tuple[tuple[str, str, str], ...] = (
    (NEW, START, RESYNCING),
    # a step runs again, or reprotect resumes protection after a failover that
    # stopped before releasing anything (a released volume is refused earlier)
    (STARTING, START, RESYNCING),
    (RESYNCING, START, RESYNCING),
    (PROTECTED, START, RESYNCING),
    (ERROR, START, RESYNCING),
    (DRAINED, START, RESYNCING),
    (STOPPED, START, RESYNCING),
    # the step's wait (and failover's last comparison of a rescan pair)
    (STARTING, SEEN_PROTECTED, PROTECTED),
    (RESYNCING, SEEN_PROTECTED, PROTECTED),
    (PROTECTED, SEEN_PROTECTED, PROTECTED),
    (ERROR, SEEN_PROTECTED, PROTECTED),
    # status: what the agent says now
    (STARTING, OBSERVE, RESYNCING),
    (STARTING, OBSERVE, PROTECTED),
    (STARTING, OBSERVE, ERROR),
    (RESYNCING, OBSERVE, STARTING),
    (RESYNCING, OBSERVE, PROTECTED),
    (RESYNCING, OBSERVE, ERROR),
    (PROTECTED, OBSERVE, STARTING),
    (PROTECTED, OBSERVE, RESYNCING),
    (PROTECTED, OBSERVE, ERROR),
    (ERROR, OBSERVE, STARTING),
    (ERROR, OBSERVE, RESYNCING),
    (ERROR, OBSERVE, PROTECTED),
    # failover: drain (``latest`` only), stop, record
    (STARTING, DRAIN, DRAINED),
    (RESYNCING, DRAIN, DRAINED),
    (PROTECTED, DRAIN, DRAINED),
    (ERROR, DRAIN, DRAINED),
    (STARTING, STOP, STOPPED),
    (RESYNCING, STOP, STOPPED),
    (PROTECTED, STOP, STOPPED),
    (ERROR, STOP, STOPPED),
    (DRAINED, STOP, STOPPED),
    (STOPPED, FAIL_OVER, FAILED_OVER),
    (DRAINED, FAIL_OVER, FAILED_OVER),
    (STARTING, FAIL_OVER, FAILED_OVER),
    (RESYNCING, FAIL_OVER, FAILED_OVER),
    (PROTECTED, FAIL_OVER, FAILED_OVER),
    (ERROR, FAIL_OVER, FAILED_OVER),
)
#: the state a newly recorded pair is in
INITIAL = RESYNCING
#: states with no way out
TERMINAL = frozenset(s for s in PAIR_STATES if not any(r[0] == s for r in PAIR_TRANSITIONS))

_ALLOWED = frozenset(PAIR_TRANSITIONS)


def exits(state: str) -> list[tuple[str, str]]:
    """(event, next state) of every change out of ``state`` to another state."""
    return [(e, after) for s, e, after in PAIR_TRANSITIONS if s == state and after != state]


def check_change(pair: str, state: str | None, event: str, after: str) -> None:
    """Raise PairStateError unless the table lets ``event`` take ``pair`` from
    ``state`` (None: not recorded yet) to ``after``."""
    before = NEW if state is None else state
    if (before, event, after) in _ALLOWED:
        return
    if state is None:
        raise PairStateError(
            f"pair {pair} is not recorded: {event!r} cannot make it {after}",
            hint="a step records its pairs when it starts them (reprotect, reverse-reprotect)",
        )
    allowed = ", ".join(f"{e} -> {a}" for s, e, a in PAIR_TRANSITIONS if s == before)
    raise PairStateError(
        f"pair {pair}: {event!r} cannot take it from {before} to {after} "
        f"(from {before}: {allowed or 'nothing, it is final'})",
        hint="see `replication orchestrate status`; the pair state table is in "
        "docs/orchestrator.md",
    )

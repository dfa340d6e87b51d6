"""Named crash points: fault injection as a first-class tool.

A crash point marks a moment where a crash must be survivable (between a write and
its fsync, between an fsync and the ack that depends on it, between the two halves
of a grain allocation, between an agent call of the orchestrator and the store
write that records it). Tests start an agent (or the orchestrator CLI) with
``REPLICATION_CRASH_AT=NAME`` (or ``NAME@N``: the N-th time the point is reached)
and the process kills itself with SIGKILL right there, as a power cut or ``kill -9``
would; the test restarts it and checks that nothing acknowledged was lost. Without
the variable a crash point costs one comparison.

Every point is listed in :data:`POINTS` (and so in docs/proving-ground.md); a name
not listed is a programming error, caught by :func:`crash_point` at once.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

__all__ = ["POINTS", "crash_point"]

#: name -> the moment it marks
POINTS: dict[str, str] = {
    "spool.appended": "process server: a frame is written to the spool, not fsynced",
    "spool.synced": "process server: the spool is fsynced, RECEIVED not yet sent",
    "journal.appended": "master target: an undo record is written, not fsynced",
    "journal.synced": "master target: undo fsynced, the volume write not yet issued",
    "vmdk.grains_written": "VMDK: new grains written and fsynced, grain tables not yet",
    "orchestrator.pair_started": "orchestrator: a pair started on its agent, not in the store",
    "orchestrator.cut_prepared": "orchestrator: failover's cut holds all sources' writes, none cut",
    "orchestrator.failover_released": "orchestrator: a volume released, the failover unrecorded",
}


def _parse(spec: str | None) -> tuple[str, int] | None:
    if not spec:
        return None
    name, _, count = spec.partition("@")
    if name not in POINTS:
        raise SystemExit(f"REPLICATION_CRASH_AT={spec!r}: unknown crash point")
    return name, int(count or 1)


_TARGET = _parse(os.environ.get("REPLICATION_CRASH_AT"))
_hits: dict[str, int] = {}
_lock = threading.Lock()


def crash_point(name: str) -> None:
    """Die here with SIGKILL if this is the crash point the environment names."""
    if _TARGET is None:
        return
    if name not in POINTS:
        raise AssertionError(f"crash point {name!r} is not registered in faults.POINTS")
    if name != _TARGET[0]:
        return
    with _lock:
        _hits[name] = _hits.get(name, 0) + 1
        if _hits[name] < _TARGET[1]:
            return
    sys.stderr.write(f"crash point {name} reached: SIGKILL\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)

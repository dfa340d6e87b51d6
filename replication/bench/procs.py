"""Wall time, CPU time and peak memory of child processes, without psutil.

Two sources, both from the kernel:

* ``os.wait4`` returns the finished child's ``rusage``: user and system CPU over
  its whole life. Used for commands that run to completion (a source agent
  ``--once``, the relay's client) and for daemons when they are stopped.
* ``/proc/PID/stat`` (utime, stime in clock ticks) of a daemon that is still
  running, to count only the CPU it spent during a measured interval (not its
  start-up), and ``/proc/PID/status`` ``VmHWM``, the peak resident set of the
  process's own memory, polled while we wait for it (the peak only grows, so the
  last reading before exit is the peak).

Not ``ru_maxrss``: Linux carries the parent's high-water mark into a child over
fork and exec, so every child of a 170 MiB benchmark process would report at
least 170 MiB.

The child's threads are included in both; its own children are not (none of ours
fork).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import ReplicationError

__all__ = ["Usage", "cpu_seconds", "peak_rss", "run_measured", "stop_measured", "wait_measured"]

_TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Usage:
    """What a finished child cost: wall seconds, CPU seconds, peak RSS bytes."""

    returncode: int
    wall: float
    cpu: float
    max_rss: int


def cpu_seconds(pid: int) -> float:
    """Return the user + system CPU seconds a running process has used so far."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    # the command name (field 2) may hold spaces: count fields after its ')'
    fields = stat[stat.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def peak_rss(pid: int) -> int:
    """Return the peak resident set (VmHWM) of a process, in bytes (0 once it exited)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0  # a zombie has no memory lines


def wait_measured(proc: subprocess.Popen, started: float, timeout: float, hwm: int = 0) -> Usage:
    """Reap ``proc`` with ``os.wait4`` (bounded by ``timeout``); return its usage.

    On timeout the child is killed and a :class:`ReplicationError` raised.
    """
    deadline = time.monotonic() + timeout
    while True:
        hwm = max(hwm, peak_rss(proc.pid))
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            wall = time.perf_counter() - started
            proc.returncode = os.waitstatus_to_exitcode(status)  # Popen must not reap again
            return Usage(proc.returncode, wall, ru.ru_utime + ru.ru_stime, hwm)
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise ReplicationError(f"bench: {proc.args[0]} did not finish in {timeout:g} s")
        time.sleep(0.005)


def run_measured(
    argv: Sequence[str],
    log: Path,
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 3600.0,
) -> tuple[Usage, str]:
    """Run ``argv`` to completion (stdout and stderr to ``log``); return usage and output."""
    with open(log, "wb") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(list(argv), stdout=out, stderr=out, env=env)
    usage = wait_measured(proc, started, timeout)
    return usage, log.read_text(errors="replace")


def stop_measured(proc: subprocess.Popen, timeout: float = 30.0) -> Usage:
    """SIGTERM a daemon and reap it; return its whole-life usage (wall: time to stop)."""
    if proc.poll() is not None:
        raise ReplicationError(f"bench: {proc.args[0]} had exited ({proc.returncode})")
    hwm = peak_rss(proc.pid)  # before SIGTERM: it may be gone before the first poll
    proc.terminate()
    return wait_measured(proc, time.perf_counter(), timeout, hwm)

"""Start a daemon as a child process and wait, bounded, until it listens.

Every agent (and the benchmark's bare relay) logs ``event=listening port=N`` once
its gRPC port is bound; with ``--listen 127.0.0.1:0`` that line is the only way to
learn the port. :func:`launch` starts the command with its output appended to a
log file and polls that file (from where it ended before the start, so a restarted
agent's old line is not mistaken for the new one) until the line appears, the
child exits, or the timeout passes::

    mt = launch(agent_command("master-target", "--listen", "127.0.0.1:0", ...), log)
    ... connect to 127.0.0.1:{mt.port} ...
    mt.stop()
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import PairFailedError

__all__ = ["LISTENING", "Launched", "agent_command", "launch"]

LISTENING = re.compile(rb"event=listening port=(\d+)")
_POLL = 0.05


def agent_command(*args: str) -> list[str]:
    """Return the argv that runs ``replication ARGS`` with this interpreter."""
    return [sys.executable, "-m", "replication", *args]


@dataclass
class Launched:
    """A started daemon and the port it announced."""

    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL; return the exit status."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout)
        return self.proc.returncode


def launch(
    argv: Sequence[str],
    log: Path,
    *,
    timeout: float = 60.0,
    env: Mapping[str, str] | None = None,
) -> Launched:
    """Start ``argv`` logging to ``log``; return once it logged its listening port.

    Raises :class:`PairFailedError` (with the log's tail) when the child exits
    first or does not listen within ``timeout`` seconds; the child is then gone.
    """
    start = log.stat().st_size if log.exists() else 0
    with open(log, "ab") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(list(argv), stdout=out, stderr=out, env=env)
    name = _name(argv)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        port = _listening_port(log, start)
        if port is not None:
            return Launched(proc, port, log)
        if proc.poll() is not None:
            raise PairFailedError(
                f"{name} exited with status {proc.returncode} before listening: {_tail(log, start)}"
            )
        time.sleep(_POLL)
    proc.kill()
    proc.wait()
    raise PairFailedError(f"{name} did not listen within {timeout:g} s: {_tail(log, start)}")


def _listening_port(log: Path, start: int) -> int | None:
    with open(log, "rb") as f:
        f.seek(start)
        m = LISTENING.search(f.read())
    return int(m.group(1)) if m else None


def _tail(log: Path, start: int, limit: int = 500) -> str:
    with open(log, "rb") as f:
        f.seek(start)
        text = f.read().decode(errors="replace").strip()
    return text[-limit:] or "(no output)"


def _name(argv: Sequence[str]) -> str:
    """Return the sub-command of a ``python -m replication X`` argv, else the program."""
    if len(argv) > 3 and argv[1] == "-m":
        return argv[3] if argv[2] == "replication" else f"{argv[2]} {argv[3]}"
    return Path(argv[0]).name

"""Start the three agents as real processes on loopback, with real TLS, for tests."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

LISTENING = re.compile(r"event=listening port=(\d+)")


@dataclass
class Agent:
    """A running agent process and the port it listens on."""

    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    args: list[str] = field(default_factory=list)

    def kill(self) -> None:
        """kill -9, as a crash would."""
        self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


def replication(*args: str) -> list[str]:
    return [sys.executable, "-m", "replication", *args]


def master_target(root: Path, tls: Path, *extra: str) -> list[str]:
    """Arguments of a master target on any free port, its state in ``root/mt``."""
    return replication(
        "master-target", "--listen", "127.0.0.1:0", "--data-dir", str(root / "mt"),
        "--tls-dir", str(tls), *extra,
    )  # fmt: skip


def process_server(root: Path, tls: Path, mt_port: int, *extra: str, spool: str = "spool"):
    """Arguments of a process server on any free port, relaying to ``mt_port``."""
    return replication(
        "process-server", "--listen", "127.0.0.1:0", "--master-target", f"127.0.0.1:{mt_port}",
        "--spool-dir", str(root / spool), "--tls-dir", str(tls), *extra,
    )  # fmt: skip


def start(
    args: list[str], log: Path, timeout: float = 30.0, env: dict[str, str] | None = None
) -> Agent:
    """Start an agent; wait (bounded) for its 'listening' line; return it.

    ``env``: variables added to this process's environment (e.g. a crash point).
    """
    out = open(log, "ab")  # noqa: SIM115 - the child keeps writing after we return
    # a restart appends to the same log: only this process's lines count
    start_at = log.stat().st_size if log.exists() else 0
    proc = subprocess.Popen(
        args, stdout=out, stderr=out, env={**os.environ, **env} if env else None
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = LISTENING.search(log.read_bytes()[start_at:].decode(errors="replace"))
        if m:
            return Agent(proc, int(m.group(1)), log, args)
        if proc.poll() is not None:
            raise AssertionError(f"agent exited rc={proc.returncode}: {log.read_text()}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"agent did not start in {timeout} s: {log.read_text()}")


def restart(agent: Agent, port: int) -> Agent:
    """Start the same agent again on the same port (after a kill).

    Only ``--listen`` gets the old port; other ``:0`` addresses (metrics, control)
    take a fresh port again, as they did the first time.
    """
    args = list(agent.args)
    at = args.index("--listen") + 1 if "--listen" in args else None
    if at is not None and args[at].endswith(":0"):
        args[at] = args[at][:-2] + f":{port}"
    return start(args, agent.log)


def init_tls(directory: Path) -> Path:
    subprocess.run(
        replication("certs", "init", str(directory), "--host", "localhost"),
        check=True,
        capture_output=True,
        timeout=60,
    )
    return directory

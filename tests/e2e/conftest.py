"""Shared e2e fixtures: a small deployment of real agent processes, and full devices.

``cluster`` starts master targets, process servers and sources as processes on
loopback with real mutual TLS (one CA per test session), asks their control
service for ``Status``, and mounts size-limited tmpfs file systems. At teardown it
stops every agent it started, *then* unmounts, so no agent ever sees its device
vanish.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.agents import Agent, init_tls, replication, restart, start
from tests.e2e.test_replication import source_args
from tests.helpers import mount_tmpfs


class Cluster:
    """Agents of one test, their logs under ``root``; stopped by the fixture."""

    def __init__(self, root: Path, tls: Path, stack: contextlib.ExitStack) -> None:
        self.root = root
        self.tls = tls
        self._stack = stack
        self.agents: list[Agent] = []
        self.sources: list[subprocess.Popen[bytes]] = []

    def tmpfs(self, name: str, size: int) -> Path:
        """Mount a tmpfs of ``size`` bytes at ``root/name``; unmounted after the agents stop."""
        return self._stack.enter_context(mount_tmpfs(self.root / name, size))

    def master_target(
        self, volume: Path, *, data_dir: Path | None = None, passphrase_file: Path | None = None
    ) -> Agent:
        """Start a master target that owns ``vol1 = volume``."""
        args = ["--data-dir", str(data_dir or self.root / "mt"), "--volume", f"vol1={volume}"]
        if passphrase_file is not None:
            args += ["--passphrase-file", str(passphrase_file)]
        return self._start("master-target", args, self.root / "mt.log")

    def process_server(
        self, mt_port: int, *, spool_dir: Path | None = None, spool_limit: str | None = None
    ) -> Agent:
        """Start a process server forwarding to ``127.0.0.1:mt_port``, with metrics."""
        args = ["--master-target", f"127.0.0.1:{mt_port}"]
        args += ["--spool-dir", str(spool_dir or self.root / "spool")]
        args += ["--metrics-listen", "127.0.0.1:0"]
        if spool_limit is not None:
            args += ["--spool-limit", spool_limit]
        return self._start("process-server", args, self.root / "ps.log")

    def restart(self, agent: Agent) -> Agent:
        """Start ``agent`` again on its port (after a kill); return the new one."""
        again = restart(agent, agent.port)
        self.agents.append(again)
        return again

    def source(self, port: int, disk: Path, *, deadline: int = 60) -> subprocess.Popen[bytes]:
        """Start ``source-agent --once`` for ``vol1=disk``; its output goes to ``src.log``."""
        log = open(self.root / "src.log", "ab")  # noqa: SIM115 - the child writes after we return
        proc = subprocess.Popen(
            replication(*source_args(self.tls, port, f"vol1={disk}", deadline)),
            stdout=log,
            stderr=log,
        )
        log.close()
        self.sources.append(proc)
        return proc

    def source_log(self) -> str:
        return (self.root / "src.log").read_text(errors="replace")

    def status(self, port: int):
        """Return the agent's ``Control.Status`` (an ``AgentStatus``), as the orchestrator."""
        from replication.certs import load_identity
        from replication.tls import secure_channel
        from replication.v1 import control_pb2, control_pb2_grpc

        identity = load_identity(self.tls, "orchestrator")
        with secure_channel(f"127.0.0.1:{port}", identity) as channel:
            stub = control_pb2_grpc.ControlStub(channel)
            return stub.Status(control_pb2.StatusRequest(), timeout=10)

    def metrics(self, agent: Agent) -> str:
        """Return the agent's Prometheus metrics page (it was started with metrics)."""
        import re
        import urllib.request

        m = re.search(r"metrics_port=(\d+)", agent.log.read_text())
        assert m, agent.log.read_text()
        with urllib.request.urlopen(f"http://127.0.0.1:{m.group(1)}/metrics", timeout=10) as r:
            return r.read().decode()

    # -- disks ----------------------------------------------------------------------

    def make_source(self, name: str, size: int, data_bytes: int, seed: int = 7) -> Path:
        """Write a raw disk of ``size`` bytes whose first ``data_bytes`` are random."""
        import random

        path = self.root / name
        with open(path, "wb") as f:
            f.truncate(size)
            f.write(random.Random(seed).randbytes(data_bytes))
        return path

    @staticmethod
    def make_volume(path: Path, size: int) -> Path:
        """Create an empty monolithicSparse VMDK volume of ``size`` bytes."""
        from replication.disks import create_disk

        create_disk(str(path), size, format="vmdk", subformat="monolithicSparse").close()
        return path

    @staticmethod
    def spool_bytes(spool_dir: Path) -> int:
        """Bytes of the spool's segment files right now (files may vanish as we look)."""
        total = 0
        for p in spool_dir.glob("spool-*.seg"):
            with contextlib.suppress(FileNotFoundError):
                total += p.stat().st_size
        return total

    @staticmethod
    def wait_for(condition: Callable[[], object], timeout: float, what: str) -> object:
        """Poll ``condition`` every 0.05 s until it is truthy; fail after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")

    # -- lifetime -------------------------------------------------------------------

    def _start(self, role: str, args: list[str], log: Path) -> Agent:
        common = ["--listen", "127.0.0.1:0", "--tls-dir", str(self.tls)]
        agent = start(replication(role, *common, *args), log)
        self.agents.append(agent)
        return agent

    def stop(self) -> None:
        for proc in self.sources:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        for agent in self.agents:
            agent.stop()


@pytest.fixture(scope="session")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One CA, certificates and passphrase for every e2e test of the session."""
    return init_tls(tmp_path_factory.mktemp("e2e-tls") / "tls")


@pytest.fixture
def cluster(tmp_path: Path, tls_dir: Path) -> Iterator[Cluster]:
    with contextlib.ExitStack() as stack:
        c = Cluster(tmp_path, tls_dir, stack)
        try:
            yield c
        finally:
            c.stop()  # before the ExitStack unmounts anything

"""The source agent as a daemon: pairs started and stopped through the control service,
continuous re-sync by hash compare, role checks, and the bandwidth limit.

Real processes, real mutual TLS, loopback. Judged from outside: ``qemu-img compare``
of the target VMDK, the control service's answers, the CLI's exit codes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from replication.certs import load_identity
from replication.control import ControlClient
from replication.errors import PeerRoleError, UnknownDiskError
from tests.e2e.agents import init_tls, master_target, process_server, replication, start
from tests.helpers import make_raw, mutate_blocks, qemu_compare, require, write_raw

pytestmark = pytest.mark.oracle

SIZE = 32 << 20


def wait_for(predicate, what: str, timeout: float = 60.0, every: float = 0.1):
    """Poll ``predicate`` until it returns a true value (bounded); return that value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture
def relay(tmp_path):
    """A master target with an empty VMDK volume ``vol1`` and a process server."""
    require("qemu-img")
    tls = init_tls(tmp_path / "tls")
    vmdk = tmp_path / "target.vmdk"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "vmdk", str(vmdk), str(SIZE)], check=True, timeout=30
    )
    mt = start(master_target(tmp_path, tls, "--volume", f"vol1={vmdk}"), tmp_path / "mt.log")
    ps = start(process_server(tmp_path, tls, mt.port), tmp_path / "ps.log")
    agents = [mt, ps]
    yield SimpleNamespace(tmp=tmp_path, tls=tls, vmdk=vmdk, ps=ps, agents=agents)
    for a in reversed(agents):
        a.stop()


def start_daemon(tmp_path: Path, tls: Path, ps_port: int, disk: Path, *extra: str):
    return start(
        replication(
            "source-agent",
            "--process-server",
            f"127.0.0.1:{ps_port}",
            "--tls-dir",
            str(tls),
            "--disk",
            f"disk1={disk}",
            "--control-listen",
            "127.0.0.1:0",
            *extra,
        ),
        tmp_path / "source.log",
    )


def pair_of(client: ControlClient, disk: str = "disk1"):
    return next((p for p in client.status().pairs if p.disk == disk), None)


def test_a_pair_started_by_the_orchestrator_keeps_the_target_level(relay):
    tmp_path, tls, vmdk, ps, agents = relay.tmp, relay.tls, relay.vmdk, relay.ps, relay.agents
    raw = tmp_path / "source.raw"
    data = make_raw(raw, SIZE, seed=5)
    src = start_daemon(tmp_path, tls, ps.port, raw, "--idle", "--rescan-interval", "0.5")
    agents.append(src)
    orchestrator = load_identity(tls, "orchestrator", "localhost")
    with ControlClient(f"127.0.0.1:{src.port}", orchestrator) as client:
        assert client.status().role == "source"
        assert client.status().pairs == ()  # --idle: nothing runs before StartPair
        started = client.start_pair("disk1", "vol1")
        assert (started.disk, started.volume) == ("disk1", "vol1")
        wait_for(lambda: (p := pair_of(client)) and p.state == "protected", "first resync")
        assert qemu_compare(raw, vmdk, "vmdk").returncode == 0

        # the workload changes the source: the next rescan brings the target level again
        mutate_blocks(data, 0.05, seed=6)
        write_raw(raw, data)
        cycles_before = _cycles(src.log)
        wait_for(lambda: _cycles(src.log) >= cycles_before + 2, "two more rescans", 90)
        assert qemu_compare(raw, vmdk, "vmdk").returncode == 0

        # idempotent start; another volume for a running disk is refused
        assert client.start_pair("disk1", "vol1").volume == "vol1"
        stopped = client.stop_pair("disk1")
        assert stopped.state == "stopped"
        assert pair_of(client).state == "stopped"


def _cycles(log: Path) -> int:
    return len(re.findall(r"event=protected disk=disk1", log.read_text(errors="replace")))


def test_control_refuses_unknown_disks_and_non_orchestrator_roles(relay):
    tmp_path, tls, ps, agents = relay.tmp, relay.tls, relay.ps, relay.agents
    raw = tmp_path / "source.raw"
    make_raw(raw, SIZE, seed=7)
    src = start_daemon(tmp_path, tls, ps.port, raw, "--idle")
    agents.append(src)
    address = f"127.0.0.1:{src.port}"
    orchestrator = load_identity(tls, "orchestrator", "localhost")
    with ControlClient(address, orchestrator) as client, pytest.raises(UnknownDiskError):
        client.start_pair("disk2", "vol1")
    # a process-server certificate may read the status but not start a pair
    with ControlClient(address, load_identity(tls, "process-server", "localhost")) as client:
        assert client.status().role == "source"
        with pytest.raises(PeerRoleError):
            client.start_pair("disk1", "vol1")
        assert client.status().pairs == ()  # neither refused call started anything
    assert "event=pair_started" not in (tmp_path / "source.log").read_text()


def test_the_agent_cli_drives_pairs_and_reports_errors_without_traceback(relay):
    tmp_path, tls, vmdk, ps, agents = relay.tmp, relay.tls, relay.vmdk, relay.ps, relay.agents
    raw = tmp_path / "source.raw"
    make_raw(raw, SIZE, seed=8)
    src = start_daemon(tmp_path, tls, ps.port, raw, "--idle", "--rescan-interval", "60")
    agents.append(src)
    common = [f"127.0.0.1:{src.port}", "--tls-dir", str(tls)]

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            replication("agent", *args), capture_output=True, text=True, timeout=60
        )

    done = cli("start-pair", *common, "disk1", "vol1", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["volume"] == "vol1"

    def protected():
        out = cli("status", *common, "--json")
        assert out.returncode == 0, out.stderr
        pairs = json.loads(out.stdout)["pairs"]
        return pairs and pairs[0]["state"] == "protected" and pairs[0]

    pair = wait_for(protected, "the pair protected", 60, every=0.5)
    assert pair["blocks_done"] == pair["blocks_total"] > 0
    assert qemu_compare(raw, vmdk, "vmdk").returncode == 0

    refused = cli("start-pair", *common, "nosuchdisk", "vol1")
    assert refused.returncode != 0
    assert "pair.unknown_disk" in refused.stderr and "Traceback" not in refused.stderr
    unreachable = cli("status", "127.0.0.1:1", "--tls-dir", str(tls), "--timeout", "5")
    assert unreachable.returncode != 0 and "Traceback" not in unreachable.stderr


def test_the_bandwidth_limit_spaces_the_frames(relay):
    tmp_path, tls, vmdk, ps = relay.tmp, relay.tls, relay.vmdk, relay.ps
    raw = tmp_path / "source.raw"
    # incompressible data, so the framed bytes are known in advance: ~3 MiB
    with open(raw, "wb") as f:
        f.truncate(SIZE)
        f.write(os.urandom(3 << 20))
    limit = 1 << 20  # 1 MiB/s, burst a quarter second but at least one 1 MiB frame
    began = time.monotonic()
    proc = subprocess.run(
        replication(
            "source-agent",
            "--process-server",
            f"127.0.0.1:{ps.port}",
            "--tls-dir",
            str(tls),
            "--disk",
            f"vol1={raw}",
            "--once",
            "--bandwidth-limit",
            "1M/s",
        ),
        capture_output=True,
        text=True,
        timeout=120,
    )
    elapsed = time.monotonic() - began
    assert proc.returncode == 0, proc.stderr
    framed = int(re.search(r"(\d+) bytes framed", proc.stdout).group(1))
    assert framed > 3 << 20
    # a lower bound only: the limit can make the transfer slower, never faster than
    # (bytes - one burst) / rate, whatever the machine's speed
    assert elapsed >= (framed - (1 << 20)) / limit
    assert qemu_compare(raw, vmdk, "vmdk").returncode == 0


def test_a_bad_bandwidth_limit_is_a_usage_error(relay):
    tmp_path, tls, ps = relay.tmp, relay.tls, relay.ps
    proc = subprocess.run(
        replication(
            "source-agent",
            "--process-server",
            f"127.0.0.1:{ps.port}",
            "--tls-dir",
            str(tls),
            "--disk",
            f"vol1={tmp_path}",
            "--once",
            "--bandwidth-limit",
            "fast",
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "fast" in proc.stderr and "Traceback" not in proc.stderr


def test_a_config_file_runs_the_daemon_and_flags_win_over_it(relay):
    tmp_path, tls, vmdk, ps = relay.tmp, relay.tls, relay.vmdk, relay.ps
    raw = tmp_path / "source.raw"
    make_raw(raw, SIZE, seed=9)
    config = tmp_path / "source.toml"
    config.write_text(
        # the file names a dead process server; the flag below must win over it
        'process-server = "127.0.0.1:1"\n'
        f'disk = ["vol1={raw}"]\n'
        "once = true\n"
        "deadline = 120\n"
        'bandwidth-limit = "100M"\n'
        f'[tls]\ndir = "{tls}"\n'
    )
    proc = subprocess.run(
        replication(
            "source-agent", "--config", str(config), "--process-server", f"127.0.0.1:{ps.port}"
        ),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "all PERSISTED" in proc.stdout
    assert qemu_compare(raw, vmdk, "vmdk").returncode == 0

    config.write_text(config.read_text().replace("deadline = 120", "dead-line = 120"))
    typo = subprocess.run(
        replication("source-agent", "--config", str(config)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert typo.returncode != 0 and "dead" in typo.stderr and "Traceback" not in typo.stderr

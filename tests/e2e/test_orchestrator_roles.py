"""The orchestrator and the ``replication agent`` CLI check the role of the server they
dial (docs/security.md 5.5): real agent processes on loopback, certificates from
``certs init`` (every role's certificate is valid for ``localhost``, so only the role
tells a process server from a master target)."""

from __future__ import annotations

import json
import subprocess

import pytest

from replication.errors import ServerRoleError
from replication.orchestrator import Orchestrator
from tests.e2e.agents import replication
from tests.e2e.test_failback_journey import (
    World,
    world,  # noqa: F401 - the fixture (used by name below)
)


def servers(w: World):
    mt = w.agent("master-target", "--data-dir", str(w.root / "mt"), log="mt.log")
    ps = w.agent(
        "process-server", "--master-target", f"127.0.0.1:{mt.port}",
        "--spool-dir", str(w.root / "spool"), log="ps.log",
    )  # fmt: skip
    return mt, ps


def test_a_process_server_registered_as_the_master_target_fails_the_preflight(world):  # noqa: F811
    w = world
    _, ps = servers(w)
    with Orchestrator(w.root / "store", w.tls) as o:
        address = f"127.0.0.1:{ps.port}"
        o.register_server("mt1", "master-target", address, site="on-prem")  # a wrong address
        o.register_server("ps-azure", "process-server", address, site="azure")
        o.register_vm("app", "vmware-vm", azure_agent=address)  # not a source agent either
        o.register_disk("app", "os", uuid="6000c29-os", size=1 << 20, original_volume="app-os")
        with pytest.raises(ServerRoleError) as caught:
            o.reprotect(["app"], master_target="mt1", process_server="ps-azure", dry_run=True)
        job = o.jobs()[0]
    checks = {c.name: c for c in caught.value.checks}
    mt_check = checks[f"master-target 'mt1' reachable at {address}"]
    assert (mt_check.status, mt_check.code) == ("failed", "tls.server_role")
    assert "is a process-server, not the master-target" in mt_check.detail
    assert "check the address registered" in mt_check.fix
    ps_check = checks[f"process-server 'ps-azure' reachable at {address}"]
    assert ps_check.status == "passed"  # the same server, in the role it has: accepted
    agent_check = checks[f"source agent beside app's Azure disks reachable at {address}"]
    assert (agent_check.status, agent_check.code) == ("failed", "tls.server_role")
    assert caught.value.code == "tls.server_role"
    assert (job.state, job.error_code) == ("failed", "tls.server_role")


def agent_cli(w: World, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        replication("agent", "status", *args, "--tls-dir", str(w.tls)),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_agent_cli_with_expect_role_refuses_another_role_without_a_traceback(world):  # noqa: F811
    w = world
    mt, ps = servers(w)
    address = f"127.0.0.1:{ps.port}"
    wrong = agent_cli(w, address, "--expect-role", "master-target")
    assert wrong.returncode == 6, wrong.stdout + wrong.stderr
    assert "error [tls.server_role]" in wrong.stderr and "Traceback" not in wrong.stderr
    assert "is a process-server, not the master-target" in wrong.stderr
    assert wrong.stdout == ""  # nothing the server said was shown
    as_json = agent_cli(w, address, "--expect-role", "master-target", "--json")
    assert as_json.returncode == 6
    assert json.loads(as_json.stdout)["error"]["code"] == "tls.server_role"
    right = agent_cli(w, address, "--expect-role", "process_server", "--json")  # any spelling
    assert right.returncode == 0, right.stderr
    assert json.loads(right.stdout)["role"] == "process-server"
    unchecked = agent_cli(w, f"127.0.0.1:{mt.port}", "--json")  # default: CA and host only
    assert unchecked.returncode == 0 and json.loads(unchecked.stdout)["role"] == "master-target"
    bogus = agent_cli(w, address, "--expect-role", "mastertarget")
    assert bogus.returncode != 0 and "Traceback" not in bogus.stderr
    assert "unknown role 'mastertarget'" in bogus.stderr

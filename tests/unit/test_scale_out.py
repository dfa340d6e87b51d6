"""Scale-out in the orchestrator: least-loaded placement and moving pairs (fake agents)."""

from __future__ import annotations

import pytest

from replication.certs import init_tls_dir
from replication.errors import UsageError
from replication.orchestrator import Orchestrator, Pair


@pytest.fixture
def orch(tmp_path):
    tls = tmp_path / "tls"
    init_tls_dir(tls, ["localhost"])
    with Orchestrator(tmp_path / "store", tls) as o:
        for name, role, site in (
            ("ps1", "process-server", "azure"),
            ("ps2", "process-server", "azure"),
            ("ps-onprem", "process-server", "on-prem"),
            ("mt1", "master-target", "on-prem"),
        ):
            o.register_server(name, role, f"127.0.0.{len(name)}:9443", site=site, fingerprint="")
        o.register_vm("web", azure_agent="127.0.0.1:1")
        for disk in ("os", "data"):
            o.register_disk("web", disk, uuid=f"u-{disk}", size=1 << 20)
        yield o


def started(o: Orchestrator, *pairs: tuple[str, str, str]) -> None:
    """Record the pairs as a step does: started (resyncing), then seen ``state``."""
    o.store.record_started(
        [Pair("web", d, "failback", "127.0.0.1:1", f"web-{d}", ps, "mt1", f"web-{d}")
         for d, ps, _ in pairs],
        {},
        failback_groups=False,
    )  # fmt: skip
    for d, _, state in pairs:
        if state == "protected":
            o.store.set_pair_state("web", d, "failback", state, event="wait")


def test_the_least_loaded_process_server_of_the_site_is_chosen(orch):
    assert orch.least_loaded("process-server", "azure") == "ps1"  # a tie: by name
    started(orch, ("os", "ps1", "protected"))
    assert orch.least_loaded("process-server", "azure") == "ps2"
    started(orch, ("data", "ps2", "protected"))
    orch.store.set_pair_state("web", "os", "failback", "stopped", event="stop")  # no more load
    assert orch.least_loaded("process-server", "azure") == "ps1"
    with pytest.raises(UsageError, match="no master-target registered at site 'azure'"):
        orch.least_loaded("master-target", "azure")


def test_moving_a_vm_commands_each_source_agent_and_records_it(orch, monkeypatch):
    started(orch, ("os", "ps1", "protected"), ("data", "ps1", "protected"))
    calls = []

    class FakeClient:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

        def move_pair(self, disk, address):
            calls.append((disk, address))

    roles = []
    monkeypatch.setattr(
        orch.agents, "client", lambda address, timeout=None, *, role: roles.append(role) or client
    )
    client = FakeClient()
    moved = orch.move_pairs("web", "ps2")
    assert sorted(calls) == [("web-data", "127.0.0.3:9443"), ("web-os", "127.0.0.3:9443")]
    assert roles == ["source", "source"]  # the agents beside the disks must prove it
    assert {p.process_server for p in moved} == {"ps2"}
    assert orch.least_loaded("process-server", "azure") == "ps1"
    with pytest.raises(UsageError, match="not a process server"):
        orch.move_pairs("web", "mt1")

"""kill -9 of the orchestrator CLI in the middle of failover and of reverse reprotect.

Real agents on loopback (the journey's: an on-prem master target, an "Azure" process
server and tracked source agent; then an Azure-side master target, an on-prem process
server and source agent), one VMware VM with two disks failed back to their original
VMDKs. The CLI is killed where a step is half done: at the orchestrator's named crash
points (``replication/faults.py``: the process SIGKILLs itself there, as kill -9
would), or from outside once the step's pairs are recorded and resyncing. After each
kill, and before the re-run:

* ``jobs`` shows the killed job ``interrupted`` (never ``running`` forever), saying
  to run the step again;
* ``status`` shows every pair in a state a command leaves;

then the same command, run again, completes: ``qemu-img compare`` says the disks
are identical, and the on-prem master target (never stopped) no longer owns the
recovered VMDKs.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
from pathlib import Path

import pytest

from replication.certs import load_identity
from replication.control import ControlClient
from replication.orchestrator import Orchestrator
from replication.orchestrator.pairstates import PAIR_STATES, TERMINAL, exits
from tests.e2e.agents import replication
from tests.e2e.test_failback_journey import (
    BLOCK,
    World,
    cli,
    delta_cost,
    make_vhd,
    make_vmdk,
    qemu_same,
    read_disk,
    reverse_site,
    wait_for,
    world,  # noqa: F401 - the fixture (used by name below)
    write_blocks,
)
from tests.helpers import realistic_bytes, require

pytestmark = pytest.mark.oracle

SIZE = 8 << 20
DISKS = ("data", "os")  # the order the orchestrator walks them in (sorted)
#: the stored pair states a CLI verb moves a pair on from, by the pair state table,
#: and its final state (a pair must never be stranded outside of these)
LEAVABLE = {s for s in PAIR_STATES if exits(s)} | TERMINAL


def killed_at(w: World, store: Path, point: str, *args: str) -> None:
    """Run ``orchestrate ARGS`` with a crash point; it must die there by SIGKILL."""
    done = subprocess.run(
        replication(
            "orchestrate", args[0], "--store", str(store), "--tls-dir", str(w.tls), *args[1:]
        ),
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "REPLICATION_CRASH_AT": point},
    )
    assert done.returncode == -signal.SIGKILL, (done.returncode, done.stdout, done.stderr)
    assert f"crash point {point.split('@')[0]} reached" in done.stderr


def after_the_kill(w: World, store: Path, step: str) -> list[dict]:
    """``jobs`` and ``status`` right after a kill: return the status rows."""
    jobs = cli(store, w.tls, "jobs", "--json")
    assert jobs.returncode == 0, jobs.stderr
    listed = json.loads(jobs.stdout)
    assert listed[0]["kind"] == step and listed[0]["state"] == "interrupted", listed[0]
    assert f"run {step} again" in listed[0]["message"]
    assert not [j for j in listed if j["state"] == "running"]
    status = cli(store, w.tls, "status", "--json")
    assert status.returncode == 0 and "Traceback" not in status.stderr, status.stderr
    rows = json.loads(status.stdout)
    assert {r["stored_state"] for r in rows} <= LEAVABLE, rows
    return rows


def completes(w: World, store: Path, *args: str) -> dict:
    done = cli(store, w.tls, *args, "--json", timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    job = json.loads(done.stdout)["job"]
    assert job["state"] == "succeeded", job
    return job


def volumes(w: World, agent) -> set[str]:
    with ControlClient(f"127.0.0.1:{agent.port}", load_identity(w.tls, "orchestrator")) as mt:
        return {v.name for v in mt.list_volumes()}


def protected_to_onprem(w: World) -> dict:
    """The journey up to step 1: the VM's Azure disks protected to its original VMDKs."""
    disks = {}
    for n, name in enumerate(DISKS):
        before = realistic_bytes(SIZE, 40 + n)
        now = bytearray(before)
        rng = random.Random(n)
        for i in rng.sample(range(SIZE // BLOCK), 12):  # Azure wrote these since
            now[i * BLOCK : (i + 1) * BLOCK] = rng.randbytes(BLOCK)
        disks[name] = {
            "vmdk": make_vmdk(w.root / f"app-{name}.vmdk", bytes(before)),
            "vhd": make_vhd(w.root / f"app-{name}.vhd", bytes(now)),
        }
    (w.root / "datastore").mkdir()
    mt = w.agent(
        "master-target", "--data-dir", str(w.root / "mt"), "--datastore", str(w.root / "datastore"),
        "--crash-interval", "1",
        *[a for n, d in disks.items() for a in ("--volume", f"app-{n}={d['vmdk']}")],
        log="mt.log",
    )  # fmt: skip
    ps = w.agent(
        "process-server", "--master-target", f"127.0.0.1:{mt.port}",
        "--spool-dir", str(w.root / "spool"), log="ps.log",
    )  # fmt: skip
    src = w.agent(
        "source-agent", "--process-server", f"127.0.0.1:{ps.port}",
        *[a for n, d in disks.items() for a in ("--disk", f"app-{n}={d['vhd']}")],
        "--state-dir", str(w.root / "cbt"), "--nbd-listen", "127.0.0.1:0",
        "--control-listen", "127.0.0.1:0", "--idle",
        log="azure-source.log",
    )  # fmt: skip
    store = w.root / "store"
    with Orchestrator(store, w.tls, poll=0.2) as o:
        o.register_server(
            "mt1", "master-target", f"127.0.0.1:{mt.port}", site="on-prem",
            datastore=str(w.root / "datastore"),
        )  # fmt: skip
        o.register_server("ps-azure", "process-server", f"127.0.0.1:{ps.port}", site="azure")
        o.register_vm("app", "vmware-vm", azure_agent=f"127.0.0.1:{src.port}")
        for name, d in disks.items():
            o.register_disk(
                "app", name, uuid=f"6000c29-app-{name}", azure_path=str(d["vhd"]),
                original_vmdk=str(d["vmdk"]),
            )  # fmt: skip
        o.create_group("PG1", ["app"])
        o.create_plan("plan1", ["PG1"])
        job = o.reprotect(["app"], master_target="mt1", process_server="ps-azure", timeout=120)
        assert job.state == "succeeded"
    return {"disks": disks, "mt": mt, "ps": ps, "src": src, "store": store}


FAILOVER = ("failover", "plan1", "--point", "latest", "--writes-stopped", "--timeout", "120")
REPROTECT = ("reprotect", "app", "--master-target", "mt1", "--process-server", "ps-azure")


def test_kill_9_mid_failover_then_the_rerun_completes(world):  # noqa: F811 - the journey's fixture
    w = world
    site = protected_to_onprem(w)
    store, disks, mt = site["store"], site["disks"], site["mt"]

    # 1. every source holds its writes for the failover's cut, none has cut yet
    killed_at(w, store, "orchestrator.cut_prepared", *FAILOVER)
    rows = after_the_kill(w, store, "failover")
    assert {r["stored_state"] for r in rows} == {"protected"}  # nothing recorded yet
    assert volumes(w, mt) == {"app-data", "app-os"}

    # 2. the re-run drains, stops, and the master target releases the first disk
    killed_at(w, store, "orchestrator.failover_released", *FAILOVER)
    rows = after_the_kill(w, store, "failover")
    assert {r["stored_state"] for r in rows} == {"stopped"}
    assert volumes(w, mt) == {"app-os"}  # app-data handed over, the failover unrecorded
    with Orchestrator(store, w.tls) as o:
        assert o.store.vm("app").phase == "failback-protected"

    # 2b. reprotect instead of failover: refused, saying what happened and what to do
    refused = cli(store, w.tls, *REPROTECT, "--json")
    assert refused.returncode == 11 and "Traceback" not in refused.stderr, refused.stderr
    error = json.loads(refused.stdout)["error"]
    assert error["code"] == "orchestrator.failover_interrupted", error
    assert "interrupted after releasing app-data" in error["message"]
    assert "run failover again" in error["hint"] and "failover plan1" in error["hint"]
    assert volumes(w, mt) == {"app-os"}  # nothing taken back
    with Orchestrator(store, w.tls) as o:
        assert {p.state for p in o.store.pairs("app")} == {"stopped"}  # nothing started

    # 3. the same command again: it finishes what is left
    job = completes(w, store, *FAILOVER)
    assert {r["path"] for r in job["result"]["recovered"]} == {
        str(d["vmdk"]) for d in disks.values()
    }
    with Orchestrator(store, w.tls) as o:
        assert o.store.vm("app").phase == "on-prem"
        assert {p.state for p in o.store.pairs("app")} == {"failed-over"}
    assert mt.proc.poll() is None and volumes(w, mt) == set()
    for name, d in disks.items():
        assert qemu_same(d["vhd"], "vpc", d["vmdk"], "vmdk"), name


def test_kill_9_mid_reverse_reprotect_then_the_rerun_completes(world):  # noqa: F811 - the journey's fixture
    require("qemu-img")
    w = world
    site = protected_to_onprem(w)
    store, disks = site["store"], site["disks"]
    completes(w, store, *FAILOVER)
    site["src"].stop()  # the Azure VM is gone
    rng = random.Random(7)  # on-prem life: 2 MiB new on each disk, so the resync takes a while
    for d in disks.values():
        write_blocks(
            d["vmdk"], {i: rng.randbytes(BLOCK) for i in rng.sample(range(SIZE // BLOCK), 32)}
        )
    reverse = reverse_site(
        w,
        {f"app-{n}": str(d["vhd"]) for n, d in disks.items()},
        {f"app-{n}": d["vmdk"] for n, d in disks.items()},
        "--bandwidth-limit", "1M/s",
    )  # fmt: skip
    azure_mt, ps1, proxy, onprem = (reverse[k] for k in ("mt", "ps", "proxy", "src"))
    with Orchestrator(store, w.tls) as o:
        o.register_server("mt-azure", "master-target", f"127.0.0.1:{azure_mt.port}", site="azure")
        o.register_server("ps1", "process-server", f"127.0.0.1:{ps1.port}", site="on-prem")
        vm = o.store.vm("app")
        o.register_vm(
            "app", vm.kind, azure_agent=vm.azure_agent, onprem_agent=f"127.0.0.1:{onprem.port}"
        )
    reverse = ("reverse-reprotect", "app", "--master-target", "mt-azure", "--process-server", "ps1")
    expected = sum(  # what one uninterrupted reverse reprotect moves: the delta, the maps
        delta_cost(read_disk(d["vmdk"]), read_disk(d["vhd"]))[1] + 16 * (SIZE // BLOCK)
        for d in disks.values()
    )

    # 1. the first pair is started on the on-prem agent; the store does not know it yet
    killed_at(w, store, "orchestrator.pair_started", *reverse)
    rows = after_the_kill(w, store, "reverse-reprotect")
    assert {(r["direction"], r["stored_state"]) for r in rows} == {("failback", "failed-over")}
    with Orchestrator(store, w.tls) as o:
        assert o.store.vm("app").phase == "on-prem"

    # 2. the re-run records the pairs, and while bytes move (1 MB/s): kill -9 from outside
    proc = subprocess.Popen(
        replication(
            "orchestrate", reverse[0], "--store", str(store), "--tls-dir", str(w.tls), *reverse[1:]
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with Orchestrator(store, w.tls) as o:
            wait_for(lambda: o.store.pairs("app", "forward"), "the forward pairs recorded", 120)
            # app-os started just now: its 2 MiB take two seconds at least
            moved = proxy.bytes_up
            wait_for(lambda: proxy.bytes_up > moved + (128 << 10), "bytes moving", 120, every=0.05)
            assert proc.poll() is None and o.jobs()[0].state == "running"
    finally:
        proc.kill()
        proc.wait(timeout=10)
    rows = after_the_kill(w, store, "reverse-reprotect")
    forward = [r for r in rows if r["direction"] == "forward"]
    assert len(forward) == 2 and {r["stored_state"] for r in forward} <= {"resyncing", "protected"}

    # 3. the same command again: it waits for what was started, nothing moves twice
    completes(w, store, *reverse)
    assert proxy.bytes_up + proxy.bytes_down <= 1.2 * expected, (proxy.bytes_up, expected)
    with Orchestrator(store, w.tls) as o:
        assert o.store.vm("app").phase == "protected-to-azure"
        assert {p.state for p in o.store.pairs("app", "forward")} == {"protected"}
    for name, d in disks.items():
        assert qemu_same(d["vmdk"], "vmdk", d["vhd"], "vpc"), name
    assert site["mt"].proc.poll() is None and volumes(w, site["mt"]) == set()
    assert not re.search(r"Traceback", (w.root / "mt.log").read_text())

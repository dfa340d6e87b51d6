"""The orchestrator's configuration store: schema and migrations, transactions, jobs,
backup and restore, and a kill -9 in the middle of a transaction."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from replication.errors import (
    JobBusyError,
    StoreCorruptError,
    StoreVersionError,
    UnknownObjectError,
    UnknownVmError,
)
from replication.orchestrator import SCHEMA_VERSION, Disk, Pair, Vm, open_store
from replication.orchestrator.jobs import is_alive, mark_interrupted, process_start, run_job
from replication.orchestrator.store import STORE_FILE


@pytest.fixture
def store(tmp_path):
    with open_store(tmp_path / "store") as s:
        yield s


def add_vm(store, name: str = "web", kind: str = "vmware-vm", disks: int = 1) -> None:
    store.put_vm(Vm(name, kind, azure_agent="127.0.0.1:1"))
    for n in range(disks):
        store.put_disk(Disk(name, f"d{n}", f"uuid-{name}-{n}", 1 << 20))


def test_a_new_store_is_at_the_current_schema_in_wal_mode(tmp_path):
    with open_store(tmp_path / "s") as s:
        assert s.path == tmp_path / "s" / STORE_FILE
    db = sqlite3.connect(tmp_path / "s" / STORE_FILE)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()
    open_store(tmp_path / "s").close()  # reopening migrates nothing and loses nothing


def test_a_store_of_a_newer_schema_is_refused_not_downgraded(tmp_path):
    open_store(tmp_path / "s").close()
    db = sqlite3.connect(tmp_path / "s" / STORE_FILE)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(StoreVersionError) as caught:
        open_store(tmp_path / "s")
    assert "newer" in caught.value.hint


def test_vms_disks_groups_and_plans_round_trip(store):
    add_vm(store, "web", disks=2)
    add_vm(store, "db", "physical")
    vm = store.vm("web")
    assert vm.kind == "vmware-vm" and vm.phase == "in-azure"
    assert [d.name for d in vm.disks] == ["d0", "d1"]
    store.put_group("PG1", ["web", "db"])
    store.put_plan("plan1", ["PG1"])
    assert store.plan_vms("plan1") == ["db", "web"]
    store.put_vm(Vm("web", "vmware-vm", onprem_agent="127.0.0.1:2"))  # update keeps disks
    assert len(store.vm("web").disks) == 2 and store.vm("web").onprem_agent == "127.0.0.1:2"


def test_an_unknown_vm_is_a_typed_error_that_says_to_register_it(store):
    with pytest.raises(UnknownVmError) as caught:
        store.vm("ghost")
    assert "register" in caught.value.hint
    with pytest.raises(UnknownVmError):
        store.put_disk(Disk("ghost", "os", "u", 1))
    with pytest.raises(UnknownObjectError):
        store.plan("nope")


def test_a_failed_change_leaves_the_store_as_it_was(store):
    add_vm(store, "web")
    with pytest.raises(UnknownVmError):
        store.put_group("PG1", ["web", "ghost"])  # web is added first, then ghost fails
    with pytest.raises(UnknownObjectError):
        store.group("PG1")


def test_reprotect_moves_vms_to_the_failback_group_and_its_plans(store):
    add_vm(store, "web")
    store.put_group("PG1", ["web"])
    store.put_plan("plan1", ["PG1"])
    pair = Pair("web", "d0", "failback", "127.0.0.1:1", "web-d0", "ps", "mt", "web-d0")
    store.record_started([pair], {"web": ("failback-protected", "original")}, failback_groups=True)
    assert store.group("PG1").vms == ()
    assert store.group("PG1_Failback").vms == ("web",)
    assert store.group("PG1_Failback").failback_of == "PG1"
    assert store.plan("plan1").groups == ("PG1", "PG1_Failback")
    assert store.plan_vms("plan1") == ["web"]
    assert store.vm("web").location == "original"
    assert store.pairs("web")[0].state == "resyncing"  # a recorded pair starts resyncing


def test_the_failover_record_is_one_transaction(store):
    add_vm(store, "web")
    pair = Pair("web", "d0", "failback", "a:1", "web-d0", "ps", "mt", "web-d0")
    store.record_started([pair], {"web": ("failback-protected", "original")}, False)
    store.record_failover([("web", "d0", "web-d0", "/ds/web.vmdk", "7")], ["web"], "on-prem")
    assert store.vm("web").disks[0].recovered_path == "/ds/web.vmdk"
    assert store.pairs("web")[0].state == "failed-over" and store.pairs("web")[0].point == "7"
    assert store.vm("web").phase == "on-prem"


def test_a_job_on_a_vm_that_a_live_job_works_on_is_refused(store):
    add_vm(store, "web")
    with run_job(store, "reprotect", "web", ["web"], None) as run:
        with pytest.raises(JobBusyError), run_job(store, "failover", "plan1", ["web"], None):
            pass
        run.progress(0.5, "half")
    job = store.job(run.id)
    assert job.state == "succeeded" and job.progress == 1.0


def test_a_failed_job_records_the_error_code(store):
    with pytest.raises(UnknownVmError) as caught, run_job(store, "reprotect", "x", ["x"], None):
        store.vm("x")
    job = store.job(caught.value.job_id)
    assert (job.state, job.error_code) == ("failed", "orchestrator.unknown_vm")


def test_a_job_whose_process_died_is_marked_interrupted(store):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    job = store.create_job("reprotect", "web", ["web"], dead.pid, "123", is_alive)
    live = store.create_job(
        "failover", "p", ["db"], os.getpid(), process_start(os.getpid()), is_alive
    )
    marked = mark_interrupted(store)
    assert [j.id for j in marked] == [job.id]
    assert store.job(job.id).state == "interrupted"
    assert "run reprotect again" in store.job(job.id).message
    assert store.job(live.id).state == "running"
    # a recycled pid is not the job's process: the start time differs
    assert not is_alive(os.getpid(), "1")


def test_backup_is_consistent_while_another_process_writes(store, tmp_path):
    add_vm(store, "web")
    stop = threading.Event()

    def writer() -> None:
        with open_store(store.path.parent) as other:
            n = 0
            while not stop.is_set():
                n += 1
                other.put_vm(Vm(f"vm{n}", "vmware-vm"))

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while len(store.vms()) < 3 and time.monotonic() < deadline:  # the writer is writing
            time.sleep(0.01)
        backups = [store.backup(tmp_path / f"b{i}.sqlite") for i in range(3)]
    finally:
        stop.set()
        thread.join()
    for b in backups:
        db = sqlite3.connect(b)
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        db.close()
    with open_store(tmp_path / "restored") as restored:
        restored.restore(backups[-1])
        assert restored.vm("web").disks[0].uuid == "uuid-web-0"
        assert len(restored.vms()) > 1


def test_restore_replaces_the_content_and_refuses_a_bad_file(store, tmp_path):
    add_vm(store, "web")
    backup = store.backup(tmp_path / "b.sqlite")
    add_vm(store, "db")
    store.restore(backup)
    assert [vm.name for vm in store.vms()] == ["web"]
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database" * 100)
    with pytest.raises(StoreCorruptError):
        store.restore(junk)
    empty = tmp_path / "empty.sqlite"
    sqlite3.connect(empty).close()
    with pytest.raises(StoreCorruptError):
        store.restore(empty)
    assert [vm.name for vm in store.vms()] == ["web"]  # untouched by the refusals


_KILLED_MID_TRANSACTION = """
import os, signal, sys
from replication.orchestrator import Vm, open_store
store = open_store(sys.argv[1])
with store.transaction() as db:
    db.execute("INSERT INTO vms (name, kind) VALUES ('half', 'vmware-vm')")
    db.execute("UPDATE vms SET phase = 'on-prem' WHERE name = 'web'")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_kill_9_inside_a_transaction_changes_nothing(store):
    add_vm(store, "web")
    done = subprocess.run(
        [sys.executable, "-c", _KILLED_MID_TRANSACTION, str(store.path.parent)], timeout=60
    )
    assert done.returncode == -signal.SIGKILL
    with open_store(store.path.parent) as again:
        assert [vm.name for vm in again.vms()] == ["web"]
        assert again.vm("web").phase == "in-azure"

"""Preflight checks, the journey's state table, point resolution and estimates, without
agents (a fake control client stands in where one is needed)."""

from __future__ import annotations

import random
import subprocess
from types import SimpleNamespace

import pytest

from replication import wire
from replication.disks import create_disk
from replication.errors import (
    DatastoreNotWritableError,
    DiskHasSnapshotsError,
    DiskIOError,
    DiskSizeMismatchError,
    DuplicateDiskUuidError,
    OriginalDiskMissingError,
    PhysicalTargetError,
    ServerIdentityError,
    UnknownVmError,
    VolumeExistsError,
    WrongStateError,
)
from replication.orchestrator.estimate import estimate_move
from replication.orchestrator.failover import resolve_point
from replication.orchestrator.model import TRANSITIONS, Disk, Server, Vm, next_phase
from replication.orchestrator.preflight import (
    Preflight,
    check_datastore_writable,
    check_location,
    check_no_snapshots,
    check_server,
    check_size,
    check_unique_uuids,
    check_volume_listed,
)
from tests.helpers import require

MiB = 1 << 20


def vmdk(path, size: int = 4 * MiB, blocks: dict[int, bytes] | None = None):
    with create_disk(str(path), size, format="vmdk", subformat="monolithicSparse") as d:
        for index, data in (blocks or {}).items():
            d.write(index * 65536, data)
        d.flush()
    return path


# -- the collector ----------------------------------------------------------------------


def test_preflight_runs_every_check_then_raises_the_first_failure_with_all_checks():
    pf = Preflight("reprotect")
    assert pf.run("one", lambda: 42, lambda v: f"got {v}") == 42
    pf.run("two", lambda: check_size(10, 5, "vm/os"))
    pf.skip("three", "not reachable")
    pf.run("four", lambda: check_location(Vm("p", "physical"), "original"))
    with pytest.raises(DiskSizeMismatchError) as caught:
        pf.raise_if_failed()
    statuses = [(c.name, c.status) for c in caught.value.checks]
    assert statuses == [
        ("one", "passed"),
        ("two", "failed"),
        ("three", "skipped"),
        ("four", "failed"),
    ]
    failed = caught.value.checks[1]
    assert failed.code == "disk.size_mismatch" and "grow the target" in failed.fix
    assert caught.value.checks[0].detail == "got 42"


def test_preflight_passes_quietly_when_nothing_failed():
    pf = Preflight("failover")
    assert pf.passes("ok", lambda: None)
    assert not pf.passes("bad", lambda: check_size(2, 1, "x"))
    assert not pf.ok


# -- the journey's state table ------------------------------------------------------------


@pytest.mark.parametrize(
    ("phase", "step", "after"),
    [
        ("in-azure", "reprotect", "failback-protected"),
        ("failback-protected", "reprotect", "failback-protected"),
        ("failback-protected", "failover", "on-prem"),
        ("on-prem", "reverse-reprotect", "protected-to-azure"),
        ("protected-to-azure", "reverse-reprotect", "protected-to-azure"),
    ],
)
def test_each_step_leads_to_its_phase_and_can_be_run_again(phase, step, after):
    assert next_phase("vm", phase, step) == after


@pytest.mark.parametrize(
    ("phase", "step", "fix"),
    [
        ("in-azure", "failover", "reprotect the VM first"),
        ("in-azure", "reverse-reprotect", "fail the VM over"),
        ("on-prem", "reprotect", "reverse-reprotect"),
        ("failback-protected", "reverse-reprotect", "fail the VM over"),
    ],
)
def test_a_step_out_of_order_is_refused_naming_the_step_to_run(phase, step, fix):
    assert step not in TRANSITIONS[phase]
    with pytest.raises(WrongStateError) as caught:
        next_phase("vm", phase, step)
    assert fix in caught.value.hint


# -- the scenario's rules -----------------------------------------------------------------


def test_a_physical_server_fails_back_to_a_new_vmdk_only():
    check_location(Vm("p", "physical"), "alternate")
    check_location(Vm("v", "vmware-vm"), "original")
    with pytest.raises(PhysicalTargetError) as caught:
        check_location(Vm("p", "physical"), "original")
    assert "not supported" in caught.value.message and "alternate" in caught.value.hint


def test_duplicate_disk_uuids_name_both_disks_whatever_the_case():
    a, b, c = (
        Disk("web", "os", "6000C29-ABC", 1),
        Disk("db", "os", "6000c29-abc", 1),
        Disk("x", "os", "other", 1),
    )
    check_unique_uuids([c], [a, b, c])
    with pytest.raises(DuplicateDiskUuidError) as caught:
        check_unique_uuids([a], [a, b, c])
    assert "web/os" in caught.value.message and "db/os" in caught.value.message
    assert "new UUID" in caught.value.hint


def test_the_original_vmdk_must_be_registered_and_readable_on_the_master_target():
    volumes = [
        wire.VolumeInfo("web-os", 4 * MiB, "vmdk", "monolithicSparse"),
        wire.VolumeInfo("broken", 0, "", ""),
    ]
    assert check_volume_listed(volumes, "web-os", "web/os").size == 4 * MiB
    with pytest.raises(OriginalDiskMissingError) as caught:
        check_volume_listed(volumes, "db-os", "db/os")
    assert "--volume db-os=PATH" in caught.value.hint and "web-os" in caught.value.message
    with pytest.raises(OriginalDiskMissingError, match="cannot open"):
        check_volume_listed(volumes, "broken", "x")


def test_a_vmdk_with_a_snapshot_child_or_parent_is_refused(tmp_path):
    qemu = require("qemu-img")
    base = vmdk(tmp_path / "base.vmdk")
    assert "no snapshots" in check_no_snapshots(str(base))
    subprocess.run(
        [qemu, "create", "-q", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", "child.vmdk"],
        check=True,
        cwd=tmp_path,
        timeout=30,
    )
    for path in (base, tmp_path / "child.vmdk"):
        with pytest.raises(DiskHasSnapshotsError) as caught:
            check_no_snapshots(str(path))
        assert "consolidate" in caught.value.hint


def test_sizes_must_fit():
    check_size(4 * MiB, 4 * MiB, "vm/os")
    with pytest.raises(DiskSizeMismatchError):
        check_size(4 * MiB + 1, 4 * MiB, "vm/os")


class FakeAgents:
    """Stands in for replication.orchestrator.clients.Agents."""

    def __init__(self, role="master-target", fingerprint="aa" * 32, create_error=None):
        self._role, self._fp, self._error = role, fingerprint, create_error

    def status(self, address, what, *, role):
        return wire.AgentInfo(self._role, "test", 1)

    def fingerprint(self, address):
        return self._fp

    def client(self, address, timeout=None, *, role):
        def create_volume(name, size):
            if self._error:
                raise self._error
            return wire.VolumeInfo(name, size, "vmdk", "monolithicSparse")

        return SimpleNamespace(create_volume=create_volume)


def test_a_server_must_answer_in_its_role_with_its_pinned_certificate():
    mt = Server("mt1", "master-target", "127.0.0.1:1", "on-prem", fingerprint="aa" * 32)
    assert check_server(FakeAgents(), mt).role == "master-target"
    with pytest.raises(ServerIdentityError, match="is a process-server"):
        check_server(FakeAgents(role="process-server"), mt)
    with pytest.raises(ServerIdentityError) as caught:
        check_server(FakeAgents(fingerprint="bb" * 32), mt)
    assert "same addresses" in caught.value.hint


def test_a_datastore_the_master_target_cannot_write_is_the_read_only_account_error():
    mt = Server("mt1", "master-target", "127.0.0.1:1", "on-prem")
    assert check_datastore_writable(FakeAgents(), mt, "vol", MiB).name == "vol"
    error = DiskIOError("create volume directory /ds/vol: [Errno 20] Not a directory")
    with pytest.raises(DatastoreNotWritableError) as caught:
        check_datastore_writable(FakeAgents(create_error=error), mt, "vol", MiB)
    assert "Not a directory" in caught.value.message and "vCenter" in caught.value.hint
    with pytest.raises(VolumeExistsError):  # another size: not a rights problem
        check_datastore_writable(FakeAgents(create_error=VolumeExistsError("size")), mt, "vol", MiB)


def test_an_unknown_vm_error_says_to_register_it(tmp_path):
    from replication.orchestrator import open_store

    with open_store(tmp_path) as store, pytest.raises(UnknownVmError) as caught:
        store.vm("ghost")
    assert "register" in caught.value.hint and "configuration database" in caught.value.hint


# -- points and estimates -------------------------------------------------------------------


def test_points_resolve_like_the_master_target_resolves_them():
    pts = [
        wire.PointMsg(1, 100.0, "crash", "", "", "r1"),
        wire.PointMsg(2, 200.0, "app", "nightly", "", "r2"),
        wire.PointMsg(3, 300.0, "crash", "failover-x", "failover-x", "r3"),
    ]
    assert resolve_point(pts, "latest").id == 3
    assert resolve_point(pts, "latest-app").id == 2
    assert resolve_point(pts, "latest-crash").id == 3
    assert resolve_point(pts, "id:1").id == 1 and resolve_point(pts, "2").id == 2
    assert resolve_point(pts, "tag:nightly").id == 2
    assert resolve_point(pts, "group:failover-x").id == 3
    assert resolve_point(pts, "1970-01-01T00:04:10+00:00").id == 2
    assert resolve_point(pts, "tag:none") is None
    assert resolve_point([], "latest") is None


def test_the_estimate_counts_differing_blocks_or_non_zero_blocks(tmp_path):
    rng = random.Random(1)
    common = {i: rng.randbytes(65536) for i in range(0, 64, 4)}
    changed = {**common, **{i: rng.randbytes(65536) for i in (1, 2, 3)}}
    source = vmdk(tmp_path / "source.vmdk", blocks=changed)
    target = vmdk(tmp_path / "target.vmdk", blocks=common)
    before = target.read_bytes()
    e = estimate_move("vm", "os", str(source), str(target))
    assert (e.blocks, e.bytes) == (3, 3 * 65536) and "locally" in e.method
    assert target.read_bytes() == before  # a dry run writes nothing
    e = estimate_move("vm", "os", str(source), None)
    assert e.blocks == len(changed) and "empty" in e.method
    e = estimate_move("vm", "os", str(tmp_path / "missing.vhd"), str(target))
    assert e.blocks is None and "not reachable" in e.describe()
    assert (
        "3 blocks / 0.000 GiB will move"
        in estimate_move("vm", "os", str(source), str(target)).describe()
    )

"""Preflight: the checks a step runs before any byte moves, reported as a list.

Every check ends ``passed``, ``failed`` (with the typed error's code, message and
fix) or ``skipped`` (it could not be made from here, and why). A step runs all its
read-only checks, then raises the *first* failure's typed error with every check
attached (``err.checks``), so the operator sees the whole picture at once. Checks
that change something (creating the new VMDK in the datastore) run last, only when
all the others passed.

The rules come from the scenario:

* the VM must be in the configuration store ("sinon, la restauration automatique
  échouera");
* the original VMDK must exist on a datastore the chosen master target reaches;
* no snapshots on a target disk ("si des instantanés sont présents ... la
  reprotection échoue. Vous pouvez supprimer les instantanés");
* a physical server always comes back as a new VMDK; failing back onto a physical
  machine is not supported;
* a datastore the master target cannot write is the read-only vCenter account
  symptom: reprotect fails, fix the account (here: the master target's rights on
  its datastore) and retry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

from .. import wire
from ..disks import open_disk
from ..errors import (
    DatastoreNotWritableError,
    DiskHasSnapshotsError,
    DiskSizeMismatchError,
    DuplicateDiskUuidError,
    OriginalDiskMissingError,
    PhysicalTargetError,
    ReplicationError,
    ServerIdentityError,
    UnknownVolumeError,
    UnsupportedFormatError,
)
from .clients import Agents
from .model import Check, Disk, Server, Vm

__all__ = [
    "Preflight",
    "check_datastore_writable",
    "check_location",
    "check_no_snapshots",
    "check_server",
    "check_size",
    "check_unique_uuids",
    "check_volume_listed",
]

T = TypeVar("T")

#: ``Check.status`` values
PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"


class Preflight:
    """Collects checks; :meth:`raise_if_failed` raises the first failure's typed error."""

    def __init__(self, step: str) -> None:
        self.step = step
        self.checks: list[Check] = []
        self._first: ReplicationError | None = None
        self._failures = 0

    def run(
        self, name: str, check: Callable[[], T], detail: str | Callable[[T], str] = ""
    ) -> T | None:
        """Run ``check``; record passed (returning its value) or failed (returning None)."""
        try:
            value = check()
        except ReplicationError as err:
            self.fail(name, err)
            return None
        self.checks.append(Check(name, PASSED, detail(value) if callable(detail) else detail))
        return value

    def passes(self, name: str, check: Callable[[], object], detail: str = "") -> bool:
        """Run ``check`` like :meth:`run`; return whether it passed."""
        before = self._failures
        self.run(name, check, detail)
        return self._failures == before

    def fail(self, name: str, err: ReplicationError) -> None:
        self.checks.append(Check(name, FAILED, err.message, err.hint or "", err.code))
        self._first = self._first or err
        self._failures += 1

    def skip(self, name: str, why: str) -> None:
        self.checks.append(Check(name, SKIPPED, why))

    @property
    def ok(self) -> bool:
        return self._first is None

    def raise_if_failed(self) -> None:
        """Raise the first failure (its ``checks`` attribute holds every check)."""
        if self._first is not None:
            self._first.checks = list(self.checks)  # type: ignore[attr-defined]
            raise self._first


def check_server(agents: Agents, server: Server) -> wire.AgentInfo:
    """The server answers Status, proving its role (``tls.server_role`` otherwise),
    with the pinned certificate."""
    info = agents.status(server.address, f"{server.role} {server.name!r}", role=server.role)
    if info.role != server.role:
        raise ServerIdentityError(
            f"{server.address} is a {info.role}, not the {server.role} {server.name!r}",
            hint="register the server with its right address",
        )
    if server.fingerprint:
        seen = agents.fingerprint(server.address)
        if seen != server.fingerprint:
            raise ServerIdentityError(
                f"{server.role} {server.name!r} at {server.address} presents certificate "
                f"{seen[:16]}..., not the registered {server.fingerprint[:16]}...",
                hint="if the server was rebuilt on purpose, register it again; "
                "a restored configuration server must keep the same addresses",
            )
    return info


def check_unique_uuids(disks: Iterable[Disk], all_disks: Iterable[Disk]) -> None:
    """No disk of the step shares its UUID with another registered disk."""
    owners: dict[str, list[Disk]] = {}
    for disk in all_disks:
        owners.setdefault(disk.uuid.lower(), []).append(disk)
    for disk in disks:
        same = [
            d for d in owners.get(disk.uuid.lower(), []) if (d.vm, d.name) != (disk.vm, disk.name)
        ]
        if same:
            other = same[0]
            raise DuplicateDiskUuidError(
                f"disk {disk.vm}/{disk.name} and disk {other.vm}/{other.name} share UUID "
                f"{disk.uuid}",
                hint="give one of them a new UUID (vmkfstools -J setuuid, or a new ddb.uuid "
                "in its descriptor), then register it again",
            )


def check_location(vm: Vm, location: str) -> None:
    """A physical server fails back to a new VMDK only (alternate location)."""
    if vm.kind == "physical" and location == "original":
        raise PhysicalTargetError(
            f"{vm.name} is a physical server: failing back onto a physical machine is not "
            "supported",
            hint="fail it back to a new VMDK (--location alternate): it comes back as a VM",
        )


def check_volume_listed(volumes: list[wire.VolumeInfo], name: str, what: str) -> wire.VolumeInfo:
    """``name`` is a volume of the master target, and the master target can open it."""
    found = next((v for v in volumes if v.name == name), None)
    if found is None:
        raise OriginalDiskMissingError(
            f"{what}: volume {name!r} is not registered on the master target "
            f"(it has: {', '.join(v.name for v in volumes) or 'none'})",
            hint=f"register the VMDK on the master target (--volume {name}=PATH, on a datastore "
            "its host reaches), or fail back to an alternate location",
        )
    if found.size == 0 or not found.format:
        raise OriginalDiskMissingError(
            f"{what}: the master target cannot open volume {name!r} (missing or unreadable)",
            hint="check that the VMDK exists and that the master target's host reaches its "
            "datastore",
        )
    return found


def check_no_snapshots(path: str) -> str:
    """The VMDK at ``path`` is no snapshot delta and has no snapshot children."""
    try:
        with open_disk(path) as disk:
            info = disk.info()
    except UnsupportedFormatError as err:  # a snapshot extent that cannot even be read
        if "snapshot" not in err.message:
            raise
        raise _snapshot_error(path, err.message) from err
    problems = [n for n in info.notes if "snapshot" in n]
    if info.parent or problems:
        raise _snapshot_error(path, "; ".join(problems) or f"its parent is {info.parent}")
    return f"{path}: no snapshots"


def _snapshot_error(path: str, why: str) -> DiskHasSnapshotsError:
    return DiskHasSnapshotsError(
        f"{path}: the disk is in a snapshot chain ({why})",
        hint="delete or consolidate the VM's snapshots (vSphere: Snapshots > Delete All), "
        "then run reprotect again",
    )


def check_size(source: int, target: int, what: str) -> None:
    """The target volume is at least as large as the source disk."""
    if target < source:
        raise DiskSizeMismatchError(
            f"{what}: the target ({target} bytes) is smaller than the source ({source} bytes)",
            hint="grow the target disk to at least the source's size, or fail back to an "
            "alternate location (a new VMDK of the right size)",
        )


def check_datastore_writable(agents: Agents, mt: Server, name: str, size: int) -> wire.VolumeInfo:
    """Create (idempotently) the new VMDK on the master target's datastore."""
    try:
        return agents.client(mt.address, role=mt.role).create_volume(name, size)
    except UnknownVolumeError:
        raise
    except ReplicationError as err:
        if err.code in ("volume.exists", "volume.invalid_name"):
            raise
        raise DatastoreNotWritableError(
            f"master target {mt.name!r} cannot create {name!r} in its datastore: {err.message}",
            hint="give the master target write access to a datastore (the scenario's read-only "
            "vCenter account: update the credentials to an account with rights), then retry",
        ) from err

"""The orchestrator's Python API: register, then run the failback journey's steps.

::

    from replication.orchestrator import Orchestrator

    with Orchestrator("/var/lib/replication/orchestrator", "/etc/replication/tls") as o:
        o.register_server("mt1", "master-target", "10.0.0.5:9444", site="on-prem")
        o.register_server("ps-azure", "process-server", "10.1.0.4:9443", site="azure")
        o.register_vm("web", "vmware-vm", azure_agent="10.1.0.9:8443")
        o.register_disk("web", "os", uuid="6000C29...", size=40 << 30, original_volume="web-os")
        o.create_group("PG1", ["web"])
        o.create_plan("plan1", ["PG1"])
        o.reprotect(["web"], master_target="mt1", process_server="ps-azure")
        o.failover("plan1", point="latest", shutdown=my_shutdown)
        o.reverse_reprotect(["web"], master_target="mt-azure", process_server="ps1")

Every step returns its finished :class:`~.model.Job` or raises a typed
:class:`~replication.errors.ReplicationError`; a refused preflight's error carries
``checks`` (every :class:`~.model.Check`) and ``job_id``. ``on_progress(job)`` is
called as a step advances (the CLI draws a progress bar with it).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from ..blocks import parse_size
from ..disks import open_disk
from ..errors import JobBusyError, ReplicationError, UsageError
from .clients import SOURCE, Agents
from .estimate import reachable
from .failover import Failover, ShutdownFn
from .jobs import is_alive, mark_interrupted, run_job
from .journey import Journey
from .model import (
    LOCATIONS,
    SERVER_ROLES,
    SITES,
    VM_KINDS,
    Disk,
    Group,
    Job,
    Pair,
    Plan,
    Server,
    Vm,
)
from .pairstates import FAILED_OVER, STOPPED
from .status import pair_rows
from .store import open_store

__all__ = ["DEFAULT_STORE_DIR", "Orchestrator"]

DEFAULT_STORE_DIR = Path(os.environ.get("REPLICATION_STORE", "/var/lib/replication/orchestrator"))
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_ADDRESS = re.compile(r"(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):\d{1,5}")


#: pair states that no longer load a server
_ENDED_PAIR_STATES = (STOPPED, FAILED_OVER)


class Orchestrator:
    """Drives agents through their control services; remembers everything in the store."""

    def __init__(
        self,
        store_dir: str | os.PathLike[str] = DEFAULT_STORE_DIR,
        tls_dir: str | os.PathLike[str] = "/etc/replication/tls",
        *,
        host: str = "localhost",
        server_host: str = "localhost",
        timeout: float = 60.0,
        poll: float = 0.5,
        on_progress: Callable[[Job], None] | None = None,
    ) -> None:
        self.store = open_store(store_dir)
        #: jobs whose orchestrator process died, marked ``interrupted`` at this start
        self.interrupted = mark_interrupted(self.store)
        self.agents = Agents(tls_dir, host=host, server_host=server_host, timeout=timeout)
        self._journey = Journey(self.store, self.agents, poll=poll)
        self.on_progress = on_progress

    def close(self) -> None:
        self.agents.close()
        self.store.close()

    def __enter__(self) -> Orchestrator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- registration -----------------------------------------------------------------

    def register_server(
        self,
        name: str,
        role: str,
        address: str,
        *,
        site: str,
        datastore: str = "",
        fingerprint: str | None = None,
    ) -> Server:
        """Add or update a process server or master target.

        ``fingerprint=None`` reads the server's certificate now and pins it (the
        server must run); ``""`` pins nothing.
        """
        _check_name(name, "server")
        _check_choice(role, SERVER_ROLES, "role")
        _check_choice(site, SITES, "site")
        _check_address(address)
        if fingerprint is None:
            fingerprint = self.agents.fingerprint(address)
        server = Server(name, role, address, site, fingerprint.lower(), datastore)
        self.store.put_server(server)
        return server

    def register_vm(
        self, name: str, kind: str = "vmware-vm", *, azure_agent: str = "", onprem_agent: str = ""
    ) -> Vm:
        """Add or update a VM (its disks: :meth:`register_disk`)."""
        _check_name(name, "VM")
        _check_choice(kind, VM_KINDS, "kind")
        for address in (azure_agent, onprem_agent):
            if address:
                _check_address(address)
        self.store.put_vm(Vm(name, kind, azure_agent, onprem_agent))
        return self.store.vm(name)

    def register_disk(
        self, vm: str, name: str, *, uuid: str = "", size: int | str = 0, **where: str
    ) -> Disk:
        """Add or update a disk of ``vm``; ``where``: the :class:`~.model.Disk` path/name fields.

        An empty ``uuid`` is read from the original VMDK's ``ddb.uuid``; a zero
        ``size`` from the Azure disk or the original VMDK, when readable here.
        """
        _check_name(name, "disk")
        unknown = set(where) - {
            f for f in Disk.__dataclass_fields__ if f not in ("vm", "name", "uuid", "size")
        }
        if unknown:
            raise UsageError(f"unknown disk field(s): {', '.join(sorted(unknown))}")
        size = parse_size(size) if isinstance(size, str) else size
        uuid = uuid or _read_uuid(where.get("original_vmdk", ""))
        size = (
            size
            or _read_size(where.get("azure_path", ""))
            or _read_size(where.get("original_vmdk", ""))
        )
        if not uuid:
            raise UsageError(f"disk {vm}/{name}: give its UUID (no readable VMDK has a ddb.uuid)")
        if size <= 0:
            raise UsageError(f"disk {vm}/{name}: give its size (no readable disk to take it from)")
        disk = Disk(vm, name, uuid, size, **where)
        self.store.put_disk(disk)
        return disk

    def create_group(self, name: str, vms: Iterable[str]) -> Group:
        """Create a protection group (or add VMs to it)."""
        _check_name(name, "group")
        self.store.put_group(name, vms)
        return self.store.group(name)

    def create_plan(self, name: str, groups: Iterable[str]) -> Plan:
        """Create a recovery plan (or append groups to it)."""
        _check_name(name, "plan")
        self.store.put_plan(name, groups)
        return self.store.plan(name)

    # -- the journey ------------------------------------------------------------------

    def reprotect(
        self,
        vms: Sequence[str] = (),
        *,
        plan: str | None = None,
        master_target: str | None = None,
        process_server: str | None = None,
        location: str | None = None,
        dry_run: bool = False,
        wait: bool = True,
        timeout: float = 24 * 3600.0,
    ) -> Job:
        """Step 1: replicate the VMs' Azure disks back to on-prem VMDKs.

        ``location``: ``original`` (the VM's own VMDKs, deltas only; the default for
        VMware VMs) or ``alternate`` (new VMDKs on the master target's datastore;
        always for physical servers). ``dry_run`` stops after the preflight and
        the estimate; ``wait=False`` returns once the pairs are started. Without a
        ``master_target`` (on-prem) or ``process_server`` (Azure), the least loaded
        registered one is chosen (scale-out).
        """
        master_target = master_target or self.least_loaded("master-target", "on-prem")
        process_server = process_server or self.least_loaded("process-server", "azure")
        if location is not None:
            _check_choice(location, LOCATIONS, "location")
        names = self._targets(vms, plan)
        mt, ps = self.store.server(master_target), self.store.server(process_server)
        with self._job("reprotect", plan or ",".join(names), names) as run:
            self._journey.reprotect(
                run, names, mt, ps, location=location, dry_run=dry_run, wait=wait, timeout=timeout
            )
        return run.job

    def failover(
        self,
        plan: str,
        *,
        point: str = "latest",
        writes_stopped: bool = False,
        shutdown: ShutdownFn | None = None,
        timeout: float = 3600.0,
    ) -> Job:
        """Step 2: fail a recovery plan over to on-prem at ``point``.

        ``latest`` needs the Azure VMs' writes stopped: ``shutdown(vm)`` is called
        per VM first, or the caller says so with ``writes_stopped``. The job's
        ``result["recovered"]`` says which VMDK holds each disk's data.
        """
        names = self.store.plan_vms(plan)
        with self._job("failover", plan, names) as run:
            Failover(self._journey).run(
                run, plan, point, writes_stopped=writes_stopped, shutdown=shutdown, timeout=timeout
            )
        return run.job

    def reverse_reprotect(
        self,
        vms: Sequence[str] = (),
        *,
        plan: str | None = None,
        master_target: str,
        process_server: str,
        dry_run: bool = False,
        wait: bool = True,
        timeout: float = 24 * 3600.0,
    ) -> Job:
        """Step 3: replicate the failed-back VMDKs to Azure again (deltas only).

        ``master_target`` is the one beside the Azure disks (site ``azure``);
        ``process_server`` the on-prem one the on-prem source agents use.
        """
        names = self._targets(vms, plan)
        mt, ps = self.store.server(master_target), self.store.server(process_server)
        with self._job("reverse-reprotect", plan or ",".join(names), names) as run:
            self._journey.reverse_reprotect(
                run, names, mt, ps, dry_run=dry_run, wait=wait, timeout=timeout
            )
        return run.job

    # -- scale-out --------------------------------------------------------------------

    def least_loaded(self, role: str, site: str) -> str:
        """The registered server of ``role`` at ``site`` carrying the fewest live pairs."""
        _check_choice(role, SERVER_ROLES, "role")
        names = [s.name for s in self.store.servers() if s.role == role and s.site == site]
        if not names:
            raise UsageError(f"no {role} registered at site {site!r}: register one first")
        field = "process_server" if role == "process-server" else "master_target"
        load = {n: 0 for n in names}
        for pair in self.store.pairs():
            name = getattr(pair, field)
            if name in load and pair.state not in _ENDED_PAIR_STATES:
                load[name] += 1
        return min(names, key=lambda n: (load[n], n))

    def move_pairs(self, vm: str, process_server: str, direction: str = "failback") -> list[Pair]:
        """Move a VM's pairs to another process server, without a resync.

        Each source agent keeps its change tracking and sends its next epochs through
        the new process server (Control.MovePair); the store follows.
        """
        server = self.store.server(process_server)
        if server.role != "process-server":
            raise UsageError(f"{process_server!r} is a {server.role}, not a process server")
        pairs = self.store.pairs(vm, direction)
        if not pairs:
            raise UsageError(f"VM {vm!r} has no {direction} pairs to move")
        for pair in pairs:
            # the cached client: closing it would break the orchestrator's later calls
            client = self.agents.client(pair.source_agent, role=SOURCE)
            client.move_pair(pair.source_disk, server.address)
            self.store.set_pair_process_server(pair.vm, pair.disk, direction, process_server)
        return self.store.pairs(vm, direction)

    # -- reading ----------------------------------------------------------------------

    def status(self) -> list[dict[str, Any]]:
        """One row per pair: stored and live state, RPO, backlog, last recovery points."""
        return pair_rows(self.store, self.agents)

    def jobs(self, limit: int = 50) -> list[Job]:
        return self.store.jobs(limit)

    def job(self, job_id: str) -> Job:
        return self.store.job(job_id)

    def vms(self) -> list[Vm]:
        return self.store.vms()

    def servers(self) -> list[Server]:
        return self.store.servers()

    def groups(self) -> list[Group]:
        return self.store.groups()

    def plans(self) -> list[Plan]:
        return self.store.plans()

    # -- backup -----------------------------------------------------------------------

    def backup(self, file: str | os.PathLike[str]) -> Path:
        """A consistent copy of the store (safe while agents and other orchestrators run)."""
        return self.store.backup(file)

    def restore(self, file: str | os.PathLike[str], *, force: bool = False) -> None:
        """Replace the store with a backup; refused while a job runs (unless ``force``)."""
        running = [job for job, start in self.store.running_jobs() if is_alive(job.pid, start)]
        if running and not force:
            raise JobBusyError(
                f"job {running[0].id} ({running[0].kind}) is running",
                hint="wait for it to end, or restore with --force",
            )
        self.store.restore(file)
        self.interrupted = mark_interrupted(self.store)

    # -- helpers ----------------------------------------------------------------------

    def _targets(self, vms: Sequence[str], plan: str | None) -> list[str]:
        if bool(vms) == bool(plan):
            raise UsageError("name the VMs or a recovery plan (one of the two)")
        return list(vms) if vms else self.store.plan_vms(plan)  # type: ignore[arg-type]

    def _job(self, kind: str, target: str, vms: list[str]):
        return run_job(self.store, kind, target, vms, self.on_progress)


def _check_name(name: str, what: str) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise UsageError(f"invalid {what} name {name!r}: use 1 to 64 of A-Z a-z 0-9 . _ -")


def _check_choice(value: str, choices: Sequence[str], what: str) -> None:
    if value not in choices:
        raise UsageError(f"{what} must be one of {', '.join(choices)}, not {value!r}")


def _check_address(address: str) -> None:
    if not _ADDRESS.fullmatch(address):
        raise UsageError(f"invalid address {address!r}: use HOST:PORT")


def _read_uuid(path: str) -> str:
    if not reachable(path):
        return ""
    try:
        with open_disk(path) as disk:
            return disk.info().uuid or ""
    except ReplicationError:
        return ""


def _read_size(path: str) -> int:
    if not reachable(path):  # a page blob too, with this process's Azure credentials
        return 0
    try:
        with open_disk(path) as disk:
            return disk.virtual_size
    except ReplicationError:
        return 0

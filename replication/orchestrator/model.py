"""What the orchestrator knows: VMs, disks, servers, groups, plans, pairs, jobs, checks.

Plain frozen records, read from and written to the configuration store
(:mod:`.store`). The one piece of logic here is the journey's state table: which
step may run in which phase of a VM, and the phase it leads to.

Phases of a VM (the scenario's three steps, after an earlier failover to Azure)::

    in-azure --reprotect--> failback-protected --failover--> on-prem
    on-prem --reverse-reprotect--> protected-to-azure

A step may be run again in the phase it leads to (after a crash or a failure it
continues: every agent call it makes is idempotent); anything else is refused with
:class:`~replication.errors.WrongStateError` naming the step to run first.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import WrongStateError
from .pairstates import INITIAL

__all__ = [
    "LOCATIONS",
    "SERVER_ROLES",
    "SITES",
    "STEPS",
    "TRANSITIONS",
    "VM_KINDS",
    "Check",
    "Disk",
    "Estimate",
    "Group",
    "Job",
    "Pair",
    "Plan",
    "Server",
    "Vm",
    "next_phase",
]

VM_KINDS = ("vmware-vm", "physical")
SITES = ("on-prem", "azure")
SERVER_ROLES = ("process-server", "master-target")
LOCATIONS = ("original", "alternate")
STEPS = ("reprotect", "failover", "reverse-reprotect")

IN_AZURE = "in-azure"
FAILBACK_PROTECTED = "failback-protected"
ON_PREM = "on-prem"
PROTECTED_TO_AZURE = "protected-to-azure"
PHASES = (IN_AZURE, FAILBACK_PROTECTED, ON_PREM, PROTECTED_TO_AZURE)

#: {phase: {step: next phase}}; the only place that says which step may run when
TRANSITIONS: dict[str, dict[str, str]] = {
    IN_AZURE: {"reprotect": FAILBACK_PROTECTED},
    FAILBACK_PROTECTED: {"reprotect": FAILBACK_PROTECTED, "failover": ON_PREM},
    ON_PREM: {"reverse-reprotect": PROTECTED_TO_AZURE},
    PROTECTED_TO_AZURE: {"reverse-reprotect": PROTECTED_TO_AZURE},
}
_HINTS = {
    "reprotect": "the VM is already back on-prem: protect it to Azure with reverse-reprotect",
    "failover": "reprotect the VM first: its disks must replicate to on-prem",
    "reverse-reprotect": "fail the VM over to on-prem first",
}


def next_phase(vm: str, phase: str, step: str) -> str:
    """Return the phase ``step`` leads ``vm`` to from ``phase``, or raise WrongStateError."""
    after = TRANSITIONS.get(phase, {}).get(step)
    if after is None:
        raise WrongStateError(
            f"{step} does not apply to VM {vm!r}: it is {phase}", hint=_HINTS[step]
        )
    return after


@dataclass(frozen=True)
class Disk:
    """One disk of a VM, and its names on each agent (defaults: ``<vm>-<disk>``)."""

    vm: str
    name: str
    uuid: str
    size: int  # bytes
    original_vmdk: str = ""  # path of the on-prem VMDK ("" for a physical server)
    original_volume: str = ""  # its volume name on the on-prem master target
    azure_disk: str = ""  # disk NAME on the source agent beside the Azure disk
    azure_path: str = ""  # path of the Azure disk, when the orchestrator can read it
    azure_volume: str = ""  # the Azure disk's volume name on the Azure-side master target
    onprem_disk: str = ""  # disk NAME on the on-prem source agent (reverse reprotect)
    recovered_volume: str = ""  # after failover: the volume that holds the data
    recovered_path: str = ""  # ... and its path, when known

    @property
    def key(self) -> str:
        return f"{self.vm}-{self.name}"

    @property
    def alternate_volume(self) -> str:
        """The new VMDK's volume name for an alternate-location failback."""
        return f"{self.key}-failback"


@dataclass(frozen=True)
class Vm:
    """A protected machine: a VMware VM or a physical server."""

    name: str
    kind: str  # "vmware-vm" | "physical"
    azure_agent: str = ""  # control address of the source agent beside its Azure disks
    onprem_agent: str = ""  # ... beside its on-prem VMDKs (reverse reprotect)
    phase: str = IN_AZURE
    location: str = ""  # "original" | "alternate", chosen at reprotect
    disks: tuple[Disk, ...] = ()


@dataclass(frozen=True)
class Server:
    """A process server or master target the orchestrator may use."""

    name: str
    role: str  # "process-server" | "master-target"
    address: str  # HOST:PORT of its listener (control service on the same port)
    site: str  # "on-prem" | "azure"
    fingerprint: str = ""  # hex SHA-256 of its TLS certificate ("" = not pinned)
    datastore: str = ""  # master target: its datastore directory, as seen from here


@dataclass(frozen=True)
class Group:
    """A protection group: VMs protected and failed over together."""

    name: str
    vms: tuple[str, ...] = ()
    failback_of: str = ""  # set on the "<G>_Failback" group reprotect creates


@dataclass(frozen=True)
class Plan:
    """A recovery plan: groups failed over together (one multi-VM consistent cut)."""

    name: str
    groups: tuple[str, ...] = ()


@dataclass(frozen=True)
class Pair:
    """One replication pair the orchestrator started (failback or forward direction)."""

    vm: str
    disk: str
    direction: str  # "failback" (Azure -> on-prem) | "forward" (on-prem -> Azure)
    source_agent: str  # address of the source agent's control listener
    source_disk: str
    process_server: str  # server name
    master_target: str  # server name
    volume: str
    location: str = ""
    state: str = INITIAL  # changed only as the pair state table (.pairstates) allows
    point: str = ""  # failover: the recovery point the data was taken at
    updated: float = 0.0


@dataclass(frozen=True)
class Job:
    """A step run by the orchestrator, as recorded in the store.

    ``state``: ``running``, ``succeeded``, ``failed`` or ``interrupted`` (its process
    died: re-run the step to continue). ``progress`` is 0..1.
    """

    id: str
    kind: str
    target: str
    state: str
    progress: float = 0.0
    message: str = ""
    error_code: str = ""
    error_message: str = ""
    result: dict[str, Any] = field(default_factory=dict)
    vms: tuple[str, ...] = ()
    pid: int = 0
    created: float = 0.0
    updated: float = 0.0

    @property
    def done(self) -> bool:
        return self.state != "running"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["vms"] = list(self.vms)
        return d


@dataclass(frozen=True)
class Check:
    """One preflight check: ``status`` is ``passed``, ``failed`` or ``skipped``."""

    name: str
    status: str
    detail: str = ""
    fix: str = ""
    code: str = ""  # the error code of a failed check

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class Estimate:
    """What a step will move for one disk, computed before any byte moves."""

    vm: str
    disk: str
    blocks: int | None  # None: not computed (disks not reachable from the orchestrator)
    block_size: int
    bytes: int | None
    method: str  # how it was computed, in words

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        if self.blocks is None:
            return f"{self.vm}/{self.disk}: unknown ({self.method})"
        gib = (self.bytes or 0) / (1 << 30)
        return (
            f"{self.vm}/{self.disk}: {self.blocks} blocks / {gib:.3f} GiB will move ({self.method})"
        )

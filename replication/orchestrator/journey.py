"""The failback journey's replication steps: reprotect (Azure -> on-prem) and reverse
reprotect (on-prem -> Azure). Failover is in :mod:`.failover`.

Theory of operation
-------------------
A step is: resolve what it applies to, run its preflight (:mod:`.preflight`: every
read-only check, then the one that creates a new VMDK), estimate what will move
(:mod:`.estimate`), stop there for a dry run, then start one pair per disk on the
source agent beside the source disk and wait (bounded) until every pair is
``protected``. Nothing moves before the preflight passed: the first agent call that
can move a byte is ``StartPair``.

The store is updated in whole transactions at the step's boundaries: the pairs and
the VMs' new phase together once the pairs are started, the pairs' ``protected``
state once they are. A crash anywhere leaves a state from which running the step
again continues: ``StartPair`` is idempotent for the same volume, ``CreateVolume``
for the same size, and the agents hash-compare, so what already moved is not moved
again.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass

from .. import wire
from ..errors import (
    AzureDiskMissingError,
    FailoverInterruptedError,
    PairFailedError,
    ReplicationError,
    UnknownObjectError,
    UnknownVolumeError,
    VolumeHeldError,
    WrongStateError,
)
from ..faults import crash_point
from .clients import PROBE_TIMEOUT, SOURCE, Agents, typed_or_unreachable
from .estimate import estimate_move, reachable
from .jobs import JobRun
from .model import (
    FAILBACK_PROTECTED,
    PROTECTED_TO_AZURE,
    Disk,
    Estimate,
    Pair,
    Server,
    Vm,
    next_phase,
)
from .pairstates import FAILED_OVER, INITIAL, PROTECTED, SEEN_PROTECTED, STOPPED
from .preflight import (
    Preflight,
    check_datastore_writable,
    check_location,
    check_no_snapshots,
    check_server,
    check_size,
    check_unique_uuids,
    check_volume_listed,
)
from .store import Store

__all__ = ["PROTECTED", "Journey", "PairTarget", "volume_path"]

#: how long a pair may stay in ``error`` (the agent retrying) before the step fails
ERROR_GRACE = 120.0


@dataclass(frozen=True)
class PairTarget:
    """What a step will start for one disk: source agent and disk, target volume."""

    vm: Vm
    disk: Disk
    agent: str
    source_disk: str
    volume: str
    location: str
    source_path: str  # for the estimate ("" when unknown)
    target_path: str | None  # None: a new, empty VMDK


def volume_path(mt: Server, volume: str) -> str:
    """Where a volume created on ``mt`` lives, when its datastore is known here."""
    if not mt.datastore:
        return ""
    return os.path.join(mt.datastore, volume, f"{volume}.vmdk")


class Journey:
    """Runs reprotect and reverse reprotect inside jobs."""

    def __init__(self, store: Store, agents: Agents, *, poll: float = 0.5) -> None:
        self.store = store
        self.agents = agents
        self.poll = poll

    # -- reprotect: Azure -> on-prem -------------------------------------------------

    def reprotect(
        self,
        run: JobRun,
        names: list[str],
        mt: Server,
        ps: Server,
        *,
        location: str | None,
        dry_run: bool,
        wait: bool,
        timeout: float,
    ) -> None:
        """Replicate the VMs' Azure disks to on-prem VMDKs (original or new)."""
        pf = Preflight("reprotect")
        vms = self.known_vms(pf, names, "reprotect")
        self._check_servers(pf, mt, ps)
        targets = self._reprotect_targets(pf, vms, mt, location)
        self._finish_preflight(run, pf, targets, mt, dry_run)
        if dry_run:
            run.succeed("dry run: preflight passed, nothing moved")
            return
        pairs = self._start(run, targets, "failback", mt, ps)
        phases = {t.vm.name: (FAILBACK_PROTECTED, t.location) for t in targets}
        self.store.record_started(pairs, phases, failback_groups=True)
        if wait:
            self.wait_protected(run, pairs, timeout)
            run.succeed(f"{len(pairs)} pair(s) protected")
        else:
            run.succeed(f"{len(pairs)} pair(s) started; see `status`")

    def _reprotect_targets(
        self, pf: Preflight, vms: list[Vm], mt: Server, location: str | None
    ) -> list[PairTarget]:
        volumes: dict[str, list | None] = {}  # asked once: "" -> the list, or None
        listed: dict[str, list[wire.VolumeInfo] | str] = {}  # failback MT -> volumes or why not
        targets = []
        for vm in vms:
            where = location or ("alternate" if vm.kind == "physical" else "original")
            name = f"{vm.name} ({vm.kind}): failback to the {where} location"
            if not pf.passes(name, lambda vm=vm, where=where: check_location(vm, where)):
                continue
            self._check_agent(pf, vm.azure_agent, f"source agent beside {vm.name}'s Azure disks")
            released = self._check_failover_finished(pf, vm, listed)
            if where == "original" and "" not in volumes:
                volumes[""] = pf.run("master target lists its volumes", self._volumes(mt))
            for disk in vm.disks:
                if disk.name not in released:  # its only fix is failover: no target to check
                    targets.append(self._reprotect_target(pf, vm, disk, mt, where, volumes.get("")))
        return targets

    def _check_failover_finished(
        self, pf: Preflight, vm: Vm, listed: dict[str, list[wire.VolumeInfo] | str]
    ) -> set[str]:
        """No failover of ``vm`` stopped half way; return the disks it left released.

        A failover that got past releasing a volume (its master target no longer
        lists it, the pair is ``stopped``) has handed that VMDK over: reprotect must
        not start writing it again, and only running failover again finishes the
        step. Without this check reprotect would refuse with "the original VMDK is
        not registered", which sends the operator to the wrong fix.
        """
        stopped = [p for p in self.store.pairs(vm.name, "failback") if p.state == STOPPED]
        if not stopped:
            return set()
        released = []
        for pair in stopped:
            if pair.master_target not in listed:  # asked once per master target
                listed[pair.master_target] = self._listed_or_why(pair.master_target)
            volumes = listed[pair.master_target]
            if not isinstance(volumes, str) and all(v.name != pair.volume for v in volumes):
                released.append(pair)
        name = f"{vm.name}: no failover left half done"
        if not released:
            pf.run(name, lambda: None, "pairs stopped by a failover, no volume released yet")
            return set()
        plans = [p.name for p in self.store.plans() if vm.name in self.store.plan_vms(p.name)]
        which = plans[0] if len(plans) == 1 else "PLAN"
        gone = ", ".join(f"{p.volume} (master target {p.master_target!r})" for p in released)
        pf.fail(
            name,
            FailoverInterruptedError(
                f"a failover of VM {vm.name} was interrupted after releasing {gone}: its "
                "pairs are stopped and the released VMDKs may already belong to the "
                "recovered VM, so reprotect cannot start them again",
                hint=f"run failover again (`replication orchestrate failover {which} ...` with "
                "the same --point): it finishes what is left",
            ),
        )
        return {p.disk for p in released}

    def _reprotect_target(
        self, pf: Preflight, vm: Vm, disk: Disk, mt: Server, where: str, volumes: list | None
    ) -> PairTarget:
        source_size = _real_size(disk.azure_path) or disk.size
        agent_disk = disk.azure_disk or disk.key
        if where == "alternate":
            path = volume_path(mt, disk.alternate_volume)
            target = path if path and os.path.exists(path) else None
            return PairTarget(
                vm,
                disk,
                vm.azure_agent,
                agent_disk,
                disk.alternate_volume,
                where,
                disk.azure_path,
                target,
            )
        name = disk.original_volume or disk.key
        what = f"{vm.name}/{disk.name}: original VMDK"
        volume = self._check_volume(
            pf,
            volumes,
            name,
            f"{what} is registered on {mt.name!r}",
            lambda: check_volume_listed(volumes or [], name, what),
        )
        self._check_snapshots(pf, f"{vm.name}/{disk.name}", disk.original_vmdk)
        self._check_sizes(pf, f"{vm.name}/{disk.name}", source_size, volume)
        return PairTarget(
            vm, disk, vm.azure_agent, agent_disk, name, where, disk.azure_path, disk.original_vmdk
        )

    @staticmethod
    def _check_volume(pf: Preflight, volumes: list | None, name: str, check: str, listed):
        """The volume's listing check; skipped when the master target gave no list."""
        if volumes is None:
            pf.skip(check, "the master target did not list its volumes (see above)")
            return None
        return pf.run(
            check, listed, lambda v: f"volume {v.name}: {v.size} bytes {v.format}/{v.subformat}"
        )

    @staticmethod
    def _check_sizes(pf: Preflight, what: str, source: int, volume) -> None:
        if volume is not None:
            pf.run(
                f"{what}: sizes compatible",
                lambda: check_size(source, volume.size, what),
                f"source {source} <= target {volume.size} bytes",
            )

    def _check_snapshots(self, pf: Preflight, what: str, path: str) -> None:
        name = f"{what}: target disk has no snapshots"
        if not path or not os.path.exists(path):
            pf.skip(
                name,
                f"{path or 'the VMDK'} is not reachable from the orchestrator; the "
                "master target refuses a snapshot chain when it opens the disk",
            )
            return
        pf.run(name, lambda: check_no_snapshots(path), f"{path}: no snapshot chain")

    # -- reverse reprotect: on-prem -> Azure ------------------------------------------

    def reverse_reprotect(
        self,
        run: JobRun,
        names: list[str],
        mt: Server,
        ps: Server,
        *,
        dry_run: bool,
        wait: bool,
        timeout: float,
    ) -> None:
        """Replicate the failed-back VMDKs to the Azure disks again (deltas only)."""
        pf = Preflight("reverse-reprotect")
        vms = self.known_vms(pf, names, "reverse-reprotect")
        self._check_servers(pf, mt, ps)
        volumes = pf.run("Azure-side master target lists its volumes", self._volumes(mt))
        targets = []
        held: dict[str, list[wire.VolumeInfo] | str] = {}  # failback MT -> volumes or why not
        for vm in vms:
            self._check_agent(pf, vm.onprem_agent, f"source agent beside {vm.name}'s VMDKs")
            self._check_forward_stopped(pf, vm)
            self._check_handed_over(pf, vm, held)
            targets += [self._reverse_target(pf, vm, d, mt, volumes) for d in vm.disks]
        self._finish_preflight(run, pf, targets, mt, dry_run)
        if dry_run:
            run.succeed("dry run: preflight passed, nothing moved")
            return
        pairs = self._start(run, targets, "forward", mt, ps)
        phases = {t.vm.name: (PROTECTED_TO_AZURE, None) for t in targets}
        self.store.record_started(pairs, phases, failback_groups=False)
        if wait:
            self.wait_protected(run, pairs, timeout)
            run.succeed(f"{len(pairs)} pair(s) protected to Azure")
        else:
            run.succeed(f"{len(pairs)} pair(s) started; see `status`")

    def _reverse_target(
        self, pf: Preflight, vm: Vm, disk: Disk, mt: Server, volumes: list | None
    ) -> PairTarget:
        name = disk.azure_volume or disk.key
        what = f"{vm.name}/{disk.name}: Azure disk"
        source = disk.recovered_path or disk.original_vmdk
        source_size = _real_size(source) or disk.size
        volume = self._check_volume(
            pf,
            volumes,
            name,
            f"{what} is registered on {mt.name!r}",
            lambda: _listed(volumes or [], name, what, disk.azure_path),
        )
        self._check_sizes(pf, f"{vm.name}/{disk.name}", source_size, volume)
        agent_disk = disk.onprem_disk or disk.key
        return PairTarget(vm, disk, vm.onprem_agent, agent_disk, name, "", source, disk.azure_path)

    def _check_forward_stopped(self, pf: Preflight, vm: Vm) -> None:
        """The failback pairs no longer write the VMDKs (failover stopped them)."""
        running = [p for p in self.store.pairs(vm.name, "failback") if p.state != FAILED_OVER]
        name = f"{vm.name}: failback pairs stopped"
        if running:
            pf.fail(
                name,
                WrongStateError(
                    f"{vm.name}: failback pair(s) {', '.join(p.disk for p in running)} are not "
                    "failed over",
                    hint="run failover for the VM's recovery plan first",
                ),
            )
        else:
            pf.run(name, lambda: None, "failed over")

    def _check_handed_over(
        self, pf: Preflight, vm: Vm, held: dict[str, list[wire.VolumeInfo] | str]
    ) -> None:
        """No master target still owns a recovered VMDK (failover released each one)."""
        disks = {d.name: d for d in vm.disks}
        for pair in self.store.pairs(vm.name, "failback"):
            volume = disks[pair.disk].recovered_volume if pair.disk in disks else ""
            if not volume:
                continue  # not failed over: the check above says so
            name = f"{vm.name}/{pair.disk}: master target {pair.master_target!r} let go of {volume}"
            if pair.master_target not in held:  # asked once per master target
                held[pair.master_target] = self._listed_or_why(pair.master_target)
            listed = held[pair.master_target]
            if isinstance(listed, str):
                pf.skip(name, f"{listed}; a master target that is not running writes nothing")
                continue
            pf.run(name, lambda v=volume, p=pair, ls=listed: _not_held(ls, v, p), "released")

    def _listed_or_why(self, mt_name: str) -> list[wire.VolumeInfo] | str:
        """The volumes of a master target, or why they could not be listed."""
        try:
            mt = self.store.server(mt_name)
            return self.agents.client(mt.address, PROBE_TIMEOUT, role=mt.role).list_volumes()
        except ReplicationError as err:
            return err.message

    # -- shared -----------------------------------------------------------------------

    def known_vms(self, pf: Preflight, names: Iterable[str], step: str) -> list[Vm]:
        vms = []
        for name in names:
            vm = pf.run(
                f"VM {name!r} is in the configuration store", lambda n=name: self.store.vm(n)
            )
            if vm is None:
                continue
            pf.run(
                f"{name}: {step} applies (phase {vm.phase})",
                lambda v=vm: next_phase(v.name, v.phase, step),
            )
            if not vm.disks:
                pf.fail(
                    f"{name}: has disks",
                    UnknownObjectError(
                        f"VM {name!r} has no registered disk",
                        hint="register its disks with `replication orchestrate register-disk`",
                    ),
                )
            vms.append(vm)
        self._check_uuids(pf, vms)
        return vms

    def _check_uuids(self, pf: Preflight, vms: list[Vm]) -> None:
        disks = [d for vm in vms for d in vm.disks]
        if disks:
            pf.run(
                "no two disks share a UUID",
                lambda: check_unique_uuids(disks, self.store.disks()),
                f"{len(disks)} disk UUID(s) unique",
            )

    def _check_servers(self, pf: Preflight, mt: Server, ps: Server) -> None:
        for server in (mt, ps):
            pf.run(
                f"{server.role} {server.name!r} reachable at {server.address}",
                lambda s=server: check_server(self.agents, s),
                lambda info: (
                    f"{info.role} {info.agent_version}, up {info.uptime_seconds} s"
                    + (f"; problems: {'; '.join(info.problems)}" if info.problems else "")
                ),
            )

    def _check_agent(self, pf: Preflight, address: str, what: str) -> None:
        if not address:
            pf.fail(
                f"{what} registered",
                UnknownObjectError(
                    f"no {what} is registered", hint="register-vm --azure-agent/--onprem-agent ADDR"
                ),
            )
            return
        pf.run(
            f"{what} reachable at {address}",
            lambda: self.agents.status(address, what, role=SOURCE),
            lambda info: f"{info.role} {info.agent_version}",
        )

    def _volumes(self, mt: Server):
        def list_volumes() -> list[wire.VolumeInfo]:
            try:
                return self.agents.client(mt.address, role=mt.role).list_volumes()
            except ReplicationError as err:
                raise typed_or_unreachable(err, f"master target {mt.name!r}", mt.address) from err

        return list_volumes

    def _finish_preflight(
        self, run: JobRun, pf: Preflight, targets: list[PairTarget], mt: Server, dry_run: bool
    ) -> None:
        """Estimates, then the datastore check (it creates the new VMDKs), then raise or go."""
        estimates = [self._estimate(t) for t in targets] if pf.ok else []
        for t in targets:
            if t.location != "alternate":
                continue
            name = (
                f"{t.vm.name}/{t.disk.name}: master target can create {t.volume} in its datastore"
            )
            if dry_run or not pf.ok:
                pf.skip(name, "dry run" if dry_run else "an earlier check failed")
            else:
                pf.run(
                    name,
                    lambda t=t: check_datastore_writable(self.agents, mt, t.volume, t.disk.size),
                )
        run.result(
            checks=[c.to_dict() for c in pf.checks], estimates=[e.to_dict() for e in estimates]
        )
        for e in estimates:
            run.note(e.describe())
        pf.raise_if_failed()

    def _estimate(self, t: PairTarget) -> Estimate:
        return estimate_move(t.vm.name, t.disk.name, t.source_path, t.target_path)

    def _start(
        self, run: JobRun, targets: list[PairTarget], direction: str, mt: Server, ps: Server
    ) -> list[Pair]:
        """StartPair for every target; return the pairs (the caller records them)."""
        pairs = []
        for t in targets:
            try:
                info = self.agents.client(t.agent, role=SOURCE).start_pair(t.source_disk, t.volume)
            except ReplicationError as err:
                raise typed_or_unreachable(err, "source agent", t.agent) from err
            crash_point("orchestrator.pair_started")  # a re-run starts it again (idempotent)
            run.note(f"{t.vm.name}/{t.disk.name}: pair {t.source_disk} -> {t.volume} {info.state}")
            pairs.append(
                Pair(
                    t.vm.name,
                    t.disk.name,
                    direction,
                    t.agent,
                    t.source_disk,
                    ps.name,
                    mt.name,
                    t.volume,
                    t.location,
                    INITIAL,
                    updated=time.time(),
                )
            )
        return pairs

    def live_pair(self, pair: Pair) -> wire.PairInfo | None:
        """The source agent's view of ``pair`` (None: the agent runs no such pair)."""
        try:
            info = self.agents.client(pair.source_agent, role=SOURCE).status()
        except ReplicationError as err:
            raise typed_or_unreachable(err, "source agent", pair.source_agent) from err
        return next((p for p in info.pairs if p.disk == pair.source_disk), None)

    def wait_protected(self, run: JobRun, pairs: list[Pair], timeout: float) -> None:
        """Poll the source agents until every pair is protected; bounded by ``timeout``.

        A pair the agent reports in ``error`` is retried by the agent itself; if it
        stays in error for ERROR_GRACE seconds the step fails with the agent's
        reason (running the step again keeps waiting).
        """
        deadline = time.monotonic() + timeout
        failing: dict[Pair, float] = {}
        while True:
            infos = [self._ensure_running(p) for p in pairs]
            done = sum(1 for i in infos if i.state == PROTECTED)
            run.progress(_fraction(infos), f"{done}/{len(pairs)} pair(s) protected")
            if done == len(pairs):
                break
            _check_errors(pairs, infos, failing)
            if time.monotonic() > deadline:
                raise PairFailedError(
                    f"pairs not protected after {timeout:g} s: {_states(pairs, infos)}",
                    hint="see the source agent's log; run the step again to keep waiting",
                )
            time.sleep(self.poll)
        for p in pairs:
            self.store.set_pair_state(p.vm, p.disk, p.direction, PROTECTED, event=SEEN_PROTECTED)

    def _ensure_running(self, pair: Pair) -> wire.PairInfo:
        """The pair's live state; started again if its agent lost it (a restart)."""
        info = self.live_pair(pair)
        if info is None or info.state == "stopped":
            client = self.agents.client(pair.source_agent, role=SOURCE)
            info = client.start_pair(pair.source_disk, pair.volume)
        if info.volume != pair.volume:
            raise WrongStateError(
                f"disk {pair.source_disk} on {pair.source_agent} replicates to {info.volume!r}, "
                f"not {pair.volume!r}",
                hint="stop that pair first",
            )
        return info


def _check_errors(pairs: list[Pair], infos: list[wire.PairInfo], failing: dict) -> None:
    """Raise once a pair has been in ``error`` for ERROR_GRACE seconds in a row."""
    now = time.monotonic()
    for pair, info in zip(pairs, infos, strict=True):
        if info.state != "error":
            failing.pop(pair, None)
        elif now - failing.setdefault(pair, now) > ERROR_GRACE:
            raise PairFailedError(
                f"{pair.vm}/{pair.disk}: pair {pair.source_disk} -> {pair.volume} keeps failing: "
                f"{info.error}",
                hint="fix the cause the source agent reports, then run the step again",
            )


def _states(pairs: list[Pair], infos: list[wire.PairInfo]) -> str:
    return ", ".join(
        f"{p.disk} {i.state} {i.error}".strip() for p, i in zip(pairs, infos, strict=True)
    )


def _fraction(infos: list[wire.PairInfo]) -> float:
    total = 0.0
    for i in infos:
        if i.state == PROTECTED:
            total += 1.0
        elif i.blocks_total:
            total += min(1.0, i.blocks_done / i.blocks_total)
    return total / max(1, len(infos))


def _listed(volumes: list[wire.VolumeInfo], name: str, what: str, path: str) -> wire.VolumeInfo:
    found = next((v for v in volumes if v.name == name), None)
    if found is not None and (found.size == 0 or not found.format):
        # registered but unopenable: for a page blob, missing or out of the MT's credentials
        raise AzureDiskMissingError(
            f"{what}: the master target cannot open volume {name!r}"
            + (f" ({path})" if path else "")
            + ": it does not exist, or the master target may not read it",
            hint="create the Azure disk (a page blob: `replication disk create pageblob+URL "
            "SIZE --format vhd`; a file: a fixed VHD), or give the master target the Azure "
            "credentials for it (AZURE_STORAGE_KEY, docs/pageblob.md)",
        )
    try:
        return check_volume_listed(volumes, name, what)
    except ReplicationError as err:
        raise UnknownVolumeError(
            err.message,
            hint=f"register the Azure disk on the Azure-side master target (--volume {name}=PATH)",
        ) from err


def _not_held(volumes: list[wire.VolumeInfo], volume: str, pair: Pair) -> None:
    if any(v.name == volume for v in volumes):
        raise VolumeHeldError(
            f"{pair.vm}/{pair.disk}: {volume} is still a volume of master target "
            f"{pair.master_target!r}, which may write the VMDK the reverse pair reads",
            hint=f"release it (`replication agent release-volume ADDRESS {volume}` on the "
            "master target; failover does it), then run reverse-reprotect again",
        )


def _real_size(path: str) -> int:
    """The virtual size of the disk at ``path`` (a file or a page blob), or 0 if it
    cannot be read from here."""
    if not reachable(path):
        return 0
    from ..disks import open_disk

    try:
        with open_disk(path) as disk:
            return disk.virtual_size
    except ReplicationError:
        return 0

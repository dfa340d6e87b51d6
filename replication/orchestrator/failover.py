"""Failover to on-prem of a recovery plan: stop the Azure side, settle on a point,
and say which VMDK holds each disk's data.

Theory of operation
-------------------
*Which point.* ``latest`` means "everything the Azure VMs acknowledged": their
writes must have stopped first (the scenario: Site Recovery shuts the Azure VMs
down), either by the caller's ``shutdown`` hook or by its word
(``writes_stopped``). Then the pairs are *drained*:

* tracked pairs (epochs): one group cut across every source agent of the plan
  (PrepareCut on all, then CommitCut on all: a multi-VM consistent cut), and a
  wait until the master target lists that cut's point on every volume, i.e. every
  write before the cut is PERSISTED;
* rescan pairs (hash compare, no points): StopPair, StartPair, and a wait until
  ``protected``: a whole comparison that began after the writes stopped.

Only then is each pair stopped. The volume the pair wrote now holds the data: for
an original-location failback that is the original VMDK, for an alternate one the
new VMDK on the master target's datastore. Nothing is copied.

Any other point (``latest-app``, ``latest-crash``, ``latest-consistent``: the
newest group cut present on every volume of the plan, an id, ``tag:X``,
``group:X``, an ISO time) is resolved on every volume first (refused before
anything stops if one volume lacks it), the pairs are stopped, and the master
target produces a new VMDK per disk at that point (``ProduceDisk``, verified
against the point's manifest).

*Handing over.* Last, the master target releases each volume that now holds a
recovered disk (``ReleaseVolume``): it closes its handles and no longer owns it, so
the recovered VM (and the reverse reprotect's source agent) may write the VMDK while
the master target keeps serving its other volumes. Only then is the failover
recorded: a crash before that record leaves the pairs ``stopped`` and a re-run
produces and releases again (both idempotent).

*Re-running.* A pair's store state records how far it got (``drained`` with its
point, then ``stopped``); a second run skips what is done and finishes the rest.
"""

from __future__ import annotations

import datetime as dt
import subprocess
import time
from collections.abc import Callable

from .. import wire
from ..errors import (
    OrchestratorError,
    PairFailedError,
    PointNotFoundError,
    ReplicationError,
    ServerUnreachableError,
    UnknownObjectError,
    UsageError,
    VolumeInUseError,
    WrongStateError,
)
from ..faults import crash_point
from .clients import SOURCE, typed_or_unreachable
from .jobs import JobRun
from .journey import Journey, volume_path
from .model import ON_PREM, Pair, Server, Vm
from .pairstates import DRAIN, DRAINED, FAILED_OVER, PROTECTED, STOP, STOPPED
from .preflight import Preflight, check_server

__all__ = ["Failover", "resolve_point", "shell_shutdown"]

#: how long a prepared group cut may hold the Azure side's writes
CUT_HOLD = 60.0
#: deadline of ProduceDisk (the master target copies and verifies a whole disk)
PRODUCE_TIMEOUT = 3600.0
#: how long a release may wait for the data session of a just-stopped pair to end
RELEASE_WAIT = 60.0

ShutdownFn = Callable[[Vm], None]


def shell_shutdown(command: str) -> ShutdownFn:
    """A shutdown hook that runs ``sh -c command`` with ``REPLICATION_VM`` set."""

    def shutdown(vm: Vm) -> None:
        import os

        env = dict(os.environ, REPLICATION_VM=vm.name)
        done = subprocess.run(
            ["sh", "-c", command], env=env, capture_output=True, text=True, timeout=600
        )
        if done.returncode != 0:
            raise OrchestratorError(
                f"shutdown command for VM {vm.name} exited {done.returncode}: "
                f"{done.stderr.strip()[:200]}",
                hint="shut the Azure VM down by hand, then run failover with --writes-stopped",
            )

    return shutdown


class Failover:
    """Runs the failover step inside a job."""

    def __init__(self, journey: Journey) -> None:
        self.journey = journey
        self.store = journey.store
        self.agents = journey.agents

    def run(
        self,
        run: JobRun,
        plan: str,
        point: str,
        *,
        writes_stopped: bool,
        shutdown: ShutdownFn | None,
        timeout: float,
    ) -> None:
        pf = Preflight("failover")
        vms, pairs, servers = self._preflight_pairs(pf, plan)
        live = self._check_live(pf, pairs, point)
        points: dict[Pair, wire.PointMsg] = {}
        if point == "latest":
            self._check_stopped(pf, writes_stopped or shutdown is not None)
        else:
            points = self._resolve_all(pf, pairs, servers, point)
        run.result(checks=[c.to_dict() for c in pf.checks])
        pf.raise_if_failed()
        if not pairs:
            run.succeed("nothing to fail over: every VM of the plan is on-prem already")
            return
        for vm in vms:
            if shutdown is not None:
                run.note(f"{vm.name}: shutting down the Azure VM")
                shutdown(vm)
        if point == "latest":
            pairs = self._drain(run, pairs, live, servers, timeout)
        self._stop(run, pairs, tolerate_unreachable=point != "latest")
        self._recover(run, vms, pairs, servers, points)
        run.succeed(f"{len(vms)} VM(s) failed over to on-prem")

    # -- preflight --------------------------------------------------------------------

    def _preflight_pairs(
        self, pf: Preflight, plan: str
    ) -> tuple[list[Vm], list[Pair], dict[str, Server]]:
        names = pf.run(f"recovery plan {plan!r} exists", lambda: self.store.plan_vms(plan))
        todo = [n for n in names or [] if not self._on_prem(n)]
        if names and not todo:
            return [], [], {}
        vms = self.journey.known_vms(pf, todo, "failover")
        pairs = [p for vm in vms for p in self._vm_pairs(pf, vm)]
        servers = {}
        for name in sorted({p.master_target for p in pairs}):
            server = pf.run(
                f"master target {name!r} registered", lambda n=name: self.store.server(n)
            )
            if server is not None:
                servers[name] = server
                pf.run(
                    f"master target {name!r} reachable at {server.address}",
                    lambda s=server: check_server(self.agents, s),
                    lambda info: f"{info.role} {info.agent_version}",
                )
        return vms, pairs, servers

    def _on_prem(self, name: str) -> bool:
        try:
            return self.store.vm(name).phase == ON_PREM
        except ReplicationError:
            return False  # the preflight reports an unknown VM

    def _vm_pairs(self, pf: Preflight, vm: Vm) -> list[Pair]:
        pairs = {p.disk: p for p in self.store.pairs(vm.name, "failback")}
        missing = [d.name for d in vm.disks if d.name not in pairs]
        if missing:
            pf.fail(
                f"{vm.name}: every disk has a failback pair",
                WrongStateError(
                    f"{vm.name}: disk(s) {', '.join(missing)} have no failback pair",
                    hint="run reprotect for the VM first",
                ),
            )
        return [pairs[d.name] for d in vm.disks if d.name in pairs]

    def _check_live(
        self, pf: Preflight, pairs: list[Pair], point: str
    ) -> dict[Pair, wire.PairInfo | None]:
        """Each pair's live state; for ``latest`` it must be protected (or drained before)."""
        live: dict[Pair, wire.PairInfo | None] = {}
        for p in pairs:
            name = f"{p.vm}/{p.disk}: pair {p.source_disk} -> {p.volume} is protected"
            info = live[p] = self._live_pair(pf, p, point)
            if p.state in (DRAINED, STOPPED, FAILED_OVER):
                pf.run(name, lambda: None, f"{p.state} by an earlier run (point {p.point or '-'})")
            elif point == "latest":
                pf.run(name, lambda p=p, i=info: _require_protected(p, i), "protected")
        return live

    def _live_pair(self, pf: Preflight, pair: Pair, point: str) -> wire.PairInfo | None:
        """The agent's view of the pair. Only ``latest`` needs the Azure side alive: a
        recovery point is on the master target, whatever became of Azure."""
        name = f"{pair.vm}/{pair.disk}: source agent reachable at {pair.source_agent}"
        try:
            info = self.journey.live_pair(pair)
        except ServerUnreachableError as err:
            if point == "latest":
                pf.fail(name, err)
            else:
                pf.skip(name, f"{err.message}; its pair is left as it is")
            return None
        pf.run(name, lambda: info, "answers")
        return info

    def _check_stopped(self, pf: Preflight, stopped: bool) -> None:
        name = "the Azure VMs' writes are stopped (nothing acknowledged is lost)"
        if stopped:
            pf.run(name, lambda: None, "shutdown hook or caller's word")
            return
        pf.fail(
            name,
            WrongStateError(
                "failover to the latest point needs the Azure VMs shut down first",
                hint="give --shutdown-command CMD (run per VM) or, once they are down, "
                "--writes-stopped; or choose a recovery point (--point latest-crash)",
            ),
        )

    def _resolve_all(
        self, pf: Preflight, pairs: list[Pair], servers: dict[str, Server], spec: str
    ) -> dict[Pair, wire.PointMsg]:
        listed = {}
        for p in pairs:
            if p.master_target in servers:
                listed[p] = pf.run(
                    f"{p.vm}/{p.disk}: recovery points of {p.volume}",
                    lambda p=p: self._points(servers[p.master_target], p.volume),
                    lambda pts: f"{len(pts)} point(s)",
                )
        if spec == "latest-consistent" and all(v is not None for v in listed.values()):
            spec = (
                pf.run(
                    "a multi-VM consistent point is on every volume",
                    lambda: _latest_common_group(listed),  # type: ignore[arg-type]
                    lambda s: s,
                )
                or spec
            )
        points = {}
        for p, pts in listed.items():
            if pts is not None:
                found = pf.run(
                    f"{p.vm}/{p.disk}: point {spec!r} exists on {p.volume}",
                    lambda p=p, pts=pts: _found(resolve_point(pts, spec), p, spec),
                    lambda pt: f"point {pt.id} ({pt.kind}{', ' + pt.tag if pt.tag else ''})",
                )
                if found is not None:
                    points[p] = found
        return points

    def _points(self, mt: Server, volume: str) -> list[wire.PointMsg]:
        try:
            return self.agents.client(mt.address, role=mt.role).list_points(volume)
        except ReplicationError as err:
            raise typed_or_unreachable(err, f"master target {mt.name!r}", mt.address) from err

    # -- drain and stop ---------------------------------------------------------------

    def _drain(
        self,
        run: JobRun,
        pairs: list[Pair],
        live: dict[Pair, wire.PairInfo | None],
        servers: dict[str, Server],
        timeout: float,
    ) -> list[Pair]:
        """Bring every volume level with the stopped Azure disks; return updated pairs."""
        todo = [p for p in pairs if p.state not in (DRAINED, STOPPED, FAILED_OVER)]
        tracked = [p for p in todo if (i := live.get(p)) is not None and i.mode == "tracked"]
        if tracked:
            self._group_cut(run, tracked, servers, timeout)
        for p in todo:
            if p not in tracked:
                self._final_rescan(run, p, timeout)
        return [_reload(self.store, p) for p in pairs]

    def _group_cut(
        self, run: JobRun, pairs: list[Pair], servers: dict[str, Server], timeout: float
    ) -> None:
        name = f"failover-{run.id}"
        by_agent: dict[str, list[str]] = {}
        for p in pairs:
            by_agent.setdefault(p.source_agent, []).append(p.source_disk)
        specs = {
            a: wire.TagSpec("crash", name, name, tuple(d), CUT_HOLD) for a, d in by_agent.items()
        }
        run.note(f"cutting {len(pairs)} disk(s) on {len(specs)} source agent(s) at one moment")
        for agent, spec in specs.items():  # every agent holds writes before any cuts
            self._agent_call(agent, lambda c, s=spec: c.prepare_cut(s))
        crash_point("orchestrator.cut_prepared")  # a re-run cuts anew; these holds expire
        for agent, spec in specs.items():
            self._agent_call(agent, lambda c, s=spec: c.commit_cut(s))
        self._wait_points(run, pairs, servers, name, timeout)

    def _wait_points(
        self, run: JobRun, pairs: list[Pair], servers: dict[str, Server], group: str, timeout: float
    ) -> None:
        """Until the cut's point is listed (i.e. PERSISTED) on every volume."""
        deadline = time.monotonic() + timeout
        waiting = list(pairs)
        while waiting:
            for p in list(waiting):
                pts = self._points(servers[p.master_target], p.volume)
                found = resolve_point(pts, f"group:{group}")
                if found is not None:
                    self.store.set_pair_state(
                        p.vm, p.disk, p.direction, DRAINED, str(found.id), event=DRAIN
                    )
                    waiting.remove(p)
            run.progress(
                1 - len(waiting) / len(pairs),
                f"{len(pairs) - len(waiting)}/{len(pairs)} volume(s) at the cut",
            )
            if waiting and time.monotonic() > deadline:
                raise PairFailedError(
                    f"the failover cut {group} was not PERSISTED on "
                    f"{', '.join(p.volume for p in waiting)} within {timeout:g} s",
                    hint="see the source agent and process server; run failover again",
                )
            if waiting:
                time.sleep(self.journey.poll)

    def _final_rescan(self, run: JobRun, pair: Pair, timeout: float) -> None:
        run.note(f"{pair.vm}/{pair.disk}: final comparison after the Azure VM stopped")
        self._agent_call(pair.source_agent, lambda c: c.stop_pair(pair.source_disk))
        self._agent_call(pair.source_agent, lambda c: c.start_pair(pair.source_disk, pair.volume))
        self.journey.wait_protected(run, [pair], timeout)
        stamp = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        self.store.set_pair_state(
            pair.vm, pair.disk, pair.direction, DRAINED, f"level at {stamp}", event=DRAIN
        )

    def _stop(self, run: JobRun, pairs: list[Pair], *, tolerate_unreachable: bool) -> None:
        for p in pairs:
            if p.state in (STOPPED, FAILED_OVER):
                continue
            try:
                info = self._agent_call(p.source_agent, lambda c, p=p: c.stop_pair(p.source_disk))
            except ServerUnreachableError as err:
                if not tolerate_unreachable:
                    raise
                run.note(f"{p.vm}/{p.disk}: pair not stopped ({err.message})")
                continue
            run.note(f"{p.vm}/{p.disk}: pair {p.source_disk} -> {p.volume} {info.state}")
            self.store.set_pair_state(p.vm, p.disk, p.direction, STOPPED, event=STOP)

    def _agent_call(self, address: str, call):
        try:
            return call(self.agents.client(address, role=SOURCE))
        except ReplicationError as err:
            raise typed_or_unreachable(err, "source agent", address) from err

    # -- where the data is ------------------------------------------------------------

    def _recover(
        self,
        run: JobRun,
        vms: list[Vm],
        pairs: list[Pair],
        servers: dict[str, Server],
        points: dict[Pair, wire.PointMsg],
    ) -> None:
        disks = {(d.vm, d.name): d for vm in vms for d in vm.disks}
        rows, recovered = [], []
        for p in pairs:
            mt = servers[p.master_target]
            if p in points:
                volume, label = self._produce(run, p, mt, points[p]), str(points[p].id)
                path = volume_path(mt, volume)
            else:
                volume, label = p.volume, _reload(self.store, p).point
                orig = disks[(p.vm, p.disk)].original_vmdk
                path = orig if p.location == "original" else volume_path(mt, volume)
            self._release(run, p, mt, volume)
            crash_point("orchestrator.failover_released")
            recovered.append((p.vm, p.disk, volume, path, label))
            rows.append(
                {"vm": p.vm, "disk": p.disk, "volume": volume, "path": path, "point": label}
            )
            run.note(f"{p.vm}/{p.disk}: data in {path or volume} (point {label or '-'})")
        run.result(recovered=rows)
        self.store.record_failover(recovered, [vm.name for vm in vms], ON_PREM)

    def _release(self, run: JobRun, pair: Pair, mt: Server, volume: str) -> None:
        """The master target lets go of ``volume``: the recovered VM's disk is its own now.

        The stopped pair's last session may still be closing on the master target: a
        refusal for that (VolumeInUseError, retryable) is retried for RELEASE_WAIT s.
        """
        deadline = time.monotonic() + RELEASE_WAIT
        while True:
            try:
                self.agents.client(mt.address, role=mt.role).release_volume(volume)
                break
            except VolumeInUseError as err:
                if time.monotonic() > deadline:
                    raise VolumeInUseError(
                        f"{pair.vm}/{pair.disk}: master target {mt.name!r} still writes "
                        f"{volume} after {RELEASE_WAIT:g} s: {err.message}",
                        hint="stop what replicates into it (`replication agent status` on the "
                        "process server), then run failover again",
                    ) from err
                time.sleep(self.journey.poll)
            except ReplicationError as err:
                raise typed_or_unreachable(err, f"master target {mt.name!r}", mt.address) from err
        run.note(f"{pair.vm}/{pair.disk}: master target {mt.name!r} released {volume}")

    def _produce(self, run: JobRun, pair: Pair, mt: Server, point: wire.PointMsg) -> str:
        name = f"{pair.volume}-p{point.id}"[-64:]
        run.note(f"{pair.vm}/{pair.disk}: producing {name} at point {point.id}")
        client = self.agents.client(mt.address, PRODUCE_TIMEOUT, role=mt.role)
        try:
            volume, _ = client.produce_disk(pair.volume, str(point.id), name)
        except ReplicationError as err:
            raise typed_or_unreachable(err, f"master target {mt.name!r}", mt.address) from err
        return volume.name


# -- points ---------------------------------------------------------------------------


def resolve_point(points: list[wire.PointMsg], spec: str) -> wire.PointMsg | None:
    """The point ``spec`` names among ``points`` (the master target's own rules)."""
    newest = sorted(points, key=lambda p: (p.time, p.id), reverse=True)
    if spec == "latest":
        return newest[0] if newest else None
    if spec in ("latest-app", "latest-crash"):
        return next((p for p in newest if p.kind == spec.removeprefix("latest-")), None)
    if spec.isdigit() or spec.startswith("id:"):
        wanted = int(spec.removeprefix("id:"))
        return next((p for p in newest if p.id == wanted), None)
    for prefix, attr in (("group:", "group"), ("tag:", "tag")):
        if spec.startswith(prefix):
            return next((p for p in newest if getattr(p, attr) == spec[len(prefix) :]), None)
    try:
        when = dt.datetime.fromisoformat(spec).timestamp()
    except ValueError:
        raise UsageError(
            f"cannot read point {spec!r}: use latest, latest-app, latest-crash, "
            "latest-consistent, an id, group:<id>, tag:<name> or an ISO 8601 time"
        ) from None
    return next((p for p in newest if p.time <= when), None)


def _latest_common_group(listed: dict[Pair, list[wire.PointMsg]]) -> str:
    """``group:<id>`` of the newest group cut present on every volume."""
    common: set[str] | None = None
    newest: dict[str, float] = {}
    for pts in listed.values():
        groups = {p.group for p in pts if p.group}
        common = groups if common is None else common & groups
        for p in pts:
            if p.group:
                newest[p.group] = max(newest.get(p.group, 0.0), p.time)
    if not common:
        raise PointNotFoundError(
            "no multi-VM consistent point (group cut) is on every volume of the plan",
            hint="make one with a group cut (`replication tag --group ID` on every agent), "
            "or choose latest-crash",
        )
    return "group:" + max(common, key=lambda g: newest[g])


def _found(point: wire.PointMsg | None, pair: Pair, spec: str) -> wire.PointMsg:
    if point is None:
        raise PointNotFoundError(
            f"{pair.volume} has no recovery point matching {spec!r}",
            hint="list them with `replication recovery-points`; tracked pairs (--state-dir) "
            "make points, rescan pairs do not",
        )
    return point


def _require_protected(pair: Pair, info: wire.PairInfo | None) -> None:
    if info is None or info.state != PROTECTED:
        state = "not running" if info is None else f"{info.state} {info.error}".strip()
        raise WrongStateError(
            f"{pair.vm}/{pair.disk}: pair {pair.source_disk} -> {pair.volume} is {state}",
            hint="wait until reprotect shows it protected (`replication orchestrate status`), "
            "or run reprotect again",
        )


def _reload(store, pair: Pair) -> Pair:
    for p in store.pairs(pair.vm, pair.direction):
        if p.disk == pair.disk:
            return p
    raise UnknownObjectError(f"pair {pair.vm}/{pair.disk} vanished from the store")

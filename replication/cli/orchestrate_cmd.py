"""``replication orchestrate ...`` and ``replication store ...``: the orchestrator's CLI.

A thin shell over :class:`replication.orchestrator.Orchestrator`: every verb takes
``--store DIR`` (the configuration store) and ``--json``. A step prints its
preflight checks and its estimate, draws a progress bar on a terminal, and ends
with its job. A refused step prints every check (the failed ones with their fix),
then the usual one-line error and exit status.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from ..blocks import parse_size
from ..errors import ReplicationError

_STORE_HELP = "configuration store directory (default $REPLICATION_STORE or /var/lib/...)"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("orchestrate", help="failback journey: register, reprotect, failover")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    _register_verbs(verbs)
    _step_verbs(verbs)
    _verb(verbs, "status", "pairs: state, RPO, backlog, last recovery points", _status)
    v = _verb(verbs, "jobs", "jobs and their progress (one job with its ID)", _jobs)
    v.add_argument("id", nargs="?")
    _verb(verbs, "list", "VMs, servers, groups and plans in the store", _list)
    s = sub.add_parser("store", help="back up or restore the orchestrator's configuration store")
    store_verbs = s.add_subparsers(dest="verb", metavar="VERB", required=True)
    v = _verb(store_verbs, "backup", "consistent copy of the store (safe while all runs)", _backup)
    v.add_argument("file", type=Path)
    v = _verb(store_verbs, "restore", "replace the store with a backup", _restore)
    v.add_argument("file", type=Path)
    v.add_argument("--force", action="store_true", help="even while a job runs")


def _register_verbs(verbs) -> None:
    v = _verb(verbs, "register-server", "add a process server or master target", _reg_server)
    v.add_argument("name")
    v.add_argument("--role", required=True, choices=("process-server", "master-target"))
    v.add_argument("--address", required=True, help="HOST:PORT")
    v.add_argument("--site", required=True, choices=("on-prem", "azure"))
    v.add_argument("--datastore", default="", help="master target's datastore dir, seen from here")
    v.add_argument("--fingerprint", help="certificate SHA-256 (default: read it now)")
    v.add_argument("--no-pin", action="store_true", help="do not pin its certificate")
    v = _verb(verbs, "register-vm", "add a VMware VM or physical server", _reg_vm)
    v.add_argument("name")
    v.add_argument("--kind", default="vmware-vm", choices=("vmware-vm", "physical"))
    v.add_argument("--azure-agent", default="", help="source agent beside its Azure disks")
    v.add_argument("--onprem-agent", default="", help="source agent beside its on-prem VMDKs")
    v = _verb(verbs, "register-disk", "add a disk of a registered VM", _reg_disk)
    v.add_argument("vm")
    v.add_argument("name")
    v.add_argument("--uuid", default="", help="default: ddb.uuid of --original-vmdk")
    v.add_argument("--size", type=parse_size, default=0, help="default: read from the disks")
    for field in ("original-vmdk", "original-volume", "azure-disk", "azure-path"):
        v.add_argument(f"--{field}", default="")
    v.add_argument("--azure-volume", default="")
    v.add_argument("--onprem-disk", default="")
    v = _verb(verbs, "create-group", "a protection group of VMs", _group)
    v.add_argument("name")
    v.add_argument("vms", nargs="+")
    v = _verb(verbs, "create-plan", "a recovery plan of groups", _plan)
    v.add_argument("name")
    v.add_argument("groups", nargs="+")


def _step_verbs(verbs) -> None:
    for name, func, text in (
        ("reprotect", _reprotect, "step 1: replicate Azure disks back to on-prem"),
        ("reverse-reprotect", _reverse, "step 3: replicate on-prem VMDKs to Azure again"),
    ):
        v = _verb(verbs, name, text, func)
        v.add_argument("vms", nargs="*", help="the VMs (or --plan)")
        v.add_argument("--plan", help="every VM of a recovery plan")
        required = name == "reverse-reprotect"  # reprotect picks the least loaded ones
        v.add_argument("--master-target", required=required)
        v.add_argument("--process-server", required=required)
        v.add_argument("--dry-run", action="store_true", help="preflight and estimate only")
        v.add_argument("--no-wait", action="store_true", help="return once pairs are started")
        v.add_argument("--timeout", type=float, default=24 * 3600.0)
        if name == "reprotect":
            v.add_argument("--location", choices=("original", "alternate"))
    v = _verb(verbs, "move-pairs", "move a VM's pairs to another process server", _move)
    v.add_argument("vm")
    v.add_argument("--process-server", required=True)
    v = _verb(verbs, "failover", "step 2: fail a recovery plan over to on-prem", _failover)
    v.add_argument("plan")
    v.add_argument(
        "--point",
        default="latest",
        help="latest, latest-app, latest-crash, latest-consistent, ID, tag:X, group:X, time",
    )
    v.add_argument("--writes-stopped", action="store_true", help="the Azure VMs are down")
    v.add_argument("--shutdown-command", help="run per VM first (sh -c, $REPLICATION_VM)")
    v.add_argument("--timeout", type=float, default=3600.0)


def _verb(verbs, name: str, help_text: str, func):
    from ..orchestrator.api import DEFAULT_STORE_DIR

    v = verbs.add_parser(name, help=help_text)
    v.add_argument("--store", type=Path, default=DEFAULT_STORE_DIR, help=_STORE_HELP)
    v.add_argument("--tls-dir", type=Path, default=Path("/etc/replication/tls"))
    v.add_argument("--host", default="localhost", help="host name of our own certificate")
    v.add_argument("--server-host", default="localhost", help="the agents' certificate host")
    v.add_argument("--json", action="store_true", help="machine-readable output")
    v.set_defaults(func=func)
    return v


def _orchestrator(args: argparse.Namespace, progress=None):
    from ..orchestrator import Orchestrator

    o = Orchestrator(
        args.store,
        args.tls_dir,
        host=args.host,
        server_host=args.server_host,
        on_progress=progress,
    )
    for job in o.interrupted:
        print(f"job {job.id} ({job.kind}) was interrupted: {job.message}", file=sys.stderr)
    return o


def _emit(args: argparse.Namespace, value: Any, text: str) -> int:
    print(json.dumps(value, indent=2, default=str) if args.json else text)
    return 0


# -- registration -----------------------------------------------------------------------


def _reg_server(args: argparse.Namespace) -> int:
    fingerprint = "" if args.no_pin else args.fingerprint
    with _orchestrator(args) as o:
        s = o.register_server(
            args.name,
            args.role,
            args.address,
            site=args.site,
            datastore=args.datastore,
            fingerprint=fingerprint,
        )
    pin = s.fingerprint[:16] + "..." if s.fingerprint else "not pinned"
    return _emit(args, vars_of(s), f"{s.role} {s.name} at {s.address} ({s.site}), {pin}")


def _reg_vm(args: argparse.Namespace) -> int:
    with _orchestrator(args) as o:
        vm = o.register_vm(
            args.name, args.kind, azure_agent=args.azure_agent, onprem_agent=args.onprem_agent
        )
    return _emit(args, vars_of(vm), f"{vm.kind} {vm.name}: {vm.phase}")


def _reg_disk(args: argparse.Namespace) -> int:
    fields = ("original_vmdk", "original_volume", "azure_disk", "azure_path", "azure_volume")
    where = {f: getattr(args, f) for f in (*fields, "onprem_disk") if getattr(args, f)}
    with _orchestrator(args) as o:
        d = o.register_disk(args.vm, args.name, uuid=args.uuid, size=args.size, **where)
    return _emit(args, vars_of(d), f"disk {d.vm}/{d.name}: {d.size} bytes, uuid {d.uuid}")


def _group(args: argparse.Namespace) -> int:
    with _orchestrator(args) as o:
        g = o.create_group(args.name, args.vms)
    return _emit(args, vars_of(g), f"group {g.name}: {', '.join(g.vms)}")


def _plan(args: argparse.Namespace) -> int:
    with _orchestrator(args) as o:
        p = o.create_plan(args.name, args.groups)
    return _emit(args, vars_of(p), f"plan {p.name}: {', '.join(p.groups)}")


# -- steps ------------------------------------------------------------------------------


def _reprotect(args: argparse.Namespace) -> int:
    return _step(
        args,
        lambda o: o.reprotect(
            args.vms,
            plan=args.plan,
            master_target=args.master_target,
            process_server=args.process_server,
            location=args.location,
            dry_run=args.dry_run,
            wait=not args.no_wait,
            timeout=args.timeout,
        ),
    )


def _move(args: argparse.Namespace) -> int:
    with _orchestrator(args) as o:
        pairs = o.move_pairs(args.vm, args.process_server)
    text = "\n".join(f"{p.vm}/{p.disk}: now through {p.process_server}" for p in pairs)
    return _emit(args, [dataclasses.asdict(p) for p in pairs], text)


def _reverse(args: argparse.Namespace) -> int:
    return _step(
        args,
        lambda o: o.reverse_reprotect(
            args.vms,
            plan=args.plan,
            master_target=args.master_target,
            process_server=args.process_server,
            dry_run=args.dry_run,
            wait=not args.no_wait,
            timeout=args.timeout,
        ),
    )


def _failover(args: argparse.Namespace) -> int:
    from ..orchestrator import shell_shutdown

    shutdown = shell_shutdown(args.shutdown_command) if args.shutdown_command else None
    return _step(
        args,
        lambda o: o.failover(
            args.plan,
            point=args.point,
            writes_stopped=args.writes_stopped,
            shutdown=shutdown,
            timeout=args.timeout,
        ),
    )


def _step(args: argparse.Namespace, call) -> int:
    """Run a step with a progress bar; print its checks, estimates and outcome."""
    with _Bar(enabled=not args.json and sys.stderr.isatty()) as bar:
        o = _orchestrator(args, bar.update)
        try:
            job = call(o)
        except ReplicationError as err:
            return _refused(args, o, err)
        finally:
            o.close()
    if args.json:
        return _emit(args, {"job": job.to_dict()}, "")
    print(_job_text(job))
    return 0


def _refused(args: argparse.Namespace, o, err: ReplicationError) -> int:
    job_id = getattr(err, "job_id", None)
    job = o.job(job_id).to_dict() if job_id else None
    if not args.json:
        if job is not None:
            print(_job_text(o.job(job_id)))
        raise err
    print(json.dumps({"job": job, "error": err.to_dict()}, indent=2, default=str))
    print(f"replication: error [{err.code}]: {err}", file=sys.stderr)
    return err.exit_status


def _job_text(job) -> str:
    lines = [f"{job.kind} {job.target}: job {job.id} {job.state} - {job.message}"]
    checks = job.result.get("checks", [])
    if checks:
        lines.append("preflight:")
    for c in checks:
        mark = {"passed": " ok ", "failed": "FAIL", "skipped": "skip"}[c["status"]]
        line = f"  [{mark}] {c['name']}" + (f": {c['detail']}" if c["detail"] else "")
        lines.append(line + (f"\n         fix: {c['fix']}" if c["fix"] else ""))
    for e in job.result.get("estimates", []):
        lines.append("  " + _estimate_text(e))
    for r in job.result.get("recovered", []):
        where = r["path"] or r["volume"]
        lines.append(f"  {r['vm']}/{r['disk']}: data in {where} (point {r['point'] or '-'})")
    if job.error_code:
        lines.append(f"error [{job.error_code}]: {job.error_message}")
    return "\n".join(lines)


def _estimate_text(e: dict[str, Any]) -> str:
    from ..orchestrator.model import Estimate

    return Estimate(**e).describe()


class _Bar:
    """A tqdm bar over a job's progress (0..1), only on a terminal."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._bar = None

    def update(self, job) -> None:
        if not self.enabled:
            return
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(
                total=1000,
                file=sys.stderr,
                leave=False,
                desc=job.kind,
                bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}",
            )
        self._bar.n = int(job.progress * 1000)
        self._bar.set_description_str(f"{job.kind}: {job.message[:50]}", refresh=True)

    def __enter__(self) -> _Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()


# -- reading ----------------------------------------------------------------------------


def _status(args: argparse.Namespace) -> int:
    from ..orchestrator.status import render_table

    with _orchestrator(args) as o:
        rows = o.status()
    return _emit(args, rows, render_table(rows) if rows else "(no pairs)")


def _jobs(args: argparse.Namespace) -> int:
    with _orchestrator(args) as o:
        if args.id:
            job = o.job(args.id)
            return _emit(args, job.to_dict(), _job_text(job))
        jobs = o.jobs()
    text = "\n".join(
        f"{j.id}  {j.kind:<17} {j.target:<20} {j.state:<11} {j.progress * 100:5.1f}%  "
        f"{j.error_code or j.message}"
        for j in jobs
    )
    return _emit(args, [j.to_dict() for j in jobs], text or "(no jobs)")


def _list(args: argparse.Namespace) -> int:
    with _orchestrator(args) as o:
        value = {
            "vms": [vars_of(v) for v in o.vms()],
            "servers": [vars_of(s) for s in o.servers()],
            "groups": [vars_of(g) for g in o.groups()],
            "plans": [vars_of(p) for p in o.plans()],
        }
    lines = [
        f"vm {v['name']} ({v['kind']}): {v['phase']}, {len(v['disks'])} disk(s)"
        for v in value["vms"]
    ]
    lines += [f"{s['role']} {s['name']} at {s['address']} ({s['site']})" for s in value["servers"]]
    lines += [f"group {g['name']}: {', '.join(g['vms'])}" for g in value["groups"]]
    lines += [f"plan {p['name']}: {', '.join(p['groups'])}" for p in value["plans"]]
    return _emit(args, value, "\n".join(lines) or "(empty store)")


# -- store --------------------------------------------------------------------------------


def _backup(args: argparse.Namespace) -> int:
    with _orchestrator(args) as o:
        path = o.backup(args.file)
    return _emit(args, {"backup": str(path)}, f"store backed up to {path}")


def _restore(args: argparse.Namespace) -> int:
    with _orchestrator(args) as o:
        o.restore(args.file, force=args.force)
        counts = {"vms": len(o.vms()), "servers": len(o.servers()), "plans": len(o.plans())}
    text = f"store restored from {args.file}: " + ", ".join(f"{v} {k}" for k, v in counts.items())
    return _emit(args, {"restored": str(args.file), **counts}, text)


def vars_of(record) -> dict[str, Any]:
    """A store record as a JSON-friendly dict."""
    from dataclasses import asdict

    return asdict(record)

"""``replication agent ...``: command running agents through their control service."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from ..blocks import parse_size


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("agent", help="status and commands of a running agent (control service)")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    _verb(verbs, "status", "role, pairs, volumes, problems", _status)
    _verb(verbs, "volumes", "volumes of a master target", _volumes)
    v = _verb(verbs, "create-volume", "new VMDK on a master target's datastore", _create)
    v.add_argument("name")
    v.add_argument("size", type=parse_size)
    v.add_argument("--subformat", default="monolithicSparse")
    v = _verb(verbs, "release-volume", "a master target lets go of a volume (hand over)", _release)
    v.add_argument("name")
    v = _verb(verbs, "start-pair", "start replicating a source agent's disk", _start)
    v.add_argument("disk")
    v.add_argument("volume")
    v = _verb(verbs, "stop-pair", "stop a pair once what it sent is PERSISTED", _stop)
    v.add_argument("disk")
    _tag_args(_verb(verbs, "tag", "a tagged cut on a source agent's disks", _tag))
    v = _verb(verbs, "points", "recovery points of a master target's volume", _points)
    v.add_argument("volume")
    _produce_args(_verb(verbs, "produce", "a new VMDK of a volume at a point", _produce))
    # the spelling of the same verbs, at the top level
    _tag_args(_verb(sub, "tag", "a tagged cut on a source agent's disks (= agent tag)", _tag))
    v = _verb(sub, "recovery-points", "recovery points of a volume (= agent points)", _points)
    v.add_argument("volume")


def _tag_args(v) -> None:
    v.add_argument("--name", required=True, help="the tag's name")
    v.add_argument(
        "--app-consistent",
        action="store_true",
        help="run the agent's pre/post hooks around the cut (default: crash-consistent)",
    )
    v.add_argument("--group", default="", help="consistency group cut id")
    v.add_argument("--disk", action="append", default=[], help="only these disks (repeatable)")


def _produce_args(v) -> None:
    v.add_argument("volume")
    v.add_argument("--point", default="latest", help="latest, latest-app, latest-crash, an id...")
    v.add_argument("--name", required=True, help="name of the new volume in the datastore")
    v.add_argument("--subformat", default="monolithicSparse")


def _verb(verbs, name: str, help_text: str, func):
    v = verbs.add_parser(name, help=help_text)
    v.add_argument("address", help="HOST:PORT of the agent's control listener")
    v.add_argument("--tls-dir", type=Path, default=Path("/etc/replication/tls"))
    v.add_argument("--host", default="localhost", help="host name of our own certificate")
    v.add_argument(
        "--role", default="orchestrator", help="certificate role to use (default orchestrator)"
    )
    v.add_argument("--server-host", default="localhost", help="the agent's certificate host")
    v.add_argument(
        "--expect-role",
        metavar="ROLE",
        help="refuse the agent unless it proves this role (source, process-server, "
        "master-target) on every call: exit 6, tls.server_role. Default: none, only the "
        "CA and the host name of its certificate are checked",
    )
    v.add_argument("--timeout", type=float, default=30.0)
    v.add_argument("--json", action="store_true", help="machine-readable output")
    v.set_defaults(func=func)
    return v


def _client(args: argparse.Namespace):
    from ..certs import load_identity, normalize_role
    from ..control import ControlClient

    # an unknown role is a UsageError here, before any connection
    expect = normalize_role(args.expect_role) if args.expect_role else None
    identity = load_identity(args.tls_dir, args.role, args.host)
    return ControlClient(
        args.address, identity, server_host=args.server_host, timeout=args.timeout, role=expect
    )


def _emit(args: argparse.Namespace, value, text: str) -> int:
    print(json.dumps(value, indent=2) if args.json else text)
    return 0


def _status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        info = client.status()
    lines = [f"{info.role} {info.agent_version}, up {info.uptime_seconds} s"]
    lines += [
        f"  pair {p.disk} -> {p.volume}: {p.state} [{p.mode or '-'}] "
        f"({p.blocks_done}/{p.blocks_total} blocks, seq {p.persisted_seq}, "
        f"RPO {p.rpo_seconds:.2f} s)" + (f" error: {p.error}" if p.error else "")
        for p in info.pairs
    ]
    lines += [f"  volume {v.name}: {v.size} bytes {v.format}/{v.subformat}" for v in info.volumes]
    if info.role == "process-server":
        lines.append(f"  spool {info.spool_bytes} bytes")
    lines += [f"  problem: {p}" for p in info.problems]
    return _emit(args, asdict(info), "\n".join(lines))


def _volumes(args: argparse.Namespace) -> int:
    with _client(args) as client:
        volumes = client.list_volumes()
    text = "\n".join(f"{v.name}\t{v.size}\t{v.format}/{v.subformat}" for v in volumes)
    return _emit(args, [asdict(v) for v in volumes], text or "(no volumes)")


def _create(args: argparse.Namespace) -> int:
    with _client(args) as client:
        v = client.create_volume(args.name, args.size, args.subformat)
    return _emit(args, asdict(v), f"{v.name}: {v.size} bytes {v.format}/{v.subformat}")


def _release(args: argparse.Namespace) -> int:
    with _client(args) as client:
        v = client.release_volume(args.name)
    return _emit(args, asdict(v), f"{v.name}: released ({v.size} bytes {v.format}/{v.subformat})")


def _start(args: argparse.Namespace) -> int:
    with _client(args) as client:
        p = client.start_pair(args.disk, args.volume)
    return _emit(args, asdict(p), f"{p.disk} -> {p.volume}: {p.state}")


def _stop(args: argparse.Namespace) -> int:
    with _client(args) as client:
        p = client.stop_pair(args.disk)
    return _emit(args, asdict(p), f"{p.disk} -> {p.volume}: {p.state}")


def _tag(args: argparse.Namespace) -> int:
    from ..wire import TagSpec

    kind = "app" if args.app_consistent else "crash"
    spec = TagSpec(kind, args.name, args.group, tuple(args.disk))
    with _client(args) as client:
        disks, held = client.tag(spec)
    value = {"kind": kind, "name": args.name, "disks": disks, "held_seconds": held}
    return _emit(args, value, f"{kind} tag {args.name!r} cut on {', '.join(disks)}")


def _points(args: argparse.Namespace) -> int:
    import datetime as dt

    with _client(args) as client:
        points = client.list_points(args.volume)
    lines = [
        f"{p.id}\t{dt.datetime.fromtimestamp(p.time, dt.UTC).isoformat()}\t{p.kind}\t"
        f"{p.tag or '-'}\t{p.group or '-'}"
        for p in points
    ]
    return _emit(args, [asdict(p) for p in points], "\n".join(lines) or "(no recovery points)")


def _produce(args: argparse.Namespace) -> int:
    with _client(args) as client:
        volume, point = client.produce_disk(args.volume, args.point, args.name, args.subformat)
    value = {"volume": asdict(volume), "point": asdict(point)}
    return _emit(args, value, f"{volume.name}: {args.volume} at point {point.id} ({point.kind})")

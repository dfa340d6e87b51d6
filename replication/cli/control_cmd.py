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
    v = _verb(verbs, "start-pair", "start replicating a source agent's disk", _start)
    v.add_argument("disk")
    v.add_argument("volume")
    v = _verb(verbs, "stop-pair", "stop a pair once what it sent is PERSISTED", _stop)
    v.add_argument("disk")


def _verb(verbs, name: str, help_text: str, func):
    v = verbs.add_parser(name, help=help_text)
    v.add_argument("address", help="HOST:PORT of the agent's control listener")
    v.add_argument("--tls-dir", type=Path, default=Path("/etc/replication/tls"))
    v.add_argument("--host", default="localhost", help="host name of our own certificate")
    v.add_argument(
        "--role", default="orchestrator", help="certificate role to use (default orchestrator)"
    )
    v.add_argument("--server-host", default="localhost", help="the agent's certificate host")
    v.add_argument("--timeout", type=float, default=30.0)
    v.add_argument("--json", action="store_true", help="machine-readable output")
    v.set_defaults(func=func)
    return v


def _client(args: argparse.Namespace):
    from ..certs import load_identity
    from ..control import ControlClient

    identity = load_identity(args.tls_dir, args.role, args.host)
    return ControlClient(args.address, identity, server_host=args.server_host, timeout=args.timeout)


def _emit(args: argparse.Namespace, value, text: str) -> int:
    print(json.dumps(value, indent=2) if args.json else text)
    return 0


def _status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        info = client.status()
    lines = [f"{info.role} {info.agent_version}, up {info.uptime_seconds} s"]
    lines += [
        f"  pair {p.disk} -> {p.volume}: {p.state} "
        f"({p.blocks_done}/{p.blocks_total} blocks, seq {p.persisted_seq})"
        + (f" error: {p.error}" if p.error else "")
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


def _start(args: argparse.Namespace) -> int:
    with _client(args) as client:
        p = client.start_pair(args.disk, args.volume)
    return _emit(args, asdict(p), f"{p.disk} -> {p.volume}: {p.state}")


def _stop(args: argparse.Namespace) -> int:
    with _client(args) as client:
        p = client.stop_pair(args.disk)
    return _emit(args, asdict(p), f"{p.disk} -> {p.volume}: {p.state}")

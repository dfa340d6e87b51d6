"""``replication disk info|create``: inspect and create disk images."""

from __future__ import annotations

import argparse
import json

from ..blocks import parse_size
from ..disks import FORMATS, create_disk, open_disk
from ..disks.base import DiskInfo


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("disk", help="inspect or create disk images")
    dsub = p.add_subparsers(dest="disk_command", metavar="ACTION", required=True)

    info = dsub.add_parser("info", help="show a disk's format, sizes, parent and ids")
    info.add_argument("path", metavar="PATH")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.add_argument("--format", choices=FORMATS, help="skip format detection")
    info.set_defaults(func=run_info)

    create = dsub.add_parser("create", help="create an empty disk image")
    create.add_argument("path", metavar="PATH")
    create.add_argument("size", type=parse_size, metavar="SIZE", help="e.g. 10G")
    create.add_argument("--format", choices=FORMATS, default="raw")
    create.add_argument("--subformat", help="vhd: fixed|dynamic; vmdk: monolithicSparse, ...")
    create.add_argument("--json", action="store_true")
    create.set_defaults(func=run_create)


def run_info(args: argparse.Namespace) -> int:
    with open_disk(args.path, format=args.format) as disk:
        info = disk.info()
    print(json.dumps(info.to_dict()) if args.json else format_info(info))
    return 0


def run_create(args: argparse.Namespace) -> int:
    with create_disk(args.path, args.size, format=args.format, subformat=args.subformat) as d:
        d.flush()
        info = d.info()
    print(json.dumps(info.to_dict()) if args.json else format_info(info))
    return 0


def format_info(info: DiskInfo) -> str:
    """Return the human form of ``disk info``."""
    rows = [
        ("path", info.path),
        ("format", f"{info.format} ({info.subformat})"),
        ("virtual size", f"{info.virtual_size} bytes"),
        ("allocated", f"{info.allocated_bytes} bytes"),
    ]
    if info.grain_size:
        rows.append(("grain size", f"{info.grain_size} bytes"))
    rows.append(("parent", info.parent or "none"))
    if info.uuid:
        rows.append(("uuid", info.uuid))
    if info.cid:
        rows.append(("cid", info.cid))
    rows.append(("writable", "yes" if info.writable else "no"))
    rows += [("file", f) for f in info.files]
    rows += [("note", n) for n in info.notes]
    return "\n".join(f"{k:<13} {v}" for k, v in rows)

"""``replication sync SOURCE TARGET``: a one-shot delta sync between two disks."""

from __future__ import annotations

import argparse
import json

from ..blocks import DEFAULT_BLOCK_SIZE, parse_size
from ..progress import TerminalProgress
from ..sync import MAX_MAP_BYTES, SyncOptions, SyncReport, sync_paths

HELP = """\
Make TARGET hold SOURCE's bytes, writing only the blocks that differ.

Both disks may be raw images or block devices, VHD (fixed, dynamic) or VMDK
(monolithicSparse, twoGbMaxExtentSparse, monolithicFlat, twoGbMaxExtentFlat,
vmfs; streamOptimized as a source only); formats are detected from content.

Sizes: TARGET must be at least as large as SOURCE. A larger TARGET is allowed and
its bytes beyond SOURCE's size are left untouched. A smaller one is an error.

A VMDK that belongs to a snapshot chain (a snapshot delta, or a base disk that has
snapshot children) is refused as TARGET: writing it would corrupt the chain.

The target's hash map is kept after each sync and reused next time while the
target's generation (file identity and times, VMDK CID) proves it unchanged, so a
repeated sync reads only the source. --verify ignores the kept map.

Memory: the hash maps are hashed, compared and kept a window at a time (16 MiB
per disk), never whole; the plan takes 2 bits per block of SOURCE (8 MiB for
2 TiB at 64K blocks). A SOURCE whose plan would exceed --max-map-memory (default
256M: 64 TiB at 64K blocks) is refused (error disk.too_large) before anything is
read: a guard against descriptors claiming absurd sizes; use a larger
--block-size, or raise the bound if the size is real.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sync",
        help="delta-sync SOURCE into TARGET",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("target", metavar="TARGET")
    p.add_argument(
        "--block-size",
        type=parse_size,
        default=DEFAULT_BLOCK_SIZE,
        help="block size: power of two, 4K..4M (default 64K)",
    )
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.add_argument("--dry-run", action="store_true", help="compute and report; change nothing")
    p.add_argument(
        "--verify", action="store_true", help="hash the target even if a kept hash map is trusted"
    )
    p.add_argument("--zstd-level", type=int, default=1, help="frame compression level")
    p.add_argument("--workers", type=int, default=2, help="threads for reading and hashing")
    p.add_argument(
        "--max-map-memory",
        type=parse_size,
        default=MAX_MAP_BYTES,
        help="refuse a SOURCE whose sync plan (2 bits per block) needs more "
        "(default 256M: 64 TiB at 64K blocks)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    options = SyncOptions(
        block_size=args.block_size,
        dry_run=args.dry_run,
        use_map_cache=not args.verify,
        workers=max(1, args.workers),
        zstd_level=args.zstd_level,
        max_map_bytes=args.max_map_memory,
    )
    with TerminalProgress() as progress:
        report = sync_paths(args.source, args.target, options, progress=progress)
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        print(format_report(report))
    return 0


def format_report(r: SyncReport) -> str:
    """Return the human summary of a sync."""
    verb = "would write" if r.dry_run else "written"
    lines = [
        f"{'dry run: ' if r.dry_run else ''}{r.source} -> {r.target}",
        f"  blocks        {r.blocks_total} total, {r.blocks_differing} differing, "
        f"{r.blocks_zero} zero (block size {r.block_size})",
        f"  bytes read    {_human(r.bytes_read)}",
        f"  bytes {verb:<7} {_human(r.bytes_written)} (+ {_human(r.bytes_zeroed)} zeroed)",
        f"  bytes on wire {_human(r.bytes_wire)} (compressed frames + hash map)",
        f"  target map    {r.target_map}",
        f"  seconds       {r.seconds:.3f}",
    ]
    return "\n".join(lines)


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)

"""``replication verify``: prove two disks equal, or a disk equal to a recovery point."""

from __future__ import annotations

import argparse
import json
import sys

from ..blocks import DEFAULT_BLOCK_SIZE, parse_size
from ..errors import ReplicationError, UsageError
from ..verify import VerifyOptions, VerifyReport, verify_manifest_path, verify_paths

#: exit statuses: the verdict, never a ReplicationError's own status
EQUAL, DIFFER, ERROR = 0, 1, 2

HELP = """\
replication verify SOURCE TARGET
    Does TARGET hold SOURCE's bytes? Both are local disks of any supported format
    (detected from content), opened read-only. A larger TARGET is allowed (its bytes
    past SOURCE's size are not compared, as `replication sync` leaves them); a smaller
    one differs.

replication verify DISK --store DIR --root HEX
    Does DISK equal a recovery point? DIR is a manifest store (the master target
    keeps one per volume in DATA_DIR/history/VOLUME/manifests) and HEX the point's
    manifest root (`replication recovery-points VOLUME ADDR --json`: manifest_root).

Exit status: 0 equal, 1 they differ (the differing block ranges are printed),
2 error (one line on stderr, with its code).

Blocks that differ are re-read on both sides and compared byte for byte (against a
manifest: re-hashed) after --recheck-delay seconds before they are reported, so a
write in flight is not reported as corruption. Limits: on disks that are being
written the comparison proves nothing about a single instant (a block that the
replication has not caught up with by the last re-check is reported; a block changed
on both sides between passes compares equal): verify quiesced disks, or a produced
disk against its point. The first pass compares XXH3-128 digests, which detect
accidental divergence, not blocks crafted to collide.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "verify",
        help="prove two disks, or a disk and a recovery point, equal",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", metavar="SOURCE|DISK")
    p.add_argument("target", metavar="TARGET", nargs="?")
    p.add_argument("--store", metavar="DIR", help="manifest store of a volume's recovery points")
    p.add_argument("--root", metavar="HEX", help="manifest root of the recovery point")
    p.add_argument(
        "--block-size",
        type=parse_size,
        default=DEFAULT_BLOCK_SIZE,
        help="block size of a two-disk comparison: power of two, 4K..4M (default 64K); "
        "a manifest has its own",
    )
    p.add_argument("--json", action="store_true", help="print the verdict as one JSON object")
    p.add_argument("--workers", type=int, default=2, help="threads for reading and hashing")
    p.add_argument("--rechecks", type=int, default=1, help="re-read rounds before reporting")
    p.add_argument(
        "--recheck-delay", type=float, default=0.5, help="seconds before each re-read (0.5)"
    )
    p.add_argument(
        "--max-ranges", type=int, default=1000, help="ranges listed at most (all are counted)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Verify; every failure is exit status 2 (1 means "they differ")."""
    try:
        report = _verify(args)
    except ReplicationError as err:
        return _error(args, err)
    except Exception as err:  # a bug must not look like "they differ" (Python exits 1)
        return _error(args, ReplicationError(f"internal error: {type(err).__name__}: {err}"))
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        print(format_report(report))
    return EQUAL if report.equal else DIFFER


def _verify(args: argparse.Namespace) -> VerifyReport:
    options = VerifyOptions(
        block_size=args.block_size,
        workers=args.workers,
        rechecks=args.rechecks,
        recheck_delay=args.recheck_delay,
        max_ranges=args.max_ranges,
    )
    if args.store is None and args.root is None:
        if args.target is None:
            raise UsageError("verify needs SOURCE TARGET, or DISK --store DIR --root HEX")
        return verify_paths(args.source, args.target, options)
    if args.target is not None or args.store is None or args.root is None:
        raise UsageError("verify DISK --store DIR --root HEX takes one disk and both options")
    return verify_manifest_path(args.source, args.store, args.root, options)


def _error(args: argparse.Namespace, err: ReplicationError) -> int:
    if args.json:
        print(json.dumps({"error": err.to_dict()}))
    print(f"replication: error [{err.code}]: {err}", file=sys.stderr)
    return ERROR


def format_report(r: VerifyReport) -> str:
    """Return the human verdict: one line, then the differing ranges."""
    what = f"{r.source} and {r.target}"
    lines = [
        f"{'equal' if r.equal else 'differ'}: {what} ({r.blocks_compared} blocks of "
        f"{r.block_size} B compared in {r.seconds:.3f} s)"
    ]
    if r.first_pass_blocks > r.blocks_differing:
        lines.append(
            f"  {r.first_pass_blocks - r.blocks_differing} block(s) that differed at first "
            "were equal when re-read (written meanwhile): not reported"
        )
    if r.blocks_differing:
        lines.append(f"  {r.blocks_differing} block(s) differ, in {r.ranges_total} range(s):")
        lines += [f"    {_range_text(x)}" for x in r.ranges]
        if r.ranges_truncated:
            lines.append(f"    ... and {r.ranges_total - len(r.ranges)} more range(s)")
    if r.missing_bytes:
        lines.append(f"  the second is {r.missing_bytes} bytes smaller: those bytes are missing")
    if r.extra_bytes:
        lines.append(f"  the second is {r.extra_bytes} bytes larger: those bytes were not compared")
    return "\n".join(lines)


def _range_text(r) -> str:
    blocks = f"block {r.first}" if r.blocks == 1 else f"blocks {r.first}-{r.first + r.blocks - 1}"
    return f"{blocks}: bytes [{r.offset}, {r.offset + r.length})"

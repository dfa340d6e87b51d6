"""``replication bench``: measure the engine beside the tools it replaces, in one run."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from ..blocks import parse_size
from ..errors import BenchStageFailedError, ReplicationError, UsageError

HELP = """\
Generate deterministic realistic disk images (zeros, text, binary-like and random
data; fixed seeds) and measure, each beside its baseline in the same run:

  scan       hash maps of two images            vs  xxh128sum of both
  delta      replication sync, 1 % / 10 % changed  vs  rsync daemon (plain, --compress),
                                                     qemu-img convert -n (full copy)
  replicate  source agent -> process server -> master target (TLS, zstd, AES-GCM,
             fsync), full resync into an empty VMDK  vs  bare gRPC TLS relay, 3 processes
  memory     peak RSS of each agent                  (target < 256 MiB)
  rpo        p50/p99 RPO of a tracked source at 20 and 50 MB/s of NBD writes (p99 < 1 s)
  failback   reprotect of a disk changed 1 % since failover, through the agents and
             the orchestrator  vs  qemu-img convert -n -O vmdk (full copy) and a
             reprotect into an empty VMDK (full resync): time, bytes on the wire;
             every target checked with qemu-img compare
  fan-in     100 sources into one process server: throughput, Jain fairness (>= 0.9)

Prints a table, writes DIR/bench.json (every figure with its baseline, ratio and
target), DIR/bench.md, and DIR/bench.png when matplotlib is installed. A missing
baseline tool is reported as missing. A stage whose result fails its check (or
that cannot run) is reported as failed, with no figures, and the others still
run. Exit 0 when every selected stage ran, whether or not targets were met; 1
when a stage failed (the table and files are still written); 2 on bad options.
"""

MIN_SIZE = 4 << 20
#: images on disk at once: A, B1, B10, T, T2, A.vhd, the volume, the spool, and
#: failback's VMDK, VHD and two targets
SPACE_FACTOR = 12


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark scan, delta sync, replication and failback against baselines",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--size", default="1G", help="image size, e.g. 16M, 1G (default 1G)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per figure (median)")
    p.add_argument("--only", metavar="STAGES", help="comma-separated stages (default: all)")
    p.add_argument("--json", action="store_true", help="print the JSON document, not the table")
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="output directory")
    p.add_argument("--work-dir", type=Path, help="where images go (default: a temporary dir)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=20.0,
        metavar="SECONDS",
        help="before each timed command, wait up to this long for other load to stop "
        "(default 20; 0: do not wait)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..bench import BenchConfig, run_bench, select_stages
    from ..bench.report import format_table, to_dict, write_outputs

    config = BenchConfig(
        size=_image_size(args.size),
        rounds=_rounds(args.rounds),
        stages=select_stages(args.only),
        work_dir=args.work_dir,
        quiet_wait=max(0.0, args.quiet_wait),
    )
    _check_space(args.work_dir, config.size)
    try:
        result = run_bench(config, keep=args.keep)
        written = write_outputs(result, args.out)
    except (OSError, subprocess.SubprocessError, ValueError) as err:  # ValueError: bad output
        raise ReplicationError(f"bench: {err}") from err
    if result.kept is not None:
        print(f"bench: images and logs kept in {result.kept}", file=sys.stderr)
    if args.json:
        print(json.dumps(to_dict(result), default=str))
    else:
        print(format_table(result))
        print("written: " + ", ".join(map(str, written)))
    if result.failed:
        failed = "; ".join(f"{s.name}: {s.details['error']}" for s in result.failed)
        raise BenchStageFailedError(f"bench: stage(s) failed: {failed}")
    return 0


def _image_size(text: str) -> int:
    size = parse_size(text) // 65536 * 65536
    if size < MIN_SIZE:
        raise UsageError(f"--size {text!r} is too small: at least {MIN_SIZE >> 20}M")
    return size


def _rounds(n: int) -> int:
    if n < 1:
        raise UsageError(f"--rounds {n}: at least 1")
    return n


def _check_space(work_dir: Path | None, size: int) -> None:
    import tempfile

    probe = work_dir.absolute() if work_dir is not None else Path(tempfile.gettempdir())
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < SPACE_FACTOR * size:
        raise UsageError(
            f"--size {size >> 20}M needs about {SPACE_FACTOR * size >> 20} MiB free in "
            f"{probe}; {free >> 20} MiB are",
            hint="use a smaller --size or another --work-dir",
        )

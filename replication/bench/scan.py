"""Stage ``scan``: the hash maps of two images against ``xxh128sum`` of both.

Our side is :func:`replication.hashmap.compute_maps` over images A and B1 (the
pair a resync compares), in this process, both images interleaved on two threads;
zero extents (holes) are known without reading them. The baseline is ``xxh128sum
A B1``: the same digest family, in C, one file after the other. Both start with
the images in the page cache and nothing to write back.
"""

from __future__ import annotations

import subprocess
import time

from ..blocks import DEFAULT_BLOCK_SIZE
from ..disks import open_disk
from ..hashmap import compute_maps
from .context import Context, median
from .figures import Figure, Target

__all__ = ["run"]

TARGET = Target("ratio", "<=", 1.0, "perf-limits.md goal 7: Python at parity with the C tools")


def run(ctx: Context) -> tuple[list[Figure], dict[str, object]]:
    """Time both sides ``rounds`` times, interleaved; return the figure and details."""
    a, b = ctx.image("A"), ctx.image("B1")
    ours: list[float] = []
    theirs: list[float] = []
    for r in range(ctx.config.rounds):
        ctx.say(f"scan round {r + 1}/{ctx.config.rounds}")
        ctx.warm(a, b)
        ours.append(_time_maps(str(a), str(b)))
        if ctx.tools["xxh128sum"]:
            ctx.warm(a, b)
            started = time.perf_counter()
            subprocess.run(["xxh128sum", str(a), str(b)], capture_output=True, check=True)
            theirs.append(time.perf_counter() - started)
    value, baseline = median(ours), median(theirs)
    figure = Figure(
        "scan",
        "hash maps of 2 images",
        "s",
        value,
        baseline,
        "xxh128sum both",
        TARGET,
        missing=None if ctx.tools["xxh128sum"] else "xxh128sum",
        note=f"{2 * ctx.size / value / 1e9:.2f} GB/s of disk" if value else "",
    )
    details = {"compute_maps_s": ours, "xxh128sum_s": theirs, "bytes_of_disk": 2 * ctx.size}
    return [figure], details


def _time_maps(a: str, b: str) -> float:
    with open_disk(a) as da, open_disk(b) as db:
        started = time.perf_counter()
        compute_maps([(da, None), (db, None)], DEFAULT_BLOCK_SIZE)
        return time.perf_counter() - started

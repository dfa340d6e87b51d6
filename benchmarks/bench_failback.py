"""Failback: reprotect of a disk changed 1 % since failover, against a full copy of it.

Run with ``make bench`` (``make test`` skips benchmarks). Disk size:
``BENCH_FAILBACK_SIZE_MIB`` (default 1024); rounds: ``BENCH_ROUNDS`` (default 3).

``test_failback_stage``: stage ``failback`` of ``replication bench``
(:mod:`replication.bench.failback`): per round, the orchestrator's reprotect of
the changed fixed VHD onto a copy of the on-prem VMDK through the three agents
(mutual TLS on loopback, a tracked source agent), ``qemu-img convert -n -O vmdk``
over the same VMDK, and a reprotect into an empty VMDK; every target compared with
``qemu-img compare``. The benchmark's time is the whole stage (set-up included) and
means little; ``extra_info`` holds the figures (times, bytes on the process server
-> master target link, speed-ups) with their targets.

``test_qemu_img_full_copy``: the baseline alone, timed by pytest-benchmark: a
fresh copy of the on-prem VMDK (set-up, not timed), then ``qemu-img convert -n``
of the VHD over it. Nothing here asserts on time.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from replication.bench import BenchConfig
from replication.bench import failback as failback_stage
from replication.bench.context import Context

SIZE = int(os.environ.get("BENCH_FAILBACK_SIZE_MIB", "1024")) << 20
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    work = tmp_path_factory.mktemp("failback")
    return Context.create(BenchConfig(size=SIZE, rounds=ROUNDS), work, say=print)


def test_failback_stage(benchmark, ctx):
    figures, details = benchmark.pedantic(lambda: failback_stage.run(ctx), rounds=1, iterations=1)
    benchmark.extra_info.update(
        {
            f"{f.name} vs {f.baseline_name}": {
                "value": f.value,
                "baseline": f.baseline,
                "unit": f.unit,
                "ratio": f.ratio,
                "target": str(f.target),
                "met": f.met,
            }
            for f in figures
        }
    )
    benchmark.extra_info["details"] = {
        k: details[k]
        for k in ("changed_blocks", "speedup_vs_copy", "speedup_vs_full_resync", "verified_with")
    }


def test_qemu_img_full_copy(benchmark, ctx):
    qemu = shutil.which("qemu-img")
    if qemu is None:
        pytest.fail("qemu-img is the baseline here: install qemu-utils (make install)")
    disks = failback_stage.prepare_disks(ctx)
    target = ctx.work / "copy.vmdk"

    def setup():
        failback_stage.fresh_copy(disks.vmdk, target)
        ctx.warm(disks.vhd, target)
        return (), {}

    argv = [qemu, "convert", "-n", "-f", "vpc", "-O", "vmdk", str(disks.vhd), str(target)]
    benchmark.pedantic(
        lambda: subprocess.run(argv, check=True, capture_output=True),
        setup=setup,
        rounds=ROUNDS,
        iterations=1,
    )
    failback_stage.same_disks(ctx, disks.vhd, "vpc", target, "vmdk")

"""RPO of a tracked disk under a steady write load, and the fan-in of 100 sources.

Run with ``make bench`` (``make test`` skips benchmarks). Disk size:
``BENCH_RPO_SIZE_MIB`` (default 1024); seconds per rate:
``REPLICATION_BENCH_RPO_SECONDS`` (default 20); fan-in window:
``REPLICATION_BENCH_FANIN_SECONDS`` (30) and offered load
``REPLICATION_BENCH_FANIN_MB_S`` (100).

``test_rpo``: stage ``rpo`` of ``replication bench`` (:mod:`replication.bench.rpo`):
three agents, the source tracked (``--state-dir``, ``--nbd-listen``), a load
generator writing realistic content through NBD at 20 MB/s, then 50 MB/s; the RPO
of every epoch from the source's ``event=epoch_persisted`` lines. ``test_fan_in``:
stage ``fan-in`` (:mod:`replication.bench.fanin`): 100 sources from one generator
process into one process server and master target. The benchmark's time is the
whole stage (set-up included) and means little; ``extra_info`` holds the figures
(p50 and p99 RPO per rate and whether the generator kept its rate; peak streams,
MB/s, TB/day, Jain's index) with their targets. Nothing here asserts on them.
"""

from __future__ import annotations

import os

import pytest

from replication.bench import BenchConfig
from replication.bench import fanin as fanin_stage
from replication.bench import rpo as rpo_stage
from replication.bench.context import Context

SIZE = int(os.environ.get("BENCH_RPO_SIZE_MIB", "1024")) << 20


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    work = tmp_path_factory.mktemp("rpo")
    return Context.create(BenchConfig(size=SIZE, rounds=1), work, say=print)


def _record(benchmark, stage) -> None:
    figures, details = benchmark.pedantic(stage, rounds=1, iterations=1)
    benchmark.extra_info.update(
        {
            f.name: {"value": f.value, "unit": f.unit, "target": str(f.target), "met": f.met}
            for f in figures
        }
    )
    benchmark.extra_info["details"] = {
        k: v for k, v in details.items() if k not in ("sources", "phases")
    }


def test_rpo(benchmark, ctx):
    _record(benchmark, lambda: rpo_stage.run(ctx))


def test_fan_in(benchmark, ctx):
    _record(benchmark, lambda: fanin_stage.run(ctx))

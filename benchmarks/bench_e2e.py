"""End-to-end replication through the three agents against a bare gRPC TLS relay.

Run with ``make bench`` (``make test`` skips benchmarks). Image size:
``BENCH_E2E_SIZE_MIB`` (default 1024); rounds: ``BENCH_ROUNDS`` (default 3).

``test_e2e_replication``: each round starts a master target (an empty VMDK volume)
and a process server on loopback with mutual TLS (``replication certs init``),
then times ``replication source-agent --once`` on a fixed VHD of the realistic
image: a full resync through zstd, AES-GCM and both fsyncs. ``test_bare_relay``:
client -> relay -> sink, three processes, raw-bytes gRPC over the same TLS, with
the number and mean size of the frames the agents sent. Both time the sending
process from start to exit. The setup of each round (daemons, an empty volume) is
not timed; its check of the volume against the source (teardown) is not either.

``extra_info`` holds MB/s of source data, CPU seconds per GB and peak RSS of every
process, and, for the relay, the ratio ``e2e / relay`` with its target (>= 0.70).
The same measurement, interleaved and with a report, is ``replication bench
--only replicate,memory``. Nothing here asserts on time.
"""

from __future__ import annotations

import os
import statistics

import pytest

from replication.bench import BenchConfig
from replication.bench.context import Context
from replication.bench.relay import RelayDeployment
from replication.bench.replicate import THROUGHPUT, AgentDeployment, agents_round, prepare

SIZE = int(os.environ.get("BENCH_E2E_SIZE_MIB", "1024")) << 20
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
#: what the agents' rounds measured, for the relay test's frames and ratio
AGENT_RUNS: list = []


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    ctx = Context.create(
        BenchConfig(size=SIZE, rounds=ROUNDS), tmp_path_factory.mktemp("e2e"), say=print
    )
    tls, vhd = prepare(ctx)
    return ctx, tls, vhd


def test_e2e_replication(benchmark, setup):
    ctx, tls, vhd = setup
    counter = iter(range(10**6))

    def start():
        deployment = AgentDeployment(ctx, tls, vhd, ctx.work / f"e2e-{next(counter)}")
        ctx.warm(vhd)
        return (deployment,), {}

    benchmark.pedantic(
        lambda d: d.run_source(),
        setup=start,
        teardown=lambda d: AGENT_RUNS.append(d.stop()),
        rounds=ROUNDS,
    )
    plain = AGENT_RUNS[0].bytes_plain
    wall = statistics.median(a.wall for a in AGENT_RUNS)
    benchmark.extra_info.update(
        {
            "source MB/s": round(plain / wall / 1e6, 1),
            "bytes_plain": plain,
            "bytes_framed": AGENT_RUNS[0].bytes_framed,
            "frames": AGENT_RUNS[0].frames,
            **_costs(AGENT_RUNS, plain),
        }
    )


def test_bare_relay(benchmark, setup):
    ctx, tls, vhd = setup
    if not AGENT_RUNS:  # run alone (-k relay): learn the frames from one resync
        AGENT_RUNS.append(agents_round(ctx, tls, vhd, ctx.work / "e2e-probe"))
    frames, framed = AGENT_RUNS[0].frames, AGENT_RUNS[0].bytes_framed
    runs = []

    def start():
        ctx.wait_quiet()
        return (RelayDeployment(_fresh(ctx.work / "relay"), tls),), {}

    benchmark.pedantic(
        lambda d: d.run_client(frames, framed // frames),
        setup=start,
        teardown=lambda d: runs.append(d.stop()),
        rounds=ROUNDS,
    )
    plain = AGENT_RUNS[0].bytes_plain
    relay_wall = statistics.median(r.wall for r in runs)
    ratio = relay_wall / statistics.median(a.wall for a in AGENT_RUNS)
    benchmark.extra_info.update(
        {
            "source MB/s (same frames)": round(plain / relay_wall / 1e6, 1),
            "e2e / relay throughput": round(ratio, 3),
            "target": str(THROUGHPUT),
            "met": THROUGHPUT.met(None, ratio),
            **_costs(runs, plain),
        }
    )


def _costs(runs, plain: int) -> dict[str, object]:
    """CPU-s per GB of source data and peak RSS (MiB) of every process, medians / maxima."""
    roles = runs[0].cpu.keys()
    out: dict[str, object] = {}
    for role in roles:
        cpu = statistics.median(r.cpu[role] for r in runs)
        out[f"{role} CPU-s/GB"] = round(cpu / (plain / 1e9), 2)
        out[f"{role} peak RSS MiB"] = round(max(r.max_rss[role] for r in runs) / 2**20, 1)
    return out


def _fresh(d):
    import shutil

    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    return d

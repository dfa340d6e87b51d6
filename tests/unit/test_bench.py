"""``replication.bench``: figures and targets, the stage registry, a whole run on 16 MiB.

The whole run (every available stage, one round, no waiting for a quiet machine)
is made once for the module; it starts the three agents and the bare relay, a
tracked source under load (stage rpo, 2 s per rate), two reprotects through the
orchestrator (stage failback) and a fan-in of a few sources (3 s), so it takes
~1.5 min here. Nothing asserts on speed: only on what is measured and reported.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from replication.bench import STAGES, BenchConfig, Figure, Target, run_bench, select_stages
from replication.bench import delta as delta_stage
from replication.bench import failback as failback_stage
from replication.bench import fanin as fanin_stage
from replication.bench import replicate as replicate_stage
from replication.bench import rpo as rpo_stage
from replication.bench import scan as scan_stage
from replication.bench.context import Context
from replication.bench.images import change_blocks, pick_changed_blocks, write_image
from replication.bench.report import format_table, to_dict, to_markdown, write_outputs
from replication.bench.stages import Stage, _run_stage
from replication.disks import create_disk, open_disk
from replication.errors import PairFailedError, ReplicationError, UsageError
from replication.launch import launch
from replication.sync import SyncOptions, sync_paths

SIZE = 16 << 20
FANIN_SOURCES = 4
FIGURE_KEYS = {"value", "baseline", "ratio", "target", "met", "unit", "name", "stage"}


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    work = tmp_path_factory.mktemp("bench")
    config = BenchConfig(
        size=SIZE, rounds=1, stages=select_stages(None), work_dir=work / "w", quiet_wait=0
    )
    with pytest.MonkeyPatch.context() as mp:  # short: what is reported, not how fast
        mp.setenv("REPLICATION_BENCH_RPO_SECONDS", "2")
        mp.setenv("REPLICATION_BENCH_FANIN_SECONDS", "3")
        mp.setenv("REPLICATION_BENCH_FANIN_MB_S", "4")
        mp.setattr(fanin_stage, "SOURCES", FANIN_SOURCES)
        return run_bench(config, say=lambda msg: None)


# -- figures and targets ---------------------------------------------------------------


def test_ratio_and_verdict_on_ratio():
    target = Target("ratio", ">=", 0.7)
    assert Figure("s", "f", "MB/s", 80.0, 100.0, "b", target).met is True
    fig = Figure("s", "f", "MB/s", 60.0, 100.0, "b", target)
    assert fig.ratio == pytest.approx(0.6)
    assert fig.met is False


def test_verdict_on_value_ignores_the_baseline():
    fig = Figure("m", "rss", "MiB", 200.0, None, "relay", Target("value", "<", 256))
    assert fig.ratio is None
    assert fig.met is True


def test_a_missing_baseline_is_not_judged():
    fig = Figure("s", "f", "s", 1.0, None, "xxh128sum", Target("ratio", "<=", 1), "xxh128sum")
    record = fig.to_dict()
    assert record["ratio"] is None and record["met"] is None
    assert record["missing"] == "xxh128sum"


def test_bad_target_is_refused():
    with pytest.raises(ValueError):
        Target("speed", "<=", 1)


# -- stage registry ----------------------------------------------------------------------


def test_registry_has_every_stage_of_the_issue_with_a_function():
    assert [n for n, s in STAGES.items() if s.run is None] == []
    assert select_stages(None) == (
        "scan", "delta", "replicate", "memory", "rpo", "failback", "fan-in"
    )  # fmt: skip
    assert select_stages("delta, scan,delta") == ("delta", "scan")


def test_unknown_stage_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown stage nope"):
        select_stages("scan,nope")


# -- parsing what the tools print ---------------------------------------------------------


def test_rsync_stats_are_read_with_thousands_separators():
    stats = "Total bytes sent: 21,845,555\nTotal bytes received: 1,234\n"
    assert delta_stage._bytes_moved("rsync", stats, None) == 21_845_555 + 1_234


def test_source_agent_log_gives_frames_bytes_and_the_streaming_phase():
    log = (
        "ts=2026-11-26 02:36:22,566 component=source-agent level=INFO msg=event=plan x=1\n"
        "ts=2026-11-26 02:36:31,432 component=source-agent level=INFO msg=event=persisted "
        "volume=v frames=927 bytes_plain=745406464 bytes_framed=237359382\n"
    )
    run = replicate_stage._parse(log, 10.0, {"source": 1.0}, {"source": 1})
    assert (run.frames, run.bytes_plain, run.bytes_framed) == (927, 745406464, 237359382)
    assert run.stream_seconds == pytest.approx(8.866)


def test_scan_reports_a_missing_tool_instead_of_a_baseline(tmp_path):
    ctx = Context.create(BenchConfig(size=4 << 20, rounds=1, quiet_wait=0), tmp_path)
    ctx.say = lambda msg: None
    ctx.tools["xxh128sum"] = None
    (fig,), details = scan_stage.run(ctx)
    assert fig.value is not None and fig.value > 0
    assert (fig.baseline, fig.missing, fig.met) == (None, "xxh128sum", None)
    assert details["xxh128sum_s"] == []


# -- launch -------------------------------------------------------------------------------


def test_launch_returns_the_announced_port(tmp_path):
    code = "import time; print('event=listening port=4242', flush=True); time.sleep(60)"
    daemon = launch([sys.executable, "-c", code], tmp_path / "d.log", timeout=20)
    assert daemon.port == 4242
    assert daemon.stop() is not None


def test_launch_reports_a_child_that_exits_first(tmp_path):
    code = "import sys; print('boom: no config'); sys.exit(3)"
    with pytest.raises(PairFailedError, match="status 3 before listening: boom"):
        launch([sys.executable, "-c", code], tmp_path / "d.log", timeout=20)


# -- a whole run ----------------------------------------------------------------------------


def test_every_stage_ran(result):
    status = {s.name: s.status for s in result.stages}
    assert status == {name: "ran" for name in STAGES}
    assert result.failed == []


def test_json_schema_every_figure_has_value_baseline_ratio_target_met(result):
    doc = json.loads(json.dumps(to_dict(result), default=str))
    assert doc["schema"] == 1 and doc["config"]["size_bytes"] == SIZE
    figures = [f for s in doc["stages"] for f in s["figures"]]
    assert len(figures) == 1 + 10 + 4 + 3 + 3 * len(rpo_stage.RATES) + 4 + 4
    for f in figures:
        assert f.keys() >= FIGURE_KEYS, f
        assert set(f["target"]) == {"on", "op", "limit", "why"}
        assert f["met"] in (True, False, None)
        if f["value"] is not None and f["baseline"]:
            assert f["ratio"] == pytest.approx(f["value"] / f["baseline"], rel=1e-3)
    assert doc["summary"]["figures"] == len(figures)
    assert doc["summary"]["stages_failed"] == []


def test_replication_moved_the_image_and_measured_every_process(result):
    rep = next(s for s in result.stages if s.name == "replicate").details
    assert rep["frames"] > 0 and rep["bytes_plain"] > rep["bytes_framed"] > 0
    agents = rep["agents"][0]
    assert set(agents["cpu"]) == {"source", "process_server", "master_target"}
    assert all(v > 0 for v in agents["cpu"].values())
    relay = rep["relays"][0]
    assert relay["messages"] == rep["frames"]
    memory = [f for f in result.figures if f.stage == "memory"]
    # each process's own peak (VmHWM), not the bench's inherited through fork
    assert all(20 < f.value < 1024 and 20 < f.baseline < 1024 for f in memory)


def test_delta_bytes_are_close_to_the_changed_blocks(result):
    details = next(s for s in result.stages if s.name == "delta").details
    changed = int(SIZE // 65536 * 0.01) * 65536
    sync_bytes = details["1%"]["sync"]["bytes"][0]
    assert changed <= sync_bytes < changed + 64 * 1024 + SIZE // 65536 * 16


def test_table_and_markdown_name_targets_and_stage_lines(result, tmp_path):
    table = format_table(result)
    assert "e2e full resync throughput" in table and "ratio >= 0.7" in table
    assert "rpo: 20 MB/s asked" in table and "not yet available" not in table
    assert "failback: 2 blocks changed; speed-up of the reprotect" in table
    md = to_markdown(result)
    assert md.startswith("# replication bench") and "| stage | figure |" in md
    written = write_outputs(result, tmp_path / "out")
    assert {p.name for p in written} >= {"bench.json", "bench.md"}


# -- rpo and fan-in --------------------------------------------------------------------------


def test_rpo_reports_every_epoch_of_each_rate_and_the_load_it_kept(result):
    details = next(s for s in result.stages if s.name == "rpo").details
    assert [p["rate_mb_s"] for p in details["phases"]] == list(rpo_stage.RATES)
    for phase in details["phases"]:
        assert phase["epochs"] >= 1 and len(phase["rpo_s"]) == phase["epochs"]
        assert all(x >= 0 for x in phase["rpo_s"])
        assert phase["bytes_written"] > 0 and phase["writes"] > 0
    names = [f.name for f in result.figures if f.stage == "rpo"]
    assert names[:3] == ["RPO p99 at 20 MB/s", "RPO p50 at 20 MB/s", "write rate kept at 20 MB/s"]


def test_fan_in_counts_streams_sessions_and_bytes_per_source(result):
    details = next(s for s in result.stages if s.name == "fan-in").details
    assert len(details["sources"]) == FANIN_SOURCES
    assert details["peak_streams"] >= 1 and details["sessions"] >= 1
    assert set(details["cpu_s"]) == {"process_server", "master_target"}
    figures = {f.name: f for f in result.figures if f.stage == "fan-in"}
    assert 0 < figures["fairness between sources (Jain's index)"].value <= 1


def test_percentiles_interpolate_and_jain_measures_fairness():
    assert rpo_stage.percentile([], 99) is None
    assert rpo_stage.percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert rpo_stage.percentile([0.0, 10.0], 99) == pytest.approx(9.9)
    assert fanin_stage.jain([5.0, 5.0, 5.0]) == pytest.approx(1.0)
    assert fanin_stage.jain([1.0, 0.0, 0.0, 0.0]) == pytest.approx(0.25)
    assert fanin_stage.jain([0.0, 0.0]) is None


def test_rpo_waits_until_every_cut_epoch_is_persisted(tmp_path):
    log = tmp_path / "source.log"
    log.write_bytes(b"x event=epoch disk=d number=1\nx event=epoch_persisted disk=d rpo=0.2\n")
    rpo_stage._wait_settled(log, 0, timeout=5, quiet=0.2)  # settled: returns
    log.write_bytes(log.read_bytes() + b"x event=epoch disk=d number=2\n")
    with pytest.raises(ReplicationError, match="did not persist"):
        rpo_stage._wait_settled(log, 0, timeout=0.5, quiet=0.2)


def test_the_load_generator_regions_fit_any_disk():
    for size in (4 << 20, 16 << 20, 1 << 30):
        for where, length in ((0.5, 64 << 20), (0.125, 128 << 20)):
            start, n = rpo_stage._region(size, where, length)
            assert start % 65536 == 0 and n % 65536 == 0 and 0 < n <= length
            assert start + n <= size


# -- failback ---------------------------------------------------------------------------------


def test_failback_reprotect_moved_only_the_changed_blocks(result):
    details = next(s for s in result.stages if s.name == "failback").details
    changed = int(SIZE // 65536 * failback_stage.CHANGED)
    assert details["changed_blocks"] == changed
    (reprotect,) = details["reprotect"]
    (full,) = details["full_resync"]
    # the orchestrator's hash comparison finds exactly the blocks the bench changed
    assert reprotect["estimate_blocks"] == changed
    # the agents' part (pair started -> protected) lies inside the timed job
    assert 0 < reprotect["pair_seconds"] <= reprotect["seconds"]
    # the counted link carried the changed blocks (compressed) and two small hash maps
    maps = 2 * (SIZE // 65536) * 16
    assert 0 < reprotect["wan_bytes"] <= changed * 65536 + maps + (64 << 10)
    assert reprotect["wan_bytes"] < full["wan_bytes"] <= details["nonzero_bytes"]
    assert len(details["qemu_img_copy"]) == 1
    assert details["verified_with"] == "qemu-img compare"
    figures = [f for f in result.figures if f.stage == "failback"]
    assert [f.unit for f in figures] == ["s", "s", "B", "B"]
    assert all(f.value is not None and f.baseline and f.ratio is not None for f in figures)
    assert details["speedup_vs_copy"] == pytest.approx(1 / figures[0].ratio)


def test_changed_blocks_fall_in_runs_and_one_by_one():
    picked = pick_changed_blocks(16384, 0.01, np.random.default_rng(3))
    assert len(picked) == 163 and picked == sorted(set(picked))
    assert picked[0] >= 0 and picked[-1] < 16384
    runs, start = [], 0
    for i in range(1, len(picked) + 1):
        if i == len(picked) or picked[i] != picked[i - 1] + 1:
            runs.append(i - start)
            start = i
    assert max(runs) >= 4  # clustered
    assert runs.count(1) >= 20  # scattered


def test_change_blocks_rewrites_exactly_the_blocks_it_names(tmp_path):
    size = 4 << 20
    a, b = tmp_path / "a.raw", tmp_path / "b.raw"
    write_image(str(a), size, seed=5)
    shutil.copy(a, b)
    picked = change_blocks(str(b), size, 0.05, seed=9)
    old, new = a.read_bytes(), b.read_bytes()
    blocks = range(size // 65536)
    differing = [i for i in blocks if old[i << 16 : (i + 1) << 16] != new[i << 16 : (i + 1) << 16]]
    assert differing == picked and len(picked) == int(size // 65536 * 0.05)


def test_a_target_that_differs_from_the_source_fails_the_check(tmp_path):
    ctx = Context.create(BenchConfig(size=4 << 20, rounds=1, quiet_wait=0), tmp_path)
    if ctx.tools["qemu-img"] is None:
        pytest.fail("qemu-img is the oracle here: install qemu-utils (make install)")
    raw, vhd, vmdk = tmp_path / "a.raw", tmp_path / "a.vhd", tmp_path / "a.vmdk"
    write_image(str(raw), 4 << 20, seed=2)
    for path, fmt, sub in ((vhd, "vhd", "fixed"), (vmdk, "vmdk", "monolithicSparse")):
        with create_disk(str(path), 4 << 20, format=fmt, subformat=sub) as disk:
            disk.flush()
        sync_paths(str(raw), str(path), SyncOptions(use_map_cache=False))
    failback_stage.same_disks(ctx, vhd, "vpc", vmdk, "vmdk")  # equal: no error
    with open_disk(str(vmdk), writable=True) as disk:
        disk.write(3 << 20, b"\x5a" * 512)
        disk.flush()
    with pytest.raises(ReplicationError, match=r"a\.vmdk differs from a\.vhd"):
        failback_stage.same_disks(ctx, vhd, "vpc", vmdk, "vmdk")
    check = subprocess.run(["qemu-img", "check", str(vmdk)], capture_output=True, check=False)
    assert check.returncode == 0  # a clean disk whose bytes differ: the compare caught it


def test_a_stage_that_fails_is_reported_failed_never_as_a_number(tmp_path):
    def broken(ctx):
        raise ReplicationError("bench: the volume differs in 3 blocks")

    config = BenchConfig(size=4 << 20, rounds=1, stages=("boom",), quiet_wait=0)
    ctx = Context.create(config, tmp_path, say=lambda msg: None)
    res = _run_stage(ctx, Stage("boom", "always fails", broken))
    assert (res.status, res.figures) == ("failed", [])
    assert res.details == {
        "error": "bench: the volume differs in 3 blocks",
        "code": "replication.error",
    }

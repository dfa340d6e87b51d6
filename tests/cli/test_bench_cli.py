"""``replication bench`` as users run it: a subprocess, its exit status and its output."""

from __future__ import annotations

import json
import subprocess
import sys

REPLICATION = [sys.executable, "-m", "replication"]


def bench(*args: str, cwd) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*REPLICATION, "bench", *args],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=cwd,
        check=False,
    )


def test_scan_and_delta_on_16m_print_valid_json(tmp_path):
    # --quiet-wait 0: under `make test -n 2` the machine is never quiet; --rounds 1: time
    proc = bench(
        *("--size", "16M", "--json", "--only", "scan,delta", "--rounds", "1"),
        *("--quiet-wait", "0", "--out", str(tmp_path / "out"), "--work-dir", str(tmp_path / "w")),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    ran = [s["name"] for s in doc["stages"] if s["status"] == "ran"]
    assert ran == ["scan", "delta"]
    assert all(f["value"] is not None for s in doc["stages"] for f in s["figures"])
    assert json.loads((tmp_path / "out" / "bench.json").read_text())["schema"] == 1
    assert (tmp_path / "out" / "bench.md").exists()
    assert list((tmp_path / "w").iterdir()) == []  # our files in it are removed


def test_bad_size_is_a_clear_error_without_traceback(tmp_path):
    proc = bench("--size", "12Q", cwd=tmp_path)
    assert proc.returncode == 2
    assert "replication: error [usage.invalid]: cannot read size '12Q'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_too_small_size_and_unknown_stage_are_refused(tmp_path):
    small = bench("--size", "1M", cwd=tmp_path)
    assert small.returncode == 2 and "too small" in small.stderr
    stage = bench("--size", "16M", "--only", "scan,warp", cwd=tmp_path)
    assert stage.returncode == 2 and "unknown stage warp" in stage.stderr
    assert "Traceback" not in small.stderr + stage.stderr


def test_a_failed_stage_is_reported_and_exits_1_without_traceback(tmp_path, monkeypatch, capsys):
    from replication.bench import stages
    from replication.cli import main
    from replication.errors import ReplicationError

    def broken(ctx):
        raise ReplicationError("bench: reprotect.vmdk differs from azure.vhd")

    monkeypatch.setitem(stages.STAGES, "boom", stages.Stage("boom", "always fails", broken))
    code = main(
        ["bench", "--size", "4M", "--only", "boom", "--rounds", "1", "--quiet-wait", "0",
         "--out", str(tmp_path / "out"), "--work-dir", str(tmp_path / "w")]
    )  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 1
    assert "boom: FAILED, no figures: bench: reprotect.vmdk differs from azure.vhd" in out
    assert "[bench.stage_failed]" in err and "Traceback" not in err
    doc = json.loads((tmp_path / "out" / "bench.json").read_text())
    (boom,) = [s for s in doc["stages"] if s["name"] == "boom"]
    assert boom["status"] == "failed" and boom["figures"] == []
    assert doc["summary"]["stages_failed"] == ["boom"]

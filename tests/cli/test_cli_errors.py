"""Every bad disk header and bad frame in the fixtures, through the real CLI process.

The user-facing promise: one line on stderr naming the error code, a non-zero exit
status, and never a Python traceback.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

TESTDATA = Path(__file__).parents[1] / "testdata"


def _cases(module: str):
    manifest = TESTDATA / module / "cases.json"
    for name, spec in json.loads(manifest.read_text()).items():
        spec = {"code": spec} if isinstance(spec, str) else spec
        code = spec.get("code", spec.get("error_code"))
        if code:
            yield pytest.param(module, name, code, spec, id=f"{module}/{name}")


ALL_CASES = [
    c for m in ("vmdk", "vhd", "frame") if (TESTDATA / m / "cases.json").exists() for c in _cases(m)
]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "replication", *args], capture_output=True, text=True, timeout=60
    )


def test_there_are_fixtures_for_every_module():
    modules = {c.values[0] for c in ALL_CASES}
    assert {"vhd", "frame", "vmdk"} <= modules


@pytest.mark.parametrize(("module", "name", "code", "spec"), ALL_CASES)
def test_bad_fixture_gives_one_line_typed_error(module, name, code, spec):
    path = TESTDATA / module / name
    if module == "frame":
        args = [
            "frame",
            "inspect",
            str(path),
            "--secret-file",
            str(TESTDATA / module / spec.get("secret", "secret.key")),
        ]
    else:
        args = ["disk", "info", str(path)]
        if spec.get("format"):
            args += ["--format", spec["format"]]
    proc = cli(*args)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert f"[{code}]" in lines[0]


def test_json_error_record_on_stdout(tmp_path):
    proc = cli("disk", "info", str(tmp_path / "missing.vmdk"), "--json")
    assert proc.returncode != 0
    record = json.loads(proc.stdout)
    assert record["error"]["code"] == "disk.io"


def test_sync_json_summary_and_exit_codes(tmp_path):
    src, tgt = tmp_path / "s.raw", tmp_path / "t.raw"
    src.write_bytes(b"a" * 65536 * 3)
    tgt.write_bytes(b"a" * 65536 * 2 + b"b" * 65536)
    proc = cli("sync", "--json", str(src), str(tgt))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["blocks_total"] == 3 and report["blocks_differing"] == 1
    assert report["bytes_written"] == 65536
    assert tgt.read_bytes() == src.read_bytes()
    small = tmp_path / "small.raw"
    small.write_bytes(b"x" * 4096)
    proc = cli("sync", str(src), str(small))
    assert proc.returncode != 0 and "[disk.size_mismatch]" in proc.stderr
    proc = cli("sync", "--block-size", "3000", str(src), str(tgt))
    assert proc.returncode == 2 and "[usage.invalid]" in proc.stderr


def test_help_says_what_happens_to_a_bigger_target():
    proc = cli("sync", "--help")
    assert proc.returncode == 0
    assert "larger TARGET is allowed" in proc.stdout and "smaller one is an error" in proc.stdout


def test_python_dash_m_and_console_script_agree():
    exe = Path(sys.executable).parent / "replication"
    a = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    b = cli("--help")
    assert a.returncode == b.returncode == 0
    assert "sync" in a.stdout and a.stdout.replace("replication", "") == b.stdout.replace(
        "replication", ""
    ).replace("__main__.py", "")


def test_demo_runs_the_failback_and_reports_identical(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "replication", "demo", "--size", "32M", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    # every step of the journey ran, with the delta estimated before anything moved
    for step in ("2a. preflight passed", "2b. reprotected", "2c. failed over", "4. reverse"):
        assert step in out, out
    assert out.count("qemu-img compare: identical") == 2
    assert "every disk pair IDENTICAL" in out
    # the report's wire bytes: nothing at the dry run, then a small delta, not the disks
    dry = re.search(r"2a\. reprotect preflight \+ dry run\s+\S+\s+([\d.]+) MiB", out)
    moved = re.search(
        r"2b\. reprotect Azure -> on-prem \(original VMDKs\)\s+\S+\s+([\d.]+) MiB", out
    )
    assert dry and float(dry.group(1)) == 0.0
    assert moved and 0 < float(moved.group(1)) < 4  # the disks hold 48 MiB

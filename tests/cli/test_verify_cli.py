"""``replication verify`` through the real CLI process: exit 0 equal, 1 differ, 2 error.

The promise: the verdict is the exit status, the differing block ranges are printed
(and with ``--json`` one JSON record on stdout), and an error is one line on stderr
with its code and exit status 2, never a traceback (Python's own exit status for an
uncaught exception, 1, would read as "they differ").
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from replication import cli
from replication.disks import create_disk, open_disk
from replication.hashmap import HashMap
from replication.manifest import ManifestStore

BS = 65536
SIZE = 2 << 20
TESTDATA = Path(__file__).parents[1] / "testdata"


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "replication", "verify", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], code: str) -> None:
    assert proc.returncode == 2, proc
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"replication: error [{code}]"), lines


@pytest.fixture
def disks(tmp_path):
    """a.raw and b.vmdk with equal content; c.raw differs in blocks 3 and 4-5."""
    data = bytearray(range(256)) * (SIZE // 256)
    paths = {}
    for name, fmt in (("a.raw", "raw"), ("b.vmdk", "vmdk"), ("c.raw", "raw")):
        with create_disk(str(tmp_path / name), SIZE, format=fmt) as d:
            d.write(0, data)
        paths[name] = str(tmp_path / name)
    with open_disk(paths["c.raw"], writable=True) as d:
        d.write(3 * BS + 10, b"x")
        d.write(4 * BS, b"y" * (2 * BS))
    return paths


def test_equal_disks_exit_0(disks):
    proc = run_cli(disks["a.raw"], disks["b.vmdk"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("equal: ")


def test_differing_disks_exit_1_and_print_the_ranges(disks):
    proc = run_cli(disks["b.vmdk"], disks["c.raw"], "--recheck-delay", "0")
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.startswith("differ: ")
    assert "3 block(s) differ, in 1 range(s)" in proc.stdout
    assert f"blocks 3-5: bytes [{3 * BS}, {6 * BS})" in proc.stdout


def test_json_record(disks):
    proc = run_cli(disks["a.raw"], disks["c.raw"], "--json", "--recheck-delay", "0")
    assert proc.returncode == 1
    record = json.loads(proc.stdout)
    assert record["equal"] is False and record["blocks_differing"] == 3
    assert record["ranges"] == [{"first": 3, "blocks": 3, "offset": 3 * BS, "length": 3 * BS}]
    proc = run_cli(disks["a.raw"], disks["b.vmdk"], "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["equal"] is True


def test_manifest_mode(tmp_path, disks):
    store = ManifestStore(tmp_path / "manifests")
    with open_disk(disks["a.raw"]) as d:
        root = store.commit(HashMap.compute(d, BS).digests, BS, SIZE)
    manifests = str(tmp_path / "manifests")
    proc = run_cli(disks["b.vmdk"], "--store", manifests, "--root", root)
    assert proc.returncode == 0, proc.stderr
    proc = run_cli(disks["c.raw"], "--store", manifests, "--root", root, "--json")
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["ranges"][0]["first"] == 3


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["{missing}", "{a}"], "disk.io"),
        (["{a}", "{bad_vmdk}"], "disk.corrupt_header"),
        (["{a}"], "usage.invalid"),
        (["{a}", "{a}", "--store", "{tmp}"], "usage.invalid"),
        (["{a}", "--store", "{tmp}"], "usage.invalid"),
        (["{a}", "--store", "{tmp}", "--root", "xyz"], "usage.invalid"),
        (["{a}", "--store", "{tmp}", "--root", "0" * 64], "manifest.error"),
        (["{a}", "{a}", "--block-size", "3000"], "usage.invalid"),
    ],
)
def test_errors_exit_2_with_one_line(tmp_path, disks, args, code, capsys):
    bad = tmp_path / "bad.vmdk"  # a hostile header from the committed fixtures
    shutil.copy(TESTDATA / "vmdk" / "bad-grain-zero.vmdk", bad)
    values = {"missing": str(tmp_path / "nope"), "a": disks["a.raw"], "tmp": str(tmp_path)}
    values["bad_vmdk"] = str(bad)
    argv = [a.format(**values) for a in args]
    if code == "disk.corrupt_header":  # one case through a real process
        assert_one_line_error(run_cli(*argv), code)
        return
    assert cli.main(["verify", *argv]) == 2
    proc = subprocess.CompletedProcess(argv, 2, *capsys.readouterr())
    assert_one_line_error(proc, code)


def test_a_pruned_point_is_an_error(tmp_path, disks):
    ManifestStore(tmp_path / "m")
    proc = run_cli(disks["a.raw"], "--store", str(tmp_path / "m"), "--root", "0" * 64, "--json")
    assert_one_line_error(proc, "manifest.not_found")
    assert json.loads(proc.stdout)["error"]["code"] == "manifest.not_found"


def test_an_unexpected_exception_is_exit_2_not_a_traceback(disks, monkeypatch, capsys):
    def boom(*args, **kwargs):
        raise RuntimeError("bug")

    monkeypatch.setattr("replication.cli.verify_cmd.verify_paths", boom)
    assert cli.main(["verify", disks["a.raw"], disks["b.vmdk"]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("replication: error [replication.error]: internal error: RuntimeError")

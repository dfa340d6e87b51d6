"""Sync at scale: multi-extent VMDKs past 2 GiB, and memory bounded on a 64 GiB disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import qemu_check, qemu_compare, qemu_convert, require

pytestmark = pytest.mark.oracle

GiB = 1 << 30


def _sparse_raw(path: Path, size: int, writes: list[tuple[int, bytes]]) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in writes:
            f.seek(off)
            f.write(data)


def _peak_rss_of(cmd: list[str]) -> tuple[subprocess.CompletedProcess[str], int]:
    """Run ``cmd`` in a fresh wrapper process; return it and its peak RSS in bytes."""
    wrapper = (
        "import resource, subprocess, sys, json\n"
        "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "print(json.dumps({'rc': p.returncode, 'out': p.stdout, 'err': p.stderr,\n"
        "  'rss': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", wrapper, *cmd],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    rec = json.loads(out.stdout)
    return subprocess.CompletedProcess(cmd, rec["rc"], rec["out"], rec["err"]), rec["rss"]


def test_peak_memory_on_a_64_gib_sparse_disk_is_bounded(tmp_path):
    size = 64 * GiB
    writes = [(i * GiB + 12345 * 512, os.urandom(256 << 10)) for i in range(0, 64, 3)]
    src, tgt = tmp_path / "src.raw", tmp_path / "tgt.vmdk"
    _sparse_raw(src, size, writes)
    subprocess.run(
        [require("qemu-img"), "create", "-q", "-f", "vmdk", str(tgt), str(size)], check=True
    )
    proc, rss = _peak_rss_of(
        [sys.executable, "-m", "replication", "sync", "--json", str(src), str(tgt)]
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["blocks_total"] == size // 65536
    assert report["blocks_differing"] == sum(
        -(-(len(d) + off % 65536) // 65536) for off, d in writes
    )
    assert rss < 200 << 20, f"peak RSS {rss >> 20} MiB"
    assert qemu_compare(src, tgt, "vmdk").returncode == 0


@pytest.mark.parametrize("subformat", ["twoGbMaxExtentSparse", "twoGbMaxExtentFlat"])
def test_multi_extent_vmdk_past_2_gib(tmp_path, subformat):
    size = 5 * GiB + 3 * (1 << 20)
    base_writes = [(k * (GiB // 2) - 4096, os.urandom(64 << 10)) for k in range(1, 10)]
    src_raw, base_raw = tmp_path / "src.raw", tmp_path / "base.raw"
    _sparse_raw(base_raw, size, base_writes)
    # the change straddles the first 2 GiB extent boundary, plus the very last sector
    changes = [(2 * GiB - 8192, os.urandom(16384)), (size - 512, os.urandom(512))]
    _sparse_raw(src_raw, size, base_writes + changes)
    tgt = tmp_path / "t.vmdk"
    qemu_convert(base_raw, tgt, "vmdk", f"subformat={subformat}")
    assert len(list(tmp_path.glob("t-*.vmdk"))) == 3
    proc = subprocess.run(
        [sys.executable, "-m", "replication", "sync", "--json", str(src_raw), str(tgt)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["blocks_differing"] == 3
    assert qemu_compare(src_raw, tgt, "vmdk").returncode == 0
    assert qemu_check(tgt).returncode == 0

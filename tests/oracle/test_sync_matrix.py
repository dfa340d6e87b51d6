"""``replication sync`` from every readable layout into every writable layout.

For each pair: the target starts as a copy of the base content (made by qemu-img),
the source is the base with about 2 % of its 64 KiB blocks rewritten (some whole,
some 4 KiB inside a block, some turned to zeros). After ``replication sync`` (a real
process, traced with strace):

* qemu-img compare says the target equals the source's content;
* a VMDK target passes qemu-img check, is read identical by libvmdk, keeps every
  grain table equal to its redundant copy, and has no new grain allocated for zeros;
* a VHD target is read identical by libvhdi;
* the bytes written to the target's files, counted by strace from outside the
  process, are at most 1.1x the changed blocks plus the format's metadata.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import (
    SOURCE_LAYOUTS,
    TARGET_LAYOUTS,
    allocated_zero_grains,
    libyal_sha256,
    make_image,
    mutate_blocks,
    qemu_check,
    qemu_compare,
    realistic_bytes,
    require,
    strace_written_bytes,
    vmdk_extent_files,
    vmdk_redundant_tables_equal,
    write_raw,
)

pytestmark = pytest.mark.oracle

SIZE = 24 << 20
BLOCK = 65536
#: descriptor rewrite (new CID), grain-table sectors, VHD footer/BAT/bitmaps
METADATA_ALLOWANCE = 64 << 10


def _id(layout):
    return layout[1] or layout[0] if layout[0] != "vhd" else f"vhd-{layout[1]}"


@pytest.fixture(scope="module")
def contents(tmp_path_factory):
    d = tmp_path_factory.mktemp("contents")
    base = realistic_bytes(SIZE, seed=21)
    new = bytearray(base)
    changed = mutate_blocks(new, 0.02, seed=22)
    return write_raw(d / "base.raw", base), write_raw(d / "new.raw", new), changed


def run_traced_sync(src: Path, tgt: Path, log: Path) -> subprocess.CompletedProcess[str]:
    strace = require("strace")
    cmd = [
        strace,
        "-f",
        "-y",
        "-s0",
        "-qq",
        "-e",
        "trace=write,pwrite64,writev,pwritev,pwritev2",
        "-o",
        str(log),
        sys.executable,
        "-m",
        "replication",
        "sync",
        "--json",
        str(src),
        str(tgt),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("target_layout", TARGET_LAYOUTS, ids=_id)
@pytest.mark.parametrize("source_layout", SOURCE_LAYOUTS, ids=_id)
def test_sync_pair(tmp_path, contents, source_layout, target_layout):
    base_raw, new_raw, changed = contents
    (tmp_path / "src").mkdir()
    (tmp_path / "tgt").mkdir()
    src = make_image(new_raw, tmp_path / "src", "source", source_layout)
    tgt = make_image(base_raw, tmp_path / "tgt", "target", target_layout)
    expected = new_raw.read_bytes()
    zero_before = allocated_zero_grains(tgt, expected) if tgt.suffix == ".vmdk" else set()

    proc = run_traced_sync(src, tgt, tmp_path / "strace.log")
    assert proc.returncode == 0, proc.stderr

    # content, judged by qemu
    fmt = {"raw": "raw", "vhd": "vpc", "vmdk": "vmdk"}[target_layout[0]]
    cmp = qemu_compare(new_raw, tgt, fmt)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    # only the delta was written, counted from outside the process
    written = strace_written_bytes(tmp_path / "strace.log", tmp_path / "tgt")
    assert written <= 1.1 * len(changed) * BLOCK + METADATA_ALLOWANCE, written
    assert written >= len(changed) * BLOCK * 0.5  # the sync did write the delta

    if target_layout[0] == "vmdk":
        chk = qemu_check(tgt)
        assert chk.returncode == 0, chk.stdout + chk.stderr
        assert libyal_sha256(tgt, "vmdk") == (SIZE, hashlib.sha256(expected).hexdigest())
        for extent in vmdk_extent_files(tgt):
            assert vmdk_redundant_tables_equal(extent) == []
        assert allocated_zero_grains(tgt, expected) <= zero_before
    if target_layout[0] == "vhd":
        assert libyal_sha256(tgt, "vhd") == (SIZE, hashlib.sha256(expected).hexdigest())

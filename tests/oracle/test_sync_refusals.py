"""What ``replication sync`` refuses, through the real CLI: snapshot chains.

The scenario's rule: a VM with snapshots cannot be reprotected. Both shapes are
refused as a target, with a message that names snapshots, a non-zero exit and
every file unchanged byte for byte: a snapshot delta (child), and a base disk that
has a child beside it (writing the parent would silently break the child).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import make_raw, qemu_convert, require, sha256_file

pytestmark = pytest.mark.oracle


@pytest.fixture
def chain(tmp_path):
    raw = tmp_path / "content.raw"
    make_raw(raw, 8 << 20, seed=5)
    base = tmp_path / "base.vmdk"
    qemu_convert(raw, base, "vmdk", "subformat=monolithicSparse")
    child = tmp_path / "base-000001.vmdk"
    subprocess.run(
        [
            require("qemu-img"),
            "create",
            "-q",
            "-f",
            "vmdk",
            "-b",
            "base.vmdk",
            "-F",
            "vmdk",
            str(child),
        ],
        check=True,
        cwd=tmp_path,
        capture_output=True,
    )
    source = tmp_path / "source.raw"
    make_raw(source, 8 << 20, seed=6)
    return tmp_path, base, child, source


def _snapshot(tmp_path: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(tmp_path.iterdir()) if p.suffix == ".vmdk"}


@pytest.mark.parametrize("which", ["child", "base"])
@pytest.mark.parametrize("dry_run", [False, True])
def test_snapshot_chain_target_is_refused(chain, which, dry_run):
    tmp_path, base, child, source = chain
    target = child if which == "child" else base
    before = _snapshot(tmp_path)
    args = [sys.executable, "-m", "replication", "sync", str(source), str(target)]
    proc = subprocess.run(
        [*args, "--dry-run"] if dry_run else args, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode != 0
    assert "snapshot" in proc.stderr.lower()
    assert "[disk.has_snapshots]" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert _snapshot(tmp_path) == before


def test_child_is_still_readable_as_a_source(chain, tmp_path_factory):
    _, _, child, _ = chain
    out = tmp_path_factory.mktemp("out") / "copy.raw"
    out.write_bytes(b"")
    with open(out, "r+b") as f:
        f.truncate(8 << 20)
    proc = subprocess.run(
        [sys.executable, "-m", "replication", "sync", str(child), str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    cmp = subprocess.run(
        [require("qemu-img"), "compare", "-f", "raw", "-F", "vmdk", str(out), str(child)],
        capture_output=True,
        text=True,
    )
    assert cmp.returncode == 0, cmp.stdout

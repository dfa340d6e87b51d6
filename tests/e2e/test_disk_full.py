"""A full disk at the process server or the master target: a clear, recoverable state.

Each test mounts a small tmpfs (we run as root), fills it with a filler file so the
agent's writes hit ``ENOSPC`` for real, checks what the agents say and keep while
the device is full, then deletes the filler and expects replication to finish
with a target identical to the source (``qemu-img compare``) and nothing corrupt.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from replication.disks import open_disk
from replication.spool import Spool
from tests import ledger
from tests.helpers import fill_device, qemu_check, qemu_compare
from tests.proxy import FaultProxy

pytestmark = [pytest.mark.oracle, pytest.mark.timeout(120)]

MiB = 1 << 20
SIZE = 64 * MiB


def test_a_full_spool_device_is_retried_and_loses_nothing(cluster):
    source = cluster.make_source("source.raw", SIZE, 24 * MiB)
    volume = cluster.make_volume(cluster.root / "target.vmdk", SIZE)
    spool_dir = cluster.tmpfs("spoolfs", 16 * MiB) / "spool"
    mt = cluster.master_target(volume)
    to_mt = FaultProxy(mt.port)
    ps = cluster.process_server(to_mt.port, spool_dir=spool_dir)
    to_ps = FaultProxy(ps.port)
    try:
        filler = fill_device(spool_dir.parent, leave=3 * MiB)
        ledger.tried("network and device faults", "spool device full")
        src = cluster.source(to_ps.port, source, deadline=90)
        cluster.wait_for(lambda: to_ps.bytes_up > 256 << 10, 30, "frames to flow")
        to_mt.stall(True)  # nothing is persisted, so nothing leaves the spool
        cluster.wait_for(lambda: _count(ps.log, "event=spool_disk_full") >= 2, 30, "disk full")
        # a typed, retryable answer: the source backs off and resends, nobody crashed
        assert ps.proc.poll() is None and src.poll() is None, cluster.source_log()
        cluster.wait_for(
            lambda: any("spool.disk_full" in p for p in cluster.status(ps.port).problems),
            10,
            "the problem in the status",
        )
        assert "Traceback" not in ps.log.read_text()
        filler.unlink()  # space comes back
        to_mt.stall(False)
        assert src.wait(timeout=60) == 0, cluster.source_log()
        assert cluster.status(ps.port).problems == []
    finally:
        ledger.wire(to_ps)
        to_ps.close()
        to_mt.close()
    cluster.stop()
    assert qemu_compare(source, volume, "vmdk").returncode == 0
    ledger.lost_nothing("network and device faults")
    # the spool opens cleanly (no corrupt record) and holds nothing: all persisted
    with Spool.open(spool_dir, limit_bytes=1 << 30) as spool:
        assert spool.used_bytes == 0


def test_a_full_master_target_device_is_retried_and_acks_only_what_is_on_disk(cluster):
    source = cluster.make_source("source.raw", SIZE, 16 * MiB)
    fs = cluster.tmpfs("mtfs", 28 * MiB)
    volume = cluster.make_volume(fs / "target.vmdk", SIZE)
    state = fs / "mt" / "apply-state.sqlite"
    mt = cluster.master_target(volume, data_dir=fs / "mt")
    ps = cluster.process_server(mt.port)
    filler = fill_device(fs, leave=4 * MiB)
    ledger.tried("network and device faults", "master-target device full")
    src = cluster.source(ps.port, source, deadline=90)
    cluster.wait_for(lambda: "[volume.disk_full]" in mt.log.read_text(), 30, "disk full")
    # the process server keeps the frames and retries; it says why
    problems = cluster.wait_for(
        lambda: [p for p in cluster.status(ps.port).problems if "volume.disk_full" in p],
        10,
        "the problem in the status",
    )
    assert "retrying" in problems[0] and "parked" not in problems[0], problems
    assert cluster.status(ps.port).spool_bytes > 0
    assert mt.proc.poll() is None and src.poll() is None, cluster.source_log()
    # crash the master target while its device is full: what it acked is on disk
    mt.kill()
    persisted = _persisted_seq(state)
    assert persisted < 16  # the full device stopped it
    assert qemu_check(volume).returncode == 0
    _assert_first_frames_on_disk(volume, source, persisted)
    filler.unlink()
    agent = cluster.restart(mt)
    assert src.wait(timeout=60) == 0, cluster.source_log()
    cluster.stop()
    assert "Traceback" not in agent.log.read_text()
    assert qemu_compare(source, volume, "vmdk").returncode == 0
    assert _persisted_seq(state) == 16  # one frame per MiB
    ledger.lost_nothing("network and device faults")


def _count(log: Path, text: str) -> int:
    return log.read_text(errors="replace").count(text)


def _persisted_seq(state: Path) -> int:
    """The master target's recorded PERSISTED seq of vol1, after an integrity check."""
    db = sqlite3.connect(state)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        rows = db.execute("SELECT persisted_seq FROM sessions WHERE volume = 'vol1'").fetchall()
    finally:
        db.close()
    return max((r[0] for r in rows), default=0)


def _assert_first_frames_on_disk(volume: Path, source: Path, persisted: int) -> None:
    """Frame k carries MiB k-1 of the source (every block of the first MiBs differs)."""
    length = persisted * MiB
    with open_disk(str(volume)) as disk:
        on_disk = disk.read(0, length)
    with open(source, "rb") as f:
        assert on_disk == f.read(length), f"PERSISTED {persisted} but the volume differs"

"""Epoch cuts on a live tracked disk: what an epoch carries is the disk at its cut,
whatever is written meanwhile (copy-on-write); held writes wait for the release."""

from __future__ import annotations

import random
import threading

import numpy as np

from replication.disks import create_disk
from replication.epochs import LiveDisk
from replication.tracking import TrackedDisk

BLOCK = 65536
SIZE = 2 << 20


def live_disk(tmp_path) -> LiveDisk:
    raw = tmp_path / "d.raw"
    with create_disk(str(raw), SIZE, format="raw") as d:
        d.write(0, random.Random(1).randbytes(SIZE))
        d.flush()
    tracked = TrackedDisk.open(raw, tmp_path / "state")
    return LiveDisk(tracked, tracked.tracker, tmp_path / "state")


def test_an_epoch_reads_the_disk_as_it_was_at_the_cut(tmp_path):
    live = live_disk(tmp_path)
    rng = random.Random(2)
    for b in (1, 2, 3, 9):
        live.write(b * BLOCK, rng.randbytes(BLOCK))
    at_cut = live.read(0, SIZE)
    epoch, reader, oldest = live.cut()
    assert oldest is not None
    assert list(epoch.blocks()) == [1, 2, 3, 9]
    # writes after the cut, to blocks of the epoch not read yet and to others
    live.write(2 * BLOCK + 100, b"new" * 1000)
    live.write(9 * BLOCK, b"\xff" * BLOCK)
    live.write(20 * BLOCK, b"\xee" * BLOCK)
    for b in epoch.blocks():
        assert reader.read(int(b) * BLOCK, BLOCK) == at_cut[b * BLOCK : (b + 1) * BLOCK]
    assert reader.read(BLOCK, 3 * BLOCK) == at_cut[BLOCK : 4 * BLOCK]  # a run, mixed
    epoch.commit()
    live.release()
    # the writes after the cut are the next epoch, with their own oldest write
    nxt, _reader, oldest = live.cut()
    assert set(nxt.blocks()) == {2, 9, 20} and oldest is not None
    nxt.commit()
    live.close()
    live.disk.close()


def test_a_block_read_before_a_write_is_not_copied(tmp_path):
    live = live_disk(tmp_path)
    live.write(4 * BLOCK, b"a" * BLOCK)
    epoch, reader, _ = live.cut()
    before = reader.read(4 * BLOCK, BLOCK)
    live.write(4 * BLOCK, b"b" * BLOCK)
    assert before == b"a" * BLOCK
    assert live._snapshot.copied_blocks == 0  # already sent: nothing to keep aside
    epoch.commit()
    live.close()
    live.disk.close()


def test_held_writes_wait_until_released_and_a_cut_can_be_made_meanwhile(tmp_path):
    live = live_disk(tmp_path)
    live.hold_writes()
    done = threading.Event()
    writer = threading.Thread(target=lambda: (live.write(0, b"x" * 512), done.set()), daemon=True)
    writer.start()
    assert not done.wait(0.3)  # the writer is not acknowledged while held
    epoch, _reader, oldest = live.cut()  # the sender is not blocked by the hold
    assert oldest is None and epoch.count() == 0
    epoch.commit()
    live.release()
    live.release_writes()
    assert done.wait(10)
    writer.join(10)
    assert live.read(0, 512) == b"x" * 512
    live.close()
    live.disk.close()


def test_wake_makes_the_sender_cut_without_writes(tmp_path):
    live = live_disk(tmp_path)
    assert not live.wait_for_writes(0.05)
    live.wake()
    assert live.wait_for_writes(0.05)
    assert not live.wait_for_writes(0.05)  # a wake is used once
    assert np.all(live.cut()[0].blocks() == np.array([], dtype=np.int64))
    live.close()
    live.disk.close()

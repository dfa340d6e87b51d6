"""The sans-I/O source session: planning, the window, stop, acks and resends."""

from __future__ import annotations

import numpy as np

from replication.disks import open_disk
from replication.frame import FrameDecoder
from replication.protocol import AckLevel
from replication.source import SourceSession
from replication.volumes import volume_disk_id
from tests.helpers import make_raw

BLOCK = 65536


def session_for(tmp_path, size=4 << 20, **kw) -> SourceSession:
    raw = tmp_path / "d.raw"
    make_raw(raw, size, seed=3)
    disk = open_disk(str(raw))
    return SourceSession(disk, "vol1", b"k" * 32, block_size=BLOCK, **kw)


def test_an_empty_plan_is_complete_without_a_frame(tmp_path):
    s = session_for(tmp_path)
    s.plan_blocks(np.array([], dtype=np.int64), 64)
    assert s.complete() and s.last_seq == 0 and s.next_frames() == []


def test_acks_count_persisted_blocks_and_release_frames(tmp_path):
    s = session_for(tmp_path)
    s.plan_blocks(np.array([1, 2, 3, 10, 40, 41]), 64)
    frames = s.next_frames()
    assert [seq for seq, _ in frames] == [1, 2, 3]  # three runs: 1-3, 10, 40-41
    s.on_ack(2, AckLevel.RECEIVED)
    assert s.stats.blocks_persisted == 0 and not s.complete()
    s.on_ack(2, AckLevel.PERSISTED)
    assert s.stats.blocks_persisted == 4
    assert [seq for seq, _ in s.resend_after(2)] == [3]
    s.on_ack(3, AckLevel.PERSISTED)
    assert s.complete() and s.stats.blocks_persisted == 6


def test_stop_sealing_completes_with_what_was_already_sent(tmp_path):
    s = session_for(tmp_path, window_bytes=1)  # one frame fills the window
    s.plan_blocks(np.arange(0, 64, 2), 64)
    assert len(s.next_frames()) == 1 and s.window_full()
    s.stop_sealing()
    assert s.done_sealing() and not s.complete()
    assert s.next_frames() == []
    s.on_ack(1, AckLevel.PERSISTED)
    assert s.complete() and s.last_seq == 1


def _decoded(session: SourceSession, limit: int) -> list[tuple[int, int, bytes, bool]]:
    dec = FrameDecoder(b"k" * 32, volume_disk_id("vol1"))
    out = []
    for _ in range(100):  # bounded: the plan below needs a few calls
        if session.done_sealing():
            break
        for seq, frame in session.next_frames(limit):
            f = dec.decode(frame)
            out.append((seq, f.offset, bytes(f.data), f.marker))
    return out


def test_two_seal_workers_make_the_frames_of_one(tmp_path):
    """Sealed in groups on a pool: same seqs, offsets, data and marker, in order."""
    plan = np.array([0, 1, 2, 5, *range(8, 40), 50, 63])
    sessions = {}
    for workers in (1, 2, 3):
        sub = tmp_path / str(workers)
        sub.mkdir()
        s = session_for(sub, seal_workers=workers)
        s.set_marker(b'{"type": "epoch-end"}')
        s.plan_blocks(plan, 64)
        sessions[workers] = _decoded(s, limit=5)  # 5: groups cut by the limit too
        assert s.stats.blocks_to_send == len(plan) and s.last_seq == len(sessions[workers])
    assert sessions[2] == sessions[1] and sessions[3] == sessions[1]
    frames = sessions[1]
    assert [seq for seq, *_ in frames] == list(range(1, len(frames) + 1))
    assert [marker for *_, marker in frames] == [False] * (len(frames) - 1) + [True]
    disk = open_disk(str(tmp_path / "1" / "d.raw"))
    for _seq, offset, data, marker in frames[:-1]:
        assert not marker and data == disk.read(offset, len(data))
    assert sum(len(d) for _, _, d, m in frames if not m) == len(plan) * BLOCK

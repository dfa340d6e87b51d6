"""The process server's spool: ordering, idempotent resends, limits, crash recovery."""

from __future__ import annotations

import errno
import os
import random
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replication import spool as spool_mod
from replication.errors import (
    FrameFormatError,
    FrameGapError,
    FrameReplayError,
    SpoolBusyError,
    SpoolCorruptError,
    SpoolDiskFullError,
    SpoolError,
    SpoolFullError,
    UsageError,
)
from replication.frame import FrameEncoder, FrameHeader
from replication.spool import RECORD_HEADER_SIZE, Spool
from tests.helpers import mount_tmpfs

REPO = Path(__file__).parents[2]
DISK = bytes(range(16))
S1 = b"\x01" * 16
S2 = b"\x02" * 16
S3 = b"\x03" * 16
BIG = 1 << 40


def make_frame(session: bytes, seq: int, length: int = 100, fill: int | None = None) -> bytes:
    """A well-formed raw frame (random 'ciphertext'): the spool only reads the header."""
    header = FrameHeader(DISK, session, seq, 0, length, length + 32)
    rng = random.Random(f"{session.hex()}/{seq}/{fill}")  # same bytes in any process
    return header.pack() + rng.randbytes(length + 32)


def segments(path: Path) -> list[Path]:
    return sorted(path.glob("spool-*.seg"))


def fill(sp: Spool, volume: str, session: bytes, first: int, last: int, **kw) -> dict[int, bytes]:
    frames = {}
    for seq in range(first, last + 1):
        frames[seq] = make_frame(session, seq, **kw)
        assert sp.append(volume, session, seq, frames[seq]).status == "appended"
    return frames


# --- ordering and idempotence -------------------------------------------------------


def test_round_trip_across_segment_rolls(tmp_path: Path) -> None:
    rng = random.Random(7)
    sessions = {("vol-a", S1): {}, ("vol-b", S2): {}, ("vol-a", S3): {}}
    with Spool.open(tmp_path, limit_bytes=BIG, segment_size=4096) as sp:
        for _ in range(600):
            (volume, session), frames = rng.choice(list(sessions.items()))
            seq = len(frames) + 1
            frames[seq] = make_frame(session, seq, rng.randrange(1, 900))
            assert sp.append(volume, session, seq, frames[seq]).status == "appended"
            if rng.random() < 0.1:
                sp.sync()
        durable = sp.sync()
        assert len(segments(tmp_path)) > 20
        for (volume, session), frames in sessions.items():
            assert durable.get((volume, session), 0) in (0, len(frames))
            assert sp.state(volume, session) == (len(frames), 0)
            assert dict(sp.pending(volume, session, 0)) == frames
            assert [s for s, _ in sp.pending(volume, session, 5)] == list(range(6, len(frames) + 1))
    with Spool.open(tmp_path, limit_bytes=BIG, segment_size=4096) as sp:
        for (volume, session), frames in sessions.items():
            assert sp.state(volume, session) == (len(frames), 0)
            assert dict(sp.pending(volume, session, 0)) == frames


def test_received_needs_sync_and_pending_yields_only_durable(tmp_path: Path) -> None:
    with Spool.open(tmp_path, limit_bytes=BIG) as sp:
        fill(sp, "v", S1, 1, 3)
        assert sp.state("v", S1) == (0, 0)
        assert list(sp.pending("v", S1, 0)) == []
        assert sp.sync() == {("v", S1): 3}
        fill(sp, "v", S1, 4, 5)
        assert sp.state("v", S1) == (3, 0)
        assert [s for s, _ in sp.pending("v", S1, 0)] == [1, 2, 3]
        assert sp.sync() == {("v", S1): 5}
        assert sp.sync() == {}


def test_duplicate_resend_is_idempotent(tmp_path: Path) -> None:
    with Spool.open(tmp_path, limit_bytes=BIG, segment_size=1024) as sp:
        frames = fill(sp, "v", S1, 1, 20)
        used = sp.used_bytes
        dup = sp.append("v", S1, 7, frames[7])  # not synced yet
        assert (dup.status, dup.seq, dup.verified) == ("duplicate", 7, True)
        sp.sync()
        for seq in range(1, 21):  # a resumed source resends everything
            assert sp.append("v", S1, seq, frames[seq]).status == "duplicate"
        assert sp.used_bytes == used
        assert sp.state("v", S1) == (20, 0)
    with Spool.open(tmp_path, limit_bytes=BIG, segment_size=1024) as sp:
        assert sp.append("v", S1, 20, frames[20]).status == "duplicate"
        sp.mark_persisted("v", S1, 15)
        gone = sp.append("v", S1, 2, frames[2])  # its segment is deleted: cannot compare
        assert (gone.status, gone.verified) == ("duplicate", False)
        assert sp.append("v", S1, 21, make_frame(S1, 21)).status == "appended"


def test_conflicting_resend_is_refused(tmp_path: Path) -> None:
    with Spool.open(tmp_path, limit_bytes=BIG) as sp:
        fill(sp, "v", S1, 1, 3)
        other = make_frame(S1, 2, fill=1)
        with pytest.raises(FrameReplayError) as info:
            sp.append("v", S1, 2, other)
        assert info.value.code == "frame.replay"
    with Spool.open(tmp_path, limit_bytes=BIG) as sp:
        with pytest.raises(FrameReplayError):
            sp.append("v", S1, 3, make_frame(S1, 3, length=50))
        assert sp.state("v", S1) == (3, 0)


def test_gap_is_refused(tmp_path: Path) -> None:
    with Spool.open(tmp_path, limit_bytes=BIG) as sp:
        with pytest.raises(FrameGapError):
            sp.append("v", S1, 2, make_frame(S1, 2))  # a session starts at seq 1
        fill(sp, "v", S1, 1, 2)
        with pytest.raises(FrameGapError):
            sp.append("v", S1, 4, make_frame(S1, 4))
        sp.append("v", S2, 1, make_frame(S2, 1))  # sessions are independent
        assert sp.sync() == {("v", S1): 2, ("v", S2): 1}


def test_frame_must_match_identity(tmp_path: Path) -> None:
    with Spool.open(tmp_path, limit_bytes=BIG) as sp:
        with pytest.raises(FrameFormatError):
            sp.append("v", S1, 1, make_frame(S1, 2))  # header seq differs
        with pytest.raises(FrameFormatError):
            sp.append("v", S1, 1, make_frame(S2, 1))  # header salt is another session
        with pytest.raises(FrameFormatError):
            sp.append("v", S1, 1, make_frame(S1, 1)[:-1])
        with pytest.raises(FrameFormatError):
            sp.append("v", S1, 1, make_frame(S1, 1) + b"x")
        with pytest.raises(UsageError):
            sp.append("", S1, 1, make_frame(S1, 1))
        assert sp.used_bytes == 0


def test_second_open_is_refused(tmp_path: Path) -> None:
    with Spool.open(tmp_path, limit_bytes=BIG), pytest.raises(SpoolBusyError):
        Spool.open(tmp_path, limit_bytes=BIG)
    Spool.open(tmp_path, limit_bytes=BIG).close()


# --- limit and forwarding cursor ---------------------------------------------------


def test_limit_pushes_back_then_frees_after_mark_persisted(tmp_path: Path) -> None:
    record = RECORD_HEADER_SIZE + 1 + len(make_frame(S1, 1))
    with Spool.open(tmp_path, limit_bytes=10 * record, segment_size=3 * record) as sp:
        fill(sp, "v", S1, 1, 10)
        assert sp.used_bytes == 10 * record
        with pytest.raises(SpoolFullError) as info:
            sp.append("v", S1, 11, make_frame(S1, 11))
        assert info.value.retryable and info.value.code == "spool.full"
        assert sp.state("v", S1) == (0, 0)  # nothing changed, not even the appended seq
        with pytest.raises(UsageError):
            sp.mark_persisted("v", S1, 1)  # not received (synced) yet
        sp.sync()
        forwarded = [seq for seq, _ in sp.pending("v", S1, 0)]
        assert forwarded == list(range(1, 11))
        sp.mark_persisted("v", S1, 5)  # segments 1 (1..3) deleted; 2 (4..6) still needed
        assert sp.used_bytes == 7 * record
        assert len(segments(tmp_path)) == 3
        assert [seq for seq, _ in sp.pending("v", S1, 0)] == list(range(6, 11))
        fill(sp, "v", S1, 11, 13)
        with pytest.raises(SpoolFullError):
            sp.append("v", S1, 14, make_frame(S1, 14))
        sp.sync()
        sp.mark_persisted("v", S1, 13)
        assert sp.used_bytes == 0 and segments(tmp_path) == []
        assert sp.state("v", S1) == (13, 13)
        sp.mark_persisted("v", S1, 4)  # stale ack: ignored
    with Spool.open(tmp_path, limit_bytes=10 * record) as sp:
        assert sp.state("v", S1) == (13, 13)
        assert sp.append("v", S1, 14, make_frame(S1, 14)).status == "appended"


def test_restart_after_clean_close(tmp_path: Path) -> None:
    with Spool.open(tmp_path, limit_bytes=BIG, segment_size=2000) as sp:
        a = fill(sp, "a", S1, 1, 30)
        b = fill(sp, "b", S2, 1, 12)
        sp.sync()
        sp.mark_persisted("a", S1, 25)
        fill(sp, "b", S2, 13, 14)  # closed without an explicit sync: close syncs
    with Spool.open(tmp_path, limit_bytes=BIG, segment_size=2000) as sp:
        assert sp.state("a", S1) == (30, 25)
        assert sp.state("b", S2) == (14, 0)
        assert dict(sp.pending("a", S1, 0)) == {s: a[s] for s in range(26, 31)}
        assert [s for s, _ in sp.pending("b", S2, 0)] == list(range(1, 15))
        assert dict(sp.pending("b", S2, 0))[12] == b[12]
        assert set(sp.sessions()) == {("a", S1), ("b", S2)}
        fill(sp, "a", S1, 31, 32)
        assert sp.sync() == {("a", S1): 32}


# --- crash recovery -------------------------------------------------------------------


def _last_record_offset(path: Path) -> int:
    data = path.read_bytes()
    offset, last = 0, 0
    while offset < len(data):
        last = offset
        offset += int.from_bytes(data[offset + 8 : offset + 12], "big")
    return last


def test_torn_tail_at_every_offset_is_truncated(tmp_path: Path) -> None:
    src = tmp_path / "src"
    with Spool.open(src, limit_bytes=BIG, segment_size=1500) as sp:
        frames = fill(sp, "v", S1, 1, 12, length=40)
        sp.sync()
    seg = segments(src)[-1]
    size = seg.stat().st_size
    start = _last_record_offset(seg)
    assert start > 0
    for cut in range(start, size + 1):
        work = tmp_path / f"cut{cut}"
        shutil.copytree(src, work)
        last = segments(work)[-1]
        os.truncate(last, cut)
        with Spool.open(work, limit_bytes=BIG, segment_size=1500) as sp:
            expect = 12 if cut == size else 11
            assert sp.state("v", S1) == (expect, 0), cut
            assert dict(sp.pending("v", S1, 0)) == {s: frames[s] for s in range(1, expect + 1)}
            assert last.stat().st_size == (size if cut == size else start)
            # the spool goes on from there
            assert sp.append("v", S1, expect + 1, make_frame(S1, expect + 1)).status == "appended"
            assert sp.sync() == {("v", S1): expect + 1}
        shutil.rmtree(work)


@pytest.mark.parametrize(
    "garbage", [b"\x00" * 300, b"RPLS" + bytes(100), random.Random(5).randbytes(77)]
)
def test_garbage_after_the_tail_is_truncated(tmp_path: Path, garbage: bytes) -> None:
    with Spool.open(tmp_path, limit_bytes=BIG) as sp:
        frames = fill(sp, "v", S1, 1, 5)
    seg = segments(tmp_path)[-1]
    size = seg.stat().st_size
    with seg.open("ab") as f:
        f.write(garbage)
    with Spool.open(tmp_path, limit_bytes=BIG) as sp:
        assert dict(sp.pending("v", S1, 0)) == frames
        assert seg.stat().st_size == size


def test_corruption_before_the_tail_is_an_error(tmp_path: Path) -> None:
    with Spool.open(tmp_path, limit_bytes=BIG, segment_size=800) as sp:
        for seq in range(1, 9):
            fill(sp, "v", S1, seq, seq)
            sp.sync()  # later records record that earlier bytes were fsynced
    segs = segments(tmp_path)
    assert len(segs) >= 3

    def damaged(path: Path, offset: int) -> str:
        work = tmp_path.parent / f"{tmp_path.name}-{path.name}-{offset}"
        shutil.copytree(tmp_path, work)
        with (work / path.name).open("r+b") as f:
            f.seek(offset + 70)
            byte = f.read(1)
            f.seek(offset + 70)
            f.write(bytes([byte[0] ^ 0x40]))
        with pytest.raises(SpoolCorruptError) as info:
            Spool.open(work, limit_bytes=BIG)
        return str(info.value)

    msg = damaged(segs[0], 0)  # a whole earlier segment must parse
    assert segs[0].name in msg and "offset 0" in msg
    msg = damaged(segs[-1], 0)  # last segment, but a later record says it was synced
    assert segs[-1].name in msg and "offset 0" in msg
    # the last record of the last segment is indistinguishable from a torn tail
    last = _last_record_offset(segs[-1])
    with segs[-1].open("r+b") as f:
        f.seek(last + 70)
        f.write(b"\xff\xfe")
    with Spool.open(tmp_path, limit_bytes=BIG) as sp:
        assert sp.state("v", S1) == (7, 0)


def test_corrupt_cursor_file_is_an_error(tmp_path: Path) -> None:
    with Spool.open(tmp_path, limit_bytes=BIG) as sp:
        fill(sp, "v", S1, 1, 2)
        sp.sync()
        sp.mark_persisted("v", S1, 1)
    cursor = tmp_path / spool_mod.CURSOR_FILE
    cursor.write_bytes(cursor.read_bytes().replace(b'"v"', b'"w"'))
    with pytest.raises(SpoolCorruptError, match=r"cursors\.json"):
        Spool.open(tmp_path, limit_bytes=BIG)


_WRITER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[2])
    from tests.unit.test_spool import S1, S2, make_frame
    from replication.spool import Spool
    sp = Spool.open(sys.argv[1], limit_bytes=1 << 40, segment_size=20000)
    seq = 0
    while True:
        for _ in range(5):
            seq += 1
            sp.append("v", S1, seq, make_frame(S1, seq, length=seq % 700 + 1))
            sp.append("w", S2, seq, make_frame(S2, seq, length=50))
        durable = sp.sync()
        print(durable[("v", S1)], flush=True)
    """
)


def test_kill_9_keeps_every_synced_frame(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(tmp_path), str(REPO)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    early = []
    try:
        # kill once the writer has synced a good number of frames, however loaded the
        # machine is (a fixed sleep killed it before its first sync under load)
        deadline = time.monotonic() + 60
        while len(early) < 60 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            early.append(line)
        proc.kill()
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = (b"".join(early) + out).decode().split("\n")[:-1]  # the last may be cut
    assert lines, err.decode()
    synced = [int(line) for line in lines]
    assert synced == sorted(synced) and synced[-1] >= 50
    with Spool.open(tmp_path, limit_bytes=BIG, segment_size=20000) as sp:
        received, _ = sp.state("v", S1)
        assert received >= synced[-1]
        seqs = []
        for seq, frame in sp.pending("v", S1, 0):
            assert frame == make_frame(S1, seq, length=seq % 700 + 1)
            seqs.append(seq)
        assert seqs == list(range(1, received + 1))
        assert sp.state("w", S2)[0] >= synced[-1]


# --- model-based ------------------------------------------------------------------------

_KEYS = [("a", S1), ("a", S2), ("b", S3)]
_op = st.one_of(
    st.tuples(st.just("append"), st.integers(0, 2), st.sampled_from(["next", "dup", "gap", "bad"])),
    st.tuples(st.just("sync"), st.just(0), st.just("")),
    st.tuples(st.just("mark"), st.integers(0, 2), st.sampled_from(["all", "half"])),
    st.tuples(st.just("reopen"), st.just(0), st.just("")),
    st.tuples(st.just("crash"), st.just(0), st.just("")),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(_op, max_size=60), limit=st.sampled_from([BIG, 2500]))
def test_random_interleavings_match_a_model(ops, limit) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        _run_model(Path(tmp), ops, limit)


def _run_model(path: Path, ops, limit: int) -> None:
    # model: per key the frames appended, the durable seq and the persisted seq
    frames: dict[tuple[str, bytes], list[bytes]] = {k: [] for k in _KEYS}
    durable = dict.fromkeys(_KEYS, 0)
    persisted = dict.fromkeys(_KEYS, 0)
    sp = Spool.open(path, limit_bytes=limit, segment_size=700)
    try:
        for name, i, how in ops:
            key = _KEYS[i]
            if name == "append":
                _model_append(sp, key, how, frames[key], persisted[key])
            elif name == "sync":
                sp.sync()
                durable = {k: len(v) for k, v in frames.items()}
            elif name == "mark":
                seq = durable[key] if how == "all" else durable[key] // 2
                sp.mark_persisted(*key, seq)
                persisted[key] = max(persisted[key], seq)
            else:  # reopen cleanly, or "crash": drop the object without syncing
                if name == "reopen":
                    sp.close()
                else:
                    sp._close_active()
                    sp._unlock()
                sp = Spool.open(path, limit_bytes=limit, segment_size=700)
                durable = {k: len(v) for k, v in frames.items()}  # page cache survived
            for k in _KEYS:
                assert sp.state(*k) == (durable[k], persisted[k])
                assert [f for _, f in sp.pending(*k, 0)] == frames[k][persisted[k] : durable[k]]
            assert sp.used_bytes <= limit
    finally:
        sp.close()


def _model_append(sp: Spool, key, how: str, log: list[bytes], persisted: int = 0) -> None:
    n = len(log)
    if how == "dup" and n:
        assert sp.append(*key, n, log[-1]).status == "duplicate"
    elif how == "bad" and n:
        other = make_frame(key[1], n, length=len(log[-1]) % 50 + 1, fill=9)
        try:
            result = sp.append(*key, n, other)
        except FrameReplayError:
            return
        # only a seq already persisted, whose record is gone, cannot be compared:
        # it is re-acknowledged and never spooled again
        assert n <= persisted and result.status == "duplicate" and not result.verified
    elif how == "gap":
        with pytest.raises(FrameGapError):
            sp.append(*key, n + 2, make_frame(key[1], n + 2))
    else:
        frame = make_frame(key[1], n + 1, length=(n * 37) % 200 + 1)
        try:
            assert sp.append(*key, n + 1, frame).status == "appended"
        except SpoolFullError:
            return
        log.append(frame)


# --- no plaintext on disk ----------------------------------------------------------------


def test_spool_files_hold_no_plaintext(tmp_path: Path) -> None:
    pattern = b"TOP-SECRET-PAYROLL-2026:"
    encoder = FrameEncoder(os.urandom(32), DISK, level=1)
    session = encoder.session_salt
    rng = random.Random(3)  # random filler: some frames compress, some are stored raw
    data = b"".join(
        pattern + b"alice=100;bob=200;" + rng.randbytes(i % 3 * 40) for i in range(2000)
    )
    with Spool.open(tmp_path, limit_bytes=BIG, segment_size=1000) as sp:
        for seq in range(1, 21):
            chunk = data[seq * 1000 : seq * 1000 + 4096]
            assert pattern in chunk
            sp.append("v", session, seq, encoder.encode(seq, seq * 4096, chunk))
        sp.sync()
        sp.mark_persisted("v", session, 3)
    files = [p for p in tmp_path.iterdir() if p.is_file()]
    assert len(segments(tmp_path)) >= 2
    for p in files:
        content = p.read_bytes()
        assert pattern not in content and b"alice=100" not in content, p


# --- disk full ------------------------------------------------------------------------


class _Faults:
    """Make os.write / os.fsync fail with ENOSPC for the spool's files when armed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.write_budget: int | None = None  # bytes still accepted before ENOSPC
        self.fail_fsync = False
        real_write, real_fsync = os.write, os.fsync

        def write(fd: int, data) -> int:
            if self.write_budget is None or fd <= 2:
                return real_write(fd, data)
            if self.write_budget == 0:
                raise OSError(errno.ENOSPC, "No space left on device")
            n = real_write(fd, memoryview(data)[: self.write_budget])
            self.write_budget -= n
            return n

        def fsync(fd: int) -> None:
            if self.fail_fsync:
                raise OSError(errno.ENOSPC, "No space left on device")
            real_fsync(fd)

        monkeypatch.setattr(spool_mod.os, "write", write)
        monkeypatch.setattr(spool_mod.os, "fsync", fsync)


def test_enospc_on_write_leaves_the_spool_consistent(tmp_path, monkeypatch) -> None:
    faults = _Faults(monkeypatch)
    with Spool.open(tmp_path, limit_bytes=BIG) as sp:
        frames = fill(sp, "v", S1, 1, 3)
        size = segments(tmp_path)[-1].stat().st_size
        faults.write_budget = 60  # half a record reaches the file, then ENOSPC
        with pytest.raises(SpoolDiskFullError) as info:
            sp.append("v", S1, 4, make_frame(S1, 4))
        assert info.value.retryable
        assert segments(tmp_path)[-1].stat().st_size == size  # cut back
        with pytest.raises(FrameGapError):
            sp.append("v", S1, 5, make_frame(S1, 5))  # seq 4 was not taken
        faults.write_budget = None  # space came back
        frames |= fill(sp, "v", S1, 4, 5)
        assert sp.sync() == {("v", S1): 5}
    with Spool.open(tmp_path, limit_bytes=BIG) as sp:
        assert dict(sp.pending("v", S1, 0)) == frames


def test_enospc_on_fsync_drops_unsynced_appends(tmp_path, monkeypatch) -> None:
    faults = _Faults(monkeypatch)
    with Spool.open(tmp_path, limit_bytes=BIG, segment_size=1000) as sp:
        frames = fill(sp, "v", S1, 1, 3)
        assert sp.sync() == {("v", S1): 3}
        fill(sp, "v", S1, 4, 12)  # rolls segments: their fsyncs still work
        fill(sp, "w", S2, 1, 2)
        faults.fail_fsync = True
        with pytest.raises(SpoolDiskFullError):
            sp.sync()
        assert sp.state("v", S1) == (3, 0) and sp.state("w", S2) == (0, 0)
        faults.fail_fsync = False
        # the dropped seqs are new again: nothing acked was lost, nothing doubled
        frames |= fill(sp, "v", S1, 4, 6)
        assert sp.sync() == {("v", S1): 6}
        assert dict(sp.pending("v", S1, 0)) == frames
    with Spool.open(tmp_path, limit_bytes=BIG, segment_size=1000) as sp:
        assert sp.state("v", S1) == (6, 0) and sp.state("w", S2) == (0, 0)
        assert dict(sp.pending("v", S1, 0)) == frames


def test_enospc_on_roll_and_on_cursor_save(tmp_path, monkeypatch) -> None:
    faults = _Faults(monkeypatch)
    record = RECORD_HEADER_SIZE + 1 + len(make_frame(S1, 1))
    with Spool.open(tmp_path, limit_bytes=BIG, segment_size=2 * record) as sp:
        fill(sp, "v", S1, 1, 2)
        sp.sync()
        fill(sp, "v", S1, 3, 4)
        faults.fail_fsync = True  # the roll before seq 5 must fsync segment 2
        with pytest.raises(SpoolDiskFullError):
            sp.append("v", S1, 5, make_frame(S1, 5))
        assert sp.state("v", S1) == (2, 0)
        with pytest.raises(SpoolDiskFullError):
            sp.mark_persisted("v", S1, 2)  # cursor cannot be saved: nothing deleted
        assert len(segments(tmp_path)) == 1
        faults.fail_fsync = False
        fill(sp, "v", S1, 3, 5)
        sp.sync()  # also retries the cursor save, then frees segment 1
        assert sp.state("v", S1) == (5, 2)
        assert [s for s, _ in sp.pending("v", S1, 0)] == [3, 4, 5]
    with Spool.open(tmp_path, limit_bytes=BIG) as sp:
        assert sp.state("v", S1) == (5, 2)


def test_real_full_tmpfs(tmp_path: Path) -> None:
    with mount_tmpfs(tmp_path / "mnt", 1 << 20) as mnt:
        with Spool.open(mnt, limit_bytes=BIG, segment_size=128 << 10) as sp:
            seq = 0
            with pytest.raises(SpoolDiskFullError):
                while True:
                    frame = make_frame(S1, seq + 1, length=20000)
                    sp.append("v", S1, seq + 1, frame)
                    seq += 1
            assert seq > 20
            assert sp.sync() == {("v", S1): seq}
            assert sp.state("v", S1) == (seq, 0)
            sp.mark_persisted("v", S1, seq)  # frees every segment
            assert sp.used_bytes == 0
            fill(sp, "v", S1, seq + 1, seq + 10, length=20000)
            sp.sync()
        with Spool.open(mnt, limit_bytes=BIG) as sp:
            assert sp.state("v", S1) == (seq + 10, seq)
            assert len(list(sp.pending("v", S1, 0))) == 10


def test_a_record_larger_than_the_whole_limit_is_refused_for_good(tmp_path: Path) -> None:
    with Spool.open(tmp_path, limit_bytes=600) as sp:
        with pytest.raises(SpoolError) as info:
            sp.append("v", S1, 1, make_frame(S1, 1, length=1000))
        # not SpoolFullError: waiting for space could never make it fit
        assert not isinstance(info.value, SpoolFullError) and not info.value.retryable
        assert sp.state("v", S1) == (0, 0) and sp.used_bytes == 0
        fill(sp, "v", S1, 1, 2)  # the seq was not taken; small frames still fit

"""The master target's applier: verify frames, write them in seq order, persist progress."""

import dataclasses
import os
import sqlite3
import threading

import numpy as np
import pytest

from replication.applier import APPLIED, DUPLICATE, PERSISTED_EARLIER, Applier, _all_zeros
from replication.disks import create_disk, open_disk
from replication.errors import (
    DiskHasSnapshotsError,
    DiskIOError,
    DiskSizeMismatchError,
    FrameAuthError,
    FrameGapError,
    FrameReplayError,
    FrameSequenceError,
    FrameTruncatedError,
    OutOfRangeError,
    SessionNotOpenError,
    UnknownVolumeError,
    VolumeDiskFullError,
)
from replication.frame import FrameDecoder, FrameEncoder
from replication.hashmap import HashMap
from replication.volumes import VolumeRegistry, volume_disk_id
from tests.helpers import (
    MiB,
    fill_device,
    mount_tmpfs,
    qemu_compare,
    realistic_bytes,
    require,
    run,
)

SECRET = b"s" * 32
BS = 65536
SIZE = 32 * BS


@pytest.fixture
def registry(tmp_path):
    raw = tmp_path / "raw1.img"
    create_disk(str(raw), SIZE).close()
    reg = VolumeRegistry({"raw1": raw}, tmp_path / "store")
    (tmp_path / "store").mkdir()
    reg.create("vm1", SIZE)
    return reg


@pytest.fixture
def applier(tmp_path, registry):
    with Applier(registry, tmp_path / "state.db", SECRET) as a:
        yield a


def encoder(volume, secret=SECRET, salt=None):
    return FrameEncoder(secret, volume_disk_id(volume), level=1, salt=salt)


def read_volume(registry, volume, offset=0, length=SIZE):
    with open_disk(registry.path(volume)) as disk:
        return disk.read(offset, length)


def write_behind(registry, volume, offset, data):
    """Change a volume's content behind the applier's back."""
    with open_disk(registry.path(volume), writable=True) as disk:
        disk.write(offset, data)
        disk.flush()


def frames_for(enc, writes, first_seq=1):
    return [enc.encode(first_seq + i, off, data) for i, (off, data) in enumerate(writes)]


def sample_writes():
    text = bytes(realistic_bytes(3 * BS, seed=5))
    return [
        (0, text[:BS]),  # compressible
        (5 * BS, os.urandom(BS)),  # incompressible: stored raw in the frame
        (7 * BS + 512, text[BS : 2 * BS + 100]),  # unaligned, spans blocks
        (10 * BS, bytes(2 * BS)),  # all zeros: write_zeroes
        (SIZE - 4096, b"\xff" * 4096),  # last bytes of the volume
    ]


def expected_image(writes, base=None):
    img = bytearray(SIZE) if base is None else bytearray(base)
    for off, data in writes:
        img[off : off + len(data)] = data
    return bytes(img)


@pytest.mark.parametrize("volume", ["raw1", "vm1"])
def test_frames_are_applied_and_read_back(tmp_path, registry, applier, volume):
    enc = encoder(volume)
    writes = sample_writes()
    assert applier.open_session(volume, enc.session_salt, BS, SIZE) == 0
    for seq, frame in enumerate(frames_for(enc, writes), 1):
        result = applier.apply(volume, enc.session_salt, seq, frame)
        assert (result.seq, result.status, result.persisted_seq) == (seq, APPLIED, 0)
    assert applier.commit() == {(volume, enc.session_salt): len(writes)}
    assert applier.session_state(volume, enc.session_salt) == len(writes)
    assert read_volume(registry, volume) == expected_image(writes)
    if volume == "vm1":  # an external oracle reads the VMDK the same way
        raw = tmp_path / "expected.raw"
        raw.write_bytes(expected_image(writes))
        assert qemu_compare(raw, registry.path(volume), "vmdk").returncode == 0


def test_zero_frames_use_write_zeroes(registry, applier, monkeypatch):
    enc = encoder("vm1")
    # Before the session opens: the applier must be the only writer of an open VMDK.
    write_behind(registry, "vm1", 0, b"old" * 1000)
    applier.open_session("vm1", enc.session_salt, BS, SIZE)
    disk = applier._disks["vm1"]
    calls = []
    real_write, real_zeroes = disk.write, disk.write_zeroes
    monkeypatch.setattr(disk, "write", lambda o, d: calls.append(("write", o)) or real_write(o, d))
    monkeypatch.setattr(
        disk, "write_zeroes", lambda o, n: calls.append(("zeroes", o)) or real_zeroes(o, n)
    )
    applier.apply("vm1", enc.session_salt, 1, enc.encode(1, 0, bytes(8 * BS)))
    applier.apply("vm1", enc.session_salt, 2, enc.encode(2, 8 * BS, b"\0" * 100 + b"x"))
    applier.commit()
    assert calls == [("zeroes", 0), ("write", 8 * BS)]
    assert read_volume(registry, "vm1", 0, 3000) == bytes(3000)
    assert read_volume(registry, "vm1", 8 * BS, 101) == b"\0" * 100 + b"x"


def test_state_is_sqlite_in_wal_mode(tmp_path, applier):
    enc = encoder("raw1")
    applier.open_session("raw1", enc.session_salt, BS, SIZE)
    applier.apply("raw1", enc.session_salt, 1, enc.encode(1, 0, b"x" * 100))
    applier.commit()
    db = sqlite3.connect(tmp_path / "state.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    row = db.execute("SELECT volume, session, persisted_seq, block_size FROM sessions").fetchone()
    assert row == ("raw1", enc.session_salt, 1, BS)


def test_replay_of_a_persisted_seq_is_not_reapplied(registry, applier):
    enc = encoder("raw1")
    frames = frames_for(enc, [(0, b"A" * 4096), (BS, b"B" * 4096), (2 * BS, b"C" * 4096)])
    applier.open_session("raw1", enc.session_salt, BS, SIZE)
    for seq, frame in enumerate(frames, 1):
        applier.apply("raw1", enc.session_salt, seq, frame)
    applier.commit()
    # Someone else changes those blocks afterwards; a resend must not revert them.
    for off in (0, BS, 2 * BS):
        write_behind(registry, "raw1", off, b"N" * 4096)
    assert applier.apply("raw1", enc.session_salt, 3, frames[2]).status == DUPLICATE
    assert applier.apply("raw1", enc.session_salt, 2, frames[1]).status == PERSISTED_EARLIER
    assert applier.apply("raw1", enc.session_salt, 1, frames[0]).persisted_seq == 3
    assert applier.commit() == {}
    for off in (0, BS, 2 * BS):
        assert read_volume(registry, "raw1", off, 4096) == b"N" * 4096


def test_conflicting_content_at_a_known_seq_is_refused(registry, applier):
    enc = encoder("raw1")
    applier.open_session("raw1", enc.session_salt, BS, SIZE)
    applier.apply("raw1", enc.session_salt, 1, enc.encode(1, 0, b"A" * 4096))
    applier.commit()
    applier.apply("raw1", enc.session_salt, 2, enc.encode(2, BS, b"B" * 4096))  # not committed
    # A buggy source reusing its salt and seqs for other content (valid tags).
    liar = encoder("raw1", salt=enc.session_salt)
    for seq, off in ((1, 0), (2, BS)):
        with pytest.raises(FrameReplayError):
            applier.apply("raw1", enc.session_salt, seq, liar.encode(seq, off, b"X" * 4096))
    assert read_volume(registry, "raw1", 0, 4096) == b"A" * 4096
    assert read_volume(registry, "raw1", BS, 4096) == b"B" * 4096


def test_wrong_key_is_refused_and_nothing_is_written(registry, applier):
    enc = encoder("raw1")
    applier.open_session("raw1", enc.session_salt, BS, SIZE)
    forged = encoder("raw1", secret=b"t" * 32, salt=enc.session_salt)
    with pytest.raises(FrameAuthError):
        applier.apply("raw1", enc.session_salt, 1, forged.encode(1, 0, b"X" * 4096))
    assert applier.commit() == {}
    assert read_volume(registry, "raw1") == bytes(SIZE)
    # The real frame 1 is still expected next.
    assert applier.apply("raw1", enc.session_salt, 1, enc.encode(1, 0, b"A")).applied


def test_tampered_frame_is_refused(registry, applier):
    enc = encoder("raw1")
    applier.open_session("raw1", enc.session_salt, BS, SIZE)
    frame = bytearray(enc.encode(1, 0, b"A" * 4096))
    frame[70] ^= 1
    with pytest.raises(FrameAuthError):
        applier.apply("raw1", enc.session_salt, 1, bytes(frame))
    assert read_volume(registry, "raw1") == bytes(SIZE)


def test_frame_of_another_volume_is_refused(registry, applier):
    enc = encoder("vm1")  # sealed for vm1's disk id
    applier.open_session("raw1", enc.session_salt, BS, SIZE)
    with pytest.raises(FrameAuthError, match="disk"):
        applier.apply("raw1", enc.session_salt, 1, enc.encode(1, 0, b"X" * 4096))
    assert read_volume(registry, "raw1") == bytes(SIZE)


def test_frame_of_another_session_is_refused(registry, applier):
    mine, other = encoder("raw1"), encoder("raw1")
    applier.open_session("raw1", mine.session_salt, BS, SIZE)
    with pytest.raises(FrameAuthError, match="session"):
        applier.apply("raw1", mine.session_salt, 1, other.encode(1, 0, b"X" * 4096))
    assert read_volume(registry, "raw1") == bytes(SIZE)


@pytest.mark.parametrize("volume", ["raw1", "vm1"])
@pytest.mark.parametrize("offset", [SIZE, SIZE - 100, 1 << 40])
def test_offset_past_the_end_is_refused_with_nothing_written(registry, applier, volume, offset):
    enc = encoder(volume)
    applier.open_session(volume, enc.session_salt, BS, SIZE)
    before = read_volume(registry, volume)
    with pytest.raises(OutOfRangeError):
        applier.apply(volume, enc.session_salt, 1, enc.encode(1, offset, b"X" * 4096))
    assert applier.commit() == {}
    assert read_volume(registry, volume) == before


def test_gaps_seq_zero_and_mismatched_seq_are_refused(applier):
    enc = encoder("raw1")
    applier.open_session("raw1", enc.session_salt, BS, SIZE)
    with pytest.raises(FrameSequenceError):
        applier.apply("raw1", enc.session_salt, 0, enc.encode(0, 0, b"A"))
    with pytest.raises(FrameGapError):
        applier.apply("raw1", enc.session_salt, 2, enc.encode(2, 0, b"B"))
    with pytest.raises(FrameSequenceError):
        applier.apply("raw1", enc.session_salt, 4, enc.encode(3, 0, b"C"))


def test_unopened_session_and_unknown_volume(applier):
    enc = encoder("raw1")
    with pytest.raises(SessionNotOpenError):
        applier.apply("raw1", enc.session_salt, 1, enc.encode(1, 0, b"A"))
    with pytest.raises(UnknownVolumeError):
        applier.open_session("nope", enc.session_salt, BS, SIZE)
    with pytest.raises(UnknownVolumeError):
        applier.session_state("nope", enc.session_salt)


def test_volume_smaller_than_the_source_is_refused(applier):
    enc = encoder("raw1")
    with pytest.raises(DiskSizeMismatchError):
        applier.open_session("raw1", enc.session_salt, BS, SIZE + 512)


def test_snapshot_parent_is_refused_as_a_volume(tmp_path):
    qemu_img = require("qemu-img")
    base, child = tmp_path / "base.vmdk", tmp_path / "child.vmdk"
    create_disk(str(base), SIZE, format="vmdk").close()
    run(qemu_img, "create", "-q", "-f", "vmdk", "-b", base.name, "-F", "vmdk", child)
    before = base.read_bytes()
    reg = VolumeRegistry({"base": base}, None)
    salt = encoder("base").session_salt
    with (
        Applier(reg, tmp_path / "state.db", SECRET) as applier,
        pytest.raises(DiskHasSnapshotsError),
    ):
        applier.open_session("base", salt, BS, SIZE)
    assert base.read_bytes() == before


def test_crash_between_write_and_commit_resends_from_the_recorded_seq(tmp_path, registry):
    enc = encoder("vm1")
    writes = [(0, b"A" * BS), (BS, b"B" * BS), (2 * BS, b"C" * BS)]
    frames = frames_for(enc, writes)
    first = Applier(registry, tmp_path / "state.db", SECRET)
    first.open_session("vm1", enc.session_salt, BS, SIZE)
    first.apply("vm1", enc.session_salt, 1, frames[0])
    first.commit()
    first.apply("vm1", enc.session_salt, 2, frames[1])
    first.apply("vm1", enc.session_salt, 3, frames[2])
    first.close()  # "crash": close never commits
    with Applier(registry, tmp_path / "state.db", SECRET) as second:
        assert second.session_state("vm1", enc.session_salt) == 1
        assert second.open_session("vm1", enc.session_salt, BS, SIZE) == 1
        # The source resends from 2: same data at the same offsets, idempotent.
        assert second.apply("vm1", enc.session_salt, 2, frames[1]).applied
        assert second.apply("vm1", enc.session_salt, 3, frames[2]).applied
        assert second.commit() == {("vm1", enc.session_salt): 3}
    assert read_volume(registry, "vm1") == expected_image(writes)


def test_failed_flush_records_nothing_and_asks_for_a_resend(registry, applier, monkeypatch):
    enc = encoder("raw1")
    applier.open_session("raw1", enc.session_salt, BS, SIZE)
    frame = enc.encode(1, 0, b"A" * 4096)
    applier.apply("raw1", enc.session_salt, 1, frame)
    disk = applier._disks["raw1"]

    def failing_flush():
        raise DiskIOError("flush: injected failure")

    monkeypatch.setattr(disk, "flush", failing_flush)
    with pytest.raises(DiskIOError):
        applier.commit()
    # Nothing claims more than is durable; the same frame is expected again.
    assert applier.session_state("raw1", enc.session_salt) == 0
    monkeypatch.undo()
    assert applier.apply("raw1", enc.session_salt, 1, frame).applied
    assert applier.commit() == {("raw1", enc.session_salt): 1}


@pytest.mark.parametrize("volume", ["raw1", "vm1"])
@pytest.mark.parametrize("covered", [SIZE, SIZE - 5 * BS - 1000])
@pytest.mark.parametrize("window", [None, 14])  # 14: hashed two chunks of 7 at a time
def test_hash_map_chunks_concatenate_to_the_hash_map(registry, applier, volume, covered, window):
    write_behind(registry, volume, 3 * BS, os.urandom(5 * BS))
    if window is not None:
        applier.map_window_blocks = window
    chunks = list(applier.hash_map_chunks(volume, BS, covered, chunk_blocks=7))
    with open_disk(registry.path(volume)) as disk:
        expected = HashMap.compute(disk, BS, covered_size=covered)
    total = len(expected)
    assert [c[0] for c in chunks] == list(range(0, total, 7))
    assert all(c[2] == SIZE and c[3] == total for c in chunks)
    assert all(len(c[1]) <= 7 * 16 for c in chunks)
    assert b"".join(c[1] for c in chunks) == expected.digests.tobytes()
    digests = np.frombuffer(b"".join(c[1] for c in chunks), dtype=expected.digests.dtype)
    assert not expected.diff(HashMap(BS, covered, digests)).size


def test_hash_map_of_an_open_volume_sees_applied_frames(applier):
    enc = encoder("vm1")
    applier.open_session("vm1", enc.session_salt, BS, SIZE)
    applier.apply("vm1", enc.session_salt, 1, enc.encode(1, BS, b"Z" * BS))
    applier.commit()
    digests = b"".join(c[1] for c in applier.hash_map_chunks("vm1", BS, SIZE))
    zero = HashMap.empty(SIZE, BS).digests.tobytes()
    assert digests[:16] == zero[:16] and digests[16:32] != zero[16:32]


def test_hash_map_bounds(applier):
    assert list(applier.hash_map_chunks("raw1", BS, 0)) == [(0, b"", SIZE, 0)]
    with pytest.raises(DiskSizeMismatchError):
        list(applier.hash_map_chunks("raw1", BS, SIZE + 1))


# --- a full device: typed, retryable, nothing recorded that is not on disk ---------------


def test_a_full_volume_device_is_retryable_and_records_nothing_unwritten(tmp_path):
    require("qemu-img")
    with mount_tmpfs(tmp_path / "fs", 3 * MiB) as fs:
        store = fs / "store"
        store.mkdir()
        registry = VolumeRegistry({}, store)
        registry.create("vm1", SIZE)
        enc = encoder("vm1")
        writes = [(i * BS, os.urandom(BS)) for i in range(SIZE // BS)]
        frames = frames_for(enc, writes)
        with Applier(registry, tmp_path / "state.db", SECRET) as applier:
            applier.open_session("vm1", enc.session_salt, BS, SIZE)
            for seq in (1, 2):
                applier.apply("vm1", enc.session_salt, seq, frames[seq - 1])
            assert applier.commit() == {("vm1", enc.session_salt): 2}
            filler = fill_device(fs, leave=4 * BS)
            with pytest.raises(VolumeDiskFullError) as info:
                for seq in range(3, len(frames) + 1):
                    applier.apply("vm1", enc.session_salt, seq, frames[seq - 1])
                applier.commit()
            assert info.value.retryable and "vm1" in str(info.value)
            # PERSISTED stays where the disk is; the failed frames are expected again
            assert applier.session_state("vm1", enc.session_salt) == 2
            with pytest.raises(FrameGapError):
                applier.apply("vm1", enc.session_salt, 5, frames[4])
            assert run("qemu-img", "check", registry.path("vm1"), check=False).returncode == 0
            filler.unlink()  # space comes back: the same frames go through
            for seq in range(3, len(frames) + 1):
                assert applier.apply("vm1", enc.session_salt, seq, frames[seq - 1]).applied
            assert applier.commit() == {("vm1", enc.session_salt): len(frames)}
        assert read_volume(registry, "vm1") == expected_image(writes)
        assert run("qemu-img", "check", registry.path("vm1"), check=False).returncode == 0


def test_a_full_state_device_is_retryable_and_the_state_stays_behind_the_disk(tmp_path, registry):
    enc = encoder("raw1")
    frames = frames_for(enc, [(0, b"A" * BS), (BS, b"B" * BS)])
    with mount_tmpfs(tmp_path / "fs", 1 * MiB) as fs:
        with Applier(registry, fs / "state.db", SECRET) as applier:
            applier.open_session("raw1", enc.session_salt, BS, SIZE)
            applier.apply("raw1", enc.session_salt, 1, frames[0])
            assert applier.commit() == {("raw1", enc.session_salt): 1}
            filler = fill_device(fs, leave=0)
            applier.apply("raw1", enc.session_salt, 2, frames[1])
            with pytest.raises(VolumeDiskFullError) as info:
                applier.commit()  # the volume is flushed; recording it fails
            assert info.value.retryable
            assert applier.session_state("raw1", enc.session_salt) == 1
            filler.unlink()
            # the resend is recognised (same tag), not applied twice, then recorded
            assert applier.apply("raw1", enc.session_salt, 2, frames[1]).status == DUPLICATE
            assert applier.commit() == {("raw1", enc.session_salt): 2}
        db = sqlite3.connect(fs / "state.db")
        try:
            assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            assert db.execute("SELECT persisted_seq FROM sessions").fetchall() == [(2,)]
        finally:
            db.close()


# --- batches: verified first, undo journaled with one fsync, then written ----------------


def test_a_batch_applies_like_frame_by_frame(tmp_path, registry):
    enc = encoder("vm1")
    writes = sample_writes()
    frames = frames_for(enc, writes)
    with Applier(registry, tmp_path / "state.db", SECRET, decode_workers=2) as applier:
        applier.open_session("vm1", enc.session_salt, BS, SIZE)
        batch = [(seq, f, applier.predecode(f)) for seq, f in enumerate(frames, 1)]
        results = applier.apply_batch("vm1", enc.session_salt, batch)
        assert [(r.seq, r.status) for r in results] == [(i, APPLIED) for i in range(1, 6)]
        assert applier.commit() == {("vm1", enc.session_salt): len(writes)}
        # a resend of the same batch is recognised frame by frame, not applied again
        again = applier.apply_batch("vm1", enc.session_salt, [(1, frames[0], None)])
        assert again[0].status == PERSISTED_EARLIER
    assert read_volume(registry, "vm1") == expected_image(writes)


def test_a_failing_frame_stops_the_batch_after_the_frames_before_it(registry, applier):
    enc = encoder("raw1")
    good = frames_for(enc, [(0, b"A" * 4096), (BS, b"B" * 4096)])
    bad = bytearray(enc.encode(3, 2 * BS, b"C" * 4096))
    bad[70] ^= 1
    after = enc.encode(4, 3 * BS, b"D" * 4096)
    applier.open_session("raw1", enc.session_salt, BS, SIZE)
    batch = [(1, good[0], None), (2, good[1], None), (3, bytes(bad), None), (4, after, None)]
    with pytest.raises(FrameAuthError):
        applier.apply_batch("raw1", enc.session_salt, batch)
    assert applier.commit() == {("raw1", enc.session_salt): 2}
    assert read_volume(registry, "raw1", 0, 4096) == b"A" * 4096
    assert read_volume(registry, "raw1", 3 * BS, 4096) == bytes(4096)
    with pytest.raises(FrameGapError):  # 3 is still expected
        applier.apply("raw1", enc.session_salt, 4, after)


def test_predecoded_frames_keep_the_header_checks_first(registry, applier):
    mine, other = encoder("raw1"), encoder("raw1")
    applier.open_session("raw1", mine.session_salt, BS, SIZE)
    frame = other.encode(1, 0, b"X" * 4096)  # valid, but another session's
    with pytest.raises(FrameAuthError, match="session"):
        applier.apply_batch("raw1", mine.session_salt, [(1, frame, applier.predecode(frame))])
    truncated = mine.encode(1, 0, b"Y" * 4096)[:40]
    decoded = applier.predecode(truncated)  # a bad header is an error of the future
    with pytest.raises(FrameTruncatedError):
        applier.apply_batch("raw1", mine.session_salt, [(1, truncated, decoded)])


def test_the_undo_of_a_whole_batch_is_durable_before_any_of_its_writes(tmp_path, registry):
    enc = encoder("vm1")
    frames = frames_for(enc, [(i * 2 * BS, os.urandom(BS)) for i in range(6)])
    events: list[str] = []
    with Applier(registry, tmp_path / "state.db", SECRET, history_dir=tmp_path / "h") as applier:
        applier.open_session("vm1", enc.session_salt, BS, SIZE)
        applier.apply("vm1", enc.session_salt, 1, frames[0])  # opens the history
        applier.commit()
        disk, journal = applier._disks["vm1"], applier._histories["vm1"].journal
        for name, obj in (("undo", journal), ("sync", journal), ("write", disk)):
            method = {"undo": "record_undo", "sync": "sync", "write": "write"}[name]
            real = getattr(obj, method)

            def spy(*args, _real=real, _name=name, **kw):
                events.append(_name)
                return _real(*args, **kw)

            setattr(obj, method, spy)
        batch = [(seq, frames[seq - 1], None) for seq in range(2, 7)]
        applier.apply_batch("vm1", enc.session_salt, batch)
        applier.commit()
    # J1 with one fsync for the batch (a later sync is the commit's or the close's)
    assert events[:11] == ["undo"] * 5 + ["sync"] + ["write"] * 5


def test_frames_decoded_ahead_wait_for_the_budget(tmp_path, registry):
    enc = encoder("raw1")
    frames = frames_for(enc, [(i * BS, os.urandom(BS)) for i in range(4)])
    with Applier(
        registry, tmp_path / "state.db", SECRET, decode_workers=1, decode_ahead_bytes=2 * BS
    ) as applier:
        applier.open_session("raw1", enc.session_salt, BS, SIZE)
        first = [(s, f, applier.predecode(f)) for s, f in enumerate(frames[:2], 1)]
        third: list = []
        taker = threading.Thread(target=lambda: third.append(applier.predecode(frames[2])))
        taker.start()
        taker.join(0.5)
        assert taker.is_alive()  # two frames hold the whole budget
        applier.apply_batch("raw1", enc.session_salt, first)  # written: budget given back
        taker.join(10)
        assert not taker.is_alive() and third[0].result().offset == 2 * BS


def test_all_zero_frames_are_known_from_their_digest(registry, applier):
    enc = encoder("vm1")
    applier.open_session("vm1", enc.session_salt, BS, SIZE)
    zeros = FrameDecoder(SECRET).decode(enc.encode(1, 0, bytes(BS)))
    data = FrameDecoder(SECRET).decode(enc.encode(2, 0, os.urandom(BS)))
    assert _all_zeros(zeros) and not _all_zeros(data)
    # a digest other than the zeros' decides without a scan (the data is not read) ...
    assert not _all_zeros(dataclasses.replace(zeros, digest=data.digest))
    # ... and the zeros' digest is only a hint: the data is scanned
    assert not _all_zeros(dataclasses.replace(data, digest=zeros.digest))


def test_commit_each_records_the_volumes_that_flushed(registry, applier, monkeypatch):
    a, b = encoder("raw1"), encoder("vm1")
    applier.open_session("raw1", a.session_salt, BS, SIZE)
    applier.open_session("vm1", b.session_salt, BS, SIZE)
    applier.apply("raw1", a.session_salt, 1, a.encode(1, 0, b"A" * 4096))
    applier.apply("vm1", b.session_salt, 1, b.encode(1, 0, b"B" * 4096))

    def failing_flush():
        raise DiskIOError("flush: injected failure")

    monkeypatch.setattr(applier._disks["vm1"], "flush", failing_flush)
    persisted, failed = applier.commit_each()
    assert persisted == {("raw1", a.session_salt): 1}
    assert list(failed) == ["vm1"] and isinstance(failed["vm1"], DiskIOError)
    assert applier.session_state("vm1", b.session_salt) == 0  # resent, never skipped

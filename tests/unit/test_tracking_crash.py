"""Changed-block tracking across crashes: kill -9, torn and damaged files, failed steps.

The property under test is the crash rule: after any crash, the reopened tracker is
trusted and its dirty set holds every block of every acknowledged write that no
committed epoch took. The kill test is seeded (``TRACKING_CRASH_SEED`` repeats a run,
``TRACKING_CRASH_KILLS`` sets the number of kills, 10 by default).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replication import tracking
from replication.disks import create_disk
from replication.errors import TrackingBrokenError
from replication.tracking import STATE_FILE, DirtyTracker, TrustReason, dirty_blocks, read_state

REPO = Path(__file__).parents[2]
BS = 4096
EXTENT = 16 * BS
SIZE = 8 << 20  # 2048 blocks, 128 extents
RECORD = 28 + 16 // 8 + 8  # record header, the bits of one extent, checksum

_WRITER = textwrap.dedent(
    """
    import random, sys
    from replication.tracking import TrackedDisk

    image, state, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rng = random.Random(seed)
    d = TrackedDisk.open(
        image, state, block_size=4096, extent_size=65536, al_slots=4, checkpoint_records=64
    )
    print("T", d.trust.reason, flush=True)
    epoch = None
    while True:
        r = rng.random()
        if r < 0.03 and epoch is None:
            epoch = d.tracker.begin_epoch()
            print("B", flush=True)
        elif r < 0.06 and epoch is not None:
            print("C?", flush=True)  # from here the commit may have happened
            epoch.commit()
            epoch = None
            print("C", flush=True)
        else:
            offset = rng.randrange(d.virtual_size - 1)
            length = min(rng.randrange(1, 3 * 4096), d.virtual_size - offset)
            d.write(offset, rng.randbytes(length))
            print("W", offset // 4096, (offset + length - 1) // 4096, flush=True)
    """
)


class Model:
    """The blocks that MUST be dirty: acknowledged and not taken by a committed epoch."""

    def __init__(self) -> None:
        self.dirty: set[int] = set()
        self.inflight: set[int] = set()

    def replay(self, lines: list[str]) -> None:
        for line in lines:
            word, *args = line.split()
            if word == "W":
                self.dirty |= set(range(int(args[0]), int(args[1]) + 1))
            elif word == "B":
                self.inflight, self.dirty = self.inflight | self.dirty, set()
            elif word == "C":
                self.inflight = set()
        if lines and lines[-1] == "C?":
            self.inflight = set()  # killed inside commit: clearing is allowed, not required

    def crash(self) -> set[int]:
        self.dirty, self.inflight = self.dirty | self.inflight, set()
        return self.dirty


def _wait_first_line(out: Path, proc: subprocess.Popen[bytes]) -> str:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        text = out.read_text()
        if "\n" in text:
            return text.split("\n", 1)[0]
        if proc.poll() is not None:
            break
        time.sleep(0.01)
    raise AssertionError(f"writer did not start: {proc.stderr.read().decode()}")  # type: ignore[union-attr]


def _run_and_kill(image: Path, state: Path, seed: int, delay: float, out: Path) -> list[str]:
    """Start the writer, let it run ``delay`` seconds, SIGKILL it; return its whole lines."""
    with out.open("wb") as stdout:
        proc = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(image), str(state), str(seed)],
            stdout=stdout,
            stderr=subprocess.PIPE,
            env=os.environ | {"PYTHONPATH": str(REPO)},
        )
    try:
        first = _wait_first_line(out, proc)
        time.sleep(delay)
        proc.kill()
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -9, proc.stderr.read().decode()  # type: ignore[union-attr]
    lines = out.read_text().split("\n")[:-1]  # the last one may be cut
    assert lines[0] == first
    return lines


def test_kill_9_at_random_moments_keeps_every_acknowledged_write(tmp_path: Path) -> None:
    seed = int(os.environ.get("TRACKING_CRASH_SEED", random.randrange(1 << 32)))
    kills = int(os.environ.get("TRACKING_CRASH_KILLS", "10"))
    print(f"tracking crash seed: {seed} (set TRACKING_CRASH_SEED={seed} to repeat)")
    rng = random.Random(seed)
    image, state = tmp_path / "disk.raw", tmp_path / "state"
    create_disk(str(image), SIZE).close()
    ident = {"disk_id": os.path.realpath(image), "size": SIZE, "block_size": BS}
    state.mkdir()
    t, _ = DirtyTracker.open(state / STATE_FILE, extent_size=EXTENT, **ident)
    t.begin_epoch().commit()  # the initial full resync
    t.close()
    model = Model()
    writes = 0
    for i in range(kills):
        lines = _run_and_kill(
            image, state, rng.randrange(1 << 32), rng.uniform(0.0, 0.25), out=tmp_path / f"out{i}"
        )
        assert lines[0] == ("T clean" if i == 0 else "T recovered"), (seed, i)
        model.replay(lines[1:])
        writes += sum(line.startswith("W") for line in lines)
        required = model.crash()
        trust, bits = read_state(state / STATE_FILE, **ident)
        assert trust.trusted and trust.reason == TrustReason.RECOVERED, (seed, i, trust)
        missing = required - set(dirty_blocks(bits).tolist())
        assert not missing, f"seed {seed}, kill {i}: acknowledged blocks lost: {sorted(missing)}"
    assert writes > kills  # the kills did land among writes, not all before the first

    t, trust = DirtyTracker.open(state / STATE_FILE, extent_size=EXTENT, **ident)
    assert trust.reason == TrustReason.RECOVERED
    assert model.dirty <= set(t.begin_epoch().blocks().tolist())
    t.close()

    # A damaged bitmap is never trusted: the caller falls back to a hash-compare resync.
    path = state / STATE_FILE
    data = bytearray(path.read_bytes())
    data[56 + len(ident["disk_id"].encode()) + 100] ^= 0x01
    path.write_bytes(bytes(data))
    assert read_state(path, **ident)[0].reason == TrustReason.CORRUPT
    t, trust = DirtyTracker.open(path, extent_size=EXTENT, **ident)
    assert not trust.trusted and trust.reason == TrustReason.CORRUPT
    t.close()


# --- torn and damaged activity logs -------------------------------------------------------

ID = "disk-1"


def _open(path: Path, **kw) -> tuple[DirtyTracker, tracking.TrustState]:
    opts = {"disk_id": ID, "size": SIZE, "block_size": BS, "extent_size": EXTENT, "al_slots": 2}
    return DirtyTracker.open(path, **(opts | kw))


def _with_records(path: Path, extents: int) -> int:
    """A crashed state: a checkpoint, then one record per marked extent; return its size."""
    t, _ = _open(path)
    t.begin_epoch().commit()
    for x in range(extents):
        t.mark(x * EXTENT + BS, BS)
    t.abandon()
    return path.stat().st_size


def _recovered(path: Path) -> tuple[tracking.TrustState, set[int]]:
    trust, bits = read_state(path, disk_id=ID, size=SIZE, block_size=BS)
    return trust, set() if bits is None else set(dirty_blocks(bits).tolist())


def test_a_torn_last_record_at_every_offset_is_a_torn_tail(tmp_path: Path) -> None:
    path = tmp_path / "s"
    full = _with_records(path, 6)
    data = path.read_bytes()
    acked = {x * 16 + 1 for x in range(5)}  # the sixth mark's record is the torn one
    for cut in range(full - RECORD, full):
        path.write_bytes(data[:cut])
        trust, dirty = _recovered(path)
        assert trust.trusted, (cut, trust)
        assert acked <= dirty
    path.write_bytes(data + bytes(RECORD // 2))  # a preallocated or zero-filled tail
    assert _recovered(path)[0].trusted


def test_a_damaged_record_before_the_tail_is_corruption(tmp_path: Path) -> None:
    path = tmp_path / "s"
    full = _with_records(path, 6)
    data = bytearray(path.read_bytes())
    data[full - 4 * RECORD + 10] ^= 0x40
    path.write_bytes(bytes(data))
    trust, _ = _recovered(path)
    assert not trust.trusted and trust.reason == TrustReason.CORRUPT


def test_records_from_another_state_file_do_not_replay(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    size_a = _with_records(a, 4)
    _with_records(b, 1)
    spliced = b.read_bytes() + a.read_bytes()[size_a - 2 * RECORD :]
    b.write_bytes(spliced)
    trust, dirty = _recovered(b)
    assert trust.trusted and dirty == set(range(16))  # only b's own hot extent


# --- crash between steps ------------------------------------------------------------------


def test_a_crash_inside_commit_keeps_the_epoch_dirty(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "s"
    t, _ = _open(path)
    t.begin_epoch().commit()
    for x in range(5):
        t.mark(x * EXTENT, BS)
    epoch = t.begin_epoch()

    def crash(*args: object, **kw: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tracking, "write_atomically", crash)
    with pytest.raises(TrackingBrokenError):
        epoch.commit()
    t.close()  # broken: writes nothing, as a crash would
    trust, dirty = _recovered(path)
    assert trust.reason == TrustReason.RECOVERED
    assert set(epoch.blocks().tolist()) <= dirty


def test_a_failed_eviction_record_loses_nothing_acknowledged(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "s"
    t, _ = _open(path)
    t.begin_epoch().commit()
    t.mark(0, BS)
    t.mark(EXTENT, BS)

    def short_write(fd: int, data: object) -> int:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "write", short_write)
    with pytest.raises(TrackingBrokenError):
        t.mark(2 * EXTENT, BS)  # would evict extent 0
    monkeypatch.undo()
    t.close()
    trust, dirty = _recovered(path)
    assert trust.trusted and {0, 16} <= dirty


# --- model: random operations, crashes and clean restarts ---------------------------------

_op = st.one_of(
    st.tuples(st.just("mark"), st.integers(0, 127), st.integers(1, 20)),
    st.tuples(
        st.sampled_from(["begin", "commit", "abort", "crash", "close"]), st.just(0), st.just(0)
    ),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(_op, max_size=30))
def test_random_operations_match_a_model(ops) -> None:
    geometry = {"disk_id": ID, "size": 128 * BS, "block_size": BS}
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "fsync", lambda fd: None)  # the crashes here are simulated: speed
        path = Path(tmp) / "s"

        def reopen() -> DirtyTracker:
            return DirtyTracker.open(
                path, extent_size=8 * BS, al_slots=2, checkpoint_records=3, **geometry
            )[0]

        t = reopen()
        t.begin_epoch().commit()
        dirty: set[int] = set()
        inflight: set[int] = set()
        epoch = None
        for op, first, count in ops:
            if op == "mark":
                count = min(count, 128 - first)
                t.mark(first * BS, count * BS)
                dirty |= set(range(first, first + count))
            elif op == "begin" and epoch is None:
                epoch = t.begin_epoch()
                assert set(epoch.blocks().tolist()) == dirty
                dirty, inflight = set(), dirty
            elif op in ("commit", "abort") and epoch is not None:
                getattr(epoch, op)()
                dirty, inflight, epoch = dirty | (inflight if op == "abort" else set()), set(), None
            elif op in ("crash", "close"):
                t.abandon() if op == "crash" else t.close()
                trust, bits = read_state(path, **geometry)
                found = set(dirty_blocks(bits).tolist())
                assert trust.trusted
                if op == "close":
                    assert found == dirty | inflight
                assert dirty | inflight <= found
                dirty, inflight, epoch = found, set(), None
                t = reopen()
        t.close()
        assert set(dirty_blocks(read_state(path, **geometry)[1]).tolist()) == dirty | inflight

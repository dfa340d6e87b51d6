"""Crash replay: every state a crash can leave our writers' files in, checked.

Method
------
The writers under test (the monolithicSparse VMDK writer allocating grains and
grain tables, and the retention journal with its manifests and its volume) run a
fixed workload while every file operation they issue under the test directory is
**recorded in-process**: ``os.write``/``pwrite``/``pwritev``/``writev``, ``ftruncate``,
``fsync``/``fdatasync`` (on files and directories), ``open(O_CREAT|O_TRUNC)``,
``unlink``/``rename``/``replace``/``mkdir``. Each record keeps the exact bytes, the
file offset (``O_APPEND`` writes land at the file's end) and the inode.

Why in-process and not ``strace -f``: every write of these writers goes through the
``os`` module (no C extension writes their files), so patching it sees the very
buffers, in order, with no parsing of escaped ``strace -X`` dumps, no fd-to-path
guessing and no extra process; it is deterministic and fast enough to replay
hundreds of states. What it could miss (a write that bypasses ``os``) is caught by
``test_*_trace_is_complete``: replaying the whole trace onto the initial files must
give the final files byte for byte.

A crash state at cut ``t`` (the operations before ``t`` were issued) is built from
the initial files:

* a write or truncate is **durable** if an ``fsync`` of its inode follows it before
  ``t``: it is always applied;
* the others are **pending**: the kernel may have written any subset of them back.
  *prefix* states apply all of them (every cut of the trace is tried); *torn* states
  cut the last write short (at a sector boundary for the VMDK, at a few byte counts
  for journal appends: a torn tail); *reorder* states apply a random subset (a
  random permutation of the pending writes, cut after a random count). Writes are
  always applied in program order: two writes to one page reach the disk merged,
  never the older over the newer;
* directory operations (create, rename, unlink) are applied in program order up to
  ``t``: the writers fsync the directory after each, and ext4 journals them in
  order. Losing them is not modelled.

Every state is copied to a fresh directory and checked:

* VMDK: it opens with our reader, read-only **and writable** (the master target
  reopens its volumes writable after a crash; the writable open checks more);
  ``qemu-img check`` passes (see ``test_qemu_img_check_reports_no_leaks_for_vmdk``
  for what it returns); every piece of every workload write (a write cut at grain
  boundaries; at sector boundaries in torn states) holds its old or its new bytes
  and every other block its old bytes; at fsync boundaries qemu reads what we read,
  and the disk takes new writes.
* Journal: it reopens (a torn tail is cut and reported), it lists every point whose
  ``add_point`` had returned (unless a prune had dropped it), nothing it never
  added, and every point it lists restores into a new disk equal to the volume when
  the point was taken, and equal to the point's manifest (rule J2: the manifest is
  durable before the point).

Bounds: the CI run tries every prefix, the torn cuts and ``REORDERINGS`` random
states of one fixed workload per writer (about 15 s). ``pytest -m soak
tests/oracle/test_crash_replay.py`` replays ``SOAK_WORKLOADS`` random workloads per
writer (seeded from the clock) with up to ``SOAK_REORDERINGS`` reorderings each
(a workload's windows between fsyncs are short: distinct subsets run out first). The
seed is printed; rerun with ``CRASH_SEED=<seed>``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from replication.disks import create_disk, open_disk
from replication.disks.vmdk import create_vmdk, open_vmdk
from replication.disks.vmdk.header import SECTOR, SparseHeader
from replication.errors import ReplicationError
from replication.hashmap import HashMap
from replication.journal import Journal
from replication.manifest import ManifestStore
from tests import ledger
from tests.helpers import MiB, qemu_compare, require, write_raw

GRAIN = 65536
REORDERINGS = 40
#: the soak: this many random workloads per writer, each with up to this many reorderings
SOAK_WORKLOADS = 12
SOAK_REORDERINGS = 300
DEFAULT_SEED = 20240611


def crash_seed() -> int:
    return int(os.environ.get("CRASH_SEED", DEFAULT_SEED))


def soak_only(request: pytest.FixtureRequest) -> None:
    if "soak" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("long randomized run: opt in with -m soak")


# --- recording ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    """One file operation: write/truncate/fsync (by inode), or a namespace change."""

    kind: str  # write | truncate | fsync | create | unlink | rename | mkdir | mark
    path: str = ""
    ino: int = 0
    offset: int = 0
    data: bytes = b""
    dest: str = ""
    note: object = None


DATA_OPS = ("write", "truncate")
NAME_OPS = ("create", "unlink", "rename", "mkdir")


class Recorder:
    """Records the ``os`` file operations issued under ``root`` (monkeypatched)."""

    def __init__(self, root: Path) -> None:
        self.root = os.path.realpath(root)
        self.ops: list[Op] = []

    def mine(self, path: str) -> bool:
        return path == self.root or path.startswith(self.root + os.sep)

    def mark(self, note: object) -> None:
        """Put a label in the trace (what the caller knows happened at this point)."""
        self.ops.append(Op("mark", note=note))

    def _target(self, fd: int) -> tuple[str, int] | None:
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return None
        return (path, os.fstat(fd).st_ino) if self.mine(path) else None

    def _data(self, kind: str, fd: int, offset: int | None, real: Callable, *args) -> int:
        target = self._target(fd)
        if target is None:
            return real(fd, *args)
        if offset is None:  # write/writev: the file position, or the end for O_APPEND
            append = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND
            offset = os.fstat(fd).st_size if append else os.lseek(fd, 0, os.SEEK_CUR)
        n = real(fd, *args)
        buffers = args[0] if kind == "v" else [args[0]]
        data = b"".join(bytes(memoryview(b).cast("B")) for b in buffers)[:n]
        self.ops.append(Op("write", target[0], target[1], offset, data))
        return n

    def install(self, mp: pytest.MonkeyPatch) -> None:
        real = {n: getattr(os, n) for n in _PATCHED}
        mp.setattr(os, "write", lambda fd, d: self._data("1", fd, None, real["write"], d))
        mp.setattr(os, "writev", lambda fd, b: self._data("v", fd, None, real["writev"], b))
        mp.setattr(
            os, "pwrite", lambda fd, d, off: self._data("1", fd, off, real["pwrite"], d, off)
        )
        mp.setattr(
            os,
            "pwritev",
            lambda fd, b, off, *f: self._data("v", fd, off, real["pwritev"], b, off, *f),
        )
        mp.setattr(os, "ftruncate", lambda fd, n: self._truncate(fd, n, real["ftruncate"]))
        mp.setattr(os, "fsync", lambda fd: self._sync(fd, real["fsync"]))
        mp.setattr(os, "fdatasync", lambda fd: self._sync(fd, real["fdatasync"]))
        mp.setattr(os, "open", self._opener(real["open"]))
        for name in ("unlink", "remove"):
            mp.setattr(os, name, self._unlinker(real[name]))
        for name in ("rename", "replace"):
            mp.setattr(os, name, self._renamer(real[name]))
        mp.setattr(os, "mkdir", self._mkdirer(real["mkdir"]))

    def _truncate(self, fd: int, size: int, real: Callable) -> None:
        real(fd, size)
        target = self._target(fd)
        if target is not None:
            self.ops.append(Op("truncate", target[0], target[1], size))

    def _sync(self, fd: int, real: Callable) -> None:
        fd = fd if isinstance(fd, int) else fd.fileno()
        real(fd)
        target = self._target(fd)
        if target is not None:
            self.ops.append(Op("fsync", target[0], target[1]))

    def _opener(self, real: Callable) -> Callable:
        def open_(path, flags, mode=0o777, *, dir_fd=None):
            p = os.path.realpath(os.fspath(path)) if dir_fd is None else ""
            existed = os.path.lexists(p) if p else True
            fd = real(path, flags, mode, dir_fd=dir_fd)
            if p and self.mine(p):
                ino = os.fstat(fd).st_ino
                if flags & os.O_CREAT and not existed:
                    self.ops.append(Op("create", p, ino))
                elif flags & os.O_TRUNC:
                    self.ops.append(Op("truncate", p, ino, 0))
            return fd

        return open_

    def _unlinker(self, real: Callable) -> Callable:
        def unlink(path, *, dir_fd=None):
            p = os.path.realpath(os.fspath(path))
            real(path, dir_fd=dir_fd)
            if self.mine(p):
                self.ops.append(Op("unlink", p))

        return unlink

    def _renamer(self, real: Callable) -> Callable:
        def rename(src, dst, *, src_dir_fd=None, dst_dir_fd=None):
            s, d = os.path.realpath(os.fspath(src)), os.path.realpath(os.fspath(dst))
            real(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)
            if self.mine(s):
                self.ops.append(Op("rename", s, dest=d))

        return rename

    def _mkdirer(self, real: Callable) -> Callable:
        def mkdir(path, mode=0o777, *, dir_fd=None):
            real(path, mode, dir_fd=dir_fd)
            p = os.path.realpath(os.fspath(path))
            if self.mine(p):
                self.ops.append(Op("mkdir", p))

        return mkdir


_PATCHED = [
    "write",
    "writev",
    "pwrite",
    "pwritev",
    "ftruncate",
    "fsync",
    "fdatasync",
    "open",
    "unlink",
    "remove",
    "rename",
    "replace",
    "mkdir",
]


# --- replaying ---------------------------------------------------------------------------


@dataclass
class Snapshot:
    """The files under a root: path -> inode, inode -> bytes, and the directories."""

    names: dict[str, int]
    content: dict[int, bytes]
    dirs: set[str] = field(default_factory=set)

    @classmethod
    def take(cls, root: str) -> Snapshot:
        names, content, dirs = {}, {}, {root}
        for here, subdirs, files in os.walk(root):
            dirs.update(os.path.join(here, d) for d in subdirs)
            for f in files:
                p = os.path.join(here, f)
                names[p] = os.stat(p).st_ino
                content[names[p]] = Path(p).read_bytes()
        return cls(names, content, dirs)

    def files(self) -> dict[str, bytes]:
        return {p: self.content[i] for p, i in self.names.items()}


@dataclass(frozen=True)
class CrashState:
    """Cut ``t``; ``skip`` pending ops not persisted; ``torn`` op index -> bytes kept."""

    kind: str  # prefix | torn | reorder
    t: int
    skip: frozenset[int] = frozenset()
    torn: tuple[int, int] | None = None

    def label(self) -> str:
        extra = f" torn={self.torn}" if self.torn else ""
        extra += f" lost={sorted(self.skip)}" if self.skip else ""
        return f"{self.kind} t={self.t}{extra}"


class Trace:
    """A recorded run: the initial files and the operations, replayable to any crash."""

    def __init__(self, initial: Snapshot, ops: list[Op]) -> None:
        self.initial = initial
        self.ops = ops

    def pending(self, t: int) -> list[int]:
        """Indexes of data ops before ``t`` that no later fsync (before ``t``) covers."""
        last_sync: dict[int, int] = {}
        for i, op in enumerate(self.ops[:t]):
            if op.kind == "fsync":
                last_sync[op.ino] = i
        return [
            i
            for i, op in enumerate(self.ops[:t])
            if op.kind in DATA_OPS and last_sync.get(op.ino, -1) < i
        ]

    def fsync_cuts(self) -> list[int]:
        """Cuts right after an fsync: states a crash can leave with nothing pending."""
        return [i + 1 for i, op in enumerate(self.ops) if op.kind == "fsync"]

    def materialize(self, state: CrashState) -> Snapshot:
        snap = Snapshot(
            dict(self.initial.names),
            {k: bytes(v) for k, v in self.initial.content.items()},
            set(self.initial.dirs),
        )
        content = {k: bytearray(v) for k, v in snap.content.items()}
        for i, op in enumerate(self.ops[: state.t]):
            if op.kind in NAME_OPS:
                _apply_name_op(snap, content, op)
            elif op.kind in DATA_OPS and i not in state.skip:
                data = op.data
                if state.torn is not None and state.torn[0] == i:
                    data = data[: state.torn[1]]
                _apply_data_op(content.setdefault(op.ino, bytearray()), op, data)
        snap.content = {k: bytes(v) for k, v in content.items()}
        return snap

    def write_out(self, state: CrashState, dest: Path) -> dict[str, Path]:
        """Materialize ``state`` under ``dest`` (same relative paths); return path map."""
        snap = self.materialize(state)
        root = sorted(self.initial.dirs, key=len)[0]
        out = {}
        for d in snap.dirs:
            (dest / os.path.relpath(d, root)).mkdir(parents=True, exist_ok=True)
        for p, data in snap.files().items():
            target = dest / os.path.relpath(p, root)
            target.write_bytes(data)
            out[p] = target
        return out


def _apply_name_op(snap: Snapshot, content: dict[int, bytearray], op: Op) -> None:
    if op.kind == "create":
        snap.names[op.path] = op.ino
        content[op.ino] = bytearray()
    elif op.kind == "unlink":
        snap.names.pop(op.path, None)
    elif op.kind == "rename":
        snap.names[op.dest] = snap.names.pop(op.path)
    elif op.kind == "mkdir":
        snap.dirs.add(op.path)


def _apply_data_op(buf: bytearray, op: Op, data: bytes) -> None:
    if op.kind == "truncate":
        del buf[op.offset :]
        buf.extend(bytes(max(0, op.offset - len(buf))))
        return
    if len(buf) < op.offset:
        buf.extend(bytes(op.offset - len(buf)))
    buf[op.offset : op.offset + len(data)] = data


def crash_states(
    trace: Trace, rng: random.Random, reorderings: int, torn_cuts: Callable[[Op], list[int]]
) -> Iterator[CrashState]:
    """Every prefix, the torn cuts of every write, and ``reorderings`` random subsets."""
    ops = trace.ops
    for t in range(len(ops) + 1):
        yield CrashState("prefix", t)
    for t in range(1, len(ops) + 1):
        if ops[t - 1].kind == "write":
            for keep in torn_cuts(ops[t - 1]):
                yield CrashState("torn", t, torn=(t - 1, keep))
    cuts = [t for t in range(1, len(ops) + 1) if len(trace.pending(t)) >= 2]
    seen: set[CrashState] = set()
    for _ in range(reorderings * 4 if cuts else 0):  # tries: small windows repeat states
        t = rng.choice(cuts)
        pending = trace.pending(t)
        rng.shuffle(pending)
        state = CrashState("reorder", t, skip=frozenset(pending[rng.randrange(len(pending)) :]))
        if state not in seen:
            seen.add(state)
            yield state
        if len(seen) == reorderings:
            return


@contextlib.contextmanager
def scratch_dir(fallback: Path) -> Iterator[Path]:
    """Where crash copies are built and checked: tmpfs when there is one.

    The copies are thrown away; on tmpfs their fsyncs and unlinks cost nothing (on
    this machine's disk they were half of the run time).
    """
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    path = Path(tempfile.mkdtemp(prefix="crash-", dir=base or fallback))
    try:
        yield path / "crash"
    finally:
        shutil.rmtree(path, ignore_errors=True)


def record(root: Path, mp: pytest.MonkeyPatch, workload: Callable[[Recorder], None]) -> Trace:
    """Run ``workload`` with its file operations under ``root`` recorded."""
    initial = Snapshot.take(os.path.realpath(root))
    recorder = Recorder(root)
    with mp.context() as patched:
        recorder.install(patched)
        workload(recorder)
    return Trace(initial, recorder.ops)


def assert_complete(trace: Trace, root: Path) -> None:
    """Replaying every op gives the files as they are: nothing escaped the recorder."""
    final = trace.materialize(CrashState("prefix", len(trace.ops))).files()
    actual = Snapshot.take(os.path.realpath(root)).files()
    assert set(final) == set(actual)
    for p in final:
        assert final[p] == actual[p], f"{p}: a write escaped the recorder"


# --- the VMDK writer ---------------------------------------------------------------------

VMDK_SIZE = 96 * MiB  # three grain tables of 512 grains (32 MiB each)


@dataclass(frozen=True)
class Write:
    offset: int
    data: bytes  # b"" with ``zeros`` set: write_zeroes
    zeros: int = 0

    @property
    def length(self) -> int:
        return self.zeros or len(self.data)

    @property
    def new(self) -> bytes:
        return bytes(self.zeros) if self.zeros else self.data


def _pattern(seed: int, n: int) -> bytes:
    rng = random.Random(seed)
    text = b"grain %d replay " % seed
    return rng.randbytes(n // 2) + (text * (n // len(text) + 1))[: n - n // 2]


def vmdk_initial(path: Path) -> bytes:
    """A volume with data in table 0 and tables 1 and 2 not allocated (GD entries 0)."""
    with create_vmdk(str(path), VMDK_SIZE) as disk:
        disk.write(0, _pattern(1, 3 * GRAIN))  # grains 0-2
        disk.write(10 * GRAIN + 512, _pattern(2, 5000))  # grain 10, partly
    raw = bytearray(path.read_bytes())
    h = SparseHeader.parse(bytes(raw[:SECTOR]), str(path))
    for directory in (h.gd_offset, h.rgd_offset):  # unlink tables 1 and 2: allocated on demand
        raw[directory * SECTOR + 4 : directory * SECTOR + 12] = bytes(8)
    path.write_bytes(raw)
    return bytes(raw)


VMDK_BATCHES = [
    [
        Write(1 * GRAIN, _pattern(3, GRAIN)),  # in place, a whole grain
        Write(2 * GRAIN + 8192, _pattern(4, 4096)),  # in place, partial
        Write(20 * GRAIN + 4096, _pattern(5, 8192)),  # new grain in table 0, partial
        Write(30 * GRAIN, _pattern(6, 3 * GRAIN)),  # three new grains
        Write(600 * GRAIN + 100, _pattern(7, 3000)),  # table 1: GT allocated first
    ],
    [
        Write(0, b"", zeros=GRAIN),  # write_zeroes over an allocated grain: in place
        Write(21 * GRAIN, _pattern(8, GRAIN)),  # new grain
        Write(20 * GRAIN + 32768, _pattern(9, 512)),  # in place, into a grain of batch 1
        Write(1100 * GRAIN, _pattern(10, 2 * GRAIN)),  # table 2
        Write(601 * GRAIN, bytes(GRAIN)),  # zeros onto a hole: allocates nothing
    ],
]


#: grains allocated in ``vmdk_initial``: in-place writes go there
INITIAL_GRAINS = (0, 1, 2, 10)


def random_batches(rng: random.Random) -> list[list[Write]]:
    """2 or 3 flushes of 2-6 disjoint writes: in place, new grains in any table, zeros."""
    used: list[tuple[int, int]] = []
    batches = []
    for b in range(rng.randrange(2, 4)):
        batch, size = [], rng.randrange(2, 7)
        while len(batch) < size:
            w = _random_write(rng, len(used) + 100 * b)
            if all(w.offset + w.length <= a or e <= w.offset for a, e in used):
                used.append((w.offset, w.offset + w.length))
                batch.append(w)
        batches.append(batch)
    return batches


def _random_write(rng: random.Random, seed: int) -> Write:
    grain = rng.choice(
        [rng.choice(INITIAL_GRAINS), rng.randrange(11, 512), rng.randrange(512, 1536)]
    )
    offset = grain * GRAIN + rng.randrange(0, GRAIN // SECTOR) * SECTOR
    length = rng.choice([SECTOR, 4096, GRAIN, 2 * GRAIN + 1024, rng.randrange(1, 3 * GRAIN)])
    length = min(length, VMDK_SIZE - offset)
    if rng.random() < 0.15:
        return Write(offset, b"", zeros=length)
    return Write(offset, _pattern(seed, length) if rng.random() < 0.9 else bytes(length))


def vmdk_workload(path: Path, batches: list[list[Write]]) -> Callable[[Recorder], None]:
    def run(rec: Recorder) -> None:
        with open_vmdk(str(path), writable=True) as disk:
            for batch in batches:
                for w in batch:
                    if w.zeros:
                        disk.write_zeroes(w.offset, w.zeros)
                    else:
                        disk.write(w.offset, w.data)
                disk.flush()
                rec.mark("flushed")

    return run


def _pieces(write: Write, unit: int) -> Iterator[tuple[int, int]]:
    """(offset, length) pieces of a write, cut at multiples of ``unit``."""
    pos, end = write.offset, write.offset + write.length
    while pos < end:
        n = min(end, (pos // unit + 1) * unit) - pos
        yield pos, n
        pos += n


def sector_cuts(op: Op) -> list[int]:
    """A torn write keeps whole sectors: cut at the middle sector boundary inside it."""
    first = (op.offset // SECTOR + 1) * SECTOR  # the first boundary strictly inside
    bounds = list(range(first, op.offset + len(op.data), SECTOR))
    return [bounds[len(bounds) // 2] - op.offset] if bounds else []


class VmdkChecker:
    """Checks a crash copy of the volume against its initial and final content."""

    def __init__(
        self, initial_path: Path, qemu_img: str, seed: int, batches: list[list[Write]]
    ) -> None:
        self.seed = seed
        self.batches = batches
        with open_vmdk(str(initial_path)) as d:
            self.old = HashMap.compute(d, GRAIN)
            self.old_bytes = {g: d.read(g * GRAIN, GRAIN) for g in self._grains()}
        self.qemu_img = qemu_img
        self.checked = 0
        self.refused: list[str] = []
        self.repaired = 0  # states whose writable open dropped a torn table allocation

    def _grains(self) -> set[int]:
        return {
            g
            for batch in self.batches
            for w in batch
            for g in range(w.offset // GRAIN, -(-(w.offset + w.length) // GRAIN))
        }

    def check(self, path: Path, state: CrashState, *, deep: bool) -> None:
        where = f"{state.label()} (seed {self.seed})"
        writable = self._reopens_writable(path, where)
        try:
            disk = open_vmdk(str(path))
        except ReplicationError as err:
            raise AssertionError(f"{where}: our reader refuses it: {err}") from err
        with disk:
            self._check_content(disk, state, where)
            if deep:
                self._qemu_reads_the_same(disk, path, where)
        self._qemu_check(path, where)
        if deep and writable:
            self._takes_new_writes(path, where)
        self.checked += 1

    def _reopens_writable(self, path: Path, where: str) -> bool:
        """The master target reopens its volumes writable after a crash: does it open?

        Refusals are collected (``self.refused``), not raised: see
        ``test_vmdk_reopens_writable_after_a_crash_between_gd_and_rgd``.
        """
        before = path.read_bytes()
        try:
            with open_vmdk(str(path), writable=True):
                pass
        except ReplicationError as err:
            self.refused.append(f"{where}: {err.code}: {err}")
            return False
        after = path.read_bytes()
        if after != before:
            # the only change allowed: a torn grain-table allocation dropped (sparse.py
            # _repair_torn_table_allocation zeroes one-sided directory entries)
            changed = [i for i in range(len(before)) if before[i] != after[i]]
            zeroed = {i - i % 4 for i in changed}
            assert all(after[i : i + 4] == bytes(4) for i in zeroed), (
                f"{where}: a writable open without writes changed more than a torn entry"
            )
            with open_vmdk(str(path), writable=True):
                pass
            assert path.read_bytes() == after, f"{where}: the repair is not idempotent"
            self.repaired += 1
        return True

    def _check_content(self, disk, state: CrashState, where: str) -> None:
        now = HashMap.compute(disk, GRAIN)
        touched = self._grains()
        stray = set(np.flatnonzero(now.digests != self.old.digests).tolist()) - touched
        assert not stray, f"{where}: blocks {sorted(stray)} changed but were never written"
        unit = SECTOR if state.torn is not None else GRAIN
        for batch in self.batches:
            for w in batch:
                for off, n in _pieces(w, unit):
                    got = disk.read(off, n)
                    g = off // GRAIN
                    old = self.old_bytes[g][off - g * GRAIN : off - g * GRAIN + n]
                    new = w.new[off - w.offset : off - w.offset + n]
                    assert got in (old, new), f"{where}: [{off}, +{n}) is neither old nor new"

    def _qemu_check(self, path: Path, where: str) -> None:
        proc = subprocess.run(
            [self.qemu_img, "check", "-f", "vmdk", "--output=json", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        # 0: clean; 3: leaked clusters only (harmless space); 2: corruption; 1: check failed
        assert proc.returncode in (0, 3), f"{where}: qemu-img check: {proc.stderr or proc.stdout}"
        report = json.loads(proc.stdout)
        assert report.get("corruptions", 0) == 0 and report.get("check-errors", 0) == 0, report

    def _qemu_reads_the_same(self, disk, path: Path, where: str) -> None:
        raw = path.with_suffix(".raw")
        write_raw(raw, disk.read(0, disk.virtual_size))
        assert qemu_compare(raw, path, "vmdk").returncode == 0, f"{where}: qemu reads otherwise"
        raw.unlink()

    def _takes_new_writes(self, path: Path, where: str) -> None:
        data = _pattern(99, GRAIN + 512)
        with open_vmdk(str(path), writable=True) as disk:
            disk.write(40 * GRAIN + 512, data)  # new grains
            disk.write(1 * GRAIN, data[:4096])  # in place
            disk.flush()
        with open_vmdk(str(path)) as disk:
            assert disk.read(40 * GRAIN + 512, len(data)) == data, where
            assert disk.read(1 * GRAIN, 4096) == data[:4096], where
        self._qemu_check(path, f"{where} (after new writes)")


def run_vmdk_replay(
    tmp_path: Path,
    mp: pytest.MonkeyPatch,
    reorderings: int,
    seed: int,
    batches: list[list[Write]] = VMDK_BATCHES,
) -> VmdkChecker:
    print(f"crash replay (vmdk): seed {seed}, {reorderings} reorderings")
    qemu_img = require("qemu-img")
    live = tmp_path / "live"
    live.mkdir()
    volume = live / "vol.vmdk"
    vmdk_initial(volume)
    shutil.copy(volume, tmp_path / "initial.vmdk")
    trace = record(live, mp, vmdk_workload(volume, batches))
    assert_complete(trace, live)
    assert {op.kind for op in trace.ops} >= {"write", "fsync"}
    checker = VmdkChecker(tmp_path / "initial.vmdk", qemu_img, seed, batches)
    deep = set(trace.fsync_cuts()) | {0, len(trace.ops)}
    with scratch_dir(tmp_path) as crash_dir:
        for state in crash_states(trace, random.Random(seed), reorderings, sector_cuts):
            shutil.rmtree(crash_dir, ignore_errors=True)
            paths = trace.write_out(state, crash_dir)
            is_deep = state.kind == "prefix" and state.t in deep
            checker.check(paths[os.path.realpath(volume)], state, deep=is_deep)
    ledger.tried("crash states replayed", "vmdk writer", checker.checked)
    ledger.lost_nothing("crash states replayed")  # every state checked old-or-new above
    return checker


@pytest.mark.oracle
def test_vmdk_trace_is_complete_and_allocates_tables_and_grains(tmp_path, monkeypatch):
    volume = tmp_path / "vol.vmdk"
    vmdk_initial(volume)
    trace = record(tmp_path, monkeypatch, vmdk_workload(volume, VMDK_BATCHES))
    assert_complete(trace, tmp_path)
    writes = [op for op in trace.ops if op.kind == "write"]
    # the descriptor (new CID), uncleanShutdown, zeroed tables, grains, GD/RGD, GT/RGT entries
    assert len(writes) >= 15 and sum(op.kind == "fsync" for op in trace.ops) >= 8
    with open_vmdk(str(volume)) as disk:
        for w in (w for batch in VMDK_BATCHES for w in batch):
            assert disk.read(w.offset, w.length) == w.new


@pytest.mark.oracle
def test_vmdk_every_crash_state_is_consistent(tmp_path, monkeypatch):
    started = time.monotonic()
    checker = run_vmdk_replay(tmp_path, monkeypatch, REORDERINGS, crash_seed())
    print(f"{checker.checked} VMDK crash states checked in {time.monotonic() - started:.1f} s")
    print(f"{len(checker.refused)} refused a writable reopen:", *checker.refused[:5], sep="\n  ")
    print(f"{checker.repaired} torn grain-table allocations repaired at a writable reopen")
    assert checker.checked > 60 and checker.refused == []


@pytest.mark.oracle
def test_vmdk_reopens_writable_after_a_crash_between_gd_and_rgd(tmp_path, monkeypatch):
    """A crash between the GD and RGD entry writes of a new grain table (two pwrites,
    one fsync) leaves one directory pointing at an all-zero table: a writable open
    drops that torn allocation instead of refusing the volume for good."""
    volume = tmp_path / "vol.vmdk"
    vmdk_initial(volume)
    trace = record(tmp_path, monkeypatch, vmdk_workload(volume, VMDK_BATCHES))
    refused = []
    with scratch_dir(tmp_path) as crash_dir:
        for t in range(len(trace.ops) + 1):  # every prefix: no reordering needed
            shutil.rmtree(crash_dir, ignore_errors=True)
            path = trace.write_out(CrashState("prefix", t), crash_dir)[os.path.realpath(volume)]
            try:
                open_vmdk(str(path), writable=True).close()
            except ReplicationError as err:
                refused.append(f"prefix t={t}: {err}")
    assert refused == []


@pytest.mark.oracle
@pytest.mark.soak
def test_vmdk_crash_states_soak(tmp_path, monkeypatch, request):
    """``SOAK_WORKLOADS`` random workloads, each with every state and its reorderings."""
    soak_only(request)
    first = int(os.environ.get("CRASH_SEED", time.time_ns() % 2**32))
    refused = 0
    for seed in range(first, first + SOAK_WORKLOADS):
        work = tmp_path / str(seed)
        work.mkdir()
        batches = random_batches(random.Random(seed))
        checker = run_vmdk_replay(work, monkeypatch, SOAK_REORDERINGS, seed, batches)
        refused += len(checker.refused)
        shutil.rmtree(work)
    print(f"{refused} states refused a writable reopen (the open GD/RGD finding)")


@pytest.mark.oracle
def test_qemu_img_check_reports_no_leaks_for_vmdk(tmp_path):
    """What ``qemu-img check`` returns for VMDK (qemu 7.2), so the checks above read it right.

    Leaked clusters would be rc 3 (harmless, accepted), corruption rc 2; but qemu's
    VMDK driver counts no leaks at all (unreferenced grains appended give rc 0 and no
    ``leaks`` key) and fails the whole check (rc 1, no JSON) on a grain table entry
    past the end of the file.
    """
    qemu_img = require("qemu-img")
    path = tmp_path / "v.vmdk"
    with create_vmdk(str(path), 8 * MiB) as disk:
        disk.write(0, b"x" * GRAIN)
    with open(path, "ab") as f:
        f.write(os.urandom(3 * GRAIN))  # what a crash after writing grains leaves
    proc = subprocess.run([qemu_img, "check", "-f", "vmdk", "--output=json", str(path)],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0 and "leaks" not in json.loads(proc.stdout)
    os.truncate(path, path.stat().st_size - 4 * GRAIN)  # the entry now points past EOF
    proc = subprocess.run([qemu_img, "check", "-f", "vmdk", str(path)], capture_output=True)
    assert proc.returncode not in (0, 3)


# --- the retention journal -----------------------------------------------------------------

VOL_SIZE = 1 * MiB
SEGMENT = 4096  # the smallest segment: the workload rolls segments and prunes some


@dataclass
class JournalRun:
    """What the workload did: the volume at each point, and which points were acked."""

    images: dict[int, bytes] = field(default_factory=dict)
    roots: dict[int, str] = field(default_factory=dict)
    cuts: int = 0  # crash states whose reopen cut a torn tail


def journal_workload(root: Path, run: JournalRun, seed: int) -> Callable[[Recorder], None]:
    """Applier order (journal.md section 7): preserve, sync, write; flush, manifest, point."""
    rng = random.Random(seed)
    clock = iter(range(1000, 10**6, 10))

    def workload(rec: Recorder) -> None:
        vol = open_disk(str(root / "vol.raw"), writable=True)
        journal = Journal.open(
            root / "journal",
            volume="vol",
            retention_bytes=6 * SEGMENT,
            segment_bytes=SEGMENT,
            clock=lambda: float(next(clock)),
        )
        store = ManifestStore(root / "journal" / "manifests")
        try:
            for step in range(14):
                off, n = rng.randrange(0, VOL_SIZE - 9000), rng.randrange(1, 9000)
                data = _pattern(step, n) if step % 3 else bytes([step + 1]) * n
                journal.preserve(vol, off, n)
                journal.sync()  # J1: the undo record is durable before the write is issued
                vol.write(off, data)
                if step % 3 == 2:
                    _add_point(rec, vol, journal, store, run)
        finally:
            journal.close()
            vol.close()

    return workload


def _add_point(rec: Recorder, vol, journal: Journal, store: ManifestStore, run: JournalRun):
    vol.flush()
    digests = HashMap.compute(vol, GRAIN).digests
    points = journal.points()
    root = store.commit(
        digests, GRAIN, VOL_SIZE, parent=points[-1].manifest_root if points else None
    )
    point = journal.add_point("crash", manifest_root=root)
    run.images[point.id] = vol.read(0, VOL_SIZE)
    run.roots[point.id] = root
    rec.mark(("acked", point.id))
    before = len(rec.ops)
    if journal.prune().dropped_points:  # marked before the prune: a cut inside it may drop them
        kept = {q.id for q in journal.points()}
        rec.ops.insert(before, Op("mark", note=("pruned", sorted(set(run.images) - kept))))
    store.gc(p.manifest_root for p in journal.points())


def journal_cuts(op: Op) -> list[int]:
    n = len(op.data)
    return sorted({k for k in (1, 39, n // 2, n - 1) if 0 < k < n})


def check_journal_state(
    trace: Trace, state: CrashState, base: Path, run: JournalRun, seed: int
) -> None:
    where = f"{state.label()} (seed {seed})"
    acked, pruned = _known_points(trace.ops[: state.t])
    jdir = base / "journal"
    try:
        journal = Journal.open(jdir, volume="vol", retention_bytes=1 << 30, segment_bytes=SEGMENT)
    except ReplicationError as err:
        raise AssertionError(f"{where}: the journal does not reopen: {err}") from err
    with journal, open_disk(str(base / "vol.raw"), writable=True) as live:
        run.cuts += journal.recovery.truncated_file is not None
        listed = {p.id: p for p in journal.points()}
        assert set(listed) <= set(run.images), f"{where}: points never added: {listed}"
        assert all(p.manifest_root == run.roots[i] for i, p in listed.items()), where
        missing = (acked - pruned) - set(listed)
        assert not missing, f"{where}: acknowledged points {sorted(missing)} are lost"
        store = ManifestStore(jdir / "manifests")
        for pid, point in listed.items():
            with create_disk(str(base / f"out-{pid}.raw"), VOL_SIZE) as out:
                journal.restore_into(point, live, out)
                assert out.read(0, VOL_SIZE) == run.images[pid], f"{where}: {pid} restores wrongly"
                differing = store.verify_disk(out, point.manifest_root)  # J2: it is there
                assert differing == [], f"{where}: point {pid} differs from its manifest"
        _continues(journal, live, base, run, where)


def _known_points(ops: list[Op]) -> tuple[set[int], set[int]]:
    """Points whose add_point had returned, and points a (started) prune may drop."""
    acked, pruned = set(), set()
    for op in ops:
        if op.kind == "mark" and op.note[0] == "acked":
            acked.add(op.note[1])
        elif op.kind == "mark" and op.note[0] == "pruned":
            pruned.update(op.note[1])
    return acked, pruned


def _continues(journal: Journal, live, base: Path, run: JournalRun, where: str) -> None:
    """The recovered journal takes new undo records and points, and they count."""
    listed = [p.id for p in journal.points()]
    journal.preserve(live, 0, 4096)
    journal.sync()
    live.write(0, b"after the crash!" * 256)
    live.flush()
    new = journal.add_point("app", manifest_root="ab" * 32, tag="after")
    assert journal.points()[-1] == new, where
    if listed:  # the newest older point must still restore: the new write was journaled
        with create_disk(str(base / "out-again.raw"), VOL_SIZE) as out:
            journal.restore_into(listed[-1], live, out)
            assert out.read(0, VOL_SIZE) == run.images[listed[-1]], f"{where}: after reopen"


def run_journal_replay(tmp_path: Path, mp: pytest.MonkeyPatch, reorderings: int, seed: int):
    print(f"crash replay (journal): seed {seed}, {reorderings} reorderings")
    live = tmp_path / "live"
    (live / "journal" / "manifests").mkdir(parents=True)
    with create_disk(str(live / "vol.raw"), VOL_SIZE) as vol:
        vol.write(0, _pattern(77, VOL_SIZE))
    run = JournalRun()
    trace = record(live, mp, journal_workload(live, run, seed))
    assert_complete(trace, live)
    assert len(run.images) >= 4
    checked = 0
    with scratch_dir(tmp_path) as crash_dir:
        for state in crash_states(trace, random.Random(seed), reorderings, journal_cuts):
            shutil.rmtree(crash_dir, ignore_errors=True)
            trace.write_out(state, crash_dir)
            check_journal_state(trace, state, crash_dir, run, seed)
            checked += 1
    ledger.tried("crash states replayed", "journal", checked)
    ledger.lost_nothing("crash states replayed")  # every state reopened and restored above
    return checked, trace, run


def test_journal_every_crash_state_reopens_and_restores(tmp_path, monkeypatch):
    started = time.monotonic()
    checked, trace, run = run_journal_replay(tmp_path, monkeypatch, REORDERINGS, crash_seed())
    kinds = {op.kind for op in trace.ops}
    assert kinds >= {"write", "fsync", "create", "unlink", "rename"}  # rolls, prunes, manifests
    print(f"{checked} journal crash states checked in {time.monotonic() - started:.1f} s")
    print(f"{run.cuts} of them reopened by cutting a torn tail")
    assert run.cuts > 10
    assert checked > 100


@pytest.mark.soak
def test_journal_crash_states_soak(tmp_path, monkeypatch, request):
    """``SOAK_WORKLOADS`` journal workloads (the seed draws their writes), every state each."""
    soak_only(request)
    first = int(os.environ.get("CRASH_SEED", time.time_ns() % 2**32))
    for seed in range(first, first + SOAK_WORKLOADS):
        work = tmp_path / str(seed)
        work.mkdir()
        run_journal_replay(work, monkeypatch, SOAK_REORDERINGS, seed)
        shutil.rmtree(work)


def test_replay_model_itself(tmp_path):
    """The replayer: durability by fsync of the inode, program order, torn and lost writes."""
    f = os.path.realpath(tmp_path / "f")
    ops = [
        Op("create", f, 7),
        Op("write", f, 7, 0, b"aaaa"),
        Op("fsync", f, 7),
        Op("write", f, 7, 2, b"bb"),
        Op("write", f, 7, 8, b"cc"),
        Op("rename", f, dest=f + ".2"),
    ]
    trace = Trace(Snapshot({}, {}, {os.path.realpath(tmp_path)}), ops)
    assert trace.pending(6) == [3, 4] and trace.fsync_cuts() == [3]
    assert trace.materialize(CrashState("prefix", 6)).files() == {f + ".2": b"aabb\0\0\0\0cc"}
    lost = trace.materialize(CrashState("reorder", 6, skip=frozenset({3})))
    assert lost.files() == {f + ".2": b"aaaa\0\0\0\0cc"}
    torn = trace.materialize(CrashState("torn", 5, torn=(4, 1)))
    assert torn.files() == {f: b"aabb\0\0\0\0c"}

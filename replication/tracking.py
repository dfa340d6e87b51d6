"""Changed-block tracking on the source: a crash-safe dirty bitmap with an activity log.

Theory of operation
-------------------

One bit per block says "this block may differ from what the master target has
persisted". The rule everything else serves:

    **A write MUST be marked dirty durably before it is issued to the disk.**

An fsync per write is too slow, so, as in DRBD, the disk is cut into *extents*
(4 MiB by default) and an *activity log* (AL) of at most ``al_slots`` extents (64 by
default: 256 MiB) is kept on disk. A write to an extent that is already in the AL
("hot") only sets bits in memory: after a crash every block of every hot extent is
treated as dirty, so nothing is lost. A write to a cold extent first appends one AL
record and fsyncs it. When the AL is full, the least recently used extent is evicted
*in the same record*: the record carries that extent's bits (a few bytes: 64 bits at
the default geometry), so they are durable before the extent stops being hot.

The state file (``docs/design.md``, "Changed-block tracking", has the byte layout) is a
*checkpoint* (identity, full bitmap, hot extents, checksum) followed by AL records.
Checkpoints replace the whole file with write-then-rename (``durable.py``); records
are only ever appended. Recovery is ``checkpoint bits | record bits | every block of
every extent still hot``: always a superset of the blocks truly dirty. A checkpoint is
written when the tracker opens, every ``checkpoint_records`` records, when an epoch
commits (the only way bits are cleared on disk) and at a clean close (flag ``CLEAN``,
no hot extents: the bitmap is then exact).

Epochs hand the dirty set to the replicator: :meth:`DirtyTracker.begin_epoch` swaps the
dirty set with an empty one. The taken bits stay *in flight*: still part of every
eviction record and checkpoint, so a crash before :meth:`Epoch.commit` leaves them
dirty. Only commit clears them on disk; :meth:`Epoch.abort` puts them back.

Trust: when the state is missing, corrupt, from another disk or geometry, or the
caller says the disk may have been written while untracked, :meth:`DirtyTracker.open`
reports an untrusted :class:`TrustState` and the caller must resync the disk by hash
comparison. That verdict is persisted: it survives restarts until an epoch begun while
untrusted (``Epoch.full_resync``) commits.

Memory: two packed bitmaps (dirty and in flight), one bit per block each: 4 MiB each
for a 2 TiB disk at 64 KiB blocks (8 MiB in all), plus a copy per epoch; checkpoints
write the whole bitmap. Threads: every public method is thread-safe; an fsync runs
without the lock held, and marks to extents whose AL record is being fsynced wait for
it (group commit). After a failed write or fsync of the state the tracker is *broken*:
every later mark raises :class:`TrackingBrokenError`, so no write goes untracked.
"""

from __future__ import annotations

import contextlib
import enum
import os
import secrets
import struct
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final, NoReturn

import numpy as np
import xxhash

from .blocks import DEFAULT_BLOCK_SIZE, bitmap_runs, block_count, check_block_size
from .disks import open_disk
from .disks.base import Disk, DiskInfo, Extent
from .durable import fsync_dir, lock_exclusive, write_atomically
from .errors import (
    EpochError,
    OutOfRangeError,
    TrackingBrokenError,
    TrackingBusyError,
    TrackingError,
    UsageError,
)

__all__ = [
    "DEFAULT_AL_SLOTS",
    "DEFAULT_CHECKPOINT_RECORDS",
    "DEFAULT_EXTENT_SIZE",
    "STATE_FILE",
    "DirtyTracker",
    "Epoch",
    "TrackedDisk",
    "TrackerStatistics",
    "TrustReason",
    "TrustState",
    "dirty_blocks",
    "read_state",
]

STATE_MAGIC: Final = b"RPLT"
STATE_VERSION: Final = 1
SUPPORTED_STATE_VERSIONS: Final = (1,)
#: the state file's name inside a TrackedDisk's state directory
STATE_FILE: Final = "tracking.cbt"
DEFAULT_EXTENT_SIZE: Final = 4 << 20
DEFAULT_AL_SLOTS: Final = 64
DEFAULT_CHECKPOINT_RECORDS: Final = 4096
MAX_DISK_ID: Final = 1024

#: magic, version, flags, reserved, block size, blocks per extent, size, base seq, nonce,
#: bitmap bytes, hot extents, disk id bytes, generation bytes, pending reason bytes
_HEADER = struct.Struct(">4sBBHIIQQQIHHHH4x")
#: type, seq, activated extent, evicted extent (or _NO_EXTENT); then bits, checksum
_RECORD = struct.Struct(">B3xQQQ")
_SUM = struct.Struct(">Q")
_FLAG_CLEAN: Final = 0x01
_RECORD_ACTIVATE: Final = 1
_NO_EXTENT: Final = (1 << 64) - 1
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)

assert _HEADER.size == 56 and _RECORD.size == 28


# --- trust ----------------------------------------------------------------------------


class TrustReason(enum.StrEnum):
    """Why the tracker's bitmap is (or is not) a superset of the blocks written."""

    CLEAN = "clean"  # trusted: closed cleanly, bitmap exact
    RECOVERED = "recovered"  # trusted: unclean stop, hot extents added (superset)
    RESYNCED = "resynced"  # trusted: a full-resync epoch committed in this session
    MISSING = "missing"  # no state file: never tracked here
    CORRUPT = "corrupt"  # bad magic, version, checksum or record
    OTHER_DISK = "other_disk"  # the state names another disk id
    GEOMETRY_CHANGED = "geometry_changed"  # disk size or block size changed
    UNTRACKED_WRITES = "untracked_writes"  # written while not tracked (caller or generation)


_TRUSTED_REASONS: Final = (TrustReason.CLEAN, TrustReason.RECOVERED, TrustReason.RESYNCED)


@dataclass(frozen=True, slots=True)
class TrustState:
    """Whether the dirty bitmap can drive a delta; if not, resync by hash comparison."""

    trusted: bool
    reason: TrustReason
    detail: str

    @classmethod
    def of(cls, reason: TrustReason, detail: str) -> TrustState:
        """Return the state for ``reason`` (trusted or not follows from the reason)."""
        return cls(reason in _TRUSTED_REASONS, reason, detail)


class _Untrusted(Exception):
    """Internal: the state file cannot be trusted, for ``reason``."""

    def __init__(self, reason: TrustReason, detail: str) -> None:
        super().__init__(detail)
        self.state = TrustState.of(reason, detail)


# --- packed bitmaps -------------------------------------------------------------------


class _Bits:
    """A little-endian packed bitmap (block i is bit i & 7 of byte i >> 3).

    The bytearray serves single-byte updates (fast in pure Python); the numpy view of
    the same memory serves whole-range and whole-map operations.
    """

    __slots__ = ("buf", "view")

    def __init__(self, nbytes: int) -> None:
        self.buf = bytearray(nbytes)
        self.view = np.frombuffer(self.buf, dtype=np.uint8)

    def set_range(self, first: int, end: int) -> None:
        """Set bits ``[first, end)``."""
        lo, hi = first >> 3, (end - 1) >> 3
        head = (0xFF << (first & 7)) & 0xFF
        tail = 0xFF >> (7 - ((end - 1) & 7))
        if lo == hi:
            self.buf[lo] |= head & tail
            return
        self.buf[lo] |= head
        self.buf[hi] |= tail
        if hi - lo > 1:
            self.view[lo + 1 : hi] = 0xFF

    def count(self) -> int:
        """Return how many bits are set."""
        return int(_POPCOUNT[self.view].sum(dtype=np.int64))


def dirty_blocks(bitmap: np.ndarray) -> np.ndarray:
    """Return the sorted int64 indexes of the set bits of a packed bitmap.

    Memory is proportional to the dirty bytes, not to the disk.
    """
    nz = np.flatnonzero(bitmap)
    bits = np.unpackbits(bitmap[nz].reshape(-1, 1), axis=1, bitorder="little").astype(bool)
    return (nz.reshape(-1, 1) * 8 + np.arange(8, dtype=np.int64))[bits]


# --- the state file (sans-I/O) ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Identity:
    disk_id: str
    size: int
    block_size: int

    @property
    def blocks(self) -> int:
        return block_count(self.size, self.block_size)

    @property
    def bitmap_bytes(self) -> int:
        return -(-self.blocks // 8)


@dataclass(slots=True)
class _Loaded:
    """What a valid state file recovers."""

    bits: np.ndarray
    clean: bool
    generation: str
    pending: TrustReason | None


@dataclass(frozen=True, slots=True)
class _Checkpoint:
    extent_blocks: int
    base_seq: int
    nonce: int
    clean: bool
    generation: str
    pending: TrustReason | None
    hot: tuple[int, ...]
    end: int  # offset of the first record


def _generation_digest(generation: str | None) -> str:
    """Generations may be long (a VMDK chain); the file keeps a fixed-size digest."""
    return "" if generation is None else xxhash.xxh3_128_hexdigest(generation.encode())


def _encode_checkpoint(
    ident: _Identity, extent_blocks: int, cp: _Checkpoint, bits: np.ndarray
) -> bytes:
    disk_id = ident.disk_id.encode()
    generation = cp.generation.encode()
    pending = (cp.pending.value if cp.pending else "").encode()
    head = _HEADER.pack(
        STATE_MAGIC, STATE_VERSION, _FLAG_CLEAN if cp.clean else 0, 0,
        ident.block_size, extent_blocks, ident.size, cp.base_seq, cp.nonce,
        len(bits), len(cp.hot), len(disk_id), len(generation), len(pending),
    )  # fmt: skip
    hot = struct.pack(f">{len(cp.hot)}Q", *cp.hot)
    body = b"".join((head, disk_id, generation, pending, hot, bits.tobytes()))
    return body + _SUM.pack(xxhash.xxh3_64_intdigest(body))


def _encode_record(nonce: int, seq: int, extent: int, evicted: int, bits: bytes) -> bytes:
    body = _RECORD.pack(_RECORD_ACTIVATE, seq, extent, evicted) + bits
    # Seeding with the checkpoint's nonce binds the record to this very file.
    return body + _SUM.pack(xxhash.xxh3_64_intdigest(body, seed=nonce))


def _corrupt(detail: str) -> _Untrusted:
    return _Untrusted(TrustReason.CORRUPT, detail)


def _decode_checkpoint(data: memoryview, ident: _Identity) -> tuple[_Checkpoint, np.ndarray]:
    """Parse and check the checkpoint at the start of ``data``; raise :class:`_Untrusted`."""
    if len(data) < _HEADER.size:
        raise _corrupt("state file is shorter than its header")
    magic, version, flags, _, bsize, epb, size, base, nonce, blen, nhot, nid, ngen, nwhy = (
        _HEADER.unpack_from(data)
    )
    if magic != STATE_MAGIC:
        raise _corrupt("bad magic: not a tracking state file")
    if version not in SUPPORTED_STATE_VERSIONS:
        raise _corrupt(f"unsupported state version {version}")
    end = _HEADER.size + nid + ngen + nwhy + 8 * nhot + blen
    if len(data) < end + _SUM.size:
        raise _corrupt("state file is truncated inside its checkpoint")
    if xxhash.xxh3_64_intdigest(data[:end]) != _SUM.unpack_from(data, end)[0]:
        raise _corrupt("checkpoint checksum mismatch")
    # The checksum holds, so a different identity is a real one, not damage.
    pos = _HEADER.size
    disk_id = bytes(data[pos : pos + nid]).decode(errors="replace")
    if disk_id != ident.disk_id:
        raise _Untrusted(
            TrustReason.OTHER_DISK, f"state belongs to disk {disk_id!r}, not {ident.disk_id!r}"
        )
    if (size, bsize) != (ident.size, ident.block_size):
        raise _Untrusted(
            TrustReason.GEOMETRY_CHANGED,
            f"state is for {size} bytes in {bsize}-byte blocks, the disk has "
            f"{ident.size} bytes in {ident.block_size}-byte blocks",
        )
    generation = bytes(data[pos + nid : pos + nid + ngen]).decode(errors="replace")
    pending = _decode_pending(bytes(data[pos + nid + ngen : pos + nid + ngen + nwhy]))
    pos += nid + ngen + nwhy
    hot = struct.unpack_from(f">{nhot}Q", data, pos)
    bits = np.frombuffer(data[pos + 8 * nhot : end], dtype=np.uint8).copy()
    cp = _Checkpoint(epb, base, nonce, bool(flags & _FLAG_CLEAN), generation, pending, hot, end)
    _validate_checkpoint(cp, flags, ident, bits)
    return cp, bits


def _decode_pending(raw: bytes) -> TrustReason | None:
    if not raw:
        return None
    try:
        reason = TrustReason(raw.decode())
    except (UnicodeDecodeError, ValueError):
        raise _corrupt(f"unknown pending resync reason {raw!r}") from None
    if reason in _TRUSTED_REASONS:
        raise _corrupt(f"pending resync reason {reason} is not a reason to resync")
    return reason


def _validate_checkpoint(cp: _Checkpoint, flags: int, ident: _Identity, bits: np.ndarray) -> None:
    """Every invariant of a checksummed checkpoint, as a flat run of checks."""
    epb = cp.extent_blocks
    extents = -(-ident.blocks // epb) if epb else 0
    tail = ident.blocks % 8
    if flags & ~_FLAG_CLEAN:
        raise _corrupt(f"unknown flags {flags:#x}")
    if epb < 8 or epb & (epb - 1):
        raise _corrupt(f"blocks per extent {epb} is not a power of two >= 8")
    if len(bits) != ident.bitmap_bytes:
        raise _corrupt(f"bitmap has {len(bits)} bytes, the disk needs {ident.bitmap_bytes}")
    if tail and bits[-1] >> tail:
        raise _corrupt("bits are set past the last block")
    if any(x >= extents for x in cp.hot) or len(set(cp.hot)) != len(cp.hot):
        raise _corrupt("hot extent list names an extent twice or past the disk")
    if cp.clean and cp.hot:
        raise _corrupt("a clean checkpoint lists hot extents")


def _replay_records(data: memoryview, cp: _Checkpoint, bits: np.ndarray, blocks: int) -> int:
    """Apply the AL records after the checkpoint to ``bits``; return how many were valid.

    A damaged record with no valid record after it is a torn tail (its write was never
    acknowledged: the fsync had not returned); one followed by valid records is
    corruption.
    """
    ebytes = cp.extent_blocks // 8
    size = _RECORD.size + ebytes + _SUM.size
    hot = set(cp.hot)
    extents = -(-blocks // cp.extent_blocks)
    pos, seq = cp.end + _SUM.size, cp.base_seq + 1
    if cp.clean and pos < len(data):
        raise _corrupt("records follow a clean checkpoint")
    while pos < len(data):
        rec = data[pos : pos + size]
        if not _record_intact(rec, size, cp.nonce):
            later = range(pos + size, len(data), size)
            if any(_record_intact(data[p : p + size], size, cp.nonce) for p in later):
                raise _corrupt(f"AL record at offset {pos} is damaged, later ones are not")
            break
        kind, rseq, extent, evicted = _RECORD.unpack_from(rec)
        if kind != _RECORD_ACTIVATE or rseq != seq or extent >= extents or extent in hot:
            raise _corrupt(f"AL record at offset {pos} is out of sequence or names a bad extent")
        if evicted != _NO_EXTENT:
            if evicted not in hot:
                raise _corrupt(f"AL record at offset {pos} evicts an extent that is not hot")
            lo = evicted * ebytes
            chunk = np.frombuffer(rec[_RECORD.size : _RECORD.size + ebytes], dtype=np.uint8)
            bits[lo : lo + ebytes] |= chunk[: len(bits[lo : lo + ebytes])]
            hot.discard(evicted)
        hot.add(extent)
        pos, seq = pos + size, seq + 1
    _dirty_extents(bits, hot, cp.extent_blocks, blocks)
    return seq - cp.base_seq - 1


def _record_intact(rec: memoryview, size: int, nonce: int) -> bool:
    if len(rec) < size:
        return False
    body = rec[: size - _SUM.size]
    return xxhash.xxh3_64_intdigest(body, seed=nonce) == _SUM.unpack_from(rec, len(body))[0]


def _dirty_extents(bits: np.ndarray, hot: set[int], extent_blocks: int, blocks: int) -> None:
    """Set every block of every hot extent: any of them may have been written."""
    for x in hot:
        first, end = x * extent_blocks, min((x + 1) * extent_blocks, blocks)
        lo, hi = first >> 3, -(-end // 8)
        bits[lo:hi] = 0xFF
    if blocks % 8 and len(bits):
        bits[-1] &= (1 << (blocks % 8)) - 1  # extents end on a byte except the last one


def _decode_state(data: bytes, ident: _Identity) -> _Loaded:
    """Recover the dirty bitmap from a state file's bytes; raise :class:`_Untrusted`."""
    mv = memoryview(data)
    cp, bits = _decode_checkpoint(mv, ident)
    _replay_records(mv, cp, bits, ident.blocks)
    return _Loaded(bits, cp.clean, cp.generation, cp.pending)


# --- loading (I/O) ----------------------------------------------------------------------


def _judge(loaded: _Loaded, *, untracked_writes: bool, generation: str | None) -> TrustState | None:
    """Return why a valid state is still untrusted, or None when it is trusted."""
    if loaded.pending is not None:
        return TrustState.of(loaded.pending, f"a resync for {loaded.pending} never committed")
    if untracked_writes:
        return TrustState.of(TrustReason.UNTRACKED_WRITES, "the caller reports untracked writes")
    digest = _generation_digest(generation)
    if loaded.clean and loaded.generation and digest and digest != loaded.generation:
        return TrustState.of(
            TrustReason.UNTRACKED_WRITES, "the disk changed after the tracker was closed"
        )
    return None


def _load(
    path: Path, ident: _Identity, *, untracked_writes: bool, generation: str | None
) -> tuple[TrustState, np.ndarray | None]:
    """Read and judge the state file; the bitmap is None when untrusted."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return TrustState.of(TrustReason.MISSING, f"{path} does not exist"), None
    except OSError as err:
        raise TrackingError(f"read tracking state {path}: {err.strerror or err}") from err
    try:
        loaded = _decode_state(data, ident)
    except _Untrusted as u:
        return u.state, None
    verdict = _judge(loaded, untracked_writes=untracked_writes, generation=generation)
    if verdict is not None:
        return verdict, None
    if loaded.clean:
        return TrustState.of(TrustReason.CLEAN, "closed cleanly"), loaded.bits
    return TrustState.of(TrustReason.RECOVERED, "unclean stop: hot extents added"), loaded.bits


def read_state(
    path: str | os.PathLike[str],
    *,
    disk_id: str,
    size: int,
    block_size: int = DEFAULT_BLOCK_SIZE,
    disk_generation: str | None = None,
    untracked_writes: bool = False,
) -> tuple[TrustState, np.ndarray | None]:
    """Return what :meth:`DirtyTracker.open` would recover, writing and locking nothing.

    The bitmap is packed (see :func:`dirty_blocks`), or None when untrusted. For
    diagnostics and tests; never use it while a tracker has the file open.
    """
    ident = _identity(disk_id, size, block_size)
    return _load(Path(path), ident, untracked_writes=untracked_writes, generation=disk_generation)


def _identity(disk_id: str, size: int, block_size: int) -> _Identity:
    check_block_size(block_size)
    if not disk_id or len(disk_id.encode()) > MAX_DISK_ID:
        raise UsageError(f"disk id must be 1 to {MAX_DISK_ID} bytes of UTF-8")
    if size < 0:
        raise UsageError(f"disk size {size} is negative")
    return _Identity(disk_id, size, block_size)


def _extent_blocks(block_size: int, extent_size: int | None) -> int:
    """Blocks per AL extent: a power of two, at least 8 so that extents are whole bytes."""
    size = extent_size or max(DEFAULT_EXTENT_SIZE, 8 * block_size)
    blocks = size // block_size
    if size % block_size or blocks < 8 or blocks & (blocks - 1) or size > 1 << 30:
        raise UsageError(
            f"extent size {size} must be a power-of-two multiple (>= 8) of the "
            f"block size {block_size}, at most 1 GiB"
        )
    return blocks


def _lock(path: Path) -> int:
    """Take the state's lock file; a second tracker on the same state would corrupt it."""
    lock_path = path.with_name(path.name + ".lock")
    try:
        return lock_exclusive(
            lock_path,
            lambda: TrackingBusyError(f"{path} is tracked by another process"),
            mode=0o600,
        )
    except OSError as err:
        raise TrackingError(f"lock {lock_path}: {err.strerror or err}") from err


def _tidy(path: Path, *, corrupt: bool) -> None:
    """Keep a corrupt state aside for analysis; drop temporaries of checkpoints cut short."""
    try:
        if corrupt:
            os.replace(path, path.with_name(path.name + ".corrupt"))
        for tmp in path.parent.glob(f".{path.name}.*.tmp"):
            tmp.unlink(missing_ok=True)
    except OSError as err:
        raise TrackingError(f"tidy tracking state {path}: {err.strerror or err}") from err


# --- the tracker ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TrackerStatistics:
    """Counters since open, and the current sizes of the dirty sets (in blocks)."""

    marks: int
    activations: int  # AL records written (cold marks)
    evictions: int
    fsyncs: int  # fsyncs of the AL (checkpoints not included)
    checkpoints: int
    dirty_blocks: int
    inflight_blocks: int
    hot_extents: int
    trusted: bool


class DirtyTracker:
    """A persistent, crash-safe dirty bitmap of one disk; see the module docstring.

    Create with :meth:`open`. All methods are thread-safe.
    """

    def __init__(
        self,
        path: Path,
        ident: _Identity,
        extent_blocks: int,
        al_slots: int,
        checkpoint_records: int,
        lock_fd: int,
        trust: TrustState,
    ) -> None:
        self.path = path
        self._ident = ident
        self._extent_blocks = extent_blocks
        self._shift = extent_blocks.bit_length() - 1
        self._slots = al_slots
        self._checkpoint_every = checkpoint_records
        self._lock_fd = lock_fd
        self._trust = trust
        self._pending = None if trust.trusted else trust.reason
        self._cond = threading.Condition()
        self._dirty = _Bits(ident.bitmap_bytes)
        self._inflight = _Bits(ident.bitmap_bytes)
        self._lru: OrderedDict[int, int] = OrderedDict()  # hot extent -> its record's seq
        self._fd = -1
        self._nonce = 0
        self._written = self._durable = self._records = 0
        self._syncing = self._closed = False
        self._broken: TrackingBrokenError | None = None
        self._epoch: Epoch | None = None
        self._epochs = 0
        self._stats = dict.fromkeys(("marks", "activations", "evictions", "fsyncs", "cps"), 0)

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        disk_id: str,
        size: int,
        block_size: int = DEFAULT_BLOCK_SIZE,
        extent_size: int | None = None,
        al_slots: int = DEFAULT_AL_SLOTS,
        checkpoint_records: int = DEFAULT_CHECKPOINT_RECORDS,
        untracked_writes: bool = False,
        disk_generation: str | None = None,
    ) -> tuple[DirtyTracker, TrustState]:
        """Open (or create) the state file ``path``; return the tracker and its trust.

        ``disk_id``, ``size`` and ``block_size`` are the disk's identity: a state file
        recorded for another one is untrusted. ``untracked_writes=True`` says the disk
        may have been written while nobody tracked it. ``disk_generation`` (from
        ``Disk.generation()``) is compared with the one stored at the last clean close.
        An untrusted tracker starts empty and tracks writes from now on; the caller
        resyncs by hash comparison in an epoch with ``full_resync`` set.
        Raises :class:`TrackingBusyError` when another process has the state open.
        """
        ident = _identity(disk_id, size, block_size)
        extent_blocks = _extent_blocks(block_size, extent_size)
        if not 1 <= al_slots <= 0xFFFF or checkpoint_records < 1:
            raise UsageError("al_slots must be in [1, 65535] and checkpoint_records >= 1")
        path = Path(path)
        lock_fd = _lock(path)
        try:
            trust, bits = _load(
                path, ident, untracked_writes=untracked_writes, generation=disk_generation
            )
            _tidy(path, corrupt=trust.reason is TrustReason.CORRUPT)
            tracker = cls(path, ident, extent_blocks, al_slots, checkpoint_records, lock_fd, trust)
            if bits is not None:
                tracker._dirty.view[:] = bits
            with tracker._cond:
                tracker._checkpoint()  # from here on, the file matches this tracker
        except BaseException:
            os.close(lock_fd)
            raise
        return tracker, trust

    # -- properties ----------------------------------------------------------------------

    @property
    def size(self) -> int:
        """The disk's size in bytes."""
        return self._ident.size

    @property
    def block_size(self) -> int:
        """Bytes per block (one bit each)."""
        return self._ident.block_size

    @property
    def extent_size(self) -> int:
        """Bytes per activity-log extent."""
        return self._extent_blocks * self._ident.block_size

    @property
    def trust(self) -> TrustState:
        """The current trust: as opened, until a full-resync epoch commits."""
        with self._cond:
            return self._trust

    # -- marking -------------------------------------------------------------------------

    def mark(self, offset: int, length: int) -> None:
        """Mark ``[offset, offset+length)`` dirty; return only once that is durable.

        Returns without I/O when every extent touched is already hot (and its AL record
        durable). Raises :class:`OutOfRangeError`, :class:`TrackingBrokenError`, and
        ``ValueError`` once the tracker is closed.
        """
        if offset < 0 or length < 0 or offset + length > self._ident.size:
            raise OutOfRangeError(
                f"mark [{offset}, {offset + length}) outside the disk of {self._ident.size} bytes"
            )
        if length == 0:
            return
        first = offset // self._ident.block_size
        end = (offset + length - 1) // self._ident.block_size + 1
        with self._cond:
            self._check_usable()
            self._stats["marks"] += 1
            self._dirty.set_range(first, end)
            need = 0
            for x in range(first >> self._shift, ((end - 1) >> self._shift) + 1):
                need = max(need, self._make_hot(x))
            self._wait_durable(need)

    def _make_hot(self, extent: int) -> int:
        """Ensure ``extent`` is in the AL; return the seq of the record that put it there."""
        while True:
            seq = self._lru.get(extent)
            if seq is not None:
                self._lru.move_to_end(extent)
                return seq
            if self._records < self._checkpoint_every:
                return self._activate(extent)
            self._checkpoint()  # the log is long enough: fold it (may wait; check again)

    def _activate(self, extent: int) -> int:
        """Append the AL record that makes ``extent`` hot, evicting the LRU extent if full."""
        evicted, bits = _NO_EXTENT, bytes(self._extent_blocks // 8)
        if len(self._lru) >= self._slots:
            evicted, _ = self._lru.popitem(last=False)
            bits = self._extent_bits(evicted)
            self._stats["evictions"] += 1
        seq = self._written + 1
        self._append(_encode_record(self._nonce, seq, extent, evicted, bits))
        self._written, self._records = seq, self._records + 1
        self._lru[extent] = seq
        self._stats["activations"] += 1
        return seq

    def _extent_bits(self, extent: int) -> bytes:
        """The extent's dirty and in-flight bits: both must survive its eviction."""
        size = self._extent_blocks // 8
        lo = extent * size
        chunk = self._dirty.view[lo : lo + size] | self._inflight.view[lo : lo + size]
        return chunk.tobytes().ljust(size, b"\0")

    def _append(self, record: bytes) -> None:
        view = memoryview(record)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as err:
            self._fail("append activity log record", err)

    def _wait_durable(self, seq: int) -> None:
        """Wait until the AL is fsynced up to ``seq``, fsyncing it ourselves if nobody is."""
        while self._durable < seq:
            self._check_usable()
            if self._syncing:
                self._cond.wait()
            else:
                self._sync_log()

    def _sync_log(self) -> None:
        # fsync without the lock: hot marks go on; the fsync covers every record written
        # before it started, so concurrent cold marks share it (group commit).
        self._syncing = True
        target, fd = self._written, self._fd
        failure: OSError | None = None
        self._cond.release()
        try:
            os.fsync(fd)
        except OSError as err:
            failure = err
        finally:
            self._cond.acquire()
            self._syncing = False
            self._cond.notify_all()
        if failure is not None:
            self._fail("fsync activity log", failure)
        self._stats["fsyncs"] += 1
        self._durable = max(self._durable, target)

    # -- checkpoints ---------------------------------------------------------------------

    def _checkpoint(self, *, clean: bool = False, generation: str | None = None) -> None:
        """Replace the state file with the whole in-memory state (lock held)."""
        while self._syncing:  # never swap the file under a running fsync
            self._cond.wait()
        if self._broken is not None:
            self._check_usable()
        cp = _Checkpoint(
            extent_blocks=self._extent_blocks,
            base_seq=self._written,
            nonce=secrets.randbits(64),
            clean=clean,
            generation=_generation_digest(generation),
            pending=self._pending,
            # A clean close folds nothing: every bit is in the bitmap, which is exact.
            hot=() if clean else tuple(self._lru),
            end=0,
        )
        data = _encode_checkpoint(self._ident, self._extent_blocks, cp, self._union())
        try:
            write_atomically(self.path, data, mode=0o600)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        except OSError as err:
            self._fail("write tracking checkpoint", err)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd, self._nonce, self._records = fd, cp.nonce, 0
        self._durable = self._written  # the checkpoint holds everything written so far
        self._stats["cps"] += 1
        self._cond.notify_all()

    def _union(self) -> np.ndarray:
        return self._dirty.view | self._inflight.view

    # -- epochs --------------------------------------------------------------------------

    def begin_epoch(self) -> Epoch:
        """Take the dirty set as a new epoch and start an empty one (atomic w.r.t. marks).

        The taken blocks stay dirty on disk until :meth:`Epoch.commit`. One epoch at a
        time: raises :class:`EpochError` while another is in flight.
        """
        with self._cond:
            self._check_usable()
            if self._epoch is not None:
                raise EpochError(f"epoch {self._epoch.number} is still in flight")
            self._dirty, self._inflight = self._inflight, self._dirty
            self._epochs += 1
            taken = self._inflight.view
            epoch = Epoch(self, self._epochs, full_resync=self._pending is not None)
            self._epoch = epoch
        # Safe without the lock: in-flight bits change only when this epoch ends.
        epoch._bitmap = taken.copy()
        epoch._bitmap.flags.writeable = False
        return epoch

    def _commit(self, epoch: Epoch) -> None:
        with self._cond:
            self._check_epoch(epoch)
            self._inflight.view[:] = 0
            self._epoch = None
            if epoch.full_resync:
                self._pending = None
                self._trust = TrustState.of(TrustReason.RESYNCED, f"epoch {epoch.number}")
            self._checkpoint()

    def _abort(self, epoch: Epoch) -> None:
        with self._cond:
            self._check_epoch(epoch)
            self._dirty.view |= self._inflight.view
            self._inflight.view[:] = 0
            self._epoch = None

    def _check_epoch(self, epoch: Epoch) -> None:
        self._check_usable()
        if self._epoch is not epoch:
            raise EpochError(f"epoch {epoch.number} is not in flight (committed or aborted)")

    # -- life cycle ----------------------------------------------------------------------

    def close(self, *, disk_generation: str | None = None) -> None:
        """Write the exact bitmap with the clean flag, then release the state; idempotent.

        ``disk_generation`` (``Disk.generation()`` after the last write and flush) lets
        the next open detect writes made while untracked. A broken tracker writes
        nothing: its file recovers as after a crash.
        """
        with self._cond:
            if self._closed:
                return
            try:
                if self._broken is None:
                    self._checkpoint(clean=True, generation=disk_generation)
            finally:
                self._release()

    def abandon(self) -> None:
        """Release the state without writing anything, as a crash would (tests, fatal errors)."""
        with self._cond:
            if not self._closed:
                self._release()

    def _release(self) -> None:
        while self._syncing:
            self._cond.wait()
        self._closed = True
        for fd in (self._fd, self._lock_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fd = self._lock_fd = -1
        self._cond.notify_all()

    def _check_usable(self) -> None:
        if self._closed:
            raise ValueError(f"{self.path}: tracker is closed")
        if self._broken is not None:
            raise TrackingBrokenError(self._broken.message) from self._broken

    def _fail(self, context: str, err: OSError) -> NoReturn:
        """Mark the tracker broken: after a failed write or fsync nothing is certain."""
        self._broken = TrackingBrokenError(
            f"{context} {self.path}: {err.strerror or err}",
            hint="writes are refused; reopen the tracker (it recovers as after a crash)",
        )
        self._broken.__cause__ = err
        self._cond.notify_all()
        raise self._broken from err

    def statistics(self) -> TrackerStatistics:
        """Return counters and the current dirty-set sizes."""
        with self._cond:
            s = self._stats
            return TrackerStatistics(
                marks=s["marks"],
                activations=s["activations"],
                evictions=s["evictions"],
                fsyncs=s["fsyncs"],
                checkpoints=s["cps"],
                dirty_blocks=self._dirty.count(),
                inflight_blocks=self._inflight.count(),
                hot_extents=len(self._lru),
                trusted=self._trust.trusted,
            )

    def __enter__(self) -> DirtyTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Epoch:
    """The dirty set taken by :meth:`DirtyTracker.begin_epoch`, until commit or abort.

    ``full_resync`` is True when the tracker was untrusted at begin: the caller MUST
    then resync the whole disk by hash comparison, not only :meth:`blocks`; committing
    such an epoch makes the tracker trusted again.
    """

    def __init__(self, tracker: DirtyTracker, number: int, *, full_resync: bool) -> None:
        self.number = number
        self.full_resync = full_resync
        self.block_size = tracker.block_size
        self._tracker = tracker
        self._bitmap: np.ndarray = np.zeros(0, dtype=np.uint8)

    @property
    def bitmap(self) -> np.ndarray:
        """The taken set as a read-only packed bitmap (block i = bit i & 7 of byte i >> 3)."""
        return self._bitmap

    def blocks(self) -> np.ndarray:
        """Return the sorted int64 indexes of the taken blocks."""
        return dirty_blocks(self._bitmap)

    def runs(self, max_blocks: int) -> Iterator[tuple[int, int]]:
        """Yield ``(first block, count)`` runs of taken blocks, each at most ``max_blocks``.

        Read from the bitmap a piece at a time: no index array of the whole set.
        """
        return bitmap_runs(self._bitmap, max_blocks)

    def count(self) -> int:
        """Return how many blocks were taken."""
        return int(_POPCOUNT[self._bitmap].sum(dtype=np.int64))

    def commit(self) -> None:
        """Clear the taken blocks durably: call only once the target PERSISTED all of them."""
        self._tracker._commit(self)

    def abort(self) -> None:
        """Give the taken blocks back to the dirty set (no I/O)."""
        self._tracker._abort(self)

    def __enter__(self) -> Epoch:
        return self

    def __exit__(self, *exc: object) -> None:
        """Abort unless committed or aborted already."""
        if self._tracker._epoch is self:
            with contextlib.suppress(ValueError, EpochError, TrackingBrokenError):
                self.abort()


# --- the disk wrapper -------------------------------------------------------------------


class TrackedDisk(Disk):
    """A :class:`Disk` whose writes are marked in a :class:`DirtyTracker` first.

    Every write is marked *before* it is issued: a write that reached the disk (even
    partly, even if the process dies before it returns) is then dirty on disk. It is
    marked again *after* it returns: an epoch begun while the write was in flight may
    have read the old content, so the block must stay dirty for the next epoch.
    """

    def __init__(self, disk: Disk, tracker: DirtyTracker, trust: TrustState | None = None):
        if tracker.size != disk.virtual_size:
            raise UsageError(
                f"tracker covers {tracker.size} bytes, disk {disk.path} has {disk.virtual_size}"
            )
        super().__init__(disk.path, disk.virtual_size, writable=disk.writable)
        self.format_name = disk.format_name
        self.disk = disk
        self.tracker = tracker
        self.trust = trust or tracker.trust

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        state_dir: str | os.PathLike[str],
        *,
        disk_id: str | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        format: str | None = None,
        untracked_writes: bool = False,
        **options: int,
    ) -> TrackedDisk:
        """Open ``path`` for writing, tracked in ``state_dir/tracking.cbt``.

        ``disk_id`` defaults to the disk's real path. ``options`` go to
        :meth:`DirtyTracker.open` (``extent_size``, ``al_slots``, ``checkpoint_records``).
        Check ``.trust`` before trusting the bitmap.
        """
        path = os.fspath(path)
        disk = open_disk(path, writable=True, format=format)
        try:
            state = Path(state_dir)
            if not state.is_dir():
                state.mkdir(parents=True)
                fsync_dir(state.parent)  # else a power cut may lose the new directory
            tracker, trust = DirtyTracker.open(
                state / STATE_FILE,
                disk_id=disk_id or os.path.realpath(path),
                size=disk.virtual_size,
                block_size=block_size,
                untracked_writes=untracked_writes,
                disk_generation=disk.generation(),
                **options,  # type: ignore[arg-type]
            )
        except BaseException:
            disk.close()
            raise
        return cls(disk, tracker, trust)

    def _read_into(self, offset: int, view: memoryview) -> None:
        self.disk.read_into(offset, view)

    def _write(self, offset: int, view: memoryview) -> None:
        # Mark, write, mark again: see the class docstring (and design.md, race C1).
        self.tracker.mark(offset, len(view))
        self.disk.write(offset, view)
        self.tracker.mark(offset, len(view))

    def _write_zeroes(self, offset: int, length: int) -> None:
        self.tracker.mark(offset, length)
        self.disk.write_zeroes(offset, length)
        self.tracker.mark(offset, length)

    def _flush(self) -> None:
        self.disk.flush()

    def _extents(self) -> Iterator[Extent]:
        return self.disk.extents()

    def generation(self) -> str | None:
        return self.disk.generation()

    def mark_generation(self) -> str | None:
        return self.disk.mark_generation()

    def info(self) -> DiskInfo:
        return self.disk.info()

    def _close(self) -> None:
        # Flush and stamp first: the generation stored at a clean close must be the
        # one after our last write, so that any later write is noticed at open.
        generation = None
        try:
            if self.disk.writable:
                self.disk.flush()
                generation = self.disk.mark_generation()
        finally:
            try:
                self.tracker.close(disk_generation=generation)
            finally:
                self.disk.close()

    def __enter__(self) -> TrackedDisk:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

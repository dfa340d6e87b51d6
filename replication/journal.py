"""The retention journal of one volume: undo records and recovery points.

Theory of operation
-------------------
The journal lives beside a live volume of the master target. Before a range of the
volume is overwritten, the bytes it holds are appended as an *undo record*
(:meth:`Journal.record_undo`, or :meth:`Journal.preserve` which reads them). A
*recovery point* (:meth:`Journal.add_point`) is a record in the same sequence: the
volume as it was when the point was added. Every record has a log sequence number
(LSN), contiguous over the journal's life; a point's id is its LSN.

The volume at point ``P`` is the live volume with every undo record newer than
``P`` applied newest first (:meth:`Journal.undo_records_after`); equivalently, for
each byte, the *oldest* undo record after ``P`` that covers it
(:meth:`Journal.image_changes`, which yields each byte once). So only the first
undo of a range after each point matters: :meth:`Journal.uncovered` tells which
parts of a write still need one (a resync that rewrites a range twice journals it
once), and resets at every point.

Write-ahead rule (``J1`` in ``docs/journal.md``)
------------------------------------------------
An undo record MUST be durable (:meth:`Journal.sync`) before the volume write it
covers is *issued*, not merely before the volume is flushed: the kernel may write a
dirty page of the volume back at any moment, and a volume block that reached the
disk without its undo record would make every earlier point silently wrong. Batch:
preserve a batch of writes, one sync, then write the batch.

Crash rules
-----------
Files are ``journal-NNNNNNNN.seg`` segments (a header naming the volume and the
journal id, then records back to back), ``journal.lock`` (``flock``) and, during an
in-place rollback only, ``rollback.json``. Each record carries a checksum and
``synced``: how many bytes of its segment were known fsynced when it was written. A
segment is fsynced before the next one is created, and a new segment's header is
fsynced before any record goes into it. At open:

* a record in the last segment that does not parse is a *torn tail* (a crash
  during an append that was never synced): it and everything after it are cut off
  and reported (:attr:`Journal.recovery`), unless a later valid record's
  ``synced`` proves those bytes had been fsynced;
* any other bad record, or a bad record in an earlier segment, is
  :class:`~replication.errors.JournalCorruptError` naming the file and offset:
  nothing is skipped silently.

Retention (:meth:`Journal.prune`) drops whole segments from the oldest end, only
when every record in them is older than the oldest point kept; the newest point
and everything after it are never dropped, even past the size bound.

In-place rollback (:meth:`Journal.rollback`) discards every point after the target:
there is no redo. To look at a later point without losing it, restore into a copy
(:meth:`Journal.restore_into`).
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import errno
import json
import os
import re
import secrets
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import BinaryIO, Final

import numpy as np
import xxhash
import zstandard

from .disks.base import Disk
from .durable import fsync_dir, lock_exclusive, write_atomically
from .errors import (
    DiskSizeMismatchError,
    JournalBusyError,
    JournalCorruptError,
    JournalDiskFullError,
    JournalError,
    PointNotFoundError,
    UsageError,
)
from .faults import crash_point

__all__ = [
    "DEFAULT_RETENTION_SECONDS",
    "DEFAULT_SEGMENT_BYTES",
    "RECORD_HEADER_SIZE",
    "Journal",
    "JournalStats",
    "PointInfo",
    "PruneResult",
    "RecoveryReport",
    "UndoRecord",
]

SEGMENT_MAGIC: Final = b"RPLJSEG\0"
RECORD_MAGIC: Final = b"RPLJ"
VERSION: Final = 1
SUPPORTED_VERSIONS: Final = (1,)
TYPE_UNDO: Final = 1
TYPE_POINT: Final = 2
FLAG_ZSTD: Final = 0x01
KINDS: Final = {"crash": 1, "app": 2}
_KIND_NAMES: Final = {v: k for k, v in KINDS.items()}
ZSTD_LEVEL: Final = 1
DEFAULT_SEGMENT_BYTES: Final = 64 << 20
DEFAULT_RETENTION_SECONDS: Final = 24 * 3600.0
#: undo data per record: the writer splits larger ranges; the reader accepts up to MAX
UNDO_CHUNK: Final = 4 << 20
#: zero-range frames cached per journal (one per length met; lengths are few)
_ZERO_FRAMES_KEPT: Final = 16
MAX_UNDO_LENGTH: Final = 64 << 20
MAX_NAME: Final = 255
LOCK_FILE: Final = "journal.lock"
ROLLBACK_FILE: Final = "rollback.json"

#: magic, version, reserved, volume length, header length, journal id, number, first lsn
_SEGMENT = struct.Struct(">8sBBHI16sQQ")
_CHECKSUM = struct.Struct(">Q")
SEGMENT_FIXED_SIZE: Final = _SEGMENT.size + _CHECKSUM.size  # 56 + volume name
#: magic, version, type, flags, reserved, record length, reserved, lsn, synced
_RECORD = struct.Struct(">4sBBBBIIQQ")
RECORD_HEADER_SIZE: Final = _RECORD.size + _CHECKSUM.size  # 40
#: volume offset, length, stored length
_UNDO = struct.Struct(">QII")
#: time ns, kind, reserved, group length, tag length, reserved, manifest root
_POINT = struct.Struct(">QBBHHH32s")
_SEGMENT_RE = re.compile(r"journal-(\d{8,})\.seg")

assert SEGMENT_FIXED_SIZE == 56 and RECORD_HEADER_SIZE == 40
assert _UNDO.size == 16 and _POINT.size == 48


def _new_journal_id() -> bytes:
    """A fresh random journal id (module function: fixtures replace it)."""
    return secrets.token_bytes(16)


# --- public records -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PointInfo:
    """A recovery point: ``id`` is its LSN in the volume's journal."""

    id: int
    time_ns: int
    kind: str  # "crash" | "app"
    tag: str
    group: str  # the group cut id shared by the points of one multi-volume cut
    manifest_root: str  # hex SHA-256 root of the point's manifest

    @property
    def time(self) -> float:
        """Seconds since the epoch, from the journal's clock."""
        return self.time_ns / 1e9


@dataclass(frozen=True, slots=True)
class UndoRecord:
    """The bytes ``data`` that ``[offset, offset + len(data))`` held before a write."""

    lsn: int
    offset: int
    data: bytes


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    """What :meth:`Journal.open` had to repair: a torn tail cut off, a rollback pending."""

    truncated_file: str | None = None
    truncated_at: int = 0
    dropped_bytes: int = 0
    reason: str = ""
    pending_rollback: int | None = None


@dataclass(frozen=True, slots=True)
class PruneResult:
    """What :meth:`Journal.prune` dropped; ``over_budget`` if the size bound is not met."""

    dropped_segments: int
    dropped_points: int
    freed_bytes: int
    oldest_kept: PointInfo | None
    over_budget: bool


@dataclass(frozen=True, slots=True)
class JournalStats:
    """Size and content of a journal (:meth:`Journal.statistics`)."""

    segments: int
    bytes: int
    points: int
    next_lsn: int


# --- byte layouts (docs/journal.md) ---------------------------------------------------


class _BadRecord(Exception):
    """Internal: the bytes at an offset are not one whole valid record or header."""


@dataclass(frozen=True, slots=True)
class _SegmentHeader:
    volume: str
    journal_id: bytes
    number: int
    first_lsn: int
    length: int


@dataclass(frozen=True, slots=True)
class _Head:
    type: int
    flags: int
    length: int
    lsn: int
    synced: int
    checksum: int


def encode_segment_header(volume: str, journal_id: bytes, number: int, first_lsn: int) -> bytes:
    """Return the header of segment ``number``, whose first record will be ``first_lsn``."""
    name = volume.encode()
    hlen = SEGMENT_FIXED_SIZE + len(name)
    fixed = _SEGMENT.pack(SEGMENT_MAGIC, VERSION, 0, len(name), hlen, journal_id, number, first_lsn)
    return fixed + _CHECKSUM.pack(xxhash.xxh3_64_intdigest(fixed + name)) + name


def parse_segment_header(buf: bytes | memoryview) -> _SegmentHeader:
    """Parse and check a segment header; raise _BadRecord if it cannot be one."""
    if len(buf) < SEGMENT_FIXED_SIZE:
        raise _BadRecord("short segment header")
    magic, version, reserved, vlen, hlen, jid, number, first_lsn = _SEGMENT.unpack_from(buf)
    if magic != SEGMENT_MAGIC or version not in SUPPORTED_VERSIONS or reserved:
        raise _BadRecord("bad segment magic or version")
    if first_lsn == 0:
        raise _BadRecord("segment first lsn is 0")
    if not 0 < vlen <= MAX_NAME or hlen != SEGMENT_FIXED_SIZE + vlen or len(buf) < hlen:
        raise _BadRecord("bad segment header length")
    name = bytes(buf[SEGMENT_FIXED_SIZE:hlen])
    (checksum,) = _CHECKSUM.unpack_from(buf, _SEGMENT.size)
    if xxhash.xxh3_64_intdigest(bytes(buf[: _SEGMENT.size]) + name) != checksum:
        raise _BadRecord("segment header checksum mismatch")
    return _SegmentHeader(_decode_name(name), bytes(jid), number, first_lsn, hlen)


def encode_record(rtype: int, flags: int, lsn: int, synced: int, body: bytes) -> bytes:
    """Return one record: header, checksum (XXH3-64 of header bytes 0..31 and body), body."""
    head = _RECORD.pack(
        RECORD_MAGIC, VERSION, rtype, flags, 0, RECORD_HEADER_SIZE + len(body), 0, lsn, synced
    )
    h = xxhash.xxh3_64(head)
    h.update(body)
    return head + _CHECKSUM.pack(h.intdigest()) + body


def _parse_head(buf: bytes | memoryview) -> _Head:
    """Parse a record header; raise _BadRecord if it cannot be one."""
    if len(buf) < RECORD_HEADER_SIZE:
        raise _BadRecord("short record header")
    magic, version, rtype, flags, res1, length, res2, lsn, synced = _RECORD.unpack_from(buf)
    if magic != RECORD_MAGIC or version not in SUPPORTED_VERSIONS or res1 or res2:
        raise _BadRecord("bad record magic, version or reserved field")
    if rtype not in (TYPE_UNDO, TYPE_POINT) or flags & ~(FLAG_ZSTD if rtype == TYPE_UNDO else 0):
        raise _BadRecord(f"bad record type {rtype} or flags {flags:#x}")
    if length < RECORD_HEADER_SIZE or lsn == 0:
        raise _BadRecord("bad record length or lsn")
    (checksum,) = _CHECKSUM.unpack_from(buf, _RECORD.size)
    return _Head(rtype, flags, length, lsn, synced, checksum)


def _check_body(buf: bytes | memoryview, head: _Head) -> memoryview:
    """Verify the whole record (``buf`` starts at its header); return its body."""
    mv = memoryview(buf)
    if len(mv) < head.length:
        raise _BadRecord("record runs past the end of the file")
    h = xxhash.xxh3_64(mv[: _RECORD.size])
    body = mv[RECORD_HEADER_SIZE : head.length]
    h.update(body)
    if h.intdigest() != head.checksum:
        raise _BadRecord("record checksum mismatch")
    if head.type == TYPE_UNDO:
        _undo_fields(head, body)
    return body


def _undo_fields(head: _Head, body: memoryview) -> tuple[int, int, int]:
    if len(body) < _UNDO.size:
        raise _BadRecord("short undo record")
    offset, length, stored = _UNDO.unpack_from(body)
    if not 0 < length <= MAX_UNDO_LENGTH or stored != len(body) - _UNDO.size:
        raise _BadRecord("undo lengths do not match the record")
    if not head.flags & FLAG_ZSTD and stored != length:
        raise _BadRecord("raw undo data length mismatch")
    return offset, length, stored


def encode_undo_body(
    offset: int,
    old: bytes | memoryview,
    compressor: zstandard.ZstdCompressor,
    zeros: dict[int, bytes] | None = None,
) -> tuple[int, bytes]:
    """Return ``(flags, body)`` of an undo record; zstd only if it is strictly smaller.

    ``zeros`` caches the frame of an all-zero range per length (the same
    compressor gives the same bytes): the undo of a hole, the common case when a
    volume is filled for the first time, then costs a zero check, not a copy and
    a compression of its zeros.
    """
    view = memoryview(old).cast("B")
    if zeros is not None and _is_zero(view):
        packed = zeros.get(len(view))
        if packed is None:
            if len(zeros) >= _ZERO_FRAMES_KEPT:
                zeros.clear()
            packed = zeros[len(view)] = compressor.compress(bytes(len(view)))
    else:
        packed = compressor.compress(view)  # reads the buffer: no copy of it first
    if len(packed) < len(view):
        return FLAG_ZSTD, _UNDO.pack(offset, len(view), len(packed)) + packed
    return 0, _UNDO.pack(offset, len(view), len(view)) + bytes(view)


def _is_zero(view: memoryview) -> bool:
    """Whether every byte is zero; data that is not usually shows it at either end."""
    if not view or view[0] or view[-1]:
        return not view
    wide = len(view) % 8 == 0  # 8-byte words are faster to test
    return not np.frombuffer(view, dtype=np.uint64 if wide else np.uint8).any()


def decode_undo(head: _Head, body: memoryview) -> UndoRecord:
    """Return the undo record of a checked record body; raise _BadRecord if it is not one."""
    offset, length, _ = _undo_fields(head, body)
    data = bytes(body[_UNDO.size :])
    if head.flags & FLAG_ZSTD:
        if zstandard.frame_content_size(data) != length:
            raise _BadRecord("zstd frame content size differs from the undo length")
        try:
            data = zstandard.ZstdDecompressor().decompress(data, max_output_size=length)
        except zstandard.ZstdError as err:
            raise _BadRecord(f"zstd: {err}") from err
        if len(data) != length:
            raise _BadRecord("zstd output length differs from the undo length")
    return UndoRecord(head.lsn, offset, data)


def encode_point_body(time_ns: int, kind: str, group: str, tag: str, root: bytes) -> bytes:
    """Return the body of a point record."""
    g, t = group.encode(), tag.encode()
    return _POINT.pack(time_ns, KINDS[kind], 0, len(g), len(t), 0, root) + g + t


def decode_point(lsn: int, body: memoryview) -> PointInfo:
    """Return the point of a checked record body; raise _BadRecord if it is not one."""
    if len(body) < _POINT.size:
        raise _BadRecord("short point record")
    time_ns, kind, res1, glen, tlen, res2, root = _POINT.unpack_from(body)
    names = _KIND_NAMES
    if kind not in names or res1 or res2 or glen > MAX_NAME or tlen > MAX_NAME:
        raise _BadRecord("bad point kind, reserved field or name length")
    if len(body) != _POINT.size + glen + tlen:
        raise _BadRecord("point lengths do not match the record")
    group = _decode_name(bytes(body[_POINT.size : _POINT.size + glen]))
    tag = _decode_name(bytes(body[_POINT.size + glen :]))
    return PointInfo(lsn, time_ns, names[kind], tag, group, root.hex())


def _decode_name(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _BadRecord("name is not UTF-8") from err


# --- ranges ----------------------------------------------------------------------------


class _RangeSet:
    """Disjoint half-open byte ranges, merged on insert."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []

    def gaps(self, start: int, end: int) -> list[tuple[int, int]]:
        """Return the parts of ``[start, end)`` not in the set, in order."""
        out = []
        i = bisect.bisect_right(self._ends, start)
        pos = start
        while i < len(self._starts) and self._starts[i] < end:
            if self._starts[i] > pos:
                out.append((pos, self._starts[i]))
            pos = max(pos, self._ends[i])
            i += 1
        if pos < end:
            out.append((pos, end))
        return out

    def add(self, start: int, end: int) -> None:
        """Add ``[start, end)``, merging with touching or overlapping ranges."""
        i = bisect.bisect_left(self._ends, start)
        j = bisect.bisect_right(self._starts, end)
        if i < j:
            start, end = min(start, self._starts[i]), max(end, self._ends[j - 1])
        self._starts[i:j] = [start]
        self._ends[i:j] = [end]


# --- the journal -------------------------------------------------------------------------


@dataclass(slots=True)
class _Segment:
    number: int
    path: Path
    header_length: int
    size: int = 0
    first_lsn: int = 0  # 0: no record yet
    last_lsn: int = 0
    points: list[PointInfo] = field(default_factory=list)
    point_ends: dict[int, int] = field(default_factory=dict)  # point id -> end offset


def _segment_name(number: int) -> str:
    return f"journal-{number:08d}.seg"


def _is_enospc(err: OSError) -> bool:
    return err.errno in (errno.ENOSPC, errno.EDQUOT)


class Journal:
    """The undo journal and recovery points of one volume, in one directory.

    Not thread-safe: one owner (the master target's applier thread) calls it.
    """

    def __init__(
        self,
        directory: Path,
        volume: str,
        *,
        clock: Callable[[], float],
        segment_bytes: int,
        retention_seconds: float,
        retention_bytes: int,
    ) -> None:
        """Use :meth:`open`."""
        self._dir = directory
        self._volume = volume
        self._clock = clock
        self._segment_bytes = segment_bytes
        self.retention_seconds = retention_seconds
        self.retention_bytes = retention_bytes
        self._segments: dict[int, _Segment] = {}
        self._journal_id: bytes | None = None
        self._next_lsn = 1  # of the next record appended
        self._active: _Segment | None = None
        self._fd: int | None = None
        self._sync_point = (0, 0)  # (segment number, bytes known fsynced)
        self._dirty = False
        self._broken: str | None = None
        self._lock_fd: int | None = None
        self._covered = _RangeSet()
        self._zstd = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True)
        self._zero_frames: dict[int, bytes] = {}  # see encode_undo_body
        self._recovery = RecoveryReport()
        self._pending_rollback: int | None = None

    # --- opening and closing ------------------------------------------------------------

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike[str],
        *,
        volume: str,
        retention_bytes: int,
        retention_seconds: float = DEFAULT_RETENTION_SECONDS,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        clock: Callable[[], float] = time.time,
    ) -> Journal:
        """Open (creating if needed) the journal of ``volume`` in ``directory``.

        A torn tail is cut off and reported in :attr:`recovery`; damage before it
        raises JournalCorruptError; another open instance JournalBusyError; a journal
        of another volume JournalError.
        """
        if not 0 < len(volume.encode()) <= MAX_NAME:
            raise UsageError(f"volume name must be 1..{MAX_NAME} UTF-8 bytes")
        if segment_bytes < 4096 or retention_bytes < 0 or retention_seconds < 0:
            raise UsageError("segment_bytes >= 4096; retention limits must not be negative")
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        journal = cls(
            path,
            volume,
            clock=clock,
            segment_bytes=segment_bytes,
            retention_seconds=retention_seconds,
            retention_bytes=retention_bytes,
        )
        journal._lock()
        try:
            journal._recover()
        except BaseException as err:
            journal._close_active()
            journal._unlock()
            if isinstance(err, OSError):
                raise journal._io_error(f"open journal {path}", err) from err
            raise
        return journal

    def close(self) -> None:
        """Sync and release the directory. Idempotent."""
        if self._lock_fd is None:
            return
        try:
            if self._broken is None:
                self.sync()
        finally:
            self._close_active()
            self._unlock()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _lock(self) -> None:
        self._lock_fd = lock_exclusive(
            self._dir / LOCK_FILE,
            lambda: JournalBusyError(f"journal {self._dir} is open in another process"),
        )

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _close_active(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd = None
        self._active = None

    # --- properties ---------------------------------------------------------------------

    @property
    def volume(self) -> str:
        """The volume this journal belongs to."""
        return self._volume

    @property
    def recovery(self) -> RecoveryReport:
        """What the last :meth:`open` repaired (nothing, for a clean journal)."""
        return self._recovery

    def statistics(self) -> JournalStats:
        """Return the journal's segment count, bytes, point count and next LSN."""
        return JournalStats(
            segments=len(self._segments),
            bytes=self._total_bytes(),
            points=sum(len(s.points) for s in self._segments.values()),
            next_lsn=self._next_lsn,
        )

    # --- writing ----------------------------------------------------------------------------

    def record_undo(self, offset: int, old: bytes | bytearray | memoryview) -> int:
        """Append undo records for ``old``, the bytes at ``offset`` before a write.

        Not durable until :meth:`sync`; the volume write MUST NOT be issued before
        (rule J1). Ranges over 4 MiB are split. Returns the last LSN written.
        """
        self._check_writable()
        view = memoryview(old).cast("B")
        if offset < 0 or offset + len(view) >= 1 << 64:
            raise UsageError(f"undo range at offset {offset} is outside 0..2^64")
        for start in range(0, len(view), UNDO_CHUNK):
            flags, body = encode_undo_body(
                offset + start, view[start : start + UNDO_CHUNK], self._zstd, self._zero_frames
            )
            self._append(TYPE_UNDO, flags, body)
        crash_point("journal.appended")
        if len(view):
            self._covered.add(offset, offset + len(view))
        return self._next_lsn - 1

    def uncovered(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Return ``(offset, length)`` parts of a range not yet journaled since the last point.

        Only those need an undo record before they are overwritten. Forgotten at
        reopen (everything is journaled again: harmless, only larger).
        """
        return [(s, e - s) for s, e in self._covered.gaps(offset, offset + length)]

    def preserve(self, disk: Disk, offset: int, length: int) -> int:
        """Journal the current bytes of ``disk`` in a range about to be overwritten.

        Reads and records only the :meth:`uncovered` parts; returns the bytes journaled.
        Call :meth:`sync` before writing the range (rule J1).
        """
        total = 0
        for start, size in self.uncovered(offset, length):
            for pos in range(start, start + size, UNDO_CHUNK):
                n = min(UNDO_CHUNK, start + size - pos)
                self.record_undo(pos, disk.read(pos, n))
                total += n
        return total

    def sync(self) -> None:
        """Make every record appended so far durable (fsync).

        After a failed fsync the journal refuses everything until it is reopened:
        the kernel may have dropped the unsynced pages.
        """
        self._check_usable()
        if not self._dirty:
            return
        assert self._fd is not None and self._active is not None
        try:
            os.fsync(self._fd)
        except OSError as err:
            self._broken = f"fsync {self._active.path}: {err}"
            raise self._io_error(f"fsync {self._active.path}", err) from err
        self._sync_point = (self._active.number, self._active.size)
        crash_point("journal.synced")
        self._dirty = False

    def add_point(
        self, kind: str, *, manifest_root: str, tag: str = "", group: str = ""
    ) -> PointInfo:
        """Append a recovery point of the volume as it is now, sync, and return it.

        Call it after the volume is flushed (``Applier.commit``) and after the
        manifest ``manifest_root`` is stored. Point times never go backwards: a clock
        that steps back gives the previous point's time.
        """
        self._check_writable()
        if kind not in KINDS:
            raise UsageError(f"point kind must be one of {sorted(KINDS)}, not {kind!r}")
        if not re.fullmatch(r"[0-9a-f]{64}", manifest_root):
            raise UsageError("manifest_root must be 64 lower-case hex digits")
        for name in (tag, group):
            if len(name.encode()) > MAX_NAME:
                raise UsageError(f"tag and group must be at most {MAX_NAME} UTF-8 bytes")
        points = self.points()
        now = max(round(self._clock() * 1e9), points[-1].time_ns if points else 0)
        body = encode_point_body(now, kind, group, tag, bytes.fromhex(manifest_root))
        self._append(TYPE_POINT, 0, body)
        self.sync()
        self._covered = _RangeSet()
        return self.points()[-1]

    def _append(self, rtype: int, flags: int, body: bytes) -> None:
        length = RECORD_HEADER_SIZE + len(body)
        active = self._active
        assert active is not None
        if active.size > active.header_length and active.size + length > self._segment_bytes:
            self._roll()
            active = self._active
            assert active is not None
        lsn = self._next_lsn
        synced = self._sync_point[1] if self._sync_point[0] == active.number else 0
        self._write_all(active, encode_record(rtype, flags, lsn, synced, body))
        offset, active.size = active.size, active.size + length
        self._index(active, rtype, lsn, memoryview(body), offset)
        self._dirty = True

    def _write_all(self, active: _Segment, record: bytes) -> None:
        """Write the whole record or, on error, nothing (the file is cut back)."""
        assert self._fd is not None
        view = memoryview(record)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as err:
            try:
                os.ftruncate(self._fd, active.size)
            except OSError as cut:
                self._broken = f"cannot cut back {active.path}: {cut}"
            raise self._io_error(f"write {active.path}", err) from err

    def _roll(self) -> None:
        """Close the active segment durably and start the next one."""
        # Only the last segment may end torn after a crash: this one must be complete
        # on disk before any byte goes to the next.
        self.sync()
        number = self._active.number + 1 if self._active else 1
        self._close_active()
        try:
            self._create_segment(number)
        except JournalError as err:
            self._broken = f"no active segment: {err.message}"
            raise

    def _create_segment(self, number: int) -> None:
        """Create a segment and make its header and directory entry durable."""
        assert self._journal_id is not None
        path = self._dir / _segment_name(number)
        header = encode_segment_header(self._volume, self._journal_id, number, self._next_lsn)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        except OSError as err:
            raise self._io_error(f"create {path}", err) from err
        try:
            os.write(fd, header)
            os.fsync(fd)
            fsync_dir(self._dir)
        except OSError as err:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise self._io_error(f"create {path}", err) from err
        segment = _Segment(number, path, len(header), size=len(header))
        self._segments[number] = segment
        self._active, self._fd = segment, fd
        self._sync_point = (number, len(header))

    def _io_error(self, context: str, err: OSError) -> JournalError:
        if _is_enospc(err):
            return JournalDiskFullError(f"{context}: no space left on device")
        return JournalError(f"{context}: {err.strerror or err}")

    def _check_usable(self) -> None:
        if self._lock_fd is None:
            raise UsageError("journal is closed")
        if self._broken is not None:
            raise JournalError(f"journal needs to be reopened: {self._broken}")

    def _check_writable(self) -> None:
        self._check_usable()
        if self._pending_rollback is not None:
            raise JournalError(
                f"a rollback to point {self._pending_rollback} is unfinished",
                hint="call rollback() with that point again",
            )

    # --- reading ----------------------------------------------------------------------------

    def points(self) -> list[PointInfo]:
        """Every point that can still be restored, oldest first."""
        return [p for n in sorted(self._segments) for p in self._segments[n].points]

    def find(self, spec: str | int | float | datetime) -> PointInfo:
        """Return the point that ``spec`` names; raise PointNotFoundError if none.

        ``spec``: ``"latest"``, ``"latest-app"``, ``"latest-crash"``; an id (int, or
        ``"123"`` / ``"id:123"``); ``"group:<cut id>"``; ``"tag:<name>"`` (the newest
        with that tag); a time (float seconds, datetime, or an ISO 8601 string): the
        latest point at or before it.
        """
        points = self.points()
        match = _find(points, spec)
        if match is None:
            raise PointNotFoundError(f"no recovery point of {self._volume!r} matches {spec!r}")
        return match

    def undo_records_after(self, point: PointInfo | int) -> Iterator[UndoRecord]:
        """Yield every undo record newer than ``point``, newest first.

        Applying them in that order to a copy of the live volume gives the volume at
        ``point``. The records are those present when iteration starts.
        """
        self._check_usable()
        after = self._resolve(point).id
        for segment in self._later_segments(after)[::-1]:
            with self._reader(segment) as f:
                for offset, head in self._undo_heads(f, segment, after)[::-1]:
                    yield self._read_undo(f, segment, offset, head)

    def image_changes(self, point: PointInfo | int) -> Iterator[tuple[int, bytes]]:
        """Yield ``(offset, bytes)`` that turn the live volume into the volume at ``point``.

        Each byte comes at most once: the oldest undo record after the point wins.
        """
        self._check_usable()
        after = self._resolve(point).id
        done = _RangeSet()
        for segment in self._later_segments(after):
            with self._reader(segment) as f:
                for offset, head in self._undo_heads(f, segment, after):
                    record = self._read_undo(f, segment, offset, head)
                    end = record.offset + len(record.data)
                    for start, stop in done.gaps(record.offset, end):
                        rel = start - record.offset
                        yield start, record.data[rel : rel + stop - start]
                    done.add(record.offset, end)

    def restore_into(self, point: PointInfo | int, live: Disk, out: Disk) -> None:
        """Write the volume at ``point`` into ``out``: a copy of ``live``, then the changes.

        Nothing may write ``live`` meanwhile (pause applying). ``out`` is flushed.
        """
        if out.virtual_size < live.virtual_size:
            raise DiskSizeMismatchError(
                f"restore target has {out.virtual_size} bytes; the volume has {live.virtual_size}"
            )
        target = self._resolve(point)
        _copy_disk(live, out)
        for offset, data in self.image_changes(target):
            _write_data(out, offset, data)
        out.flush()

    def _resolve(self, point: PointInfo | int) -> PointInfo:
        wanted = point.id if isinstance(point, PointInfo) else point
        for p in self.points():
            if p.id == wanted:
                return p
        raise PointNotFoundError(f"point {wanted} is not in the journal of {self._volume!r}")

    def _later_segments(self, after: int) -> list[_Segment]:
        return [s for n, s in sorted(self._segments.items()) if s.last_lsn > after]

    @contextlib.contextmanager
    def _reader(self, segment: _Segment) -> Iterator[BinaryIO]:
        try:
            f = segment.path.open("rb")
        except OSError as err:
            raise JournalError(f"open {segment.path}: {err}") from err
        with f:
            yield f

    def _undo_heads(self, f: BinaryIO, segment: _Segment, after: int) -> list[tuple[int, _Head]]:
        """Return ``(offset, head)`` of the segment's undo records newer than ``after``."""
        out = []
        offset, end = segment.header_length, segment.size
        while offset < end:
            f.seek(offset)
            try:
                head = _parse_head(f.read(RECORD_HEADER_SIZE))
            except _BadRecord as err:
                raise JournalCorruptError(f"{segment.path} at offset {offset}: {err}") from err
            if head.type == TYPE_UNDO and head.lsn > after:
                out.append((offset, head))
            offset += head.length
        return out

    def _read_undo(self, f: BinaryIO, segment: _Segment, offset: int, head: _Head) -> UndoRecord:
        f.seek(offset)
        try:
            body = _check_body(f.read(head.length), head)
            return decode_undo(head, body)
        except _BadRecord as err:
            raise JournalCorruptError(f"{segment.path} at offset {offset}: {err}") from err

    # --- recovery ---------------------------------------------------------------------------

    def _recover(self) -> None:
        """Rebuild the index from every segment, cutting a torn tail off the last."""
        numbers = sorted(
            int(m.group(1)) for p in self._dir.iterdir() if (m := _SEGMENT_RE.fullmatch(p.name))
        )
        self._next_lsn = 0  # taken from the first segment's header
        for i, number in enumerate(numbers):
            segment = self._scan(number, last=i == len(numbers) - 1)
            if segment is not None:
                self._segments[number] = segment
        if not self._segments:
            self._journal_id = _new_journal_id()
            self._next_lsn = 1
            self._create_segment(numbers[-1] + 1 if numbers else 1)
        else:
            self._reopen_last()
        self._load_rollback()

    def _scan(self, number: int, *, last: bool) -> _Segment | None:
        """Index one segment; return None if it was a torn creation (deleted)."""
        path = self._dir / _segment_name(number)
        data = path.read_bytes()
        view = memoryview(data)
        try:
            header = parse_segment_header(view)
        except _BadRecord as err:
            if last and not _any_valid_record(data, SEGMENT_FIXED_SIZE):
                self._report_cut(path, 0, len(data), f"torn segment header: {err}")
                path.unlink()
                fsync_dir(self._dir)
                return None
            raise JournalCorruptError(f"{path} at offset 0: {err}") from err
        self._check_identity(header, path, number)
        segment = _Segment(number, path, header.length, size=header.length)
        offset = header.length
        while offset < len(data):
            try:
                head = _parse_head(view[offset:])
                body = _check_body(view[offset:], head)
            except _BadRecord as err:
                self._bad_record(segment, data, offset, err, last=last)
                break
            try:
                # A record whose checksum holds is never a torn write: any fault is damage.
                self._index(segment, head.type, head.lsn, body, offset, check=True)
            except _BadRecord as err:
                raise JournalCorruptError(f"{path} at offset {offset}: {err}") from err
            offset += head.length
        segment.size = offset
        return segment

    def _check_identity(self, header: _SegmentHeader, path: Path, number: int) -> None:
        if header.volume != self._volume:
            raise JournalError(f"{path} belongs to volume {header.volume!r}, not {self._volume!r}")
        if self._journal_id is None:
            self._journal_id = header.journal_id
        if header.journal_id != self._journal_id or header.number != number:
            raise JournalCorruptError(f"{path} at offset 0: segment of another journal or number")
        if self._next_lsn and header.first_lsn != self._next_lsn:
            raise JournalCorruptError(
                f"{path} at offset 0: starts at lsn {header.first_lsn}, "
                f"expected {self._next_lsn} (a segment is missing)"
            )
        self._next_lsn = header.first_lsn

    def _index(
        self,
        segment: _Segment,
        rtype: int,
        lsn: int,
        body: memoryview,
        offset: int,
        *,
        check: bool = False,
    ) -> None:
        """Account one record (appended, or found at open: ``check`` its LSN)."""
        if check and lsn != self._next_lsn:
            raise _BadRecord(f"lsn {lsn} where {self._next_lsn} was expected")
        if rtype == TYPE_POINT:
            point = decode_point(lsn, body)
            segment.points.append(point)
            segment.point_ends[lsn] = offset + RECORD_HEADER_SIZE + len(body)
        segment.first_lsn = segment.first_lsn or lsn
        segment.last_lsn = lsn
        self._next_lsn = lsn + 1

    def _bad_record(
        self, segment: _Segment, data: bytes, offset: int, err: _BadRecord, *, last: bool
    ) -> None:
        """Cut a torn tail off, or raise JournalCorruptError for real damage."""
        where = f"{segment.path} at offset {offset}: {err}"
        if not last or _synced_past(data, offset):
            raise JournalCorruptError(where, hint="the journal needs an operator")
        # Bytes no sync ever covered: their volume writes were never issued (rule J1).
        fd = os.open(segment.path, os.O_WRONLY)
        try:
            os.ftruncate(fd, offset)
            os.fsync(fd)
        finally:
            os.close(fd)
        self._report_cut(segment.path, offset, len(data) - offset, str(err))

    def _report_cut(self, path: Path, offset: int, dropped: int, reason: str) -> None:
        self._recovery = RecoveryReport(path.name, offset, dropped, reason)

    def _reopen_last(self) -> None:
        """Append to the last segment again, after making what it holds durable."""
        segment = self._segments[max(self._segments)]
        fd = os.open(segment.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        # The previous owner may have died before its fsync: what we read from the
        # page cache becomes durable here, before anyone builds on it.
        os.fsync(fd)
        fsync_dir(self._dir)
        self._active, self._fd = segment, fd
        self._sync_point = (segment.number, segment.size)

    # --- rollback ---------------------------------------------------------------------------

    def rollback(self, point: PointInfo | int, disk: Disk) -> None:
        """Roll ``disk`` (the live volume) back to ``point`` in place; drop later records.

        Every point after ``point`` is discarded (there is no redo). Crash-safe: an
        intent file is written first, and a journal reopened with it refuses writes
        until this is called again with the same point (it is idempotent).
        """
        self._check_usable()
        target = self._resolve(point)
        if self._pending_rollback not in (None, target.id):
            raise JournalError(f"a rollback to point {self._pending_rollback} is unfinished")
        self.sync()
        self._write_intent(target.id)
        for offset, data in self.image_changes(target):
            _write_data(disk, offset, data)
        disk.flush()
        try:
            # Only once the volume is durably at the point may the records go.
            self._cut_after(target)
            (self._dir / ROLLBACK_FILE).unlink()
            fsync_dir(self._dir)
        except OSError as err:
            self._broken = f"rollback to point {target.id} interrupted: {err}"
            raise self._io_error(f"roll back to point {target.id}", err) from err
        self._pending_rollback = None
        self._recovery = dataclasses.replace(self._recovery, pending_rollback=None)
        self._covered = _RangeSet()

    def _write_intent(self, point_id: int) -> None:
        body = json.dumps({"version": 1, "volume": self._volume, "point": point_id})
        try:
            write_atomically(self._dir / ROLLBACK_FILE, f"{body}\n".encode(), mode=0o600)
        except OSError as err:
            raise self._io_error("save rollback intent", err) from err
        self._pending_rollback = point_id

    def _cut_after(self, target: PointInfo) -> None:
        """Delete every record after ``target``: later segments newest first, then the tail."""
        home = next(s for s in self._segments.values() if target.id in s.point_ends)
        self._close_active()
        # Newest first: at every step the oldest record after the point of each byte
        # survives, so a crash here still leaves a journal that restores correctly.
        for number in sorted(self._segments, reverse=True):
            if number <= home.number:
                break
            self._segments.pop(number).path.unlink()
            fsync_dir(self._dir)
        end = home.point_ends[target.id]
        fd = os.open(home.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        os.ftruncate(fd, end)
        os.fsync(fd)
        home.size, home.last_lsn = end, target.id
        home.points = [p for p in home.points if p.id <= target.id]
        home.point_ends = {k: v for k, v in home.point_ends.items() if k <= target.id}
        self._active, self._fd = home, fd
        self._sync_point = (home.number, end)
        self._next_lsn = target.id + 1
        self._dirty = False

    def _load_rollback(self) -> None:
        path = self._dir / ROLLBACK_FILE
        try:
            doc = json.loads(path.read_text())
            point_id = int(doc["point"])
        except FileNotFoundError:
            return
        except (ValueError, KeyError, TypeError, OSError) as err:
            raise JournalCorruptError(f"{path} at offset 0: {err}") from err
        points = {p.id for p in self.points()}
        if point_id not in points:
            raise JournalCorruptError(f"{path}: names point {point_id}, not in the journal")
        if point_id == self._next_lsn - 1:
            # The records after the point are gone: the rollback had finished.
            path.unlink()
            fsync_dir(self._dir)
            return
        self._pending_rollback = point_id
        self._recovery = dataclasses.replace(self._recovery, pending_rollback=point_id)

    # --- retention ----------------------------------------------------------------------------

    def prune(self) -> PruneResult:
        """Drop whole old segments beyond the retention window (time, then size).

        The oldest kept point is the oldest one younger than ``retention_seconds``
        (or the newest point), moved forward while the journal would still exceed
        ``retention_bytes`` but never past the newest point. A segment goes only if
        all its records are older than that point, and never the active one.
        """
        self._check_writable()
        points = self.points()
        keep = self._oldest_kept(points)
        boundary = keep.id if keep is not None else self._next_lsn
        dropped = [s for s in self._closed_segments() if s.last_lsn < boundary]
        try:
            for segment in dropped:  # oldest first: what remains is always a suffix
                segment.path.unlink(missing_ok=True)
                del self._segments[segment.number]
            if dropped:
                fsync_dir(self._dir)
        except OSError as err:
            raise self._io_error(f"prune {self._dir}", err) from err
        return PruneResult(
            dropped_segments=len(dropped),
            dropped_points=sum(len(s.points) for s in dropped),
            freed_bytes=sum(s.size for s in dropped),
            oldest_kept=keep,
            over_budget=self._total_bytes() > self.retention_bytes,
        )

    def _oldest_kept(self, points: list[PointInfo]) -> PointInfo | None:
        if not points:
            return None
        cutoff = round((self._clock() - self.retention_seconds) * 1e9)
        i = next((i for i, p in enumerate(points) if p.time_ns >= cutoff), len(points) - 1)
        while i < len(points) - 1 and self._bytes_keeping(points[i].id) > self.retention_bytes:
            i += 1
        return points[i]

    def _bytes_keeping(self, lsn: int) -> int:
        """Bytes left if every closed segment entirely older than ``lsn`` were dropped."""
        closed = {s.number for s in self._closed_segments() if s.last_lsn < lsn}
        return sum(s.size for n, s in self._segments.items() if n not in closed)

    def _closed_segments(self) -> list[_Segment]:
        return [s for n, s in sorted(self._segments.items()) if s is not self._active]

    def _total_bytes(self) -> int:
        return sum(s.size for s in self._segments.values())


# --- helpers ----------------------------------------------------------------------------------


def _find(points: list[PointInfo], spec: str | int | float | datetime) -> PointInfo | None:
    """Return the point ``spec`` names among ``points`` (oldest first), or None."""
    if isinstance(spec, bool):
        raise UsageError("a point spec cannot be a bool")
    if isinstance(spec, int):
        return next((p for p in points if p.id == spec), None)
    if isinstance(spec, datetime | float):
        seconds = spec.timestamp() if isinstance(spec, datetime) else spec
        ns = round(seconds * 1e9)
        return next((p for p in reversed(points) if p.time_ns <= ns), None)
    if not isinstance(spec, str):
        raise UsageError(f"cannot read point spec {spec!r}")
    return _find_text(points, spec)


def _find_text(points: list[PointInfo], spec: str) -> PointInfo | None:
    newest = list(reversed(points))
    if spec == "latest":
        return newest[0] if newest else None
    if spec in ("latest-app", "latest-crash"):
        kind = spec.removeprefix("latest-")
        return next((p for p in newest if p.kind == kind), None)
    if spec.isdigit() or spec.startswith("id:"):
        return _find(points, int(spec.removeprefix("id:")))
    if spec.startswith("group:"):
        return next((p for p in newest if p.group == spec.removeprefix("group:")), None)
    if spec.startswith("tag:"):
        return next((p for p in newest if p.tag == spec.removeprefix("tag:")), None)
    try:
        when = datetime.fromisoformat(spec)
    except ValueError:
        raise UsageError(
            f"cannot read point spec {spec!r}: use latest, latest-app, latest-crash, "
            "an id, group:<id>, tag:<name> or an ISO 8601 time"
        ) from None
    return _find(points, when)


def _valid_records(data: bytes, start: int) -> Iterator[_Head]:
    """Yield every record that parses and checks at any offset after ``start``."""
    view = memoryview(data)
    pos = data.find(RECORD_MAGIC, start)
    while pos >= 0:
        try:
            head = _parse_head(view[pos:])
            _check_body(view[pos:], head)
        except _BadRecord:
            pass
        else:
            yield head
        pos = data.find(RECORD_MAGIC, pos + 1)


def _any_valid_record(data: bytes, start: int) -> bool:
    return next(_valid_records(data, start), None) is not None


def _synced_past(data: bytes, offset: int) -> bool:
    """Whether a valid record after ``offset`` says bytes past ``offset`` were fsynced."""
    return any(head.synced > offset for head in _valid_records(data, offset + 1))


def _write_data(disk: Disk, offset: int, data: bytes) -> None:
    if not np.frombuffer(data, dtype=np.uint8).any():
        disk.write_zeroes(offset, len(data))  # sparse volumes stay sparse
    else:
        disk.write(offset, data)


def _copy_disk(live: Disk, out: Disk, chunk: int = UNDO_CHUNK) -> None:
    """Copy every byte of ``live`` into ``out`` (zero extents as zeroes, not data)."""
    for ext in live.extents():
        if ext.zero:
            out.write_zeroes(ext.offset, ext.length)
            continue
        for pos in range(ext.offset, ext.end, chunk):
            out.write(pos, live.read(pos, min(chunk, ext.end - pos)))

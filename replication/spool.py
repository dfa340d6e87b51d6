"""The process server's durable spool: ciphertext frames on disk until persisted.

Sans-gRPC, no threads, plain file I/O; one :class:`Spool` per spool directory (a lock
file enforces it across processes). The spool never decrypts and has no key: it
checks a frame's clear header only (:func:`replication.frame.peek_header`).

Files in the directory (layouts in ``docs/protocol.md``, "Spool record"):

* ``spool-NNNNNN.seg``: append-only segments of records (record header + the frame
  bytes as received), rolled when the next record would pass ``segment_size``.
* ``cursors.json``: the persisted seq of every session, replaced atomically
  (write temp, fsync, rename, fsync dir).
* ``spool.lock``: ``flock``-ed while a :class:`Spool` is open.

Durability rules (why the order matters):

* ``append`` writes the whole record to the OS (``os.write``) or nothing; it is not
  durable until :meth:`Spool.sync`, which fsyncs the active segment (and the directory
  after a segment was created). Only sync's answer may be acked ``RECEIVED``.
* A segment is fsynced before the next one is created, so only the *last* segment
  can have a torn tail after a crash; every earlier segment must parse completely.
* Every record carries ``synced``: how many bytes of its segment were known fsynced
  when it was written. At recovery, a bad record in the last segment is a torn tail
  (truncated) unless a later valid record proves the bad bytes had been synced;
  then it is corruption (:class:`SpoolCorruptError`, file and offset named).
* ``mark_persisted`` makes the cursor durable *before* deleting segments, so a crash
  never leaves a session whose records are gone but whose cursor is behind them.
* An fsync failure drops every append since the last successful sync (the segment is
  truncated back): after a failed fsync Linux may forget the dirty pages, so nothing
  written since is trusted. The caller learns it from :class:`SpoolDiskFullError` (or
  :class:`SpoolError`) and :meth:`Spool.state`; nothing it acked is lost.

Memory: per session a few counters; per segment its size and, per session in it, the
first and last seq. Frames are always read back from disk.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Final, Literal

import xxhash

from .durable import fsync_dir, lock_exclusive, write_atomically
from .errors import (
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
from .faults import crash_point
from .frame import frame_size, peek_header

__all__ = [
    "CURSOR_FILE",
    "DEFAULT_SEGMENT_SIZE",
    "RECORD_HEADER_SIZE",
    "RECORD_MAGIC",
    "AppendResult",
    "Spool",
]

RECORD_MAGIC: Final = b"RPLS"
RECORD_VERSION: Final = 1
#: magic, version, flags, volume length, record length, frame length, session, seq, synced
_RECORD = struct.Struct(">4sBBHII16sQQ")
_CHECKSUM = struct.Struct(">Q")
RECORD_HEADER_SIZE: Final = _RECORD.size + _CHECKSUM.size  # 56
SESSION_ID_SIZE: Final = 16
MAX_VOLUME_NAME: Final = 255
DEFAULT_SEGMENT_SIZE: Final = 64 << 20
CURSOR_FILE: Final = "cursors.json"
LOCK_FILE: Final = "spool.lock"
_SEGMENT_RE = re.compile(r"spool-(\d{6,})\.seg")
_U64_MAX: Final = (1 << 64) - 1

assert RECORD_HEADER_SIZE == 56

SessionKey = tuple[str, bytes]


@dataclass(frozen=True, slots=True)
class AppendResult:
    """What :meth:`Spool.append` did with a frame.

    ``status`` is ``"appended"`` (written, durable after the next sync) or
    ``"duplicate"`` (the identity was already spooled, nothing written). ``verified``
    is False only for a duplicate of a frame already persisted and deleted from the
    spool, whose bytes could not be compared any more.
    """

    status: Literal["appended", "duplicate"]
    seq: int
    verified: bool = True


@dataclass(slots=True)
class _Session:
    persisted: int = 0
    appended: int = 0  # highest seq written to a segment (maybe not fsynced yet)
    durable: int = 0  # highest seq fsynced: what may be acked RECEIVED
    hint: tuple[int, int] | None = None  # (segment, offset) of a record to resume lookups


@dataclass(slots=True)
class _Segment:
    number: int
    path: Path
    size: int = 0
    #: session -> [first seq, last seq] of its records in this segment
    sessions: dict[SessionKey, list[int]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Head:
    volume_length: int
    record_length: int
    frame_length: int
    session: bytes
    seq: int
    synced: int
    checksum: int


class _BadRecord(Exception):
    """Internal: the bytes at an offset are not one whole valid record."""


def _segment_name(number: int) -> str:
    return f"spool-{number:06d}.seg"


def _record_checksum(head: bytes, volume: bytes, frame: bytes | memoryview) -> int:
    h = xxhash.xxh3_64()
    h.update(head)
    h.update(volume)
    h.update(frame)
    return h.intdigest()


def _encode_record(volume: bytes, session: bytes, seq: int, frame: bytes, synced: int) -> bytes:
    length = RECORD_HEADER_SIZE + len(volume) + len(frame)
    head = _RECORD.pack(
        RECORD_MAGIC, RECORD_VERSION, 0, len(volume), length, len(frame), session, seq, synced
    )
    checksum = _CHECKSUM.pack(_record_checksum(head, volume, frame))
    return b"".join((head, checksum, volume, frame))


def _parse_head(buf: bytes | memoryview) -> _Head:
    """Parse a record header; raise :class:`_BadRecord` if it cannot be one."""
    if len(buf) < RECORD_HEADER_SIZE:
        raise _BadRecord("short record header")
    magic, version, flags, vlen, rlen, flen, session, seq, synced = _RECORD.unpack_from(buf)
    if magic != RECORD_MAGIC or version != RECORD_VERSION or flags != 0:
        raise _BadRecord("bad magic, version or flags")
    if not 0 < vlen <= MAX_VOLUME_NAME or rlen != RECORD_HEADER_SIZE + vlen + flen or seq == 0:
        raise _BadRecord("inconsistent lengths or seq")
    (checksum,) = _CHECKSUM.unpack_from(buf, _RECORD.size)
    return _Head(vlen, rlen, flen, bytes(session), seq, synced, checksum)


def _check_body(buf: bytes | memoryview, head: _Head) -> tuple[str, memoryview]:
    """Verify a whole record (``buf`` starts at its header); return (volume, frame)."""
    mv = memoryview(buf)
    if len(mv) < head.record_length:
        raise _BadRecord("record runs past the end of the file")
    volume = bytes(mv[RECORD_HEADER_SIZE : RECORD_HEADER_SIZE + head.volume_length])
    frame = mv[RECORD_HEADER_SIZE + head.volume_length : head.record_length]
    if _record_checksum(bytes(mv[: _RECORD.size]), volume, frame) != head.checksum:
        raise _BadRecord("record checksum mismatch")
    try:
        return volume.decode("utf-8"), frame
    except UnicodeDecodeError as err:
        raise _BadRecord("volume name is not UTF-8") from err


def _read_exact(f: BinaryIO, offset: int, size: int) -> bytes:
    f.seek(offset)
    return f.read(size)


def _truncate_durably(path: Path, size: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_enospc(err: OSError) -> bool:
    return err.errno in (errno.ENOSPC, errno.EDQUOT)


def _check_frame(frame: bytes, session: bytes, seq: int) -> None:
    """The spool keeps only well-formed frames whose clear header matches the identity."""
    header = peek_header(frame)
    if frame_size(header) != len(frame):
        raise FrameFormatError(f"frame is {len(frame)} bytes, its header says {frame_size(header)}")
    if header.seq != seq or header.salt != session:
        raise FrameFormatError(f"frame header (seq {header.seq}) does not match seq {seq}/session")


class Spool:
    """A directory of segments holding frames from ``RECEIVED`` until ``PERSISTED``.

    Not thread-safe: one owner (the process server's event loop) calls it.
    """

    def __init__(self, directory: Path, *, limit_bytes: int, segment_size: int) -> None:
        """Use :meth:`open`."""
        self._dir = directory
        self._limit = limit_bytes
        self._segment_size = segment_size
        self._sessions: dict[SessionKey, _Session] = {}
        self._segments: dict[int, _Segment] = {}
        self._next_number = 1
        self._active: _Segment | None = None
        self._fd: int | None = None  # write fd of the active segment (O_APPEND)
        self._dir_dirty = False
        self._touched: set[SessionKey] = set()  # sessions appended to since the last sync
        self._sync_point: tuple[int, int] = (0, 0)  # (segment, size) known durable
        self._cursors_dirty = False
        self._broken: str | None = None
        self._cut_pending = False  # a rollback is not durable yet (see _finish_cut)
        self._pending_cut: tuple[Path, int] | None = None
        self._lock_fd: int | None = None

    # --- opening and closing -------------------------------------------------------

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike[str],
        *,
        limit_bytes: int,
        segment_size: int = DEFAULT_SEGMENT_SIZE,
    ) -> Spool:
        """Open (creating if needed) the spool in ``directory`` and recover its index.

        A torn tail of the last segment is truncated away; corruption before the tail
        raises :class:`SpoolCorruptError`; another open instance :class:`SpoolBusyError`.
        """
        if limit_bytes <= 0 or segment_size <= RECORD_HEADER_SIZE:
            raise UsageError("spool limit_bytes and segment_size must be positive")
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        spool = cls(path, limit_bytes=limit_bytes, segment_size=segment_size)
        spool._lock()
        try:
            spool._recover()
        except BaseException:
            spool._unlock()
            raise
        return spool

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

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _lock(self) -> None:
        self._lock_fd = lock_exclusive(
            self._dir / LOCK_FILE,
            lambda: SpoolBusyError(f"spool {self._dir} is open in another process"),
        )

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # --- public API ------------------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        """Bytes of all segment files (what ``limit_bytes`` bounds)."""
        return sum(seg.size for seg in self._segments.values())

    @property
    def limit_bytes(self) -> int:
        """The configured byte limit."""
        return self._limit

    def append(self, volume: str, session: bytes, seq: int, frame: bytes) -> AppendResult:
        """Spool one frame of ``(volume, session)``; seqs start at 1 and are contiguous.

        Raises :class:`FrameGapError` (seq skips ahead), :class:`FrameReplayError`
        (identity spooled with other bytes), :class:`FrameFormatError` (bad header, or
        it does not match seq/session), :class:`SpoolFullError` (limit reached: push
        back), :class:`SpoolDiskFullError` (device full) and :class:`SpoolError` (the
        record is larger than the whole limit: it could never be spooled).
        """
        self._check_usable()
        self._finish_cut()
        key = self._key(volume, session)
        frame = bytes(frame)
        _check_frame(frame, key[1], seq)
        state = self._sessions.get(key)
        appended = state.appended if state else 0
        if seq <= appended:
            return self._duplicate(key, seq, frame)
        if seq != appended + 1:
            raise FrameGapError(f"{volume}: seq {seq} after {appended}: frames are missing")
        record_length = RECORD_HEADER_SIZE + len(key[0].encode()) + len(frame)
        if record_length > self._limit:
            # waiting would never help: fail the stream instead of blocking it forever
            raise SpoolError(
                f"a {record_length}-byte record can never fit the {self._limit}-byte spool",
                hint="raise the spool limit above the largest frame",
            )
        if self.used_bytes + record_length > self._limit:
            raise SpoolFullError(
                f"spool holds {self.used_bytes} of {self._limit} bytes",
                hint="stop reading until forwarded frames are persisted",
            )
        self._write_record(key, seq, frame, record_length)
        return AppendResult("appended", seq)

    def sync(self) -> dict[SessionKey, int]:
        """Make every append durable; return the durable seq of each session appended to.

        Only after this returns may the caller ack ``RECEIVED`` up to those seqs.
        """
        self._check_usable()
        self._finish_cut()
        if self._fd is not None:
            self._fsync_or_rollback(self._fd)
        if self._dir_dirty:
            # A new segment's directory entry must be durable too, or the fsynced file
            # could vanish from the directory after a crash.
            self._fsync_or_rollback(None)
            self._dir_dirty = False
        active = self._active
        self._sync_point = (active.number, active.size) if active else (self._next_number - 1, 0)
        result = {}
        for key in self._touched:
            state = self._sessions[key]
            state.durable = state.appended
            result[key] = state.durable
        self._touched.clear()
        crash_point("spool.synced")
        if self._cursors_dirty:
            # Retry a cursor save that failed earlier; its error was already reported and
            # must not hide that the frames above are now durable.
            with contextlib.suppress(SpoolError):
                self._save_cursors()
        return result

    def state(self, volume: str, session: bytes) -> tuple[int, int]:
        """Return ``(received_seq, persisted_seq)``; received means spooled and fsynced."""
        state = self._sessions.get(self._key(volume, session))
        return (state.durable, state.persisted) if state else (0, 0)

    def sessions(self) -> list[SessionKey]:
        """Every session the spool knows (with records or a persisted cursor)."""
        return list(self._sessions)

    def pending(self, volume: str, session: bytes, after_seq: int) -> Iterator[tuple[int, bytes]]:
        """Yield ``(seq, frame)`` of durable frames after ``after_seq``, in seq order.

        Frames already persisted are never yielded (``after_seq`` is raised to the
        persisted seq). The durable seq is taken when iteration starts.
        """
        self._check_usable()
        key = self._key(volume, session)
        state = self._sessions.get(key)
        if state is None:
            return
        start, last = max(after_seq, state.persisted), state.durable
        numbers = [
            n
            for n in sorted(self._segments)
            if key in self._segments[n].sessions
            and self._segments[n].sessions[key][1] > start
            and self._segments[n].sessions[key][0] <= last
        ]
        expected = start + 1
        for number in numbers:
            for seq, frame in self._read_session(number, key, expected, last):
                if seq != expected:
                    raise SpoolCorruptError(f"{volume}: seq {expected} missing from the spool")
                yield seq, frame
                expected += 1
        if expected <= last:
            raise SpoolCorruptError(f"{volume}: seqs {expected}..{last} missing from the spool")

    def mark_persisted(self, volume: str, session: bytes, seq: int) -> None:
        """Record that the master target persisted ``(volume, session)`` up to ``seq``.

        The cursor is made durable first, then segments whose every record is
        persisted are deleted. A seq at or below the current cursor is a no-op.
        """
        self._check_usable()
        key = self._key(volume, session)
        state = self._sessions.get(key)
        if seq <= (state.persisted if state else 0):
            return
        if state is None or seq > state.durable:
            received = state.durable if state else 0
            raise UsageError(f"{volume}: cannot persist seq {seq}, only {received} received")
        state.persisted = seq
        self._cursors_dirty = True
        self._save_cursors()

    # --- appending ------------------------------------------------------------------

    def _key(self, volume: str, session: bytes) -> SessionKey:
        if not isinstance(volume, str) or not 0 < len(volume.encode()) <= MAX_VOLUME_NAME:
            raise UsageError(f"volume name must be 1..{MAX_VOLUME_NAME} UTF-8 bytes")
        if len(session) != SESSION_ID_SIZE:
            raise UsageError(f"session id must be {SESSION_ID_SIZE} bytes")
        return volume, bytes(session)

    def _check_usable(self) -> None:
        if self._lock_fd is None:
            raise UsageError("spool is closed")
        if self._broken is not None:
            raise SpoolError(f"spool needs to be reopened: {self._broken}")

    def _duplicate(self, key: SessionKey, seq: int, frame: bytes) -> AppendResult:
        state = self._sessions[key]
        stored = self._lookup(key, seq)
        if stored is None:
            if seq <= state.persisted:
                return AppendResult("duplicate", seq, verified=False)
            raise SpoolCorruptError(f"{key[0]}: spooled seq {seq} is missing from the segments")
        if stored != frame:
            raise FrameReplayError(f"{key[0]}: seq {seq} was spooled with other bytes")
        return AppendResult("duplicate", seq)

    def _write_record(self, key: SessionKey, seq: int, frame: bytes, length: int) -> None:
        active = self._active
        if active is not None and active.size > 0 and active.size + length > self._segment_size:
            self._roll()
        if self._active is None:
            self._create_segment()
        active = self._active
        assert active is not None and self._fd is not None
        synced = self._sync_point[1] if self._sync_point[0] == active.number else 0
        record = _encode_record(key[0].encode(), key[1], seq, frame, synced)
        self._write_all(active, record)
        crash_point("spool.appended")
        active.size += length
        span = active.sessions.setdefault(key, [seq, seq])
        span[1] = seq
        state = self._sessions.setdefault(key, _Session())
        state.appended = seq
        self._touched.add(key)

    def _write_all(self, active: _Segment, record: bytes) -> None:
        """Write the whole record or, on error, nothing (the file is cut back)."""
        assert self._fd is not None
        view = memoryview(record)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as err:
            self._truncate_after_failed_write(active)
            if _is_enospc(err):
                raise SpoolDiskFullError(f"no space left for the spool in {self._dir}") from err
            raise SpoolError(f"write {active.path}: {err}") from err

    def _truncate_after_failed_write(self, active: _Segment) -> None:
        try:
            os.ftruncate(self._fd, active.size)  # type: ignore[arg-type]
        except OSError as err:
            self._broken = f"cannot cut back {active.path}: {err}"

    def _roll(self) -> None:
        assert self._fd is not None
        # Only the last segment may end torn after a crash: make this one complete on
        # disk before any byte goes to the next.
        self._fsync_or_rollback(self._fd)
        self._close_active()

    def _create_segment(self) -> None:
        number = self._next_number
        path = self._dir / _segment_name(number)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        except OSError as err:
            if _is_enospc(err):
                raise SpoolDiskFullError(f"no space to create {path}") from err
            raise SpoolError(f"create {path}: {err}") from err
        self._next_number += 1
        self._fd = fd
        self._active = self._segments[number] = _Segment(number, path)
        self._dir_dirty = True

    def _close_active(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd = None
        self._active = None

    # --- fsync failure: drop everything since the last sync --------------------------

    def _fsync_or_rollback(self, fd: int | None) -> None:
        try:
            if fd is None:
                fsync_dir(self._dir)
            else:
                os.fsync(fd)
        except OSError as err:
            self._rollback()
            if _is_enospc(err):
                raise SpoolDiskFullError(
                    f"no space to fsync the spool in {self._dir}; unsynced frames dropped"
                ) from err
            raise SpoolError(f"fsync spool in {self._dir}: {err}") from err

    def _rollback(self) -> None:
        """Cut the spool back to the last successful sync (files and counters)."""
        self._close_active()
        number, size = self._sync_point
        for n in [n for n in self._segments if n > number]:
            self._drop_segment(self._segments.pop(n))
        segment = self._segments.get(number)
        try:
            if segment is not None:
                os.truncate(segment.path, size)
                segment.size = size
                segment.sessions = self._scan_spans(segment)
        except OSError as err:
            self._broken = f"cannot roll the spool back: {err}"
        self._pending_cut = (segment.path, size) if segment is not None else None
        self._cut_pending = True
        with contextlib.suppress(SpoolError):
            self._finish_cut()
        for key in self._touched:
            state = self._sessions[key]
            state.appended = state.durable
            state.hint = None
        self._touched.clear()
        self._dir_dirty = False

    def _finish_cut(self) -> None:
        """Make a rollback durable; until then nothing may be appended or synced."""
        if not self._cut_pending:
            return
        try:
            # The cut must be on disk before new appends reuse the dropped seqs, or a
            # crash could bring the dropped records back beside their resends.
            if self._pending_cut is not None and self._pending_cut[0].exists():
                _truncate_durably(*self._pending_cut)
            fsync_dir(self._dir)
        except OSError as err:
            if _is_enospc(err):
                raise SpoolDiskFullError(f"no space to fsync the spool in {self._dir}") from err
            raise SpoolError(f"fsync spool in {self._dir}: {err}") from err
        self._cut_pending = False
        self._pending_cut = None

    def _drop_segment(self, segment: _Segment) -> None:
        try:
            segment.path.unlink()
        except FileNotFoundError:
            pass
        except OSError as err:
            self._broken = f"cannot delete {segment.path}: {err}"

    # --- cursors and deleting segments ----------------------------------------------

    def _save_cursors(self) -> None:
        """Replace the cursor file atomically, then delete fully persisted segments."""
        entries = [
            [volume, session.hex(), state.persisted]
            for (volume, session), state in sorted(self._sessions.items())
            if state.persisted > 0
        ]
        body = json.dumps({"version": 1, "sessions": entries}, separators=(",", ":"))
        text = f"{body}\n{xxhash.xxh3_64_hexdigest(body.encode())}\n".encode()
        path = self._dir / CURSOR_FILE
        try:
            # The new cursor must be on disk before the rename publishes it, and the
            # rename durable before any segment it releases is deleted.
            write_atomically(path, text, mode=0o600)
        except OSError as err:
            # The in-memory cursor stays (it is true); the file is retried at the next
            # sync or mark. Nothing is deleted on the strength of an unsaved cursor.
            if _is_enospc(err):
                raise SpoolDiskFullError(f"no space to save {path}") from err
            raise SpoolError(f"save {path}: {err}") from err
        self._cursors_dirty = False
        self._collect()

    def _collect(self) -> None:
        """Delete every segment whose records are all persisted."""
        deleted = False
        for number in sorted(self._segments):
            segment = self._segments[number]
            if any(last > self._sessions[k].persisted for k, (_, last) in segment.sessions.items()):
                continue
            if segment is self._active:
                self._close_active()
            del self._segments[number]
            self._drop_segment(segment)
            deleted = True
        if deleted:
            # Make deletions durable: segment numbers restart at 1 when the spool is
            # empty at open, and a resurrected old segment would then sort wrongly.
            try:
                fsync_dir(self._dir)
            except OSError as err:
                self._broken = f"cannot fsync {self._dir}: {err}"

    def _load_cursors(self) -> dict[SessionKey, int]:
        path = self._dir / CURSOR_FILE
        try:
            text = path.read_bytes()
        except FileNotFoundError:
            return {}
        try:
            body, digest, tail = text.split(b"\n")
            if tail or xxhash.xxh3_64_hexdigest(body) != digest.decode():
                raise ValueError("checksum mismatch")
            doc = json.loads(body)
            if doc["version"] != 1:
                raise ValueError(f"version {doc['version']}")
            return {(v, bytes.fromhex(s)): int(p) for v, s, p in doc["sessions"]}
        except (ValueError, KeyError, TypeError) as err:
            raise SpoolCorruptError(f"{path} at offset 0: {err}") from err

    # --- reading back ------------------------------------------------------------------

    def _read_session(
        self, number: int, key: SessionKey, first: int, last: int
    ) -> Iterator[tuple[int, bytes]]:
        """Yield ``key``'s records of segment ``number`` with ``first <= seq <= last``."""
        segment = self._segments.get(number)
        if segment is None:
            return
        end = segment.size
        try:
            f = segment.path.open("rb")
        except FileNotFoundError:
            return  # deleted meanwhile: every record of it was persisted
        with f:
            offset = 0
            while offset < end:
                head = self._head_at(f, segment, offset)
                if head.session == key[1] and first <= head.seq <= last:
                    volume, frame = self._record_at(f, segment, offset, head)
                    if volume == key[0]:
                        yield head.seq, bytes(frame)
                offset += head.record_length

    def _head_at(self, f: BinaryIO, segment: _Segment, offset: int) -> _Head:
        try:
            return _parse_head(_read_exact(f, offset, RECORD_HEADER_SIZE))
        except _BadRecord as err:
            raise SpoolCorruptError(f"{segment.path} at offset {offset}: {err}") from err

    def _record_at(
        self, f: BinaryIO, segment: _Segment, offset: int, head: _Head
    ) -> tuple[str, memoryview]:
        try:
            return _check_body(_read_exact(f, offset, head.record_length), head)
        except _BadRecord as err:
            raise SpoolCorruptError(f"{segment.path} at offset {offset}: {err}") from err

    def _lookup(self, key: SessionKey, seq: int) -> bytes | None:
        """Return the spooled frame of ``key``/``seq``, or None if no segment holds it."""
        state = self._sessions[key]
        for number in sorted(self._segments):
            segment = self._segments[number]
            span = segment.sessions.get(key)
            if span is None or not span[0] <= seq <= span[1]:
                continue
            # Resends come in seq order: resume from the last record found.
            hint = state.hint
            start = hint[1] if hint and hint[0] == number else 0
            found = self._find_in(segment, key, seq, start) or self._find_in(segment, key, seq, 0)
            if found is not None:
                state.hint = (number, found[0])
                return found[1]
        return None

    def _find_in(
        self, segment: _Segment, key: SessionKey, seq: int, start: int
    ) -> tuple[int, bytes] | None:
        with segment.path.open("rb") as f:
            offset = start
            while offset < segment.size:
                head = self._head_at(f, segment, offset)
                if head.session == key[1] and head.seq == seq:
                    volume, frame = self._record_at(f, segment, offset, head)
                    if volume == key[0]:
                        return offset, bytes(frame)
                offset += head.record_length
        return None

    def _scan_spans(self, segment: _Segment) -> dict[SessionKey, list[int]]:
        """Rebuild a segment's per-session seq spans from its record headers."""
        spans: dict[SessionKey, list[int]] = {}
        with segment.path.open("rb") as f:
            offset = 0
            while offset < segment.size:
                head = self._head_at(f, segment, offset)
                volume = _read_exact(f, offset + RECORD_HEADER_SIZE, head.volume_length)
                span = spans.setdefault((volume.decode(), head.session), [head.seq, head.seq])
                span[1] = head.seq
                offset += head.record_length
        return spans

    # --- recovery --------------------------------------------------------------------

    def _recover(self) -> None:
        """Rebuild the index from the cursor file and a scan of every segment."""
        cursors = self._load_cursors()
        for key, persisted in cursors.items():
            self._sessions[key] = _Session(persisted=persisted, appended=persisted)
        numbers = sorted(
            int(m.group(1)) for p in self._dir.iterdir() if (m := _SEGMENT_RE.fullmatch(p.name))
        )
        seen: dict[SessionKey, int] = {}
        for i, number in enumerate(numbers):
            segment = _Segment(number, self._dir / _segment_name(number))
            self._scan_segment(segment, seen, last=i == len(numbers) - 1)
            self._segments[number] = segment
        for key, seq in seen.items():
            state = self._sessions.setdefault(key, _Session())
            state.appended = max(state.persisted, seq)
        for state in self._sessions.values():
            state.durable = state.appended
        self._next_number = (numbers[-1] + 1) if numbers else 1
        if numbers:
            # The previous owner may have died before its fsync: what we read from the
            # page cache becomes durable here, before anyone acks it.
            fd = os.open(self._segments[numbers[-1]].path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            last = self._segments[numbers[-1]]
            self._sync_point = (last.number, last.size)
        fsync_dir(self._dir)
        self._collect()

    def _scan_segment(self, segment: _Segment, seen: dict[SessionKey, int], *, last: bool) -> None:
        data = segment.path.read_bytes()
        offset = 0
        while offset < len(data):
            try:
                head = _parse_head(memoryview(data)[offset:])
                volume, _ = _check_body(memoryview(data)[offset:], head)
            except _BadRecord as err:
                self._bad_record(segment, data, offset, err, last=last)
                break
            self._index_record(segment, (volume, head.session), head.seq, seen, offset)
            offset += head.record_length
        segment.size = offset

    def _bad_record(
        self, segment: _Segment, data: bytes, offset: int, err: _BadRecord, *, last: bool
    ) -> None:
        """Truncate a torn tail, or raise :class:`SpoolCorruptError` for real damage."""
        where = f"{segment.path} at offset {offset}: {err}"
        if not last or _synced_past(data, offset):
            raise SpoolCorruptError(where, hint="the spool needs an operator")
        # A torn tail: bytes never acknowledged by a sync. Cut them off for good.
        _truncate_durably(segment.path, offset)

    def _index_record(
        self, segment: _Segment, key: SessionKey, seq: int, seen: dict[SessionKey, int], offset: int
    ) -> None:
        state = self._sessions.get(key)
        persisted = state.persisted if state else 0
        previous = seen.get(key, 0)
        # Records of one session are contiguous, except below the persisted cursor,
        # where fully persisted segments in between may have been deleted.
        if seq <= previous or (seq != previous + 1 and seq > persisted + 1):
            raise SpoolCorruptError(
                f"{segment.path} at offset {offset}: {key[0]} seq {seq} after {previous}",
                hint="the spool needs an operator",
            )
        seen[key] = seq
        span = segment.sessions.setdefault(key, [seq, seq])
        span[1] = seq


def _synced_past(data: bytes, offset: int) -> bool:
    """Whether a valid record after ``offset`` says bytes past ``offset`` were fsynced."""
    view = memoryview(data)
    pos = data.find(RECORD_MAGIC, offset + 1)
    while pos >= 0:
        try:
            head = _parse_head(view[pos:])
            _check_body(view[pos:], head)
        except _BadRecord:
            pass
        else:
            if head.synced > offset:
                return True
        pos = data.find(RECORD_MAGIC, pos + 1)
    return False

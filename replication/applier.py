"""The master target's core: verify block frames, write them, and record what is durable.

Theory of operation
-------------------
A source session on a volume is identified by ``(volume, session)`` where
``session`` is the 16-byte session salt of its frames. Frames arrive in seq order
starting at 1. For each frame :meth:`Applier.apply`:

1. parses the clear header and checks it belongs here: the session salt equals the
   session, the disk id equals :func:`~replication.volumes.volume_disk_id` of the
   volume (both also authenticated by the AEAD below);
2. decodes it with :class:`~replication.frame.FrameDecoder` (authentication, then
   the plaintext digest) **before** anything is written;
3. classifies the seq against the session's progress:

   * ``seq == applied + 1``: the next frame: range-checked, then written
     (``write_zeroes`` when all zeros, so sparse volumes stay sparse);
   * ``seq <= applied``: a resend. Its 16-byte GCM tag is compared with the tag
     kept for that seq (the last persisted seq, and every applied but not yet
     committed seq): equal means the same frame (a valid tag under the session key
     and nonce binds the ciphertext), so it is acknowledged again and not applied;
     different means the source reused a seq for other content:
     :class:`FrameReplayError`. Seqs older than the last persisted one keep no tag
     and **cannot be re-verified** beyond authentication: they are acknowledged as
     already persisted without being applied (their content, whatever it is, is
     never written, so a resend can never make a block go back in time);
   * ``seq > applied + 1``: a gap, :class:`FrameGapError` (the source must resume
     from :meth:`Applier.session_state` + 1).

:meth:`Applier.commit` makes everything applied so far durable and returns the new
persisted seq of each touched session: the value that ``PERSISTED`` acks carry.
:meth:`Applier.commit_each` does the same for many sessions at once (a master
target's group commit) without letting one volume's failed flush hold back the
others.

Batches (the fast path)
-----------------------
:meth:`Applier.apply_batch` takes the frames of one session that arrived together
and gives the same results and errors as :meth:`apply` frame by frame, in three
passes: verify and classify every frame (stopping at the first that fails: the
frames before it are still applied), journal the undo of every range with ONE
journal fsync (J1, docs/journal.md: durable before any write of the batch is
issued), then write. Decoding (AES-GCM, zstd, XXH3: all release the GIL) can happen
earlier through :meth:`predecode`, on the caller's thread (a stream reader) or a
small pool, while the previous batch is written; the plaintext decoded ahead is
bounded for all streams together
(``decode_ahead_bytes``). An all-zero frame is written with ``write_zeroes``; the
decoder's verified digest tells a non-zero frame without scanning it.

Durability order (why commit is "flush disks, then SQLite")
-----------------------------------------------------------
An ack says "every frame up to seq N is on stable storage"; the source then drops
those blocks from its changed set. So the recorded persisted seq must never be
ahead of the disk:

* flush first, record second: a crash in between leaves the record *behind* the
  disk. The source resends frames that are already written; writing the same bytes
  at the same offset again is idempotent, so nothing is lost.
* the other order could record N, crash before the volume's page cache reached the
  disk, and lose frames the source was told were safe: silent divergence.

The state lives in SQLite (WAL mode, ``synchronous=FULL`` so a commit is fsynced:
WAL with ``NORMAL`` may lose the last transactions on power loss), one row per
session, all rows of one commit in one transaction.

If a write or a flush fails, the in-memory progress of the sessions of that volume
falls back to what is recorded, so the source resends everything that may not be
durable, and the volume's handle is closed (reopened by the next frame): after a
failed write its in-memory tables may disagree with the file, so nothing more is
written through it. A full device (``ENOSPC``, or SQLite's ``SQLITE_FULL``) becomes
:class:`~replication.errors.VolumeDiskFullError`, which is retryable: the process
server keeps the frames spooled and tries again once space is freed. A failed
SQLite commit leaves the recorded seq where it was (never ahead of the disk).

Ordering between sessions (design S7)
------------------------------------
A session of an *ordered* source carries an order number in its authenticated salt
(:mod:`replication.ordering`). Per volume the applier keeps the newest session whose
frame it admitted: in memory at once (so a frame of an older session admitted after
it is refused even before the next commit), durably in the same transaction as the
progress of that commit. Opening or applying a session older than the newest, or an
unordered session on a volume an ordered session wrote (a downgrade would let stale
tails in again), is :class:`~replication.errors.StaleSessionError`, not retryable:
the process server parks that session instead of retrying it. Only an authenticated
frame moves the newest session forward, so an OpenSession naming a made-up salt
cannot lock the real source out. Volumes never written by an ordered session accept
unordered sessions as before (older sources).

Acks the caller sends carry :meth:`Applier.ack_mac` (:mod:`replication.acks`).

Not handled here: the gRPC adapter; live-write races (design R4).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sqlite3
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import xxhash

from .acks import AckAuthenticator
from .blocks import DEFAULT_BLOCK_SIZE, block_count, check_block_size
from .disks import Disk, open_disk
from .durable import fsync_dir
from .errors import (
    DiskFullError,
    DiskIOError,
    DiskSizeMismatchError,
    FrameAuthError,
    FrameGapError,
    FrameReplayError,
    FrameSequenceError,
    OutOfRangeError,
    PointNotFoundError,
    ReplicationError,
    SessionNotOpenError,
    StaleSessionError,
    UsageError,
    VolumeDiskFullError,
    VolumeInUseError,
)
from .frame import TAG_SIZE, DecodedFrame, FrameDecoder, FrameHeader, peek_header
from .hashmap import WINDOW_BLOCKS, DiskWindow, ExtentCursor, HashMap
from .history import HistoryPolicy, ScratchBuffer, VolumeHistory, parse_marker
from .journal import PointInfo
from .keys import SALT_SIZE
from .ordering import ORDER_SIZE
from .volumes import VolumeRegistry, volume_disk_id

__all__ = [
    "APPLIED",
    "DUPLICATE",
    "MAX_HASHMAP_CHUNK_BLOCKS",
    "PERSISTED_EARLIER",
    "Applier",
    "ApplyResult",
    "ApplyState",
]

#: The frame was written (durable after the next commit).
APPLIED = "applied"
#: The frame was already applied and this copy is verified identical (same tag).
DUPLICATE = "duplicate"
#: The seq is older than the last persisted one: acknowledged, not applied, not re-verifiable.
PERSISTED_EARLIER = "persisted_earlier"
#: Largest number of digests in one HashMapChunk (proto: <= 65536).
MAX_HASHMAP_CHUNK_BLOCKS = 65536
#: SQLite integers are signed 64-bit: seqs stay below 2**63 (never reached in practice).
_MAX_SEQ = (1 << 63) - 1
#: plaintext bytes of frames decoded ahead of the writer, all streams together
DECODE_AHEAD_BYTES = 64 << 20

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    volume TEXT NOT NULL,
    session BLOB NOT NULL,
    persisted_seq INTEGER NOT NULL,
    last_tag BLOB,
    block_size INTEGER NOT NULL,
    updated REAL NOT NULL,
    PRIMARY KEY (volume, session)
)
"""
# the newest ordered session whose frame was applied, per volume (its order number is
# the first 8 bytes of the salt: u64, too large for an SQLite integer)
_ORDER_SCHEMA = """
CREATE TABLE IF NOT EXISTS volume_order (
    volume TEXT PRIMARY KEY,
    session BLOB NOT NULL
)
"""
# 2: volume_order (a version 1 file is upgraded in place; a version 1 build refuses 2)
_SCHEMA_VERSION = 2
#: session MAC keys kept (one HKDF each to derive)
_ACK_KEYS_KEPT = 256

SessionKey = tuple[str, bytes]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ApplyResult:
    """What happened to one frame; ``persisted_seq`` is the session's durable seq now."""

    seq: int
    status: str  # APPLIED | DUPLICATE | PERSISTED_EARLIER
    persisted_seq: int

    @property
    def applied(self) -> bool:
        """Whether this call wrote the frame's data."""
        return self.status == APPLIED


@dataclass
class _Session:
    """In-memory progress of one open session."""

    volume: str
    session: bytes
    block_size: int
    persisted_seq: int
    last_tag: bytes | None  # tag of the frame at persisted_seq
    applied_seq: int = 0
    #: tags of applied, not yet committed frames: seq -> tag (cleared by commit)
    pending: dict[int, bytes] = field(default_factory=dict)

    disk_id: bytes = b""

    def __post_init__(self) -> None:
        self.applied_seq = self.persisted_seq
        self.disk_id = volume_disk_id(self.volume)

    def tag_of(self, seq: int) -> bytes | None:
        """Return the kept tag of ``seq``, or None when it is no longer known."""
        if seq == self.persisted_seq:
            return self.last_tag
        return self.pending.get(seq)

    def forget_pending(self) -> None:
        """Fall back to the recorded state (after a failed flush)."""
        self.applied_seq = self.persisted_seq
        self.pending.clear()


class _Budget:
    """Bytes held by frames decoded ahead, shared by every stream of one applier.

    :meth:`take` waits while the budget is spent; a frame larger than the whole
    budget passes once nothing else is held, so no frame waits forever. Each take
    returns a :class:`_Hold` to release once (again is a no-op).
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._used = 0
        self._cond = threading.Condition()

    def take(self, n: int) -> _Hold:
        with self._cond:
            while self._used and self._used + n > self._limit:
                self._cond.wait()
            self._used += n
        return _Hold(self, n)

    def give(self, n: int) -> None:
        with self._cond:
            self._used -= n
            self._cond.notify_all()


class _Hold:
    """Bytes taken from a :class:`_Budget`; :meth:`release` gives them back once."""

    def __init__(self, budget: _Budget, n: int) -> None:
        self._budget: _Budget | None = budget
        self._n = n

    def release(self) -> None:
        budget, self._budget = self._budget, None
        if budget is not None:
            budget.give(self._n)


#: the budget hold of each predecoded frame's future (gone with the future)
_HOLDS: weakref.WeakKeyDictionary[Future, _Hold] = weakref.WeakKeyDictionary()


class ApplyState:
    """The durable per-session state: an SQLite file in the master target's data dir."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with self._errors("open"):
            # the master target serialises every call with one lock; RPC threads differ
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: each commit is fsynced; WAL + NORMAL could lose acked state on power loss.
            self._db.execute("PRAGMA synchronous=FULL")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, 1, _SCHEMA_VERSION):
                raise UsageError(
                    f"{self.path}: apply state schema {version} is newer than this build"
                )
            self._db.execute(_SCHEMA)
            self._db.execute(_ORDER_SCHEMA)
            self._db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Turn SQLite's I/O failures into typed, retryable errors; roll back what is open."""
        try:
            yield
        except BaseException as err:
            db = getattr(self, "_db", None)
            if db is not None and db.in_transaction:
                # SQLITE_FULL and SQLITE_IOERR may or may not roll back by themselves
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            typed = _state_error(f"{what} apply state {self.path}", err)
            if typed is None:
                raise
            raise typed from err

    def get(self, volume: str, session: bytes) -> tuple[int, bytes | None, int] | None:
        """Return ``(persisted_seq, last_tag, block_size)`` of a session, or None."""
        with self._errors("read"):
            row = self._db.execute(
                "SELECT persisted_seq, last_tag, block_size FROM sessions "
                "WHERE volume = ? AND session = ?",
                (volume, session),
            ).fetchone()
        return None if row is None else (row[0], row[1], row[2])

    def insert(self, volume: str, session: bytes, block_size: int) -> None:
        """Record a new session with nothing persisted."""
        with self._errors("insert into"):
            self._db.execute(
                "INSERT INTO sessions VALUES (?, ?, 0, NULL, ?, ?)",
                (volume, session, block_size, time.time()),
            )

    def newest_sessions(self) -> dict[str, bytes]:
        """Return the newest ordered session of every volume that had one."""
        with self._errors("read"):
            rows = self._db.execute("SELECT volume, session FROM volume_order").fetchall()
        return {volume: bytes(session) for volume, session in rows}

    def record(
        self,
        progress: list[tuple[str, bytes, int, bytes | None]],
        newest: dict[str, bytes] | None = None,
    ) -> None:
        """Store ``(volume, session, persisted_seq, last_tag)`` rows in one transaction.

        ``newest`` (volume -> session) updates the newest ordered sessions in the same
        transaction. On failure nothing is recorded (the transaction is rolled back)
        and a typed error is raised: :class:`VolumeDiskFullError` when the device is full.
        """
        now = time.time()
        rows = [(seq, tag, now, vol, sess) for vol, sess, seq, tag in progress]
        with self._errors("record progress in"):
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany(
                "UPDATE sessions SET persisted_seq = ?, last_tag = ?, updated = ? "
                "WHERE volume = ? AND session = ?",
                rows,
            )
            self._db.executemany(
                "INSERT OR REPLACE INTO volume_order VALUES (?, ?)", sorted((newest or {}).items())
            )
            self._db.execute("COMMIT")  # fsynced (synchronous=FULL) before it returns

    def close(self) -> None:
        """Close the database; idempotent."""
        self._db.close()


class Applier:
    """Apply frames to the registry's volumes and record durable progress.

    Not thread-safe (the master target serialises calls with one lock), except
    :meth:`predecode`, which any thread may call at any time.
    """

    #: blocks of a volume's hash map computed at once (16 bytes each) by
    #: :meth:`hash_map_chunks`: what bounds its memory, whatever the volume's size
    map_window_blocks: int = WINDOW_BLOCKS

    def __init__(
        self,
        registry: VolumeRegistry,
        state_db_path: str | Path,
        secret: bytes,
        *,
        history_dir: str | Path | None = None,
        policy: HistoryPolicy | None = None,
        clock: Callable[[], float] = time.time,
        decode_workers: int = 0,
        decode_ahead_bytes: int = DECODE_AHEAD_BYTES,
    ) -> None:
        self.registry = registry
        # with a history directory every volume keeps an undo journal and points
        self._history_dir = Path(history_dir) if history_dir is not None else None
        self._policy = policy or HistoryPolicy()
        self._clock = clock
        self._histories: dict[str, VolumeHistory] = {}
        self._scratch = ScratchBuffer()  # one thread applies at a time: one buffer for all
        self._secret = bytes(secret)
        self._decoder = FrameDecoder(secret)  # the applying thread's own
        self._local = threading.local()  # one decoder per decode-pool thread
        self._pool = (
            ThreadPoolExecutor(decode_workers, thread_name_prefix="decode")
            if decode_workers > 0
            else None
        )
        self._ahead = _Budget(decode_ahead_bytes)
        self._state = ApplyState(state_db_path)
        # volume -> salt of its newest ordered session (admitted); and those not recorded
        self._newest: dict[str, bytes] = self._state.newest_sessions()
        self._newest_unrecorded: dict[str, bytes] = {}
        self._ack_keys: OrderedDict[SessionKey, AckAuthenticator] = OrderedDict()
        self._disks: dict[str, Disk] = {}
        self._sessions: dict[SessionKey, _Session] = {}
        self._touched: set[str] = set()  # volumes written since the last commit
        # epoch-end markers applied since the last commit: (volume, block size, record);
        # their points are made once the commit flushed the volume (design.md E5)
        self.markers: list[tuple[str, int, dict]] = []

    # -- sessions -------------------------------------------------------------------

    def open_session(
        self, volume: str, session_salt: bytes, block_size: int, volume_size: int
    ) -> int:
        """Open (or resume) a session; return its persisted seq.

        The volume is opened writable here, so a volume the disk layer refuses
        (a VMDK in a snapshot chain, a read-only format) fails before any frame.
        Raises DiskSizeMismatchError if the volume is smaller than ``volume_size``.
        """
        session = _check_salt(session_salt)
        check_block_size(block_size)
        disk = self._disk(volume)
        if disk.virtual_size < volume_size:
            raise DiskSizeMismatchError(
                f"volume {volume!r} has {disk.virtual_size} bytes; the source has {volume_size}",
                hint="create a volume at least as large as the source disk",
            )
        newest = self._newest.get(volume)
        if newest is not None:  # an ordered volume: every session is read as ordered
            _refuse_if_stale(volume, session, _order_of(session), newest)
        key = (volume, session)
        if key not in self._sessions:
            self._sessions[key] = self._load_session(volume, session, block_size)
        elif self._sessions[key].block_size != block_size:
            raise UsageError(f"session already open with block size {block_size}")
        return self._sessions[key].persisted_seq

    def _load_session(self, volume: str, session: bytes, block_size: int) -> _Session:
        row = self._state.get(volume, session)
        if row is None:
            self._state.insert(volume, session, block_size)
            return _Session(volume, session, block_size, 0, None)
        persisted, tag, recorded_bs = row
        if recorded_bs != block_size:
            raise UsageError(
                f"session {session.hex()} on {volume!r} was opened with block size "
                f"{recorded_bs}, not {block_size}"
            )
        return _Session(volume, session, block_size, persisted, tag)

    def session_state(self, volume: str, session: bytes) -> int:
        """Return the durable persisted seq of a session (0: nothing, or unknown session)."""
        self.registry.path(volume)  # unknown or invalid volume names are typed errors
        row = self._state.get(volume, _check_salt(session))
        return 0 if row is None else row[0]

    def _disk(self, volume: str) -> Disk:
        disk = self._disks.get(volume)
        if disk is None:
            disk = open_disk(self.registry.path(volume), writable=True)
            self._disks[volume] = disk
        return disk

    # -- frames ---------------------------------------------------------------------

    def predecode(self, frame_bytes: bytes) -> Future[DecodedFrame]:
        """Verify and decode a frame (on the decode pool, or right here); return its future.

        Thread-safe, and reads no session state: any thread (the master target's
        stream reader) may call it while another applies, so a batch is decoded
        while the previous one is written. The result is handed to
        :meth:`apply_batch`, which still checks the header binds the frame to its
        session and volume before using it. Without a pool (``decode_workers=0``)
        the frame is decoded at once, in the calling thread.

        Memory is bounded for all callers together: while the plaintext of frames
        decoded ahead (futures still alive) would pass ``decode_ahead_bytes``, the
        call waits (a stream reader then stops reading: flow control pushes back).
        """
        done: Future[DecodedFrame]
        try:
            length = peek_header(frame_bytes).length  # plaintext bytes it will hold
        except ReplicationError as err:  # apply_batch raises it (after its own checks)
            done = Future()
            done.set_exception(err)
            return done
        hold = self._ahead.take(length)  # waits while all streams together hold too much
        if self._pool is not None:
            done = self._pool.submit(self._decode_on_worker, frame_bytes)
        else:
            done = Future()
            try:
                done.set_result(self._worker_decoder().decode(frame_bytes))
            except ReplicationError as err:
                done.set_exception(err)
        # given back by apply_batch once the frame is written, or when the future is
        # dropped unused (a stream that ends with frames still queued)
        _HOLDS[done] = hold
        weakref.finalize(done, hold.release)
        return done

    def _decode_on_worker(self, frame_bytes: bytes) -> DecodedFrame:
        return self._worker_decoder().decode(frame_bytes)

    def _worker_decoder(self) -> FrameDecoder:
        """The calling thread's decoder (a decoder reuses a zstd context: one per thread)."""
        decoder = getattr(self._local, "decoder", None)
        if decoder is None:
            decoder = self._local.decoder = FrameDecoder(self._secret)
        return decoder

    def apply(self, volume: str, session: bytes, seq: int, frame_bytes: bytes) -> ApplyResult:
        """Verify one frame and write it if it is the next one; see the module docstring."""
        return self.apply_batch(volume, session, [(seq, frame_bytes, None)])[0]

    def apply_batch(
        self,
        volume: str,
        session: bytes,
        frames: Sequence[tuple[int, bytes, Future[DecodedFrame] | None]],
    ) -> list[ApplyResult]:
        """Apply ``(seq, frame bytes, predecoded or None)`` of one session, in order.

        The same results and errors as :meth:`apply` frame by frame: at the first
        frame that fails, the frames before it are applied and its error is raised.
        Faster: every frame is verified first, then the undo of every range is
        journaled with ONE journal fsync (J1: before any of these writes is issued),
        then the frames are written.
        """
        state = self._sessions.get((volume, bytes(session)))
        if state is None:
            raise SessionNotOpenError(
                f"session {bytes(session).hex()} on volume {volume!r} is not open",
                hint="send OpenSession first",
            )
        results: list[ApplyResult] = []
        writes: list[DecodedFrame] = []
        failure: Exception | None = None
        for seq, frame_bytes, decoded in frames:
            try:
                result, frame = self._admit(state, seq, frame_bytes, decoded)
            except Exception as err:  # the admitted frames before it are still written
                failure = err
                break
            results.append(result)
            if frame is not None:
                writes.append(frame)
        try:
            if writes:
                self._write_batch(volume, writes, state.block_size)
        finally:
            for _seq, _frame, decoded in frames:  # the plaintext is no longer needed
                hold = _HOLDS.get(decoded) if decoded is not None else None
                if hold is not None:
                    hold.release()
        if failure is not None:
            raise failure
        return results

    def _admit(
        self,
        state: _Session,
        seq: int,
        frame_bytes: bytes,
        decoded: Future[DecodedFrame] | None,
    ) -> tuple[ApplyResult, DecodedFrame | None]:
        """Verify and classify one frame; return its result and the frame to write (if any).

        Advances the session's applied seq: the caller writes the returned frames
        before anything is committed (a failed write forgets the volume's progress).
        """
        frame = self._verify(state, seq, frame_bytes, decoded)
        self._check_order(state, frame.header)  # authenticated: its salt is genuine
        tag = bytes(frame_bytes[-TAG_SIZE:])
        if seq <= state.applied_seq:
            return self._resent(state, seq, tag), None
        if seq != state.applied_seq + 1:
            raise FrameGapError(
                f"frame seq {seq} on {state.volume!r}: expected {state.applied_seq + 1}",
                hint=f"resume from persisted seq {state.persisted_seq} + 1",
            )
        write: DecodedFrame | None = None
        if frame.marker:  # never written: a boundary for the recovery history
            self.markers.append((state.volume, state.block_size, parse_marker(frame.data)))
        else:
            self._check_range(state.volume, frame)
            write = frame
        state.applied_seq = seq
        state.pending[seq] = tag
        self._touched.add(state.volume)
        return ApplyResult(seq, APPLIED, state.persisted_seq), write

    def _verify(
        self,
        state: _Session,
        seq: int,
        frame_bytes: bytes,
        decoded: Future[DecodedFrame] | None = None,
    ) -> DecodedFrame:
        """Check the header binds the frame here, then authenticate and decode it."""
        header = peek_header(frame_bytes)
        if header.seq != seq:
            raise FrameSequenceError(f"message seq {seq} != frame header seq {header.seq}")
        if not 1 <= seq <= _MAX_SEQ:
            raise FrameSequenceError(f"frame seq {seq} outside 1..{_MAX_SEQ}")
        if header.salt != state.session:
            raise FrameAuthError(f"frame seq {seq} belongs to session {header.salt.hex()}")
        if header.disk_id != state.disk_id:
            raise FrameAuthError(
                f"frame seq {seq} is for disk {header.disk_id.hex()}, not volume {state.volume!r}"
            )
        if decoded is not None:
            return decoded.result()  # raises the decoder's typed error
        return self._decoder.decode(frame_bytes)

    def _check_order(self, state: _Session, header: FrameHeader) -> None:
        """Refuse a session older than its volume's newest; a newer one becomes the newest."""
        newest = self._newest.get(state.volume)
        order = header.order
        if order is None:
            if newest is not None:
                raise StaleSessionError(
                    f"unordered session {state.session.hex()} on {state.volume!r}, which "
                    f"ordered session {newest.hex()} wrote",
                    hint="upgrade the source agent: a volume never goes back to unordered",
                )
            return
        if newest == state.session:
            return
        if newest is not None:
            _refuse_if_stale(state.volume, state.session, order, newest)
        self._newest[state.volume] = state.session
        self._newest_unrecorded[state.volume] = state.session

    def ack_mac(self, volume: str, session: bytes, seq: int) -> bytes:
        """The MAC of "``session`` on ``volume`` is PERSISTED up to ``seq``" (acks, states)."""
        key = (volume, _check_salt(session))
        auth = self._ack_keys.get(key)
        if auth is None:
            auth = self._ack_keys[key] = AckAuthenticator(self._secret, volume, key[1])
            if len(self._ack_keys) > _ACK_KEYS_KEPT:
                self._ack_keys.popitem(last=False)
        else:
            self._ack_keys.move_to_end(key)
        return auth.mac(seq)

    def _resent(self, state: _Session, seq: int, tag: bytes) -> ApplyResult:
        """Answer a frame at or below the applied seq without applying it."""
        kept = state.tag_of(seq)
        if kept is None:
            # Older than the last persisted frame: no tag kept, cannot compare.
            return ApplyResult(seq, PERSISTED_EARLIER, state.persisted_seq)
        if kept != tag:
            raise FrameReplayError(
                f"frame seq {seq} on {state.volume!r} was already applied with other content",
                hint="a source must never reuse a seq within a session",
            )
        return ApplyResult(seq, DUPLICATE, state.persisted_seq)

    def _check_range(self, volume: str, frame: DecodedFrame) -> None:
        size = self._disk(volume).virtual_size
        end = frame.offset + len(frame.data)
        if end > size:
            raise OutOfRangeError(
                f"frame seq {frame.seq} writes [{frame.offset}, {end}) "
                f"past the end of volume {volume!r} ({size} bytes)"
            )

    def _write_batch(self, volume: str, frames: list[DecodedFrame], block_size: int) -> None:
        """Journal the undo of every frame (one fsync), then write them in order (E6)."""
        disk = self._disk(volume)
        history = self._history(volume, block_size)
        with self._volume_errors(volume, "write"):
            if history is not None:  # undo first, durably, for the whole batch
                history.before_writes(disk, [(f.offset, len(f.data)) for f in frames])
            for frame in frames:
                if _all_zeros(frame):
                    disk.write_zeroes(frame.offset, len(frame.data))  # sparse stays sparse
                else:
                    disk.write(frame.offset, frame.data)
                if history is not None:
                    history.after_write(frame.offset, frame.data, disk.read)

    # -- recovery history -----------------------------------------------------------

    def _history(self, volume: str, block_size: int) -> VolumeHistory | None:
        if self._history_dir is None:
            return None
        history = self._histories.get(volume)
        if history is None:
            history = VolumeHistory(
                self._history_dir / volume,
                volume,
                self._disk(volume),
                block_size,
                self._policy,
                clock=self._clock,
                scratch=self._scratch,
            )
            self._histories[volume] = history
        return history

    def _record_points(self) -> None:
        """Points for the markers of this commit: the volumes are flushed up to them."""
        markers, self.markers = self.markers, []
        for volume, block_size, record in markers:
            history = self._history(volume, block_size)
            if history is not None:
                history.on_epoch_end(record)

    def points(self, volume: str) -> list[PointInfo]:
        """The recovery points of ``volume`` (none without a history directory)."""
        self.registry.get(volume)  # UnknownVolumeError for a name never registered
        if self._history_dir is None or not (self._history_dir / volume).exists():
            return []
        return self._history(volume, DEFAULT_BLOCK_SIZE).points()

    def produce(self, volume: str, spec: str, out: Disk) -> PointInfo:
        """Write ``volume`` as it was at point ``spec`` into ``out``, verified."""
        self.registry.get(volume)
        history = None
        if self._history_dir is not None and (self._history_dir / volume).exists():
            history = self._history(volume, DEFAULT_BLOCK_SIZE)
        if history is None:
            raise PointNotFoundError(f"volume {volume!r} has no recovery points")
        return history.produce(spec, self._disk(volume), out)

    # -- durability -----------------------------------------------------------------

    def commit(self) -> dict[SessionKey, int]:
        """Flush every touched volume, THEN record progress; return persisted seqs.

        Returns the persisted seq of every session that applied frames since the
        last commit. See "Durability order" in the module docstring.
        """
        for volume in sorted(self._touched):
            with self._volume_errors(volume, "flush"):
                self._disks[volume].flush()
        return self._record_progress()

    def commit_each(self) -> tuple[dict[SessionKey, int], dict[str, ReplicationError]]:
        """Like :meth:`commit`, but a volume that fails to flush holds back no other.

        Every touched volume is flushed; one that fails has its unrecorded progress
        forgotten (as :meth:`commit` does) and its error returned instead of raised;
        the progress of the others is then recorded. Returns the persisted seqs and
        ``{volume: error}``. A failure to record (the state's device) still raises.
        For a master target applying many sessions at once: one commit for all.
        """
        failed: dict[str, ReplicationError] = {}
        for volume in sorted(self._touched):
            try:
                with self._volume_errors(volume, "flush"):
                    self._disks[volume].flush()
            except ReplicationError as err:
                failed[volume] = err
        return self._record_progress(), failed

    def _record_progress(self) -> dict[SessionKey, int]:
        """Points, then the apply state, for everything flushed (see :meth:`commit`)."""
        # before recording: a crash in between resends the marker, and the point is made
        self._record_points()
        progress = [s for s in self._sessions.values() if s.applied_seq > s.persisted_seq]
        if not progress and not self._newest_unrecorded:
            return {}
        self._state.record(
            [(s.volume, s.session, s.applied_seq, s.pending[s.applied_seq]) for s in progress],
            self._newest_unrecorded,
        )
        self._newest_unrecorded = {}
        for s in progress:
            s.persisted_seq, s.last_tag = s.applied_seq, s.pending[s.applied_seq]
            s.pending.clear()
        self._touched.clear()
        return {(s.volume, s.session): s.persisted_seq for s in progress}

    @contextlib.contextmanager
    def _volume_errors(self, volume: str, what: str) -> Iterator[None]:
        """On a failed write or flush: forget, drop the handle, and type a full device."""
        try:
            yield
        except BaseException as err:
            self._forget_volume(volume)
            self._drop_disk(volume)
            if isinstance(err, DiskFullError) and not isinstance(err, VolumeDiskFullError):
                raise VolumeDiskFullError(
                    f"{what} volume {volume!r}: {err.message}",
                    hint="free space on the volume's device; the frames are retried",
                ) from err
            raise

    def _forget_volume(self, volume: str) -> None:
        """After a failed write or flush nothing unrecorded on ``volume`` can be trusted."""
        for s in self._sessions.values():
            if s.volume == volume:
                s.forget_pending()
        self._touched.discard(volume)
        # a marker of forgotten progress is resent with its frames: no point from it now
        self.markers = [m for m in self.markers if m[0] != volume]

    def _drop_disk(self, volume: str) -> None:
        """Close a volume's handle after a failure; the next frame reopens it from disk.

        A failed write may leave the handle's in-memory tables ahead of the file (a
        grain table allocated in memory, its directory entry never written), so it is
        never written through again. Closing tries a last flush: whatever it writes
        is verified data at its own offset, and the source resends it anyway.
        """
        disk = self._disks.pop(volume, None)
        if disk is None:
            return
        try:
            disk.close()
        except Exception as err:  # the device is still failing: the handle is gone anyway
            log.warning("event=volume_close_failed volume=%s error=%s", volume, err)

    # -- hash maps ------------------------------------------------------------------

    def hash_map_chunks(
        self,
        volume: str,
        block_size: int,
        covered_size: int,
        chunk_blocks: int = MAX_HASHMAP_CHUNK_BLOCKS,
    ) -> Iterator[tuple[int, bytes, int, int]]:
        """Yield ``(first_block, digests, volume_size, block_count)`` chunks of the map.

        ``digests`` holds at most ``chunk_blocks`` 16-byte digests. The map is computed
        a window (:attr:`map_window_blocks`) at a time, each window when the caller
        asks for its first chunk: memory is 16 bytes per block of one window, whatever
        the volume's size. The caller serialises each ``next()`` with the applier's
        other calls (it reads the volume): a window is hashed through the writable
        handle if a session has one open (it sees its own writes), else through a
        handle opened for that window alone, so no window reads through a handle
        older than the writes before it. An empty map still yields one empty chunk so
        the caller learns the volume size. Raises DiskSizeMismatchError, on the first
        ``next()``, if ``covered_size`` exceeds the volume.
        """
        check_block_size(block_size)
        if not 1 <= chunk_blocks <= MAX_HASHMAP_CHUNK_BLOCKS:
            raise UsageError(f"chunk_blocks {chunk_blocks} outside 1..{MAX_HASHMAP_CHUNK_BLOCKS}")
        with self._map_disk(volume) as disk:
            volume_size = disk.virtual_size
            if not 0 <= covered_size <= volume_size:
                raise DiskSizeMismatchError(
                    f"volume {volume!r} has {volume_size} bytes; "
                    f"cannot hash {covered_size} bytes of it",
                    hint="create a volume at least as large as the source disk",
                )
        total = block_count(covered_size, block_size)
        if total == 0:
            yield (0, b"", volume_size, 0)
        window = max(chunk_blocks, self.map_window_blocks // chunk_blocks * chunk_blocks)
        for start in range(0, total, window):
            digests = self._map_window(volume, block_size, covered_size, start, window)
            for first in range(0, len(digests), chunk_blocks):
                piece = digests[first : first + chunk_blocks].tobytes()
                yield (start + first, piece, volume_size, total)

    def _map_window(
        self, volume: str, block_size: int, covered_size: int, first: int, count: int
    ) -> np.ndarray:
        """Digests of blocks ``[first, first + count)`` of the volume (fewer at its end)."""
        start = first * block_size
        length = min(count * block_size, covered_size - start)
        with self._map_disk(volume) as disk:
            part = DiskWindow(disk, start, length, ExtentCursor(disk))
            return HashMap.compute(part, block_size).digests

    @contextlib.contextmanager
    def _map_disk(self, volume: str) -> Iterator[Disk]:
        # Reuse the writable handle if a session has it open: it sees its own writes.
        disk = self._disks.get(volume)
        if disk is not None:
            yield disk
            return
        with open_disk(self.registry.path(volume)) as own:
            yield own

    # -- handing a volume over --------------------------------------------------------

    def release(self, volume: str) -> None:
        """Let go of ``volume``'s handles before the registry releases it (ReleaseVolume).

        Refused (VolumeInUseError) while frames of it are applied but not committed.
        Its history is closed (journal synced) and set aside under
        ``released-history/`` beside the history directory: its undo records and
        points describe a disk another writer is about to change, so a later take-back
        starts a new history instead of offering points that no longer hold. Then the
        disk is flushed (fsynced) and closed, and its sessions leave memory (their
        durable state stays: a session resumed after a take-back continues).
        """
        self.registry.path(volume)  # UnknownVolumeError for a name never known
        unapplied = volume in self._touched or any(m[0] == volume for m in self.markers)
        if unapplied or any(
            s.volume == volume and s.applied_seq > s.persisted_seq for s in self._sessions.values()
        ):
            raise VolumeInUseError(
                f"volume {volume!r} has frames applied but not yet committed",
                hint="retry once they are PERSISTED (a moment)",
            )
        history = self._histories.pop(volume, None)
        if history is not None:
            history.close()
        self._set_history_aside(volume)
        disk = self._disks.pop(volume, None)
        if disk is not None:
            try:
                disk.flush()
            finally:
                disk.close()
        for key in [k for k in self._sessions if k[0] == volume]:
            del self._sessions[key]

    def _set_history_aside(self, volume: str) -> None:
        if self._history_dir is None or not (self._history_dir / volume).exists():
            return
        aside = self._history_dir.parent / "released-history"
        try:
            aside.mkdir(exist_ok=True)
            (self._history_dir / volume).rename(aside / f"{volume}.{time.time_ns()}")
            fsync_dir(self._history_dir)
            fsync_dir(aside)
        except OSError as err:
            raise DiskIOError(f"set the history of {volume!r} aside: {err}") from err

    # -- lifetime -------------------------------------------------------------------

    def close(self) -> None:
        """Close volumes and the state database WITHOUT committing (like a crash would)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        for history in self._histories.values():
            history.close()
        self._histories.clear()
        for disk in self._disks.values():
            disk.close()
        self._disks.clear()
        self._sessions.clear()
        self._touched.clear()
        self._state.close()

    def __enter__(self) -> Applier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@functools.lru_cache(maxsize=64)
def _zero_digest(length: int) -> bytes:
    """XXH3-128 of ``length`` zero bytes (hashed in 1 MiB pieces, no big buffer)."""
    h, chunk = xxhash.xxh3_128(), bytes(min(length, 1 << 20))
    for pos in range(0, length, len(chunk)):
        h.update(memoryview(chunk)[: min(len(chunk), length - pos)])
    return h.digest()


def _all_zeros(frame: DecodedFrame) -> bool:
    """Whether a frame's data is all zeros; free for the usual non-zero frame.

    The decoder verified ``frame.digest`` against the data, and equal bytes hash
    equal: a digest other than the zeros' proves non-zero data without a scan. Only
    a frame that hashes like zeros is scanned (so a collision can never turn data
    into zeros).
    """
    data = frame.data
    if frame.digest and frame.digest != _zero_digest(len(data)):
        return False
    words = np.frombuffer(data, dtype=np.uint64 if len(data) % 8 == 0 else np.uint8)
    return not words.any()


def _order_of(session: bytes) -> int:
    """The order number an ordered session's salt starts with."""
    return int.from_bytes(session[:ORDER_SIZE], "big")


def _refuse_if_stale(volume: str, session: bytes, order: int, newest: bytes) -> None:
    """StaleSessionError unless ``session`` (of ``order``) is the newest or newer."""
    newest_order = _order_of(newest)
    if order > newest_order or session == newest:
        return
    raise StaleSessionError(
        f"session {session.hex()} (order {order}) on {volume!r} is older than session "
        f"{newest.hex()} (order {newest_order}), which the master target applied",
        hint="an abandoned session's frames: the newer session resent what it needed; "
        "drop this session",
    )


def _check_salt(session: bytes) -> bytes:
    session = bytes(session)
    if len(session) != SALT_SIZE:
        raise UsageError(f"session id must be {SALT_SIZE} bytes, not {len(session)}")
    return session


def _state_error(context: str, err: BaseException) -> DiskIOError | None:
    """Map an SQLite failure: full device -> VolumeDiskFullError, I/O -> DiskIOError."""
    if not isinstance(err, sqlite3.Error):
        return None
    code = (getattr(err, "sqlite_errorcode", None) or 0) & 0xFF  # primary of an extended code
    if code == sqlite3.SQLITE_FULL:
        return VolumeDiskFullError(
            f"{context}: no space left on device",
            hint="free space in the master target's data directory; the frames are retried",
        )
    if code == sqlite3.SQLITE_IOERR:
        return DiskIOError(f"{context}: {err}")
    return None  # corruption or a bug: not ours to dress up

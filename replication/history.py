"""Recovery history of one master-target volume: undo journal, manifests, points.

Theory of operation
-------------------
The applier calls, for every batch of data frames, :meth:`VolumeHistory.before_writes`
(the old bytes of every range go to the undo journal, then one fsync: rule J1 of
docs/journal.md, durable before any of the batch's volume writes is issued) and,
for each write, :meth:`after_write` (the live block digests follow the write). A
session shipped by a tracked source ends with an epoch-end marker (docs/protocol.md,
"Marker frames"); once the applier has flushed everything before it,
:meth:`on_epoch_end` learns whether the volume now equals the source at a cut
(``consistent``) and, if so, records a recovery point: at once for a tag
(app-consistent, or a named crash-consistent cut of a group), else a
crash-consistent point when the last one is older than ``crash_interval``. A volume
that is mid-epoch, or was last brought level by a hash-compare resync, gets no
point: the last good one stays usable.

Each point stores its manifest (per-block XXH3-128 digests and a SHA-256 Merkle
root, incrementally: :mod:`replication.manifest`), so a produced disk is verified
against the digests of its point before it is handed out. Time comes from an
injectable clock (tests jump it).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from .disks.base import Disk
from .errors import ManifestError, RemoteProtocolError, VerifyMismatchError
from .hashmap import HashMap
from .journal import UNDO_CHUNK, Journal, PointInfo
from .manifest import DigestTracker, ManifestStore

__all__ = ["HistoryPolicy", "ScratchBuffer", "VolumeHistory", "parse_marker"]

log = logging.getLogger(__name__)

#: largest marker record accepted (a hostile one must not cost memory)
MAX_MARKER = 64 << 10


@dataclass(frozen=True)
class HistoryPolicy:
    """Retention and point schedule (the scenario's failback policy by default)."""

    retention_seconds: float = 24 * 3600.0
    retention_bytes: int = 64 << 30
    crash_interval: float = 300.0


class ScratchBuffer:
    """A reused buffer for the old bytes of a range, before they are journaled.

    Allocating a fresh buffer per write costs page faults on every MiB (and on a
    VM, fresh memory is slow to touch); one buffer, grown on demand, stays warm.
    Share one between the histories that one thread uses at a time.
    """

    def __init__(self) -> None:
        self._buf = bytearray()

    def view(self, length: int) -> memoryview:
        if len(self._buf) < length:
            self._buf = bytearray(length)
        return memoryview(self._buf)[:length]


def parse_marker(data: bytes) -> dict:
    """Decode an epoch-end marker record; a malformed one is a protocol error."""
    if len(data) > MAX_MARKER:
        raise RemoteProtocolError(f"marker record of {len(data)} bytes (max {MAX_MARKER})")
    try:
        record = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RemoteProtocolError(f"marker record is not JSON: {err}") from None
    if not isinstance(record, dict) or record.get("type") != "epoch-end":
        raise RemoteProtocolError("marker record is not an epoch-end record")
    tag = record.get("tag")
    if tag is not None and not (isinstance(tag, dict) and tag.get("kind") in ("app", "crash")):
        raise RemoteProtocolError("marker tag must have kind 'app' or 'crash'")
    return record


class VolumeHistory:
    """The undo journal, manifest store and recovery points of one volume."""

    def __init__(
        self,
        directory: str | Path,
        volume: str,
        disk: Disk,
        block_size: int,
        policy: HistoryPolicy | None = None,
        *,
        clock: Callable[[], float] = time.time,
        scratch: ScratchBuffer | None = None,
    ) -> None:
        self.volume = volume
        self._scratch = scratch or ScratchBuffer()
        self.block_size = block_size
        self.policy = policy or HistoryPolicy()
        self._clock = clock
        root = Path(directory)
        self.journal = Journal.open(
            root,
            volume=volume,
            retention_bytes=self.policy.retention_bytes,
            retention_seconds=self.policy.retention_seconds,
            clock=clock,
        )
        self.store = ManifestStore(root / "manifests")
        self._digests = DigestTracker(self._initial_map(disk))
        # unknown after a restart: no point until a consistent epoch ends
        self.consistent = False
        crash = [p for p in self.journal.points() if p.kind == "crash"]
        self._last_crash = crash[-1].time if crash else float("-inf")

    def _initial_map(self, disk: Disk) -> HashMap:
        """The live digests: hashed from the volume once when the history opens."""
        return HashMap.compute(disk, self.block_size)

    # --- the write path ---------------------------------------------------------------

    def before_write(self, disk: Disk, offset: int, length: int) -> None:
        """Journal the bytes a write will overwrite, durably (before it is issued)."""
        self.before_writes(disk, [(offset, length)])

    def before_writes(self, disk: Disk, ranges: Iterable[tuple[int, int]]) -> None:
        """Journal the bytes a batch of writes will overwrite, then fsync once (J1).

        Every range is preserved before any of the writes is issued, so each range
        is read as it was before the batch (a range two writes share is journaled
        once, with its oldest bytes); one journal fsync then covers the whole batch
        instead of one per write.
        """
        self.consistent = False  # mid-epoch from now until the epoch's marker
        for offset, length in ranges:
            self._preserve(disk, offset, length)
        self.journal.sync()  # a no-op when nothing was appended

    def _preserve(self, disk: Disk, offset: int, length: int) -> None:
        """``Journal.preserve`` (the same records), reading through the scratch buffer."""
        for start, size in self.journal.uncovered(offset, length):
            for pos in range(start, start + size, UNDO_CHUNK):
                view = self._scratch.view(min(UNDO_CHUNK, start + size - pos))
                disk.read_into(pos, view)
                self.journal.record_undo(pos, view)  # copies what it keeps

    def after_write(self, offset: int, data: bytes, read: Callable[[int, int], bytes]) -> None:
        self._digests.note_write(offset, data, read)

    # --- epochs and points ------------------------------------------------------------

    def on_epoch_end(self, record: dict) -> PointInfo | None:
        """The volume is flushed at an epoch boundary: record a point if one is due."""
        self.consistent = bool(record.get("consistent"))
        if not self.consistent:
            log.info("event=no_point volume=%s reason=resync_epoch", self.volume)
            return None
        tag = record.get("tag")
        if tag:
            return self.add_point(
                str(tag["kind"]), tag=str(tag.get("name", "")), group=str(tag.get("group", ""))
            )
        now = self._clock()
        if now < self._last_crash:
            # the clock stepped back: measure the interval from now, or no crash point
            # would be made until the clock caught up again
            self._last_crash = now
        if now - self._last_crash >= self.policy.crash_interval:
            return self.add_point("crash")
        return None

    def add_point(self, kind: str, *, tag: str = "", group: str = "") -> PointInfo:
        """Record a point of the volume as it is now (flushed, at an epoch boundary)."""
        points = self.journal.points()
        parent = points[-1].manifest_root if points else None
        if parent is not None and not self.store.exists(parent):
            parent = None
        root = self.store.commit(
            self._digests.digests,
            self.block_size,
            self._digests.hmap.covered_size,
            parent=parent,
            changed_groups=self._digests.take_changed_groups() if parent else None,
        )
        point = self.journal.add_point(kind, manifest_root=root, tag=tag, group=group)
        if kind == "crash":
            # the schedule runs on the clock as it reads now; point times themselves are
            # clamped so they never go backwards
            self._last_crash = self._clock()
        self._prune()
        log.info(
            "event=recovery_point volume=%s id=%d kind=%s tag=%s group=%s root=%s",
            self.volume,
            point.id,
            kind,
            tag,
            group,
            root[:16],
        )
        return point

    def _prune(self) -> None:
        self.journal.prune()
        self.store.gc(p.manifest_root for p in self.journal.points())

    def points(self) -> list[PointInfo]:
        return self.journal.points()

    def find(self, spec: str) -> PointInfo:
        return self.journal.find(spec)

    # --- producing and verifying --------------------------------------------------------

    def produce(self, spec: str, live: Disk, out: Disk) -> PointInfo:
        """Write the volume at point ``spec`` into ``out`` and verify it against the point."""
        point = self.journal.find(spec)
        self.journal.restore_into(point, live, out)
        self.verify(out, point)
        return point

    def verify(self, disk: Disk, point: PointInfo) -> None:
        """Raise VerifyMismatchError unless ``disk`` equals ``point`` block for block."""
        try:
            differing = self.store.verify_disk(disk, point.manifest_root)
        except ManifestError:
            raise
        if differing:
            first, count = differing[0]
            raise VerifyMismatchError(
                f"disk differs from point {point.id} of {self.volume!r} in {len(differing)} "
                f"range(s), the first at block {first} ({count} blocks)"
            )

    def close(self) -> None:
        self.journal.close()

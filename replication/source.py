"""The source side of a replication session, sans-I/O.

Theory of operation
-------------------
A session starts with a fresh frame key (a new random salt, so a restarted source
never reuses a nonce) and a plan: the blocks whose digests differ between the
source disk and the target's hash map. :meth:`SourceSession.next_frames` reads and
seals those blocks, in offset order, as frames with sequence numbers 1, 2, ...;
each sealed frame is kept (``unacked``) until the master target acknowledges it
PERSISTED, so that after a cut the very same bytes are sent again
(:meth:`resend_after`): re-sealing would reuse a nonce if the disk had changed in
between. The window of kept frames is bounded by ``window_bytes``: a caller stops
asking for frames while :meth:`window_full` is true and resumes on acks.

With ``order`` the session is ordered (its salt carries the number, design S7), and
with ``authenticate_acks`` a PERSISTED ack, or a persisted seq to resume after, is
acted on only with the master target's MAC (:mod:`replication.acks`): one without a
MAC is ignored, one with a wrong MAC raises :class:`ForgedAckError`. Either way no
frame is dropped for it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .acks import AckAuthenticator
from .blocks import block_runs
from .disks import Disk
from .errors import ForgedAckError
from .frame import FrameEncoder
from .hashmap import HashMap
from .protocol import AckLevel
from .volumes import volume_disk_id

__all__ = ["SourceSession", "SourceStats"]

#: plaintext bytes per frame (a run of adjacent differing blocks)
RUN_BYTES = 1 << 20


@dataclass
class SourceStats:
    """Counters of a session (for status and metrics)."""

    blocks_total: int = 0
    blocks_to_send: int = 0
    frames_sent: int = 0
    bytes_plain: int = 0
    bytes_framed: int = 0
    blocks_persisted: int = 0
    persisted_seq: int = 0
    received_seq: int = 0
    #: PERSISTED acks (or resume points) ignored: no MAC where one is required
    unauthenticated_acks: int = 0


class SourceSession:
    """Plan and produce the frames that bring a target volume level with a disk."""

    def __init__(
        self,
        disk: Disk,
        volume: str,
        secret: bytes,
        *,
        block_size: int,
        zstd_level: int = 1,
        window_bytes: int = 64 << 20,
        order: int | None = None,
        authenticate_acks: bool = False,
    ) -> None:
        self.disk = disk
        self.volume = volume
        self.block_size = block_size
        self._encoder = FrameEncoder(secret, volume_disk_id(volume), level=zstd_level, order=order)
        self._acks = AckAuthenticator(secret, volume, self._encoder.session_salt)
        self._authenticate_acks = authenticate_acks
        self._window = window_bytes
        # seq -> (frame, blocks it carries); kept until PERSISTED, for resends
        self._unacked: OrderedDict[int, tuple[bytes, int]] = OrderedDict()
        self._unacked_bytes = 0
        self._runs: Iterator[tuple[int, int]] = iter(())
        self._seq = 0
        self._sealed_all = False
        self._marker: bytes | None = None  # sealed after the last block frame
        #: whether the peers agreed on EPOCH_MARKERS; without it markers are not sent
        self.markers_allowed = True
        self.stats = SourceStats()

    @property
    def session(self) -> bytes:
        """The 16-byte session id (the frames' salt)."""
        return self._encoder.session_salt

    @property
    def last_seq(self) -> int:
        """The highest sequence number sealed so far."""
        return self._seq

    def plan(self, source_map: HashMap, target_map: HashMap) -> np.ndarray:
        """Set the blocks to send: those whose digests differ; return their indexes."""
        differing = source_map.diff(target_map)
        self.plan_blocks(differing, len(source_map))
        return differing

    def plan_blocks(self, indexes: np.ndarray, blocks_total: int) -> None:
        """Set the blocks to send directly (sorted indexes, e.g. from change tracking)."""
        self.stats.blocks_total = blocks_total
        self.stats.blocks_to_send = len(indexes)
        self._runs = block_runs(indexes, max(1, RUN_BYTES // self.block_size))
        # nothing to send: complete at once (a stream would wait for an ack of seq 0)
        self._sealed_all = len(indexes) == 0 and self._marker is None

    def set_marker(self, record: bytes) -> None:
        """Close the plan with a marker frame (an epoch boundary); call before planning."""
        if self.markers_allowed:
            self._marker = record

    def stop_sealing(self) -> None:
        """Seal nothing more: the session completes once the sealed frames are PERSISTED."""
        self._runs = iter(())
        self._marker = None  # an epoch cut short has no boundary to mark
        self._sealed_all = True

    def window_full(self) -> bool:
        """True while the unacknowledged frames fill the window."""
        return self._unacked_bytes >= self._window

    def done_sealing(self) -> bool:
        """True once every planned block has been sealed into a frame."""
        return self._sealed_all

    def next_frames(self, limit: int = 16) -> list[tuple[int, bytes]]:
        """Seal up to ``limit`` more frames (fewer when the window fills or plan ends)."""
        out = []
        while len(out) < limit and not self.window_full():
            run = next(self._runs, None)
            if run is None:
                if self._marker is not None:
                    out.append(self._seal_marker())
                self._sealed_all = True
                break
            out.append(self._seal(*run))
        return out

    def _seal(self, first: int, count: int) -> tuple[int, bytes]:
        offset = first * self.block_size
        length = min(count * self.block_size, self.disk.virtual_size - offset)
        data = self.disk.read(offset, length)
        self._seq += 1
        frame = self._encoder.encode(self._seq, offset, data)
        self._unacked[self._seq] = (frame, count)
        self._unacked_bytes += len(frame)
        self.stats.frames_sent += 1
        self.stats.bytes_plain += length
        self.stats.bytes_framed += len(frame)
        return self._seq, frame

    def _seal_marker(self) -> tuple[int, bytes]:
        record, self._marker = self._marker, None
        self._seq += 1
        frame = self._encoder.encode_marker(self._seq, record)
        self._unacked[self._seq] = (frame, 0)
        self._unacked_bytes += len(frame)
        self.stats.frames_sent += 1
        self.stats.bytes_framed += len(frame)
        return self._seq, frame

    def on_ack(self, seq: int, level: AckLevel, mac: bytes = b"") -> bool:
        """Record an acknowledgement; PERSISTED releases the frames it covers.

        Returns whether the ack was acted on. With ``authenticate_acks`` a PERSISTED
        ack without a MAC is not (counted in ``stats.unauthenticated_acks``) and one
        with a wrong MAC raises :class:`ForgedAckError`, before anything changes.
        """
        if level == AckLevel.RECEIVED:  # the relay's own word: display and flow only
            self.stats.received_seq = max(self.stats.received_seq, seq)
            return True
        if self._authenticate_acks and not self._acks.check(seq, level, mac):
            self.stats.unauthenticated_acks += 1
            return False
        if seq > self._seq:
            # the master target cannot have persisted what was never sealed
            raise ForgedAckError(
                f"PERSISTED ack of seq {seq} on {self.volume!r}: only {self._seq} were sent"
            )
        self.stats.persisted_seq = max(self.stats.persisted_seq, seq)
        while self._unacked and next(iter(self._unacked)) <= seq:
            _, (frame, blocks) = self._unacked.popitem(last=False)
            self._unacked_bytes -= len(frame)
            self.stats.blocks_persisted += blocks
        return True

    def resend_after(self, persisted_seq: int, mac: bytes = b"") -> list[tuple[int, bytes]]:
        """Return the kept frames after ``persisted_seq``, to send again after a cut.

        An unauthenticated ``persisted_seq`` (see :meth:`on_ack`) releases nothing:
        every kept frame is sent again, and the master target acknowledges those it
        already has without applying them.
        """
        self.on_ack(persisted_seq, AckLevel.PERSISTED, mac)
        return [(seq, frame) for seq, (frame, _blocks) in self._unacked.items()]

    def complete(self) -> bool:
        """True when every planned frame was sealed and is PERSISTED."""
        return self._sealed_all and not self._unacked and self.stats.persisted_seq == self._seq

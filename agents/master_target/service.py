"""Master target servicers: thin adapters from gRPC to ``replication.applier``.

Each method converts the request with ``replication.wire``, calls the library, and
converts back; a :class:`ReplicationError` becomes a gRPC status with its stable
code. The applier is not thread-safe, so one lock serialises every call into it.

``Apply`` is a pipeline on two threads: the stream reader converts each message and
decodes its frame (``Applier.predecode``: AES-GCM, zstd and XXH3 release the GIL;
on the reader itself, or on a pool if the applier has one); the handler takes what
has arrived, up to ``MAX_BATCH`` frames, applies it under the lock (one journal
fsync per ``MAX_JOURNAL_BYTES``, then the writes) and waits for a commit (volumes
flushed, then the apply state) before it acks PERSISTED. So the next batch is
decoded while this one is written and fsynced, and a batch is as large as what
arrived meanwhile.
Commits are shared by every stream (:class:`GroupCommit`): with many sources each
applying small batches, one round flushes every touched volume and records every
session in one SQLite transaction.

``ReleaseVolume`` hands a volume's disk over to another writer: refused while an
Apply stream has a session open on it (:class:`OpenVolumes` counts them, from the
OpenSession read off the wire until the stream ends, through
:class:`TrackedMasterTargetService`) or while frames of it are uncommitted; then the
applier closes its handles and the registry forgets it, both under the applier lock.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future

import grpc

from replication import metrics, tls, wire
from replication.disks import open_disk
from replication.errors import RemoteProtocolError, ReplicationError, VolumeInUseError
from replication.frame import peek_header
from replication.protocol import AckLevel, Hello
from replication.server import abort_with, answer_handshake
from replication.streams import batches
from replication.v1 import control_pb2, control_pb2_grpc, data_pb2_grpc

ROLE = "master-target"
#: frames taken at once from a stream (what arrived meanwhile, up to this many): one
#: commit and one ack each; as many are read ahead (decoding, memory bounded by the
#: applier)
MAX_BATCH = 32
#: plaintext bytes applied per journal fsync (the undo of a batch is made durable in
#: steps of this size, each before its own volume writes are issued)
MAX_JOURNAL_BYTES = 8 << 20


class MasterTargetService(data_pb2_grpc.MasterTargetServicer):
    """Data service: hash maps, session state, and applying frames."""

    def __init__(self, applier, lock: threading.Lock) -> None:
        self._applier = applier
        self._lock = lock
        self._commits = GroupCommit(applier, lock)

    def Handshake(self, request, context):
        tls.require_role(context, "process-server")
        return answer_handshake(request, context, ROLE)

    def GetHashMap(self, request, context):
        tls.require_role(context, "process-server")
        volume, block_size, covered = wire.hashmap_request_from_pb(request)
        chunks = self._applier.hash_map_chunks(volume, block_size, covered)
        while True:
            # one chunk at a time under the lock (a window is hashed when its first
            # chunk is asked for); never held while a chunk waits on the network
            try:
                with self._lock:
                    chunk = next(chunks, None)
            except ReplicationError as err:
                abort_with(context, err)
            if chunk is None:
                return
            yield wire.hashmap_to_pb(wire.HashMapPiece(*chunk))

    def GetSessionState(self, request, context):
        tls.require_role(context, "process-server")
        volume, session = wire.session_id_from_pb(request)
        try:
            with self._lock:
                persisted = self._applier.session_state(volume, session)
                mac = self._applier.ack_mac(volume, session, persisted)
        except ReplicationError as err:
            abort_with(context, err)
        return wire.session_state_to_pb(volume, session, persisted, mac=mac)

    def Apply(self, request_iterator, context):
        tls.require_role(context, "process-server")
        try:
            yield from self._apply_stream(request_iterator)
        except ReplicationError as err:
            abort_with(context, err)

    def _apply_stream(self, requests: Iterator) -> Iterator:
        opened: tuple[str, bytes] | None = None
        acked: dict[tuple[str, bytes], int] = {}
        try:
            for arrived in batches(
                requests, max_items=MAX_BATCH, queue_size=MAX_BATCH, prepare=self._prepare
            ):
                for batch in _by_bytes(arrived, MAX_JOURNAL_BYTES):  # one journal fsync each
                    with self._lock:
                        try:
                            opened = self._handle_batch(batch, opened)
                        finally:
                            batch.clear()  # no decoded frame kept while the next one comes
                        if opened is not None:
                            self._commits.track(opened)  # before any round can commit it
                arrived.clear()
                if opened is None:
                    continue
                with self._lock:
                    ticket = self._commits.ticket(opened)
                acked.setdefault(opened, 0)
                # flushed, then recorded (with every stream's frames applied meanwhile)
                persisted = self._commits.wait(ticket, opened)
                if persisted > acked[opened]:
                    acked[opened] = persisted
                    volume, session = opened
                    with self._lock:
                        mac = self._applier.ack_mac(volume, session, persisted)
                    yield wire.ack_to_pb(
                        wire.AckMsg(volume, session, persisted, AckLevel.PERSISTED, mac)
                    )
        finally:
            self._commits.forget(acked)

    def _prepare(self, pb) -> tuple[object, Future | None, int]:
        """On the stream reader: convert, and decode a frame (or start it on the pool)."""
        msg = wire.source_message_from_pb(pb)
        if isinstance(msg, wire.FrameMsg):
            return msg, self._applier.predecode(msg.frame), _plaintext_bytes(msg.frame)
        return msg, None, 0

    def _handle_batch(self, batch, opened):
        """Apply a batch in order: runs of frames at once, opens and closes between them."""
        frames: list = []
        for msg, decoded, _size in batch:
            if isinstance(msg, wire.FrameMsg):
                if opened is None:
                    raise RemoteProtocolError("frame before OpenSession")
                frames.append((msg.seq, msg.frame, decoded))
                continue
            self._apply_frames(opened, frames)
            frames = []
            if isinstance(msg, wire.OpenMsg):
                opened = (msg.volume, msg.session)
                persisted = self._applier.open_session(*opened, msg.block_size, msg.volume_size)
                # acked again on this stream: a relay whose last ack was lost learns it
                # even when everything it resends is older (nothing new to commit)
                self._commits.known(opened, persisted)
        self._apply_frames(opened, frames)
        return opened

    def _apply_frames(self, opened, frames: list) -> None:
        if not frames:
            return
        try:
            self._applier.apply_batch(opened[0], opened[1], frames)
        except ReplicationError as err:
            metrics.REJECTED.labels(err.code).inc()
            raise
        metrics.FRAMES.labels("in").inc(len(frames))
        metrics.BYTES.labels("in").inc(sum(len(f[1]) for f in frames))


def _plaintext_bytes(frame: bytes) -> int:
    """The plaintext a frame carries, from its clear header (0 if it has none)."""
    try:
        return peek_header(frame).length
    except ReplicationError:
        return 0  # refused when applied, with its own error


def _by_bytes(arrived: list, limit: int) -> Iterator[list]:
    """Split what arrived into batches of at most ``limit`` plaintext bytes (one at least)."""
    batch: list = []
    size = 0
    for item in arrived:
        if batch and size + item[2] > limit:
            yield batch
            batch, size = [], 0
        batch.append(item)
        size += item[2]
    if batch:
        yield batch


class GroupCommit:
    """One commit for every Apply stream that applied frames meanwhile.

    A stream applies a batch under the applier lock and takes a *ticket*; then
    :meth:`wait` returns once a commit covering that ticket is done. If no commit
    is running, the caller leads one: under the lock it flushes every touched
    volume and records every session's progress in one transaction
    (``Applier.commit_each``), so N streams pay one apply-state fsync, not N, and
    each volume is flushed once per round however many batches it got. A volume
    whose flush failed fails only the streams of that volume; a failure to record
    fails every stream of the round. Errors reach each stream as its own copy.
    """

    def __init__(self, applier, lock: threading.Lock) -> None:
        self._applier = applier
        self._lock = lock
        self._cond = threading.Condition()
        self._tickets = 0  # batches applied so far
        self._done = 0  # every ticket up to this one is committed (or failed)
        self._leading = False
        self._persisted: dict[tuple[str, bytes], int] = {}  # sessions of live streams
        # recent failed rounds: (first, last ticket covered, {volume or None (all): error})
        self._failed: collections.deque[tuple[int, int, dict[str | None, ReplicationError]]] = (
            collections.deque(maxlen=256)
        )

    def track(self, session: tuple[str, bytes]) -> None:
        """Follow ``session``'s persisted seq (applier lock held, with its frames applied)."""
        with self._cond:
            self._persisted.setdefault(session, 0)

    def ticket(self, session: tuple[str, bytes]) -> int:
        """Take a ticket for the batches of ``session`` applied so far (applier lock held)."""
        with self._cond:
            self._persisted.setdefault(session, 0)
            self._tickets += 1
            return self._tickets

    def known(self, session: tuple[str, bytes], persisted: int) -> None:
        """``session`` is durable up to ``persisted`` already (its Open said so)."""
        with self._cond:
            self._persisted[session] = max(self._persisted.get(session, 0), persisted)

    def wait(self, ticket: int, session: tuple[str, bytes]) -> int:
        """Return ``session``'s persisted seq once ``ticket`` is committed; raise its failure."""
        with self._cond:
            while self._done < ticket and self._leading:
                self._cond.wait()
            lead = self._done < ticket
            self._leading |= lead
        if lead:
            self._commit_round()
        with self._cond:
            # the round that covered the ticket, if it failed
            failed = next((f for a, b, f in self._failed if a <= ticket <= b), {})
            err = failed.get(session[0]) or failed.get(None)
            if err is not None:
                raise type(err)(err.message, hint=err.hint)
            return self._persisted.get(session, 0)

    def _commit_round(self) -> None:
        persisted: dict[tuple[str, bytes], int] = {}
        failed: dict[str | None, ReplicationError] = {}
        first = end = 0
        try:
            with self._lock:
                with self._cond:
                    first, end = self._done + 1, self._tickets  # all applied
                try:
                    persisted, by_volume = self._applier.commit_each()
                    failed.update(by_volume)
                except ReplicationError as err:
                    failed[None] = err
        finally:
            with self._cond:
                for key, seq in persisted.items():
                    if key in self._persisted:  # a session some live stream waits for
                        self._persisted[key] = seq
                if failed:
                    self._failed.append((first, end, failed))
                self._done = max(self._done, end)
                self._leading = False
                self._cond.notify_all()

    def forget(self, sessions) -> None:
        """A stream ended: drop what it tracked (the applier keeps the durable state)."""
        with self._cond:
            for key in sessions:
                self._persisted.pop(key, None)


class OpenVolumes:
    """The volumes Apply streams have a session open on right now (thread-safe).

    A stream counts from the moment its OpenSession is read off the wire (before the
    handler applies it) until the stream ends, however it ends; a stream that ended
    counts nothing more, even if its reader thread still sees a message.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count: collections.Counter[str] = collections.Counter()

    def busy(self, volume: str) -> bool:
        with self._lock:
            return self._count[volume] > 0

    @contextlib.contextmanager
    def stream(self) -> Iterator[_StreamWatch]:
        """The life of one Apply stream; ``watch`` its requests."""
        watch = _StreamWatch(self)
        try:
            yield watch
        finally:
            with self._lock:
                watch.ended = True
                for volume in watch.volumes:
                    self._count[volume] -= 1
                self._count += collections.Counter()  # drops the zero counts

    def _opened(self, watch: _StreamWatch, volume: str) -> None:
        with self._lock:
            if not watch.ended and volume not in watch.volumes:
                watch.volumes.add(volume)
                self._count[volume] += 1


class _StreamWatch:
    """One stream's volumes, seen as its requests pass by."""

    def __init__(self, owner: OpenVolumes) -> None:
        self.owner = owner
        self.volumes: set[str] = set()
        self.ended = False

    def watch(self, requests: Iterator) -> Iterator:
        for pb in requests:
            volume = wire.opened_volume(pb)
            if volume is not None:
                self.owner._opened(self, volume)
            yield pb


class TrackedMasterTargetService(MasterTargetService):
    """The data service, with its Apply streams counted in :class:`OpenVolumes`."""

    def __init__(self, applier, lock: threading.Lock, open_volumes: OpenVolumes) -> None:
        super().__init__(applier, lock)
        self._open_volumes = open_volumes

    def Apply(self, request_iterator, context):
        with self._open_volumes.stream() as seen:
            yield from super().Apply(seen.watch(request_iterator), context)


class ControlService(control_pb2_grpc.ControlServicer):
    """Control service of a master target: status and volumes."""

    def __init__(
        self, registry, applier, lock: threading.Lock, open_volumes: OpenVolumes | None = None
    ) -> None:
        self._registry = registry
        self._applier = applier
        self._lock = lock
        self._open_volumes = open_volumes or OpenVolumes()
        self._started = time.monotonic()

    def Status(self, request, context):
        tls.require_role(context, "orchestrator", "source", "process-server")
        return control_pb2.AgentStatus(
            role=3,
            agent_version=Hello().agent_version,
            uptime_seconds=int(time.monotonic() - self._started),
            volumes=[_volume_pb(v) for v in self._registry.list()],
        )

    def ListVolumes(self, request, context):
        tls.require_role(context, "orchestrator", "process-server")
        return control_pb2.ListVolumesResponse(
            volumes=[_volume_pb(v) for v in self._registry.list()]
        )

    def CreateVolume(self, request, context):
        tls.require_role(context, "orchestrator")
        try:
            with self._lock:
                info = self._registry.create(
                    request.name, request.size, request.subformat or "monolithicSparse"
                )
        except ReplicationError as err:
            abort_with(context, err)
        return _volume_pb(info)

    def ReleaseVolume(self, request, context):
        tls.require_role(context, "orchestrator")
        try:
            with self._lock:  # no frame is applied to it meanwhile
                info = self._release(request.name)
        except ReplicationError as err:
            abort_with(context, err)
        return _volume_pb(info)

    def _release(self, name: str):
        if self._open_volumes.busy(name):
            raise VolumeInUseError(
                f"volume {name!r} has a data session open",
                hint="stop the pair that replicates into it (StopPair, or failover), "
                "then release it again",
            )
        if name in self._registry.names():  # else: released already, or unknown
            self._applier.release(name)
        return self._registry.release(name)

    def ListPoints(self, request, context):
        tls.require_role(context, "orchestrator", "process-server", "source")
        try:
            with self._lock:
                points = self._applier.points(request.volume)
        except ReplicationError as err:
            abort_with(context, err)
        return wire.points_to_pb([_point_msg(p) for p in points])

    def ProduceDisk(self, request, context):
        tls.require_role(context, "orchestrator")
        try:
            with self._lock:  # nothing is applied to the volume while it is copied
                point, info = self._produce(request)
        except ReplicationError as err:
            abort_with(context, err)
        return wire.produced_to_pb(
            wire.VolumeInfo(info.name, info.size, info.format, info.subformat), _point_msg(point)
        )

    def _produce(self, request):
        source = self._registry.get(request.volume)
        info = self._registry.create(
            request.name, source.size, request.subformat or "monolithicSparse"
        )
        with open_disk(self._registry.path(info.name), writable=True) as out:
            point = self._applier.produce(request.volume, request.point or "latest", out)
        return point, info

    def StartPair(self, request, context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "pairs are started on a source agent")

    def StopPair(self, request, context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "pairs are stopped on a source agent")


def _volume_pb(info):
    return wire.volume_to_pb(info.name, info.size, info.format, info.subformat)


def _point_msg(p) -> wire.PointMsg:
    return wire.PointMsg(p.id, p.time, p.kind, p.tag, p.group, p.manifest_root)

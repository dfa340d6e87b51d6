"""Replication pairs of a running source agent: one worker thread per pair.

A pair joins one local disk (``--disk NAME=PATH``) to one master-target volume. Its
worker loops, in one of two modes:

* **rescan** (untracked disk): resync by hash compare (only differing blocks move),
  then ``protected`` until the next rescan;
* **tracked** (``--state-dir``: writes go through a LiveDisk, e.g. the NBD front
  end): ship one epoch at a time (cut, copy-on-write snapshot, its dirty blocks,
  an epoch-end marker), commit the epoch once PERSISTED, then wait for writes. An
  untrusted tracker (first start, unclean state) makes its first epoch a
  hash-compare resync, marked not consistent.

A failure is reported in the pair's state and retried with a bounded backoff
(an unfinished epoch is aborted: its blocks stay dirty), never silently dropped.
``StopPair`` cancels the worker: it seals nothing more, waits (bounded) for the
acks of frames already sent, and ends in ``stopped``. The table of pairs is what ``Status`` reports.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from replication import metrics
from replication.disks import open_disk
from replication.epochs import LiveDisk
from replication.errors import PairBusyError, ReplicationError, TagFailedError, UnknownDiskError

from .client import PairOptions, plan_by_hash_compare

log = logging.getLogger("source-agent")

#: longest wait between two attempts of a failing pair
MAX_BACKOFF = 60.0
#: every state a pair can be in (the ``replication_pairs{state}`` gauge has each)
PAIR_STATES = ("starting", "resyncing", "protected", "error", "stopped")


@dataclass
class PairState:
    """What ``Status`` reports of one pair (a copy, safe to hand out)."""

    disk: str
    volume: str
    state: str = "starting"
    blocks_total: int = 0
    blocks_done: int = 0
    persisted_seq: int = 0
    error: str = ""
    cycles: int = 0
    last_protected: float | None = None
    mode: str = "rescan"
    rpo_seconds: float = 0.0
    process_server: str = ""


@dataclass
class _Pair:
    path: str
    status: PairState
    cancel: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    # tagged cuts asked for and not made yet: (tag, set once the cut is made)
    tags: list[tuple[dict, threading.Event]] = field(default_factory=list)
    # where the next session goes (MovePair changes it between sessions)
    route: tuple[str, str] = ("", "")


#: replicate(disk, volume, options, plan=None) -> finished session; the agent binds the rest
ReplicateFn = Callable[..., object]

#: shortest time between two epochs: bounds the frame and marker overhead under churn
MIN_EPOCH_SPACING = 0.05


class PairTable:
    """The pairs of one source agent, their workers and their states."""

    def __init__(
        self,
        disks: dict[str, str],
        replicate: ReplicateFn,
        options: PairOptions,
        *,
        rescan_interval: float,
        live: dict[str, LiveDisk] | None = None,
    ) -> None:
        self._disks = disks
        self._live = live or {}
        self._replicate = replicate
        self._options = options
        self._rescan = rescan_interval
        self._pairs: dict[str, _Pair] = {}
        self._lock = threading.Lock()
        for state in PAIR_STATES:  # counted when scraped: never out of step with Status
            metrics.PAIRS.labels(state).set_function(lambda s=state: self._count(s))

    def _count(self, state: str) -> int:
        with self._lock:
            return sum(1 for p in self._pairs.values() if p.status.state == state)

    def start(self, disk: str, volume: str) -> PairState:
        """Start (or keep) the pair ``disk -> volume``; idempotent for the same volume."""
        if disk not in self._disks:
            raise UnknownDiskError(
                f"disk {disk!r} is not configured on this source agent "
                f"(known: {', '.join(sorted(self._disks)) or 'none'}); add --disk {disk}=PATH"
            )
        with self._lock:
            pair = self._pairs.get(disk)
            if pair is not None and pair.thread is not None and pair.thread.is_alive():
                if pair.status.volume != volume:
                    raise PairBusyError(
                        f"disk {disk!r} already replicates to {pair.status.volume!r}; "
                        "stop that pair first"
                    )
                return replace(pair.status)
            mode = "tracked" if disk in self._live else "rescan"
            route = (self._options.address, self._options.server_host)
            pair = _Pair(
                self._disks[disk], PairState(disk, volume, mode=mode, process_server=route[0])
            )
            pair.route = route
            pair.thread = threading.Thread(
                target=self._run, args=(pair,), name=f"pair-{disk}", daemon=True
            )
            self._pairs[disk] = pair
            pair.thread.start()
            log.info("event=pair_started disk=%s volume=%s", disk, volume)
            return replace(pair.status)

    def stop(self, disk: str, timeout: float = 60.0) -> PairState:
        """Stop the pair of ``disk`` after the acks of what it already sent."""
        with self._lock:
            pair = self._pairs.get(disk)
        if pair is None:
            raise UnknownDiskError(f"no pair for disk {disk!r} on this source agent")
        pair.cancel.set()
        if pair.thread is not None:
            pair.thread.join(timeout)
        log.info("event=pair_stopped disk=%s state=%s", disk, pair.status.state)
        return replace(pair.status)

    def stop_all(self, timeout: float = 60.0) -> None:
        with self._lock:
            disks = list(self._pairs)
        for disk in disks:
            self.stop(disk, timeout)

    def move(self, disk: str, address: str, server_host: str) -> PairState:
        """Send the pair's next sessions through another process server (no resync)."""
        with self._lock:
            pair = self._pairs.get(disk)
            if pair is None:
                raise UnknownDiskError(f"no pair for disk {disk!r} on this source agent")
            pair.route = (address, server_host or "localhost")
            pair.status.process_server = address
        log.info("event=pair_moved disk=%s process_server=%s", disk, address)
        return replace(pair.status)

    def _options_for(self, pair: _Pair):
        address, host = pair.route
        return replace(
            self._options,
            address=address,
            server_host=host,
            cancel=pair.cancel,
            on_progress=self._progress(pair.status),
            on_retry=self._retrying(pair.status),
        )

    def tracked_disks(self) -> list[str]:
        return list(self._live)

    def live(self, disk: str) -> LiveDisk:
        if disk not in self._disks:
            raise UnknownDiskError(f"disk {disk!r} is not configured on this source agent")
        if disk not in self._live:
            raise TagFailedError(f"disk {disk!r} is not tracked: tagged cuts need --state-dir")
        return self._live[disk]

    def request_cut(self, disk: str, tag: dict) -> threading.Event:
        """Ask the pair of ``disk`` for a tagged cut; the event is set once it is made."""
        self.live(disk)
        with self._lock:
            pair = self._pairs.get(disk)
            running = pair is not None and pair.thread is not None and pair.thread.is_alive()
            if not running or pair.status.state != "protected":
                state = pair.status.state if pair else "not started"
                raise TagFailedError(
                    f"disk {disk!r} is {state}: a tag needs a protected pair (its epochs "
                    "are consistent)"
                )
            done = threading.Event()
            pair.tags.append((tag, done))
        self._live[disk].wake()
        return done

    def states(self) -> list[PairState]:
        with self._lock:
            return [replace(p.status) for p in self._pairs.values()]

    def _run(self, pair: _Pair) -> None:
        """The worker: resync, then rescan every interval (or ship epochs), until cancelled."""
        backoff = 1.0
        live = self._live.get(pair.status.disk)
        while not pair.cancel.is_set():
            wait = self._rescan
            try:
                if live is None:
                    self._cycle(pair)
                else:
                    self._ship_epoch(pair, live)
                    self._wait_for_writes(pair, live)
                    wait = MIN_EPOCH_SPACING
                backoff = 1.0
            except ReplicationError as err:
                pair.status.state, pair.status.error = "error", str(err)
                log.warning(
                    "event=pair_error disk=%s code=%s error=%s", pair.status.disk, err.code, err
                )
                wait, backoff = backoff, min(MAX_BACKOFF, backoff * 2)
            except Exception as err:  # a bug must show in Status, not kill the worker
                pair.status.state, pair.status.error = "error", f"internal error: {err!r}"
                log.exception("event=pair_error disk=%s code=internal", pair.status.disk)
                wait, backoff = backoff, min(MAX_BACKOFF, backoff * 2)
            pair.cancel.wait(wait)
        pair.status.state = "stopped"

    def _cycle(self, pair: _Pair) -> None:
        status = pair.status
        status.state = "resyncing"
        progress = self._progress(status)
        options = self._options_for(pair)
        with open_disk(pair.path) as disk:
            progress(self._replicate(disk, status.volume, options))
        if pair.cancel.is_set():
            return  # cancelled mid-cycle: the disk is not known to be level
        status.state, status.error = "protected", ""
        status.cycles += 1
        status.last_protected = time.time()
        log.info(
            "event=protected disk=%s volume=%s cycle=%d", status.disk, status.volume, status.cycles
        )

    def _wait_for_writes(self, pair: _Pair, live: LiveDisk) -> None:
        """Until a write comes (or the rescan interval ends, or the pair is stopped)."""
        deadline = time.monotonic() + self._rescan
        while not pair.cancel.is_set() and time.monotonic() < deadline:
            if live.wait_for_writes(0.2):
                return

    def _retrying(self, status: PairState):
        """While a step is retried (an unreachable master target...), the pair says why."""

        def retrying(reason: str) -> None:
            status.error = reason

        return retrying

    def _progress(self, status: PairState):
        def progress(session) -> None:
            if status.state != "error":
                status.error = ""  # what was being retried went through
            s = session.stats
            status.blocks_total, status.blocks_done = s.blocks_to_send, s.blocks_persisted
            status.persisted_seq = s.persisted_seq

        return progress

    def _ship_epoch(self, pair: _Pair, live: LiveDisk) -> None:
        """Cut one epoch, send its blocks and its end marker; commit once PERSISTED."""
        status = pair.status
        with self._lock:
            tag, cut_made = pair.tags.pop(0) if pair.tags else (None, None)
        epoch, reader, oldest = live.cut()
        if cut_made is not None:
            cut_made.set()
        log.info(
            "event=epoch disk=%s number=%d full_resync=%s blocks=%d tag=%s",
            status.disk,
            epoch.number,
            epoch.full_resync,
            epoch.count(),
            tag["name"] if tag else "",
        )
        try:
            record = epoch_marker(epoch.number, not epoch.full_resync, oldest, tag)
            if epoch.full_resync:
                status.state = "resyncing"
                disk, plan = live, _resync_plan(record, live.disk)
            else:
                disk, plan = reader, _epoch_plan(record, epoch)
            session = self._replicate(disk, status.volume, self._options_for(pair), plan=plan)
        except BaseException:
            epoch.abort()  # its blocks stay dirty for the next epoch
            raise
        finally:
            live.release()
        if not session.complete():
            epoch.abort()
            return
        epoch.commit()
        self._progress(status)(session)
        now = time.time()
        status.rpo_seconds = max(0.0, now - oldest) if oldest is not None else 0.0
        metrics.RPO_SECONDS.labels(status.volume).set(status.rpo_seconds)
        if oldest is not None:
            metrics.EPOCH_RPO.labels(status.volume).observe(status.rpo_seconds)
        log.info(
            "event=epoch_persisted disk=%s number=%d blocks=%d rpo=%.4f",
            status.disk,
            epoch.number,
            session.stats.blocks_to_send,
            status.rpo_seconds,
        )
        if status.state != "protected":
            log.info("event=protected disk=%s volume=%s mode=tracked", status.disk, status.volume)
        status.state, status.error = "protected", ""
        status.cycles += 1
        status.last_protected = now


def epoch_marker(number: int, consistent: bool, oldest: float | None, tag: dict | None) -> bytes:
    """The epoch-end marker record (docs/protocol.md, "Marker frames")."""
    return json.dumps(
        {
            "type": "epoch-end",
            "epoch": number,
            "consistent": consistent,
            "cut_time": time.time(),
            "oldest_write": oldest,
            "tag": tag,
        },
        sort_keys=True,
    ).encode()


def _epoch_plan(record: bytes, epoch):
    def plan(session, stub) -> None:
        session.set_marker(record)
        session.plan_bitmap(epoch.bitmap, -(-session.disk.virtual_size // session.block_size))

    return plan


def _resync_plan(record: bytes, hash_disk):
    def plan(session, stub) -> None:
        session.set_marker(record)
        plan_by_hash_compare(session, stub, hash_disk)

    return plan

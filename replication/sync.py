"""One-shot delta sync between two disks of any format.

Theory of operation
-------------------
1. *Plan*: hash the source and the target (the target only over the source's size)
   a window at a time (:func:`~replication.hashmap.map_windows`), both disks read
   at once on a small thread pool. A target map kept from the previous sync
   replaces the target read when the target's generation proves it is unchanged
   (:mod:`replication.mapcache`; read a window at a time too). Each window's
   differing blocks are kept as bits: the blocks to move.
2. *Move*: for each run of differing blocks, read the run from the source, encode it
   as a block frame (zstd + AES-GCM: exactly what would cross a network, counted in
   ``bytes_wire``) and write it to the target; a run of zero blocks is written with
   ``write_zeroes`` so sparse targets stay unallocated. Reading and encoding run on
   the pool; writes are issued by one thread, in order.
3. *Commit*: flush the target (durable), stamp its generation, and store the
   source's map as the target's new map (spooled to a file during the plan).

Invariants: a dry run writes nothing; the target is never written outside the
source's size (its tail, if larger, is left alone); only differing blocks are
written.

Memory: the hash maps are streamed, so they cost 16 bytes per block of one window
per disk (``SyncOptions.window_blocks``: 32 MiB for both disks by default), never
of the whole disk; the source's map goes to a spool file, not to memory. What
grows with the disk is the plan: two packed bitmaps (the differing blocks, split
into zero and data), 2 bits per block: 16 MiB for 32 TiB at 64 KiB blocks. A
source whose plan would exceed ``SyncOptions.max_map_bytes`` (256 MiB: 64 TiB at
64 KiB blocks, larger than any real disk format allows) is refused with
:class:`~replication.errors.DiskTooLargeError` before anything is allocated or read:
a 100-byte descriptor may claim 512 TiB of zeros, which would otherwise be hashed
window after window for minutes. A larger block size, or a larger bound, syncs it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import BinaryIO

import numpy as np

from .blocks import DEFAULT_BLOCK_SIZE, bitmap_runs, block_count, check_block_size
from .disks import Disk, open_disk
from .disks.base import zero_buffer
from .errors import DiskSizeMismatchError, DiskTooLargeError, UsageError
from .hashmap import WINDOW_BLOCKS, HashMap, MapFileReader, map_windows
from .mapcache import MapCache

__all__ = ["SyncOptions", "SyncReport", "sync_disks", "sync_paths"]

#: bytes moved per run (one frame, one target write)
RUN_BYTES = 1 << 20
#: default bound on the plan's bitmaps: 64 TiB at 64 KiB blocks, 4 PiB at 4 MiB
MAX_MAP_BYTES = 256 << 20
#: bytes of spooled map copied into the cache entry at once
_COPY_BYTES = 8 << 20

ProgressFactory = Callable[[str, int], Callable[[int], None]]


@dataclass(frozen=True)
class SyncOptions:
    """How to sync; every field has a sensible default."""

    block_size: int = DEFAULT_BLOCK_SIZE
    dry_run: bool = False
    use_map_cache: bool = True
    cache_dir: str | None = None
    workers: int = 2
    zstd_level: int = 1
    #: refuse a source whose plan (2 bits per block) would take more bytes than this
    max_map_bytes: int = MAX_MAP_BYTES
    #: blocks hashed at once per disk (16 bytes of memory each): the maps are streamed
    window_blocks: int = WINDOW_BLOCKS


@dataclass(frozen=True)
class SyncReport:
    """What a sync did; ``replication sync`` prints it."""

    source: str
    target: str
    block_size: int
    blocks_total: int
    blocks_differing: int
    blocks_zero: int
    bytes_read: int
    bytes_written: int
    bytes_zeroed: int
    bytes_wire: int
    target_map: str  # "cached" | "computed"
    dry_run: bool
    seconds: float

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def sync_paths(
    source: str,
    target: str,
    options: SyncOptions | None = None,
    *,
    progress: ProgressFactory | None = None,
) -> SyncReport:
    """Open both paths (formats detected) and sync ``source`` into ``target``."""
    options = options or SyncOptions()
    _refuse_same_file(source, target)
    with open_disk(source) as src, open_disk(target, writable=True) as tgt:
        return sync_disks(src, tgt, options, progress=progress)


def sync_disks(
    source: Disk,
    target: Disk,
    options: SyncOptions | None = None,
    *,
    progress: ProgressFactory | None = None,
) -> SyncReport:
    """Make ``target`` hold ``source``'s bytes over the source's size, moving only deltas."""
    options = options or SyncOptions()
    check_block_size(options.block_size)
    _check_map_bound(source, options)
    if target.virtual_size < source.virtual_size:
        raise DiskSizeMismatchError(
            f"target {target.path} ({target.virtual_size} bytes) is smaller than source "
            f"{source.path} ({source.virtual_size} bytes)",
            hint="create a target at least as large as the source",
        )
    started = time.monotonic()
    cache = MapCache(options.cache_dir) if options.use_map_cache else None
    with _spool(cache, options) as spool:
        plan = _plan(source, target, options, cache, spool, progress)
        moved = _Moved()
        if not options.dry_run and plan.blocks_differing:
            if cache is not None:
                cache.invalidate(target, plan.block_size, plan.size)
            moved = _move(source, target, plan, options, progress)
        if not options.dry_run:
            target.flush()
            if cache is not None and spool is not None:
                _store(cache, target, plan, spool)
        elif plan.blocks_differing:
            moved = _estimate(source, plan, options)
    return SyncReport(
        source=source.path,
        target=target.path,
        block_size=plan.block_size,
        blocks_total=plan.blocks,
        blocks_differing=plan.blocks_differing,
        blocks_zero=plan.blocks_zero,
        bytes_read=plan.bytes_read + moved.read,
        bytes_written=moved.written,
        bytes_zeroed=moved.zeroed,
        # the target's map crosses the network in a remote sync: 16 bytes per block
        bytes_wire=moved.wire + 16 * plan.blocks,
        target_map="cached" if plan.cached else "computed",
        dry_run=options.dry_run,
        seconds=round(time.monotonic() - started, 3),
    )


def _plan_bytes(size: int, block_size: int) -> int:
    """Bytes of the plan's two packed bitmaps for a disk of ``size`` bytes."""
    return 2 * -(-block_count(size, block_size) // 8)


def _check_map_bound(source: Disk, options: SyncOptions) -> None:
    """Refuse, before anything is allocated, a source whose plan exceeds the bound."""
    need = _plan_bytes(source.virtual_size, options.block_size)
    if need > options.max_map_bytes:
        raise DiskTooLargeError(
            f"{source.path}: {source.virtual_size} bytes in {options.block_size}-byte blocks "
            f"need {need} bytes of sync plan; the bound is {options.max_map_bytes}",
            hint="use a larger --block-size, or raise --max-map-memory if the size is real",
        )


def _refuse_same_file(source: str, target: str) -> None:
    try:
        same = os.path.samefile(source, target)
    except OSError:
        return  # open_disk reports missing files with a typed error
    if same:
        raise UsageError(f"source and target are the same file: {source}")


@dataclass
class _Plan:
    """The blocks to move, as two packed bitmaps (bit i & 7 of byte i >> 3), and counts."""

    block_size: int
    size: int
    blocks: int
    send_data: np.ndarray  # differing blocks whose source holds data
    send_zero: np.ndarray  # differing blocks that are zero on the source
    blocks_differing: int = 0
    bytes_differing: int = 0
    blocks_zero: int = 0
    bytes_read: int = 0
    cached: bool = False

    @classmethod
    def empty(cls, size: int, block_size: int) -> _Plan:
        nbytes = -(-block_count(size, block_size) // 8)
        data, zero = np.zeros(nbytes, dtype=np.uint8), np.zeros(nbytes, dtype=np.uint8)
        return cls(block_size, size, block_count(size, block_size), data, zero)

    def add(self, first: int, src: HashMap, target_digests: np.ndarray) -> None:
        """Record one window: ``src`` (the source's map of it) against the target's."""
        differing = src.digests != target_digests
        zero = src.zero_mask()
        lo = first // 8  # windows start on whole bytes (map_windows)
        for bits, mask in ((self.send_data, differing & ~zero), (self.send_zero, differing & zero)):
            packed = np.packbits(mask, bitorder="little")
            bits[lo : lo + len(packed)] = packed
        count = int(np.count_nonzero(differing))
        self.blocks_differing += count
        self.bytes_differing += count * self.block_size
        if count and differing[-1]:  # the disk's short last block counts its own bytes
            self.bytes_differing -= self.block_size - src.block_length(len(src) - 1)
        self.blocks_zero += int(np.count_nonzero(zero))
        self.bytes_read += src.bytes_read


@contextlib.contextmanager
def _spool(cache: MapCache | None, options: SyncOptions) -> Iterator[BinaryIO | None]:
    """A scratch file for the source's map, kept for the cache (None: nothing to keep).

    It lives in the cache directory: a temporary directory may be in memory (tmpfs).
    """
    if cache is None or options.dry_run:
        yield None
        return
    cache.directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=cache.directory, prefix=".spool-") as f:
        yield f


def _plan(
    source: Disk,
    target: Disk,
    options: SyncOptions,
    cache: MapCache | None,
    spool: BinaryIO | None,
    progress: ProgressFactory | None,
) -> _Plan:
    """Hash both sides (or the source only, with a trusted cached target map), by windows."""
    bs, size = options.block_size, source.virtual_size
    plan = _Plan.empty(size, bs)
    kept = cache.open_trusted(target, bs, size) if cache is not None else None
    plan.cached = kept is not None
    disks = [source] if kept is not None else [source, target]
    tick = progress("hash", size * len(disks)) if progress else None
    with contextlib.closing(kept) if kept is not None else contextlib.nullcontext():
        windows = map_windows(
            disks, size, bs, window_blocks=options.window_blocks,
            workers=options.workers, progress=tick,
        )  # fmt: skip
        for first, maps in windows:
            plan.add(first, maps[0], _target_digests(kept, first, maps))
            if len(maps) > 1:
                plan.bytes_read += maps[1].bytes_read
            if spool is not None:
                spool.write(maps[0].digests.tobytes())
    return plan


def _target_digests(kept: MapFileReader | None, first: int, maps: list[HashMap]) -> np.ndarray:
    return maps[1].digests if kept is None else kept.digests(first, len(maps[0]))


def _store(cache: MapCache, target: Disk, plan: _Plan, spool: BinaryIO) -> None:
    """Keep the source's map (spooled) as the target's, at its new generation."""
    writer = cache.writer(target, plan.block_size, plan.size, target.mark_generation())
    if writer is None:
        return
    with writer:
        spool.seek(0)
        while piece := spool.read(_COPY_BYTES):
            writer.append(piece)
        writer.commit()


@dataclass
class _Moved:
    read: int = 0
    written: int = 0
    zeroed: int = 0
    wire: int = 0


@dataclass
class _Run:
    offset: int
    data: bytes | None  # None: the run is all zeros
    length: int
    wire: int


def _runs_to_move(plan: _Plan) -> Iterator[tuple[int, int, bool]]:
    """Yield (first block, count, zero) runs of differing blocks, split by zero-ness."""
    per_run = max(1, RUN_BYTES // plan.block_size)
    # zero and data runs are independent: order between them does not matter
    for flag, bits in ((True, plan.send_zero), (False, plan.send_data)):
        for first, count in bitmap_runs(bits, per_run):
            yield first, count, flag


class _Encoders:
    """One frame encoder per worker thread (encoders keep compressor state)."""

    def __init__(self, level: int, disk_id: bytes) -> None:
        self._secret = secrets.token_bytes(32)  # a local sync needs no shared key
        self._level = level
        self._disk_id = disk_id
        self._local = threading.local()

    def encode(self, offset: int, data: bytes) -> int:
        """Encode one frame; return its size on the wire."""
        from .frame import FrameEncoder

        enc = getattr(self._local, "enc", None)
        if enc is None:
            enc = FrameEncoder(self._secret, self._disk_id, level=self._level)
            self._local.enc = enc
            self._local.seq = 0
        self._local.seq += 1
        return len(enc.encode(self._local.seq, offset, data))


def _read_and_encode(
    source: Disk, plan: _Plan, run: tuple[int, int, bool], encoders: _Encoders
) -> _Run:
    first, count, zero = run
    bs = plan.block_size
    offset = first * bs
    length = min(count * bs, plan.size - offset)
    if zero:
        # zeros compress to a few bytes: encode them anyway so the wire count is real
        return _Run(offset, None, length, encoders.encode(offset, zero_buffer(length)))
    data = source.read(offset, length)
    return _Run(offset, data, length, encoders.encode(offset, data))


def _pipeline(source: Disk, plan: _Plan, options: SyncOptions) -> Iterator[_Run]:
    """Read and encode runs on the pool, yielding them in submission order."""
    encoders = _Encoders(options.zstd_level, _disk_id(source))
    runs = _runs_to_move(plan)
    window: deque[Future[_Run]] = deque()
    with ThreadPoolExecutor(max_workers=max(1, options.workers), thread_name_prefix="move") as pool:
        for run in runs:
            window.append(pool.submit(_read_and_encode, source, plan, run, encoders))
            if len(window) >= 2 * options.workers:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


def _move(
    source: Disk,
    target: Disk,
    plan: _Plan,
    options: SyncOptions,
    progress: ProgressFactory | None,
) -> _Moved:
    """Write every differing run into the target; return the byte counts."""
    moved = _Moved()
    tick = progress("write", plan.bytes_differing) if progress else None
    for run in _pipeline(source, plan, options):
        if run.data is None:
            target.write_zeroes(run.offset, run.length)
            moved.zeroed += run.length
        else:
            target.write(run.offset, run.data)
            moved.written += run.length
            moved.read += run.length
        moved.wire += run.wire
        if tick:
            tick(run.length)
    return moved


def _estimate(source: Disk, plan: _Plan, options: SyncOptions) -> _Moved:
    """What a real run would move (dry run): everything but the writes."""
    moved = _Moved()
    for run in _pipeline(source, plan, options):
        moved.wire += run.wire
        if run.data is not None:
            moved.read += run.length
    return moved


def _disk_id(disk: Disk) -> bytes:
    import hashlib

    return hashlib.sha256(os.path.realpath(disk.path).encode()).digest()[:16]

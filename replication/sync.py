"""One-shot delta sync between two disks of any format.

Theory of operation
-------------------
1. *Plan*: hash the source and the target (the target only over the source's size)
   into two :class:`~replication.hashmap.HashMap` objects, both disks read at once
   on a small thread pool. A target map kept from the previous sync replaces the
   target read when the target's generation proves it is unchanged
   (:mod:`replication.mapcache`). The blocks to move are ``diff(source, target)``.
2. *Move*: for each run of differing blocks, read the run from the source, encode it
   as a block frame (zstd + AES-GCM: exactly what would cross a network, counted in
   ``bytes_wire``) and write it to the target; a run of zero blocks is written with
   ``write_zeroes`` so sparse targets stay unallocated. Reading and encoding run on
   the pool; writes are issued by one thread, in order.
3. *Commit*: flush the target (durable), stamp its generation, and store the
   source's map as the target's new map.

Invariants: a dry run writes nothing; the target is never written outside the
source's size (its tail, if larger, is left alone); only differing blocks are
written.

Memory is bounded by configuration, not by the disks' sizes: the plan holds two
maps of the whole source (16 bytes per block each, the map cache stores one of
them whole). A source whose maps would exceed ``SyncOptions.max_map_bytes`` is
refused with :class:`~replication.errors.DiskTooLargeError` before anything is
allocated or read (a 100-byte descriptor may claim 512 TiB of zeros); a larger
block size, or a larger bound, syncs it.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np

from .blocks import DEFAULT_BLOCK_SIZE, block_count, block_runs, check_block_size
from .disks import Disk, open_disk
from .disks.base import zero_buffer
from .errors import DiskSizeMismatchError, DiskTooLargeError, UsageError
from .hashmap import HashMap, compute_maps
from .mapcache import MapCache

__all__ = ["SyncOptions", "SyncReport", "sync_disks", "sync_paths"]

#: bytes moved per run (one frame, one target write)
RUN_BYTES = 1 << 20
#: default bound on the two hash maps of a sync: 8 TiB at 64 KiB blocks, 512 TiB at 4 MiB
MAX_MAP_BYTES = 4 << 30
#: bytes of map per block: the source's and the target's digest
_MAP_BYTES_PER_BLOCK = 32

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
    #: refuse a source whose two hash maps would take more bytes than this
    max_map_bytes: int = MAX_MAP_BYTES


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
    src_map, tgt_map, cached = _plan(source, target, options, cache, progress)
    differing = src_map.diff(tgt_map)
    moved = _Moved()
    if not options.dry_run and len(differing):
        if cache is not None:
            cache.invalidate(target, src_map.block_size, src_map.covered_size)
        moved = _move(source, target, src_map, differing, options, progress)
    if not options.dry_run:
        target.flush()
        if cache is not None:
            cache.store(target, src_map, target.mark_generation())
    elif len(differing):
        moved = _estimate(source, src_map, differing, options)
    return SyncReport(
        source=source.path,
        target=target.path,
        block_size=src_map.block_size,
        blocks_total=len(src_map),
        blocks_differing=len(differing),
        blocks_zero=int(src_map.zero_mask().sum()),
        bytes_read=src_map.bytes_read + (0 if cached else tgt_map.bytes_read) + moved.read,
        bytes_written=moved.written,
        bytes_zeroed=moved.zeroed,
        # the target's map crosses the network in a remote sync: 16 bytes per block
        bytes_wire=moved.wire + 16 * len(tgt_map),
        target_map="cached" if cached else "computed",
        dry_run=options.dry_run,
        seconds=round(time.monotonic() - started, 3),
    )


def _check_map_bound(source: Disk, options: SyncOptions) -> None:
    """Refuse, before any map is allocated, a source whose maps exceed the bound."""
    need = _MAP_BYTES_PER_BLOCK * block_count(source.virtual_size, options.block_size)
    if need > options.max_map_bytes:
        raise DiskTooLargeError(
            f"{source.path}: {source.virtual_size} bytes in {options.block_size}-byte blocks "
            f"need {need} bytes of hash maps; the bound is {options.max_map_bytes}",
            hint="use a larger --block-size, or raise --max-map-memory if the size is real",
        )


def _refuse_same_file(source: str, target: str) -> None:
    try:
        same = os.path.samefile(source, target)
    except OSError:
        return  # open_disk reports missing files with a typed error
    if same:
        raise UsageError(f"source and target are the same file: {source}")


def _plan(
    source: Disk,
    target: Disk,
    options: SyncOptions,
    cache: MapCache | None,
    progress: ProgressFactory | None,
) -> tuple[HashMap, HashMap, bool]:
    """Hash both sides (or the source only, with a trusted cached target map)."""
    bs, size = options.block_size, source.virtual_size
    tgt_map = cache.load_trusted(target, bs, size) if cache is not None else None
    disks: list[tuple[Disk, int | None]] = [(source, size)]
    if tgt_map is None:
        disks.append((target, size))
    tick = progress("hash", size * len(disks)) if progress else None
    maps = compute_maps(disks, bs, workers=options.workers, progress=tick)
    if tgt_map is None:
        return maps[0], maps[1], False
    return maps[0], tgt_map, True


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


def _runs_to_move(src_map: HashMap, differing: np.ndarray) -> Iterator[tuple[int, int, bool]]:
    """Yield (first block, count, zero) runs of differing blocks, split by zero-ness."""
    zero = src_map.zero_mask()
    per_run = max(1, RUN_BYTES // src_map.block_size)
    for flag in (True, False):
        # zero and data runs are independent: order between them does not matter
        picked = differing[zero[differing] == flag]
        for first, count in block_runs(picked, per_run):
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
    source: Disk, src_map: HashMap, run: tuple[int, int, bool], encoders: _Encoders
) -> _Run:
    first, count, zero = run
    bs = src_map.block_size
    offset = first * bs
    length = min(count * bs, src_map.covered_size - offset)
    if zero:
        # zeros compress to a few bytes: encode them anyway so the wire count is real
        return _Run(offset, None, length, encoders.encode(offset, zero_buffer(length)))
    data = source.read(offset, length)
    return _Run(offset, data, length, encoders.encode(offset, data))


def _pipeline(
    source: Disk, src_map: HashMap, differing: np.ndarray, options: SyncOptions
) -> Iterator[_Run]:
    """Read and encode runs on the pool, yielding them in submission order."""
    encoders = _Encoders(options.zstd_level, _disk_id(source))
    runs = _runs_to_move(src_map, differing)
    window: deque[Future[_Run]] = deque()
    with ThreadPoolExecutor(max_workers=max(1, options.workers), thread_name_prefix="move") as pool:
        for run in runs:
            window.append(pool.submit(_read_and_encode, source, src_map, run, encoders))
            if len(window) >= 2 * options.workers:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


def _move(
    source: Disk,
    target: Disk,
    src_map: HashMap,
    differing: np.ndarray,
    options: SyncOptions,
    progress: ProgressFactory | None,
) -> _Moved:
    """Write every differing run into the target; return the byte counts."""
    moved = _Moved()
    total = int(sum(src_map.block_length(int(i)) for i in differing))
    tick = progress("write", total) if progress else None
    for run in _pipeline(source, src_map, differing, options):
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


def _estimate(
    source: Disk, src_map: HashMap, differing: np.ndarray, options: SyncOptions
) -> _Moved:
    """What a real run would move (dry run): everything but the writes."""
    moved = _Moved()
    for run in _pipeline(source, src_map, differing, options):
        moved.wire += run.wire
        if run.data is not None:
            moved.read += run.length
    return moved


def _disk_id(disk: Disk) -> bytes:
    import hashlib

    return hashlib.sha256(os.path.realpath(disk.path).encode()).digest()[:16]

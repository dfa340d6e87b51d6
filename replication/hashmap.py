"""Hash maps: one XXH3-128 digest per block of a disk, held in a numpy array.

Theory of operation
-------------------
A map is computed by cutting the disk into *chunks* (a few MiB, whole blocks) and
hashing each block of each chunk. Chunks run on a small thread pool: ``os.preadv``,
xxhash and the formats' readers release the GIL, so two threads use both cores.
Ranges that the disk reports as zero extents (holes, unallocated grains) are not
read at all: their blocks get the precomputed digest of a zero block. A block that
is read and happens to be all zeros gets the same digest, so "is this block zero"
is one vectorised comparison with the zero digest, never a byte scan.

Several disks can be hashed at once (:func:`compute_maps`): their chunks are
interleaved on the same pool, so the source and the target of a sync are read in
parallel.

Memory: a whole map is 16 bytes per block (1 GiB for a 4 TiB disk at 64 KiB
blocks), so nothing that must stay bounded holds one. :func:`map_windows` hashes
disks *window by window* (``window_blocks`` blocks, :data:`WINDOW_BLOCKS` by
default: 16 MiB of digests, 64 GiB of disk at 64 KiB blocks) through one pass over
each disk's extents, and a map file is written (:class:`MapFileWriter`) and read
(:class:`MapFileReader`) a window at a time, never loaded whole.

File format (little-endian), written by :meth:`HashMap.save`:

======  ====  ==============================================================
Offset  Size  Field
======  ====  ==============================================================
0       8     magic ``b"RPLHMAP\\0"``
8       2     version (1)
10      2     reserved, 0
12      4     block size in bytes
16      8     covered size in bytes (the disk size the map describes)
24      8     block count N = ceil(covered size / block size)
32      4     generation length G (bytes of UTF-8)
36      4     reserved, 0
40      G     generation token of the disk when the map was taken
40+G    16*N  digests: XXH3-128 of each block, as 16 big-endian bytes
end-16  16    XXH3-128 of every preceding byte of the file
======  ====  ==============================================================
"""

from __future__ import annotations

import contextlib
import mmap
import os
import secrets
import struct
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import xxhash

from .blocks import block_count, check_block_size
from .disks.base import Disk, DiskInfo, Extent
from .durable import fsync_dir
from .errors import HashMapFormatError

__all__ = [
    "WINDOW_BLOCKS",
    "DiskWindow",
    "ExtentCursor",
    "HashMap",
    "MapFileReader",
    "MapFileWriter",
    "compute_maps",
    "map_windows",
    "zero_digest",
]

MAGIC = b"RPLHMAP\0"
VERSION = 1
SUPPORTED_VERSIONS = (1,)
_HEADER = struct.Struct("<8sHHIQQII")
_DIGEST = np.dtype((np.void, 16))
#: bytes read per task: whole blocks; 2 MiB measured fastest here (fits L2 beside the hash)
CHUNK_BYTES = 2 << 20
#: known-zero gaps up to this size between data are read rather than skipped
GAP_BYTES = 512 << 10
#: refuse map files claiming more than this many blocks (2^32 * 16 B = 64 TiB of digests:
#: 256 TiB of disk at 64 KiB blocks; a file is read a window at a time, never whole)
MAX_BLOCKS = 1 << 32
#: blocks per window of a streamed map: 16 MiB of digests (64 GiB of disk at 64 KiB)
WINDOW_BLOCKS = 1 << 20
#: bytes of a map file read at once while its checksum is verified
_READ_BYTES = 8 << 20

ProgressFn = Callable[[int], None]


def zero_digest(length: int) -> bytes:
    """Return the XXH3-128 digest of ``length`` zero bytes."""
    return _zero_digest_cached(length)


_ZERO_DIGESTS: dict[int, bytes] = {}


def _zero_digest_cached(length: int) -> bytes:
    d = _ZERO_DIGESTS.get(length)
    if d is None:
        d = xxhash.xxh3_128_digest(bytes(length))
        _ZERO_DIGESTS[length] = d
    return d


@dataclass
class HashMap:
    """The digests of every block of ``covered_size`` bytes of a disk."""

    block_size: int
    covered_size: int
    digests: np.ndarray  # shape (N,), dtype void16
    generation: str | None = None
    #: bytes actually read from the disk to compute this map (statistics only)
    bytes_read: int = 0

    @classmethod
    def empty(cls, covered_size: int, block_size: int) -> HashMap:
        """Return a map of zero blocks (what an all-zero disk hashes to)."""
        check_block_size(block_size)
        n = block_count(covered_size, block_size)
        digests = np.empty(n, dtype=_DIGEST)
        digests[:] = np.frombuffer(zero_digest(block_size), dtype=_DIGEST)[0]
        if n and covered_size % block_size:
            tail = zero_digest(covered_size % block_size)
            digests[n - 1] = np.frombuffer(tail, dtype=_DIGEST)[0]
        return cls(block_size, covered_size, digests)

    def __len__(self) -> int:
        return len(self.digests)

    def block_length(self, index: int) -> int:
        """Return the length in bytes of block ``index`` (the last may be short)."""
        return min(self.block_size, self.covered_size - index * self.block_size)

    def zero_mask(self) -> np.ndarray:
        """Return a bool array: True where the block is all zeros.

        Compared with the zero digest as one scalar (and the short last block on
        its own): no second map of the disk's size is built.
        """
        zero = np.frombuffer(zero_digest(self.block_size), dtype=_DIGEST)[0]
        mask = self.digests == zero
        tail = self.covered_size % self.block_size
        if len(mask) and tail:
            last = np.frombuffer(zero_digest(tail), dtype=_DIGEST)[0]
            mask[-1] = self.digests[-1] == last
        return mask

    def diff(self, other: HashMap) -> np.ndarray:
        """Return the sorted indexes of blocks whose digests differ from ``other``'s."""
        if (self.block_size, self.covered_size) != (other.block_size, other.covered_size):
            raise ValueError("maps of different geometry cannot be compared")
        return np.flatnonzero(self.digests != other.digests)

    def to_bytes(self) -> bytes:
        """Serialise the map in the versioned file format."""
        gen = (self.generation or "").encode()
        header = _HEADER.pack(
            MAGIC, VERSION, 0, self.block_size, self.covered_size, len(self), len(gen), 0
        )
        body = header + gen + self.digests.tobytes()
        return body + xxhash.xxh3_128_digest(body)

    @classmethod
    def from_bytes(cls, data: bytes) -> HashMap:
        """Parse a map file; raise HashMapFormatError on any inconsistency."""
        head = _parse_header(data[: _HEADER.size + 4096], len(data))
        if xxhash.xxh3_128_digest(data[: head.end]) != data[head.end :]:
            raise HashMapFormatError("hash map: checksum mismatch")
        digests = np.frombuffer(data, dtype=_DIGEST, count=head.blocks, offset=head.digests_at)
        return cls(head.block_size, head.covered_size, digests.copy(), generation=head.generation)

    def save(self, path: str) -> None:
        """Write the map durably: temporary file, fsync, rename, fsync directory."""
        with MapFileWriter(path, self.block_size, self.covered_size, self.generation) as out:
            out.append(self.digests)
            out.commit()

    @classmethod
    def load(cls, path: str) -> HashMap:
        """Read a map file written by :meth:`save` (whole: see :class:`MapFileReader`)."""
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as err:
            raise HashMapFormatError(f"hash map {path}: {err.strerror}") from err
        return cls.from_bytes(data)

    @classmethod
    def compute(
        cls,
        disk: Disk,
        block_size: int,
        *,
        covered_size: int | None = None,
        workers: int = 2,
        progress: ProgressFn | None = None,
    ) -> HashMap:
        """Hash ``disk`` (its first ``covered_size`` bytes) block by block."""
        return compute_maps([(disk, covered_size)], block_size, workers=workers, progress=progress)[
            0
        ]


@dataclass(frozen=True)
class _Header:
    block_size: int
    covered_size: int
    blocks: int
    generation: str | None
    digests_at: int  # offset of the first digest
    end: int  # offset of the checksum


def _parse_header(head: bytes, file_size: int) -> _Header:
    """Check a map file's header (its first bytes) against the file's size."""
    if len(head) < _HEADER.size or file_size < _HEADER.size + 16:
        raise HashMapFormatError("hash map: file is truncated")
    magic, version, _, bs, covered, n, glen, _ = _HEADER.unpack_from(head)
    if magic != MAGIC:
        raise HashMapFormatError("hash map: bad magic")
    if version not in SUPPORTED_VERSIONS:
        raise HashMapFormatError(f"hash map: unsupported version {version}")
    if n > MAX_BLOCKS or glen > 4096:
        raise HashMapFormatError("hash map: header claims an impossible size")
    if bs < 1 or n != block_count(covered, bs):
        raise HashMapFormatError("hash map: block count does not match the covered size")
    end = _HEADER.size + glen + 16 * n
    if file_size != end + 16 or len(head) < _HEADER.size + glen:
        raise HashMapFormatError("hash map: file length does not match its header")
    gen = head[_HEADER.size : _HEADER.size + glen].decode(errors="replace")
    return _Header(bs, covered, n, gen or None, _HEADER.size + glen, end)


class MapFileWriter:
    """Write a map file from digests appended in block order, a window at a time.

    The file appears at ``path`` only on :meth:`commit` (temporary file, fsync,
    rename, fsync directory), so after a crash it holds the old map or the new one;
    a writer closed without commit leaves nothing behind. Memory: what one
    :meth:`append` is given.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        block_size: int,
        covered_size: int,
        generation: str | None,
    ) -> None:
        self.path = os.fspath(path)
        self._blocks = block_count(covered_size, block_size)
        self._written = 0
        gen = (generation or "").encode()
        directory, name = os.path.split(self.path)
        self._tmp = os.path.join(directory, f".{name}.{secrets.token_hex(4)}.tmp")
        self._fd: int | None = os.open(
            self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644
        )
        self._sum = xxhash.xxh3_128()
        header = _HEADER.pack(
            MAGIC, VERSION, 0, block_size, covered_size, self._blocks, len(gen), 0
        )
        self._write(header + gen)

    def _write(self, data: bytes | memoryview) -> None:
        assert self._fd is not None, "writer already closed"
        self._sum.update(data)
        view = memoryview(data).cast("B")
        while view:
            view = view[os.write(self._fd, view) :]

    def append(self, digests: np.ndarray | bytes) -> None:
        """Add the digests of the next blocks (16 bytes each, in block order)."""
        data = digests.tobytes() if isinstance(digests, np.ndarray) else digests
        if len(data) % 16 or self._written + len(data) // 16 > self._blocks:
            raise ValueError("digests beyond the map's block count")
        self._written += len(data) // 16
        self._write(data)

    def commit(self) -> None:
        """Make the file durable under its name; every block must have been appended."""
        if self._written != self._blocks:
            raise ValueError(f"map file has {self._written} of {self._blocks} digests")
        self._write(self._sum.digest())
        fd, self._fd = self._fd, None
        assert fd is not None
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(self._tmp, self.path)
        fsync_dir(os.path.dirname(self.path) or ".")

    def close(self) -> None:
        """Drop an uncommitted file (no-op after :meth:`commit`)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._tmp)

    def __enter__(self) -> MapFileWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MapFileReader:
    """A map file read a window at a time (:meth:`digests`), never loaded whole.

    Opening checks the header and the checksum over the whole file, reading it in
    pieces of a few MiB: a damaged file raises HashMapFormatError before any digest
    is used. Memory: what one :meth:`digests` call returns.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            raise HashMapFormatError(f"hash map {self.path}: {err.strerror}") from err
        try:
            self._check()
        except BaseException:
            os.close(self._fd)
            raise

    def _check(self) -> None:
        size = os.fstat(self._fd).st_size
        head = _parse_header(os.pread(self._fd, _HEADER.size + 4096, 0), size)
        self._head = head
        self.block_size, self.covered_size = head.block_size, head.covered_size
        self.generation = head.generation
        digest = xxhash.xxh3_128()
        for offset in range(0, head.end, _READ_BYTES):
            digest.update(self._pread(min(_READ_BYTES, head.end - offset), offset))
        if digest.digest() != self._pread(16, head.end):
            raise HashMapFormatError("hash map: checksum mismatch")

    def _pread(self, length: int, offset: int) -> bytes:
        data = os.pread(self._fd, length, offset)
        if len(data) != length:  # the file shrank under us: a damaged entry
            raise HashMapFormatError(f"hash map {self.path}: file is truncated")
        return data

    def __len__(self) -> int:
        return self._head.blocks

    def digests(self, first: int, count: int) -> np.ndarray:
        """Return the digests of blocks ``[first, first + count)`` (read-only array)."""
        if first < 0 or count < 0 or first + count > len(self):
            raise ValueError(f"blocks {first}+{count} outside a map of {len(self)}")
        data = self._pread(16 * count, self._head.digests_at + 16 * first)
        return np.frombuffer(data, dtype=_DIGEST)

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> MapFileReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- windows: a part of a disk hashed as a disk of its own ---------------------------


class ExtentCursor:
    """One pass over a disk's extents, handed out window by window (in order)."""

    def __init__(self, disk: Disk) -> None:
        self._it = disk.extents()
        self._current: Extent | None = None

    def take(self, start: int, end: int) -> Iterator[Extent]:
        """Yield the extents of ``[start, end)``, relative to ``start``.

        An extent that reaches past ``end`` is kept for the next window, so every
        extent of the disk is read from the format once, whatever the window size.
        """
        while True:
            ext = self._current if self._current is not None else next(self._it, None)
            self._current = ext
            if ext is None or ext.offset >= end:
                return
            if ext.end <= start:
                self._current = None
                continue
            lo, hi = max(ext.offset, start), min(ext.end, end)
            if ext.end <= end:
                self._current = None
            yield Extent(lo - start, hi - lo, ext.zero)
            if hi == end:
                return


class DiskWindow(Disk):
    """Bytes ``[start, start + length)`` of another disk, read-only."""

    format_name = "window"

    def __init__(self, base: Disk, start: int, length: int, cursor: ExtentCursor) -> None:
        super().__init__(base.path, length, writable=False)
        self._base, self._start, self._cursor = base, start, cursor

    def _read_into(self, offset: int, view: memoryview) -> None:
        self._base.read_into(self._start + offset, view)

    def _extents(self) -> Iterator[Extent]:
        return self._cursor.take(self._start, self._start + self.virtual_size)

    def info(self) -> DiskInfo:
        return self._base.info()


def map_windows(
    disks: Sequence[Disk],
    covered_size: int,
    block_size: int,
    *,
    window_blocks: int = WINDOW_BLOCKS,
    workers: int = 2,
    progress: ProgressFn | None = None,
) -> Iterator[tuple[int, list[HashMap]]]:
    """Hash the first ``covered_size`` bytes of several disks a window at a time.

    Yields ``(first block, maps)``: one map per disk of the window's blocks (the last
    window may be shorter, and its last block short). ``window_blocks`` is rounded up
    to a multiple of 8, so a window's blocks fill whole bytes of a packed bitmap.
    Memory: 16 bytes per block of one window per disk, whatever the disks' sizes.
    """
    check_block_size(block_size)
    if window_blocks < 1:
        raise ValueError(f"window of {window_blocks} blocks")
    window_bytes = -(-window_blocks // 8) * 8 * block_size
    cursors = [ExtentCursor(d) for d in disks]
    for start in range(0, covered_size, window_bytes):
        length = min(window_bytes, covered_size - start)
        parts = [
            (DiskWindow(d, start, length, c), None) for d, c in zip(disks, cursors, strict=True)
        ]
        yield (
            start // block_size,
            compute_maps(parts, block_size, workers=workers, progress=progress),
        )


@dataclass
class _Job:
    disk: Disk
    hmap: HashMap


def compute_maps(
    disks: Sequence[tuple[Disk, int | None]],
    block_size: int,
    *,
    workers: int = 2,
    progress: ProgressFn | None = None,
) -> list[HashMap]:
    """Hash several disks at once on one pool; return their maps in order.

    ``progress`` is called from worker threads with the number of bytes of disk
    covered by each finished chunk (read or known zero).
    """
    check_block_size(block_size)
    jobs = []
    for disk, covered in disks:
        size = disk.virtual_size if covered is None else covered
        jobs.append(_Job(disk, HashMap.empty(size, block_size)))
    tasks = _interleave([_chunk_tasks(job, progress) for job in jobs])
    _run_bounded(tasks, workers, _hash_chunk)
    return [job.hmap for job in jobs]


def _chunk_tasks(job: _Job, progress: ProgressFn | None) -> Iterator[tuple]:
    """Yield (job, first_block, nblocks) for every run of blocks that must be read."""
    hmap = job.hmap
    bs = hmap.block_size
    need = _fill_short_gaps(_blocks_to_read(job.disk, hmap), max(1, GAP_BYTES // bs))
    per_chunk = max(1, CHUNK_BYTES // bs)
    for first, count in _runs(need, per_chunk):
        hmap.bytes_read += min(count * bs, hmap.covered_size - first * bs)
        yield (job, first, count, progress)
    if progress is not None:
        progress(min(int((~need).sum()) * bs, hmap.covered_size))


def _blocks_to_read(disk: Disk, hmap: HashMap) -> np.ndarray:
    """Return a bool array: True for blocks not wholly inside a known-zero extent."""
    need = np.ones(len(hmap), dtype=bool)
    bs, covered = hmap.block_size, hmap.covered_size
    for ext in disk.extents():
        if ext.offset >= covered:
            break
        if not ext.zero:
            continue
        end = min(ext.end, covered)
        first = -(-ext.offset // bs)  # first block wholly inside the extent
        last = len(hmap) if end >= covered else end // bs  # the short tail block counts
        if last > first:
            need[first:last] = False
    return need


def _fill_short_gaps(need: np.ndarray, max_gap: int) -> np.ndarray:
    """Mark short known-zero gaps between reads as to-be-read.

    Reading a few zero blocks from the page cache costs less than a separate task
    and syscall per run; their digests come out as the zero digest all the same.
    """
    if not len(need) or need.all() or not need.any():
        return need
    padded = np.concatenate(([True], need, [True])).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))  # gap starts (1->0) and ends (0->1)
    out = need.copy()
    for start, stop in zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True):
        if stop - start <= max_gap and start > 0 and stop < len(need):
            out[start:stop] = True
    return out


def _runs(mask: np.ndarray, max_len: int) -> Iterator[tuple[int, int]]:
    """Yield (first, count) runs of True in ``mask``, each at most ``max_len`` long."""
    if not len(mask):
        return
    padded = np.concatenate(([False], mask, [False])).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    for start, stop in zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True):
        for first in range(start, stop, max_len):
            yield first, min(max_len, stop - first)


_local = threading.local()


def _buffer(size: int) -> memoryview:
    """Return this thread's reusable read buffer, page-aligned.

    Page alignment matters: the kernel copies from the page cache into a
    page-aligned buffer about five times faster than into a malloc'd bytearray
    (measured here: 12 vs 2.3 GB/s for 1 MiB preadv).
    """
    buf = getattr(_local, "buf", None)
    if buf is None or len(buf) < size:
        buf = mmap.mmap(-1, max(size, CHUNK_BYTES))
        _local.buf = buf
    return memoryview(buf)[:size]


def _hash_chunk(task: tuple) -> None:
    job, first, count, progress = task
    hmap: HashMap = job.hmap
    bs = hmap.block_size
    offset = first * bs
    length = min(count * bs, hmap.covered_size - offset)
    view = _buffer(length)
    job.disk.read_into(offset, view)
    digest = xxhash.xxh3_128_digest
    out = b"".join([digest(view[i : i + bs]) for i in range(0, length, bs)])
    hmap.digests[first : first + count] = np.frombuffer(out, dtype=_DIGEST)
    if progress is not None:
        progress(length)


def _interleave(iterators: list[Iterator[tuple]]) -> Iterator[tuple]:
    """Round-robin over several task iterators, so every disk is read at once."""
    active = deque(iterators)
    while active:
        it = active.popleft()
        try:
            item = next(it)
        except StopIteration:
            continue
        active.append(it)
        yield item


def _run_bounded(tasks: Iterator[tuple], workers: int, fn: Callable[[tuple], None]) -> None:
    """Run ``fn`` over ``tasks`` on ``workers`` threads that pull tasks themselves.

    Workers take the next task under a lock, so no future or queue sits between
    them (that bookkeeping, on the GIL, halved the 2-thread hashing rate). The
    first failure stops every worker and is re-raised here.
    """
    if workers <= 1:
        for t in tasks:
            fn(t)
        return
    lock = threading.Lock()
    failures: list[BaseException] = []

    def worker() -> None:
        while not failures:
            with lock:
                task = next(tasks, None)
            if task is None:
                return
            try:
                fn(task)
            except BaseException as err:  # re-raised in the calling thread below
                failures.append(err)
                return

    threads = [threading.Thread(target=worker, name=f"hash-{i}") for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise failures[0]

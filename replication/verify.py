"""Prove two disks equal, or a disk equal to a recovery point's manifest.

Theory of operation
-------------------
*Two disks* (:func:`verify_disks`): both are cut into *windows* of
:data:`WINDOW_BYTES` (whole blocks) and each window of both disks is hashed at once
with :func:`~replication.hashmap.compute_maps` (zero extents are not read). A window
is a view of the disk (:class:`~replication.hashmap.DiskWindow`), so the maps cost
16 bytes per block of one window, not of the disk: a hostile descriptor claiming
petabytes of zeros, or a 64 TiB pair, never makes a map of the whole disk.

Blocks whose digests differ are *re-checked* before they are reported: after at
least ``recheck_delay`` seconds (the next window is hashed meanwhile), both disks'
bytes of those blocks are read again, one right after the other, and compared
byte for byte. Only blocks that still differ are reported, so a block written while
the first pass read it (a replication write in flight) is not reported as
corruption. ``rechecks`` rounds are made, ``recheck_delay`` apart. Given paths, each
round opens the disks again: a sparse VMDK or VHD reads its grain tables or BAT at
open, so only a fresh open sees a grain a writer allocated meanwhile.

*A disk and a manifest* (:func:`verify_manifest`): the manifest of a recovery point
(:class:`~replication.manifest.ManifestStore`, proven against its root when loaded)
is compared with the disk's digests by :meth:`ManifestStore.verify_disk`; differing
blocks are re-hashed and compared again before they are reported.

Limits
------
* Verification reads the disks at different moments. On a pair that is being
  written it proves nothing about any single instant: a block changed on both sides
  between the two passes compares equal, and a block that the replication has not
  caught up with after every re-check is reported (re-run it on a quiesced pair, or
  against a recovery point's manifest, for a proof).
* The first pass compares XXH3-128 digests: fine against accidental divergence, not
  against blocks crafted to collide. Re-checks of two disks compare bytes; re-checks
  against a manifest can only compare digests again.
* TARGET may be larger than SOURCE (``replication sync`` leaves a larger target's tail
  alone): its bytes past SOURCE's size are not compared. A smaller TARGET, or a disk
  smaller than the manifest, differs.
* Reading a manifest store does not take the volume's journal lock (the master
  target holds it while it runs); a point pruned meanwhile is a typed error. The
  store is opened read-only (:meth:`ManifestStore.open_read_only`): verify creates,
  removes and writes nothing in it, so the owner's commit in flight is left alone.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import xxhash

from .blocks import DEFAULT_BLOCK_SIZE, block_runs, check_block_size
from .disks import Disk, open_disk
from .errors import ManifestError, ManifestNotFoundError, UsageError
from .hashmap import DiskWindow, ExtentCursor, compute_maps
from .manifest import OBJECTS_DIR, ManifestStore

__all__ = [
    "WINDOW_BYTES",
    "BlockRange",
    "VerifyOptions",
    "VerifyReport",
    "open_store",
    "verify_disks",
    "verify_manifest",
    "verify_manifest_path",
    "verify_paths",
]

#: bytes of each disk hashed per pass: whole blocks of any size, 1 MiB of digests at 64K
WINDOW_BYTES = 4 << 30
#: bytes read per run when re-checking
RECHECK_BYTES = 4 << 20
_ROOT_RE = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class VerifyOptions:
    """How to verify; every field has a sensible default."""

    block_size: int = DEFAULT_BLOCK_SIZE
    workers: int = 2
    #: rounds of re-reading differing blocks before reporting them (0: report at once)
    rechecks: int = 1
    #: seconds between the first read of a differing block and its re-check, and between rounds
    recheck_delay: float = 0.5
    #: ranges kept for the report (every differing block is counted all the same)
    max_ranges: int = 1000
    window_bytes: int = WINDOW_BYTES


@dataclass(frozen=True)
class BlockRange:
    """A run of ``blocks`` differing blocks from block ``first``, and its bytes."""

    first: int
    blocks: int
    offset: int
    length: int


@dataclass(frozen=True)
class VerifyReport:
    """What a verification found; ``equal`` is the verdict."""

    mode: str  # "disks" | "manifest"
    source: str  # the disk compared (SOURCE, or DISK in manifest mode)
    target: str  # TARGET, or "<store>#<root>"
    block_size: int
    compared_bytes: int
    blocks_compared: int
    #: blocks whose digests differed in the first pass
    first_pass_blocks: int
    #: blocks that still differed after every re-check: the verdict
    blocks_differing: int
    ranges: tuple[BlockRange, ...]
    ranges_total: int
    #: bytes of SOURCE (or of the manifest) that TARGET (or DISK) lacks: it is smaller
    missing_bytes: int
    #: bytes of TARGET (or DISK) past SOURCE's size (or the manifest's): not compared
    extra_bytes: int
    seconds: float

    @property
    def equal(self) -> bool:
        """Whether every compared block is equal and nothing is missing."""
        return self.blocks_differing == 0 and self.missing_bytes == 0

    @property
    def ranges_truncated(self) -> bool:
        return self.ranges_total > len(self.ranges)

    def to_dict(self) -> dict[str, object]:
        """Return the report as a JSON-friendly record."""
        d = asdict(self)
        d["ranges"] = [asdict(r) for r in self.ranges]
        d["equal"] = self.equal
        d["ranges_truncated"] = self.ranges_truncated
        return d


# --- findings -----------------------------------------------------------------------


@dataclass
class _Findings:
    """Confirmed differing blocks, merged into ranges; only the first ``keep`` are kept."""

    block_size: int
    size: int
    keep: int
    blocks: int = 0
    total: int = 0
    ranges: list[BlockRange] = field(default_factory=list)
    _last_end: int = -1
    _last_kept: bool = False

    def add(self, indexes: np.ndarray) -> None:
        """Count sorted block indexes, each later than any added before."""
        self.blocks += len(indexes)
        for first, count in block_runs(indexes, 1 << 62):
            if first == self._last_end:  # continues the last range (across windows)
                if self._last_kept:
                    last = self.ranges[-1]
                    self.ranges[-1] = self._range(last.first, last.blocks + count)
            else:
                self.total += 1
                self._last_kept = len(self.ranges) < self.keep
                if self._last_kept:
                    self.ranges.append(self._range(first, count))
            self._last_end = first + count

    def _range(self, first: int, count: int) -> BlockRange:
        offset = first * self.block_size
        end = min((first + count) * self.block_size, self.size)
        return BlockRange(first, count, offset, end - offset)


def _wait_until(moment: float) -> None:
    delay = moment - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def _recheck(
    indexes: np.ndarray,
    seen_at: float,
    options: VerifyOptions,
    still_differing: Callable[[np.ndarray], np.ndarray],
) -> np.ndarray:
    """Run the re-check rounds on ``indexes``, first read at ``seen_at``; return the rest."""
    for _ in range(options.rechecks):
        if not len(indexes):
            break
        _wait_until(seen_at + options.recheck_delay)
        indexes = still_differing(indexes)
        seen_at = time.monotonic()
    return indexes


def _runs(indexes: np.ndarray, block_size: int) -> Iterator[tuple[int, int]]:
    return block_runs(indexes, max(1, RECHECK_BYTES // block_size))


# --- two disks ------------------------------------------------------------------------


def verify_paths(source: str, target: str, options: VerifyOptions | None = None) -> VerifyReport:
    """Open both paths read-only (formats detected) and verify them.

    Re-checks open both paths again: a sparse format's tables are read at open, so
    only a fresh open sees grains or blocks a writer allocated meanwhile.
    """
    with open_disk(source) as src, open_disk(target) as tgt:
        reopen = functools.partial(_open_all, source, target)
        return verify_disks(src, tgt, options, reopen=reopen)


def _open_all(*paths: str) -> list[Disk]:
    """Open every path read-only; close those already open if one fails."""
    disks: list[Disk] = []
    try:
        for path in paths:
            disks.append(open_disk(path))
    except BaseException:
        for d in disks:
            d.close()
        raise
    return disks


def verify_disks(
    source: Disk,
    target: Disk,
    options: VerifyOptions | None = None,
    *,
    reopen: Callable[[], list[Disk]] | None = None,
) -> VerifyReport:
    """Compare ``target`` with ``source`` over the source's size; see the module docstring.

    ``reopen``, if given, returns fresh ``[source, target]`` handles for each re-check
    round (closed after it); without it the re-checks read through these handles.
    """
    options = _checked(options or VerifyOptions())
    started = time.monotonic()
    bs, size = options.block_size, min(source.virtual_size, target.virtual_size)
    found = _Findings(bs, size, options.max_ranges)
    recheck = _DiskPair(reopen or (lambda: [source, target]), reopen is not None, bs, size)
    first_pass = _compare_windows(source, target, size, options, found, recheck)
    return VerifyReport(
        mode="disks",
        source=source.path,
        target=target.path,
        block_size=bs,
        compared_bytes=size,
        blocks_compared=-(-size // bs),
        first_pass_blocks=first_pass,
        blocks_differing=found.blocks,
        ranges=tuple(found.ranges),
        ranges_total=found.total,
        missing_bytes=max(0, source.virtual_size - target.virtual_size),
        extra_bytes=max(0, target.virtual_size - source.virtual_size),
        seconds=round(time.monotonic() - started, 3),
    )


def _compare_windows(
    source: Disk,
    target: Disk,
    size: int,
    options: VerifyOptions,
    found: _Findings,
    recheck: Callable[[np.ndarray], np.ndarray],
) -> int:
    """Hash both disks window by window; return how many blocks differed in the first pass.

    A window's differing blocks are re-checked after the next window is hashed, so the
    delay before a re-check is mostly spent doing useful work.
    """
    bs = options.block_size
    cursors = (ExtentCursor(source), ExtentCursor(target))
    first_pass, pending = 0, None
    for start in range(0, size, options.window_bytes):
        length = min(options.window_bytes, size - start)
        windows = [
            (DiskWindow(d, start, length, c), None)
            for d, c in zip((source, target), cursors, strict=True)
        ]
        maps = compute_maps(windows, bs, workers=options.workers)
        differing = maps[0].diff(maps[1]).astype(np.int64) + start // bs
        first_pass += len(differing)
        if pending is not None:
            found.add(_recheck(*pending, options, recheck))
        pending = (differing, time.monotonic()) if len(differing) else None
    if pending is not None:
        found.add(_recheck(*pending, options, recheck))
    return first_pass


@dataclass
class _Rechecker:
    """Runs one re-check round on disks from ``disks()``, closing them after if ``owned``."""

    disks: Callable[[], list[Disk]]
    owned: bool
    block_size: int
    size: int

    def __call__(self, indexes: np.ndarray) -> np.ndarray:
        disks = self.disks()
        try:
            return self.still_differing(disks, indexes)
        finally:
            for d in disks if self.owned else ():
                d.close()

    def still_differing(self, disks: list[Disk], indexes: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class _DiskPair(_Rechecker):
    """Re-reads blocks of both disks and keeps those whose bytes still differ."""

    def still_differing(self, disks: list[Disk], indexes: np.ndarray) -> np.ndarray:
        (source, target), bs, keep = disks, self.block_size, []
        for first, count in _runs(indexes, bs):
            offset = first * bs
            length = min(count * bs, self.size - offset)
            a = memoryview(source.read(offset, length))
            b = memoryview(target.read(offset, length))  # right after: a small window
            keep += [
                first + i
                for i in range(count)
                if a[i * bs : (i + 1) * bs] != b[i * bs : (i + 1) * bs]
            ]
        return np.asarray(keep, dtype=np.int64)


def _checked(options: VerifyOptions) -> VerifyOptions:
    check_block_size(options.block_size)
    if options.rechecks < 0 or options.recheck_delay < 0 or options.max_ranges < 0:
        raise UsageError("rechecks, recheck delay and max ranges must not be negative")
    if options.workers < 1 or options.window_bytes < options.block_size:
        raise UsageError("workers must be >= 1 and the window at least one block")
    if options.window_bytes % options.block_size:
        raise UsageError("the window must be a whole number of blocks")
    return options


# --- a disk and a recovery point's manifest -------------------------------------------


def verify_manifest_path(
    disk: str, store_dir: str, root: str, options: VerifyOptions | None = None
) -> VerifyReport:
    """Open ``disk`` read-only and verify it against manifest ``root`` of ``store_dir``."""
    store = open_store(store_dir, root)  # before the disk: a wrong store is the likelier typo
    with open_disk(disk) as d:
        reopen = functools.partial(_open_all, disk)  # re-checks see fresh tables
        return verify_manifest(d, store, root, options, where=store_dir, reopen=reopen)


def open_store(store_dir: str, root: str) -> ManifestStore:
    """Open an existing manifest store holding ``root``; never create one."""
    if not _ROOT_RE.fullmatch(root):
        raise UsageError(f"manifest root must be 64 lower-case hex digits, not {root!r}")
    if not (Path(store_dir) / OBJECTS_DIR).is_dir():
        raise ManifestError(
            f"{store_dir} is not a manifest store (no {OBJECTS_DIR}/ directory)",
            hint="the master target keeps them in DATA_DIR/history/VOLUME/manifests",
        )
    store = ManifestStore.open_read_only(store_dir)  # its owner may be writing
    if not store.exists(root):
        raise ManifestNotFoundError(
            f"manifest {root} is not in {store_dir}",
            hint="list roots with `replication recovery-points VOLUME ADDR --json` "
            "(manifest_root); pruned points lose their manifest",
        )
    return store


def verify_manifest(
    disk: Disk,
    store: ManifestStore,
    root: str,
    options: VerifyOptions | None = None,
    *,
    where: str = "",
    reopen: Callable[[], list[Disk]] | None = None,
) -> VerifyReport:
    """Compare ``disk`` with the manifest ``root``; see the module docstring.

    ``reopen``: as for :func:`verify_disks`, returning ``[disk]``.
    """
    options = _checked(options or VerifyOptions())
    started = time.monotonic()
    info = store.info(root)
    bs, size = info.block_size, info.size
    found = _Findings(bs, size, options.max_ranges)
    first_pass = 0
    if disk.virtual_size >= size:
        runs = store.verify_disk(disk, root, workers=options.workers)
        seen_at = time.monotonic()
        indexes = np.concatenate([np.arange(f, f + n) for f, n in runs] or [np.zeros(0)])
        indexes = indexes.astype(np.int64)
        first_pass = len(indexes)
        if first_pass:
            digests = store.load(root).digests
            disks = reopen or (lambda: [disk])
            check = _DiskVsManifest(disks, reopen is not None, bs, size, digests)
            found.add(_recheck(indexes, seen_at, options, check))
    return VerifyReport(
        mode="manifest",
        source=disk.path,
        target=f"{where or 'store'}#{root}",
        block_size=bs,
        compared_bytes=size if disk.virtual_size >= size else 0,
        blocks_compared=info.blocks if disk.virtual_size >= size else 0,
        first_pass_blocks=first_pass,
        blocks_differing=found.blocks,
        ranges=tuple(found.ranges),
        ranges_total=found.total,
        missing_bytes=max(0, size - disk.virtual_size),
        extra_bytes=max(0, disk.virtual_size - size),
        seconds=round(time.monotonic() - started, 3),
    )


@dataclass
class _DiskVsManifest(_Rechecker):
    """Re-hashes blocks of a disk and keeps those whose digest still differs."""

    digests: np.ndarray

    def still_differing(self, disks: list[Disk], indexes: np.ndarray) -> np.ndarray:
        (disk,), bs, keep = disks, self.block_size, []
        for first, count in _runs(indexes, bs):
            offset = first * bs
            data = memoryview(disk.read(offset, min(count * bs, self.size - offset)))
            for i in range(count):
                digest = xxhash.xxh3_128_digest(data[i * bs : (i + 1) * bs])
                if digest != self.digests[first + i].tobytes():
                    keep.append(first + i)
        return np.asarray(keep, dtype=np.int64)

"""Recovery-point manifests: the block digests of a volume at a point, and their root.

Theory of operation
-------------------
A *manifest* is what :class:`~replication.hashmap.HashMap` holds for a volume at one
recovery point: the XXH3-128 digest of every block. Its *root* is a SHA-256 Merkle
tree over those digests:

* leaf ``i`` = ``SHA-256(0x00 || digests[i*L : (i+1)*L])`` (``L`` digests per leaf,
  4096 by default; the last leaf may be shorter);
* inner node = ``SHA-256(0x01 || child hashes)``, ``F`` children each (64 by
  default), level by level until one hash, the *top*, remains (no leaves: the top
  is ``SHA-256(0x00)``);
* root = ``SHA-256(0x02 || "RPLM" || version || block size || size || block count
  || L || F || top)``: the geometry is committed too.

SHA-256, not XXH3, because the root is the point's proof: whoever holds a root can
check that a stored digest list is the one committed, and nobody can forge another
list with the same root. (The per-block digests are XXH3-128: they detect accidental
divergence, not a block crafted by an adversary; see ``docs/journal.md``.)

Storage (why not one object per tree node)
------------------------------------------
Points are taken every few minutes and differ in few, *scattered* blocks. A
content-addressed node store pays a whole leaf (``16 L`` bytes) plus a whole inner
node per level for every scattered changed block: with 1 % of the blocks changed at
random, a quarter or more of the full manifest is rewritten per point whatever ``L``
is. So the store keeps one object per root instead, named by the root:

* ``FULL``: every digest (a bitmap of non-zero blocks, then their digests: a sparse
  volume costs little);
* ``DELTA``: the parent's root, and the index and new digest of each block that
  differs from the parent (20 bytes per changed block).

The tree itself is never stored: it is recomputed from the digests when an object is
loaded (only the leaves a delta touches), and every object of a chain is checked
against its name, so a loaded manifest is proven, not trusted. A chain is cut (a
``FULL`` is written) when it reaches ``max_chain`` deltas or its deltas add up to
``delta_budget`` times the size of a full object, which bounds both the load cost
and what :meth:`ManifestStore.gc` must keep behind the oldest kept point.

Every object is written with :func:`~replication.durable.write_atomically` and ends
with an XXH3-128 checksum. Layouts: ``docs/journal.md``. One owner per store: keep it
inside the volume's journal directory, whose lock covers it.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import xxhash

from .blocks import block_count, block_runs
from .disks.base import Disk
from .durable import fsync_dir, write_atomically
from .errors import (
    DiskSizeMismatchError,
    ManifestCorruptError,
    ManifestError,
    ManifestNotFoundError,
    UsageError,
)
from .hashmap import HashMap

__all__ = [
    "DEFAULT_FANOUT",
    "DEFAULT_LEAF_DIGESTS",
    "DigestTracker",
    "GcResult",
    "ManifestInfo",
    "ManifestStore",
    "StoreStats",
    "leaf_hashes",
    "merkle_root",
]

MAGIC: Final = b"RPLMANI\0"
VERSION: Final = 1
SUPPORTED_VERSIONS: Final = (1,)
KIND_FULL: Final = 1
KIND_DELTA: Final = 2
DEFAULT_LEAF_DIGESTS: Final = 4096
DEFAULT_FANOUT: Final = 64
DEFAULT_MAX_CHAIN: Final = 288  # a day of 5-minute points
DEFAULT_DELTA_BUDGET: Final = 1.0
#: block indexes are stored as u32
MAX_BLOCKS: Final = (1 << 32) - 1
OBJECTS_DIR: Final = "objects"

#: magic, version, kind, fanout, block size, size, block count, leaf digests, reserved, root
_HEADER = struct.Struct(">8sBBHIQQII32s")
#: parent root, depth, changed count, chain bytes
_DELTA = struct.Struct(">32sIIQ")
_ROOT_PREIMAGE = struct.Struct(">B4sBIQQIH32s")
_TRAILER = 16
_DIGEST = np.dtype((np.void, 16))
_HASH = np.dtype((np.void, 32))
_NAME_RE = re.compile(r"[0-9a-f]{64}")

assert _HEADER.size == 72 and _DELTA.size == 48


# --- the tree -----------------------------------------------------------------------


def leaf_hashes(
    digests: np.ndarray,
    leaf_digests: int = DEFAULT_LEAF_DIGESTS,
    groups: Iterable[int] | None = None,
) -> np.ndarray:
    """Return the SHA-256 leaf hashes of ``digests`` (every leaf, or only ``groups``).

    With ``groups`` the result has one hash per listed group, in that order.
    """
    raw = memoryview(np.ascontiguousarray(digests)).cast("B")
    width = 16 * leaf_digests
    numbers = range(block_count(len(digests), leaf_digests)) if groups is None else groups
    out = bytearray()
    for g in numbers:
        h = hashlib.sha256(b"\x00")
        h.update(raw[g * width : (g + 1) * width])
        out += h.digest()
    return np.frombuffer(bytes(out), dtype=_HASH)


def _top(leaves: np.ndarray, fanout: int) -> bytes:
    """Hash ``leaves`` up, ``fanout`` children per node, to the single top hash."""
    level = leaves.tobytes()
    if not level:
        return hashlib.sha256(b"\x00").digest()
    width = 32 * fanout
    while len(level) > 32:
        level = b"".join(
            hashlib.sha256(b"\x01" + level[i : i + width]).digest()
            for i in range(0, len(level), width)
        )
    return level


def _root(top: bytes, geometry: _Geometry) -> bytes:
    g = geometry
    preimage = _ROOT_PREIMAGE.pack(
        2, b"RPLM", VERSION, g.block_size, g.size, g.blocks, g.leaf_digests, g.fanout, top
    )
    return hashlib.sha256(preimage).digest()


def merkle_root(
    digests: np.ndarray,
    block_size: int,
    size: int,
    *,
    leaf_digests: int = DEFAULT_LEAF_DIGESTS,
    fanout: int = DEFAULT_FANOUT,
) -> str:
    """Return the hex root of ``digests`` for a volume of ``size`` bytes (see module doc)."""
    geometry = _Geometry(block_size, size, block_count(size, block_size), leaf_digests, fanout)
    digests = _check_digests(digests, geometry.blocks)
    return _root(_top(leaf_hashes(digests, leaf_digests), fanout), geometry).hex()


# --- records ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Geometry:
    block_size: int
    size: int
    blocks: int
    leaf_digests: int
    fanout: int

    def validate(self) -> None:
        """Raise ManifestCorruptError unless every field is possible."""
        bs = self.block_size
        if bs < 1 or bs & (bs - 1):
            raise ManifestCorruptError(f"block size {bs} is not a power of two")
        if self.blocks != block_count(self.size, bs) or self.blocks > MAX_BLOCKS:
            raise ManifestCorruptError("block count does not match the size")
        if self.leaf_digests < 1 or self.fanout < 2:
            raise ManifestCorruptError("impossible tree shape")


@dataclass(frozen=True, slots=True)
class ManifestInfo:
    """What one stored manifest object is: ``kind`` is ``"full"`` or ``"delta"``."""

    root: str
    kind: str
    parent: str | None
    depth: int  # deltas down to the nearest full object (0 for a full one)
    chain_bytes: int  # bytes of the deltas of that chain, this one included
    changed: int  # blocks this object stores (non-zero blocks of a full one)
    block_size: int
    size: int
    blocks: int
    file_bytes: int


@dataclass(frozen=True, slots=True)
class GcResult:
    """What :meth:`ManifestStore.gc` did."""

    kept: int
    deleted: int
    freed_bytes: int


@dataclass(frozen=True, slots=True)
class StoreStats:
    """Objects and bytes in a store (:meth:`ManifestStore.statistics`)."""

    objects: int
    full_objects: int
    bytes: int


@dataclass(slots=True)
class _State:
    """A loaded manifest: its digests and leaf hashes, proven against ``root``."""

    root: bytes
    geometry: _Geometry
    digests: np.ndarray
    leaves: np.ndarray
    depth: int
    chain_bytes: int


def _check_digests(digests: np.ndarray, blocks: int) -> np.ndarray:
    arr = np.ascontiguousarray(digests)
    if arr.dtype != _DIGEST or arr.shape != (blocks,):
        raise UsageError(f"digests must be {blocks} 16-byte digests (HashMap.digests)")
    return arr


def _zero_reference(geometry: _Geometry) -> np.ndarray:
    return HashMap.empty(geometry.size, geometry.block_size).digests


def _pack_header(kind: int, g: _Geometry, root: bytes) -> bytes:
    return _HEADER.pack(
        MAGIC, VERSION, kind, g.fanout, g.block_size, g.size, g.blocks, g.leaf_digests, 0, root
    )


def _encode_full(root: bytes, g: _Geometry, digests: np.ndarray) -> bytes:
    nonzero = digests != _zero_reference(g)
    header = _pack_header(KIND_FULL, g, root)
    body = header + np.packbits(nonzero).tobytes() + digests[nonzero].tobytes()
    return body + xxhash.xxh3_128_digest(body)


def _encode_delta(
    root: bytes, g: _Geometry, parent: _State, changed: np.ndarray, digests: np.ndarray
) -> bytes:
    size = _HEADER.size + _DELTA.size + 20 * len(changed) + _TRAILER
    header = _pack_header(KIND_DELTA, g, root)
    delta = _DELTA.pack(parent.root, parent.depth + 1, len(changed), parent.chain_bytes + size)
    body = b"".join((header, delta, changed.astype(">u4").tobytes(), digests[changed].tobytes()))
    return body + xxhash.xxh3_128_digest(body)


@dataclass(frozen=True, slots=True)
class _Object:
    """A parsed, checksum-verified object file (digests not yet applied)."""

    kind: int
    root: bytes
    geometry: _Geometry
    parent: bytes | None
    depth: int
    chain_bytes: int
    indexes: np.ndarray  # FULL: the non-zero blocks; DELTA: the changed blocks
    digests: np.ndarray
    file_bytes: int


def _parse_object(data: bytes, name: bytes) -> _Object:
    """Parse and check one object file; raise ManifestCorruptError on any inconsistency."""
    if len(data) < _HEADER.size + _TRAILER:
        raise ManifestCorruptError("object is truncated")
    magic, version, kind, fanout, bs, size, blocks, leaf, reserved, root = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ManifestCorruptError("bad magic")
    if version not in SUPPORTED_VERSIONS or kind not in (KIND_FULL, KIND_DELTA) or reserved:
        raise ManifestCorruptError(f"unsupported version {version} or kind {kind}")
    if xxhash.xxh3_128_digest(data[:-_TRAILER]) != data[-_TRAILER:]:
        raise ManifestCorruptError("checksum mismatch")
    if root != name:
        raise ManifestCorruptError(f"object names root {root.hex()}")
    geometry = _Geometry(bs, size, blocks, leaf, fanout)
    geometry.validate()
    if kind == KIND_FULL:
        return _parse_full(data, root, geometry)
    return _parse_delta(data, root, geometry)


def _parse_full(data: bytes, root: bytes, g: _Geometry) -> _Object:
    nbytes = -(-g.blocks // 8)
    bits = np.frombuffer(data, dtype=np.uint8, count=nbytes, offset=_HEADER.size)
    mask = np.unpackbits(bits, count=g.blocks).astype(bool)
    if int(np.unpackbits(bits).sum()) != int(mask.sum()):
        raise ManifestCorruptError("bitmap padding bits are set")
    count = int(mask.sum())
    if len(data) != _HEADER.size + nbytes + 16 * count + _TRAILER:
        raise ManifestCorruptError("length does not match the bitmap")
    digests = np.frombuffer(data, dtype=_DIGEST, count=count, offset=_HEADER.size + nbytes)
    return _Object(KIND_FULL, root, g, None, 0, 0, np.flatnonzero(mask), digests, len(data))


def _parse_delta(data: bytes, root: bytes, g: _Geometry) -> _Object:
    if len(data) < _HEADER.size + _DELTA.size + _TRAILER:
        raise ManifestCorruptError("delta is truncated")
    parent, depth, count, chain = _DELTA.unpack_from(data, _HEADER.size)
    start = _HEADER.size + _DELTA.size
    if depth < 1 or len(data) != start + 20 * count + _TRAILER:
        raise ManifestCorruptError("delta length or depth does not match its header")
    indexes = np.frombuffer(data, dtype=">u4", count=count, offset=start).astype(np.int64)
    if count and (indexes[-1] >= g.blocks or (count > 1 and np.any(np.diff(indexes) <= 0))):
        raise ManifestCorruptError("delta indexes are not ascending block numbers")
    digests = np.frombuffer(data, dtype=_DIGEST, count=count, offset=start + 4 * count)
    return _Object(KIND_DELTA, root, g, parent, depth, chain, indexes, digests, len(data))


# --- the store ----------------------------------------------------------------------


class ManifestStore:
    """Manifest objects of one volume in ``directory/objects/<root hex>``.

    Not thread-safe; one owner (the master target) opens it with the constructor,
    which creates the directory and removes leftovers of its interrupted writes.
    Anyone else (``replication verify`` beside a running master target) opens it
    with :meth:`open_read_only`: no directory made, no file removed or written, so
    the owner's write in flight (a ``.*.tmp`` not yet renamed) is left alone.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        leaf_digests: int = DEFAULT_LEAF_DIGESTS,
        fanout: int = DEFAULT_FANOUT,
        max_chain: int = DEFAULT_MAX_CHAIN,
        delta_budget: float = DEFAULT_DELTA_BUDGET,
        read_only: bool = False,
    ) -> None:
        """Open (creating if needed) a store; leftovers of interrupted writes are removed.

        ``read_only``: open an existing store only; create, remove and write nothing
        (commit and gc raise ManifestError).
        """
        if leaf_digests < 1 or fanout < 2 or fanout > 0xFFFF or max_chain < 0:
            raise UsageError("leaf_digests >= 1, 2 <= fanout <= 65535 and max_chain >= 0")
        self._dir = Path(directory) / OBJECTS_DIR
        self._leaf = leaf_digests
        self._fanout = fanout
        self._max_chain = max_chain
        self._budget = delta_budget
        self._cache: OrderedDict[bytes, _State] = OrderedDict()
        self._read_only = read_only
        if read_only:
            if not self._dir.is_dir():
                raise ManifestError(f"{directory} is not a manifest store (no {OBJECTS_DIR}/)")
            return
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
            for tmp in self._dir.glob(".*.tmp"):
                tmp.unlink()
        except OSError as err:
            raise ManifestError(f"open manifest store {self._dir}: {err}") from err

    @classmethod
    def open_read_only(cls, directory: str | os.PathLike[str]) -> ManifestStore:
        """Open an existing store beside its owner (see the class docstring)."""
        return cls(directory, read_only=True)

    def _check_writable(self, what: str) -> None:
        if self._read_only:
            raise ManifestError(f"{what} in {self._dir}: the store was opened read-only")

    # --- public API ------------------------------------------------------------------

    def commit(
        self,
        digests: np.ndarray,
        block_size: int,
        size: int,
        *,
        parent: str | None = None,
        changed_groups: Iterable[int] | None = None,
    ) -> str:
        """Store the manifest of ``digests`` durably and return its root (hex).

        ``parent`` (a root in this store, normally the previous point's) lets the
        object be a delta. ``changed_groups`` promises that only those leaf groups
        (block index // leaf digests) may differ from ``parent``: the rest is neither
        compared nor rehashed. Without it every digest is compared (vectorised). A
        root already stored is not written again.
        """
        self._check_writable("commit")
        geometry = self._geometry(block_size, size)
        digests = _check_digests(digests, geometry.blocks).copy()
        base = self._state(_root_bytes(parent)) if parent is not None else None
        if base is not None and base.geometry != geometry:
            base = None
        if base is None:
            state = self._full_state(geometry, digests)
            changed = None
        else:
            changed = _changed_blocks(base.digests, digests, changed_groups, self._leaf)
            state = self._derived_state(base, digests, changed)
        if self._path(state.root).exists():
            known = self._read(state.root)  # already stored: keep its chain position
            state.depth, state.chain_bytes = known.depth, known.chain_bytes
        else:
            self._write(state, base, changed)
        self._remember(state)
        return state.root.hex()

    def load(self, root: str) -> HashMap:
        """Return the manifest ``root`` as a HashMap (a fresh copy), proven against the root."""
        state = self._state(_root_bytes(root))
        g = state.geometry
        return HashMap(g.block_size, g.size, state.digests.copy())

    def info(self, root: str) -> ManifestInfo:
        """Describe the stored object ``root`` (header only: nothing is proven)."""
        obj = self._read(_root_bytes(root))
        g = obj.geometry
        return ManifestInfo(
            root=obj.root.hex(),
            kind="full" if obj.kind == KIND_FULL else "delta",
            parent=obj.parent.hex() if obj.parent else None,
            depth=obj.depth,
            chain_bytes=obj.chain_bytes,
            changed=len(obj.indexes),
            block_size=g.block_size,
            size=g.size,
            blocks=g.blocks,
            file_bytes=obj.file_bytes,
        )

    def exists(self, root: str) -> bool:
        """Whether an object named ``root`` is in the store."""
        return self._path(_root_bytes(root)).exists()

    def roots(self) -> list[str]:
        """Every root stored, sorted."""
        return sorted(p.name for p in self._dir.iterdir() if _NAME_RE.fullmatch(p.name))

    def diff(self, root_a: str, root_b: str) -> np.ndarray:
        """Return the sorted indexes of blocks whose digests differ between two manifests."""
        a, b = self._state(_root_bytes(root_a)), self._state(_root_bytes(root_b))
        if (a.geometry.block_size, a.geometry.size) != (b.geometry.block_size, b.geometry.size):
            raise UsageError("manifests of different geometry cannot be compared")
        if a.root == b.root:
            return np.empty(0, dtype=np.int64)
        # Only leaf groups whose hashes differ can hold differing blocks.
        if a.geometry == b.geometry:
            groups = np.flatnonzero(a.leaves != b.leaves)
            leaf = a.geometry.leaf_digests
            return _changed_blocks(a.digests, b.digests, groups.tolist(), leaf)
        return np.flatnonzero(a.digests != b.digests)

    def verify_disk(self, disk: Disk, root: str, *, workers: int = 2) -> list[tuple[int, int]]:
        """Hash ``disk`` and return the ``(first block, count)`` runs that differ from ``root``."""
        expected = self.load(root)
        if disk.virtual_size < expected.covered_size:
            raise DiskSizeMismatchError(
                f"disk has {disk.virtual_size} bytes; manifest covers {expected.covered_size}"
            )
        actual = HashMap.compute(
            disk, expected.block_size, covered_size=expected.covered_size, workers=workers
        )
        return list(block_runs(actual.diff(expected), MAX_BLOCKS))

    def gc(self, keep: Iterable[str]) -> GcResult:
        """Delete every object that no root of ``keep`` needs (mark and sweep).

        A kept delta keeps its whole chain down to its full object. A kept root that
        is missing raises ManifestNotFoundError before anything is deleted.
        """
        self._check_writable("gc")
        marked: set[bytes] = set()
        for root in keep:
            marked |= self._chain(_root_bytes(root))
        deleted = freed = 0
        for name in self.roots():
            if bytes.fromhex(name) in marked:
                continue
            path = self._dir / name
            freed += path.stat().st_size
            path.unlink()
            self._cache.pop(bytes.fromhex(name), None)
            deleted += 1
        if deleted:
            fsync_dir(self._dir)
        return GcResult(kept=len(marked), deleted=deleted, freed_bytes=freed)

    def statistics(self) -> StoreStats:
        """Count the objects and bytes of the store."""
        names = self.roots()
        sizes = [(self._dir / n).stat().st_size for n in names]
        full = sum(1 for n in names if self._kind_of(bytes.fromhex(n)) == KIND_FULL)
        return StoreStats(objects=len(names), full_objects=full, bytes=sum(sizes))

    # --- building states ------------------------------------------------------------

    def _geometry(self, block_size: int, size: int) -> _Geometry:
        if block_size < 1 or block_size & (block_size - 1) or size < 0:
            raise UsageError("block size must be a power of two and size >= 0")
        blocks = block_count(size, block_size)
        if blocks > MAX_BLOCKS:
            raise UsageError(f"{blocks} blocks: at most {MAX_BLOCKS} per manifest")
        return _Geometry(block_size, size, blocks, self._leaf, self._fanout)

    def _full_state(self, g: _Geometry, digests: np.ndarray) -> _State:
        leaves = leaf_hashes(digests, g.leaf_digests)
        root = _root(_top(leaves, g.fanout), g)
        return _State(root, g, digests, leaves, 0, 0)

    def _derived_state(self, base: _State, digests: np.ndarray, changed: np.ndarray) -> _State:
        g = base.geometry
        leaves = base.leaves.copy()
        groups = np.unique(changed // g.leaf_digests).tolist()
        if groups:
            leaves[groups] = leaf_hashes(digests, g.leaf_digests, groups)
        root = _root(_top(leaves, g.fanout), g)
        return _State(root, g, digests, leaves, base.depth, base.chain_bytes)

    def _write(self, state: _State, base: _State | None, changed: np.ndarray | None) -> None:
        g = state.geometry
        data = None
        if base is not None and changed is not None and base.depth < self._max_chain:
            data = _encode_delta(state.root, g, base, changed, state.digests)
            full_size = _full_size(g, state.digests)
            if base.chain_bytes + len(data) > self._budget * full_size:
                data = None
        if data is None:
            data = _encode_full(state.root, g, state.digests)
            state.depth, state.chain_bytes = 0, 0
        else:
            state.depth, state.chain_bytes = base.depth + 1, base.chain_bytes + len(data)
        try:
            write_atomically(self._path(state.root), data)
        except OSError as err:
            raise ManifestError(f"write manifest {state.root.hex()}: {err}") from err

    # --- loading states --------------------------------------------------------------

    def _state(self, root: bytes) -> _State:
        """Return the proven state of ``root``: from the cache, or its chain on disk."""
        cached = self._cache.get(root)
        if cached is not None:
            if not self._path(root).exists():
                raise ManifestNotFoundError(f"manifest {root.hex()} is not in the store")
            self._cache.move_to_end(root)
            return cached
        chain = []
        obj = self._read(root)
        while obj.kind == KIND_DELTA and obj.parent not in self._cache:
            chain.append(obj)
            obj = self._read(obj.parent)  # type: ignore[arg-type]
        if obj.kind == KIND_DELTA:
            chain.append(obj)
            state = self._cache[obj.parent]  # type: ignore[index]
        else:
            state = self._state_of_full(obj)
        for delta in reversed(chain):
            state = self._apply_delta(state, delta)
        self._remember(state)
        return state

    def _state_of_full(self, obj: _Object) -> _State:
        digests = _zero_reference(obj.geometry).copy()
        digests[obj.indexes] = obj.digests
        state = self._full_state(obj.geometry, digests)
        _check_proven(state, obj)
        return state

    def _apply_delta(self, base: _State, obj: _Object) -> _State:
        if obj.geometry != base.geometry:
            raise ManifestCorruptError(f"manifest {obj.root.hex()}: geometry differs from parent")
        digests = base.digests.copy()
        digests[obj.indexes] = obj.digests
        state = self._derived_state(base, digests, obj.indexes)
        state.depth, state.chain_bytes = obj.depth, obj.chain_bytes
        _check_proven(state, obj)
        return state

    def _read(self, root: bytes) -> _Object:
        path = self._path(root)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ManifestNotFoundError(f"manifest {root.hex()} is not in the store") from None
        except OSError as err:
            raise ManifestError(f"read {path}: {err}") from err
        try:
            return _parse_object(data, root)
        except ManifestCorruptError as err:
            raise ManifestCorruptError(f"{path}: {err.message}") from err

    def _chain(self, root: bytes) -> set[bytes]:
        """Return ``root`` and every ancestor its loading needs (headers only)."""
        out = {root}
        obj = self._read(root)
        while obj.parent is not None and obj.parent not in out:
            out.add(obj.parent)
            obj = self._read(obj.parent)
        return out

    def _kind_of(self, root: bytes) -> int:
        with self._path(root).open("rb") as f:
            return f.read(_HEADER.size)[9]

    def _remember(self, state: _State) -> None:
        self._cache[state.root] = state
        self._cache.move_to_end(state.root)
        while len(self._cache) > 2:
            self._cache.popitem(last=False)

    def _path(self, root: bytes) -> Path:
        return self._dir / root.hex()


def _root_bytes(root: str) -> bytes:
    if not isinstance(root, str) or not _NAME_RE.fullmatch(root):
        raise UsageError(f"manifest root must be 64 lower-case hex digits, not {root!r}")
    return bytes.fromhex(root)


def _check_proven(state: _State, obj: _Object) -> None:
    if state.root != obj.root:
        raise ManifestCorruptError(
            f"manifest {obj.root.hex()}: content hashes to {state.root.hex()}"
        )


def _full_size(g: _Geometry, digests: np.ndarray) -> int:
    nonzero = int(np.count_nonzero(digests != _zero_reference(g)))
    return _HEADER.size + -(-g.blocks // 8) + 16 * nonzero + _TRAILER


def _changed_blocks(
    old: np.ndarray, new: np.ndarray, groups: Iterable[int] | None, leaf: int
) -> np.ndarray:
    """Return the sorted indexes where ``new`` differs from ``old`` (within ``groups``)."""
    if groups is None:
        return np.flatnonzero(old != new)
    parts = []
    for g in sorted(set(groups)):
        start = g * leaf
        if not 0 <= start < len(new):
            raise UsageError(f"changed group {g} is outside the manifest")
        stop = min(start + leaf, len(new))
        parts.append(np.flatnonzero(old[start:stop] != new[start:stop]) + start)
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


# --- keeping digests current between points ---------------------------------------

ReadFn = Callable[[int, int], bytes]


class DigestTracker:
    """A volume's block digests kept current as writes are applied, for the next commit.

    Start from a map of the volume (computed once, or the last point's manifest),
    call :meth:`note_write` after each volume write, then commit :attr:`digests` with
    ``changed_groups=tracker.take_changed_groups()``.
    """

    def __init__(self, hmap: HashMap, *, leaf_digests: int = DEFAULT_LEAF_DIGESTS) -> None:
        self.hmap = HashMap(hmap.block_size, hmap.covered_size, hmap.digests.copy())
        self._leaf = leaf_digests
        self._groups: set[int] = set()

    @property
    def digests(self) -> np.ndarray:
        """The current digests (the tracker's own array; copy before changing it)."""
        return self.hmap.digests

    def note_write(self, offset: int, data: bytes | memoryview, read: ReadFn | None = None) -> None:
        """Update the digests of the blocks ``data`` (now at ``offset``) touched.

        Blocks the write covers only in part are re-read through ``read(offset,
        length)``, which must return the volume's bytes *after* the write (a partial
        write without ``read`` is a UsageError).
        """
        bs, view = self.hmap.block_size, memoryview(data).cast("B")
        end = min(offset + len(view), self.hmap.covered_size)
        for block in range(offset // bs, block_count(end, bs)):
            start, length = block * bs, self.hmap.block_length(block)
            if start >= offset and start + length <= offset + len(view):
                content = view[start - offset : start - offset + length]
            elif read is not None:
                content = read(start, length)
            else:
                raise UsageError(f"write at {offset} covers block {block} in part: pass read")
            self.hmap.digests[block] = np.frombuffer(xxhash.xxh3_128_digest(content), _DIGEST)[0]
            self._groups.add(block // self._leaf)

    def take_changed_groups(self) -> list[int]:
        """Return the leaf groups written since the last call, and forget them."""
        groups, self._groups = sorted(self._groups), set()
        return groups

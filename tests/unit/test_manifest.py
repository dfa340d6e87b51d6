"""Recovery-point manifests: Merkle roots, incremental storage, diff, verify, GC, goldens."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
import shutil
import struct
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from replication.blocks import block_count
from replication.disks import create_disk
from replication.errors import (
    ERRORS_BY_CODE,
    ManifestCorruptError,
    ManifestNotFoundError,
    ReplicationError,
    UsageError,
)
from replication.hashmap import HashMap
from replication.manifest import DigestTracker, ManifestStore, leaf_hashes, merkle_root

DIGEST = np.dtype((np.void, 16))
BS = 65536
GOLDEN = Path(__file__).resolve().parents[1] / "testdata" / "manifest"
CASES: dict[str, dict[str, object]] = json.loads((GOLDEN / "cases.json").read_text())


def random_digests(n: int, seed: int = 1) -> np.ndarray:
    return np.frombuffer(np.random.default_rng(seed).bytes(16 * n), dtype=DIGEST).copy()


def rewrite(digests: np.ndarray, indexes: np.ndarray, seed: int) -> np.ndarray:
    out = digests.copy()
    out[indexes] = random_digests(len(indexes), seed)
    return out


# --- the root --------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 70),
    flip=st.integers(0, 10**6),
    shape=st.sampled_from([(1, 2), (4, 2), (3, 5), (4096, 64)]),
)
def test_root_changes_iff_digests_change(n: int, flip: int, shape: tuple[int, int]) -> None:
    leaf, fanout = shape
    size = n * 4096
    digests = random_digests(n, seed=n)
    root = merkle_root(digests, 4096, size, leaf_digests=leaf, fanout=fanout)
    assert merkle_root(digests.copy(), 4096, size, leaf_digests=leaf, fanout=fanout) == root
    if n:
        changed = digests.copy()
        raw = bytearray(changed[flip % n].tobytes())
        raw[flip % 16] ^= 1 << (flip % 8)
        changed[flip % n] = np.frombuffer(bytes(raw), dtype=DIGEST)[0]
        assert merkle_root(changed, 4096, size, leaf_digests=leaf, fanout=fanout) != root


def test_root_commits_to_the_geometry_and_the_tree_shape() -> None:
    digests = random_digests(8)
    roots = {
        merkle_root(digests, 4096, 8 * 4096),
        merkle_root(digests, 8192, 8 * 8192),
        merkle_root(digests, 4096, 7 * 4096 + 1),  # same block count, other size
        merkle_root(digests, 4096, 8 * 4096, leaf_digests=2),
        merkle_root(digests, 4096, 8 * 4096, leaf_digests=2, fanout=3),
    }
    assert len(roots) == 5


def test_root_is_the_documented_tree() -> None:
    """Rebuild the root by hand from docs/journal.md (leaves of 2, fanout 2, 5 digests)."""
    digests = random_digests(5)
    raw = digests.tobytes()
    leaves = [hashlib.sha256(b"\x00" + raw[i : i + 32]).digest() for i in range(0, 80, 32)]
    assert leaf_hashes(digests, 2).tobytes() == b"".join(leaves)
    level1 = [hashlib.sha256(b"\x01" + leaves[0] + leaves[1]).digest()]
    level1.append(hashlib.sha256(b"\x01" + leaves[2]).digest())
    top = hashlib.sha256(b"\x01" + level1[0] + level1[1]).digest()
    preimage = struct.pack(">B4sBIQQIH32s", 2, b"RPLM", 1, 4096, 5 * 4096, 5, 2, 2, top)
    expected = hashlib.sha256(preimage).hexdigest()
    assert merkle_root(digests, 4096, 5 * 4096, leaf_digests=2, fanout=2) == expected


def test_commit_returns_the_merkle_root_and_load_gives_the_digests(tmp_path: Path) -> None:
    store = ManifestStore(tmp_path)
    digests = random_digests(10_000)
    root = store.commit(digests, 4096, 10_000 * 4096 - 7)
    assert root == merkle_root(digests, 4096, 10_000 * 4096 - 7)
    loaded = ManifestStore(tmp_path).load(root)
    assert (loaded.block_size, loaded.covered_size) == (4096, 10_000 * 4096 - 7)
    assert (loaded.digests == digests).all()
    assert store.commit(digests, 4096, 10_000 * 4096 - 7) == root
    assert store.statistics().objects == 1  # a root already stored is not written again


def test_changed_groups_give_the_same_root(tmp_path: Path) -> None:
    store = ManifestStore(tmp_path, leaf_digests=64)
    base = random_digests(4096)
    parent = store.commit(base, BS, 4096 * BS)
    new = rewrite(base, np.array([5, 70, 71, 4000]), seed=2)
    groups = [0, 1, 62]
    root = store.commit(new, BS, 4096 * BS, parent=parent, changed_groups=groups)
    assert root == merkle_root(new, BS, 4096 * BS, leaf_digests=64)
    assert store.info(root).changed == 4
    with pytest.raises(UsageError):
        store.commit(new, BS, 4096 * BS, parent=parent, changed_groups=[64])


# --- incremental storage ---------------------------------------------------------------------


def test_a_point_stores_little_more_than_its_changed_blocks(tmp_path: Path) -> None:
    """1 GiB, 64 KiB blocks, 10 points of 1 % scattered changes: < 2 % of a full manifest."""
    n = (1 << 30) // BS
    store = ManifestStore(tmp_path)
    rng = np.random.default_rng(7)
    digests = random_digests(n)
    root = store.commit(digests, BS, 1 << 30)
    full = store.statistics().bytes
    assert full >= 16 * n
    growth = []
    for i in range(10):
        digests = rewrite(digests, rng.choice(n, n // 100, replace=False), seed=100 + i)
        before = store.statistics().bytes
        root = store.commit(digests, BS, 1 << 30, parent=root)
        growth.append(store.statistics().bytes - before)
    assert max(growth) < 0.02 * full, (growth, full)
    # A content-addressed node store with leaves of 4096 digests would rewrite every leaf
    # (all 4 are touched), and with leaves of 16 still about 15 % of them, per point.
    touched = len({int(i) // 16 for i in rng.choice(n, n // 100, replace=False)})
    assert max(growth) * 5 < touched * 16 * 16
    assert (store.load(root).digests == digests).all()


def test_a_sparse_volume_costs_little_in_full(tmp_path: Path) -> None:
    store = ManifestStore(tmp_path)
    hmap = HashMap.empty(1 << 30, BS)
    hmap.digests[:10] = random_digests(10)
    root = store.commit(hmap.digests, BS, 1 << 30)
    assert store.info(root).file_bytes < 16 * 10 + (1 << 30) // BS // 8 + 200
    assert (store.load(root).digests == hmap.digests).all()


def test_chains_are_cut_by_length_and_by_budget(tmp_path: Path) -> None:
    store = ManifestStore(tmp_path / "a", max_chain=3)
    digests = random_digests(1000)
    root = store.commit(digests, 4096, 1000 * 4096)
    kinds = []
    for i in range(8):
        digests = rewrite(digests, np.array([i]), seed=i)
        root = store.commit(digests, 4096, 1000 * 4096, parent=root)
        kinds.append((store.info(root).kind, store.info(root).depth))
    assert kinds == [("delta", 1), ("delta", 2), ("delta", 3), ("full", 0)] * 2
    store = ManifestStore(tmp_path / "b", delta_budget=0.05)  # 5 % of a full: ~40 blocks
    root = store.commit(digests, 4096, 1000 * 4096)
    digests = rewrite(digests, np.arange(100), seed=9)
    assert store.info(store.commit(digests, 4096, 1000 * 4096, parent=root)).kind == "full"


def test_another_geometry_is_stored_in_full(tmp_path: Path) -> None:
    store = ManifestStore(tmp_path)
    root = store.commit(random_digests(100), 4096, 100 * 4096)
    grown = store.commit(random_digests(120), 4096, 120 * 4096, parent=root)
    assert store.info(grown).kind == "full"


# --- diff and verify ---------------------------------------------------------------------------


def test_diff_walks_only_differing_leaves(tmp_path: Path) -> None:
    store = ManifestStore(tmp_path, leaf_digests=16)
    a_digests = random_digests(1000)
    a = store.commit(a_digests, 4096, 1000 * 4096)
    changed = np.array([0, 15, 16, 500, 999])
    b = store.commit(rewrite(a_digests, changed, seed=3), 4096, 1000 * 4096, parent=a)
    c = store.commit(rewrite(a_digests, np.array([7]), seed=4), 4096, 1000 * 4096)
    assert store.diff(a, b).tolist() == changed.tolist()
    assert store.diff(b, a).tolist() == changed.tolist()
    assert store.diff(b, c).tolist() == sorted({7, *changed.tolist()})
    assert store.diff(a, a).tolist() == []
    other = store.commit(random_digests(10), 4096, 10 * 4096)
    with pytest.raises(UsageError):
        store.diff(a, other)


def test_verify_disk_finds_a_flipped_block(tmp_path: Path) -> None:
    disk = create_disk(str(tmp_path / "v.raw"), 40 * 4096 + 100)
    rng = random.Random(2)
    for b in range(0, 41, 3):
        disk.write(b * 4096, rng.randbytes(100))
    store = ManifestStore(tmp_path / "m")
    root = store.commit(HashMap.compute(disk, 4096).digests, 4096, disk.virtual_size)
    assert store.verify_disk(disk, root) == []
    disk.write(7 * 4096 + 5, b"\x01")
    disk.write(40 * 4096 + 99, b"\x01")  # the short last block
    assert store.verify_disk(disk, root) == [(7, 1), (40, 1)]
    disk.close()


def test_digest_tracker_follows_writes(tmp_path: Path) -> None:
    disk = create_disk(str(tmp_path / "v.raw"), 64 * 4096 + 300)
    tracker = DigestTracker(HashMap.compute(disk, 4096), leaf_digests=8)
    rng = random.Random(3)
    for _ in range(30):
        offset = rng.randrange(disk.virtual_size)
        data = rng.randbytes(min(rng.randrange(1, 20000), disk.virtual_size - offset))
        disk.write(offset, data)
        tracker.note_write(offset, data, disk.read)
    assert (tracker.digests == HashMap.compute(disk, 4096).digests).all()
    groups = tracker.take_changed_groups()
    assert groups and tracker.take_changed_groups() == []
    with pytest.raises(UsageError):
        tracker.note_write(10, b"partial")  # no read function for a partial block
    disk.close()


# --- garbage collection and damage -----------------------------------------------------------


def test_gc_keeps_the_chains_of_kept_roots(tmp_path: Path) -> None:
    store = ManifestStore(tmp_path, max_chain=2)
    digests = random_digests(500)
    roots = [store.commit(digests, 4096, 500 * 4096)]
    for i in range(5):  # full, d, d, full, d, d
        digests = rewrite(digests, np.array([i]), seed=i)
        roots.append(store.commit(digests, 4096, 500 * 4096, parent=roots[-1]))
    with pytest.raises(ManifestNotFoundError):
        store.gc([roots[5], "00" * 32])
    assert len(store.roots()) == 6  # nothing deleted on a missing kept root
    result = store.gc([roots[4]])  # chain: roots[3] (full), roots[4]
    assert (result.kept, result.deleted) == (2, 4) and result.freed_bytes > 0
    assert store.roots() == sorted(roots[3:5])
    assert (ManifestStore(tmp_path).load(roots[4]).digests == rewrite_chain(500, 4)).all()
    with pytest.raises(ManifestNotFoundError):
        store.load(roots[5])
    with pytest.raises(ManifestNotFoundError):
        store.commit(digests, 4096, 500 * 4096, parent=roots[5])


def rewrite_chain(n: int, steps: int) -> np.ndarray:
    digests = random_digests(n)
    for i in range(steps):
        digests = rewrite(digests, np.array([i]), seed=i)
    return digests


def test_damaged_objects_are_typed_errors(tmp_path: Path) -> None:
    store = ManifestStore(tmp_path)
    digests = random_digests(300)
    a = store.commit(digests, 4096, 300 * 4096)
    b = store.commit(rewrite(digests, np.array([1]), seed=1), 4096, 300 * 4096, parent=a)
    path = tmp_path / "objects" / a
    data = bytearray(path.read_bytes())
    for pos in (0, 9, 20, 40, 100, len(data) - 1):
        damaged = bytearray(data)
        damaged[pos] ^= 0x08
        path.write_bytes(damaged)
        for root in (a, b):
            with pytest.raises(ManifestCorruptError):
                ManifestStore(tmp_path).load(root)
    path.unlink()  # the parent of b is gone
    with pytest.raises(ManifestNotFoundError):
        ManifestStore(tmp_path).load(b)
    with pytest.raises(UsageError):
        store.load("not-a-root")


def test_leftover_temporary_files_are_removed(tmp_path: Path) -> None:
    (tmp_path / "objects").mkdir()
    (tmp_path / "objects" / ".abc.1234.tmp").write_bytes(b"half")
    ManifestStore(tmp_path)
    assert list((tmp_path / "objects").iterdir()) == []


# --- golden fixtures -------------------------------------------------------------------------


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("manifest_fixtures", GOLDEN / "make_fixtures.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_golden_fixtures_are_reproduced_byte_for_byte() -> None:
    files, cases = load_generator().build()
    assert cases == CASES
    committed = {
        str(p.relative_to(GOLDEN)) for p in GOLDEN.rglob("*") if p.is_file() and p.parent != GOLDEN
    }
    assert committed == set(files)
    for name, content in files.items():
        assert (GOLDEN / name).read_bytes() == content, name


def test_golden_layout_decodes_by_the_documented_offsets() -> None:
    """Read the good objects with struct at the offsets of docs/journal.md."""
    gen = load_generator()
    roots = CASES["good"]["roots"]
    full = (GOLDEN / "good" / "objects" / roots["A"]).read_bytes()
    delta = (GOLDEN / "good" / "objects" / roots["B"]).read_bytes()
    for data in (full, delta):
        assert xxhash.xxh3_128_digest(data[:-16]) == data[-16:]
    magic, version, kind, fanout, bs, size, n, leaf, _, root = struct.unpack_from(
        ">8sBBHIQQII32s", full
    )
    assert (magic, version, kind, fanout, bs, size, n, leaf) == (
        b"RPLMANI\0",
        1,
        1,
        gen.FANOUT,
        gen.BLOCK,
        gen.SIZE,
        11,
        gen.LEAF,
    )
    assert root.hex() == roots["A"]
    bitmap = np.unpackbits(np.frombuffer(full[72:74], np.uint8))[:11]
    assert np.flatnonzero(bitmap == 0).tolist() == list(gen.ZERO_BLOCKS)
    expected = gen.digests(gen.volume_a())
    assert full[74:-16] == expected[bitmap.astype(bool)].tobytes()
    parent, depth, count, chain = struct.unpack_from(">32sIIQ", delta, 72)
    assert (parent.hex(), depth, count, chain) == (roots["A"], 1, 2, len(delta))
    indexes = struct.unpack_from(">2I", delta, 120)
    assert indexes == (3, 5)
    assert delta[128:-16] == gen.digests(gen.volume_b())[[3, 5]].tobytes()


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_case_loads_as_recorded(case: str, tmp_path: Path) -> None:
    gen = load_generator()
    expected = CASES[case]
    shutil.copytree(GOLDEN / case, tmp_path / case)
    store = ManifestStore(tmp_path / case, leaf_digests=gen.LEAF, fanout=gen.FANOUT)
    if expected["error_code"] is not None:
        with pytest.raises(ReplicationError) as info:
            store.load(str(expected["load"]))
        assert type(info.value) is ERRORS_BY_CODE[str(expected["error_code"])]
        return
    roots = expected["roots"]
    assert (store.load(roots["A"]).digests == gen.digests(gen.volume_a())).all()
    assert (store.load(roots["B"]).digests == gen.digests(gen.volume_b())).all()
    assert store.diff(roots["A"], roots["B"]).tolist() == [3, 5]
    assert block_count(gen.SIZE, gen.BLOCK) == 11

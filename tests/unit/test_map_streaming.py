"""Hash maps streamed a window at a time: the same answers as whole maps, bounded memory.

Each streamed path is checked against the whole-map computation it replaces
(:meth:`HashMap.compute`, :func:`block_runs` of an index array), with windows small
enough that every disk here spans many of them, and runs, extents and the disk's
short last block cross window edges.
"""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.source_agent.client import TargetMapStream
from replication import blocks
from replication.blocks import bitmap_count, bitmap_runs, block_runs
from replication.disks import open_disk
from replication.errors import DiskTooLargeError, HashMapFormatError, PairFailedError
from replication.hashmap import HashMap, MapFileReader, MapFileWriter, map_windows
from replication.mapcache import MapCache
from replication.source import SourceSession
from replication.sync import SyncOptions, _check_map_bound, sync_paths
from replication.wire import HashMapPiece
from tests.helpers import write_raw

BS = 4096
#: 37 blocks and a short one: windows of 8 blocks leave a short last window
SIZE = 37 * BS + 1000


def _image(seed: int, size: int = SIZE) -> bytearray:
    """Data blocks, holes (left sparse by write_raw) and data crossing window edges."""
    rng = random.Random(seed)
    data = bytearray(size)
    for first, count in ((0, 2), (7, 3), (15, 1), (20, 9), (36, 2)):
        start = first * BS
        data[start : start + count * BS] = rng.randbytes(count * BS)[: size - start]
    return data[:size]


def test_windows_hash_like_the_whole_map_and_skip_holes(tmp_path):
    path = write_raw(tmp_path / "a.raw", bytes(_image(1, 16 * 65536 + 1000)))
    with open_disk(str(path)) as disk:
        whole = HashMap.compute(disk, BS)
        for window in (8, 24, 10**6):
            parts = list(map_windows([disk], disk.virtual_size, BS, window_blocks=window))
            assert [first for first, _ in parts] == list(range(0, len(whole), window))[: len(parts)]
            digests = np.concatenate([maps[0].digests for _, maps in parts])
            assert digests.tobytes() == whole.digests.tobytes()
            assert sum(maps[0].bytes_read for _, maps in parts) < disk.virtual_size // 2


def test_two_disks_by_windows_diff_like_whole_maps(tmp_path):
    a, b = _image(1), _image(1)
    for i in (0, 8, 16, 24, 36, 37):  # both sides of window edges, and the short tail
        b[i * BS + 5] ^= 0xFF
    pa, pb = write_raw(tmp_path / "a", bytes(a)), write_raw(tmp_path / "b", bytes(b))
    with open_disk(str(pa)) as da, open_disk(str(pb)) as db:
        found = []
        for first, (ma, mb) in map_windows([da, db], SIZE, BS, window_blocks=8):
            found += (ma.diff(mb) + first).tolist()
    assert found == [0, 8, 16, 24, 36, 37]


def test_map_file_written_and_read_by_windows(tmp_path):
    whole = HashMap.empty(SIZE, BS)
    whole.digests[:] = np.frombuffer(os.urandom(16 * len(whole)), dtype=whole.digests.dtype)
    path = tmp_path / "m.rmap"
    with MapFileWriter(path, BS, SIZE, "gen-7") as out:
        for first in range(0, len(whole), 5):
            out.append(whole.digests[first : first + 5])
        out.commit()
    assert HashMap.load(str(path)).digests.tobytes() == whole.digests.tobytes()
    with MapFileReader(path) as reader:
        assert (reader.generation, reader.block_size, reader.covered_size) == ("gen-7", BS, SIZE)
        assert len(reader) == len(whole)
        assert reader.digests(30, 8).tobytes() == whole.digests[30:38].tobytes()
        with pytest.raises(ValueError):
            reader.digests(31, 8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.rmap"]


def test_map_file_damage_is_found_at_open(tmp_path):
    path = tmp_path / "m.rmap"
    HashMap.empty(SIZE, BS).save(str(path))
    raw = path.read_bytes()
    for bad in (raw[:-1], raw[:60] + bytes([raw[60] ^ 1]) + raw[61:], b"x" + raw[1:]):
        path.write_bytes(bad)
        with pytest.raises(HashMapFormatError):
            MapFileReader(path)


def test_an_uncommitted_or_short_map_file_leaves_nothing(tmp_path):
    with MapFileWriter(tmp_path / "m.rmap", BS, SIZE, None) as out:
        out.append(HashMap.empty(SIZE, BS).digests[:3])
        with pytest.raises(ValueError, match="3 of 38"):
            out.commit()
    assert list(tmp_path.iterdir()) == []


@settings(max_examples=150, deadline=None)
@given(st.sets(st.integers(0, 300), max_size=120), st.integers(1, 9))
def test_bitmap_runs_are_the_runs_of_the_indexes(indexes, max_blocks):
    mask = np.zeros(301, dtype=bool)
    mask[sorted(indexes)] = True
    bitmap = np.packbits(mask, bitorder="little")
    expected = list(block_runs(np.array(sorted(indexes), dtype=np.int64), max_blocks))
    saved = blocks._BITMAP_PIECE
    blocks._BITMAP_PIECE = 3  # runs cross many pieces (24 blocks each)
    try:
        assert list(bitmap_runs(bitmap, max_blocks)) == expected
    finally:
        blocks._BITMAP_PIECE = saved
    assert bitmap_count(bitmap) == len(indexes)


def test_sync_by_small_windows_equals_the_source_then_reuses_its_map(tmp_path):
    src, tgt = _image(1), _image(2)
    write_raw(tmp_path / "s.raw", bytes(src))
    write_raw(tmp_path / "t.raw", bytes(tgt))
    options = SyncOptions(block_size=BS, window_blocks=8, cache_dir=str(tmp_path / "cache"))
    first = sync_paths(str(tmp_path / "s.raw"), str(tmp_path / "t.raw"), options)
    assert (tmp_path / "t.raw").read_bytes() == bytes(src)
    expected = sum(src[i : i + BS] != tgt[i : i + BS] for i in range(0, SIZE, BS))
    assert first.blocks_differing == expected and first.target_map == "computed"
    with open(tmp_path / "s.raw", "r+b") as f:  # change blocks on both sides of an edge
        for block in (7, 8, 37):
            f.seek(block * BS)
            f.write(b"\x01" * 10)
    second = sync_paths(str(tmp_path / "s.raw"), str(tmp_path / "t.raw"), options)
    assert second.target_map == "cached" and second.blocks_differing == 3
    assert (tmp_path / "t.raw").read_bytes() == (tmp_path / "s.raw").read_bytes()
    with open_disk(str(tmp_path / "t.raw")) as disk:
        kept = MapCache(tmp_path / "cache").open_trusted(disk, BS, SIZE)
        assert kept is not None
        with kept:
            assert (
                kept.digests(0, len(kept)).tobytes() == HashMap.compute(disk, BS).digests.tobytes()
            )


def _pieces(digests: bytes, sizes: list[int], first: int = 0):
    for n in sizes:
        yield HashMapPiece(first, digests[16 * first : 16 * (first + n)], 0, 0)
        first += n


def test_target_map_stream_cuts_pieces_into_windows():
    digests = os.urandom(16 * 20)
    stream = TargetMapStream(_pieces(digests, [7, 7, 6]), 20)
    got = [stream.take(first, min(8, 20 - first)).tobytes() for first in range(0, 20, 8)]
    stream.finish()
    assert b"".join(got) == digests


@pytest.mark.parametrize(
    ("sizes", "start", "error"),
    [([7, 7], 0, "shorter"), ([7, 7, 7], 0, "longer"), ([7], 3, "expected 0")],
)
def test_target_map_stream_refuses_a_map_that_is_not_the_disks(sizes, start, error):
    digests = os.urandom(16 * 30)
    stream = TargetMapStream(_pieces(digests, sizes, start), 20)
    with pytest.raises(PairFailedError, match=error):
        stream.take(0, 20)
        stream.finish()


def test_a_session_planned_by_bitmap_sends_the_same_blocks(tmp_path):
    path = write_raw(tmp_path / "d.raw", bytes(_image(3)))
    chosen = np.array([0, 1, 2, 9, 20, 21, 37], dtype=np.int64)
    mask = np.zeros(38, dtype=bool)
    mask[chosen] = True
    sent = []
    for plan in ("blocks", "bitmap"):
        with open_disk(str(path)) as disk:
            s = SourceSession(disk, "vol1", b"k" * 32, block_size=BS)
            if plan == "blocks":
                s.plan_blocks(chosen, 38)
            else:
                s.plan_bitmap(np.packbits(mask, bitorder="little"), 38)
            assert (s.stats.blocks_to_send, s.stats.blocks_total) == (7, 38)
            frames = s.next_frames(limit=100)
            sent.append((len(frames), s.stats.bytes_plain, s.done_sealing()))
    assert sent[0] == sent[1] and sent[0][2]


def test_a_2tib_sparse_disk_is_hashed_from_its_extents_not_read(tmp_path):
    path = tmp_path / "big.raw"
    with open(path, "wb") as f:
        f.truncate(2 << 40)
        for offset in (0, 1 << 40, (2 << 40) - 3 * BS):
            f.seek(offset)
            f.write(b"\x07" * 3 * BS)
    read = 0
    with open_disk(str(path)) as disk:
        for _first, (m,) in map_windows([disk], disk.virtual_size, 65536):
            read += m.bytes_read
            assert m.zero_mask().sum() >= len(m) - 1
    assert 3 * BS <= read <= 3 * 65536


@pytest.mark.parametrize(("size", "refused"), [(16 << 40, False), (512 << 40, True)])
def test_sync_refuses_only_claims_beyond_any_real_disk(size, refused):
    class Claim:
        path, virtual_size = "claim.vmdk", size

    if refused:
        with pytest.raises(DiskTooLargeError):
            _check_map_bound(Claim(), SyncOptions())
    else:
        _check_map_bound(Claim(), SyncOptions())  # 16 TiB: 64 MiB of plan, under 256 MiB

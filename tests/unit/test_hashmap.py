import contextlib
import os

import numpy as np
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from replication.disks import open_disk
from replication.errors import HashMapFormatError
from replication.hashmap import HashMap, compute_maps, zero_digest
from tests.helpers import realistic_bytes, write_raw

BS = 65536


def reference_digests(data: bytes, bs: int) -> bytes:
    return b"".join(xxhash.xxh3_128_digest(data[i : i + bs]) for i in range(0, len(data), bs))


@pytest.mark.parametrize("size", [0, 1000, BS, 5 * BS + 12345, 64 * BS])
@pytest.mark.parametrize("workers", [1, 2])
def test_map_equals_one_shot_reference(tmp_path, size, workers):
    data = realistic_bytes(size, seed=size)
    path = write_raw(tmp_path / "d.raw", data)
    with open_disk(str(path)) as disk:
        m = HashMap.compute(disk, BS, workers=workers)
    assert m.digests.tobytes() == reference_digests(bytes(data), BS)


def test_holes_are_not_read_but_hash_as_zero(tmp_path):
    path = tmp_path / "sparse.raw"
    with open(path, "wb") as f:
        f.truncate(256 * BS)
        f.seek(100 * BS + 5)
        f.write(b"x" * 10)
    with open_disk(str(path)) as disk:
        m = HashMap.compute(disk, BS)
    assert m.bytes_read < 8 * BS  # only the block(s) around the data, not the holes
    zero = m.zero_mask()
    assert not zero[100] and zero.sum() == 255
    assert m.digests[0].tobytes() == zero_digest(BS)


def test_short_tail_block_and_covered_size(tmp_path):
    data = bytes(realistic_bytes(3 * BS + 100, seed=3))
    path = write_raw(tmp_path / "d.raw", data)
    with open_disk(str(path)) as disk:
        m = HashMap.compute(disk, BS, covered_size=2 * BS + 7)
    assert len(m) == 3 and m.block_length(2) == 7
    assert m.digests.tobytes() == reference_digests(data[: 2 * BS + 7], BS)


def test_diff_finds_exactly_changed_blocks(tmp_path):
    a = realistic_bytes(40 * BS, seed=1)
    b = bytearray(a)
    for i in (0, 7, 39):
        b[i * BS + 100] ^= 0xFF
    pa, pb = write_raw(tmp_path / "a", a), write_raw(tmp_path / "b", b)
    with open_disk(str(pa)) as da, open_disk(str(pb)) as db:
        ma, mb = compute_maps([(da, None), (db, None)], BS)
    assert ma.diff(mb).tolist() == [0, 7, 39]


def test_file_round_trip_and_corruption(tmp_path):
    m = HashMap.empty(10 * BS + 1, BS)
    m.digests[3] = np.frombuffer(os.urandom(16), dtype=m.digests.dtype)[0]
    m.generation = "gen-1"
    path = tmp_path / "m.rmap"
    m.save(str(path))
    back = HashMap.load(str(path))
    assert back.generation == "gen-1" and (back.digests == m.digests).all()
    raw = bytearray(path.read_bytes())
    for mutate in (
        lambda b: b.__setitem__(0, 0),  # magic
        lambda b: b.__setitem__(8, 9),  # version
        lambda b: b.__setitem__(60, b[60] ^ 1),  # a digest byte: checksum
    ):
        bad = bytearray(raw)
        mutate(bad)
        with pytest.raises(HashMapFormatError):
            HashMap.from_bytes(bytes(bad))
    with pytest.raises(HashMapFormatError):
        HashMap.from_bytes(bytes(raw[:-1]))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_map_parser_never_crashes(blob):
    with contextlib.suppress(HashMapFormatError):
        HashMap.from_bytes(blob)

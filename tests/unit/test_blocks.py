import numpy as np
import pytest

from replication.blocks import block_count, block_runs, check_block_size, parse_size
from replication.errors import UsageError


@pytest.mark.parametrize("bs", [4096, 65536, 4 << 20])
def test_valid_block_sizes(bs):
    assert check_block_size(bs) == bs


@pytest.mark.parametrize("bs", [0, 2048, 3 * 4096, 8 << 20, -4096])
def test_invalid_block_sizes(bs):
    with pytest.raises(UsageError):
        check_block_size(bs)


@pytest.mark.parametrize(
    ("text", "value"),
    [("65536", 65536), ("64K", 65536), ("64KiB", 65536), ("4M", 4 << 20), ("2g", 2 << 30)],
)
def test_parse_size(text, value):
    assert parse_size(text) == value


def test_parse_size_rejects_garbage():
    with pytest.raises(UsageError):
        parse_size("lots")


def test_block_count_rounds_up():
    assert block_count(0, 4096) == 0
    assert block_count(4096, 4096) == 1
    assert block_count(4097, 4096) == 2


def test_block_runs_splits_on_gaps_and_length():
    idx = np.array([1, 2, 3, 7, 8, 20])
    assert list(block_runs(idx, 2)) == [(1, 2), (3, 1), (7, 2), (20, 1)]
    assert list(block_runs(np.array([], dtype=np.int64), 4)) == []

"""Block geometry: block sizes, block indexes and runs of blocks.

A disk is cut into fixed-size blocks from offset 0; the last block may be short
when the disk size is not a multiple of the block size. Blocks are the unit of
hashing, comparison and transfer.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from .errors import UsageError

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "MAX_BLOCK_SIZE",
    "MIN_BLOCK_SIZE",
    "block_count",
    "block_runs",
    "check_block_size",
    "parse_size",
]

MIN_BLOCK_SIZE = 4 << 10
MAX_BLOCK_SIZE = 4 << 20
#: 64 KiB: the VMDK grain, and the sweet spot between map size and delta precision.
DEFAULT_BLOCK_SIZE = 64 << 10

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def check_block_size(block_size: int) -> int:
    """Return ``block_size`` if it is a power of two in [4 KiB, 4 MiB], else raise."""
    if block_size < MIN_BLOCK_SIZE or block_size > MAX_BLOCK_SIZE or block_size & (block_size - 1):
        raise UsageError(
            f"block size {block_size} must be a power of two between "
            f"{MIN_BLOCK_SIZE} and {MAX_BLOCK_SIZE} bytes"
        )
    return block_size


def parse_size(text: str) -> int:
    """Parse ``64K``, ``4M``, ``2G``, ``65536`` or ``64KiB`` into bytes."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in _UNITS else ""
    number = t[: len(t) - len(unit)]
    try:
        value = int(number) * _UNITS[unit]
    except ValueError:
        raise UsageError(f"cannot read size {text!r}: use e.g. 65536, 64K, 4M or 2G") from None
    if value < 0:
        raise UsageError(f"size {text!r} is negative")
    return value


def block_count(size: int, block_size: int) -> int:
    """Return how many blocks cover ``size`` bytes (the last one may be short)."""
    return -(-size // block_size)


def block_runs(indexes: np.ndarray, max_blocks: int) -> Iterator[tuple[int, int]]:
    """Yield ``(first, count)`` runs of consecutive sorted block indexes, each <= max_blocks."""
    if len(indexes) == 0:
        return
    idx = np.asarray(indexes, dtype=np.int64)
    breaks = np.flatnonzero(np.diff(idx) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(idx)]))
    for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
        first, count = int(idx[s]), e - s
        while count > 0:
            n = min(count, max_blocks)
            yield first, n
            first += n
            count -= n

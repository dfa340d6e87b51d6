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
    "bitmap_count",
    "bitmap_runs",
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


#: bytes of a packed bitmap expanded at once by :func:`bitmap_runs` (1 Mi blocks)
_BITMAP_PIECE = 1 << 17


def bitmap_count(bitmap: np.ndarray) -> int:
    """Return how many bits of a packed bitmap are set."""
    return int(np.bitwise_count(bitmap).sum(dtype=np.int64))


def bitmap_runs(bitmap: np.ndarray, max_blocks: int) -> Iterator[tuple[int, int]]:
    """Yield ``(first, count)`` runs of the set bits of a packed bitmap, each <= max_blocks.

    Block i is bit ``i & 7`` of byte ``i >> 3`` (``bitorder="little"``). The same runs
    as :func:`block_runs` of the set bits' indexes, but the bitmap is expanded a piece
    at a time: memory stays a few MiB however many bits are set.
    """
    first, count = 0, 0  # the run being built (it may continue into the next piece)
    for lo in range(0, len(bitmap), _BITMAP_PIECE):
        piece = bitmap[lo : lo + _BITMAP_PIECE]
        if not piece.any():
            continue
        idx = np.flatnonzero(np.unpackbits(piece, bitorder="little")) + lo * 8
        for start, n in block_runs(idx, len(idx)):
            if count and start == first + count:
                count += n
                continue
            yield from _split(first, count, max_blocks)
            first, count = start, n
    yield from _split(first, count, max_blocks)


def _split(first: int, count: int, max_blocks: int) -> Iterator[tuple[int, int]]:
    for start in range(first, first + count, max_blocks):
        yield start, min(max_blocks, first + count - start)

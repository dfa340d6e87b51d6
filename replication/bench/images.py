"""Deterministic realistic disk images for benchmarks, written in streaming chunks.

Per 64 KiB block, roughly: 30 % zeros (left as holes), 25 % text, 30 % binary-like
(structured, partly compressible), 15 % random; runs of one kind average 512 KiB.
Memory stays bounded by one chunk whatever the image size. The same seed gives the
same bytes on every machine (numpy's PCG64), so figures from different runs
describe the same data.
"""

from __future__ import annotations

import subprocess

import numpy as np

__all__ = [
    "BLOCK",
    "change_blocks",
    "make_vhd",
    "mutate_image",
    "pick_changed_blocks",
    "realistic_pool",
    "write_image",
]

BLOCK = 65536
CHUNK = 64 << 20

_TEXT = (
    b"Jan 12 03:14:07 host sshd[2412]: Accepted publickey for admin from 10.0.0.7 port 50122\n"
    b"<record id='%d'><name>replication</name><status>ok</status></record>\n"
    b"def compute(block, offset):\n    return hash(block) ^ offset  # text-like content\n"
)


def _binary_like(rng: np.random.Generator, n: int) -> bytes:
    # small alphabet with repeats: compresses ~2x, like executables and databases
    words = rng.integers(0, 4096, size=n // 8 + 1, dtype=np.uint16).astype(np.uint64)
    return (words * 0x0001000100010001).astype("<u8").tobytes()[:n]


def write_image(path: str, size: int, seed: int = 7) -> None:
    """Write a realistic sparse image of ``size`` bytes to ``path``."""
    rng = np.random.default_rng(seed)
    text = (_TEXT * (CHUNK // len(_TEXT) + 1))[:CHUNK]
    with open(path, "wb") as f:
        f.truncate(size)
        pos = 0
        while pos < size:
            run = min(size - pos, int(rng.integers(1, 16)) * BLOCK)
            kind = rng.choice(4, p=[0.30, 0.25, 0.30, 0.15])
            if kind == 0:
                pos += run
                continue
            f.seek(pos)
            if kind == 1:
                start = int(rng.integers(0, 4096))
                f.write(text[start : start + run] if start + run <= len(text) else text[:run])
            elif kind == 2:
                f.write(_binary_like(rng, run))
            else:
                f.write(rng.bytes(run))
            pos += run


def realistic_pool(size: int, seed: int = 13) -> bytes:
    """Return ``size`` bytes of the images' mix (zeros, text, binary-like, random).

    Load generators take their writes from slices of it: realistic content (the same
    compression ratio as the images) without generating bytes on the hot path.
    """
    rng = np.random.default_rng(seed)
    text = (_TEXT * (size // len(_TEXT) + 1))[:size]
    out = bytearray(size)
    pos = 0
    while pos < size:
        run = min(size - pos, int(rng.integers(1, 16)) * BLOCK)
        kind = rng.choice(4, p=[0.30, 0.25, 0.30, 0.15])
        if kind == 1:
            start = int(rng.integers(0, 4096))
            out[pos : pos + run] = text[start : start + run].ljust(run, b"\n")
        elif kind == 2:
            out[pos : pos + run] = _binary_like(rng, run)
        elif kind == 3:
            out[pos : pos + run] = rng.bytes(run)
        pos += run  # kind 0: zeros
    return bytes(out)


def mutate_image(src: str, dst: str, fraction: float, seed: int = 11) -> list[int]:
    """Copy ``src`` to ``dst`` with ``fraction`` of its blocks rewritten with random data."""
    subprocess.run(["cp", "--sparse=always", src, dst], check=True)
    rng = np.random.default_rng(seed)
    with open(dst, "r+b") as f:
        size = f.seek(0, 2)
        nblocks = size // BLOCK
        picked = sorted(rng.choice(nblocks, size=max(1, int(nblocks * fraction)), replace=False))
        for i in picked:
            f.seek(int(i) * BLOCK)
            f.write(rng.bytes(BLOCK))
    return [int(i) for i in picked]


def pick_changed_blocks(nblocks: int, fraction: float, rng: np.random.Generator) -> list[int]:
    """Pick ``fraction`` of ``nblocks`` block numbers, the way a VM's writes fall.

    Half of them in clustered runs of 4-64 blocks (files rewritten, a database's
    extents), the other half scattered one by one (metadata, logs, page updates).
    Sorted, distinct, at least one block.
    """
    want = min(nblocks, max(1, int(nblocks * fraction)))
    picked = np.zeros(nblocks, dtype=bool)
    clustered = want // 2
    for _ in range(4 * want):  # bounded: each pass adds at least one block or misses
        have = int(picked.sum())
        if have >= clustered:
            break
        run = min(clustered - have, int(rng.integers(4, 65)))
        start = int(rng.integers(0, nblocks - run + 1))
        picked[start : start + run] = True
    free = np.flatnonzero(~picked)
    singles = rng.choice(free, size=want - int(picked.sum()), replace=False)
    picked[singles] = True
    return [int(i) for i in np.flatnonzero(picked)]


def change_blocks(path: str, size: int, fraction: float, seed: int = 17) -> list[int]:
    """Rewrite ``fraction`` of the first ``size`` bytes' blocks of ``path`` in place.

    For a raw image or a fixed VHD (its data starts at offset 0). The new content is
    the images' realistic mix (:func:`realistic_pool`), so it compresses as a VM's
    writes would; a block that would come out unchanged gets its first byte flipped,
    so every picked block really differs. Returns the changed block numbers.
    """
    rng = np.random.default_rng(seed)
    picked = pick_changed_blocks(size // BLOCK, fraction, rng)
    pool = realistic_pool(8 << 20, seed)
    with open(path, "r+b") as f:
        for i in picked:
            f.seek(i * BLOCK)
            old = f.read(BLOCK)
            at = int(rng.integers(0, len(pool) // BLOCK)) * BLOCK
            new = bytearray(pool[at : at + BLOCK])
            if new == old:
                new[0] ^= 0xFF
            f.seek(i * BLOCK)
            f.write(new)
    return picked


def make_vhd(raw: str, vhd: str) -> None:
    """Write ``raw``'s bytes into a new fixed VHD at ``vhd`` (Azure's page-blob format)."""
    from ..disks import create_disk
    from ..sync import SyncOptions, sync_paths

    with open(raw, "rb") as f:
        size = f.seek(0, 2)
    with create_disk(vhd, size, format="vhd", subformat="fixed") as disk:
        disk.flush()
    sync_paths(raw, vhd, SyncOptions(use_map_cache=False))

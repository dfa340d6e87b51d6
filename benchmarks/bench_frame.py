"""Frame encode/decode speed: 1 MiB frames, zstd levels -1 / 1 / 3, three data kinds.

Run: ``.venv/bin/pytest -q benchmarks/bench_frame.py --benchmark-only``. Each case
reports plaintext MB/s (10^6 bytes/s, from the median) and the frame ratio in
``extra_info``. Compare with /work/shared/perf-limits.md sections 3, 4 and 6 (full
source pipeline ~520 MB/s at L1 incl. reading; receive side ~1.26 GB/s incl. pwrite).
"""

from __future__ import annotations

import itertools
import random

import pytest

from replication.frame import FrameDecoder, FrameEncoder, max_frame_size

MiB = 1 << 20
SECRET = bytes(range(32))
DISK = bytes(range(16))
LEVELS = [-1, 1, 3]
KINDS = ["zeros", "random", "mix"]


def _mix(size: int, seed: int = 7) -> bytes:
    """Per 64 KiB block: ~30 % zeros, 25 % text, 29 % binary-like, 16 % random.

    Text is words drawn from a 4096-word vocabulary with a skewed distribution and
    binary-like data is bytes with a skewed distribution plus repeated 16-byte
    "instructions", so zstd -1 lands near the ~2.6x of the realistic image in
    perf-limits.md rather than the 100x of repeated lines.
    """
    rng = random.Random(seed)
    vocab = [rng.randbytes(rng.randrange(2, 10)).hex()[: rng.randrange(2, 12)] for _ in range(4096)]
    weights = [1 / (i + 1) for i in range(len(vocab))]
    alphabet = list(range(256))
    byte_weights = [1 / (i + 1) ** 1.2 for i in range(256)]
    snippets = [rng.randbytes(16) for _ in range(512)]
    out = bytearray()
    while len(out) < size:
        kind = rng.choices(["zero", "text", "binary", "random"], [30, 25, 29, 16])[0]
        if kind == "zero":
            block = bytes(65536)
        elif kind == "text":
            words = rng.choices(vocab, weights, k=12000)
            block = " ".join(words).encode()
        elif kind == "binary":
            parts = [
                bytes(rng.choices(alphabet, byte_weights, k=16))
                if rng.random() < 0.5
                else rng.choice(snippets)
                for _ in range(4096)
            ]
            block = b"".join(parts)
        else:
            block = rng.randbytes(65536)
        out += block[:65536].ljust(65536, b"\n")
    return bytes(out[:size])


def _data(kind: str) -> bytes:
    if kind == "zeros":
        return bytes(MiB)
    if kind == "random":
        return random.Random(1).randbytes(MiB)
    return _mix(MiB)


def _report(benchmark, nbytes: int, frame_len: int) -> None:
    benchmark.extra_info["frame_ratio"] = round(nbytes / frame_len, 3)
    if benchmark.stats is not None:
        median = benchmark.stats.stats.median
        benchmark.extra_info["MB/s"] = round(nbytes / median / 1e6, 1)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("level", LEVELS)
def test_encode_1mib(benchmark, level: int, kind: str) -> None:
    data = _data(kind)
    enc = FrameEncoder(SECRET, DISK, level=level)
    seqs = itertools.count()
    frame = benchmark(lambda: enc.encode(next(seqs), 0, data))
    _report(benchmark, len(data), len(frame))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("level", [1])
def test_encode_into_1mib(benchmark, level: int, kind: str) -> None:
    data = _data(kind)
    enc = FrameEncoder(SECRET, DISK, level=level)
    out = bytearray(max_frame_size(len(data)))
    seqs = itertools.count()
    n = benchmark(lambda: enc.encode_into(next(seqs), 0, data, out))
    _report(benchmark, len(data), n)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("level", LEVELS)
def test_decode_1mib(benchmark, level: int, kind: str) -> None:
    data = _data(kind)
    frame = FrameEncoder(SECRET, DISK, level=level).encode(0, 0, data)
    dec = FrameDecoder(SECRET, DISK)
    out = benchmark(dec.decode, frame)
    assert out.data == data
    _report(benchmark, len(data), len(frame))

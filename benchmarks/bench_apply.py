"""The master target's write path: sparse-VMDK grain allocation and undo-journal appends.

Run: ``.venv/bin/pytest -q benchmarks/bench_apply.py --benchmark-only``. Each case
reports MB/s of data written (10^6 bytes/s, from the median) in ``extra_info``.

* ``test_grain_allocation``: 32 MiB of new grains written into an empty
  monolithicSparse VMDK and flushed (D5: grains, fsync, tables, fsync), the new
  grains appended with ``O_DIRECT`` from reused slots (``direct``) or through the
  page cache (``buffered``, the path taken where O_DIRECT is refused);
* ``test_undo_append``: the undo records of 32 MiB journaled and fsynced, for a
  range that is a hole (zeros: the cached zstd frame) and for realistic data.

Compare with perf-limits.md section 1 (writes, fsync every 64 MiB) and 6 (receive side).
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest

from replication.disks.vmdk import allocate, create_vmdk
from replication.journal import Journal

MiB = 1 << 20
SIZE = 32 * MiB
_counter = itertools.count()


def _mix(size: int, seed: int = 7) -> bytes:
    """Per 64 KiB: ~30 % zeros, ~35 % text-like, ~35 % random (enough for the write path)."""
    rng = random.Random(seed)
    words = [rng.randbytes(6).hex() for _ in range(512)]
    out = bytearray()
    while len(out) < size:
        kind = rng.random()
        if kind < 0.3:
            out += bytes(65536)
        elif kind < 0.65:
            out += " ".join(rng.choices(words, k=6000)).encode()[:65536].ljust(65536)
        else:
            out += rng.randbytes(65536)
    return bytes(out[:size])


DATA = _mix(SIZE)


def _report(benchmark, nbytes: int) -> None:
    if benchmark.stats is not None:
        benchmark.extra_info["MB/s"] = round(nbytes / benchmark.stats.stats.median / 1e6, 1)


@pytest.mark.parametrize("mode", ["direct", "buffered"])
def test_grain_allocation(benchmark, tmp_path: Path, monkeypatch, mode: str) -> None:
    if mode == "buffered":
        monkeypatch.setattr(allocate, "open_direct", lambda fd: -1)

    def setup():
        path = tmp_path / f"v{next(_counter)}.vmdk"
        return (create_vmdk(str(path), 4 * SIZE),), {}

    def run(disk) -> None:
        with disk:
            disk.write(0, DATA)
            disk.flush()

    benchmark.pedantic(run, setup=setup, rounds=5, iterations=1)
    _report(benchmark, SIZE)


@pytest.mark.parametrize("kind", ["hole", "mix"])
def test_undo_append(benchmark, tmp_path: Path, kind: str) -> None:
    old = bytes(SIZE) if kind == "hole" else DATA
    chunk = 4 * MiB

    def setup():
        root = tmp_path / f"j{next(_counter)}"
        return (Journal.open(root, volume="bench", retention_bytes=1 << 40),), {}

    def run(journal) -> None:
        view = memoryview(old)
        for pos in range(0, SIZE, chunk):
            journal.record_undo(pos, view[pos : pos + chunk])
        journal.sync()
        journal.close()

    benchmark.pedantic(run, setup=setup, rounds=5, iterations=1)
    _report(benchmark, SIZE)

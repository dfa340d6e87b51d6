"""Deterministic realistic disk images for benchmarks: see :mod:`replication.bench.images`.

Kept so that ``bench_sync.py`` (and anyone's scripts) can still ``from images import
write_image, mutate_image``; the logic lives in the package, where ``replication
bench`` uses it too.
"""

from __future__ import annotations

from replication.bench.images import BLOCK, CHUNK, make_vhd, mutate_image, write_image

__all__ = ["BLOCK", "CHUNK", "make_vhd", "mutate_image", "write_image"]

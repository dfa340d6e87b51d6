"""Give large freed buffers back to the system, so memory follows configuration.

glibc serves a large allocation (128 KiB or more at first) with its own mapping, but
each time such a mapping is freed it raises that threshold to the freed size (its
"dynamic threshold", up to 32 MiB on 64-bit). From then on a hash-map window's
buffers (16 MiB each, see :data:`replication.hashmap.WINDOW_BLOCKS`) come from the
heap arena of whichever thread allocates them and often stay there once freed: an
agent's resident size then grows with how many windows and threads went by, not with
its configuration (a model of it, four threads of 16 MiB windows, peaks at 196 MiB
against 68 MiB with the threshold fixed: tests/unit/test_heap.py).

Fixing the threshold with ``mallopt(M_MMAP_THRESHOLD, ...)`` also turns the dynamic
adjustment off: every buffer of :data:`MMAP_THRESHOLD` or more is then its own
mapping, returned to the system when freed. The cost is a page-fault pass per large
buffer, negligible next to hashing or compressing it.
"""

from __future__ import annotations

import ctypes
import sys

__all__ = ["MMAP_THRESHOLD", "return_large_buffers"]

#: allocations at least this large are mapped on their own (and unmapped when freed)
MMAP_THRESHOLD = 1 << 20
_M_MMAP_THRESHOLD = -3  # glibc <malloc.h>


def return_large_buffers(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold for this process; False where there is no glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # another C library (musl has no mallopt)
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return mallopt(_M_MMAP_THRESHOLD, threshold) == 1

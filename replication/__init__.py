"""Block-level delta replication engine: disks, hash maps, frames, sync.

The names below are the supported public API; everything else is internal.
"""

from .disks import Disk, DiskInfo, Extent, detect_format, open_disk
from .errors import *  # noqa: F403
from .errors import __all__ as _error_names

__all__ = [
    "Disk",
    "DiskInfo",
    "Extent",
    "detect_format",
    "open_disk",
    *_error_names,
]

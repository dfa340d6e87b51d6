"""NBD front end of the source agent: a workload writes to a protected disk through us.

A real client (qemu, qemu-img, qemu-io, nbdinfo, the kernel's nbd-client) connects to
:class:`NbdServer`; every WRITE, TRIM and WRITE_ZEROES is reported to an ``on_write``
hook before the disk changes and before the client gets its acknowledgement. The
protocol itself is the sans-I/O :class:`ServerConnection`. See ``docs/nbd.md``.
"""

from __future__ import annotations

from .constants import Command, Errno
from .export import Export, Outcome, WriteHook
from .protocol import (
    DEFAULT_MAX_REQUEST,
    NEED_DATA,
    Disconnect,
    ExportChosen,
    ExportInfo,
    Phase,
    Rejected,
    Request,
    ServerConnection,
)
from .server import NbdServer, NbdStatistics

__all__ = [
    "DEFAULT_MAX_REQUEST",
    "NEED_DATA",
    "Command",
    "Disconnect",
    "Errno",
    "Export",
    "ExportChosen",
    "ExportInfo",
    "NbdServer",
    "NbdStatistics",
    "Outcome",
    "Phase",
    "Rejected",
    "Request",
    "ServerConnection",
    "WriteHook",
]

"""One NBD export: a :class:`~replication.disks.base.Disk`, its lock and its write hook.

:meth:`Export.execute` turns a validated :class:`~.protocol.Request` into Disk calls
and returns an :class:`Outcome` (data, or an NBD error). It does no socket I/O.

Write ordering, for WRITE, TRIM and WRITE_ZEROES (TRIM is executed as
WRITE_ZEROES, so a trimmed range reads as zeros here and on every replica):

1. ``on_write(offset, length)`` is called (write-ahead: a change tracker learns of
   the range before the disk changes, so a crash can only over-report);
2. the disk is written; with FUA, ``disk.flush()`` follows;
3. only then does the caller send the acknowledgement.

If the hook raises, nothing is written and the client gets EIO: no write reaches the
disk untracked. If the disk write fails after the hook ran, the range stays reported
(harmless: an over-report costs one block re-sent).

Steps 1 and 2 happen under the export's lock, which every I/O on that Disk takes,
from every connection: the Disk contract allows one writer at a time and does not
promise that reads may run beside a write. A consumer that must see "reported"
and "on disk" as one step (swap a tracker's bitmap, then read the blocks) holds
:meth:`~.server.NbdServer.quiesced` while it swaps.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from ..disks.base import Disk
from ..errors import (
    DiskFullError,
    DiskReadOnlyError,
    OutOfRangeError,
    ReplicationError,
)
from .constants import Command, Errno
from .protocol import ExportInfo, Request

__all__ = ["Export", "Outcome", "WriteHook"]

log = logging.getLogger(__name__)

#: ``on_write(offset, length)``: told of every range about to be written, before the ack
WriteHook = Callable[[int, int], None]

#: engine error class -> NBD error value; the first match in order wins (subclasses first)
_ERRNO_BY_ERROR: tuple[tuple[type[ReplicationError], Errno], ...] = (
    (DiskFullError, Errno.ENOSPC),
    (DiskReadOnlyError, Errno.EPERM),
    (OutOfRangeError, Errno.EINVAL),
)


@dataclass(frozen=True)
class Outcome:
    """The result of one request: ``data`` for a successful READ, or an ``error``."""

    error: Errno | None = None
    data: bytes | bytearray = b""
    message: str = ""


class Export:
    """A named Disk served over NBD; see the module docstring for the write ordering."""

    def __init__(
        self,
        name: str,
        disk: Disk,
        *,
        read_only: bool = False,
        lock: threading.Lock | None = None,
        on_write: WriteHook | None = None,
    ) -> None:
        self.name = name
        self.disk = disk
        self.read_only = read_only or not disk.writable
        self.lock = lock or threading.Lock()
        self.on_write = on_write

    @property
    def info(self) -> ExportInfo:
        """What the handshake advertises for this export."""
        return ExportInfo(self.name, self.disk.virtual_size, self.read_only)

    def execute(self, request: Request) -> Outcome:
        """Run ``request`` against the disk; never raises for a disk or hook failure."""
        handler = _HANDLERS[request.command]
        try:
            with self.lock:
                return handler(self, request)
        except ReplicationError as err:
            log.warning(
                "nbd export %s: %s failed: [%s] %s", self.name, request.command.name, err.code, err
            )
            return Outcome(_errno_for(err), message=str(err))
        except Exception as err:  # a bug or a hook failure must not kill the connection
            log.exception("nbd export %s: %s failed", self.name, request.command.name)
            return Outcome(Errno.EIO, message=f"{request.command.name} failed: {err}")

    # -- one method per command; called with the lock held ---------------------------------

    def _read(self, request: Request) -> Outcome:
        data = bytearray(request.length)  # at most max_request: checked by the protocol
        self.disk.read_into(request.offset, data)
        return Outcome(data=data)

    def _write(self, request: Request) -> Outcome:
        if request.length:
            self._report(request)
            self.disk.write(request.offset, request.data)
        return self._finish(request)

    def _write_zeroes(self, request: Request) -> Outcome:
        if request.length:
            self._report(request)
            self.disk.write_zeroes(request.offset, request.length)
        return self._finish(request)

    def _flush(self, request: Request) -> Outcome:
        self.disk.flush()
        return Outcome()

    def _report(self, request: Request) -> None:
        if self.on_write is not None:
            self.on_write(request.offset, request.length)

    def _finish(self, request: Request) -> Outcome:
        if request.fua:
            self.disk.flush()
        return Outcome()


_HANDLERS: dict[Command, Callable[[Export, Request], Outcome]] = {
    Command.READ: Export._read,
    Command.WRITE: Export._write,
    Command.WRITE_ZEROES: Export._write_zeroes,
    Command.TRIM: Export._write_zeroes,
    Command.FLUSH: Export._flush,
}


def _errno_for(err: ReplicationError) -> Errno:
    for cls, errno in _ERRNO_BY_ERROR:
        if isinstance(err, cls):
            return errno
    return Errno.EIO

"""A threaded NBD server over TCP and Unix sockets, driving :mod:`.protocol`.

Concurrency model:

* one accept thread per listening socket, one thread per client connection;
* a connection handles its requests strictly in order: read a request, execute it,
  send its reply, then read the next (clients may pipeline; they just wait longer);
* every connection to an export shares the export's Disk and lock (one lock per
  Disk object, even when two names export the same Disk), so I/O to one disk is
  serialized across connections while different disks run in parallel. That is
  what makes ``NBD_FLAG_CAN_MULTI_CONN`` true: a FLUSH on any connection covers the
  acknowledged writes of all of them.

The handshake has a deadline (``handshake_timeout``); transmission has none (a VM
may stay idle for hours). :meth:`NbdServer.stop` closes the listeners, shuts down
every client socket (a request being executed finishes first) and joins threads.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, fields

from ..disks.base import Disk
from ..errors import NbdProtocolError, UsageError
from .constants import Command
from .export import Export, WriteHook
from .protocol import (
    DEFAULT_MAX_REQUEST,
    NEED_DATA,
    Disconnect,
    Event,
    ExportChosen,
    Rejected,
    Request,
    ServerConnection,
)

__all__ = ["NbdServer", "NbdStatistics"]

log = logging.getLogger(__name__)

_RECV_SIZE = 256 << 10
_ACCEPT_POLL = 0.2  # seconds; how quickly an accept loop notices stop()
_IOV_MAX = 512  # buffers per sendmsg(); Linux allows 1024


@dataclass(frozen=True)
class NbdStatistics:
    """Counters since the server was created."""

    connections: int = 0  # accepted
    active: int = 0  # open now
    requests: int = 0  # executed (READ, WRITE, FLUSH, TRIM, WRITE_ZEROES)
    rejected: int = 0  # refused from the header (range, length, flags, read-only)
    failed: int = 0  # executed but answered with an error (disk or hook failure)
    protocol_errors: int = 0  # connections closed for a protocol violation
    bytes_read: int = 0
    bytes_written: int = 0  # WRITE payload bytes acknowledged


class NbdServer:
    """Serve named :class:`~replication.disks.base.Disk` exports over NBD.

    ``on_write`` is one ``(offset, length)`` callable for every export, or a mapping
    from export name to callable; it runs before the disk write and before the
    acknowledgement (see :mod:`.export`). ``read_only`` makes every export read-only
    (a Disk opened read-only is always served read-only).
    """

    def __init__(
        self,
        exports: Mapping[str, Disk],
        *,
        on_write: WriteHook | Mapping[str, WriteHook] | None = None,
        read_only: bool = False,
        max_request: int = DEFAULT_MAX_REQUEST,
        handshake_timeout: float = 30.0,
        max_connections: int = 64,
    ) -> None:
        self._exports = _build_exports(exports, on_write, read_only)
        self._infos = [e.info for e in self._exports.values()]
        ServerConnection(self._infos, max_request=max_request)  # validates names and sizes
        self.max_request = max_request
        self.handshake_timeout = handshake_timeout
        self.max_connections = max_connections
        self._stop = threading.Event()
        self._guard = threading.Lock()  # listeners, clients, counters
        self._listeners: list[tuple[socket.socket, str | None]] = []  # (socket, unix path)
        self._threads: list[threading.Thread] = []
        self._clients: set[socket.socket] = set()
        self._counts = dict.fromkeys((f.name for f in fields(NbdStatistics)), 0)

    # -- life cycle ----------------------------------------------------------------------------

    def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen on TCP ``host:port`` (0: any free port) in the background; return the port."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.create_server((host, port), family=family)
        bound = listener.getsockname()[1]
        self._listen(listener, None, f"{host}:{bound}")
        return bound

    def serve_unix(self, path: str) -> None:
        """Listen on a Unix socket at ``path`` (must not exist; removed by stop())."""
        if os.path.lexists(path):
            raise UsageError(f"nbd: {path} already exists", hint="remove a stale socket first")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(path)
            listener.listen()
        except OSError:
            listener.close()
            raise
        self._listen(listener, path, path)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, disconnect every client, wait for the threads; idempotent."""
        self._stop.set()
        with self._guard:
            listeners, self._listeners = self._listeners, []
            clients = list(self._clients)
            threads = list(self._threads)
        for listener, path in listeners:
            listener.close()
            if path is not None:
                _remove_socket(path)
        for sock in clients:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            thread.join(timeout)

    def __enter__(self) -> NbdServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- observation ---------------------------------------------------------------------------

    def statistics(self) -> NbdStatistics:
        """Return a snapshot of the counters."""
        with self._guard:
            return NbdStatistics(**self._counts)

    @contextlib.contextmanager
    def quiesced(self) -> Iterator[None]:
        """Hold every export's lock: no request is between its hook call and its disk write."""
        locks = {id(e.lock): e.lock for e in self._exports.values()}
        with contextlib.ExitStack() as stack:
            for lock in locks.values():
                stack.enter_context(lock)
            yield

    # -- threads ------------------------------------------------------------------------------

    def _listen(self, listener: socket.socket, path: str | None, where: str) -> None:
        listener.settimeout(_ACCEPT_POLL)
        with self._guard:
            self._listeners.append((listener, path))
        self._spawn(self._accept_loop, listener, name=f"nbd-accept-{where}")
        log.info("nbd: listening on %s, exports %s", where, ", ".join(self._exports))

    def _spawn(self, target: Callable[..., None], *args: object, name: str) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        with self._guard:
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()

    def _accept_loop(self, listener: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                sock, peer = listener.accept()
            except TimeoutError:
                continue
            except OSError as err:
                if not self._stop.is_set():
                    log.warning("nbd: accept failed: %s", err)
                    self._stop.wait(_ACCEPT_POLL)  # e.g. EMFILE: do not spin
                continue
            self._admit(sock, str(peer) if peer else "unix")

    def _admit(self, sock: socket.socket, peer: str) -> None:
        with self._guard:
            # stop() sets the flag before it copies the client list under this lock, so a
            # connection accepted meanwhile is either shut down by stop() or refused here
            full = self._stop.is_set() or self._counts["active"] >= self.max_connections
            if not full:
                self._clients.add(sock)
                self._counts["connections"] += 1
                self._counts["active"] += 1
        if full:
            if not self._stop.is_set():
                log.warning("nbd: refused %s: %d connections open", peer, self.max_connections)
            sock.close()
            return
        self._spawn(self._serve, sock, peer, name=f"nbd-client-{peer}")

    def _serve(self, sock: socket.socket, peer: str) -> None:
        try:
            _Session(self, sock, peer).run()
        finally:
            with self._guard:
                self._clients.discard(sock)
                self._counts["active"] -= 1
            sock.close()

    def _count(self, name: str, n: int = 1) -> None:
        with self._guard:
            self._counts[name] += n


class _Session:
    """One client connection: feeds the protocol machine, executes what it asks."""

    def __init__(self, server: NbdServer, sock: socket.socket, peer: str) -> None:
        self.server = server
        self.sock = sock
        self.peer = peer
        self.conn = ServerConnection(server._infos, max_request=server.max_request)
        self.export: Export | None = None

    def run(self) -> None:
        """Serve until the client leaves, breaks the protocol, or the server stops."""
        if self.sock.family != socket.AF_UNIX:
            # the spec asks for it: a reply header must not wait for a delayed ACK
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(self.server.handshake_timeout)
        try:
            self._loop()
        except NbdProtocolError as err:
            self.server._count("protocol_errors")
            log.warning("nbd: closing %s: [%s] %s", self.peer, err.code, err)
        except TimeoutError:
            log.warning("nbd: closing %s: no export chosen within the handshake timeout", self.peer)
        except OSError as err:
            log.info("nbd: connection %s lost: %s", self.peer, err)
        except Exception:  # a bug here must cost one connection, not the server's logs
            log.exception("nbd: closing %s after an internal error", self.peer)

    def _loop(self) -> None:
        while True:
            event = self.conn.next_event()
            if event is NEED_DATA:
                self._send()  # option replies are queued without an event
                self.conn.receive_data(self.sock.recv(_RECV_SIZE))
                continue
            if isinstance(event, Disconnect):
                self._send()
                log.info("nbd: %s disconnected: %s", self.peer, event.reason)
                return
            self._handle(event)
            self._send()

    def _handle(self, event: Event) -> None:
        if isinstance(event, Request):
            self._execute(event)
        elif isinstance(event, Rejected):
            self.server._count("rejected")
            log.warning(
                "nbd: %s: refused command %d at %d+%d: %s (%s)",
                self.peer,
                event.command,
                event.offset,
                event.length,
                event.reason,
                event.error.name,
            )
        elif isinstance(event, ExportChosen):
            self.export = self.server._exports[event.name]
            self.sock.settimeout(None)
            log.info(
                "nbd: %s uses export %s (%d bytes, flags %#x, structured=%s)",
                self.peer,
                event.name,
                event.size,
                event.flags,
                event.structured,
            )

    def _execute(self, request: Request) -> None:
        assert self.export is not None
        outcome = self.export.execute(request)
        self.server._count("requests")
        if outcome.error is not None:
            self.server._count("failed")
            self.conn.reply_error(request, outcome.error, outcome.message)
        elif request.command is Command.READ:
            self.server._count("bytes_read", request.length)
            self.conn.reply_read(request, outcome.data)
        else:
            if request.command is Command.WRITE:
                self.server._count("bytes_written", request.length)
            self.conn.reply_ok(request)

    def _send(self) -> None:
        _send_all(self.sock, self.conn.data_to_send())


def _send_all(sock: socket.socket, parts: list[bytes | memoryview]) -> None:
    """Write every buffer, in order, with as few system calls as the kernel allows."""
    views = [memoryview(p).cast("B") for p in parts]
    while views:
        sent = sock.sendmsg(views[:_IOV_MAX])
        while sent:
            if sent >= len(views[0]):
                sent -= len(views.pop(0))
            else:
                views[0] = views[0][sent:]
                sent = 0


def _build_exports(
    disks: Mapping[str, Disk],
    on_write: WriteHook | Mapping[str, WriteHook] | None,
    read_only: bool,
) -> dict[str, Export]:
    """One Export per name; names that share a Disk object share its lock."""
    if isinstance(on_write, Mapping):
        unknown = set(on_write) - set(disks)
        if unknown:
            raise UsageError(f"nbd: on_write names unknown exports {sorted(unknown)}")
        hooks = dict(on_write)
    else:
        hooks = dict.fromkeys(disks, on_write)
    locks: dict[int, threading.Lock] = {}
    return {
        name: Export(
            name,
            disk,
            read_only=read_only,
            lock=locks.setdefault(id(disk), threading.Lock()),
            on_write=hooks.get(name),
        )
        for name, disk in disks.items()
    }


def _remove_socket(path: str) -> None:
    with contextlib.suppress(OSError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)

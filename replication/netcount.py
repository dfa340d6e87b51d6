"""A TCP relay on 127.0.0.1 that counts the bytes crossing it, in both directions.

For reports that must show what crossed the wire measured from outside the agents
(``replication demo``): put it between a source agent and its process server and
read :attr:`ByteCounter.total`. Every connection gets two pump threads; sockets have
timeouts, and :meth:`close` ends them.
"""

from __future__ import annotations

import contextlib
import socket
import threading

__all__ = ["ByteCounter"]


class ByteCounter:
    """Relay ``127.0.0.1:port`` -> ``127.0.0.1:target_port``, counting bytes."""

    def __init__(self, target_port: int) -> None:
        self._target = ("127.0.0.1", target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self.up = 0  # client -> server
        self.down = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def total(self) -> int:
        return self.up + self.down

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
                server = socket.create_connection(self._target, timeout=10)
            except (TimeoutError, OSError):
                continue
            with self._lock:
                self._socks += [client, server]
            for src, dst, up in ((client, server, True), (server, client, False)):
                threading.Thread(target=self._pump, args=(src, dst, up), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        src.settimeout(0.5)
        try:
            while not self._stop.is_set():
                try:
                    data = src.recv(1 << 16)
                except TimeoutError:
                    continue
                if not data:
                    break
                dst.sendall(data)
                with self._lock:
                    if up:
                        self.up += len(data)
                    else:
                        self.down += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        with self._lock:
            for s in self._socks:
                with contextlib.suppress(OSError):
                    s.close()

"""A TCP fault proxy for tests: counts bytes, and cuts, stalls, slows or half-opens connections.

``FaultProxy(target_port)`` listens on 127.0.0.1 (port 0) and relays every
connection to ``127.0.0.1:target_port``. Bytes are counted per direction from
outside the agents ("up": client -> server, "down": server -> client). Faults:

* ``cut()`` closes every live connection (new ones are accepted again);
* ``stall(True)`` stops relaying both directions (connections stay open, like a
  dead link);
* ``stop_reading("up")`` stops reading one direction only, so the sender's socket
  buffers and then its flow-control window fill (a peer that stops reading), while
  the other direction keeps flowing;
* ``drop_server_side()`` half-opens every live connection: the server's side is
  closed (the server sees the connection end) while the client's side stays open
  and whatever the client sends is swallowed, never answered: a middlebox that
  silently forgot the flow;
* ``close_direction("down")`` half-closes one direction of every live connection:
  its receiver reads end-of-stream (FIN) while the other direction keeps flowing;
* ``delay`` adds a pause per chunk (a slow link).

Every loop is bounded: sockets have timeouts and threads stop with the proxy.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Literal

Direction = Literal["up", "down"]


class _Link:
    """One relayed connection: the client's socket, ours to the server, and its faults."""

    def __init__(self, client: socket.socket, server: socket.socket) -> None:
        self.client = client
        self.server = server
        self.server_dropped = False  # drop_server_side(): swallow what the client sends
        self.half_closed = {True: False, False: False}  # per direction (True: up)

    def ends(self, up: bool) -> tuple[socket.socket, socket.socket]:
        """(source, destination) of one direction."""
        return (self.client, self.server) if up else (self.server, self.client)

    def close(self) -> None:
        for s in (self.client, self.server):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()


class FaultProxy:
    def __init__(self, target_port: int, *, target_host: str = "127.0.0.1") -> None:
        self._target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self.bytes_up = 0  # client -> server
        self.bytes_down = 0  # server -> client
        self.connections = 0
        self.delay = 0.0
        self._paused = {True: threading.Event(), False: threading.Event()}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._links: list[_Link] = []
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            try:
                server = socket.create_connection(self._target, timeout=5)
            except OSError:
                client.close()
                continue
            link = _Link(client, server)
            with self._lock:
                self.connections += 1
                self._links.append(link)
            for up in (True, False):
                threading.Thread(target=self._pump, args=(link, up), daemon=True).start()

    def _pump(self, link: _Link, up: bool) -> None:
        """Relay one direction; tear the connection down when it ends, unless half-open."""
        if self._relay(link, up):
            link.close()

    def _relay(self, link: _Link, up: bool) -> bool:
        """Move bytes until the direction ends; return True to close the whole connection."""
        src, dst = link.ends(up)
        src.settimeout(0.2)
        while not self._stop.is_set():
            if link.half_closed[up]:
                return False  # the other direction lives on
            if self._paused[up].is_set():
                time.sleep(0.05)
                continue
            try:
                data = src.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return up if link.server_dropped else not link.half_closed[up]
            if link.server_dropped:
                if up and data:
                    continue  # swallowed: the client's side stays open, never answered
                return up  # the client ended: close; the server's side ended: keep the client's
            if not data:
                return True
            if not self._forward(link, up, dst, data):
                return True
        return True

    def _forward(self, link: _Link, up: bool, dst: socket.socket, data: bytes) -> bool:
        """Pass one chunk on and count it; return False when the connection broke."""
        if self.delay:
            time.sleep(self.delay)
        try:
            self._send(dst, data)
        except OSError:
            return link.server_dropped or link.half_closed[up]  # broken by a fault: expected
        with self._lock:
            if up:
                self.bytes_up += len(data)
            else:
                self.bytes_down += len(data)
        return True

    def _send(self, dst: socket.socket, data: bytes) -> None:
        """Send all of ``data``, waiting out a slow receiver (its timeout is not an error)."""
        view = memoryview(data)
        while view and not self._stop.is_set():
            try:
                view = view[dst.send(view) :]
            except TimeoutError:
                continue

    def _live_links(self) -> list[_Link]:
        with self._lock:
            return list(self._links)

    def cut(self) -> int:
        """Close every live connection (new ones are accepted again); return how many."""
        with self._lock:
            links, self._links = self._links, []
        for link in links:
            link.close()
        return len(links)

    def stall(self, on: bool) -> None:
        """Stop (or resume) relaying both directions; connections stay open."""
        for event in self._paused.values():
            (event.set if on else event.clear)()

    def stop_reading(self, direction: Direction, on: bool = True) -> None:
        """Stop (or resume) reading one direction: its sender's windows fill up."""
        event = self._paused[direction == "up"]
        (event.set if on else event.clear)()

    def drop_server_side(self) -> None:
        """Half-open every live connection: close the server's side, swallow the client's."""
        for link in self._live_links():
            link.server_dropped = True
            with contextlib.suppress(OSError):
                link.server.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                link.server.close()

    def close_direction(self, direction: Direction) -> None:
        """Half-close one direction of every live connection: its receiver reads FIN."""
        up = direction == "up"
        for link in self._live_links():
            link.half_closed[up] = True
            with contextlib.suppress(OSError):
                link.ends(up)[1].shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._stop.set()
        self.cut()
        self._listener.close()
        self._thread.join(timeout=5)

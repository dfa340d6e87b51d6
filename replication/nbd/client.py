"""A small blocking NBD client: fixed newstyle, ``NBD_OPT_GO``, simple replies.

For load generators and tools that write through the source agent's NBD front end
at a controlled pace (``replication bench`` churn, RPO measurements). One request in
flight at a time; every reply is checked (magic, handle, error). Not a general
client: no structured replies, no TLS.
"""

from __future__ import annotations

import contextlib
import socket
import struct

from ..errors import NbdProtocolError, OutOfRangeError
from .constants import (
    FLAG_C_FIXED_NEWSTYLE,
    FLAG_C_NO_ZEROES,
    FLAG_NO_ZEROES,
    IHAVEOPT,
    INFO_EXPORT,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    Command,
    Option,
    Rep,
)

__all__ = ["NbdClient"]

_REQUEST = struct.Struct(">IHHQQI")
_REPLY = struct.Struct(">IIQ")
_OPTION_REPLY = struct.Struct(">QIII")


class NbdClient:
    """Connect to ``host:port``, choose ``export``; then read, write and flush."""

    def __init__(self, host: str, port: int, export: str, *, timeout: float = 30.0) -> None:
        self._sock = socket.create_connection((host, port), timeout=timeout)
        self._handle = 0
        self.size = 0
        try:
            self._handshake(export)
        except BaseException:
            self._sock.close()
            raise

    def _recv(self, n: int) -> bytes:
        chunks, left = [], n
        while left:
            chunk = self._sock.recv(min(left, 1 << 20))
            if not chunk:
                raise NbdProtocolError(f"NBD server closed the connection ({left} bytes short)")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def _handshake(self, export: str) -> None:
        magic, opt, flags = struct.unpack(">QQH", self._recv(18))
        if magic != NBDMAGIC or opt != IHAVEOPT:
            raise NbdProtocolError("not an NBD fixed-newstyle server")
        client_flags = FLAG_C_FIXED_NEWSTYLE | (FLAG_C_NO_ZEROES if flags & FLAG_NO_ZEROES else 0)
        name = export.encode()
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        self._sock.sendall(
            struct.pack(">I", client_flags) + struct.pack(">QII", IHAVEOPT, Option.GO, len(data))
        )
        self._sock.sendall(data)
        while True:
            magic, _option, rep, length = _OPTION_REPLY.unpack(self._recv(_OPTION_REPLY.size))
            body = self._recv(length)
            if magic != OPTION_REPLY_MAGIC:
                raise NbdProtocolError("bad NBD option reply magic")
            if rep == Rep.ACK:
                return
            if rep == Rep.INFO and struct.unpack(">H", body[:2])[0] == INFO_EXPORT:
                self.size = struct.unpack(">Q", body[2:10])[0]
            elif rep & 0x80000000:
                raise NbdProtocolError(f"NBD server refused export {export!r}: {body!r}")

    def _request(self, command: int, offset: int, length: int, payload: bytes = b"") -> bytes:
        if offset + length > self.size:
            raise OutOfRangeError(f"NBD request [{offset}, {offset + length}) past {self.size}")
        self._handle += 1
        self._sock.sendall(_REQUEST.pack(REQUEST_MAGIC, 0, command, self._handle, offset, length))
        if payload:
            self._sock.sendall(payload)
        magic, error, handle = _REPLY.unpack(self._recv(_REPLY.size))
        if magic != SIMPLE_REPLY_MAGIC or handle != self._handle:
            raise NbdProtocolError("bad NBD reply (magic or handle)")
        if error:
            raise NbdProtocolError(f"NBD {Command(command).name} failed with errno {error}")
        return self._recv(length) if command == Command.READ else b""

    def read(self, offset: int, length: int) -> bytes:
        return self._request(Command.READ, offset, length)

    def write(self, offset: int, data: bytes) -> None:
        """Write; returns once the server acknowledged it (tracked, then written)."""
        self._request(Command.WRITE, offset, len(data), data)

    def flush(self) -> None:
        self._request(Command.FLUSH, 0, 0)

    def close(self) -> None:
        with contextlib.suppress(OSError):  # a server already gone needs no goodbye
            self._sock.sendall(_REQUEST.pack(REQUEST_MAGIC, 0, Command.DISC, 0, 0, 0))
        self._sock.close()

    def __enter__(self) -> NbdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

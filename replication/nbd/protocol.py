"""Sans-I/O NBD server side: the fixed-newstyle handshake and the transmission phase.

Theory of operation
-------------------
:class:`ServerConnection` holds no socket. The driver feeds it the bytes it received
(:meth:`~ServerConnection.receive_data`, ``b""`` for end of file), pulls events with
:meth:`~ServerConnection.next_event` until it gets :data:`NEED_DATA`, and writes out
whatever :meth:`~ServerConnection.data_to_send` returns after every event.

* The greeting is queued at construction.
* Option haggling is answered entirely inside the machine (it knows the exports'
  names, sizes and read-only bits); the driver only sees :class:`ExportChosen` when
  transmission starts, or :class:`Disconnect`.
* In transmission each well-formed, valid request comes out as a :class:`Request`;
  the driver executes it and answers with :meth:`~ServerConnection.reply_ok`,
  :meth:`~ServerConnection.reply_read` or :meth:`~ServerConnection.reply_error`.
  A request that can be refused from its header alone (out of range, too long,
  unknown command or flag, write to a read-only export) is answered by the machine
  itself and surfaces as :class:`Rejected`, for logging.
* A protocol violation after which the byte stream cannot be trusted (bad magic,
  unknown client flag, end of file inside a message) raises
  :class:`~replication.errors.NbdProtocolError`; the connection is then closed.

Memory: the receive buffer never holds more than one option (at most
:data:`MAX_OPTION_DATA` bytes of data) or one request (at most ``max_request`` bytes
of payload) beyond what the driver chose to read; a longer payload is counted down
and dropped as it arrives, never allocated. Payload bytes are buffered only as they
arrive, so a client that claims 32 MiB and sends nothing costs nothing.

Replies: with structured replies negotiated, a READ answers with one
``NBD_REPLY_TYPE_OFFSET_DATA`` chunk (``NONE`` for a zero-length read) and every
error is an ``NBD_REPLY_TYPE_ERROR`` chunk with a message; other successes use the
simple reply, which the spec allows. Without structured replies everything is a
simple reply.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum

from ..errors import LocalProtocolError, NbdProtocolError, UsageError
from .constants import (
    CLIENT_FLAGS_KNOWN,
    CMD_FLAG_DF,
    CMD_FLAG_FUA,
    CMD_FLAG_NO_HOLE,
    FLAG_C_NO_ZEROES,
    FLAG_CAN_MULTI_CONN,
    FLAG_FIXED_NEWSTYLE,
    FLAG_HAS_FLAGS,
    FLAG_NO_ZEROES,
    FLAG_READ_ONLY,
    FLAG_SEND_DF,
    FLAG_SEND_FLUSH,
    FLAG_SEND_FUA,
    FLAG_SEND_TRIM,
    FLAG_SEND_WRITE_ZEROES,
    IHAVEOPT,
    INFO_BLOCK_SIZE,
    INFO_EXPORT,
    INFO_NAME,
    MAX_STRING,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    REPLY_FLAG_DONE,
    REPLY_TYPE_ERROR,
    REPLY_TYPE_NONE,
    REPLY_TYPE_OFFSET_DATA,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Command,
    Errno,
    Option,
    Rep,
)

__all__ = [
    "DEFAULT_MAX_REQUEST",
    "MAX_OPTION_DATA",
    "NEED_DATA",
    "PREFERRED_BLOCK",
    "Disconnect",
    "Event",
    "ExportChosen",
    "ExportInfo",
    "Phase",
    "Rejected",
    "Request",
    "ServerConnection",
]

#: longest READ or WRITE we accept: the spec's interoperable maximum (2^25 bytes)
DEFAULT_MAX_REQUEST = 32 << 20
#: longest option data we buffer: a 4096-byte name plus 1024 info requests fit
MAX_OPTION_DATA = 16 << 10
#: advertised preferred block size; the minimum is 1 (every Disk takes byte offsets)
PREFERRED_BLOCK = 4096

_GREETING = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
_CLIENT_FLAGS = struct.Struct(">I")
_OPTION = struct.Struct(">QII")  # IHAVEOPT, option, data length
_OPTION_REPLY = struct.Struct(">QIII")  # magic, option, reply type, data length
_EXPORT_REPLY = struct.Struct(">QH")  # size, transmission flags (NBD_OPT_EXPORT_NAME)
_INFO_EXPORT = struct.Struct(">HQH")  # NBD_INFO_EXPORT, size, transmission flags
_INFO_BLOCK = struct.Struct(">HIII")  # NBD_INFO_BLOCK_SIZE, minimum, preferred, maximum
_REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, handle, offset, length
_SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, handle
_CHUNK = struct.Struct(">IHHQI")  # magic, flags, type, handle, payload length
_ERROR_PAYLOAD = struct.Struct(">IH")  # error, message length

#: command flags a request may carry, per command; FUA is tolerated everywhere
_ALLOWED_FLAGS = {
    Command.READ: CMD_FLAG_FUA | CMD_FLAG_DF,
    Command.WRITE: CMD_FLAG_FUA,
    Command.FLUSH: CMD_FLAG_FUA,
    Command.TRIM: CMD_FLAG_FUA,
    Command.WRITE_ZEROES: CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
}
_WRITES = (Command.WRITE, Command.TRIM, Command.WRITE_ZEROES)
_Refusal = tuple[Errno, str]  # (error sent to the client, reason logged and sent)


class Phase(Enum):
    """Where a connection is; it only moves forward."""

    CLIENT_FLAGS = "client-flags"  # greeting sent, waiting for the 32-bit client flags
    OPTIONS = "options"  # option haggling
    TRANSMISSION = "transmission"  # an export is bound; requests flow
    CLOSED = "closed"  # nothing more will be parsed


@dataclass(frozen=True)
class ExportInfo:
    """What the handshake needs to know about one export."""

    name: str
    size: int  # bytes
    read_only: bool = False


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


#: returned by :meth:`ServerConnection.next_event` when more bytes must be received
NEED_DATA = _NeedData()


@dataclass(frozen=True)
class ExportChosen:
    """Transmission started on ``name`` (after NBD_OPT_GO or NBD_OPT_EXPORT_NAME)."""

    name: str
    size: int
    flags: int  # the transmission flags sent to the client
    structured: bool  # structured replies were negotiated


@dataclass(frozen=True)
class Request:
    """A valid transmission request for the driver to execute and answer."""

    command: Command
    handle: int
    offset: int
    length: int
    flags: int
    data: bytes = field(default=b"", repr=False)  # WRITE payload, exactly ``length`` bytes

    @property
    def fua(self) -> bool:
        """Whether the reply must wait until the written data is durable."""
        return bool(self.flags & CMD_FLAG_FUA)

    @property
    def no_hole(self) -> bool:
        """WRITE_ZEROES asked for allocated zeros (accepted; see docs/nbd.md)."""
        return bool(self.flags & CMD_FLAG_NO_HOLE)


@dataclass(frozen=True)
class Rejected:
    """A request refused from its header; the machine already queued the error reply."""

    command: int  # raw type: may be a command we do not know
    handle: int
    offset: int
    length: int
    error: Errno
    reason: str


@dataclass(frozen=True)
class Disconnect:
    """The connection ends once :meth:`ServerConnection.data_to_send` is written out.

    ``soft`` is True when the client asked for it (NBD_OPT_ABORT, NBD_CMD_DISC).
    """

    reason: str
    soft: bool


Event = ExportChosen | Request | Rejected | Disconnect


class ServerConnection:
    """One client connection's protocol state; see the module docstring."""

    def __init__(
        self, exports: Iterable[ExportInfo], *, max_request: int = DEFAULT_MAX_REQUEST
    ) -> None:
        self.exports = {e.name: e for e in exports}
        _check_exports(self.exports, max_request)
        self.max_request = max_request
        self.phase = Phase.CLIENT_FLAGS
        self.structured = False
        self.export: ExportInfo | None = None
        self._no_zeroes = False
        self._buf = bytearray()
        self._skip = 0  # payload bytes of a refused request still to drop
        self._eof = False
        self._out: list[bytes | memoryview] = []
        self._queue(_GREETING.pack(NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))

    # -- driver interface -------------------------------------------------------------------

    @property
    def buffered(self) -> int:
        """Bytes received but not parsed yet (bounded: see the module docstring)."""
        return len(self._buf)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Add bytes received from the client; ``b""`` means the client closed its side."""
        if self.phase is Phase.CLOSED:
            return  # nothing more is parsed; a client's trailing bytes are irrelevant
        if self._eof and data:
            raise LocalProtocolError("nbd: data received after end of file")
        if not data:
            self._eof = True
        elif self._skip:
            self._drop(memoryview(data).cast("B"))
        else:
            self._buf += data

    def next_event(self) -> Event | _NeedData:
        """Return the next event, or NEED_DATA when the buffered bytes do not hold one."""
        if self.phase is Phase.CLOSED:
            raise LocalProtocolError("nbd: next_event() after the connection ended")
        while True:
            if self._skip:
                return self._need_data()
            event = self._step()
            if event is NEED_DATA:
                return self._need_data()
            if event is not None:
                return event

    def data_to_send(self) -> list[bytes | memoryview]:
        """Return, and forget, the buffers to write to the client, in order."""
        out, self._out = self._out, []
        return out

    def reply_ok(self, request: Request) -> None:
        """Acknowledge a successful WRITE, FLUSH, TRIM or WRITE_ZEROES."""
        self._check_reply(request)
        if request.command is Command.READ:
            raise LocalProtocolError("nbd: a READ is answered with reply_read()")
        self._queue(_SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, request.handle))

    def reply_read(self, request: Request, data: bytes | bytearray | memoryview) -> None:
        """Answer a successful READ with exactly ``request.length`` bytes."""
        self._check_reply(request)
        if request.command is not Command.READ or len(data) != request.length:
            raise LocalProtocolError("nbd: reply_read() needs a READ and all its bytes")
        self._queue(*read_reply(request.handle, request.offset, data, self.structured))

    def reply_error(self, request: Request, error: Errno, message: str = "") -> None:
        """Answer any request with an error (and, if structured, a message)."""
        self._check_reply(request)
        self._queue(error_reply(request.handle, error, message, self.structured))

    # -- parsing ------------------------------------------------------------------------------

    def _step(self) -> Event | _NeedData | None:
        """Parse one message of the current phase; None: consumed, nothing to report."""
        if self.phase is Phase.CLIENT_FLAGS:
            return self._parse_client_flags()
        if self.phase is Phase.OPTIONS:
            return self._parse_option()
        return self._parse_request()

    def _need_data(self) -> Event | _NeedData:
        if not self._eof:
            return NEED_DATA
        if self._buf or self._skip:
            raise self._violation(f"connection closed inside a message ({self.phase.value})")
        self.phase = Phase.CLOSED
        return Disconnect("client closed the connection", soft=False)

    def _parse_client_flags(self) -> _NeedData | None:
        if len(self._buf) < _CLIENT_FLAGS.size:
            return NEED_DATA
        (flags,) = _CLIENT_FLAGS.unpack(self._take(_CLIENT_FLAGS.size))
        if flags & ~CLIENT_FLAGS_KNOWN:
            raise self._violation(f"unknown client flags {flags:#x}")
        self._no_zeroes = bool(flags & FLAG_C_NO_ZEROES)
        self.phase = Phase.OPTIONS
        return None

    def _parse_option(self) -> Event | _NeedData | None:
        if len(self._buf) < _OPTION.size:
            return NEED_DATA
        magic, option, length = _OPTION.unpack_from(self._buf)
        if magic != IHAVEOPT:
            raise self._violation(f"bad option magic {magic:#x}")
        if length > MAX_OPTION_DATA:
            return self._refuse_long_option(option, length)
        if len(self._buf) < _OPTION.size + length:
            return NEED_DATA
        self._take(_OPTION.size)
        return self._handle_option(option, self._take(length))

    def _refuse_long_option(self, option: int, length: int) -> None:
        if option == Option.EXPORT_NAME:
            # this option cannot be answered with an error: the spec says hang up
            raise self._violation(f"export name of {length} bytes")
        self._take(_OPTION.size)
        self._skip_payload(length)
        rep = Rep.ERR_TOO_BIG if _is_known(option) else Rep.ERR_UNSUP
        self._option_reply(option, rep, _text(f"option data of {length} bytes is too long"))
        return None

    def _handle_option(self, option: int, data: bytes) -> Event | None:
        if option == Option.EXPORT_NAME:
            return self._opt_export_name(data)
        if option == Option.ABORT:
            self._option_reply(option, Rep.ACK)
            self.phase = Phase.CLOSED
            return Disconnect("client aborted the negotiation", soft=True)
        if option == Option.LIST:
            self._opt_list(data)
        elif option in (Option.INFO, Option.GO):
            return self._opt_info(option, data)
        elif option == Option.STRUCTURED_REPLY:
            self._opt_structured_reply(data)
        else:
            self._option_reply(option, Rep.ERR_UNSUP, _text(f"option {option} is not supported"))
        return None

    def _opt_export_name(self, data: bytes) -> Event:
        export = self._lookup(data)
        if export is None:
            self.phase = Phase.CLOSED
            name = data.decode("utf-8", "replace")
            return Disconnect(f"unknown export {name!r} chosen by NBD_OPT_EXPORT_NAME", soft=False)
        flags = self._transmission_flags(export)
        self._queue(_EXPORT_REPLY.pack(export.size, flags))
        if not self._no_zeroes:
            self._queue(bytes(124))
        return self._enter_transmission(export, flags)

    def _opt_list(self, data: bytes) -> None:
        if data:
            self._option_reply(Option.LIST, Rep.ERR_INVALID, _text("NBD_OPT_LIST takes no data"))
            return
        for name in sorted(self.exports):
            raw = name.encode()
            self._option_reply(Option.LIST, Rep.SERVER, struct.pack(">I", len(raw)) + raw)
        self._option_reply(Option.LIST, Rep.ACK)

    def _opt_info(self, option: int, data: bytes) -> Event | None:
        parsed = _parse_info_request(data)
        if parsed is None:
            self._option_reply(option, Rep.ERR_INVALID, _text("malformed NBD_OPT_INFO/GO data"))
            return None
        raw_name, wanted = parsed
        export = self._lookup(raw_name)
        if export is None:
            name = raw_name.decode("utf-8", "replace")
            self._option_reply(option, Rep.ERR_UNKNOWN, _text(f"no export named {name!r}"))
            return None
        flags = self._transmission_flags(export)
        self._option_reply(option, Rep.INFO, _INFO_EXPORT.pack(INFO_EXPORT, export.size, flags))
        # sent even when not asked: our maximum is below the spec's "unlimited" default
        block = _INFO_BLOCK.pack(INFO_BLOCK_SIZE, 1, PREFERRED_BLOCK, self.max_request)
        self._option_reply(option, Rep.INFO, block)
        if INFO_NAME in wanted:
            raw = struct.pack(">H", INFO_NAME) + export.name.encode()
            self._option_reply(option, Rep.INFO, raw)
        self._option_reply(option, Rep.ACK)
        if option == Option.GO:
            return self._enter_transmission(export, flags)
        return None

    def _opt_structured_reply(self, data: bytes) -> None:
        if data:
            msg = _text("NBD_OPT_STRUCTURED_REPLY takes no data")
            self._option_reply(Option.STRUCTURED_REPLY, Rep.ERR_INVALID, msg)
            return
        self.structured = True
        self._option_reply(Option.STRUCTURED_REPLY, Rep.ACK)

    def _parse_request(self) -> Event | _NeedData:
        if len(self._buf) < _REQUEST.size:
            return NEED_DATA
        magic, flags, kind, handle, offset, length = _REQUEST.unpack_from(self._buf)
        if magic != REQUEST_MAGIC:
            raise self._violation(f"bad request magic {magic:#x}")
        if kind == Command.DISC:
            self._take(_REQUEST.size)
            self.phase = Phase.CLOSED
            return Disconnect("client sent NBD_CMD_DISC", soft=True)
        refusal = self._validate(kind, flags, offset, length)
        if refusal is not None:
            return self._reject(kind, handle, offset, length, *refusal)
        payload = length if kind == Command.WRITE else 0
        if len(self._buf) < _REQUEST.size + payload:
            return NEED_DATA
        self._take(_REQUEST.size)
        data = self._take(payload) if payload else b""
        return Request(Command(kind), handle, offset, length, flags, data)

    def _validate(
        self, kind: int, flags: int, offset: int, length: int
    ) -> tuple[Errno, str] | None:
        """Return (error, reason) for a request refused from its header alone, else None."""
        assert self.export is not None
        if kind not in _ALLOWED_FLAGS:
            return Errno.EINVAL, f"unsupported command {kind}"
        command = Command(kind)
        allowed = _ALLOWED_FLAGS[command] & ~(0 if self.structured else CMD_FLAG_DF)
        if flags & ~allowed:
            return Errno.EINVAL, f"flags {flags:#x} not valid for {command.name}"
        if command in _WRITES and self.export.read_only:
            return Errno.EPERM, "the export is read-only"
        if command in (Command.READ, Command.WRITE) and length > self.max_request:
            return Errno.EINVAL, f"length {length} exceeds the maximum {self.max_request}"
        if command is not Command.FLUSH and offset + length > self.export.size:
            # the spec asks for ENOSPC on writes past the end, EINVAL otherwise
            past_end = Errno.ENOSPC if command in (Command.WRITE, Command.WRITE_ZEROES) else None
            reason = f"range [{offset}, {offset + length}) ends past {self.export.size}"
            return past_end or Errno.EINVAL, reason
        return None

    def _reject(
        self, kind: int, handle: int, offset: int, length: int, error: Errno, reason: str
    ) -> Rejected:
        self._take(_REQUEST.size)
        if kind == Command.WRITE:
            self._skip_payload(length)
        self._queue(error_reply(handle, error, reason, self.structured))
        return Rejected(kind, handle, offset, length, error, reason)

    # -- helpers --------------------------------------------------------------------------------

    def _lookup(self, raw_name: bytes) -> ExportInfo | None:
        """The export a client names; "" is the default export (the only one, if just one)."""
        try:
            name = raw_name.decode("utf-8")
        except UnicodeDecodeError:
            return None
        export = self.exports.get(name)
        if export is None and name == "" and len(self.exports) == 1:
            export = next(iter(self.exports.values()))
        return export

    def _transmission_flags(self, export: ExportInfo) -> int:
        flags = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_CAN_MULTI_CONN
        if export.read_only:
            flags |= FLAG_READ_ONLY
        else:
            flags |= FLAG_SEND_FUA | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES
        if self.structured:
            flags |= FLAG_SEND_DF  # we always send a READ as one content chunk
        return flags

    def _enter_transmission(self, export: ExportInfo, flags: int) -> ExportChosen:
        self.export = export
        self.phase = Phase.TRANSMISSION
        return ExportChosen(export.name, export.size, flags, self.structured)

    def _option_reply(self, option: int, rep: Rep, data: bytes = b"") -> None:
        self._queue(_OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, rep, len(data)) + data)

    def _check_reply(self, request: Request) -> None:
        if self.phase is not Phase.TRANSMISSION:
            raise LocalProtocolError(f"nbd: cannot reply in phase {self.phase.value}")

    def _take(self, n: int) -> bytes:
        with memoryview(self._buf) as view:
            data = bytes(view[:n])
        del self._buf[:n]
        return data

    def _skip_payload(self, n: int) -> None:
        """Drop the next ``n`` bytes of the stream (already buffered ones first)."""
        self._skip = n
        buffered, self._buf = self._buf, bytearray()
        self._drop(memoryview(buffered))

    def _drop(self, view: memoryview) -> None:
        n = min(self._skip, len(view))
        self._skip -= n
        if n < len(view):
            self._buf += view[n:]

    def _queue(self, *parts: bytes | memoryview) -> None:
        self._out.extend(p for p in parts if len(p))

    def _violation(self, message: str) -> NbdProtocolError:
        self.phase = Phase.CLOSED
        return NbdProtocolError(f"nbd: {message}")


# -- reply encoders (pure functions, shared with the tests) -------------------------------------


def read_reply(
    handle: int, offset: int, data: bytes | bytearray | memoryview, structured: bool
) -> tuple[bytes | memoryview, ...]:
    """Return the buffers of a successful READ reply (header first, data not copied)."""
    if not structured:
        return _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, handle), memoryview(data)
    if not len(data):
        return (_CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_NONE, handle, 0),)
    head = _CHUNK.pack(
        STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, handle, 8 + len(data)
    )
    return head + struct.pack(">Q", offset), memoryview(data)


def error_reply(handle: int, error: Errno, message: str, structured: bool) -> bytes:
    """Return an error reply: a structured ERROR chunk with ``message``, else a simple one."""
    if not error:
        raise LocalProtocolError("nbd: an error reply needs a nonzero error")
    if not structured:
        return _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle)
    text = _text(message)
    payload = _ERROR_PAYLOAD.pack(error, len(text)) + text
    head = _CHUNK.pack(
        STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, handle, len(payload)
    )
    return head + payload


def _parse_info_request(data: bytes) -> tuple[bytes, set[int]] | None:
    """Split NBD_OPT_INFO/GO data into (name, info requests); None when malformed."""
    if len(data) < 6:
        return None
    (name_len,) = struct.unpack_from(">I", data)
    if name_len > len(data) - 6 or name_len > MAX_STRING:
        return None
    name = data[4 : 4 + name_len]
    (count,) = struct.unpack_from(">H", data, 4 + name_len)
    rest = data[6 + name_len :]
    if len(rest) != 2 * count:
        return None
    return name, set(struct.unpack(f">{count}H", rest))


def _text(message: str) -> bytes:
    """UTF-8 of a message for the client, cut to the spec's string limit (whole characters)."""
    raw = message.encode("utf-8", "replace")[:MAX_STRING]
    return raw.decode("utf-8", "ignore").encode("utf-8")


def _is_known(option: int) -> bool:
    try:
        Option(option)
    except ValueError:
        return False
    return True


def _check_exports(exports: dict[str, ExportInfo], max_request: int) -> None:
    if not exports:
        raise UsageError("nbd: at least one export is needed")
    if not PREFERRED_BLOCK <= max_request <= 0xFFFFFFFF:
        raise UsageError(f"nbd: max_request {max_request} must lie in [4096, 2^32)")
    for name, export in exports.items():
        raw = name.encode("utf-8")
        if len(raw) > MAX_STRING or "\0" in name:
            raise UsageError(f"nbd: export name {name!r} is not a valid NBD string")
        if not 0 <= export.size < 1 << 63:
            raise UsageError(f"nbd: export {name!r} has an invalid size {export.size}")

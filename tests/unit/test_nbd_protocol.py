"""The sans-I/O NBD server machine, its export executor, and hostile clients on a socket.

Client messages are encoded here by hand from the spec's layouts (not with the
module's own structs), so a layout mistake in the code cannot cancel itself out.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replication.disks import create_disk
from replication.errors import LocalProtocolError, NbdProtocolError, UsageError
from replication.nbd import (
    NEED_DATA,
    Command,
    Disconnect,
    Errno,
    Export,
    ExportChosen,
    ExportInfo,
    NbdServer,
    Phase,
    Rejected,
    Request,
    ServerConnection,
)
from replication.nbd.protocol import MAX_OPTION_DATA

MiB = 1 << 20
SIZE = 1 * MiB
MAX = 64 << 10  # a small max_request keeps the hostile cases cheap

# option, reply and flag values straight from the spec
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO, OPT_SR = 1, 2, 3, 5, 6, 7, 8
OPT_SET_META = 10
REP_ACK, REP_SERVER, REP_INFO = 1, 2, 3
REP_ERR_UNSUP, REP_ERR_INVALID, REP_ERR_UNKNOWN, REP_ERR_TOO_BIG = (
    2**31 + 1,
    2**31 + 3,
    2**31 + 6,
    2**31 + 9,
)
READ, WRITE, DISC, FLUSH, TRIM, CACHE, WZ = 0, 1, 2, 3, 4, 5, 6
FUA, NO_HOLE, DF, FAST_ZERO = 1, 2, 4, 16
HAS_FLAGS, READ_ONLY, SEND_FLUSH, SEND_FUA, SEND_TRIM, SEND_WZ, SEND_DF, MULTI_CONN = (
    1,
    2,
    4,
    8,
    32,
    64,
    128,
    256,
)
REPLY_MAGIC = bytes.fromhex("0003e889045565a9")


# --- client-side encoders and decoders --------------------------------------------------------


def opt(option: int, data: bytes = b"") -> bytes:
    return b"IHAVEOPT" + struct.pack(">II", option, len(data)) + data


def go_data(name: str, *infos: int) -> bytes:
    raw = name.encode()
    return struct.pack(f">I{len(raw)}sH{len(infos)}H", len(raw), raw, len(infos), *infos)


def req(kind: int, offset: int = 0, length: int = 0, flags: int = 0, handle: int = 7) -> bytes:
    return struct.pack(">IHHQQI", 0x25609513, flags, kind, handle, offset, length)


def option_replies(raw: bytes) -> list[tuple[int, int, bytes]]:
    """Split fixed-newstyle option replies into (option, reply type, data)."""
    out, pos = [], 0
    while pos < len(raw):
        assert raw[pos : pos + 8] == REPLY_MAGIC
        option, rep, n = struct.unpack_from(">III", raw, pos + 8)
        out.append((option, rep, raw[pos + 20 : pos + 20 + n]))
        pos += 20 + n
    return out


def drain(conn: ServerConnection) -> bytes:
    return b"".join(bytes(p) for p in conn.data_to_send())


def events(conn: ServerConnection, data: bytes = b"") -> list[object]:
    """Feed ``data`` and collect events until NEED_DATA or a Disconnect."""
    if data:
        conn.receive_data(data)
    out: list[object] = []
    while True:
        ev = conn.next_event()
        if ev is NEED_DATA:
            return out
        out.append(ev)
        if isinstance(ev, Disconnect):
            return out


def new_conn(*exports: ExportInfo, max_request: int = MAX) -> ServerConnection:
    exports = exports or (ExportInfo("disk0", SIZE),)
    conn = ServerConnection(exports, max_request=max_request)
    drain(conn)
    events(conn, struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
    return conn


def connected(
    *exports: ExportInfo, structured: bool = False, name: str = "disk0", max_request: int = MAX
) -> ServerConnection:
    conn = new_conn(*exports, max_request=max_request)
    if structured:
        events(conn, opt(OPT_SR))
    evs = events(conn, opt(OPT_GO, go_data(name)))
    assert isinstance(evs[-1], ExportChosen)
    drain(conn)
    return conn


def simple_reply(raw: bytes) -> tuple[int, int, bytes]:
    magic, error, handle = struct.unpack_from(">IIQ", raw)
    assert magic == 0x67446698
    return error, handle, raw[16:]


def chunk(raw: bytes) -> tuple[int, int, int, bytes]:
    magic, flags, kind, handle, n = struct.unpack_from(">IHHQI", raw)
    assert magic == 0x668E33EF and len(raw) == 20 + n
    return flags, kind, handle, raw[20:]


# --- handshake ---------------------------------------------------------------------------------


def test_greeting_is_fixed_newstyle_with_no_zeroes():
    conn = ServerConnection([ExportInfo("disk0", SIZE)])
    assert drain(conn) == b"NBDMAGIC" + b"IHAVEOPT" + b"\x00\x03"
    assert conn.phase is Phase.CLIENT_FLAGS


def test_unknown_client_flag_closes():
    conn = ServerConnection([ExportInfo("disk0", SIZE)])
    with pytest.raises(NbdProtocolError, match="client flags"):
        events(conn, struct.pack(">I", 1 << 5))
    assert conn.phase is Phase.CLOSED


def test_structured_reply_ack_bytes():
    conn = new_conn()
    assert events(conn, opt(OPT_SR)) == []
    assert drain(conn) == REPLY_MAGIC + struct.pack(">III", OPT_SR, REP_ACK, 0)
    assert conn.structured
    events(conn, opt(OPT_SR, b"x"))
    assert option_replies(drain(conn))[0][1] == REP_ERR_INVALID


def test_list_names_every_export_then_acks():
    conn = new_conn(ExportInfo("b", SIZE), ExportInfo("a", SIZE))
    events(conn, opt(OPT_LIST))
    assert option_replies(drain(conn)) == [
        (OPT_LIST, REP_SERVER, b"\x00\x00\x00\x01a"),
        (OPT_LIST, REP_SERVER, b"\x00\x00\x00\x01b"),
        (OPT_LIST, REP_ACK, b""),
    ]
    events(conn, opt(OPT_LIST, b"junk"))
    assert option_replies(drain(conn)) == [
        (OPT_LIST, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data")
    ]


def test_info_reports_export_and_block_size_and_stays_in_options():
    conn = new_conn()
    assert events(conn, opt(OPT_INFO, go_data("disk0", 3, 1))) == []
    replies = option_replies(drain(conn))
    assert replies[-1] == (OPT_INFO, REP_ACK, b"")
    infos = {struct.unpack_from(">H", d)[0]: d[2:] for _, rep, d in replies if rep == REP_INFO}
    size, flags = struct.unpack(">QH", infos[0])
    assert size == SIZE
    assert flags == HAS_FLAGS | SEND_FLUSH | SEND_FUA | SEND_TRIM | SEND_WZ | MULTI_CONN
    assert struct.unpack(">III", infos[3]) == (1, 4096, MAX)
    assert infos[1] == b"disk0"
    assert conn.phase is Phase.OPTIONS


def test_go_enters_transmission_with_flags():
    conn = new_conn()
    events(conn, opt(OPT_SR))
    (ev,) = events(conn, opt(OPT_GO, go_data("disk0")))
    assert ev == ExportChosen(
        "disk0",
        SIZE,
        HAS_FLAGS | SEND_FLUSH | SEND_FUA | SEND_TRIM | SEND_WZ | MULTI_CONN | SEND_DF,
        True,
    )
    assert conn.phase is Phase.TRANSMISSION
    assert option_replies(drain(conn))[-1] == (OPT_GO, REP_ACK, b"")


def test_read_only_export_advertises_read_only_and_no_write_features():
    conn = new_conn(ExportInfo("ro", SIZE, read_only=True))
    (ev,) = events(conn, opt(OPT_GO, go_data("ro")))
    assert ev.flags == HAS_FLAGS | READ_ONLY | SEND_FLUSH | MULTI_CONN


def test_go_to_unknown_export_is_an_error_and_negotiation_goes_on():
    conn = new_conn()
    assert events(conn, opt(OPT_GO, go_data("nope"))) == []
    ((option, rep, msg),) = option_replies(drain(conn))
    assert (option, rep) == (OPT_GO, REP_ERR_UNKNOWN) and b"nope" in msg
    assert isinstance(events(conn, opt(OPT_GO, go_data("disk0")))[0], ExportChosen)


def test_empty_name_is_the_only_export_but_ambiguous_among_several():
    (ev,) = events(new_conn(), opt(OPT_GO, go_data("")))
    assert ev.name == "disk0"
    two = new_conn(ExportInfo("a", SIZE), ExportInfo("b", SIZE))
    assert events(two, opt(OPT_GO, go_data(""))) == []
    assert option_replies(drain(two))[0][1] == REP_ERR_UNKNOWN


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00\x00\x00\x05disk0",  # no info count
        b"\x00\x00\x00\xffdisk0\x00\x00",  # name longer than the data
        b"\x00\x00\x00\x05disk0\x00\x02\x00\x03",  # 2 info requests announced, 1 sent
        b"\xff\xff\xff\xff\x00\x00",  # absurd name length
    ],
)
def test_malformed_go_is_invalid(data: bytes):
    conn = new_conn()
    assert events(conn, opt(OPT_GO, data)) == []
    assert option_replies(drain(conn))[0][1] == REP_ERR_INVALID
    assert conn.phase is Phase.OPTIONS


def test_export_name_replies_size_flags_and_zeroes_unless_no_zeroes():
    conn = ServerConnection([ExportInfo("disk0", SIZE)])
    drain(conn)
    events(conn, struct.pack(">I", 1))  # FIXED_NEWSTYLE only: the 124 zeroes follow
    (ev,) = events(conn, opt(OPT_EXPORT_NAME, b"disk0"))
    assert isinstance(ev, ExportChosen)
    assert drain(conn) == struct.pack(">QH", SIZE, ev.flags) + bytes(124)
    conn = new_conn()
    events(conn, opt(OPT_EXPORT_NAME, b"disk0"))
    assert len(drain(conn)) == 10


def test_export_name_of_unknown_export_hangs_up():
    (ev,) = events(new_conn(), opt(OPT_EXPORT_NAME, b"nope"))
    assert isinstance(ev, Disconnect) and not ev.soft


def test_abort_acks_then_disconnects():
    conn = new_conn()
    (ev,) = events(conn, opt(OPT_ABORT))
    assert ev == Disconnect("client aborted the negotiation", soft=True)
    assert option_replies(drain(conn)) == [(OPT_ABORT, REP_ACK, b"")]
    with pytest.raises(LocalProtocolError):
        conn.next_event()


@pytest.mark.parametrize("option", [OPT_STARTTLS, OPT_SET_META, 4, 99, 2**32 - 1])
def test_unsupported_options_are_refused_and_their_data_skipped(option: int):
    conn = new_conn()
    assert events(conn, opt(option, b"some option data") + opt(OPT_SR)) == []
    replies = option_replies(drain(conn))
    assert [r[:2] for r in replies] == [(option, REP_ERR_UNSUP), (OPT_SR, REP_ACK)]


@pytest.mark.parametrize(("option", "rep"), [(OPT_GO, REP_ERR_TOO_BIG), (77, REP_ERR_UNSUP)])
def test_long_option_is_dropped_as_it_arrives(option: int, rep: int):
    conn = new_conn()
    claimed = 64 * MiB
    events(conn, b"IHAVEOPT" + struct.pack(">II", option, claimed))
    assert option_replies(drain(conn))[0][:2] == (option, rep)
    piece = bytes(MAX_OPTION_DATA)
    for _ in range(claimed // len(piece)):
        assert events(conn, piece) == []
        assert conn.buffered == 0
    assert isinstance(events(conn, opt(OPT_GO, go_data("disk0")))[0], ExportChosen)


def test_long_export_name_hangs_up():
    conn = new_conn()
    with pytest.raises(NbdProtocolError):
        events(conn, b"IHAVEOPT" + struct.pack(">II", OPT_EXPORT_NAME, 2**31))


def test_bad_option_magic_closes():
    conn = new_conn()
    with pytest.raises(NbdProtocolError, match="option magic"):
        events(conn, b"IHAVEOPX" + bytes(8))


# --- transmission: parsing and replies ---------------------------------------------------------


def test_read_simple_reply_bytes():
    conn = connected()
    (ev,) = events(conn, req(READ, 512, 4, handle=0xDEADBEEF))
    assert ev == Request(Command.READ, 0xDEADBEEF, 512, 4, 0)
    conn.reply_read(ev, b"abcd")
    assert drain(conn) == struct.pack(">IIQ", 0x67446698, 0, 0xDEADBEEF) + b"abcd"


def test_read_structured_reply_is_one_offset_data_chunk():
    conn = connected(structured=True)
    (ev,) = events(conn, req(READ, 512, 4, flags=DF))
    conn.reply_read(ev, b"abcd")
    flags, kind, handle, payload = chunk(drain(conn))
    assert (flags, kind, handle) == (1, 1, 7)
    assert payload == struct.pack(">Q", 512) + b"abcd"


def test_zero_length_structured_read_is_a_none_chunk():
    conn = connected(structured=True)
    (ev,) = events(conn, req(READ, 0, 0))
    conn.reply_read(ev, b"")
    assert chunk(drain(conn)) == (1, 0, 7, b"")


def test_error_replies_simple_and_structured():
    conn = connected()
    (ev,) = events(conn, req(READ, 0, 8))
    conn.reply_error(ev, Errno.EIO, "disk failed")
    assert simple_reply(drain(conn)) == (5, 7, b"")
    conn = connected(structured=True)
    (ev,) = events(conn, req(WRITE, 0, 2) + b"hi")
    conn.reply_error(ev, Errno.EIO, "disk failed")
    flags, kind, _, payload = chunk(drain(conn))
    assert (flags, kind) == (1, 2**15 + 1)
    assert payload == struct.pack(">IH", 5, 11) + b"disk failed"


def test_success_of_non_read_is_a_simple_reply_even_when_structured():
    conn = connected(structured=True)
    (ev,) = events(conn, req(FLUSH))
    conn.reply_ok(ev)
    assert simple_reply(drain(conn)) == (0, 7, b"")


def test_write_payload_delivered_one_byte_at_a_time():
    conn = connected()
    stream = req(WRITE, 4096, 5, flags=FUA) + b"hello" + req(FLUSH, handle=8)
    got: list[object] = []
    for b in stream:
        got += events(conn, bytes([b]))
    assert got == [
        Request(Command.WRITE, 7, 4096, 5, FUA, b"hello"),
        Request(Command.FLUSH, 8, 0, 0, 0),
    ]
    assert got[0].fua and got[0].data == b"hello"


def test_write_zeroes_accepts_no_hole_and_refuses_fast_zero():
    conn = connected()
    (ev,) = events(conn, req(WZ, 0, 4096, flags=NO_HOLE | FUA))
    assert ev.command is Command.WRITE_ZEROES and ev.no_hole and ev.fua
    (ev,) = events(conn, req(WZ, 0, 4096, flags=FAST_ZERO))
    assert isinstance(ev, Rejected) and ev.error is Errno.EINVAL


def test_trim_larger_than_max_request_is_fine():
    (ev,) = events(connected(), req(TRIM, 0, SIZE))
    assert ev == Request(Command.TRIM, 7, 0, SIZE, 0)


@pytest.mark.parametrize(
    ("kind", "error"),
    [(READ, Errno.EINVAL), (WRITE, Errno.ENOSPC), (WZ, Errno.ENOSPC), (TRIM, Errno.EINVAL)],
)
def test_past_the_end_is_refused_and_nothing_is_asked(kind: int, error: Errno):
    conn = connected()
    payload = bytes(1024) if kind == WRITE else b""
    evs = events(conn, req(kind, SIZE - 512, 1024) + payload + req(FLUSH, handle=8))
    assert [type(e) for e in evs] == [Rejected, Request]
    assert evs[0].error is error
    assert simple_reply(drain(conn)) == (error, 7, b"")


def test_offset_near_2_to_64_does_not_wrap():
    (ev,) = events(connected(), req(READ, 2**64 - 1, 1))
    assert isinstance(ev, Rejected) and ev.error is Errno.EINVAL


def test_oversized_read_is_refused_without_allocating():
    conn = connected(ExportInfo("disk0", 2**40))
    (ev,) = events(conn, req(READ, 0, 2**32 - 1))
    assert isinstance(ev, Rejected) and ev.error is Errno.EINVAL
    assert conn.buffered == 0


def test_oversized_write_payload_is_dropped_as_it_arrives():
    conn = connected(ExportInfo("disk0", 2**40))
    claimed = 16 * MiB
    (ev,) = events(conn, req(WRITE, 0, claimed))
    assert isinstance(ev, Rejected) and "exceeds the maximum" in ev.reason
    assert simple_reply(drain(conn))[0] == Errno.EINVAL
    piece = bytes(256 << 10)
    for _ in range(claimed // len(piece)):
        assert events(conn, piece) == []
        assert conn.buffered == 0
    (ev,) = events(conn, req(READ, 0, 1))
    assert isinstance(ev, Request)


def test_read_only_export_refuses_writes_with_eperm():
    conn = connected(ExportInfo("ro", SIZE, read_only=True), name="ro")
    evs = events(conn, req(WRITE, 0, 3) + b"abc" + req(TRIM, 0, 512) + req(WZ, 0, 512))
    assert [e.error for e in evs] == [Errno.EPERM] * 3
    (ev,) = events(conn, req(FLUSH))
    assert isinstance(ev, Request)


@pytest.mark.parametrize(("kind", "flags"), [(CACHE, 0), (7, 0), (99, 0), (READ, 1 << 9)])
def test_unknown_command_or_flag_is_einval(kind: int, flags: int):
    (ev,) = events(connected(), req(kind, 0, 512, flags=flags))
    assert isinstance(ev, Rejected) and ev.error is Errno.EINVAL


def test_df_needs_structured_replies():
    (ev,) = events(connected(), req(READ, 0, 512, flags=DF))
    assert isinstance(ev, Rejected)


def test_bad_request_magic_closes():
    conn = connected()
    with pytest.raises(NbdProtocolError, match="request magic"):
        events(conn, b"\x00" * 28)
    assert conn.phase is Phase.CLOSED


@pytest.mark.parametrize("cut", [1, 27, 28, 30])
def test_end_of_file_inside_a_message_is_a_violation(cut: int):
    conn = connected()
    conn.receive_data((req(WRITE, 0, 8) + b"12345678")[:cut])
    conn.receive_data(b"")
    with pytest.raises(NbdProtocolError, match="inside a message"):
        events(conn)


def test_end_of_file_between_messages_is_a_hard_disconnect():
    conn = connected()
    conn.receive_data(b"")
    (ev,) = events(conn)
    assert ev == Disconnect("client closed the connection", soft=False)


def test_disc_is_a_soft_disconnect():
    (ev,) = events(connected(), req(DISC))
    assert ev.soft


def test_reply_misuse_is_a_local_error():
    conn = connected()
    (write,) = events(conn, req(WRITE, 0, 1) + b"x")
    with pytest.raises(LocalProtocolError):
        conn.reply_read(write, b"x")
    (read,) = events(conn, req(READ, 0, 4))
    with pytest.raises(LocalProtocolError):
        conn.reply_read(read, b"abc")
    with pytest.raises(LocalProtocolError):
        conn.reply_ok(read)
    with pytest.raises(LocalProtocolError):
        new_conn().reply_ok(write)


def test_invalid_configuration_is_refused():
    with pytest.raises(UsageError):
        ServerConnection([])
    with pytest.raises(UsageError):
        ServerConnection([ExportInfo("a\0b", SIZE)])
    with pytest.raises(UsageError):
        ServerConnection([ExportInfo("a", SIZE)], max_request=100)


# --- fuzzing: one-shot reference model vs. the streaming parser -------------------------------


def expected(kind: int, flags: int, offset: int, length: int, size: int) -> Errno | None:
    """What the spec says a header alone earns (non-structured, writable export)."""
    allowed = {READ: FUA, WRITE: FUA, FLUSH: FUA, TRIM: FUA, WZ: FUA | NO_HOLE}
    if kind not in allowed or flags & ~allowed[kind]:
        return Errno.EINVAL
    if kind in (READ, WRITE) and length > MAX:
        return Errno.EINVAL
    if kind != FLUSH and offset + length > size:
        return Errno.ENOSPC if kind in (WRITE, WZ) else Errno.EINVAL
    return None


headers = st.tuples(
    st.sampled_from([READ, WRITE, FLUSH, TRIM, WZ, CACHE, 9]),
    st.sampled_from([0, FUA, NO_HOLE, DF, FAST_ZERO, 0x8000]),
    st.one_of(st.integers(0, SIZE), st.integers(0, 2**64 - 1)),
    st.one_of(st.integers(0, 2 * MAX), st.integers(0, 2**32 - 1)),
)


@pytest.mark.timeout(120)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(headers, max_size=12), st.integers(1, 70000))
def test_request_stream_matches_the_reference_model(reqs, piece):
    conn = connected(ExportInfo("disk0", SIZE))
    stream = bytearray()
    want = []
    for handle, (kind, flags, offset, length) in enumerate(reqs):
        # a WRITE's payload is on the wire whatever happens to it; keep claimed sizes sane
        length = min(length, 3 * MAX) if kind == WRITE else length
        stream += req(kind, offset, length, flags, handle)
        if kind == WRITE:
            stream += bytes([handle % 256]) * length
        want.append((handle, expected(kind, flags, offset, length, SIZE)))
    got = []
    for pos in range(0, len(stream), piece):
        got += events(conn, bytes(stream[pos : pos + piece]))
        assert conn.buffered <= 28 + MAX + piece
    assert [(e.handle, e.error if isinstance(e, Rejected) else None) for e in got] == want
    for ev in got:
        if isinstance(ev, Request) and ev.command is Command.WRITE:
            assert ev.data == bytes([ev.handle % 256]) * ev.length


@pytest.mark.timeout(120)
@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.integers(1, 64), st.booleans())
def test_garbage_only_ever_raises_the_protocol_error(junk, piece, in_options):
    conn = new_conn() if in_options else connected()
    try:
        for pos in range(0, len(junk), piece):
            events(conn, junk[pos : pos + piece])
            assert conn.buffered <= 28 + MAX + MAX_OPTION_DATA + piece
            if conn.phase is Phase.CLOSED:
                return
        conn.receive_data(b"")
        events(conn)
    except NbdProtocolError:
        assert conn.phase is Phase.CLOSED


# --- the export: hook ordering and error mapping ------------------------------------------------


@pytest.fixture
def disk(tmp_path):
    d = create_disk(str(tmp_path / "d.raw"), SIZE)
    yield d
    d.close()


def test_hook_runs_before_the_disk_changes(disk):
    seen = []

    def hook(offset, length):
        seen.append((offset, length, disk.read(offset, length)))

    export = Export("d", disk, on_write=hook)
    out = export.execute(Request(Command.WRITE, 1, 4096, 3, 0, b"abc"))
    assert out.error is None
    assert seen == [(4096, 3, b"\0\0\0")]  # the hook saw the old content: write-ahead
    assert disk.read(4096, 3) == b"abc"


def test_failing_hook_means_eio_and_nothing_written(disk):
    def hook(offset, length):
        raise RuntimeError("tracker journal full")

    export = Export("d", disk, on_write=hook)
    out = export.execute(Request(Command.WRITE, 1, 0, 3, 0, b"abc"))
    assert out.error is Errno.EIO and "tracker journal full" in out.message
    assert disk.read(0, 3) == b"\0\0\0"


def test_trim_and_write_zeroes_zero_the_range_and_report_it(disk):
    disk.write(0, b"\xff" * 8192)
    seen = []
    export = Export("d", disk, on_write=lambda o, n: seen.append((o, n)))
    export.execute(Request(Command.TRIM, 1, 0, 4096, 0))
    export.execute(Request(Command.WRITE_ZEROES, 2, 4096, 4096, NO_HOLE))
    export.execute(Request(Command.WRITE_ZEROES, 3, 0, 0, 0))  # empty: nothing to report
    assert seen == [(0, 4096), (4096, 4096)]
    assert disk.read(0, 8192) == bytes(8192)


def test_fua_flushes_before_returning(disk, monkeypatch):
    calls = []
    monkeypatch.setattr(disk, "flush", lambda: calls.append("flush"))
    export = Export("d", disk, on_write=lambda o, n: calls.append("hook"))
    export.execute(Request(Command.WRITE, 1, 0, 1, FUA, b"x"))
    export.execute(Request(Command.WRITE, 2, 0, 1, 0, b"y"))
    assert calls == ["hook", "flush", "hook"]


def test_disk_errors_map_to_nbd_errors(disk, monkeypatch):
    from replication.errors import DiskFullError, DiskIOError

    export = Export("d", disk)

    def full(offset, data):
        raise DiskFullError("no space")

    monkeypatch.setattr(disk, "write", full)
    assert export.execute(Request(Command.WRITE, 1, 0, 1, 0, b"x")).error is Errno.ENOSPC

    def broken(offset, buf):
        raise DiskIOError("read failed")

    monkeypatch.setattr(disk, "read_into", broken)
    assert export.execute(Request(Command.READ, 1, 0, 1, 0)).error is Errno.EIO


def test_a_read_only_disk_is_served_read_only(tmp_path):
    from replication.disks import open_disk

    create_disk(str(tmp_path / "r.raw"), SIZE).close()
    with open_disk(str(tmp_path / "r.raw")) as d:
        assert Export("r", d).info.read_only


# --- the threaded server against hostile clients on a real socket -----------------------------


class RawClient:
    """Just enough of an NBD client to misbehave on purpose."""

    def __init__(self, address: str | tuple[str, int]):
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(address)

    def recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            more = self.sock.recv(n - len(buf))
            if not more:
                raise EOFError(f"closed after {len(buf)} of {n} bytes")
            buf += more
        return buf

    def handshake(self, name: str = "disk0") -> None:
        assert self.recv_exact(18) == b"NBDMAGICIHAVEOPT\x00\x03"
        self.sock.sendall(struct.pack(">I", 3) + opt(OPT_GO, go_data(name)))
        while True:
            head = self.recv_exact(20)
            _, rep, n = struct.unpack_from(">III", head, 8)
            self.recv_exact(n)
            if rep == REP_ACK:
                return
            assert rep == REP_INFO

    def closed_by_server(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def served(disk):
    seen: list[tuple[int, int]] = []
    server = NbdServer(
        {"disk0": disk},
        on_write=lambda o, n: seen.append((o, n)),
        max_request=MAX,
        handshake_timeout=2.0,
    )
    port = server.start()
    yield server, ("127.0.0.1", port), seen
    server.stop()


def read_back(address, offset: int, length: int) -> bytes:
    c = RawClient(address)
    c.handshake()
    c.sock.sendall(req(READ, offset, length))
    error, _, _ = simple_reply(c.recv_exact(16))
    assert error == 0
    data = c.recv_exact(length)
    c.sock.sendall(req(DISC))
    c.close()
    return data


@pytest.mark.timeout(30)
def test_bad_magic_closes_that_connection_only(served, caplog):
    server, address, _ = served
    c = RawClient(address)
    c.handshake()
    with caplog.at_level(logging.WARNING, logger="replication.nbd"):
        c.sock.sendall(b"\xde\xad\xbe\xef" + bytes(24))
        assert c.closed_by_server()
        _wait_for(lambda: server.statistics().active == 0)
    assert "bad request magic" in caplog.text
    assert server.statistics().protocol_errors == 1
    assert read_back(address, 0, 16) == bytes(16)  # the server still serves


@pytest.mark.timeout(30)
def test_truncated_write_writes_nothing(served, caplog):
    server, address, seen = served
    c = RawClient(address)
    c.handshake()
    with caplog.at_level(logging.WARNING, logger="replication.nbd"):
        c.sock.sendall(req(WRITE, 0, 4096) + b"\x01" * 100)
        c.sock.shutdown(socket.SHUT_WR)
        assert c.closed_by_server()
        _wait_for(lambda: server.statistics().active == 0)
    assert "inside a message" in caplog.text
    assert seen == []
    assert read_back(address, 0, 100) == bytes(100)


@pytest.mark.timeout(30)
def test_oversized_and_out_of_range_writes_get_errors_and_write_nothing(served):
    server, address, seen = served
    c = RawClient(address)
    c.handshake()
    c.sock.sendall(req(WRITE, 0, 2**32 - 1, handle=1))  # claims 4 GiB, sends none
    assert simple_reply(c.recv_exact(16)) == (Errno.EINVAL, 1, b"")
    c.close()
    c = RawClient(address)
    c.handshake()
    c.sock.sendall(req(WRITE, SIZE - 1, 2, handle=2) + b"zz" + req(READ, 0, 2, handle=3))
    assert simple_reply(c.recv_exact(16)) == (Errno.ENOSPC, 2, b"")
    assert simple_reply(c.recv_exact(16)) == (0, 3, b"")
    assert c.recv_exact(2) == b"\0\0"
    c.close()
    assert seen == []
    assert server.statistics().rejected == 2


@pytest.mark.timeout(30)
def test_ack_comes_after_the_hook_and_the_write(served):
    _, address, seen = served
    c = RawClient(address)
    c.handshake()
    c.sock.sendall(req(WRITE, 512, 4, handle=9) + b"data")
    assert simple_reply(c.recv_exact(16)) == (0, 9, b"")
    assert seen == [(512, 4)]
    assert read_back(address, 512, 4) == b"data"
    c.close()


@pytest.mark.timeout(30)
def test_silent_client_is_dropped_after_the_handshake_timeout(served):
    _, address, _ = served
    c = RawClient(address)
    start = time.monotonic()
    c.recv_exact(18)
    assert c.closed_by_server()
    assert 1.5 < time.monotonic() - start < 8


@pytest.mark.timeout(30)
def test_connection_limit(disk):
    server = NbdServer({"disk0": disk}, max_connections=1)
    address = ("127.0.0.1", server.start())
    try:
        first = RawClient(address)
        first.handshake()
        second = RawClient(address)
        assert second.closed_by_server()
        first.close()
    finally:
        server.stop()


@pytest.mark.timeout(30)
def test_stop_disconnects_clients_and_removes_the_unix_socket(disk, tmp_path):
    path = str(tmp_path / "nbd.sock")
    server = NbdServer({"disk0": disk})
    server.serve_unix(path)
    c = RawClient(path)
    c.handshake()
    t = threading.Thread(target=server.stop)
    t.start()
    t.join(10)
    assert not t.is_alive()
    assert c.closed_by_server()
    assert not os.path.exists(path)
    with pytest.raises(UsageError):
        open(path, "w").close()
        NbdServer({"disk0": disk}).serve_unix(path)


def test_on_write_mapping_must_name_known_exports(disk):
    with pytest.raises(UsageError):
        NbdServer({"disk0": disk}, on_write={"other": lambda o, n: None})


def _wait_for(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)

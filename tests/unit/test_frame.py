"""Block frames: layout, round trips, tampering, truncation, hostile bodies."""

from __future__ import annotations

import os
import random
import struct
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest
import xxhash
import zstandard
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replication.errors import (
    ChecksumMismatch,
    ConfigError,
    FrameAuthError,
    FrameError,
    FrameFormatError,
    FrameSequenceError,
    FrameTruncatedError,
    UsageError,
)
from replication.frame import (
    FLAG_COMPRESSED,
    FLAG_MARKER,
    FRAME_MAGIC,
    FRAME_VERSION,
    HEADER_SIZE,
    MAX_FRAME_LENGTH,
    PAYLOAD_OVERHEAD,
    SUPPORTED_FRAME_VERSIONS,
    DecodedFrame,
    FrameDecoder,
    FrameEncoder,
    FrameHeader,
    frame_size,
    max_frame_size,
    peek_header,
)
from replication.keys import derive_session_key
from tests.helpers import realistic_bytes

SECRET = bytes(range(1, 33))
DISK = bytes.fromhex("0123456789abcdef0123456789abcdef")
OTHER_DISK = bytes(16)
TEXT = b"the quick brown fox jumps over the lazy dog; replication frame test line\n" * 200
U64_MAX = (1 << 64) - 1


def make_pair(**kwargs: object) -> tuple[FrameEncoder, FrameDecoder]:
    return FrameEncoder(SECRET, DISK, **kwargs), FrameDecoder(SECRET, DISK)  # type: ignore[arg-type]


def data_of(kind: str, size: int, seed: int) -> bytes:
    if kind == "zeros":
        return bytes(size)
    if kind == "random":
        return random.Random(seed).randbytes(size)
    if kind == "text":
        return (TEXT * (size // len(TEXT) + 1))[:size]
    return bytes(realistic_bytes(size, seed))


# --- layout -------------------------------------------------------------------------------


def test_constants() -> None:
    assert FRAME_MAGIC == b"RPLF"
    assert FRAME_VERSION == 1
    assert SUPPORTED_FRAME_VERSIONS == (1,)
    assert FRAME_VERSION in SUPPORTED_FRAME_VERSIONS
    assert HEADER_SIZE == 64
    assert PAYLOAD_OVERHEAD == 32


def test_byte_layout_matches_docs() -> None:
    salt = bytes(range(200, 216))
    enc = FrameEncoder(SECRET, DISK, salt=salt)
    frame = enc.encode(0x0102030405060708, 0x1122334455667788, TEXT)
    assert frame[0:4] == b"RPLF"
    assert frame[4] == 1
    assert frame[5] == FLAG_COMPRESSED
    assert frame[6] == 1
    assert frame[7] == 64
    assert frame[8:24] == DISK
    assert frame[24:40] == salt
    assert frame[40:48] == bytes.fromhex("0102030405060708")
    assert frame[48:56] == bytes.fromhex("1122334455667788")
    assert int.from_bytes(frame[56:60], "big") == len(TEXT)
    payload_length = int.from_bytes(frame[60:64], "big")
    assert len(frame) == 64 + payload_length
    # AEAD: key from HKDF(salt), nonce = 4 zero bytes + seq BE, AD = the whole header.
    aead = AESGCM(derive_session_key(SECRET, salt))
    nonce = bytes(4) + frame[40:48]
    plain = aead.decrypt(nonce, frame[64:], frame[:64])
    assert plain[:16] == xxhash.xxh3_128_digest(TEXT)
    assert zstandard.ZstdDecompressor().decompress(plain[16:]) == TEXT


def test_raw_layout() -> None:
    data = os.urandom(1000)
    enc = FrameEncoder(SECRET, DISK)
    frame = enc.encode(0, 0, data)
    assert frame[5] == 0
    assert len(frame) == 64 + 32 + 1000
    aead = AESGCM(derive_session_key(SECRET, enc.session_salt))
    plain = aead.decrypt(bytes(12), frame[64:], frame[:64])
    assert plain == xxhash.xxh3_128_digest(data) + data


def test_header_pack_unpack_round_trip() -> None:
    h = FrameHeader(
        disk_id=DISK,
        salt=bytes(16),
        seq=U64_MAX,
        offset=U64_MAX - 10,
        length=10,
        payload_length=42,
    )
    h.validate()
    packed = h.pack()
    assert len(packed) == HEADER_SIZE
    assert FrameHeader.unpack(packed) == h
    assert peek_header(packed) == h
    assert frame_size(h) == 64 + 42
    buf = bytearray(70)
    h.pack_into(buf, 3)
    assert bytes(buf[3:67]) == packed


def test_peek_header_needs_only_the_header() -> None:
    enc, _ = make_pair()
    frame = enc.encode(5, 4096, TEXT)
    header = peek_header(frame[:HEADER_SIZE])
    assert header.seq == 5 and header.offset == 4096 and header.length == len(TEXT)
    assert frame_size(header) == len(frame)
    with pytest.raises(FrameTruncatedError):
        header.validate(len(frame) - 1)
    header.validate(len(frame))
    assert peek_header(memoryview(frame)) == header
    assert peek_header(bytearray(frame)) == header


GOOD = FrameHeader(disk_id=DISK, salt=bytes(16), seq=1, offset=0, length=100, payload_length=132)


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"magic": b"RPLX"}, FrameFormatError, "magic"),
        ({"version": 0}, FrameFormatError, "version"),
        ({"version": 2}, FrameFormatError, "version"),
        ({"header_length": 65}, FrameFormatError, "header length"),
        ({"flags": 0x04}, FrameFormatError, "flags"),
        ({"codec": 0}, FrameFormatError, "codec"),
        ({"codec": 2}, FrameFormatError, "codec"),
        ({"length": 0, "payload_length": 32}, FrameFormatError, "length"),
        (
            {"length": MAX_FRAME_LENGTH + 1, "payload_length": MAX_FRAME_LENGTH + 33},
            FrameFormatError,
            "length",
        ),
        ({"payload_length": 131}, FrameFormatError, "payload length"),
        ({"payload_length": 133}, FrameFormatError, "payload length"),
        ({"flags": 1, "payload_length": 132}, FrameFormatError, "compressed"),
        ({"flags": 1, "payload_length": 32}, FrameFormatError, "compressed"),
        ({"offset": U64_MAX - 98}, FrameFormatError, "overflow"),
        ({"disk_id": b"short"}, FrameFormatError, "16 bytes"),
        ({"seq": -1}, FrameFormatError, "seq"),
    ],
)
def test_validate_rejects(changes: dict[str, object], error: type[Exception], match: str) -> None:
    GOOD.validate()
    with pytest.raises(error, match=match):
        replace(GOOD, **changes).validate()  # type: ignore[arg-type]


def test_validate_edges_accepted() -> None:
    replace(GOOD, offset=U64_MAX - 99).validate()  # last byte at 2**64 - 1
    replace(GOOD, flags=1, payload_length=33).validate()  # 1-byte body
    replace(GOOD, flags=1, payload_length=131).validate()  # body one byte shorter
    big = MAX_FRAME_LENGTH
    replace(GOOD, length=big, payload_length=big + 32).validate()


def test_validate_buffer_length() -> None:
    with pytest.raises(FrameTruncatedError, match="header"):
        GOOD.validate(63)
    with pytest.raises(FrameTruncatedError, match="payload"):
        GOOD.validate(64 + 131)
    GOOD.validate(64 + 132)


# --- round trips ---------------------------------------------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(["zeros", "random", "text", "mix"]),
    size=st.integers(1, 256 * 1024),
    seed=st.integers(0, 2**32),
    seq=st.integers(0, U64_MAX),
    offset=st.integers(0, 1 << 63),
    level=st.sampled_from([-5, -1, 1, 3]),
)
def test_round_trip_sizes(
    kind: str, size: int, seed: int, seq: int, offset: int, level: int
) -> None:
    data = data_of(kind, size, seed)
    enc, dec = make_pair(level=level)
    frame = enc.encode(seq, offset, data)
    out = dec.decode(frame)
    assert isinstance(out, DecodedFrame)
    assert out.data == data and isinstance(out.data, bytes)
    assert (out.seq, out.offset) == (seq, offset)
    assert out.header.length == size
    assert out.compressed == out.header.compressed
    assert len(frame) <= max_frame_size(size)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(min_size=1, max_size=4096), seq=st.integers(0, U64_MAX))
def test_round_trip_any_bytes(data: bytes, seq: int) -> None:
    enc, dec = make_pair()
    offset = U64_MAX + 1 - len(data)  # the last bytes of the address space
    assert dec.decode(enc.encode(seq, offset, data)).data == data


def test_round_trip_buffer_types() -> None:
    enc, dec = make_pair()
    data = data_of("mix", 100_000, 3)
    for seq, buf in enumerate([data, bytearray(data), memoryview(data)]):
        frame = enc.encode(seq, 0, buf)
        assert dec.decode(frame).data == data
        assert dec.decode(bytearray(frame)).data == data
        assert dec.decode(memoryview(frame)).data == data


def test_incompressible_is_stored_raw() -> None:
    enc, dec = make_pair()
    data = os.urandom(65536)
    frame = enc.encode(0, 0, data)
    header = peek_header(frame)
    assert not header.compressed
    assert header.payload_length == len(data) + PAYLOAD_OVERHEAD
    out = dec.decode(frame)
    assert out.data == data and not out.compressed


def test_text_is_compressed() -> None:
    enc, dec = make_pair()
    frame = enc.encode(0, 0, TEXT)
    assert peek_header(frame).compressed
    assert len(frame) < len(TEXT) // 10
    assert dec.decode(frame).compressed


@pytest.mark.parametrize("size", [1, 2, 100, 4096, 1 << 20])
def test_zero_data(size: int) -> None:
    enc, dec = make_pair()
    frame = enc.encode(0, 0, bytes(size))
    assert dec.decode(frame).data == bytes(size)
    if size >= 100:
        assert peek_header(frame).compressed


def test_max_length_frame() -> None:
    enc, dec = make_pair()
    data = bytes(MAX_FRAME_LENGTH)
    assert dec.decode(enc.encode(0, 0, data)).data == data
    with pytest.raises(UsageError):
        enc.encode(1, 0, bytes(MAX_FRAME_LENGTH + 1))


def test_encode_into_matches_encode() -> None:
    salt = os.urandom(16)
    a = FrameEncoder(SECRET, DISK, salt=salt)
    b = FrameEncoder(SECRET, DISK, salt=salt)
    _, dec = make_pair()
    out = bytearray(max_frame_size(1 << 20))
    for seq, kind in enumerate(["zeros", "random", "text", "mix"]):
        data = data_of(kind, 1 << 20, seq)
        n = b.encode_into(seq, seq << 20, data, out)
        assert bytes(out[:n]) == a.encode(seq, seq << 20, data)
        assert dec.decode(memoryview(out)[:n]).data == data
    with pytest.raises(UsageError, match="buffer"):
        b.encode_into(10, 0, bytes(100), bytearray(max_frame_size(100) - 1))
    assert b.last_seq == 3  # a refused call consumes no seq


def test_encode_batch_matches_encode_one_by_one() -> None:
    """Frames compressed on two pool threads are byte for byte those of encode()."""
    salt = os.urandom(16)
    a = FrameEncoder(SECRET, DISK, salt=salt)
    b = FrameEncoder(SECRET, DISK, salt=salt)
    _, dec = make_pair()
    kinds = ["zeros", "random", "text", "mix"] * 3
    items = [(seq + 1, seq << 20, data_of(kind, 1 << 20, seq)) for seq, kind in enumerate(kinds)]
    with ThreadPoolExecutor(2) as pool:
        batch = b.encode_batch(items[:5], pool.map) + b.encode_batch(items[5:], pool.map)
    assert batch == [a.encode(*item) for item in items]
    assert [dec.decode(f).data for f in batch] == [data for _, _, data in items]
    assert {dec.decode(f).seq for f in batch} == set(range(1, len(items) + 1))
    assert b.last_seq == len(items)


def test_encode_batch_refuses_a_seq_before_compressing_anything() -> None:
    enc = FrameEncoder(SECRET, DISK)
    calls = []

    def run(fn, items):  # a pool's map that records whether it was reached
        calls.append(len(items))
        return map(fn, items)

    enc.encode(5, 0, b"a")
    with pytest.raises(FrameSequenceError):
        enc.encode_batch([(6, 0, b"b"), (6, 0, b"c")], run)
    assert calls == []
    # the seq checked before the refused one is consumed: never sealed twice
    with pytest.raises(FrameSequenceError):
        enc.encode(6, 0, b"b")
    assert len(enc.encode_batch([(7, 0, b"d"), (8, 0, b"e")], run)) == 2 and calls == [2]


def test_encoder_arguments() -> None:
    with pytest.raises(UsageError, match="disk id"):
        FrameEncoder(SECRET, b"short")
    with pytest.raises(ConfigError):
        FrameEncoder(b"short secret", DISK)
    with pytest.raises(UsageError, match="disk id"):
        FrameDecoder(SECRET, b"x" * 17)
    with pytest.raises(ConfigError):
        FrameDecoder(b"")
    enc = FrameEncoder(SECRET, DISK)
    with pytest.raises(UsageError):
        enc.encode(0, 0, b"")
    with pytest.raises(UsageError):
        enc.encode(0, -1, b"x")
    with pytest.raises(UsageError):
        enc.encode(0, U64_MAX, b"xy")
    assert enc.last_seq == -1
    assert enc.disk_id == DISK and len(enc.session_salt) == 16


# --- sequence numbers and nonces -------------------------------------------------------


def test_encoder_refuses_non_increasing_seq() -> None:
    enc = FrameEncoder(SECRET, DISK)
    enc.encode(5, 0, b"a")
    for bad in (5, 4, 0):
        with pytest.raises(FrameSequenceError):
            enc.encode(bad, 0, b"a")
    enc.encode(6, 0, b"a")
    enc.encode(1000, 0, b"a")  # gaps are fine
    with pytest.raises(FrameSequenceError):
        enc.encode(999, 0, b"a")
    enc.encode(U64_MAX, 0, b"a")
    with pytest.raises(FrameSequenceError):
        enc.encode(U64_MAX, 0, b"a")
    with pytest.raises(FrameSequenceError):
        enc.encode(U64_MAX + 1, 0, b"a")


def test_negative_seq_refused() -> None:
    with pytest.raises(FrameSequenceError):
        FrameEncoder(SECRET, DISK).encode(-1, 0, b"a")


def test_nonce_uniqueness_across_sessions() -> None:
    """Two encoders on one secret never produce the same (key, nonce) pair."""
    seen: set[tuple[bytes, bytes]] = set()
    salts = set()
    for _ in range(50):
        enc = FrameEncoder(SECRET, DISK)
        salts.add(enc.session_salt)
        key = derive_session_key(SECRET, enc.session_salt)
        for seq in range(20):
            frame = enc.encode(seq, 0, b"same data every time")
            nonce = bytes(4) + frame[40:48]
            assert nonce == bytes(4) + seq.to_bytes(8, "big")
            assert (key, nonce) not in seen
            seen.add((key, nonce))
    assert len(salts) == 50
    assert len(seen) == 50 * 20


def test_same_data_different_sessions_differ() -> None:
    a = FrameEncoder(SECRET, DISK).encode(0, 0, TEXT)
    b = FrameEncoder(SECRET, DISK).encode(0, 0, TEXT)
    assert a[64:] != b[64:]


def test_decoder_handles_many_sessions_with_bounded_cache() -> None:
    dec = FrameDecoder(SECRET, DISK, key_cache_size=2)
    encoders = [FrameEncoder(SECRET, DISK) for _ in range(5)]
    for round_ in range(3):
        for i, enc in enumerate(encoders):
            data = f"session {i} round {round_}".encode()
            assert dec.decode(enc.encode(round_, 0, data)).data == data
            assert len(dec._keys) <= 2


# --- authentication --------------------------------------------------------------------


HEADER_FIELDS = {  # name: (start, end) byte range in the header
    "magic": (0, 4),
    "version": (4, 5),
    "flags": (5, 6),
    "codec": (6, 7),
    "header_length": (7, 8),
    "disk_id": (8, 24),
    "salt": (24, 40),
    "seq": (40, 48),
    "offset": (48, 56),
    "length": (56, 60),
    "payload_length": (60, 64),
}


@pytest.mark.parametrize("field", list(HEADER_FIELDS))
@pytest.mark.parametrize("kind", ["text", "random"])
def test_every_header_bit_is_protected(field: str, kind: str) -> None:
    enc, _ = make_pair()
    dec = FrameDecoder(SECRET)  # no disk id: the tag alone must catch disk id changes
    frame = enc.encode(7, 1 << 20, data_of(kind, 3000, 1))
    start, end = HEADER_FIELDS[field]
    for pos in range(start, end):
        for bit in range(8):
            bad = bytearray(frame)
            bad[pos] ^= 1 << bit
            with pytest.raises(FrameError) as info:
                dec.decode(bad)
            assert type(info.value) in (FrameAuthError, FrameFormatError, FrameTruncatedError)
            if field in ("disk_id", "salt", "seq", "offset"):
                assert type(info.value) is FrameAuthError, (field, pos, bit)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("disk_id", OTHER_DISK),
        ("salt", bytes(16)),
        ("seq", 8),
        ("offset", 0),
        ("length", 3001),  # compressed: any length > body length passes validation
    ],
)
def test_header_field_rebinding_fails_auth(field: str, value: object) -> None:
    enc = FrameEncoder(SECRET, DISK)
    frame = enc.encode(7, 1 << 20, TEXT[:3000])
    header = peek_header(frame)
    assert header.compressed
    forged = replace(header, **{field: value})
    forged.validate()
    with pytest.raises(FrameAuthError):
        FrameDecoder(SECRET).decode(forged.pack() + frame[64:])


def test_every_payload_byte_is_protected() -> None:
    enc, dec = make_pair()
    frame = enc.encode(1, 0, TEXT[:500])
    for pos in range(HEADER_SIZE, len(frame)):
        bad = bytearray(frame)
        bad[pos] ^= 0x80
        with pytest.raises(FrameAuthError):
            dec.decode(bad)


def test_wrong_key() -> None:
    enc = FrameEncoder(os.urandom(32), DISK)
    frame = enc.encode(0, 0, TEXT)
    with pytest.raises(FrameAuthError, match="authentication"):
        FrameDecoder(SECRET, DISK).decode(frame)


def test_wrong_context() -> None:
    enc = FrameEncoder(SECRET, DISK, context=b"another protocol")
    with pytest.raises(FrameAuthError):
        FrameDecoder(SECRET).decode(enc.encode(0, 0, TEXT))


def test_wrong_disk_id() -> None:
    enc = FrameEncoder(SECRET, OTHER_DISK)
    frame = enc.encode(0, 0, TEXT)
    with pytest.raises(FrameAuthError, match="disk"):
        FrameDecoder(SECRET, DISK).decode(frame)
    assert FrameDecoder(SECRET).decode(frame).header.disk_id == OTHER_DISK


def test_swapped_payloads_fail() -> None:
    enc, dec = make_pair()
    a = enc.encode(1, 0, TEXT[:1000])
    b = enc.encode(2, 0, TEXT[1:1001])
    with pytest.raises(FrameAuthError):
        dec.decode(a[:64] + b[64:])


# --- truncation and garbage ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["text", "random"])
def test_every_truncation(kind: str) -> None:
    enc, dec = make_pair()
    frame = enc.encode(3, 512, data_of(kind, 300, 2))
    for n in range(len(frame)):
        with pytest.raises((FrameTruncatedError, FrameFormatError)):
            dec.decode(frame[:n])
    for n in range(HEADER_SIZE, len(frame)):
        with pytest.raises(FrameTruncatedError):
            dec.decode(frame[:n])
    assert dec.decode(frame).seq == 3


def test_short_buffer_with_bad_magic_is_format_error() -> None:
    dec = FrameDecoder(SECRET)
    with pytest.raises(FrameFormatError, match="magic"):
        dec.decode(b"XX")
    with pytest.raises(FrameFormatError, match="version"):
        dec.decode(b"RPLF\x09")
    with pytest.raises(FrameTruncatedError):
        dec.decode(b"RPL")
    with pytest.raises(FrameTruncatedError):
        dec.decode(b"")


def test_trailing_data_rejected() -> None:
    enc, dec = make_pair()
    frame = enc.encode(0, 0, TEXT)
    with pytest.raises(FrameFormatError, match="trailing"):
        dec.decode(frame + b"\0")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_raises_only_frame_errors(buf: bytes) -> None:
    with pytest.raises(FrameError):
        FrameDecoder(SECRET).decode(buf)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=8, max_size=200))
def test_garbage_after_valid_prefix(tail: bytes) -> None:
    with pytest.raises((FrameFormatError, FrameTruncatedError, FrameAuthError)):
        FrameDecoder(SECRET).decode(b"RPLF\x01" + tail)


# --- bodies with a valid tag that an honest encoder never makes -----------------------------


def seal(header: FrameHeader, digest: bytes, body: bytes) -> tuple[bytes, FrameDecoder]:
    enc = FrameEncoder(SECRET, DISK, salt=header.salt)
    return enc._seal(header, digest, body), FrameDecoder(SECRET, DISK)


def hdr(length: int, body: bytes, *, compressed: bool) -> FrameHeader:
    return FrameHeader(
        disk_id=DISK,
        salt=bytes(range(16)),
        seq=1,
        offset=0,
        length=length,
        payload_length=len(body) + PAYLOAD_OVERHEAD,
        flags=FLAG_COMPRESSED if compressed else 0,
    )


def test_seal_matches_encode() -> None:
    enc = FrameEncoder(SECRET, DISK, salt=bytes(range(16)))
    frame = enc.encode(1, 0, TEXT)
    header = peek_header(frame)
    body = zstandard.ZstdCompressor(level=1, write_checksum=False).compress(TEXT)
    assert enc._seal(header, xxhash.xxh3_128_digest(TEXT), body) == frame


@pytest.mark.parametrize("compressed", [False, True])
def test_checksum_mismatch(compressed: bool) -> None:
    data = TEXT[:5000]
    body = zstandard.ZstdCompressor().compress(data) if compressed else data
    bad_digest = xxhash.xxh3_128_digest(data + b"!")
    frame, dec = seal(hdr(len(data), body, compressed=compressed), bad_digest, body)
    with pytest.raises(ChecksumMismatch):
        dec.decode(frame)
    good, dec = seal(
        hdr(len(data), body, compressed=compressed), xxhash.xxh3_128_digest(data), body
    )
    assert dec.decode(good).data == data


@pytest.mark.parametrize(
    ("body", "length", "match"),
    [
        (b"not a zstd frame at all", 1000, "bad zstd body"),
        (zstandard.ZstdCompressor().compress(bytes(999)), 1000, "claims 999"),
        (zstandard.ZstdCompressor().compress(bytes(1001)), 1000, "claims 1001"),
        (
            zstandard.ZstdCompressor(write_content_size=False).compress(bytes(999)),
            1000,
            "decompressed to 999",
        ),
        (
            zstandard.ZstdCompressor(write_content_size=False).compress(bytes(1001)),
            1000,
            "bad zstd body",
        ),
        (zstandard.ZstdCompressor().compress(bytes(1000)) + b"\0", 1000, "bad zstd body"),
        (zstandard.ZstdCompressor().compress(bytes(1000)) * 2, 1000, "bad zstd body"),
    ],
    ids=["garbage", "claims-less", "claims-more", "short", "long", "extra-byte", "two-frames"],
)
def test_hostile_zstd_body(body: bytes, length: int, match: str) -> None:
    frame, dec = seal(hdr(length, body, compressed=True), bytes(16), body)
    with pytest.raises(FrameFormatError, match=match):
        dec.decode(frame)


def _zstd_of_zeros(total: int, *, content_size: bool) -> bytes:
    cctx = zstandard.ZstdCompressor(write_content_size=content_size)
    obj = cctx.compressobj(size=total if content_size else -1)
    chunk = bytes(1 << 20)
    parts = [obj.compress(chunk) for _ in range(total // len(chunk))]
    parts.append(obj.flush())
    return b"".join(parts)


@pytest.mark.parametrize("content_size", [True, False])
def test_decompression_bomb_is_bounded(content_size: bool) -> None:
    """A 1 GiB zstd bomb in a 1 MiB frame never makes the decoder allocate more than ~1 MiB."""
    body = _zstd_of_zeros(1 << 30, content_size=content_size)
    length = 1 << 20
    assert len(body) < length
    frame, dec = seal(hdr(length, body, compressed=True), bytes(16), body)
    tracemalloc.start()
    try:
        with pytest.raises(FrameFormatError):
            dec.decode(frame)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * length


def test_claimed_content_size_beyond_max_is_format_error() -> None:
    body = _zstd_of_zeros(MAX_FRAME_LENGTH + (1 << 20), content_size=True)
    frame, dec = seal(hdr(MAX_FRAME_LENGTH, body, compressed=True), bytes(16), body)
    with pytest.raises(FrameFormatError, match="claims"):
        dec.decode(frame)


def test_header_struct_is_big_endian() -> None:
    packed = replace(GOOD, seq=1, offset=2, length=3, payload_length=35).pack()
    assert struct.unpack(">Q", packed[40:48]) == (1,)
    assert struct.unpack(">Q", packed[48:56]) == (2,)
    assert struct.unpack(">I", packed[56:60]) == (3,)
    assert struct.unpack(">I", packed[60:64]) == (35,)


# --- marker frames ---------------------------------------------------------------------


def test_a_marker_frame_round_trips_and_says_it_is_a_marker() -> None:
    enc = FrameEncoder(SECRET, DISK)
    record = b'{"type": "epoch-end", "epoch": 7}'
    block = enc.encode(1, 65536, b"x" * 4096)
    marker = enc.encode_marker(2, record)
    dec = FrameDecoder(SECRET, DISK)
    assert not dec.decode(block).marker
    got = dec.decode(marker)
    assert got.marker and got.data == record and got.offset == 0 and got.seq == 2


def test_the_marker_flag_is_authenticated() -> None:
    enc = FrameEncoder(SECRET, DISK)
    frame = bytearray(enc.encode(1, 0, b"x" * 4096))
    frame[5] |= FLAG_MARKER  # a relay turning a block into a marker (or back) is caught
    with pytest.raises(FrameAuthError):
        FrameDecoder(SECRET, DISK).decode(bytes(frame))


def test_a_marker_away_from_offset_zero_is_malformed() -> None:
    enc = FrameEncoder(SECRET, DISK)
    frame = bytearray(enc.encode_marker(1, b"{}"))
    struct.pack_into(">Q", frame, 48, 4096)
    with pytest.raises(FrameFormatError, match="marker"):
        FrameDecoder(SECRET, DISK).decode(bytes(frame))

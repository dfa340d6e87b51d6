"""Block frames: one block (or run of blocks) of a disk, compressed, encrypted, bound.

A frame carries ``length`` plaintext bytes that belong at byte ``offset`` of the
disk ``disk_id``. The full layout is in ``docs/protocol.md`` ("Block frame"); in
short, all integers are **big-endian** and a frame is a 64-byte header followed by
the AES-256-GCM ciphertext and its 16-byte tag::

    0   4  magic  b"RPLF"          24  16  session salt
    4   1  version (1)             40   8  seq
    5   1  flags (bit 0: zstd,     48   8  offset
             bit 1: marker,
             bit 2: ordered)
    6   1  codec id (1)            56   4  length (plaintext bytes)
    7   1  header length (64)      60   4  payload length (ciphertext + tag)
    8  16  disk id                 64   .. payload

* Encrypted plaintext = XXH3-128(data) (16 bytes, canonical) || body, where body is
  one zstd frame of ``data`` (flag set) or ``data`` itself (flag clear: the data did
  not shrink). The digest is inside the ciphertext, so a relay never sees anything
  derived from the plaintext except its compressed size.
* Associated data = the whole 64-byte header: every field is authenticated.
* Key = HKDF-SHA256(shared secret, salt=session salt) (:mod:`replication.keys`); each
  :class:`FrameEncoder` is one session with a fresh random salt. An *ordered* session
  (flag ORDERED) puts its order number in the salt's first 8 bytes (big-endian) and
  randomness in the other 8: authenticated twice (associated data, and the key),
  so a relay can neither change nor forge it (:mod:`replication.ordering`).
* Nonce = 4 zero bytes || seq (u64 big-endian). An encoder refuses a seq that is not
  greater than the last one it encoded, so a (key, nonce) pair is never reused.

Errors: a malformed header is :class:`FrameFormatError`, a short buffer
:class:`FrameTruncatedError`, a failed tag (tampering, wrong key, another disk id)
:class:`FrameAuthError`, bad decompression :class:`FrameFormatError` and a digest
mismatch :class:`ChecksumMismatch`.

Encoders and decoders are not thread-safe (they reuse a zstd context): use one per
thread.
"""

from __future__ import annotations

import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

import xxhash
import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import (
    ChecksumMismatch,
    FrameAuthError,
    FrameFormatError,
    FrameSequenceError,
    FrameTruncatedError,
    UsageError,
)
from .keys import DEFAULT_CONTEXT, SALT_SIZE, derive_session_key, new_salt
from .ordering import ORDER_SIZE, ordered_salt

__all__ = [
    "CODEC_ZSTD_AES256GCM",
    "DIGEST_SIZE",
    "DISK_ID_SIZE",
    "FLAG_COMPRESSED",
    "FLAG_MARKER",
    "FLAG_ORDERED",
    "FRAME_MAGIC",
    "FRAME_VERSION",
    "HEADER_SIZE",
    "MAX_FRAME_LENGTH",
    "PAYLOAD_OVERHEAD",
    "SUPPORTED_FRAME_VERSIONS",
    "TAG_SIZE",
    "DecodedFrame",
    "FrameDecoder",
    "FrameEncoder",
    "FrameHeader",
    "frame_size",
    "max_frame_size",
    "peek_header",
]

FRAME_MAGIC: Final = b"RPLF"
#: Version written by this code.
FRAME_VERSION: Final = 1
#: Versions this code decodes.
SUPPORTED_FRAME_VERSIONS: Final = (1,)
#: flags bit 0: the body is a zstd frame (clear: the body is the plaintext itself).
FLAG_COMPRESSED: Final = 0x01
#: flags bit 1: the plaintext is a marker record (an epoch boundary, a tag), not disk
#: content: offset 0, never written to the volume. Inside the AEAD like any frame, so
#: a relay can neither forge nor drop one unnoticed (the seq gap would show).
FLAG_MARKER: Final = 0x02
#: flags bit 2: the session salt starts with the session's order number (u64, >= 1); a
#: master target refuses frames of a session older than the newest of their volume.
#: Sent only when the peers agreed on SESSION_ORDER (older decoders reject the bit).
FLAG_ORDERED: Final = 0x04
_KNOWN_FLAGS: Final = FLAG_COMPRESSED | FLAG_MARKER | FLAG_ORDERED
#: codec id 1: zstd (when flagged) + AES-256-GCM, HKDF-SHA256 keys, XXH3-128 digest.
CODEC_ZSTD_AES256GCM: Final = 1
SUPPORTED_CODECS: Final = (CODEC_ZSTD_AES256GCM,)

_HEADER = struct.Struct(">4sBBBB16s16sQQII")
HEADER_SIZE: Final = _HEADER.size  # 64
DISK_ID_SIZE: Final = 16
DIGEST_SIZE: Final = 16
TAG_SIZE: Final = 16
#: payload length - body length: the digest and the GCM tag.
PAYLOAD_OVERHEAD: Final = DIGEST_SIZE + TAG_SIZE
#: Largest plaintext of one frame (64 MiB).
MAX_FRAME_LENGTH: Final = 64 << 20
_U64_LIMIT: Final = 1 << 64
_NONCE_PREFIX: Final = bytes(4)
_KEY_CACHE_SIZE: Final = 256

assert HEADER_SIZE == 64


def _digest(data: bytes | bytearray | memoryview) -> bytes:
    return xxhash.xxh3_128_digest(data)


def _compress(
    cctx: zstandard.ZstdCompressor, data: bytes | bytearray | memoryview
) -> tuple[bytes, bytes | bytearray | memoryview, int]:
    """``(digest, body, flags)`` of a frame's plaintext: zstd only when it is smaller."""
    digest = _digest(data)
    compressed = cctx.compress(data)
    if len(compressed) < _nbytes(data):
        return digest, compressed, FLAG_COMPRESSED
    return digest, data, 0


def _nonce(seq: int) -> bytes:
    return _NONCE_PREFIX + seq.to_bytes(8, "big")


@dataclass(frozen=True, slots=True)
class FrameHeader:
    """The 64-byte clear header of a frame (all of it is AEAD associated data)."""

    disk_id: bytes
    salt: bytes
    seq: int
    offset: int
    length: int
    payload_length: int
    flags: int = 0
    codec: int = CODEC_ZSTD_AES256GCM
    version: int = FRAME_VERSION
    header_length: int = HEADER_SIZE
    magic: bytes = FRAME_MAGIC

    @property
    def compressed(self) -> bool:
        """Whether the body is a zstd frame."""
        return bool(self.flags & FLAG_COMPRESSED)

    @property
    def marker(self) -> bool:
        """Whether the plaintext is a marker record rather than disk content."""
        return bool(self.flags & FLAG_MARKER)

    @property
    def order(self) -> int | None:
        """The session's order number (ORDERED flag), or None for an unordered session."""
        if not self.flags & FLAG_ORDERED:
            return None
        return int.from_bytes(self.salt[:ORDER_SIZE], "big")

    @property
    def body_length(self) -> int:
        """Bytes of the (compressed or raw) body inside the ciphertext."""
        return self.payload_length - PAYLOAD_OVERHEAD

    def pack(self) -> bytes:
        """Return the header's 64 bytes."""
        return _HEADER.pack(*self._fields())

    def pack_into(self, buf: bytearray | memoryview, offset: int = 0) -> None:
        """Write the header's 64 bytes into ``buf`` at ``offset``."""
        _HEADER.pack_into(buf, offset, *self._fields())

    def _fields(self) -> tuple[object, ...]:
        return (
            self.magic,
            self.version,
            self.flags,
            self.codec,
            self.header_length,
            self.disk_id,
            self.salt,
            self.seq,
            self.offset,
            self.length,
            self.payload_length,
        )

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview) -> FrameHeader:
        """Parse the first 64 bytes of ``buf`` without checking any field.

        Raises :class:`FrameTruncatedError` if ``buf`` is shorter than 64 bytes. Use
        :func:`peek_header` to parse *and* validate.
        """
        if len(buf) < HEADER_SIZE:
            raise FrameTruncatedError(f"frame header truncated: {len(buf)} of {HEADER_SIZE} bytes")
        magic, version, flags, codec, hlen, disk_id, salt, seq, offset, length, plen = (
            _HEADER.unpack_from(buf)
        )
        return cls(
            disk_id=disk_id,
            salt=salt,
            seq=seq,
            offset=offset,
            length=length,
            payload_length=plen,
            flags=flags,
            codec=codec,
            version=version,
            header_length=hlen,
            magic=magic,
        )

    def validate(self, buffer_length: int | None = None) -> None:
        """Raise the typed error for the first invalid field; return if all are valid.

        With ``buffer_length`` (bytes available from the header's start), also raise
        :class:`FrameTruncatedError` if they do not hold the header and the payload.
        """
        self._validate_identity()
        self._validate_sizes()
        if buffer_length is not None:
            if buffer_length < self.header_length:
                raise FrameTruncatedError(
                    f"frame header truncated: {buffer_length} of {self.header_length} bytes"
                )
            if buffer_length < self.header_length + self.payload_length:
                raise FrameTruncatedError(
                    f"frame payload truncated: {buffer_length - self.header_length} of "
                    f"{self.payload_length} bytes"
                )

    def _validate_identity(self) -> None:
        if self.magic != FRAME_MAGIC:
            raise FrameFormatError(f"bad frame magic {bytes(self.magic)!r}")
        if self.version not in SUPPORTED_FRAME_VERSIONS:
            raise FrameFormatError(
                f"unsupported frame version {self.version}",
                hint=f"this build reads versions {SUPPORTED_FRAME_VERSIONS}",
            )
        if self.header_length != HEADER_SIZE:
            raise FrameFormatError(f"bad frame header length {self.header_length}")
        if self.flags & ~_KNOWN_FLAGS:
            raise FrameFormatError(f"unknown frame flags 0x{self.flags:02x}")
        if self.marker and self.offset != 0:
            raise FrameFormatError(f"marker frame at offset {self.offset}, not 0")
        if self.order == 0:
            raise FrameFormatError("frame flags say ORDERED but the session order is 0")
        if self.codec not in SUPPORTED_CODECS:
            raise FrameFormatError(f"unknown frame codec id {self.codec}")
        if len(self.disk_id) != DISK_ID_SIZE or len(self.salt) != SALT_SIZE:
            raise FrameFormatError("frame disk id and salt must be 16 bytes each")
        if not 0 <= self.seq < _U64_LIMIT:
            raise FrameFormatError(f"frame seq {self.seq} out of range")

    def _validate_sizes(self) -> None:
        if not 0 < self.length <= MAX_FRAME_LENGTH:
            raise FrameFormatError(f"frame length {self.length} outside 1..{MAX_FRAME_LENGTH}")
        if self.offset < 0 or self.offset + self.length > _U64_LIMIT:
            raise FrameFormatError(
                f"frame offset {self.offset} + length {self.length} overflows 64 bits"
            )
        body = self.payload_length - PAYLOAD_OVERHEAD
        if self.compressed and not 0 < body < self.length:
            raise FrameFormatError(
                f"compressed frame body of {body} bytes for {self.length} plaintext bytes"
            )
        if not self.compressed and body != self.length:
            raise FrameFormatError(
                f"raw frame payload length {self.payload_length} != length {self.length} "
                f"+ {PAYLOAD_OVERHEAD}"
            )


def _check_prefix(buf: memoryview) -> None:
    """Report a bad magic or version even when the buffer is too short for a header."""
    n = min(len(buf), len(FRAME_MAGIC))
    if bytes(buf[:n]) != FRAME_MAGIC[:n]:
        raise FrameFormatError(f"bad frame magic {bytes(buf[:n])!r}")
    if len(buf) > 4 and buf[4] not in SUPPORTED_FRAME_VERSIONS:
        raise FrameFormatError(f"unsupported frame version {buf[4]}")


def peek_header(buf: bytes | bytearray | memoryview) -> FrameHeader:
    """Parse and validate a frame header without any key (what a relay does).

    ``buf`` needs only the 64 header bytes; whether the payload follows is checked by
    :meth:`FrameDecoder.decode` (or ``header.validate(len(buf))``). Raises
    :class:`FrameFormatError` or :class:`FrameTruncatedError`.
    """
    mv = _byte_view(buf)
    if len(mv) < HEADER_SIZE:
        _check_prefix(mv)
    header = FrameHeader.unpack(mv)
    header.validate()
    return header


def _byte_view(buf: bytes | bytearray | memoryview) -> memoryview:
    mv = memoryview(buf)
    if mv.ndim != 1 or mv.itemsize != 1:
        mv = mv.cast("B")
    return mv


def _nbytes(buf: bytes | bytearray | memoryview) -> int:
    return buf.nbytes if isinstance(buf, memoryview) else len(buf)


def frame_size(header: FrameHeader) -> int:
    """Total bytes of the frame that ``header`` starts (header + payload)."""
    return header.header_length + header.payload_length


def max_frame_size(length: int) -> int:
    """Largest frame that ``length`` plaintext bytes can encode to (for buffers)."""
    return HEADER_SIZE + PAYLOAD_OVERHEAD + length


@dataclass(frozen=True, slots=True)
class DecodedFrame:
    """A verified frame: ``data`` belongs at byte ``offset`` of the header's disk."""

    seq: int
    offset: int
    data: bytes
    compressed: bool
    header: FrameHeader
    #: a marker record (epoch boundary, tag), not disk content: never written
    marker: bool = False
    #: XXH3-128 of ``data`` (canonical form), verified: equal content has an equal
    #: digest, so a digest other than the zero digest of ``len(data)`` proves the data
    #: is not all zeros without scanning it
    digest: bytes = b""


class FrameEncoder:
    """Encode frames for one disk in one session (one salt, one key).

    ``salt`` is for tests and fixtures only: reusing a salt with the same secret
    restarts the nonce sequence of an old key. Leave it ``None`` (a fresh random
    salt) in production. With ``order`` (>= 1) the session is *ordered*: the salt
    starts with it (:func:`replication.ordering.ordered_salt`) and every frame
    carries the ORDERED flag.
    """

    def __init__(
        self,
        secret: bytes,
        disk_id: bytes,
        *,
        level: int = 1,
        salt: bytes | None = None,
        context: bytes = DEFAULT_CONTEXT,
        order: int | None = None,
    ) -> None:
        if len(disk_id) != DISK_ID_SIZE:
            raise UsageError(f"disk id must be {DISK_ID_SIZE} bytes, not {len(disk_id)}")
        if order is not None:
            salt = ordered_salt(order) if salt is None else bytes(salt)
            if int.from_bytes(salt[:ORDER_SIZE], "big") != order:
                raise UsageError(f"salt {salt.hex()} does not start with order {order}")
        self._order_flag = 0 if order is None else FLAG_ORDERED
        self._salt = new_salt() if salt is None else bytes(salt)
        self._aead = AESGCM(derive_session_key(secret, self._salt, context=context))
        self._disk_id = bytes(disk_id)
        try:
            self._cctx = zstandard.ZstdCompressor(level=level, write_checksum=False)
        except zstandard.ZstdError as err:
            raise UsageError(f"bad zstd level {level}: {err}") from err
        self.level = level
        self._last_seq = -1
        self._local = threading.local()  # encode_batch: a compressor per pool thread

    @property
    def session_salt(self) -> bytes:
        """The 16-byte salt of this session (sent in every frame header)."""
        return self._salt

    @property
    def disk_id(self) -> bytes:
        """The disk id written into every frame."""
        return self._disk_id

    @property
    def last_seq(self) -> int:
        """The last sequence number encoded (-1 before the first frame)."""
        return self._last_seq

    def encode(self, seq: int, offset: int, data: bytes | bytearray | memoryview) -> bytes:
        """Return the frame carrying ``data`` (1 B..64 MiB) for byte ``offset``.

        Raises :class:`FrameSequenceError` if ``seq`` is not greater than the last
        encoded one (or outside u64), :class:`UsageError` for a bad length or offset.
        """
        header, digest, body = self._prepare(seq, offset, data)
        header_bytes = header.pack()
        return header_bytes + self._aead.encrypt(_nonce(seq), digest + body, header_bytes)

    def encode_batch(
        self,
        items: list[tuple[int, int, bytes | bytearray | memoryview]],
        run: Callable[..., Iterable[tuple[bytes, bytes | bytearray | memoryview, int]]],
    ) -> list[bytes]:
        """Encode ``(seq, offset, data)`` frames, compressing them concurrently.

        The same frames as :meth:`encode` one by one, in order: every seq is
        checked and consumed first (on an error nothing is returned, and the seqs
        checked before it are never used again), then ``run(fn, items)`` (a
        thread pool's ``map``) hashes and compresses them, each thread with its
        own compressor (zstd and XXH3 release the GIL), then they are encrypted
        in order on this thread.
        """
        for seq, offset, data in items:
            self._check(seq, offset, data)
        bodies = list(run(self._compress_on_thread, [data for _, _, data in items]))
        frames = []
        for (seq, offset, data), (digest, body, flags) in zip(items, bodies, strict=True):
            header = self._header(seq, offset, _nbytes(data), body, flags)
            header_bytes = header.pack()
            frames.append(
                header_bytes + self._aead.encrypt(_nonce(seq), digest + body, header_bytes)
            )
        return frames

    def _compress_on_thread(
        self, data: bytes | bytearray | memoryview
    ) -> tuple[bytes, bytes | bytearray | memoryview, int]:
        cctx = getattr(self._local, "cctx", None)
        if cctx is None:  # one compressor per thread: a ZstdCompressor is not shared
            cctx = self._local.cctx = zstandard.ZstdCompressor(
                level=self.level, write_checksum=False
            )
        return _compress(cctx, data)

    def encode_marker(self, seq: int, record: bytes) -> bytes:
        """Return a marker frame carrying ``record`` (an epoch boundary, a tag)."""
        header, digest, body = self._prepare(seq, 0, record, marker=True)
        header_bytes = header.pack()
        return header_bytes + self._aead.encrypt(_nonce(seq), digest + body, header_bytes)

    def encode_into(
        self, seq: int, offset: int, data: bytes | bytearray | memoryview, out: bytearray
    ) -> int:
        """Like :meth:`encode` but write into ``out``; return the frame's size.

        ``out`` must hold at least :func:`max_frame_size(len(data)) <max_frame_size>`
        bytes; the frame is ``out[:returned size]``. Reusing ``out`` avoids
        allocating fresh pages for every frame.
        """
        n = _nbytes(data)
        if len(out) < max_frame_size(n):
            raise UsageError(f"output buffer of {len(out)} bytes < {max_frame_size(n)}")
        header, digest, body = self._prepare(seq, offset, data)
        view = memoryview(out)
        header.pack_into(view)
        size = frame_size(header)
        self._aead.encrypt_into(
            _nonce(seq), digest + body, view[:HEADER_SIZE], view[HEADER_SIZE:size]
        )
        return size

    def _prepare(
        self, seq: int, offset: int, data: bytes | bytearray | memoryview, *, marker: bool = False
    ) -> tuple[FrameHeader, bytes, bytes | bytearray | memoryview]:
        self._check(seq, offset, data)
        digest, body, flags = _compress(self._cctx, data)
        header = self._header(seq, offset, _nbytes(data), body, flags, marker=marker)
        return header, digest, body

    def _check(self, seq: int, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Validate a frame's arguments and consume its seq (before any encryption)."""
        if isinstance(data, memoryview) and not data.c_contiguous:
            raise UsageError("frame data must be a contiguous buffer")
        length = _nbytes(data)
        if not 0 < length <= MAX_FRAME_LENGTH:
            raise UsageError(f"frame data of {length} bytes outside 1..{MAX_FRAME_LENGTH}")
        if offset < 0 or offset + length > _U64_LIMIT:
            raise UsageError(f"frame offset {offset} + length {length} outside 64 bits")
        if not 0 <= seq < _U64_LIMIT:
            raise FrameSequenceError(f"frame seq {seq} outside 0..2**64-1")
        if seq <= self._last_seq:
            raise FrameSequenceError(
                f"frame seq {seq} not greater than the last encoded seq {self._last_seq}"
            )
        # Consume the seq before anything is encrypted: no two frames share a nonce.
        self._last_seq = seq

    def _header(
        self,
        seq: int,
        offset: int,
        length: int,
        body: bytes | bytearray | memoryview,
        flags: int,
        *,
        marker: bool = False,
    ) -> FrameHeader:
        return FrameHeader(
            disk_id=self._disk_id,
            salt=self._salt,
            seq=seq,
            offset=offset,
            length=length,
            payload_length=_nbytes(body) + PAYLOAD_OVERHEAD,
            flags=flags | (FLAG_MARKER if marker else 0) | self._order_flag,
        )

    def _seal(self, header: FrameHeader, digest: bytes, body: bytes) -> bytes:
        """Internal: encrypt ``digest || body`` under ``header`` (no checks at all).

        Tests use it to build frames an honest encoder never makes (bad digest,
        hostile zstd body) but that carry a valid tag.
        """
        header_bytes = header.pack()
        return header_bytes + self._aead.encrypt(
            _nonce(header.seq), bytes(digest) + bytes(body), header_bytes
        )


class FrameDecoder:
    """Verify and decode frames from any session keyed by ``secret``.

    With ``disk_id``, a frame of another disk raises :class:`FrameAuthError` (it is
    bound to other metadata) before any decryption. Derived keys are cached per
    session salt (LRU of 256). The decoder does not track sequence numbers: replay
    or reordering checks belong to the caller (``DecodedFrame.seq`` and
    ``header.salt`` identify a frame).
    """

    def __init__(
        self,
        secret: bytes,
        disk_id: bytes | None = None,
        *,
        context: bytes = DEFAULT_CONTEXT,
        key_cache_size: int = _KEY_CACHE_SIZE,
    ) -> None:
        if disk_id is not None and len(disk_id) != DISK_ID_SIZE:
            raise UsageError(f"disk id must be {DISK_ID_SIZE} bytes, not {len(disk_id)}")
        # Fail early on a short secret (ConfigError), not on the first frame.
        derive_session_key(secret, bytes(SALT_SIZE), context=context)
        self._secret = bytes(secret)
        self._context = context
        self._disk_id = None if disk_id is None else bytes(disk_id)
        self._keys: OrderedDict[bytes, AESGCM] = OrderedDict()
        self._key_cache_size = max(1, key_cache_size)
        self._dctx = zstandard.ZstdDecompressor()

    def _aead_for(self, salt: bytes) -> AESGCM:
        aead = self._keys.get(salt)
        if aead is not None:
            self._keys.move_to_end(salt)
            return aead
        aead = AESGCM(derive_session_key(self._secret, salt, context=self._context))
        self._keys[salt] = aead
        if len(self._keys) > self._key_cache_size:
            self._keys.popitem(last=False)
        return aead

    def decode(self, frame: bytes | bytearray | memoryview) -> DecodedFrame:
        """Verify ``frame`` (exactly one whole frame) and return its plaintext.

        Raises :class:`FrameFormatError`, :class:`FrameTruncatedError`,
        :class:`FrameAuthError` or :class:`ChecksumMismatch`; never anything else
        for any input bytes.
        """
        mv = _byte_view(frame)
        if len(mv) < HEADER_SIZE:
            _check_prefix(mv)
        header = FrameHeader.unpack(mv)
        header.validate(len(mv))
        size = frame_size(header)
        if len(mv) > size:
            raise FrameFormatError(f"{len(mv) - size} bytes of trailing data after the frame")
        if self._disk_id is not None and header.disk_id != self._disk_id:
            raise FrameAuthError(
                f"frame is for disk {header.disk_id.hex()}, not {self._disk_id.hex()}"
            )
        try:
            plain = self._aead_for(header.salt).decrypt(
                _nonce(header.seq), mv[HEADER_SIZE:size], mv[:HEADER_SIZE]
            )
        except InvalidTag as err:
            raise FrameAuthError(
                f"frame seq {header.seq} failed authentication "
                "(tampered, or encrypted with another secret)"
            ) from err
        body = memoryview(plain)[DIGEST_SIZE:]
        data = self._decompress(header, body) if header.compressed else plain[DIGEST_SIZE:]
        digest = plain[:DIGEST_SIZE]
        if _digest(data) != digest:
            raise ChecksumMismatch(
                f"frame seq {header.seq}: plaintext digest mismatch at offset {header.offset}"
            )
        return DecodedFrame(
            seq=header.seq,
            offset=header.offset,
            data=data,
            compressed=header.compressed,
            header=header,
            marker=header.marker,
            digest=digest,
        )

    def _decompress(self, header: FrameHeader, body: memoryview) -> bytes:
        """Decompress at most ``header.length`` bytes, whatever the zstd frame claims."""
        try:
            claimed = zstandard.frame_content_size(body)
            if claimed not in (-1, header.length):
                raise FrameFormatError(
                    f"zstd body claims {claimed} bytes, header says {header.length}"
                )
            data = self._dctx.decompress(
                body, max_output_size=header.length, allow_extra_data=False
            )
        except zstandard.ZstdError as err:
            raise FrameFormatError(f"frame seq {header.seq}: bad zstd body: {err}") from err
        if len(data) != header.length:
            raise FrameFormatError(
                f"zstd body decompressed to {len(data)} bytes, header says {header.length}"
            )
        return data

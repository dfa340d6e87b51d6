"""Authenticated acknowledgements: a PERSISTED ack only the master target can make.

A source drops its kept frames and clears dirty bits when it hears PERSISTED. The
ack travels through the process server, which must not be able to make one up (or
the source would forget blocks the master target never got). So the master target
adds a MAC to every PERSISTED ack and to every session state it answers::

    key = HKDF-SHA256(ikm = shared secret, salt = session salt, info = "replication ack v1")
    mac = HMAC-SHA256(key, "RPLA" || version 1 || level || seq (u64 BE) || salt || volume)[:16]

The process server has neither the secret nor any derived key: it relays the MAC
unchanged and cannot produce one for another seq, session, volume or level. A MAC
from another session does not verify (another key), nor does an older seq of the
same session presented as a newer one (the seq is inside the MAC). Replaying an
authentic ack of this session is harmless: acks are cumulative (``max``).

``RECEIVED`` acks are made by the process server itself (its spool is fsynced):
nobody else could authenticate them, and the source uses them for its display and
flow only; it never drops a frame or a dirty bit on RECEIVED.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

from .errors import ForgedAckError
from .keys import ACK_CONTEXT, derive_session_key
from .protocol import AckLevel

__all__ = ["MAC_SIZE", "AckAuthenticator"]

#: bytes of an ack's MAC (truncated HMAC-SHA256)
MAC_SIZE = 16
_PREFIX = b"RPLA"
_VERSION = 1
_FIXED = struct.Struct(">4sBBQ")  # prefix, version, level, seq


class AckAuthenticator:
    """Make (master target) or check (source) the MACs of one session's acks."""

    def __init__(self, secret: bytes, volume: str, session: bytes) -> None:
        self.volume = volume
        self.session = bytes(session)
        self._key = derive_session_key(secret, self.session, context=ACK_CONTEXT)

    def mac(self, seq: int, level: AckLevel = AckLevel.PERSISTED) -> bytes:
        """Return the MAC of "this session is ``level`` up to ``seq``"."""
        message = _FIXED.pack(_PREFIX, _VERSION, int(level), seq)
        message += self.session + self.volume.encode()
        return hmac.new(self._key, message, hashlib.sha256).digest()[:MAC_SIZE]

    def check(self, seq: int, level: AckLevel, mac: bytes) -> bool:
        """Return True for an authentic ack, False for one without a MAC.

        An ack without a MAC proves nothing and must not be acted on (a process
        server that restarted has no MAC to relay for its own state). A MAC that is
        present and wrong is a forgery, or a tampered ack: :class:`ForgedAckError`.
        """
        if not mac:
            return False
        if not 0 <= seq < 1 << 64 or not hmac.compare_digest(mac, self.mac(seq, level)):
            raise ForgedAckError(
                f"{level.name} ack of seq {seq} on {self.volume!r} (session "
                f"{self.session.hex()}) does not carry the master target's MAC",
                hint="the process server (or whoever holds its certificate) forged or "
                "altered it; nothing was dropped",
            )
        return True

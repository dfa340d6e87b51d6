"""Shared secrets and per-session frame keys.

Both ends of a replication pair hold one long-term *shared secret* (a file of at
least 32 random bytes, raw or hex). It never encrypts anything itself: every
encoding session draws a fresh random 16-byte *salt* and derives its own
AES-256-GCM key from it with HKDF-SHA256::

    key = HKDF-SHA256(ikm=secret, salt=session_salt, info=context, length=32)

The salt travels in every frame header, so a decoder derives the same key from
the same secret. Because each session has its own key, per-key nonces only have to
be unique within one session (see :mod:`replication.frame`).

The same secret and salt, under another HKDF ``info`` (:data:`ACK_CONTEXT`), key the
MACs of the session's acknowledgements (:mod:`replication.acks`): a process server,
which holds neither the secret nor any derived key, can relay acks but not make them.
"""

from __future__ import annotations

import os
import string
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import ConfigError, UsageError

__all__ = [
    "ACK_CONTEXT",
    "DEFAULT_CONTEXT",
    "KEY_SIZE",
    "MIN_DERIVE_SECRET_SIZE",
    "MIN_SECRET_FILE_SIZE",
    "SALT_SIZE",
    "derive_session_key",
    "load_secret",
    "new_salt",
]

#: HKDF ``info``: binds derived keys to this use, so the same secret can key other things.
DEFAULT_CONTEXT = b"replication frame v1"
#: HKDF ``info`` of the key that authenticates a session's acks (never its frames).
ACK_CONTEXT = b"replication ack v1"
#: Bytes of a derived key (AES-256).
KEY_SIZE = 32
#: Bytes of a session salt.
SALT_SIZE = 16
#: Shortest secret :func:`derive_session_key` accepts (128 bits).
MIN_DERIVE_SECRET_SIZE = 16
#: Shortest secret a secret file may hold (256 bits).
MIN_SECRET_FILE_SIZE = 32
#: A secret file larger than this is surely not a key file.
MAX_SECRET_FILE_SIZE = 4096

_HEX_DIGITS = frozenset(string.hexdigits.encode())


def new_salt() -> bytes:
    """Return a fresh random session salt (16 bytes from the OS CSPRNG)."""
    return os.urandom(SALT_SIZE)


def derive_session_key(secret: bytes, salt: bytes, *, context: bytes = DEFAULT_CONTEXT) -> bytes:
    """Return the 32-byte AES-256-GCM key of the session identified by ``salt``.

    Raises :class:`~replication.errors.ConfigError` if ``secret`` is shorter than
    16 bytes and :class:`~replication.errors.UsageError` if ``salt`` is not 16 bytes.
    """
    if not isinstance(secret, bytes | bytearray | memoryview):
        raise UsageError(f"secret must be bytes, not {type(secret).__name__}")
    if len(secret) < MIN_DERIVE_SECRET_SIZE:
        raise ConfigError(
            f"shared secret is {len(secret)} bytes; at least {MIN_DERIVE_SECRET_SIZE} needed",
            hint="use a file of 32 random bytes, e.g. `head -c 32 /dev/urandom > secret.key`",
        )
    if len(salt) != SALT_SIZE:
        raise UsageError(f"session salt must be {SALT_SIZE} bytes, not {len(salt)}")
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=bytes(salt), info=context)
    return hkdf.derive(bytes(secret))


def load_secret(path: str | os.PathLike[str]) -> bytes:
    """Read a shared secret file: at least 32 raw bytes, or their hex (64+ hex digits).

    Surrounding whitespace around a hex secret is ignored. A file that is all hex
    digits (an even number of them) is always read as hex. Every problem is a
    :class:`~replication.errors.ConfigError` naming the file.
    """
    p = Path(path)
    try:
        with open(p, "rb") as f:
            content = f.read(MAX_SECRET_FILE_SIZE + 1)
    except OSError as err:
        raise ConfigError(f"cannot read secret file {p}: {err.strerror or err}") from err
    if len(content) > MAX_SECRET_FILE_SIZE:
        raise ConfigError(
            f"secret file {p} is larger than {MAX_SECRET_FILE_SIZE} bytes: not a key file"
        )
    stripped = content.strip()
    if stripped and len(stripped) % 2 == 0 and all(b in _HEX_DIGITS for b in stripped):
        secret = bytes.fromhex(stripped.decode("ascii"))
        kind = "hex secret"
    else:
        secret = content
        kind = "secret"
    if len(secret) < MIN_SECRET_FILE_SIZE:
        raise ConfigError(
            f"{kind} in {p} is {len(secret)} bytes; at least {MIN_SECRET_FILE_SIZE} needed",
            hint="use `head -c 32 /dev/urandom > FILE` or `openssl rand -hex 32 > FILE`",
        )
    return secret

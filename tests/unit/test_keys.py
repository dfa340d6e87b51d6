"""Shared secrets and HKDF session keys."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from replication.errors import ConfigError, UsageError
from replication.keys import (
    DEFAULT_CONTEXT,
    KEY_SIZE,
    SALT_SIZE,
    derive_session_key,
    load_secret,
    new_salt,
)

SECRET = bytes(range(32))


def test_derive_is_hkdf_sha256() -> None:
    salt = bytes(range(100, 116))
    expected = HKDF(hashes.SHA256(), KEY_SIZE, salt=salt, info=DEFAULT_CONTEXT).derive(SECRET)
    assert derive_session_key(SECRET, salt) == expected
    assert len(expected) == KEY_SIZE


def test_derive_known_answer() -> None:
    """Freeze the KDF parameters (a change would break every deployed pair)."""
    key = derive_session_key(SECRET, bytes(16))
    assert key.hex() == "1cd422168b38104ad05f52ee13167c9c930b73d5b1ea62e43635c5060b95a55a"


def test_derive_depends_on_every_input() -> None:
    salt = new_salt()
    base = derive_session_key(SECRET, salt)
    assert derive_session_key(SECRET, new_salt()) != base
    assert derive_session_key(SECRET[::-1], salt) != base
    assert derive_session_key(SECRET, salt, context=b"other use") != base
    assert derive_session_key(bytearray(SECRET), bytearray(salt)) == base


def test_new_salt_is_fresh() -> None:
    salts = {new_salt() for _ in range(1000)}
    assert len(salts) == 1000
    assert all(len(s) == SALT_SIZE for s in salts)


@pytest.mark.parametrize("n", [0, 1, 15])
def test_short_secret_rejected(n: int) -> None:
    with pytest.raises(ConfigError, match="at least 16"):
        derive_session_key(b"k" * n, new_salt())


def test_sixteen_byte_secret_accepted() -> None:
    assert len(derive_session_key(b"k" * 16, new_salt())) == 32


@pytest.mark.parametrize("n", [0, 15, 17, 32])
def test_bad_salt_rejected(n: int) -> None:
    with pytest.raises(UsageError, match="salt"):
        derive_session_key(SECRET, bytes(n))


def test_secret_must_be_bytes() -> None:
    with pytest.raises(UsageError):
        derive_session_key("a string secret of enough length", new_salt())  # type: ignore[arg-type]


def test_load_raw_secret(tmp_path: Path) -> None:
    raw = os.urandom(32)
    p = tmp_path / "k"
    p.write_bytes(raw)
    assert load_secret(p) == raw


def test_load_raw_secret_keeps_whitespace_bytes(tmp_path: Path) -> None:
    raw = b"\n" + os.urandom(40) + b" "
    p = tmp_path / "k"
    p.write_bytes(raw)
    assert load_secret(str(p)) == raw


@pytest.mark.parametrize("text", ["{h}", "{h}\n", "  {H}\r\n"])
def test_load_hex_secret(tmp_path: Path, text: str) -> None:
    raw = os.urandom(32)
    p = tmp_path / "k"
    p.write_text(text.format(h=raw.hex(), H=raw.hex().upper()))
    assert load_secret(p) == raw


def test_short_hex_secret(tmp_path: Path) -> None:
    p = tmp_path / "k"
    p.write_text(os.urandom(31).hex() + "\n")
    with pytest.raises(ConfigError, match=r"hex secret .* 31 bytes"):
        load_secret(p)


@pytest.mark.parametrize("n", [0, 1, 31])
def test_short_raw_secret(tmp_path: Path, n: int) -> None:
    p = tmp_path / "k"
    p.write_bytes(b"\xff" * n)
    with pytest.raises(ConfigError, match=f"{n} bytes"):
        load_secret(p)


def test_missing_secret_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read secret file") as info:
        load_secret(tmp_path / "nope")
    assert isinstance(info.value.__cause__, OSError)


def test_directory_as_secret_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_secret(tmp_path)


def test_huge_secret_file(tmp_path: Path) -> None:
    p = tmp_path / "k"
    p.write_bytes(os.urandom(10000))
    with pytest.raises(ConfigError, match="not a key file"):
        load_secret(p)

"""Config files: TOML loading, flag > file > default precedence, the passphrase file."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import pytest

from replication import config
from replication.errors import ConfigError

DEFAULTS = {"listen": "0.0.0.0:9443", "workers": 4, "tls_dir": Path("/etc/r/tls"), "verbose": False}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("--listen", default=None)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--tls-dir", type=Path, default=None)
    p.add_argument("--verbose", action="store_true", default=None)
    return p


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_flag_beats_file_beats_default(tmp_path: Path):
    path = _write(tmp_path, 'listen = "10.0.0.1:9443"\nworkers = 8\n[tls]\ndir = "/srv/tls"\n')
    args = _parser().parse_args(["--workers", "2"])
    merged = config.merge(config.load_config(path), args, DEFAULTS)
    assert merged == {
        "listen": "10.0.0.1:9443",  # file
        "workers": 2,  # flag
        "tls_dir": Path("/srv/tls"),  # file, nested table, str -> Path
        "verbose": False,  # default
    }


def test_flag_equal_to_default_still_wins_over_file(tmp_path: Path):
    path = _write(tmp_path, "workers = 8\n")
    args = _parser().parse_args(["--workers", "4"])
    assert config.merge(config.load_config(path), args, DEFAULTS)["workers"] == 4


def test_dashed_keys_are_normalized(tmp_path: Path):
    path = _write(tmp_path, 'tls-dir = "/x"\n')
    assert config.load_config(path) == {"tls_dir": "/x"}


def test_missing_file_is_config_error(tmp_path: Path):
    with pytest.raises(ConfigError, match="does not exist"):
        config.load_config(tmp_path / "nope.toml")


def test_bad_toml_names_file_and_line(tmp_path: Path):
    path = _write(tmp_path, "listen = \nworkers = 3\n")
    with pytest.raises(ConfigError, match=r"agent\.toml is not valid TOML.*line 1"):
        config.load_config(path)


def test_not_utf8_is_config_error(tmp_path: Path):
    path = tmp_path / "bin.toml"
    path.write_bytes(b'listen = "\xff"\n')
    with pytest.raises(ConfigError, match="UTF-8"):
        config.load_config(path)


def test_unknown_key_and_wrong_type_are_refused():
    args = _parser().parse_args([])
    with pytest.raises(ConfigError, match=r"unknown setting.*wokers"):
        config.merge({"wokers": 3}, args, DEFAULTS)
    with pytest.raises(ConfigError, match="workers must be int"):
        config.merge({"workers": "8"}, args, DEFAULTS)
    with pytest.raises(ConfigError, match="workers must be int"):
        config.merge({"workers": True}, args, DEFAULTS)
    with pytest.raises(ConfigError, match="verbose must be bool"):
        config.merge({"verbose": 1}, args, DEFAULTS)


def test_passphrase_is_read_and_never_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    secret = os.urandom(32)
    path = tmp_path / "passphrase"
    path.write_text(secret.hex() + "\n")
    path.chmod(0o600)
    assert config.load_passphrase(path) == secret
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="0644") as info:
        config.load_passphrase(path)
    assert secret.hex() not in str(info.value)
    with caplog.at_level(logging.DEBUG):
        assert config.load_passphrase(path, allow_insecure=True) == secret
    assert any("0644" in r.getMessage() for r in caplog.records)
    assert all(secret.hex() not in r.getMessage() for r in caplog.records)


def test_passphrase_missing_or_short(tmp_path: Path):
    with pytest.raises(ConfigError, match="cannot read"):
        config.load_passphrase(tmp_path / "missing")
    short = tmp_path / "short"
    short.write_text("abcd")
    short.chmod(0o600)
    with pytest.raises(ConfigError, match="at least 32"):
        config.load_passphrase(short)


def test_certs_init_passphrase_loads(tmp_path: Path):
    from replication import certs

    certs.init_tls_dir(tmp_path / "pki", ["a"], days=1)
    assert len(config.load_passphrase(tmp_path / "pki" / "passphrase")) == 32


@pytest.mark.parametrize(
    "text, seconds", [("300", 300.0), ("90s", 90.0), ("5m", 300.0), ("24h", 86400.0), (7, 7.0)]
)
def test_durations_are_parsed(text, seconds):
    from replication.config import parse_duration

    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "-5m", "inf", "nan", ""])
def test_bad_durations_are_usage_errors(text):
    from replication.config import parse_duration
    from replication.errors import UsageError

    with pytest.raises(UsageError):
        parse_duration(text)

"""Configuration files of the agents (TOML) and how they combine with the command line.

Precedence, highest first: an explicit command-line flag, the config file, the
built-in default. argparse cannot tell "flag left out" from "flag given with its
default value", so the pattern is:

* every argparse option that a config file may also set has ``default=None``
  (the *sentinel*: "not given"); its help text names the real default;
* the real defaults live in one dict, ``DEFAULTS``, whose keys are the argparse
  ``dest`` names (underscores);
* ``settings = merge(load_config(path), args, DEFAULTS)``.

For example::

    DEFAULTS = {"listen": "0.0.0.0:9443", "tls_dir": Path("/etc/replication/tls")}
    p.add_argument("--listen", default=None, help="address (default 0.0.0.0:9443)")
    p.add_argument("--tls-dir", type=Path, default=None)
    settings = merge(load_config(args.config) if args.config else {}, args, DEFAULTS)

In the file, keys may use ``-`` or ``_``, and tables are flattened with ``_``, so
``[tls] dir = "..."`` sets ``tls_dir`` just like ``--tls-dir`` does. A key that
is not in the defaults is a :class:`~replication.errors.ConfigError` (a typo
must not silently fall back to a default).
"""

from __future__ import annotations

import argparse
import logging
import os
import stat
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .keys import load_secret

__all__ = ["load_config", "load_passphrase", "merge", "parse_assignments", "parse_duration"]

log = logging.getLogger(__name__)


def load_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a TOML config file; return its keys flattened (``[tls] dir`` -> ``tls_dir``).

    A missing, unreadable or malformed file is a :class:`~replication.errors.ConfigError`
    naming the file (and, for bad TOML, the line and column).
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError as err:
        raise ConfigError(f"config file {p} does not exist") from err
    except OSError as err:
        raise ConfigError(f"cannot read config file {p}: {err.strerror or err}") from err
    try:
        parsed = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {p} is not UTF-8 text") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {p} is not valid TOML: {err}") from err
    return _flatten(parsed)


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        name = prefix + key.replace("-", "_")
        if isinstance(value, dict):
            out.update(_flatten(value, name + "_"))
        else:
            out[name] = value
    return out


def _coerce(key: str, value: Any, default: Any, source: str) -> Any:
    """Check a file value against the type of its default; turn strings into Paths."""
    if default is None:
        return value
    same_boolness = isinstance(value, bool) == isinstance(default, bool)
    if same_boolness and isinstance(value, type(default)):
        return value
    if isinstance(default, Path) and isinstance(value, str):
        return Path(value)
    if isinstance(default, float) and isinstance(value, int) and same_boolness:
        return float(value)
    raise ConfigError(
        f"{source}: {key} must be {type(default).__name__}, not {type(value).__name__} ({value!r})"
    )


def merge(
    config: Mapping[str, Any],
    cli_args: argparse.Namespace,
    defaults: Mapping[str, Any],
    *,
    source: str = "config file",
) -> dict[str, Any]:
    """Return the settings named by ``defaults``: flag, else file, else default.

    A command-line value counts as given when it is not None (see the module
    docstring: such options must default to None). ``config`` keys not in
    ``defaults`` are refused; file values must have the type of their default
    (a string is accepted for a Path). ``source`` names the file in messages.
    """
    unknown = sorted(set(config) - set(defaults))
    if unknown:
        raise ConfigError(
            f"{source}: unknown setting(s) {', '.join(unknown)}",
            hint=f"known settings: {', '.join(sorted(defaults))}",
        )
    given = vars(cli_args)
    result: dict[str, Any] = {}
    for key, default in defaults.items():
        if given.get(key) is not None:
            result[key] = given[key]
        elif key in config:
            result[key] = _coerce(key, config[key], default, source)
        else:
            result[key] = default
    return result


def load_passphrase(path: str | os.PathLike[str], *, allow_insecure: bool = False) -> bytes:
    """Read the frame-key passphrase file (see :func:`replication.keys.load_secret`).

    The file must not be readable or writable by group or others: such a file is
    refused with a :class:`~replication.errors.ConfigError`, or only warned about
    with ``allow_insecure``. The content is never logged or put in a message.
    """
    p = Path(path)
    try:
        st = p.stat()
    except OSError as err:
        raise ConfigError(f"cannot read passphrase file {p}: {err.strerror or err}") from err
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"passphrase file {p} is not a regular file")
    loose = stat.S_IMODE(st.st_mode) & 0o077
    if loose:
        message = (
            f"passphrase file {p} has mode {stat.S_IMODE(st.st_mode):04o}: "
            "group or others may access it"
        )
        if not allow_insecure:
            raise ConfigError(message, hint=f"chmod 600 {p}")
        log.warning("%s (use chmod 600)", message)
    return load_secret(p)


def parse_assignments(items: list[str] | None, flag: str) -> list[tuple[str, str]]:
    """Parse repeated ``--flag NAME=PATH`` values into (name, path) pairs."""
    from .errors import UsageError

    pairs = []
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"{flag} {item!r}: expected NAME=PATH")
        pairs.append((name, path))
    return pairs


_DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: str | float | int) -> float:
    """Parse ``300``, ``90s``, ``5m``, ``24h`` or ``7d`` into seconds (a UsageError if bad)."""
    from .errors import UsageError

    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = value.strip().lower()
        unit = _DURATION_UNITS.get(text[-1:])
        number = text[:-1] if unit is not None else text
        try:
            seconds = float(number) * (unit or 1.0)
        except ValueError:
            raise UsageError(
                f"cannot read duration {value!r}: use e.g. 300, 90s, 5m, 24h"
            ) from None
    if not seconds >= 0 or seconds == float("inf"):
        raise UsageError(f"duration {value!r} must be a finite number of seconds >= 0")
    return seconds

"""Session ordering: which of two sessions of one volume is the newer (design S7).

A source starts a new session (a new salt, a new key) after every restart, cut or
epoch. The frames of an abandoned session may still sit in a process server's
spool; delivered after a newer session persisted the same blocks, they would roll
those blocks back. So each session of a volume gets an *order number*, larger than
every earlier one of that volume, and a master target refuses a session older than
the newest one it applied (:class:`~replication.errors.StaleSessionError`).

The number travels in the first 8 bytes of the session salt (big-endian; the other
8 bytes stay random), with the frame flag ORDERED: the salt is associated data of
every frame *and* an input of its key, so a relay can neither change the number of a
session nor forge one (it has no key for any salt).

The source keeps the last number it used per volume (:class:`SessionCounter`),
durably, and takes ``max(last + 1, now in milliseconds)``: strictly increasing on
one source even across restarts and clock steps back, and, across sources (a disk
re-pointed at a volume another source fed), as ordered as their clocks.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .durable import write_atomically
from .errors import ConfigError, DiskIOError, UsageError

__all__ = ["MAX_ORDER", "ORDER_SIZE", "SessionCounter", "ordered_salt"]

#: bytes of the salt that carry the order number
ORDER_SIZE = 8
#: largest order number (u64)
MAX_ORDER = (1 << 64) - 1
#: random bytes after the order number: salts of one order never repeat in practice
_RANDOM_SIZE = 8


def ordered_salt(order: int) -> bytes:
    """Return a 16-byte session salt for session ``order`` (1 .. 2**64-1)."""
    if not 1 <= order <= MAX_ORDER:
        raise UsageError(f"session order {order} outside 1..{MAX_ORDER}")
    return order.to_bytes(ORDER_SIZE, "big") + os.urandom(_RANDOM_SIZE)


def _now_ms() -> int:
    return int(time.time() * 1000)


class SessionCounter:
    """The order number of a source's next session, per volume.

    With ``directory`` every number is made durable (write-then-rename, fsync) before
    it is returned, so a number is never handed out twice, not even across a crash.
    Without one (a source run without ``--state-dir``) the last numbers live in
    memory and a restart relies on the clock alone. Thread-safe.
    """

    def __init__(
        self, directory: str | os.PathLike[str] | None, *, clock: Callable[[], int] = _now_ms
    ) -> None:
        self._dir = None if directory is None else Path(directory)
        self._clock = clock
        self._last: dict[str, int] = {}
        self._lock = threading.Lock()

    def next(self, volume: str) -> int:
        """Return a number greater than every one returned for ``volume`` before."""
        from .volumes import validate_volume_name  # volumes imports frame, frame this

        volume = validate_volume_name(volume)  # also a safe file name
        with self._lock:
            order = max(self._load(volume) + 1, self._clock())
            if order > MAX_ORDER:
                raise ConfigError(f"session order of {volume!r} is exhausted")
            if self._dir is not None:
                self._save(volume, order)
            self._last[volume] = order
            return order

    def _save(self, volume: str, order: int) -> None:
        try:
            self._dir.mkdir(parents=True, exist_ok=True)  # type: ignore[union-attr]
            write_atomically(self._path(volume), f"{order}\n".encode())
        except OSError as err:
            raise DiskIOError(f"cannot save the session order of {volume!r}: {err}") from err

    def _path(self, volume: str) -> Path:
        assert self._dir is not None
        return self._dir / f"{volume}.order"

    def _load(self, volume: str) -> int:
        last = self._last.get(volume, 0)
        if self._dir is None or last:
            return last
        try:
            text = self._path(volume).read_text()
        except FileNotFoundError:
            return 0
        except OSError as err:
            raise ConfigError(f"cannot read {self._path(volume)}: {err}") from err
        try:
            return int(text.strip())
        except ValueError:
            # written atomically, so only tampering gets here; the clock still orders
            raise ConfigError(f"{self._path(volume)} does not hold a session order") from None

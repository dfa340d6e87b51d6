"""Bandwidth limiting: a token bucket (the scenario's network throttling).

The bucket is sans-I/O: :meth:`TokenBucket.delay` says how long a sender must wait
before it may send ``n`` bytes at time ``now`` and books them; :meth:`take` does
the waiting with an injectable sleep. Tokens accrue at ``rate`` bytes per second up
to ``burst`` bytes. A message larger than the burst is let through once the bucket
is full and drives the balance negative, so big frames are never refused, only
spaced: the long-run rate still holds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from .blocks import parse_size
from .errors import UsageError

__all__ = ["TokenBucket", "parse_rate"]


def parse_rate(text: str) -> int:
    """Parse ``20M``, ``20MB/s``, ``512K/s`` or ``1000000`` into bytes per second."""
    body = text.strip()
    for suffix in ("/s", "ps", "/S", "PS"):
        body = body.removesuffix(suffix)
    rate = parse_size(body)
    if rate <= 0:
        raise UsageError(f"bandwidth limit {text!r} must be positive")
    return rate


class TokenBucket:
    """Allow ``rate`` bytes per second on average, ``burst`` bytes at once."""

    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate <= 0:
            raise UsageError("a token bucket needs a positive rate")
        self.rate = float(rate)
        # a quarter second of traffic by default: smooth, yet a frame or two fit
        self.burst = float(burst if burst is not None else max(rate / 4, 1 << 20))
        self._clock = clock
        self._sleep = sleep
        self._tokens = self.burst
        self._stamp = clock()
        self._lock = threading.Lock()

    def delay(self, n: int, now: float) -> float:
        """Book ``n`` bytes at ``now``; return the seconds to wait before sending them."""
        with self._lock:
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            # a message bigger than the burst waits for a full bucket, then goes
            needed = min(n, self.burst)
            wait = max(0.0, (needed - self._tokens) / self.rate)
            self._tokens -= n
            return wait

    def take(self, n: int) -> float:
        """Wait until ``n`` bytes may be sent; return the time waited."""
        wait = self.delay(n, self._clock())
        if wait > 0:
            self._sleep(wait)
        return wait

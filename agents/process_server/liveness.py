"""Is the master target alive and taking frames? Sans-I/O: every method takes ``now``.

Three layers find a silent PS->MT link (design F4), from the cheapest:

* gRPC keepalive on the process server's channel (:data:`CHANNEL_OPTIONS`): a
  transport whose pings go unanswered is closed, so every call on it fails;
* a progress deadline per ``Apply`` stream (:class:`ProgressWatch`): frames wait to
  be forwarded and the master target acknowledged nothing for
  :data:`PROGRESS_DEADLINE` seconds, so the call is cancelled and retried. It
  catches what keepalive cannot: a master target that answers pings but neither
  reads nor acknowledges;
* a probe of the master target every :data:`PROBE_INTERVAL` seconds, sessions or
  not (:class:`TargetHealth`), so an unreachable master target shows in ``Status``
  and ``replication_master_target_up`` while nothing is being forwarded.

The threads that feed these (``watchdog.py``) do the I/O; the decisions are here,
tested on an injected clock (``tests/unit/test_liveness.py``).
"""

from __future__ import annotations

__all__ = [
    "CHANNEL_OPTIONS",
    "PROBE_INTERVAL",
    "PROBE_TIMEOUT",
    "PROGRESS_DEADLINE",
    "ProgressWatch",
    "TargetHealth",
]

#: seconds an Apply stream may go without a PERSISTED ack while frames wait for it.
#: The master target acks every group commit (one journal fsync, at most a few MiB),
#: which takes well under a second on a sane disk: 5 s leaves room for a loaded
#: host, and with the watchdog's 0.5 s tick a stall is reported within ~6 s.
PROGRESS_DEADLINE = 5.0
#: seconds between two probes of the master target, and each probe's deadline: an
#: unreachable master target is reported within PROBE_INTERVAL + PROBE_TIMEOUT (5 s)
PROBE_INTERVAL = 3.0
PROBE_TIMEOUT = 2.0

#: the process server's channel to the master target. A ping every 5 s (idle or
#: not, so a dead transport is found before a call needs it), answered within 3 s:
#: a dead link is closed within 8 s, under the 10 s operators are promised, without
#: pinging an idle link every second. ``max_pings_without_data`` 0: keep pinging an
#: idle link (the default stops after 2). The master target's server accepts a ping
#: every 4 s (``replication.server.KEEPALIVE_SERVER_OPTIONS``), so these never earn a
#: GOAWAY too_many_pings. Reconnect backoff capped at 2 s (default 120 s): a master
#: target back after an outage is reached again within about 2 s.
CHANNEL_OPTIONS = (
    ("grpc.keepalive_time_ms", 5000),
    ("grpc.keepalive_timeout_ms", 3000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_reconnect_backoff_ms", 2000),
)


class ProgressWatch:
    """The progress deadline of one forward attempt (one ``Apply`` call).

    The clock runs only while frames wait (received by this process server and
    not PERSISTED yet): an idle session, its stream open with nothing to send, is
    never overdue. It starts at the call's start, and again at every ack that moves
    the persisted seq.
    """

    def __init__(self, now: float, limit: float = PROGRESS_DEADLINE) -> None:
        self.limit = limit
        self._since: float | None = now  # the clock starts with the call
        self._persisted: int | None = None  # the persisted seq last observed

    def observe(self, now: float, persisted: int, pending: bool) -> float | None:
        """Record the session's state at ``now``; return the seconds waited if overdue."""
        if self._persisted is not None and persisted > self._persisted:
            self._since = now  # an ack moved the persisted seq: progress
        self._persisted = persisted
        if not pending:
            self._since = None  # nothing to wait for: the clock stops
            return None
        if self._since is None:
            self._since = now  # frames wait again: the clock starts again
            return None
        waited = now - self._since
        return waited if waited >= self.limit else None


class TargetHealth:
    """What the probes of the master target found: up or not, since when, and why.

    Unknown until the first probe answers or fails; a problem line only while the
    last probe failed, with how long the master target has been unreachable. An
    ack of a forwarded frame is proof of life too (:meth:`alive`): the report clears
    at once when the link heals, and a probe that was sent before that proof and
    failed after it (its deadline ran out on the dead link) is ignored.
    """

    def __init__(self, address: str) -> None:
        self.address = address
        self.up: bool | None = None
        self._down_since: float | None = None
        self._alive_at: float | None = None
        self._reason = ""

    def probed(self, now: float, failure: str | None, *, sent: float | None = None) -> bool:
        """Record a probe's outcome (``failure``: None if it answered; ``sent``: when the
        probe left); return True if ``up`` changed (the caller logs it)."""
        if failure is None:
            return self.alive(now)
        if sent is not None and self._alive_at is not None and sent < self._alive_at:
            return False  # older than the last proof of life: says nothing now
        was = self.up
        self.up = False
        if self._down_since is None:
            self._down_since = now
        self._reason = failure
        return was is not False

    def alive(self, now: float) -> bool:
        """The master target answered (a probe, an ack); return True if ``up`` changed."""
        was = self.up
        self.up = True
        self._alive_at = now
        self._down_since = None
        self._reason = ""
        return was is not True

    def problem(self, now: float) -> str | None:
        """The ``Status.problems`` line while the master target is unreachable, else None."""
        if self.up is not False or self._down_since is None:
            return None
        since = now - self._down_since
        return (
            f"master target {self.address} unreachable for {since:.0f} s "
            f"(probe every {PROBE_INTERVAL:.0f} s): {self._reason}"
        )

"""What is wrong with forwarding, per session: parked refusals and retried failures.

A session is *parked* when the master target refused it with an error whose
registry entry says retrying cannot help (``retryable = False``: a wrong key, an
unknown volume, a replayed seq). A parked session is never forwarded again by this
process (a restart un-parks it, so an operator who fixed the cause restarts the
process server), and its spooled frames stay where they are: nothing is dropped.
Failures that may pass (the master target unreachable, its disk full) are only
*retrying*: reported until the session makes progress again.

A session refused as ``session.stale`` is *dropped* instead (design F6): its frames
can never be applied and a newer session covers their blocks, so it is no problem
to report; it is remembered only to refuse its source again.

Thread-safe: forwarder threads write, the control service and ingest threads read.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from replication.errors import ReplicationError

SessionKey = tuple[str, bytes]

#: dropped sessions remembered (to refuse their sources again); the oldest go first
DROPPED_REMEMBERED = 4096

__all__ = ["ParkingLot"]


class ParkingLot:
    """Parked sessions, sessions whose forwarding is being retried, and spool trouble."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._parked: dict[SessionKey, ReplicationError] = {}
        self._dropped: OrderedDict[SessionKey, ReplicationError] = OrderedDict()
        self._retrying: dict[SessionKey, tuple[int, str]] = {}
        self._spool: str | None = None

    def park(self, key: SessionKey, err: ReplicationError) -> int:
        """Park ``key`` for good (this process); return how many sessions are parked."""
        with self._lock:
            self._parked[key] = err
            self._retrying.pop(key, None)
            return len(self._parked)

    def drop(self, key: SessionKey, err: ReplicationError) -> None:
        """Forget ``key`` as a problem (parked or retrying); keep refusing it with ``err``."""
        with self._lock:
            self._parked.pop(key, None)
            self._retrying.pop(key, None)
            self._dropped[key] = err
            while len(self._dropped) > DROPPED_REMEMBERED:
                self._dropped.popitem(last=False)

    def refusal(self, key: SessionKey) -> ReplicationError | None:
        """Return a fresh copy of the error that parked or dropped ``key``, or None."""
        with self._lock:
            err = self._parked.get(key) or self._dropped.get(key)
        return None if err is None else type(err)(err.message, hint=err.hint)

    def retrying(self, key: SessionKey, attempt: int, reason: str) -> None:
        """Record that forwarding ``key`` failed (retryably) ``attempt`` times in a row."""
        with self._lock:
            if key not in self._parked and key not in self._dropped:
                self._retrying[key] = (attempt, reason)

    def recovered(self, key: SessionKey) -> None:
        """Forwarding ``key`` made progress: no longer a problem."""
        with self._lock:
            self._retrying.pop(key, None)

    def retrying_count(self) -> int:
        """Sessions whose forwarding is being retried now (the gauge's value)."""
        with self._lock:
            return len(self._retrying)

    def spool_trouble(self, reason: str | None) -> None:
        """Set (or clear, with None) a problem of the spool itself, e.g. its disk full."""
        with self._lock:
            self._spool = reason

    def problems(self) -> list[str]:
        """Human-readable lines for ``AgentStatus.problems``, parked sessions first."""
        with self._lock:
            lines = [
                f"session {_name(key)} parked: [{err.code}] {err.message}"
                for key, err in sorted(self._parked.items())
            ]
            lines += [
                f"session {_name(key)} forwarding failed {attempt} times, retrying: {reason}"
                for key, (attempt, reason) in sorted(self._retrying.items())
            ]
            if self._spool is not None:
                lines.append(f"spool: {self._spool}")
        return lines


def _name(key: SessionKey) -> str:
    return f"{key[0]}/{key[1].hex()[:12]}"

"""The threads that feed ``liveness.py``: a watchdog over Apply calls, a probe of the MT.

:class:`CallWatchdog` looks at every open ``Apply`` call twice a second and cancels
one whose session made no progress within the deadline (the forwarder then raises
``relay.stalled`` and retries). :class:`TargetProbe` asks the master target's
standard gRPC health service every few seconds, on the relay's own channel, and
keeps ``replication_master_target_up`` and a problem line. Both loops end with
:meth:`stop`; both decide nothing themselves (``liveness.py`` does).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from replication import metrics
from replication.errors import ReplicationError

from .liveness import PROBE_INTERVAL, PROBE_TIMEOUT, PROGRESS_DEADLINE, ProgressWatch, TargetHealth

log = logging.getLogger("process-server")

SessionKey = tuple[str, bytes]

__all__ = ["CallWatchdog", "TargetProbe"]

#: seconds between two looks at the open calls (the deadline's granularity)
TICK = 0.5


class CallWatchdog:
    """Cancel an ``Apply`` call whose session made no progress for ``limit`` seconds.

    ``progress(key)`` returns ``(persisted_seq, frames_waiting)`` of a session.
    """

    def __init__(
        self,
        progress: Callable[[SessionKey], tuple[int, bool]],
        *,
        limit: float = PROGRESS_DEADLINE,
        clock: Callable[[], float] = time.monotonic,
        tick: float | None = TICK,
    ) -> None:
        self._progress = progress
        self._limit = limit
        self._clock = clock
        self._lock = threading.Lock()
        self._calls: dict[SessionKey, tuple[object, ProgressWatch]] = {}
        self._overdue: dict[SessionKey, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if tick is not None:  # None: the caller ticks (tests)
            self._thread = threading.Thread(
                target=self._loop, args=(tick,), daemon=True, name="apply-watchdog"
            )
            self._thread.start()

    @contextlib.contextmanager
    def watching(self, key: SessionKey, call) -> Iterator[None]:
        """Watch ``call`` (forwarding ``key``) for as long as the block runs."""
        with self._lock:
            self._calls[key] = (call, ProgressWatch(self._clock(), self._limit))
            self._overdue.pop(key, None)
        try:
            yield
        finally:
            with self._lock:
                if self._calls.get(key, (None,))[0] is call:
                    del self._calls[key]

    def overdue(self, key: SessionKey) -> float | None:
        """Seconds ``key``'s last call waited before this watchdog cancelled it, or None."""
        with self._lock:
            return self._overdue.pop(key, None)

    def check(self) -> None:
        """One look at every open call: cancel those past the deadline."""
        with self._lock:
            calls = list(self._calls.items())
        for key, (call, watch) in calls:
            persisted, pending = self._progress(key)
            waited = watch.observe(self._clock(), persisted, pending)
            if waited is None:
                continue
            with self._lock:
                if self._calls.get(key, (None,))[0] is not call:
                    continue  # that call ended meanwhile
                self._overdue[key] = waited
            log.warning("event=forward_stalled volume=%s waited=%.1f", key[0], waited)
            call.cancel()  # type: ignore[attr-defined]

    def _loop(self, tick: float) -> None:
        while not self._stop.wait(tick):
            try:
                self.check()
            except Exception:  # a bug must not end the watch of every session
                log.exception("event=watchdog_failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


class TargetProbe:
    """Ask the master target's health service every ``interval`` seconds, on ``channel``."""

    def __init__(
        self,
        channel: grpc.Channel,
        address: str,
        *,
        interval: float | None = PROBE_INTERVAL,
        timeout: float = PROBE_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stub = health_pb2_grpc.HealthStub(channel)
        self._timeout = timeout
        self._clock = clock
        self._lock = threading.Lock()
        self.health = TargetHealth(address)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if interval is not None:  # None: the caller probes (tests)
            self._thread = threading.Thread(
                target=self._loop, args=(interval,), daemon=True, name="target-probe"
            )
            self._thread.start()

    def probe_once(self) -> None:
        """One probe; updates the health, the gauge, and logs a change."""
        sent = self._clock()
        failure = self._ask()
        with self._lock:
            changed = self.health.probed(self._clock(), failure, sent=sent)
        self._publish(changed, failure)

    def alive(self) -> None:
        """The master target answered something else (a forwarded frame's ack)."""
        with self._lock:
            changed = self.health.alive(self._clock())
        if changed:
            self._publish(changed, None)

    def _publish(self, changed: bool, failure: str | None) -> None:
        up = self.health.up
        metrics.MASTER_TARGET_UP.set(1 if up else 0)
        if changed and up:
            log.info("event=master_target_up address=%s", self.health.address)
        elif changed:
            log.warning(
                "event=master_target_down address=%s reason=%s", self.health.address, failure
            )

    def _ask(self) -> str | None:
        """None if the master target answered SERVING, else why not (one line)."""
        request = health_pb2.HealthCheckRequest(service="")
        try:
            reply = self._stub.Check(request, timeout=self._timeout)
        except grpc.RpcError as err:
            status = getattr(err.code(), "name", "UNKNOWN")  # type: ignore[attr-defined]
            return f"{status}: {err.details()}"  # type: ignore[attr-defined]
        except ReplicationError as err:  # our channel's own check: not a master target
            return f"[{err.code}] {err.message}"
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            return f"health {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
        return None

    def problems(self) -> list[str]:
        """The master target's line for ``Status.problems`` (empty while it answers)."""
        with self._lock:
            line = self.health.problem(self._clock())
        return [line] if line else []

    def _loop(self, interval: float) -> None:
        while True:
            try:
                self.probe_once()
            except Exception:  # a bug must not silence the probe for good
                log.exception("event=probe_failed")
            if self._stop.wait(interval):
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

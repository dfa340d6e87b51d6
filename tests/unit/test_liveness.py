"""Liveness of the PS->MT link: the progress deadline, the probe, and the relay's report.

The decisions (``agents/process_server/liveness.py``) run on an injected clock; the
watchdog and the probe are driven by hand (no thread); one relay test runs a real
forwarder against a master target that takes frames and never acknowledges them.
"""

from __future__ import annotations

import functools
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2
from prometheus_client import REGISTRY

from agents.process_server import relay as relay_module
from agents.process_server.liveness import ProgressWatch, TargetHealth
from agents.process_server.relay import Relay
from agents.process_server.service import relay_failure
from agents.process_server.watchdog import CallWatchdog, TargetProbe
from replication.spool import Spool
from replication.tls import ERROR_CODE_METADATA
from tests.unit.test_relay import FakeCall, session, wait_for

KEY = ("vol1", b"s" * 16)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class RpcFailure(grpc.RpcError):
    """A failed call as the gRPC client raises it."""

    def __init__(self, code: grpc.StatusCode, details: str, metadata=()) -> None:
        self._code, self._details, self._metadata = code, details, tuple(metadata)

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self):
        return self._metadata


# --- the progress deadline ----------------------------------------------------------------


def test_a_session_waiting_for_acks_is_overdue_at_the_deadline_and_not_before():
    watch = ProgressWatch(now=0.0, limit=5.0)
    assert watch.observe(1.0, persisted=3, pending=True) is None
    assert watch.observe(4.9, persisted=3, pending=True) is None
    assert watch.observe(5.0, persisted=3, pending=True) == 5.0
    assert watch.observe(7.5, persisted=3, pending=True) == 7.5


def test_every_ack_restarts_the_clock():
    watch = ProgressWatch(now=0.0, limit=5.0)
    watch.observe(0.0, persisted=3, pending=True)
    assert watch.observe(4.0, persisted=4, pending=True) is None  # progress at 4
    assert watch.observe(8.9, persisted=4, pending=True) is None
    assert watch.observe(9.0, persisted=4, pending=True) == 5.0


def test_an_idle_session_is_never_overdue_and_its_clock_starts_when_frames_wait():
    watch = ProgressWatch(now=0.0, limit=5.0)
    for t in (1.0, 60.0, 3600.0):  # stream open, nothing to send: no ack is owed
        assert watch.observe(t, persisted=7, pending=False) is None
    assert watch.observe(4000.0, persisted=7, pending=True) is None  # new frames
    assert watch.observe(4004.0, persisted=7, pending=True) is None
    assert watch.observe(4005.0, persisted=7, pending=True) == 5.0


def test_the_watchdog_cancels_a_call_past_the_deadline_and_says_how_long_it_waited():
    clock, state = Clock(), {"persisted": 0, "pending": True}
    dog = CallWatchdog(lambda key: (state["persisted"], state["pending"]), clock=clock, tick=None)
    call = FakeCancellable()
    with dog.watching(KEY, call):
        clock.now += 4.0
        dog.check()
        state["persisted"] = 2  # an ack
        clock.now += 4.0
        dog.check()
        clock.now += 4.9
        dog.check()
        assert not call.cancelled and dog.overdue(KEY) is None
        clock.now += 0.1
        dog.check()
        assert call.cancelled
        assert dog.overdue(KEY) == pytest.approx(5.0)
    assert dog.overdue(KEY) is None  # told once


def test_the_watchdog_leaves_a_call_alone_once_it_ended():
    clock = Clock()
    dog = CallWatchdog(lambda key: (0, True), clock=clock, tick=None)
    call = FakeCancellable()
    with dog.watching(KEY, call):
        pass
    clock.now += 60
    dog.check()
    assert not call.cancelled and dog.overdue(KEY) is None


class FakeCancellable:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


# --- the probe ----------------------------------------------------------------------------


def test_the_master_target_is_unknown_then_down_with_how_long_and_why_then_up():
    health = TargetHealth("mt:9444")
    assert health.up is None and health.problem(0.0) is None  # nothing known yet
    assert health.probed(10.0, None) is True and health.problem(10.0) is None
    assert health.probed(13.0, "UNAVAILABLE: connection refused") is True
    assert health.probed(16.0, "DEADLINE_EXCEEDED: deadline") is False  # still down
    line = health.problem(20.0)
    assert line is not None
    assert "mt:9444" in line and "unreachable for 7 s" in line and "DEADLINE_EXCEEDED" in line
    assert health.probed(21.0, None) is True
    assert health.up is True and health.problem(21.0) is None


def test_an_ack_is_proof_of_life_and_outdates_a_probe_sent_before_it():
    health = TargetHealth("mt:9444")
    health.probed(10.0, "DEADLINE_EXCEEDED: deadline")
    assert health.alive(11.0) is True and health.problem(11.0) is None  # an ack came
    # a probe sent at 10.5 on the dead link fails at 12.5: older news than the ack
    assert health.probed(12.5, "DEADLINE_EXCEEDED: deadline", sent=10.5) is False
    assert health.up is True and health.problem(12.5) is None
    # one sent after the ack that fails is news
    assert health.probed(15.0, "UNAVAILABLE: refused", sent=13.0) is True
    assert "UNAVAILABLE" in (health.problem(15.0) or "")


def test_a_probe_sets_the_gauge_and_the_problem_line():
    clock = Clock()
    probe = TargetProbe(grpc.insecure_channel("127.0.0.1:1"), "mt:9444", interval=None, clock=clock)
    replies: list[object] = [RpcFailure(grpc.StatusCode.UNAVAILABLE, "connection refused")]
    probe._stub = FakeHealth(replies)
    probe.probe_once()
    assert REGISTRY.get_sample_value("replication_master_target_up") == 0
    assert ["UNAVAILABLE" in p and "mt:9444" in p for p in probe.problems()] == [True]
    replies.append(health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING))
    probe.probe_once()
    assert REGISTRY.get_sample_value("replication_master_target_up") == 1
    assert probe.problems() == []
    probe.stop()


class FakeHealth:
    def __init__(self, replies: list[object]) -> None:
        self._replies = replies

    def Check(self, request, timeout):
        reply = self._replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        return reply


# --- the relay: a master target that takes frames and never acknowledges --------------------


class SilentTarget:
    """While ``silent`` is set, every ``Apply`` call hangs until cancelled; then it acks."""

    def __init__(self) -> None:
        self.silent = threading.Event()
        self.silent.set()
        self.frames: list[tuple[int, bytes]] = []
        self.session = b""
        self.silent_calls = 0

    def Apply(self, requests):
        if self.silent.is_set():
            self.silent_calls += 1
            return HangingCall()
        return FakeCall(requests, self)


class HangingCall:
    def __init__(self) -> None:
        self._cancelled = threading.Event()

    def __iter__(self):
        return self

    def __next__(self):
        if not self._cancelled.wait(30):  # bounded: the test fails, it never hangs
            raise AssertionError("the watchdog never cancelled the call")
        raise RpcFailure(grpc.StatusCode.CANCELLED, "Locally cancelled by application!")

    def cancel(self) -> None:
        self._cancelled.set()


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_a_silent_master_target_is_cancelled_reported_counted_and_retried(tmp_path, monkeypatch):
    deadline = functools.partial(CallWatchdog, limit=0.3, tick=0.05)
    monkeypatch.setattr(relay_module, "CallWatchdog", deadline)
    spool = Spool.open(tmp_path / "spool", limit_bytes=64 << 20, segment_size=8 << 20)
    target = SilentTarget()
    proofs: list[int] = []  # the relay's proofs of life of the master target (its acks)
    relay = Relay(spool, tmp_path / "spool", lambda: target, alive=lambda: proofs.append(1))
    stalled = sample("replication_forward_failures_total", reason="relay.stalled")
    try:
        key, msgs, _acks = session(relay)
        wait_for(lambda: target.silent_calls >= 2)  # cancelled, then tried again
        (line,) = relay.problems()
        assert "forwarding failed" in line and "retrying" in line and "[relay.stalled]" in line
        assert sample("replication_forward_retrying_sessions") == 1
        assert sample("replication_forward_failures_total", reason="relay.stalled") >= stalled + 1
        assert relay.state(key)[1] == 0 and not proofs  # nothing claimed PERSISTED
        target.silent.clear()  # the link heals
        wait_for(lambda: relay.state(key)[1] == len(msgs))
        assert target.frames == [(m.seq, m.frame) for m in msgs]
        assert proofs  # the probe's report clears with the first ack
        wait_for(lambda: not relay.problems())
        assert sample("replication_forward_retrying_sessions") == 0
    finally:
        relay.stop()
        spool.close()


# --- the GetHashMap relay -----------------------------------------------------------------


class Aborted(Exception):
    pass


class Context:
    def __init__(self) -> None:
        self.metadata: tuple = ()
        self.status: tuple[grpc.StatusCode, str] | None = None

    def set_trailing_metadata(self, metadata) -> None:
        self.metadata = tuple(metadata)

    def abort(self, code, details):
        self.status = (code, details)
        raise Aborted


def test_the_master_targets_typed_refusal_reaches_the_source_with_its_code():
    refusal = RpcFailure(
        grpc.StatusCode.NOT_FOUND,
        "[volume.unknown] volume 'vol2' is not served here",
        [(ERROR_CODE_METADATA, "volume.unknown")],
    )
    context = Context()
    with pytest.raises(Aborted):
        relay_failure(context, refusal)
    assert context.metadata == ((ERROR_CODE_METADATA, "volume.unknown"),)
    assert context.status == (grpc.StatusCode.NOT_FOUND, refusal.details())


def test_an_unreachable_master_target_stays_unavailable_and_says_who():
    context = Context()
    with pytest.raises(Aborted):
        relay_failure(context, RpcFailure(grpc.StatusCode.UNAVAILABLE, "connection refused"))
    # the relay's own retryable code: the source retries, and never mistakes a TLS
    # failure of this hop for a refusal of its own certificate
    assert context.metadata == ((ERROR_CODE_METADATA, "relay.target_unreachable"),)
    assert context.status == (
        grpc.StatusCode.UNAVAILABLE,
        "master target: UNAVAILABLE: connection refused",
    )


def test_another_status_without_a_code_goes_as_it_came():
    context = Context()
    with pytest.raises(Aborted):
        relay_failure(context, RpcFailure(grpc.StatusCode.UNKNOWN, "Exception iterating"))
    assert context.metadata == ()  # not an outage: the source does not retry it
    assert context.status == (
        grpc.StatusCode.UNKNOWN,
        "master target: UNKNOWN: Exception iterating",
    )


def test_a_typed_error_of_the_relays_own_channel_reaches_the_source_with_its_code():
    from replication.errors import ServerRoleError

    context = Context()
    with pytest.raises(Aborted):
        relay_failure(context, ServerRoleError("the server at 'localhost' is a source"))
    assert context.metadata == ((ERROR_CODE_METADATA, "tls.server_role"),)
    status, details = context.status  # type: ignore[misc]
    assert status != grpc.StatusCode.UNKNOWN
    assert details.startswith("[tls.server_role] process server -> master target: ")

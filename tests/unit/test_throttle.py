"""The token bucket of ``--bandwidth-limit``, on an injected clock (no real waiting)."""

from __future__ import annotations

import pytest

from replication.errors import UsageError
from replication.throttle import TokenBucket, parse_rate


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.slept += seconds


def bucket(rate: float, burst: float) -> tuple[TokenBucket, FakeClock]:
    clock = FakeClock()
    return TokenBucket(rate, burst, clock=clock, sleep=clock.sleep), clock


def test_a_full_bucket_lets_a_burst_through_without_waiting():
    tb, clock = bucket(1000, 4000)
    for _ in range(4):
        assert tb.take(1000) == 0
    assert clock.slept == 0


@pytest.mark.parametrize("size", [100, 1000, 7000])
def test_the_long_run_rate_holds_for_small_and_oversized_messages(size):
    tb, clock = bucket(1000, 2000)
    sent = 0
    start = clock.now
    for _ in range(200):
        tb.take(size)
        sent += size
    elapsed = clock.now - start
    # everything beyond the first burst was paced at the rate, never faster
    assert elapsed >= (sent - 2000 - size) / 1000
    assert elapsed <= sent / 1000 + 0.01


def test_idle_time_refills_only_up_to_the_burst():
    tb, clock = bucket(1000, 2000)
    tb.take(2000)
    clock.now += 3600  # an hour idle earns one burst, not an hour of tokens
    assert tb.take(2000) == 0
    assert tb.take(1000) == pytest.approx(1.0)


def test_concurrent_bookings_share_one_balance():
    tb, clock = bucket(1000, 1000)
    waits = [tb.delay(1000, clock.now) for _ in range(3)]
    assert waits == pytest.approx([0.0, 1.0, 2.0])


@pytest.mark.parametrize(
    "text, rate",
    [("20M", 20 << 20), ("20MB/s", 20 << 20), ("512K/s", 512 << 10), ("1000000", 1000000)],
)
def test_rates_are_parsed(text, rate):
    assert parse_rate(text) == rate


@pytest.mark.parametrize("text", ["fast", "0", "-1M", ""])
def test_bad_rates_are_usage_errors(text):
    with pytest.raises(UsageError):
        parse_rate(text)

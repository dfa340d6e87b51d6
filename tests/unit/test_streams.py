import threading

import pytest

from replication.streams import batches


def test_batches_preserve_order_and_take_what_is_queued():
    gate = threading.Event()

    def source():
        yield from range(5)
        gate.wait(5)
        yield from range(5, 8)

    got = []
    for batch in batches(source(), max_items=3):
        got.append(batch)
        if sum(map(len, got)) == 5:
            gate.set()
    flat = [x for b in got for x in b]
    assert flat == list(range(8))
    assert all(len(b) <= 3 for b in got)


def test_batches_reraise_the_source_error_after_yielding_items():
    def source():
        yield 1
        raise ValueError("cut")

    seen = []
    with pytest.raises(ValueError):
        for batch in batches(source()):
            seen += batch
    assert seen == [1]


def test_a_quiet_stream_yields_without_waiting_for_more():
    release = threading.Event()
    forced = []

    def watchdog():  # only ends a hang; the assertion below is on order, not time
        if not release.wait(30):
            forced.append(True)
            release.set()

    threading.Thread(target=watchdog, daemon=True).start()

    def source():
        yield "a"
        release.wait()

    it = batches(source())
    assert next(it) == ["a"]
    assert not release.is_set() and not forced  # we got "a" while the source still blocked
    release.set()
    assert list(it) == []

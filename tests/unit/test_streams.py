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


def test_prepare_runs_on_the_reader_thread_in_order():
    threads = set()

    def prepare(item):
        threads.add(threading.current_thread().name)
        return item * 10

    got = [x for batch in batches(iter(range(6)), prepare=prepare) for x in batch]
    assert got == [0, 10, 20, 30, 40, 50]
    assert threads == {"stream-reader"}


def test_an_error_in_prepare_ends_the_stream_after_the_items_before_it():
    def prepare(item):
        if item == 2:
            raise ValueError("bad message")
        return item

    seen = []
    with pytest.raises(ValueError, match="bad message"):
        for batch in batches(iter(range(5)), prepare=prepare):
            seen += batch
    assert seen == [0, 1]

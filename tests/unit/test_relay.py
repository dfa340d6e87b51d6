"""The process server's relay: forwarding from memory, deferred cursors, a bounded book."""

from __future__ import annotations

import json
import queue
import threading
import time

import pytest

from agents.process_server import relay as relay_module
from agents.process_server.relay import Relay
from replication import wire
from replication.frame import FrameEncoder
from replication.protocol import AckLevel
from replication.spool import Spool
from replication.volumes import volume_disk_id

SECRET = b"k" * 32
VOLUME = "vol1"


class FakeCall:
    """An ``Apply`` call: reads the relay's requests, acks every frame PERSISTED."""

    def __init__(self, requests, target) -> None:
        self._requests = requests
        self._target = target

    def __iter__(self):
        return self

    def __next__(self):
        while True:
            msg = wire.source_message_from_pb(next(self._requests))
            if isinstance(msg, wire.OpenMsg):
                self._target.session = msg.session
            elif isinstance(msg, wire.FrameMsg):
                self._target.frames.append((msg.seq, msg.frame))
                ack = wire.AckMsg(VOLUME, self._target.session, msg.seq, AckLevel.PERSISTED)
                return wire.ack_to_pb(ack)

    def cancel(self) -> None:
        pass


class FakeTarget:
    def __init__(self) -> None:
        self.frames: list[tuple[int, bytes]] = []
        self.session = b""

    def Apply(self, requests):
        return FakeCall(requests, self)


@pytest.fixture
def relay(tmp_path):
    spool = Spool.open(tmp_path / "spool", limit_bytes=64 << 20, segment_size=8 << 20)
    target = FakeTarget()
    r = Relay(spool, tmp_path / "spool", lambda: target)
    r.target = target
    yield r
    r.stop()
    spool.close()


def session(relay: Relay, frames: int = 5):
    """Open a session, spool ``frames`` frames; return its key, frames and ack queue."""
    enc = FrameEncoder(SECRET, volume_disk_id(VOLUME))
    key = relay.open(wire.OpenMsg(VOLUME, enc.session_salt, 65536, 1 << 20, 1))
    acks: queue.Queue[object] = relay.subscribe(key, queue.Queue())
    msgs = [
        wire.FrameMsg(s, enc.encode(s, (s - 1) * 4096, bytes([s]) * 4096))
        for s in range(1, frames + 1)
    ]
    assert relay.accept(key, msgs) == frames
    relay.close(key, frames)
    return key, msgs, acks


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def last_persisted(acks: queue.Queue) -> int:
    seq = 0
    while True:
        try:
            seq = max(seq, acks.get(timeout=5).seq)  # type: ignore[union-attr]
        except queue.Empty:
            return seq


def test_frames_just_spooled_are_forwarded_from_memory(relay, monkeypatch):
    monkeypatch.setattr(relay._spool, "pending", lambda *a: pytest.fail("read the spool back"))
    key, msgs, _acks = session(relay)
    wait_for(lambda: len(relay.target.frames) == len(msgs))
    assert relay.target.frames == [(m.seq, m.frame) for m in msgs]  # byte for byte, in order
    wait_for(lambda: relay.state(key)[1] == len(msgs))
    assert relay._recent_bytes == 0  # nothing kept once sent


def test_without_room_in_memory_the_spool_is_read_back(relay, monkeypatch):
    monkeypatch.setattr(relay_module, "FORWARD_CACHE_BYTES", 0)
    _key, msgs, _acks = session(relay)
    wait_for(lambda: len(relay.target.frames) == len(msgs))
    assert relay.target.frames == [(m.seq, m.frame) for m in msgs]


def test_acks_reach_the_source_at_once_and_the_cursor_follows(relay, monkeypatch):
    marks = []
    real = relay._spool.mark_persisted
    monkeypatch.setattr(relay._spool, "mark_persisted", lambda *a: marks.append(a[2]) or real(*a))
    key, _msgs, acks = session(relay, frames=8)
    assert last_persisted(acks) == 8
    wait_for(lambda: relay._spool.state(*key)[1] == 8)  # within MARK_INTERVAL
    assert len(marks) < 8  # acks close together shared cursor writes
    assert relay.state(key) == (8, 8)


def test_finished_sessions_leave_the_book(relay, tmp_path):
    keys = [session(relay, frames=2)[0] for _ in range(3)]
    forwarders = [relay._forwarders[key] for key in keys if key in relay._forwarders]
    for key in keys:
        wait_for(lambda key=key: relay.state(key)[1] == 2)  # all persisted
    for t in forwarders:
        t.join(10)
    live = session(relay, frames=2)[0]  # a new Open prunes the finished ones
    book = json.loads((tmp_path / "spool" / "sessions.json").read_text())
    assert [bytes.fromhex(m["session_hex"]) for m in book] == [live[1]]
    assert relay.state(keys[0])[1] == 2  # still answered from the spool's cursor


def test_concurrent_opens_share_book_writes(relay, monkeypatch):
    writes = []
    real = relay_module.write_atomically
    monkeypatch.setattr(
        relay_module,
        "write_atomically",
        lambda *a, **k: writes.append(1) or time.sleep(0.05) or real(*a, **k),
    )
    threads = [threading.Thread(target=session, args=(relay, 1)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(writes) < 16  # 8 opens and 8 closes, fewer writes

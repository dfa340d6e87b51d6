"""Session ordering (design S7) and authenticated acks (docs/security.md, section 4).

The ordering tests drive a real Applier on a VMDK volume with a durable state; the
ack tests use the master target's own MACs (``Applier.ack_mac``) as the oracle of
what a genuine ack is, and check that the source acts on nothing else.
"""

from __future__ import annotations

import itertools
import threading
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY

from agents.source_agent.client import PairOptions, Replicator
from replication import wire
from replication.acks import AckAuthenticator
from replication.applier import Applier
from replication.disks import open_disk
from replication.errors import (
    ForgedAckError,
    ProtocolVersionError,
    StaleSessionError,
)
from replication.frame import FrameEncoder
from replication.ordering import SessionCounter
from replication.protocol import (
    REQUIRED_BY_SOURCE,
    SUPPORTED_FEATURES,
    AckLevel,
    Agreed,
    Feature,
)
from replication.source import SourceSession
from replication.volumes import VolumeRegistry, volume_disk_id

SECRET = b"s" * 32
BS = 65536
SIZE = 8 * BS


@pytest.fixture
def store(tmp_path: Path) -> VolumeRegistry:
    (tmp_path / "store").mkdir()
    registry = VolumeRegistry({}, tmp_path / "store")
    registry.create("vm1", SIZE)
    return registry


def _applier(store: VolumeRegistry, tmp_path: Path) -> Applier:
    return Applier(store, tmp_path / "state.db", SECRET)


def _send(applier: Applier, enc: FrameEncoder, seq: int, block: int, data: bytes) -> None:
    applier.open_session("vm1", enc.session_salt, BS, SIZE)
    applier.apply("vm1", enc.session_salt, seq, enc.encode(seq, block * BS, data))
    applier.commit()


def _block(store: VolumeRegistry, block: int, n: int) -> bytes:
    with open_disk(store.path("vm1")) as disk:
        return disk.read(block * BS, n)


# --- the source's counter ----------------------------------------------------------------


def test_the_counter_never_repeats_across_restarts_and_clock_steps_back(tmp_path) -> None:
    clock = [1000]
    first = SessionCounter(tmp_path / "orders", clock=lambda: clock[0])
    assert [first.next("vm1"), first.next("vm1")] == [1000, 1001]
    assert first.next("vm2") == 1000  # per volume
    clock[0] = 5  # the clock stepped back, the agent restarted
    again = SessionCounter(tmp_path / "orders", clock=lambda: clock[0])
    assert again.next("vm1") == 1002
    clock[0] = 9000  # the clock moves past the stored number: it wins
    assert again.next("vm1") == 9000
    assert (tmp_path / "orders" / "vm1.order").read_text() == "9000\n"


def test_a_counter_file_that_was_tampered_with_is_a_typed_error(tmp_path) -> None:
    (tmp_path / "vm1.order").write_text("not a number\n")
    with pytest.raises(Exception) as info:
        SessionCounter(tmp_path).next("vm1")
    assert getattr(info.value, "code", None) == "config.invalid"


# --- the master target's ordering ---------------------------------------------------------


def test_ordering_survives_a_restart_of_the_master_target(store, tmp_path) -> None:
    old = FrameEncoder(SECRET, volume_disk_id("vm1"), order=7)
    new = FrameEncoder(SECRET, volume_disk_id("vm1"), order=8)
    with _applier(store, tmp_path) as applier:
        _send(applier, old, 1, 1, b"old" * 100)
        stale = old.encode(2, 1 * BS, b"stale" * 100)
        _send(applier, new, 1, 1, b"new" * 100)
    with _applier(store, tmp_path) as applier:  # a restarted master target
        with pytest.raises(StaleSessionError):
            applier.open_session("vm1", old.session_salt, BS, SIZE)
        applier.open_session("vm1", new.session_salt, BS, SIZE)  # the newest resumes
    assert _block(store, 1, 3) == b"new"
    assert stale  # sealed, never applied


def test_an_open_with_a_made_up_order_cannot_lock_the_source_out(store, tmp_path) -> None:
    genuine = FrameEncoder(SECRET, volume_disk_id("vm1"), order=10)
    with _applier(store, tmp_path) as applier:
        _send(applier, genuine, 1, 0, b"first" * 10)
        forged_salt = (2**64 - 1).to_bytes(8, "big") + bytes(8)  # a relay's invention
        applier.open_session("vm1", forged_salt, BS, SIZE)  # opens: it proves nothing yet
        assert applier.commit() == {}
        after = FrameEncoder(SECRET, volume_disk_id("vm1"), order=11)
        _send(applier, after, 1, 0, b"later" * 10)  # not locked out
    assert _block(store, 0, 5) == b"later"


def test_unordered_sessions_work_until_an_ordered_one_writes(store, tmp_path) -> None:
    with _applier(store, tmp_path) as applier:
        legacy = FrameEncoder(SECRET, volume_disk_id("vm1"))  # an older source
        _send(applier, legacy, 1, 2, b"legacy" * 10)
        _send(applier, FrameEncoder(SECRET, volume_disk_id("vm1"), order=3), 1, 2, b"ordered")
        with pytest.raises(StaleSessionError, match="unordered"):
            applier.apply("vm1", legacy.session_salt, 2, legacy.encode(2, 2 * BS, b"x" * 7))
    assert _block(store, 2, 7) == b"ordered"


# --- acks -------------------------------------------------------------------------------


def test_forged_tampered_and_foreign_acks_are_refused() -> None:
    salt, other = bytes(range(16)), bytes(range(1, 17))
    genuine = AckAuthenticator(SECRET, "vm1", salt)
    mac = genuine.mac(5)
    assert genuine.check(5, AckLevel.PERSISTED, mac)
    assert not genuine.check(5, AckLevel.PERSISTED, b"")  # none: proves nothing
    forged = [
        (6, AckLevel.PERSISTED, mac),  # moved to a later seq
        (5, AckLevel.RECEIVED, mac),  # another kind
        (5, AckLevel.PERSISTED, bytes(16)),  # made up
        (5, AckLevel.PERSISTED, mac[:-1] + bytes([mac[-1] ^ 1])),  # one bit flipped
        (5, AckLevel.PERSISTED, AckAuthenticator(SECRET, "vm1", other).mac(5)),  # replayed
        (5, AckLevel.PERSISTED, AckAuthenticator(SECRET, "vm2", salt).mac(5)),  # other volume
        (5, AckLevel.PERSISTED, AckAuthenticator(b"x" * 32, "vm1", salt).mac(5)),  # other key
    ]
    for seq, level, bad in forged:
        with pytest.raises(ForgedAckError):
            genuine.check(seq, level, bad)


def _session(tmp_path: Path, frames: int = 3) -> SourceSession:
    disk_path = tmp_path / "src.raw"
    disk_path.write_bytes(bytes(range(256)) * (2 * frames * BS // 256))
    disk = open_disk(str(disk_path))
    s = SourceSession(disk, "vm1", SECRET, block_size=BS, order=5, authenticate_acks=True)
    s.plan_blocks(np.arange(0, 2 * frames, 2), 2 * frames)  # not adjacent: a frame each
    assert len(s.next_frames()) == frames
    return s


def test_the_source_drops_frames_only_on_the_master_targets_mac(store, tmp_path) -> None:
    s = _session(tmp_path)
    with _applier(store, tmp_path) as applier:  # the oracle: what the master target signs
        real = applier.ack_mac("vm1", s.session, 2)
    assert not s.on_ack(2, AckLevel.PERSISTED)  # no MAC (a relay that has none)
    assert s.on_ack(3, AckLevel.RECEIVED)  # the relay's own: flow only
    with pytest.raises(ForgedAckError):
        s.on_ack(3, AckLevel.PERSISTED, real)  # a genuine MAC moved to another seq
    assert [seq for seq, _ in s.resend_after(2, b"")] == [1, 2, 3]  # nothing dropped
    assert s.stats.persisted_seq == 0 and s.stats.unauthenticated_acks == 2
    assert s.on_ack(2, AckLevel.PERSISTED, real)
    assert [seq for seq, _ in s.resend_after(0)] == [3]
    s.disk.close()


class _Call:
    """A finished streaming call that yields its acks (what grpc returns, minus the wire)."""

    def __init__(self, acks: list) -> None:
        self._acks = iter(acks)

    def __iter__(self):
        return self._acks

    def cancel(self) -> None:
        pass


class _ForgingRelay:
    """A process-server stub whose Replicate answers with a PERSISTED ack it made up."""

    def __init__(self, session: SourceSession, mac: bytes) -> None:
        self.ack = wire.AckMsg("vm1", session.session, session.last_seq, AckLevel.PERSISTED, mac)

    def Replicate(self, requests, timeout=None):
        # gRPC would read the requests on its own thread: the Open, then frames
        threading.Thread(target=lambda: list(itertools.islice(requests, 50)), daemon=True).start()
        return _Call([wire.ack_to_pb(self.ack)])


def test_a_forged_ack_ends_the_session_counted_and_drops_nothing(tmp_path) -> None:
    def rejected() -> float:
        sample = {"code": "ack.forged"}
        return REGISTRY.get_sample_value("replication_rejected_acks_total", sample) or 0

    s = _session(tmp_path)
    before = rejected()
    relay = _ForgingRelay(s, bytes(16))
    with pytest.raises(ForgedAckError):
        Replicator(s, relay, PairOptions(block_size=BS, deadline=10)).run()
    assert rejected() == before + 1
    assert [seq for seq, _ in s.resend_after(0)] == [1, 2, 3]
    assert s.stats.persisted_seq == 0 and not s.complete()
    s.disk.close()


def test_a_source_refuses_a_relay_without_ordering_or_ack_macs() -> None:
    Agreed(1, SUPPORTED_FEATURES).require(REQUIRED_BY_SOURCE, "process server")
    for missing in (Feature.SESSION_ORDER, Feature.ACK_MAC):
        with pytest.raises(ProtocolVersionError, match=missing.name):
            Agreed(1, SUPPORTED_FEATURES & ~missing).require(REQUIRED_BY_SOURCE, "relay")

"""A process server whose spool holds an old session's tail cannot roll blocks back.

Real agent processes (``cluster`` in conftest.py). Session A (order 5) is spooled by
a process server whose master target is down; then session B (order 6) of the same
volume writes the same block straight at the master target (what a source that
restarted elsewhere would do). When the process server comes back it forwards A's
tail: the master target refuses it (``session.stale``), the process server parks
it, and ``qemu-img compare`` shows B's block, not A's. B's PERSISTED ack carries
the master target's MAC, verified here with the source's own check.
"""

from __future__ import annotations

import pytest

from replication import wire
from replication.acks import AckAuthenticator
from replication.certs import load_identity
from replication.config import load_passphrase
from replication.frame import FrameEncoder
from replication.protocol import AckLevel
from replication.tls import secure_channel
from replication.v1 import data_pb2_grpc
from replication.volumes import volume_disk_id
from tests.helpers import qemu_compare

pytestmark = [pytest.mark.oracle, pytest.mark.timeout(180)]

BS = 65536
SIZE = 16 * BS


def _messages(enc: FrameEncoder, frames: list[tuple[int, bytes]]):
    yield wire.source_message_to_pb(wire.OpenMsg("vol1", enc.session_salt, BS, SIZE, 1))
    for seq, (block, data) in enumerate(frames, 1):
        yield wire.source_message_to_pb(wire.FrameMsg(seq, enc.encode(seq, block * BS, data)))


def test_an_old_sessions_spooled_tail_is_refused_and_parked(cluster) -> None:
    secret = load_passphrase(cluster.tls / "passphrase")
    volume = cluster.make_volume(cluster.root / "target.vmdk", SIZE)
    mt = cluster.master_target(volume)
    mt.stop()  # down: what the process server spools stays there
    ps = cluster.process_server(mt.port)
    old = FrameEncoder(secret, volume_disk_id("vol1"), order=5)
    source = load_identity(cluster.tls, "source")
    with secure_channel(f"127.0.0.1:{ps.port}", source, expect_role="process-server") as ch:
        acks = data_pb2_grpc.ProcessServerStub(ch).Replicate(
            _messages(old, [(0, b"O" * BS), (1, b"O" * BS)]), timeout=30
        )
        received = [wire.ack_from_pb(a) for a in acks]
    assert received[-1].level == AckLevel.RECEIVED and received[-1].seq == 2
    ps.stop()

    mt = cluster.restart(mt)
    new = FrameEncoder(secret, volume_disk_id("vol1"), order=6)  # the source restarted
    relay = load_identity(cluster.tls, "process-server")
    with secure_channel(f"127.0.0.1:{mt.port}", relay, expect_role="master-target") as ch:
        call = data_pb2_grpc.MasterTargetStub(ch).Apply(
            _messages(new, [(0, b"N" * BS)]), timeout=30
        )
        persisted = wire.ack_from_pb(next(iter(call)))
        call.cancel()
    assert persisted.seq == 1
    assert AckAuthenticator(secret, "vol1", new.session_salt).check(
        1, persisted.level, persisted.mac
    )

    ps = cluster.process_server(mt.port)  # same spool: forwards A's tail now
    parked = cluster.wait_for(
        lambda: [p for p in cluster.status(ps.port).problems if "parked" in p],
        60,
        "the old session to be parked",
    )
    assert "session.stale" in parked[0], parked  # type: ignore[index]
    assert cluster.status(ps.port).spool_bytes > 0  # kept, not forwarded, not dropped
    mt.stop()  # the volume is closed and flushed: compare what is on disk
    expected = cluster.root / "expected.raw"
    with open(expected, "wb") as f:
        f.truncate(SIZE)
        f.write(b"N" * BS)
    result = qemu_compare(expected, volume, "vmdk")
    assert result.returncode == 0, result.stdout + result.stderr

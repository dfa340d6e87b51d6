"""A process server whose spool holds an old session's tail cannot roll blocks back.

Real agent processes (``cluster`` in conftest.py). Session A (order 5) is spooled by
a process server whose master target is down; then session B (order 6) of the same
volume writes the same block straight at the master target (what a source that
restarted elsewhere would do). When the process server comes back it forwards A's
tail: the master target refuses it (``session.stale``), and ``qemu-img compare``
shows B's block, not A's. B's PERSISTED ack carries the master target's MAC,
verified here with the source's own check.

A's frames can never be applied and B covers their blocks (design F6), so the
process server drops A's spool instead of parking it for ever: the spool empties,
no problem stays in its ``Status``, the drop is logged and counted
(``replication_stale_sessions_dropped_total``), A's source is refused if it comes
back, and a restart does not bring A back.
"""

from __future__ import annotations

import grpc
import pytest

from replication import wire
from replication.acks import AckAuthenticator
from replication.certs import load_identity
from replication.config import load_passphrase
from replication.frame import FrameEncoder
from replication.protocol import AckLevel
from replication.server import error_code_of
from replication.tls import secure_channel
from replication.v1 import data_pb2_grpc
from replication.volumes import volume_disk_id
from tests.e2e.test_fault_detection import metric
from tests.helpers import qemu_compare

pytestmark = [pytest.mark.oracle, pytest.mark.timeout(180)]

BS = 65536
SIZE = 16 * BS


def _messages(enc: FrameEncoder, frames: list[tuple[int, bytes]]):
    yield wire.source_message_to_pb(wire.OpenMsg("vol1", enc.session_salt, BS, SIZE, 1))
    for seq, (block, data) in enumerate(frames, 1):
        yield wire.source_message_to_pb(wire.FrameMsg(seq, enc.encode(seq, block * BS, data)))


def test_an_old_sessions_spooled_tail_is_refused_and_dropped(cluster) -> None:
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
    dropped = cluster.wait_for(
        lambda: "event=stale_session_dropped" in ps.log.read_text(),
        60,
        "the old session to be dropped",
    )
    assert dropped
    log = ps.log.read_text()
    assert f"session={old.session_salt.hex()} frames=2" in log, log
    assert "session.stale" in mt.log.read_text()  # the master target's refusal, not a guess
    status = cluster.status(ps.port)
    assert not [p for p in status.problems if "vol1" in p], status.problems
    assert status.spool_bytes == 0  # the old tail is gone, nothing else was spooled
    cluster.wait_for(
        lambda: cluster.spool_bytes(cluster.root / "spool") == 0, 10, "segments deleted"
    )
    assert metric(ps, "replication_stale_sessions_dropped_total") == 1
    assert metric(ps, "replication_parked_sessions") == 0

    # A's source comes back with more of A: refused with session.stale, nothing spooled
    with secure_channel(f"127.0.0.1:{ps.port}", source, expect_role="process-server") as ch:
        more = [  # its next frame (the encoder never seals a seq twice, design S6)
            wire.source_message_to_pb(wire.OpenMsg("vol1", old.session_salt, BS, SIZE, 1)),
            wire.source_message_to_pb(wire.FrameMsg(3, old.encode(3, 2 * BS, b"O" * BS))),
        ]
        call = data_pb2_grpc.ProcessServerStub(ch).Replicate(iter(more), timeout=30)
        with pytest.raises(grpc.RpcError) as refused:
            list(call)
    assert error_code_of(refused.value) == "session.stale", refused.value
    assert cluster.status(ps.port).spool_bytes == 0

    # a restart finds nothing of A to forward: no new refusal at the master target
    refusals = mt.log.read_text().count("session.stale")
    ps.stop()
    ps = cluster.process_server(mt.port)  # the same spool
    cluster.wait_for(lambda: not cluster.status(ps.port).problems, 30, "no problems")
    assert mt.log.read_text().count("session.stale") == refusals
    assert "stale_session_dropped" not in ps.log.read_text().split("event=listening")[-1]

    mt.stop()  # the volume is closed and flushed: compare what is on disk
    expected = cluster.root / "expected.raw"
    with open(expected, "wb") as f:
        f.truncate(SIZE)
        f.write(b"N" * BS)
    result = qemu_compare(expected, volume, "vmdk")
    assert result.returncode == 0, result.stdout + result.stderr

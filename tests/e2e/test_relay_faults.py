"""The process server under faults: permanent refusals are parked, a full spool pushes back.

Real agent processes on loopback with mutual TLS (``cluster`` in conftest.py);
judged from outside: the source's exit status and message, the process server's
``Control.Status``, its metrics and log, the spool's files, ``qemu-img compare``.
"""

from __future__ import annotations

import time

import grpc
import pytest

from tests import ledger
from tests.helpers import qemu_compare
from tests.proxy import FaultProxy

pytestmark = [pytest.mark.oracle, pytest.mark.timeout(120)]

MiB = 1 << 20
SIZE = 64 * MiB


def test_a_permanent_refusal_parks_the_session_and_stops_the_source(cluster):
    source = cluster.make_source("source.raw", SIZE, 8 * MiB)
    volume = cluster.make_volume(cluster.root / "target.vmdk", SIZE)
    other = cluster.root / "other-passphrase"
    other.write_text("ab" * 32)
    other.chmod(0o600)
    mt = cluster.master_target(volume, passphrase_file=other)  # not the source's key
    ledger.tried("network and device faults", "permanent refusal (another key)")
    ps = cluster.process_server(mt.port)
    began = time.monotonic()
    src = cluster.source(ps.port, source, deadline=120)
    assert src.wait(timeout=60) != 0
    # a clear, typed refusal, long before the source's deadline
    assert time.monotonic() - began < 30
    out = cluster.source_log()
    assert "frame.auth" in out and "Traceback" not in out, out
    status = cluster.status(ps.port)
    parked = [p for p in status.problems if "parked" in p]
    assert len(parked) == 1 and "vol1" in parked[0] and "frame.auth" in parked[0], status
    # nothing dropped: the frames are still spooled
    assert status.spool_bytes > 0
    assert cluster.spool_bytes(cluster.root / "spool") == status.spool_bytes
    assert "replication_parked_sessions 1.0" in cluster.metrics(ps)
    assert "event=session_parked" in ps.log.read_text()
    # and no more attempts: the master target refuses nothing new
    refusals = mt.log.read_text().count("rpc refused")
    time.sleep(1.5)
    assert mt.log.read_text().count("rpc refused") == refusals
    ledger.lost_nothing("network and device faults")  # every frame still spooled


def test_a_full_spool_pushes_the_source_back_and_loses_nothing(cluster):
    limit = 4 * MiB
    data = SIZE  # every block differs: 64 frames of 1 MiB
    source = cluster.make_source("source.raw", SIZE, data)
    volume = cluster.make_volume(cluster.root / "target.vmdk", SIZE)
    mt = cluster.master_target(volume)
    to_mt = FaultProxy(mt.port)
    ps = cluster.process_server(to_mt.port, spool_limit="4M")
    to_ps = FaultProxy(ps.port)
    try:
        src = cluster.source(to_ps.port, source, deadline=120)
        cluster.wait_for(lambda: to_ps.bytes_up > MiB, 30, "frames to flow")
        to_mt.stall(True)  # the master target stops answering: nothing gets persisted
        ledger.tried("network and device faults", "spool at its limit (MT stalled)")
        at_stall = to_ps.bytes_up
        largest, sent = _watch_backpressure(cluster, to_ps, settle=1.5, timeout=30)
        assert src.poll() is None, cluster.source_log()  # pushed back, not failed
        assert largest <= limit + MiB  # the limit, plus at most one segment
        assert cluster.status(ps.port).spool_bytes <= limit
        # the source could not just pour the rest out: what crossed after the stall is
        # bounded by the spool limit plus what sits in flight (frames the process server
        # reads ahead, HTTP/2 windows, socket buffers), whatever the machine's speed
        assert sent < data and sent - at_stall < limit + 24 * MiB, (at_stall, sent)
        to_mt.stall(False)
        assert src.wait(timeout=90) == 0, cluster.source_log()
    finally:
        ledger.wire(to_ps)
        to_ps.close()
        to_mt.close()
    cluster.stop()
    cmp = qemu_compare(source, volume, "vmdk")
    assert cmp.returncode == 0, cmp.stdout
    ledger.lost_nothing("network and device faults")


def _watch_backpressure(cluster, to_ps: FaultProxy, *, settle: float, timeout: float):
    """Sample the spool until the source's bytes stop growing; return (max spool, sent)."""
    spool_dir = cluster.root / "spool"
    largest, last, quiet_since = 0, -1, time.monotonic()
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        largest = max(largest, cluster.spool_bytes(spool_dir))
        if to_ps.bytes_up != last:
            last, quiet_since = to_ps.bytes_up, time.monotonic()
        elif time.monotonic() - quiet_since > settle:
            return largest, last
        time.sleep(0.05)
    raise AssertionError(f"the source never stopped sending ({to_ps.bytes_up} bytes)")


def test_the_process_server_serves_health_and_status(cluster):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from replication.certs import load_identity
    from replication.tls import secure_channel
    from replication.v1 import common_pb2, control_pb2, control_pb2_grpc

    ps = cluster.process_server(1)  # no master target: a status question needs none
    ident = load_identity(cluster.tls, "orchestrator")
    with secure_channel(f"127.0.0.1:{ps.port}", ident) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=10
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        control = control_pb2_grpc.ControlStub(channel)
        status = control.Status(control_pb2.StatusRequest(), timeout=10)
        assert status.role == common_pb2.ROLE_PROCESS_SERVER
        assert status.spool_bytes == 0
        # its only problem, once probed: no master target answers at port 1 (design F4)
        assert all(p.startswith("master target 127.0.0.1:1 unreachable") for p in status.problems)
        with pytest.raises(grpc.RpcError) as info:
            control.ListVolumes(control_pb2.ListVolumesRequest(), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "replication_parked_sessions 0.0" in cluster.metrics(ps)

"""Failures of the process server's hop to the master target reach the source as themselves.

The process server relays ``GetHashMap`` (design F5). What fails on *its* channel to
the master target is not the source's doing: a typed error of that channel (the
server at the master target's address proves another role: ``tls.server_role``)
reaches the source with its code and a status other than UNKNOWN, and a failed TLS
handshake between the process server and the master target comes with the relay's
retryable ``relay.target_unreachable``, so the source keeps retrying (and says why)
instead of taking it for a refusal of its own certificate, which ends at once.

Real agent processes on loopback with mutual TLS (``cluster`` in conftest.py); the
wrong-role "master target" is a real gRPC server of this build started by the test
with a source certificate (as in ``unit/test_server_role.py``).
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator

import pytest

from replication import certs, wire
from replication.protocol import Hello
from replication.server import create_server
from replication.v1 import data_pb2, data_pb2_grpc
from tests.e2e.agents import init_tls, replication, start
from tests.e2e.test_fault_detection import (
    CLEAR,
    DETECT,
    control,
    disks,
    pair,
    process_server,
    source_daemon,
    stop_all,
    within,
)
from tests.e2e.test_replication import source_args
from tests.helpers import qemu_compare

pytestmark = [pytest.mark.oracle, pytest.mark.timeout(180)]


class _PosingTarget(data_pb2_grpc.MasterTargetServicer):
    """Answers like a master target, whatever certificate it serves with."""

    def Handshake(self, request, context):
        return wire.hello_to_pb(Hello(role="master-target"))

    def GetHashMap(self, request, context):
        yield data_pb2.HashMapChunk(first_block=0, digests=b"\x01" * 16, block_count=1)


@contextlib.contextmanager
def _posing_target(identity: certs.Identity) -> Iterator[int]:
    def add(server) -> None:
        data_pb2_grpc.add_MasterTargetServicer_to_server(_PosingTarget(), server)

    server, port, _ = create_server("127.0.0.1:0", identity, add, workers=4)
    try:
        yield port
    finally:
        server.stop(grace=None)


def _source_once(cluster, ps_port: int, disk, tls=None) -> subprocess.CompletedProcess[str]:
    args = source_args(tls or cluster.tls, ps_port, f"vol1={disk}", 60)
    return subprocess.run(replication(*args), capture_output=True, text=True, timeout=90)


def test_a_wrong_role_master_target_reaches_the_source_with_its_code(cluster):
    source, _volume = disks(cluster)
    posing = certs.load_identity(cluster.tls, "source", "localhost")
    with _posing_target(posing) as port:
        ps = process_server(cluster, port)
        done = _source_once(cluster, ps.port, source)
        # the probe says it too, not as a crash of its own (design F4)
        with control(cluster, ps) as ps_client:
            within(
                DETECT,
                lambda: any("tls.server_role" in p for p in ps_client.status().problems),
                "the process server's problem line",
            )
    out = done.stdout + done.stderr
    assert done.returncode != 0, out
    assert "tls.server_role" in out and "process server -> master target" in out, out
    assert "Exception iterating" not in out and "UNKNOWN" not in out, out
    assert "event=retry" not in out, out  # permanent: not retried until the deadline
    assert "Traceback" not in out
    log = ps.log.read_text()
    assert "event=relay_failed code=tls.server_role" in log, log
    assert "Traceback" not in log
    stop_all(cluster)


def test_a_tls_failure_between_relay_and_master_target_is_retried_not_taken_as_the_sources(
    cluster,
):
    source, volume = disks(cluster)
    foreign = init_tls(cluster.root / "foreign-tls")  # another CA: no handshake with ours
    mt_args = ["--data-dir", str(cluster.root / "mt"), "--volume", f"vol1={volume}"]
    bad = start(
        replication("master-target", "--listen", "127.0.0.1:0", "--tls-dir", str(foreign),
                    *mt_args),
        cluster.root / "mt.log",
    )  # fmt: skip
    cluster.agents.append(bad)
    ps = process_server(cluster, bad.port)

    # the source's own TLS refused (its certificate from the other CA): ends at once
    own = _source_once(cluster, ps.port, source, tls=foreign)
    assert own.returncode != 0 and "event=retry" not in own.stdout + own.stderr

    # the relay's hop refused: the source keeps retrying and its pair says why
    src = source_daemon(cluster, ps.port, f"vol1={source}")
    src_client = control(cluster, src)
    line = within(
        DETECT * 3,
        lambda: "attempt 3 failed, retrying" in (pair(src_client, "vol1").error or ""),
        "three failed plan attempts, each retried",
    )
    assert line is not None
    info = pair(src_client, "vol1")
    assert info.state != "error", info
    said = info.error.lower()
    assert "master target" in said and ("ssl" in said or "certificate" in said), info.error
    assert "event=relay_failed status=UNAVAILABLE code=relay.target_unreachable" in (
        ps.log.read_text()
    )

    # the fix: the master target with this deployment's certificates, on the same port
    bad.stop()
    good = start(
        replication("master-target", "--listen", f"127.0.0.1:{bad.port}", "--tls-dir",
                    str(cluster.tls), *mt_args),
        cluster.root / "mt.log",
    )  # fmt: skip
    cluster.agents.append(good)
    within(CLEAR, lambda: pair(src_client, "vol1").state == "protected", "the pair protected")
    assert pair(src_client, "vol1").error == ""
    src_client.close()
    stop_all(cluster)
    assert qemu_compare(source, volume, "vmdk").returncode == 0

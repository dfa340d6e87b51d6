"""Source agent -> process server -> master target, as real processes with real TLS.

A fixed VHD (the Azure side) and an on-prem VMDK that differs in about 1 % of
blocks; the source agent runs ``--once``. Judged from outside: ``qemu-img
compare``, bytes counted by a proxy between source and process server, the spool's
files searched for a plaintext marker.
"""

from __future__ import annotations

import random
import re
import subprocess
import time
from pathlib import Path

import pytest
import zstandard

from tests.e2e.agents import init_tls, master_target, process_server, replication, restart, start
from tests.helpers import qemu_compare, qemu_convert, require
from tests.proxy import FaultProxy

pytestmark = pytest.mark.oracle

SIZE = 1 << 30
BLOCK = 65536
MARKER = random.Random(99).randbytes(BLOCK)


def make_pair(d: Path, seed: int = 1) -> tuple[Path, Path, Path, list[int]]:
    """Return (source.vhd, target.vmdk, expected.raw, changed block indexes)."""
    rng = random.Random(seed)
    base = d / "base.raw"
    with open(base, "wb") as f:
        f.truncate(SIZE)
        for i in range(0, SIZE // BLOCK, 16):  # one block in 16 holds data
            f.seek(i * BLOCK)
            f.write(rng.randbytes(BLOCK // 2) + b"log line\n" * (BLOCK // 18) + b"\0" * 8)
    new = d / "new.raw"
    subprocess.run(["cp", "--sparse=always", str(base), str(new)], check=True)
    changed = sorted(rng.sample(range(SIZE // BLOCK), SIZE // BLOCK // 100))
    with open(new, "r+b") as f:
        for n, i in enumerate(changed):
            f.seek(i * BLOCK)
            f.write(MARKER if n == 0 else rng.randbytes(BLOCK))
    vhd, vmdk = d / "source.vhd", d / "target.vmdk"
    qemu_convert(new, vhd, "vpc", "subformat=fixed,force_size=on")
    qemu_convert(base, vmdk, "vmdk", "subformat=monolithicSparse")
    return vhd, vmdk, new, changed


@pytest.fixture
def deployment(tmp_path):
    require("qemu-img")
    tls = init_tls(tmp_path / "tls")
    vhd, vmdk, expected, changed = make_pair(tmp_path)
    mt = start(master_target(tmp_path, tls, "--volume", f"vol1={vmdk}"), tmp_path / "mt.log")
    ps = start(process_server(tmp_path, tls, mt.port), tmp_path / "ps.log")
    proxy = FaultProxy(ps.port)
    agents = {"mt": mt, "ps": ps}
    yield tmp_path, tls, vhd, vmdk, expected, changed, proxy, agents
    proxy.close()
    for a in agents.values():
        a.stop()


def source_args(tls: Path, port: int, disk: str, deadline: int) -> list[str]:
    """The source agent's arguments: one disk, --once, through 127.0.0.1:port."""
    return [
        "source-agent",
        "--process-server",
        f"127.0.0.1:{port}",
        "--tls-dir",
        str(tls),
        "--disk",
        disk,
        "--once",
        "--deadline",
        str(deadline),
    ]


def run_source(
    tls: Path, port: int, vhd: Path, timeout: float = 300
) -> subprocess.CompletedProcess:
    return subprocess.run(
        replication(*source_args(tls, port, f"vol1={vhd}", 120)),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def compressed_changed_bytes(expected: Path, changed: list[int]) -> int:
    """zstd -1 size of each changed block (never more than the block: raw is stored)."""
    cctx = zstandard.ZstdCompressor(level=1)
    total = 0
    with open(expected, "rb") as f:
        for i in changed:
            f.seek(i * BLOCK)
            total += min(BLOCK, len(cctx.compress(f.read(BLOCK))))
    return total


def start_source_mid_stream(tls: Path, proxy: FaultProxy, vhd: Path, *, deadline: int):
    """Start the source behind a slow proxy; return once frames flow, the source still busy."""
    proxy.delay = 0.05  # a slow link, so the faults land mid-stream
    src = subprocess.Popen(
        replication(*source_args(tls, proxy.port, f"vol1={vhd}", deadline)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    give_up = time.monotonic() + 60
    while proxy.bytes_up < 300_000 and time.monotonic() < give_up:
        time.sleep(0.05)
    assert src.poll() is None, "the source finished before the faults: nothing was tested"
    return src


def test_resync_moves_only_the_delta_and_leaves_the_target_identical(deployment):
    tmp_path, tls, vhd, vmdk, expected, changed, proxy, agents = deployment
    proc = run_source(tls, proxy.port, vhd)
    assert proc.returncode == 0, proc.stderr
    for a in agents.values():
        a.stop()
    cmp = qemu_compare(expected, vmdk, "vmdk")
    assert cmp.returncode == 0, cmp.stdout
    wire_bytes = proxy.bytes_up + proxy.bytes_down
    budget = compressed_changed_bytes(expected, changed) + 16 * (SIZE // BLOCK)
    assert wire_bytes <= 1.2 * budget, (wire_bytes, budget)
    # the process server never held plaintext: the marker block is not in its spool
    spool = b"".join(p.read_bytes() for p in (tmp_path / "spool").rglob("*") if p.is_file())
    assert spool and MARKER[:4096] not in spool


def test_a_cut_and_a_killed_master_target_lose_nothing(deployment):
    _, tls, vhd, vmdk, expected, _, proxy, agents = deployment
    src = start_source_mid_stream(tls, proxy, vhd, deadline=200)
    proxy.stall(True)  # a dead link first: connections open, nothing moves
    time.sleep(1.0)
    proxy.stall(False)
    proxy.cut()
    agents["mt"].kill()
    agents["mt"] = restart(agents["mt"], agents["mt"].port)
    proxy.delay = 0
    _, err = src.communicate(timeout=280)
    assert src.returncode == 0, err
    for a in agents.values():
        a.stop()
    assert qemu_compare(expected, vmdk, "vmdk").returncode == 0


def test_a_foreign_certificate_is_refused(deployment, tmp_path_factory):
    _, _, vhd, _, _, _, proxy, _ = deployment
    other = init_tls(tmp_path_factory.mktemp("other") / "tls")
    proc = run_source(other, proxy.port, vhd, timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr


def test_an_unregistered_volume_is_refused(deployment):
    _, tls, vhd, _, _, _, proxy, _ = deployment
    proc = subprocess.run(
        replication(*source_args(tls, proxy.port, f"nosuch={vhd}", 30)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "volume" in proc.stderr.lower() and "Traceback" not in proc.stderr


def test_a_killed_process_server_replays_its_spool(deployment):
    _, tls, vhd, vmdk, expected, _, proxy, agents = deployment
    src = start_source_mid_stream(tls, proxy, vhd, deadline=60)
    agents["ps"].kill()
    agents["ps"] = restart(agents["ps"], agents["ps"].port)
    proxy.delay = 0
    _, err = src.communicate(timeout=150)
    assert src.returncode == 0, err
    for a in agents.values():
        a.stop()
    assert qemu_compare(expected, vmdk, "vmdk").returncode == 0


def test_health_and_metrics_endpoints(tmp_path):
    import urllib.request

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from replication.certs import load_identity
    from replication.tls import secure_channel

    tls = init_tls(tmp_path / "tls")
    raw = tmp_path / "v.raw"
    raw.write_bytes(b"\0" * (1 << 20))
    mt = start(
        replication(
            "master-target",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            str(tmp_path / "mt"),
            "--tls-dir",
            str(tls),
            "--volume",
            f"v={raw}",
            "--metrics-listen",
            "127.0.0.1:0",
        ),
        tmp_path / "mt.log",
    )
    try:
        metrics_port = int(re.search(r"metrics_port=(\d+)", mt.log.read_text()).group(1))
        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10)
        text = body.read().decode()
        assert "replication_frames_total" in text and "replication_spool_bytes" in text
        ident = load_identity(tls, "orchestrator")
        with secure_channel(f"127.0.0.1:{mt.port}", ident) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        mt.stop()


# The source runs with AES-GCM replaced by an identity "cipher" (a test-only patch
# applied in this wrapper, not a product switch): frames then carry plaintext.
_PLAINTEXT_SOURCE = """
import sys
import replication.frame as frame

class NoCipher:
    def __init__(self, key):
        pass

    def encrypt(self, nonce, data, aad):
        return bytes(data) + bytes(16)

frame.AESGCM = NoCipher
from replication.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_the_spool_check_can_fail_when_encryption_is_off(deployment):
    """Counter-test of the marker check above: without encryption the marker is found."""
    import sys

    tmp_path, tls, vhd, _, _, _, proxy, _ = deployment
    proc = subprocess.run(
        [sys.executable, "-c", _PLAINTEXT_SOURCE, *source_args(tls, proxy.port, f"vol1={vhd}", 15)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0  # the master target refuses unauthenticated frames
    spool = b"".join(p.read_bytes() for p in (tmp_path / "spool").rglob("*") if p.is_file())
    assert MARKER[:4096] in spool

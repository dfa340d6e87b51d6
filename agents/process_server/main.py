"""``replication process-server``: the relay on port 9443 that spools ciphertext."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from replication.certs import load_identity
from replication.logs import setup_logging
from replication.server import create_server, start_metrics, wait_for_signal
from replication.spool import DEFAULT_SEGMENT_SIZE, Spool
from replication.tls import secure_channel
from replication.v1 import control_pb2_grpc, data_pb2_grpc

from .liveness import CHANNEL_OPTIONS
from .relay import Relay
from .service import ProcessServerControl, ProcessServerService
from .watchdog import TargetProbe

#: RPC threads: every source's Replicate stream holds one for its whole life, so this
#: bounds the sources served at once (a fan-in of 100 sources needs 100 of them)
RPC_WORKERS = 256

DEFAULTS: dict[str, Any] = {
    "listen": "0.0.0.0:9443",
    "master_target": None,
    "master_target_host": "localhost",
    "spool_dir": Path("/var/lib/replication/spool"),
    "spool_limit": 8 << 30,
    "tls_dir": Path("/etc/replication/tls"),
    "host": "localhost",
    "metrics_listen": None,
}


def segment_size_for(limit: int) -> int:
    """Spool segment size: a sixteenth of the limit, 1 to 64 MiB.

    Space comes back a whole segment at a time (when all its frames are persisted),
    so a small spool needs small segments to free space while it keeps filling.
    """
    return max(1 << 20, min(DEFAULT_SEGMENT_SIZE, limit // 16))


def run(settings: dict[str, Any], stop: threading.Event | None = None) -> int:
    """Serve until SIGTERM/SIGINT (or ``stop``); return the exit status."""
    from replication.errors import UsageError

    log = setup_logging("process-server")
    if not settings["master_target"]:
        raise UsageError("--master-target ADDR is required")
    identity = load_identity(settings["tls_dir"], "process-server", settings["host"])
    spool_dir = Path(settings["spool_dir"])
    spool_dir.mkdir(parents=True, exist_ok=True)
    limit = int(settings["spool_limit"])
    spool = Spool.open(spool_dir, limit_bytes=limit, segment_size=segment_size_for(limit))
    channel = secure_channel(
        settings["master_target"],
        identity,
        server_host=settings["master_target_host"],
        options=CHANNEL_OPTIONS,  # keepalive: a dead link is closed within seconds
        expect_role="master-target",  # a certificate of another role is refused per call
    )
    stub = data_pb2_grpc.MasterTargetStub(channel)
    probe = TargetProbe(channel, settings["master_target"])
    relay = Relay(spool, spool_dir, lambda: stub, alive=probe.alive)

    def add(server):
        data_pb2_grpc.add_ProcessServerServicer_to_server(
            ProcessServerService(relay, lambda: stub), server
        )
        control_pb2_grpc.add_ControlServicer_to_server(ProcessServerControl(relay, probe), server)

    server, port, _ = create_server(settings["listen"], identity, add, workers=RPC_WORKERS)
    relay.resume_all()
    metrics = start_metrics(settings["metrics_listen"])
    log.info("event=listening port=%d metrics_port=%s spool=%s", port, metrics, spool_dir)
    wait_for_signal(stop)
    server.stop(grace=5).wait()
    probe.stop()
    relay.stop()
    channel.close()
    log.info("event=stopped")
    return 0

"""``replication master-target``: owns the volumes and applies frames to them."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from replication.applier import Applier
from replication.certs import load_identity
from replication.config import load_passphrase, parse_assignments, parse_duration
from replication.history import HistoryPolicy
from replication.logs import setup_logging
from replication.server import create_server, start_metrics, wait_for_signal
from replication.v1 import control_pb2_grpc, data_pb2_grpc
from replication.volumes import VolumeRegistry

from .service import ControlService, OpenVolumes, TrackedMasterTargetService

#: threads decoding frames besides the streams' readers. 0: each Apply stream's reader
#: thread decodes what it reads (AES-GCM, zstd and XXH3 release the GIL), overlapping
#: with the writes of the previous batch; a pool of 2 used 20-25 % more CPU for no
#: gain on this 2-core machine (docs/benchmarks.md)
DECODE_WORKERS = 0
#: RPC threads: every Apply stream (one per session being forwarded) holds one for its
#: whole life, so this bounds the sessions applied at once (fan-in of many sources)
RPC_WORKERS = 256

DEFAULTS: dict[str, Any] = {
    "listen": "0.0.0.0:9444",
    "data_dir": Path("/var/lib/replication/master-target"),
    "datastore": None,
    "tls_dir": Path("/etc/replication/tls"),
    "host": "localhost",
    "passphrase_file": None,
    "volume": [],
    "metrics_listen": None,
    "retention": 24 * 3600.0,
    "retention_bytes": 64 << 30,
    "crash_interval": 300.0,
}


def run(settings: dict[str, Any], stop: threading.Event | None = None) -> int:
    """Serve until SIGTERM/SIGINT (or ``stop``); return the exit status."""
    log = setup_logging("master-target")
    identity = load_identity(settings["tls_dir"], "master-target", settings["host"])
    secret = load_passphrase(
        settings["passphrase_file"] or Path(settings["tls_dir"]) / "passphrase"
    )
    data_dir = Path(settings["data_dir"])
    data_dir.mkdir(parents=True, exist_ok=True)
    registry = VolumeRegistry(
        dict(parse_assignments(settings["volume"], "--volume")),
        settings["datastore"],
        state_dir=data_dir,  # the volumes it released stay released after a restart
    )
    policy = HistoryPolicy(
        retention_seconds=parse_duration(settings["retention"]),
        retention_bytes=int(settings["retention_bytes"]),
        crash_interval=parse_duration(settings["crash_interval"]),
    )
    applier = Applier(
        registry,
        data_dir / "apply-state.sqlite",
        secret,
        history_dir=data_dir / "history",
        policy=policy,
        decode_workers=DECODE_WORKERS,
    )
    lock = threading.Lock()
    open_volumes = OpenVolumes()  # what ReleaseVolume must wait for

    def add(server):
        data_pb2_grpc.add_MasterTargetServicer_to_server(
            TrackedMasterTargetService(applier, lock, open_volumes), server
        )
        control_pb2_grpc.add_ControlServicer_to_server(
            ControlService(registry, applier, lock, open_volumes), server
        )

    server, port, _ = create_server(settings["listen"], identity, add, workers=RPC_WORKERS)
    metrics = start_metrics(settings["metrics_listen"])
    log.info(
        "event=listening port=%d metrics_port=%s volumes=%s",
        port,
        metrics,
        ",".join(registry.names()),
    )
    wait_for_signal(stop)
    server.stop(grace=5).wait()
    log.info("event=stopped")
    return 0

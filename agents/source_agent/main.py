"""``replication source-agent``: replicate local disks into master-target volumes.

Two modes. ``--once``: resync every disk into its volume, exit 0 when all is
PERSISTED (non-zero with the reason otherwise). Without it, a daemon: every disk
starts a pair to the volume of the same name (unless ``--idle``), and a control
listener (``--control-listen``, the scenario's port 443 role) lets an orchestrator
start, stop and watch pairs. Without ``--state-dir`` each pair re-syncs by hash
compare every ``--rescan-interval`` seconds. With it, every disk is tracked (a
crash-safe dirty bitmap in ``STATE_DIR/NAME``): writes must go through the agent,
via its NBD front end (``--nbd-listen``, one export per disk name), and pairs ship
consistent epochs of the changed blocks as they come.
"""

from __future__ import annotations

import contextlib
import threading
from functools import partial
from pathlib import Path
from typing import Any

from replication.blocks import DEFAULT_BLOCK_SIZE
from replication.certs import load_identity
from replication.config import load_passphrase, parse_assignments, parse_duration
from replication.disks import open_disk
from replication.epochs import LiveDisk
from replication.errors import UsageError
from replication.logs import setup_logging
from replication.nbd import NbdServer
from replication.ordering import SessionCounter
from replication.server import create_server, start_metrics, wait_for_signal
from replication.throttle import TokenBucket, parse_rate
from replication.tracking import TrackedDisk
from replication.v1 import control_pb2_grpc

from .client import PairOptions, replicate_once
from .pairs import PairTable
from .service import SourceControlService
from .tags import CutCoordinator

DEFAULTS: dict[str, Any] = {
    "process_server": None,
    "process_server_host": "localhost",
    "tls_dir": Path("/etc/replication/tls"),
    "host": "localhost",
    "passphrase_file": None,
    "disk": [],
    "once": False,
    "idle": False,
    "block_size": DEFAULT_BLOCK_SIZE,
    "deadline": 3600.0,
    "rescan_interval": 300.0,
    "bandwidth_limit": None,
    "control_listen": None,
    "metrics_listen": None,
    "state_dir": None,
    "nbd_listen": None,
    "pre_hook": None,
    "post_hook": None,
    "app_interval": "1h",
}


def run(settings: dict[str, Any], stop: threading.Event | None = None) -> int:
    """Run in ``--once`` or daemon mode; return the exit status."""
    log = setup_logging("source-agent")
    if not settings["process_server"]:
        raise UsageError("--process-server ADDR is required")
    disks = dict(parse_assignments(settings["disk"], "--disk"))
    if not disks and (settings["once"] or not settings["control_listen"]):
        raise UsageError("at least one --disk NAME=PATH is required")
    identity = load_identity(settings["tls_dir"], "source", settings["host"])
    secret = load_passphrase(
        settings["passphrase_file"] or Path(settings["tls_dir"]) / "passphrase"
    )
    options = _options(settings)
    replicate = partial(_replicate, secret=secret, identity=identity)
    if settings["once"]:
        return _run_once(disks, replicate, options, log)
    return _run_daemon(settings, disks, replicate, options, identity, log, stop)


def _options(settings: dict[str, Any]) -> PairOptions:
    limit = settings["bandwidth_limit"]
    rate = limit if isinstance(limit, int) else parse_rate(str(limit)) if limit else None
    state = settings["state_dir"]
    return PairOptions(
        block_size=int(settings["block_size"]),
        address=settings["process_server"],
        server_host=settings["process_server_host"],
        deadline=float(settings["deadline"]),
        throttle=TokenBucket(rate) if rate else None,
        # durable session order numbers (design S7); without a state dir: clock only
        session_counter=SessionCounter(Path(state) / ".session-order" if state else None),
    )


def _replicate(disk, volume, options, plan=None, *, secret, identity):
    return replicate_once(disk, volume, secret, options.address, identity, options, plan=plan)


def _run_once(disks: dict[str, str], replicate, options: PairOptions, log) -> int:
    for volume, path in disks.items():
        with open_disk(path) as disk:
            session = replicate(disk, volume, options)
        s = session.stats
        log.info(
            "event=persisted volume=%s frames=%d bytes_plain=%d bytes_framed=%d",
            volume,
            s.frames_sent,
            s.bytes_plain,
            s.bytes_framed,
        )
        print(
            f"{volume}: {s.blocks_to_send} of {s.blocks_total} blocks sent, "
            f"{s.bytes_framed} bytes framed, all PERSISTED"
        )
    return 0


def _run_daemon(settings, disks, replicate, options, identity, log, stop) -> int:
    interval = float(settings["rescan_interval"])
    if interval <= 0:
        raise UsageError("--rescan-interval must be positive")
    with contextlib.ExitStack() as stack:
        live = _open_live_disks(settings, disks, stack, log)
        nbd = _serve_nbd(settings, live, stack, log)
        pairs = PairTable(disks, replicate, options, rescan_interval=interval, live=live)
        stack.callback(pairs.stop_all)  # before the disks close (callbacks run in reverse)
        cuts = CutCoordinator(pairs, pre_hook=settings["pre_hook"], post_hook=settings["post_hook"])
        stack.callback(cuts.release_all)  # no writer left held at exit
        if settings["pre_hook"] and live:
            # app-consistent points need the application quiesced: only with a hook
            stop_tags = threading.Event()
            cuts.schedule_app_tags(parse_duration(settings["app_interval"]), stop_tags)
            stack.callback(stop_tags.set)
        _serve(settings, disks, pairs, cuts, identity, log, stop, nbd)
    log.info("event=stopped")
    return 0


def _open_live_disks(settings, disks, stack, log) -> dict[str, LiveDisk]:
    """With --state-dir: open every disk tracked, as a LiveDisk (else: none)."""
    if not settings["state_dir"]:
        if settings["nbd_listen"]:
            raise UsageError("--nbd-listen needs --state-dir (writes must be tracked)")
        return {}
    live = {}
    for name, path in disks.items():
        state = Path(settings["state_dir"]) / name
        tracked = stack.enter_context(
            TrackedDisk.open(path, state, block_size=int(settings["block_size"]))
        )
        trust = tracked.trust
        log.info(
            "event=tracking disk=%s trusted=%s reason=%s",
            name,
            trust.trusted,
            getattr(trust.reason, "value", trust.reason),
        )
        live[name] = LiveDisk(tracked, tracked.tracker, state)
        stack.callback(live[name].close)
    return live


def _serve_nbd(settings, live, stack, log):
    if not settings["nbd_listen"]:
        return None
    host, _, port = settings["nbd_listen"].rpartition(":")
    server = NbdServer(live)
    bound = server.start(host or "127.0.0.1", int(port))
    stack.callback(server.stop)
    log.info("event=nbd_listening port=%d exports=%s", bound, ",".join(live))
    return bound


def _serve(settings, disks, pairs, cuts, identity, log, stop, nbd_port) -> None:
    server = None
    if settings["control_listen"]:

        def add(srv):
            control_pb2_grpc.add_ControlServicer_to_server(SourceControlService(pairs, cuts), srv)

        server, port, _ = create_server(settings["control_listen"], identity, add)
        log.info("event=listening port=%d", port)
    metrics_port = start_metrics(settings["metrics_listen"])
    if not settings["idle"]:
        for name in disks:
            pairs.start(name, name)
    log.info(
        "event=started disks=%s metrics_port=%s nbd_port=%s",
        ",".join(disks),
        metrics_port,
        nbd_port,
    )
    wait_for_signal(stop)
    pairs.stop_all()
    if server is not None:
        server.stop(grace=5).wait()

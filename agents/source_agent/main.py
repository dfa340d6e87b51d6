"""``replication source-agent``: resync local disks into master-target volumes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from replication.blocks import DEFAULT_BLOCK_SIZE
from replication.certs import load_identity
from replication.config import load_passphrase, parse_assignments
from replication.disks import open_disk
from replication.errors import UsageError
from replication.logs import setup_logging

from .client import replicate_once

DEFAULTS: dict[str, Any] = {
    "process_server": None,
    "process_server_host": "localhost",
    "tls_dir": Path("/etc/replication/tls"),
    "host": "localhost",
    "passphrase_file": None,
    "disk": [],
    "once": False,
    "block_size": DEFAULT_BLOCK_SIZE,
    "deadline": 3600.0,
}


def run(settings: dict[str, Any]) -> int:
    """Resync every ``--disk VOLUME=PATH`` once; return 0 when all are PERSISTED."""
    log = setup_logging("source-agent")
    if not settings["process_server"]:
        raise UsageError("--process-server ADDR is required")
    if not settings["once"]:
        raise UsageError("only --once is implemented so far (continuous mode: next issue)")
    identity = load_identity(settings["tls_dir"], "source", settings["host"])
    secret = load_passphrase(
        settings["passphrase_file"] or Path(settings["tls_dir"]) / "passphrase"
    )
    disks = parse_assignments(settings["disk"], "--disk")
    if not disks:
        raise UsageError("at least one --disk VOLUME=PATH is required")
    for volume, path in disks:
        with open_disk(path) as disk:
            session = replicate_once(
                disk,
                volume,
                secret,
                settings["process_server"],
                identity,
                block_size=int(settings["block_size"]),
                server_host=settings["process_server_host"],
                deadline=float(settings["deadline"]),
            )
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

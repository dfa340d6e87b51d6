"""Prometheus metrics of the agents (prometheus-client), one registry per process.

Names follow Prometheus conventions; every agent exports the same families and
fills those that concern it. Served by ``--metrics-listen HOST:PORT``.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

__all__ = [
    "BACKLOG_FRAMES",
    "BYTES",
    "COMPRESSION_RATIO",
    "EPOCH_RPO",
    "FRAMES",
    "REJECTED",
    "RESYNC_BLOCKS",
    "RPO_SECONDS",
    "SPOOL_BYTES",
]

BYTES = Counter("replication_bytes", "Frame bytes moved", ["direction"])
FRAMES = Counter("replication_frames", "Frames moved", ["direction"])
REJECTED = Counter("replication_rejected_frames", "Frames refused", ["code"])
SPOOL_BYTES = Gauge("replication_spool_bytes", "Bytes held in the process server's spool")
BACKLOG_FRAMES = Gauge("replication_backlog_frames", "Frames sent or spooled, not yet PERSISTED")
COMPRESSION_RATIO = Gauge(
    "replication_compression_ratio", "Plain bytes / framed bytes, last session"
)
RESYNC_BLOCKS = Gauge("replication_resync_blocks", "Blocks of the current resync", ["state"])
RPO_SECONDS = Gauge(
    "replication_rpo_seconds",
    "Last PERSISTED epoch: seconds from its oldest write at the source to its PERSISTED ack",
    ["volume"],
)
EPOCH_RPO = Histogram(
    "replication_epoch_rpo_seconds",
    "Per epoch: seconds from its oldest write at the source to its PERSISTED ack",
    ["volume"],
    buckets=(0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0),
)
PARKED_SESSIONS = Gauge(
    "replication_parked_sessions",
    "Sessions the process server stopped forwarding after a permanent refusal",
)
__all__ += ["PARKED_SESSIONS"]

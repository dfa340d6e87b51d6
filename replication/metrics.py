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
STALE_SESSIONS_DROPPED = Counter(
    "replication_stale_sessions_dropped",
    "Sessions the process server dropped from its spool because the master target refused "
    "them as stale: a newer session of the volume covers their blocks (design F6)",
)
__all__ += ["STALE_SESSIONS_DROPPED"]

# --- detection of relay faults (design F4) ----------------------------------------------

FORWARD_RETRYING = Gauge(
    "replication_forward_retrying_sessions",
    "Sessions whose forwarding to the master target failed and is being retried",
)
FORWARD_FAILURES = Counter(
    "replication_forward_failures",
    "Failed attempts to forward a session to the master target, by reason "
    "(an error code such as relay.stalled, else the gRPC status)",
    ["reason"],
)
MASTER_TARGET_UP = Gauge(
    "replication_master_target_up",
    "1 if the process server's last probe of its master target was answered, else 0",
)
SPOOL_LIMIT_BYTES = Gauge(
    "replication_spool_limit_bytes", "The process server's --spool-limit (read spool_bytes by it)"
)
PAIRS = Gauge("replication_pairs", "A source agent's pairs, by state", ["state"])
__all__ += [
    "FORWARD_FAILURES",
    "FORWARD_RETRYING",
    "MASTER_TARGET_UP",
    "PAIRS",
    "SPOOL_LIMIT_BYTES",
]

# --- authenticated acks (docs/security.md) ------------------------------------------------

REJECTED_ACKS = Counter(
    "replication_rejected_acks",
    "PERSISTED acks a source refused: a MAC that is not the master target's, by error code",
    ["code"],
)
__all__ += ["REJECTED_ACKS"]

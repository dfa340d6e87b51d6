"""gRPC server plumbing shared by the three agents: TLS, health, metrics, errors.

``create_server(address, identity, add_servicers)`` binds (port 0 picks a free
port, for tests), registers the standard ``grpc.health.v1`` service, and returns
``(server, port)``. Servicers convert a :class:`ReplicationError` to a gRPC status
with :func:`abort_with`, carrying the stable error code in trailing metadata.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from .certs import Identity
from .errors import (
    DiskFullError,
    FrameError,
    InvalidVolumeNameError,
    OutOfRangeError,
    ProtocolError,
    ReplicationError,
    UnknownDiskError,
    UnknownVolumeError,
    VolumeExistsError,
)
from .tls import ERROR_CODE_METADATA, RoleProver, server_credentials

__all__ = ["abort_with", "create_server", "start_metrics"]

log = logging.getLogger(__name__)

#: gRPC status per error family; the most specific class listed wins
_STATUS = (
    (UnknownVolumeError, grpc.StatusCode.NOT_FOUND),
    (UnknownDiskError, grpc.StatusCode.NOT_FOUND),
    (InvalidVolumeNameError, grpc.StatusCode.INVALID_ARGUMENT),
    (VolumeExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (DiskFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (OutOfRangeError, grpc.StatusCode.OUT_OF_RANGE),
    (FrameError, grpc.StatusCode.DATA_LOSS),
    (ProtocolError, grpc.StatusCode.FAILED_PRECONDITION),
)


#: let clients' keepalive pings through instead of answering them with GOAWAY
#: too_many_pings (gRPC's default: at most one ping per 5 minutes without data). A
#: process server pings its master target every 5 s, idle or not
#: (``agents/process_server/liveness.py``); 4 s leaves a second for timer jitter.
KEEPALIVE_SERVER_OPTIONS = (
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 4000),
)


def status_for(err: ReplicationError) -> grpc.StatusCode:
    """Return the gRPC status code that reports ``err``."""
    for cls, status in _STATUS:
        if isinstance(err, cls):
            return status
    if err.retryable:
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.FAILED_PRECONDITION


def abort_with(context: grpc.ServicerContext, err: ReplicationError) -> None:
    """Abort the RPC with ``err``'s status, message and stable code (never returns)."""
    log.warning("rpc refused: [%s] %s", err.code, err)
    context.set_trailing_metadata(((ERROR_CODE_METADATA, err.code),))
    context.abort(status_for(err), f"[{err.code}] {err}")


def error_code_of(rpc_error: grpc.RpcError) -> str | None:
    """Return the stable error code a peer attached to a failed RPC, if any."""
    try:
        for key, value in rpc_error.trailing_metadata() or ():  # type: ignore[attr-defined]
            if key == ERROR_CODE_METADATA:
                return str(value)
    except Exception:  # a cancelled or transport-failed call has no metadata
        return None
    return None


def create_server(
    address: str,
    identity: Identity,
    add_servicers: Callable[[grpc.Server], None],
    *,
    workers: int = 16,
) -> tuple[grpc.Server, int, health.HealthServicer]:
    """Build, bind and start a mutual-TLS server; return it, its port and its health."""
    server = grpc.server(
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rpc"),
        interceptors=[RoleProver(identity)],  # clients check this server's role per call
        options=[
            ("grpc.max_receive_message_length", 80 << 20),
            ("grpc.max_send_message_length", 80 << 20),
            *KEEPALIVE_SERVER_OPTIONS,
        ],
    )
    add_servicers(server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_secure_port(address, server_credentials(identity))
    if port == 0:
        raise ReplicationError(f"cannot listen on {address}")
    server.start()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, port, health_servicer


def start_metrics(address: str | None) -> int | None:
    """Serve Prometheus metrics on ``host:port`` (port 0: any); return the port."""
    if not address:
        return None
    from prometheus_client import start_http_server

    host, _, port = address.rpartition(":")
    server, _thread = start_http_server(int(port), addr=host or "127.0.0.1")
    return int(server.server_port)


def error_from_rpc(err: grpc.RpcError, context: str) -> ReplicationError:
    """Turn a failed RPC into the typed error the peer raised (via its stable code).

    A peer that attached ``replication-error-code`` gets its own class back from the
    error registry; anything else (unreachable, TLS refused, deadline) becomes a
    retryable-or-not :class:`PairFailedError` that says what happened.
    """
    from .errors import ERRORS_BY_CODE, PairFailedError

    code = error_code_of(err)
    details = err.details() if hasattr(err, "details") else str(err)  # type: ignore[union-attr]
    status = err.code() if hasattr(err, "code") else None  # type: ignore[union-attr]
    cls = ERRORS_BY_CODE.get(code or "", PairFailedError)
    if code is None and status == grpc.StatusCode.UNAVAILABLE:
        details = f"peer unreachable or TLS refused ({details})"
    return cls(f"{context}: {details}")


def answer_handshake(request, context: grpc.ServicerContext, role: str):
    """Serve ``Handshake``: negotiate with the caller's Hello, reply with ours."""
    from . import wire
    from .protocol import Hello, negotiate

    try:
        negotiate(Hello(role=role), wire.hello_from_pb(request))
    except ReplicationError as err:
        abort_with(context, err)
    return wire.hello_to_pb(Hello(role=role))


def wait_for_signal(stop: threading.Event | None = None) -> None:
    """Block until SIGTERM or SIGINT (or until ``stop`` is set by an embedding caller)."""
    import signal

    stop = stop or threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()

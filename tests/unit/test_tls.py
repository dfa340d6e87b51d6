"""Mutual TLS through a real gRPC server on 127.0.0.1 with a raw-bytes generic handler."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import pytest

from replication import certs, tls

TIMEOUT = 5.0
METHOD = "/test.Echo/Call"
GUARDED = "/test.Echo/OrchestratorOnly"


@dataclass
class Server:
    port: int
    seen_roles: list[str | None] = field(default_factory=list)


@pytest.fixture(scope="module")
def ca() -> certs.CertAuthority:
    return certs.create_ca(days=2)


@pytest.fixture(scope="module")
def server(ca: certs.CertAuthority) -> Iterator[Server]:
    state = Server(port=0)

    def call(request: bytes, context: grpc.ServicerContext) -> bytes:
        state.seen_roles.append(tls.peer_role(context))
        return b"echo:" + request

    def guarded(request: bytes, context: grpc.ServicerContext) -> bytes:
        role = tls.require_role(context, "orchestrator")
        return role.encode()

    handlers = {
        "Call": grpc.unary_unary_rpc_method_handler(call),
        "OrchestratorOnly": grpc.unary_unary_rpc_method_handler(guarded),
    }
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    srv.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", handlers),))
    ident = certs.issue(ca, "localhost", "process-server", days=2)
    state.port = srv.add_secure_port("127.0.0.1:0", tls.server_credentials(ident))
    assert state.port
    srv.start()
    yield state
    srv.stop(grace=None)


def _call(channel: grpc.Channel, method: str = METHOD, payload: bytes = b"hi") -> bytes:
    return channel.unary_unary(method)(payload, timeout=TIMEOUT)


def _address(server: Server) -> str:
    return f"127.0.0.1:{server.port}"


def test_right_ca_and_cert_succeeds_and_handler_sees_role(server: Server, ca):
    ident = certs.issue(ca, "localhost", "source", days=2)
    with tls.secure_channel(_address(server), ident) as channel:
        assert _call(channel) == b"echo:hi"
    assert server.seen_roles[-1] == "source"


def test_allowed_role_passes_require_role(server: Server, ca):
    ident = certs.issue(ca, "localhost", "orchestrator", days=2)
    with tls.secure_channel(_address(server), ident) as channel:
        assert _call(channel, GUARDED) == b"orchestrator"


def test_wrong_role_gets_permission_denied(server: Server, ca, caplog: pytest.LogCaptureFixture):
    ident = certs.issue(ca, "localhost", "process-server", days=2)
    with (
        caplog.at_level(logging.WARNING, logger="replication.tls"),
        tls.secure_channel(_address(server), ident) as channel,
        pytest.raises(grpc.RpcError) as info,
    ):
        _call(channel, GUARDED)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "process-server" in info.value.details()
    assert "orchestrator" in info.value.details()
    trailing = dict(info.value.trailing_metadata() or ())
    assert trailing.get(tls.ERROR_CODE_METADATA) == "tls.peer_role"
    denials = [r for r in caplog.records if r.name == "replication.tls"]
    assert len(denials) == 1 and "denied" in denials[0].getMessage()


def _refused(server: Server, creds: grpc.ChannelCredentials) -> grpc.RpcError:
    options = [("grpc.ssl_target_name_override", "localhost")]
    with (
        grpc.secure_channel(_address(server), creds, options=options) as channel,
        pytest.raises(grpc.RpcError) as info,
    ):
        _call(channel)
    return info.value


def test_client_cert_from_another_ca_is_refused(server: Server, ca):
    stranger = certs.issue(certs.create_ca(), "localhost", "orchestrator", days=2)
    # Trusts the real CA (so the server is accepted) but presents a foreign cert.
    creds = grpc.ssl_channel_credentials(ca.cert_pem, stranger.key_pem, stranger.cert_pem)
    seen = len(server.seen_roles)
    err = _refused(server, creds)
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert len(server.seen_roles) == seen  # the handler never ran


def test_expired_client_cert_is_refused(server: Server, ca):
    old = dt.datetime.now(dt.UTC) - dt.timedelta(days=10)
    expired = certs.issue(ca, "localhost", "orchestrator", days=1, not_before=old)
    seen = len(server.seen_roles)
    err = _refused(server, tls.channel_credentials(expired))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert len(server.seen_roles) == seen


def test_client_without_cert_is_refused(server: Server, ca):
    seen = len(server.seen_roles)
    err = _refused(server, grpc.ssl_channel_credentials(root_certificates=ca.cert_pem))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert len(server.seen_roles) == seen


def test_client_refuses_server_from_another_ca(server: Server):
    other = certs.issue(certs.create_ca(), "localhost", "orchestrator", days=2)
    with (
        tls.secure_channel(_address(server), other) as channel,
        pytest.raises(grpc.RpcError) as info,
    ):
        _call(channel)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_client_checks_server_host_name(server: Server, ca):
    ident = certs.issue(ca, "localhost", "source", days=2)
    with (
        tls.secure_channel(_address(server), ident, server_host="ps.example") as channel,
        pytest.raises(grpc.RpcError) as info,
    ):
        _call(channel)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_ip_literal_without_override_uses_ip_sans(server: Server, ca):
    # The server certificate is for localhost, which carries the 127.0.0.1 IP SAN.
    ident = certs.issue(ca, "localhost", "source", days=2)
    with tls.secure_channel(_address(server), ident, server_host=None) as channel:
        assert _call(channel) == b"echo:hi"


def test_address_host_parsing():
    assert tls._address_host("127.0.0.1:9443") == "127.0.0.1"
    assert tls._address_host("[::1]:9443") == "::1"
    assert tls._address_host("ps.example:9443") == "ps.example"

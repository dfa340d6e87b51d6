"""Clients check the server's role (docs/security.md 5.4): real gRPC servers, real TLS.

Certificates come from ``certs init`` for one host, so every role's certificate is
valid for ``localhost``: exactly the case where only the role tells a process
server from a source agent posing as one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from replication import certs, tls, wire
from replication.control import ControlClient
from replication.errors import ServerRoleError
from replication.protocol import Hello
from replication.server import create_server
from replication.v1 import control_pb2, control_pb2_grpc, data_pb2, data_pb2_grpc

TIMEOUT = 10.0


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tls")
    certs.init_tls_dir(root, ["localhost"], days=2)
    return root


def _identity(tls_dir: Path, role: str) -> certs.Identity:
    return certs.load_identity(tls_dir, role, "localhost")


class _Target(data_pb2_grpc.MasterTargetServicer):
    """Answers like a master target, whatever certificate it serves with."""

    def Handshake(self, request, context):
        return wire.hello_to_pb(Hello(role="master-target"))

    def GetHashMap(self, request, context):
        yield data_pb2.HashMapChunk(first_block=0, digests=b"\x01" * 16, block_count=1)


class _Control(control_pb2_grpc.ControlServicer):
    def Status(self, request, context):
        return control_pb2.AgentStatus(agent_version="test")


@contextlib.contextmanager
def _server(identity: certs.Identity) -> Iterator[int]:
    """A server of this build (it proves its role) presenting ``identity``."""

    def add(server: grpc.Server) -> None:
        data_pb2_grpc.add_MasterTargetServicer_to_server(_Target(), server)
        control_pb2_grpc.add_ControlServicer_to_server(_Control(), server)

    server, port, _ = create_server("127.0.0.1:0", identity, add, workers=4)
    try:
        yield port
    finally:
        server.stop(grace=None)


def _calls(port: int, client: certs.Identity, role: str) -> tuple[str, bytes]:
    with tls.secure_channel(f"127.0.0.1:{port}", client, expect_role=role) as channel:
        stub = data_pb2_grpc.MasterTargetStub(channel)
        hello = stub.Handshake(wire.hello_to_pb(Hello()), timeout=TIMEOUT)
        chunks = list(stub.GetHashMap(data_pb2.HashMapRequest(volume="v"), timeout=TIMEOUT))
    return wire.hello_from_pb(hello).role, chunks[0].digests


def test_the_right_role_is_accepted_on_unary_and_streaming_calls(tls_dir) -> None:
    with _server(_identity(tls_dir, "master-target")) as port:
        got = _calls(port, _identity(tls_dir, "process-server"), "master-target")
    assert got == ("master-target", b"\x01" * 16)


@pytest.mark.parametrize("impostor", ["source", "orchestrator", "process-server"])
def test_a_certificate_of_another_role_is_refused(tls_dir, impostor) -> None:
    client = _identity(tls_dir, "process-server")
    with (
        _server(_identity(tls_dir, impostor)) as port,
        tls.secure_channel(f"127.0.0.1:{port}", client, expect_role="master-target") as channel,
    ):
        stub = data_pb2_grpc.MasterTargetStub(channel)
        with pytest.raises(ServerRoleError, match=f"is a {impostor}"):
            stub.Handshake(wire.hello_to_pb(Hello()), timeout=TIMEOUT)
        chunks = stub.GetHashMap(data_pb2.HashMapRequest(volume="v"), timeout=TIMEOUT)
        with pytest.raises(ServerRoleError):
            next(iter(chunks))  # no response is handed out


def test_a_server_without_a_proof_is_refused(tls_dir) -> None:
    """An older build (no proof) with the right certificate: refused, not trusted."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    data_pb2_grpc.add_MasterTargetServicer_to_server(_Target(), server)
    port = server.add_secure_port(
        "127.0.0.1:0", tls.server_credentials(_identity(tls_dir, "master-target"))
    )
    server.start()
    try:
        with pytest.raises(ServerRoleError, match="no proof"):
            _calls(port, _identity(tls_dir, "process-server"), "master-target")
    finally:
        server.stop(grace=None)


def test_a_proof_relayed_from_the_real_server_does_not_verify(tls_dir) -> None:
    """An impostor (source certificate) fetches a genuine proof for the client's
    challenge from the real master target and hands it on: the real server signed the
    impostor's certificate, not the client's, so the client refuses."""
    impostor_id = _identity(tls_dir, "source")
    with _server(_identity(tls_dir, "master-target")) as real_port:
        real = tls.secure_channel(f"127.0.0.1:{real_port}", impostor_id)

        def handshake(request: bytes, context: grpc.ServicerContext) -> bytes:
            challenge = dict(context.invocation_metadata())[tls.CHALLENGE_METADATA]
            method = real.unary_unary("/replication.v1.MasterTarget/Handshake")
            _reply, call = method.with_call(
                request, metadata=((tls.CHALLENGE_METADATA, challenge),), timeout=TIMEOUT
            )
            context.send_initial_metadata(tuple(call.initial_metadata()))
            return wire.hello_to_pb(Hello(role="master-target")).SerializeToString()

        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        handlers = {"Handshake": grpc.unary_unary_rpc_method_handler(handshake)}
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("replication.v1.MasterTarget", handlers),)
        )
        port = server.add_secure_port("127.0.0.1:0", tls.server_credentials(impostor_id))
        server.start()
        try:
            with tls.secure_channel(
                f"127.0.0.1:{port}",
                _identity(tls_dir, "process-server"),
                expect_role="master-target",
            ) as channel:
                stub = data_pb2_grpc.MasterTargetStub(channel)
                with pytest.raises(ServerRoleError, match="signature"):
                    stub.Handshake(wire.hello_to_pb(Hello()), timeout=TIMEOUT)
        finally:
            server.stop(grace=None)
            real.close()


def test_the_control_client_checks_the_role_it_dials(tls_dir) -> None:
    orchestrator = _identity(tls_dir, "orchestrator")
    with _server(_identity(tls_dir, "source")) as port:
        address = f"127.0.0.1:{port}"
        with ControlClient(address, orchestrator, role="source") as client:
            assert client.status().agent_version == "test"
        with (
            ControlClient(address, orchestrator, role="master-target") as client,
            pytest.raises(ServerRoleError, match="not the master-target"),
        ):
            client.status()

"""Mutual TLS for the gRPC services, and role checks on the verified peer certificate.

Every daemon serves with :func:`server_credentials` (client certificates required
and verified against the CA) and connects with :func:`secure_channel`. The role of
the caller is read from its *verified* certificate (:func:`peer_role`), never from
anything the caller says in a message; each RPC handler starts with
:func:`require_role`::

    def Apply(self, request, context):
        tls.require_role(context, "process-server")
        ...

Clients check the server's role too (:class:`RoleCheck`, ``secure_channel(...,
expect_role=...)``). gRPC's Python client cannot show the certificate the server
presented in the TLS handshake, so every server proves its role per call
(:class:`RoleProver`, installed by ``create_server``): the client sends 16 random
bytes in the call's metadata; the server answers, in its initial metadata, with its
certificate and an ECDSA signature, by its TLS key, over those bytes and the SHA-256
of the *client's* certificate as the server's TLS layer verified it. The client
accepts the call's responses only if that certificate chains to the CA, names the
dialled host, carries the expected role, and the signature verifies over its own
certificate. An impostor holding another role's certificate cannot sign; relaying a
genuine server's proof does not help it either, since that server saw the impostor's
certificate, not the client's. The check is per call, so a transparent reconnect
gets no pass. A server without a proof (an older build) is refused: the proof cannot
be negotiated in band, an impostor would simply not offer it.
"""

from __future__ import annotations

import collections
import datetime as dt
import hashlib
import ipaddress
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .certs import Identity, normalize_role, role_of
from .errors import PeerRoleError, ServerRoleError

__all__ = [
    "ERROR_CODE_METADATA",
    "RoleCheck",
    "RoleProver",
    "channel_credentials",
    "peer_role",
    "require_role",
    "secure_channel",
    "server_credentials",
]

log = logging.getLogger(__name__)

#: Trailing-metadata key carrying the stable error code (see common.proto).
ERROR_CODE_METADATA = "replication-error-code"
#: request metadata: the client's challenge (16 random bytes)
CHALLENGE_METADATA = "replication-role-challenge-bin"
#: initial response metadata: the server's certificate (DER) and its signature
SERVER_CERT_METADATA = "replication-server-cert-bin"
ROLE_PROOF_METADATA = "replication-role-proof-bin"
_PROOF_CONTEXT = b"replication server role proof v1\0"
_CHALLENGE_SIZE = 16


def server_credentials(identity: Identity) -> grpc.ServerCredentials:
    """Return server credentials that present ``identity`` and require a client cert."""
    return grpc.ssl_server_credentials(
        [(identity.key_pem, identity.cert_pem)],
        root_certificates=identity.ca_pem,
        require_client_auth=True,
    )


def channel_credentials(identity: Identity) -> grpc.ChannelCredentials:
    """Return channel credentials that trust only the CA and present ``identity``."""
    return grpc.ssl_channel_credentials(
        root_certificates=identity.ca_pem,
        private_key=identity.key_pem,
        certificate_chain=identity.cert_pem,
    )


def _address_host(address: str) -> str:
    """Return the host part of ``host:port``, ``[v6]:port`` or a bare host."""
    if address.startswith("["):
        return address[1:].split("]", 1)[0]
    if address.count(":") == 1:
        return address.rsplit(":", 1)[0]
    return address  # bare host or bare IPv6 literal


def secure_channel(
    address: str,
    identity: Identity,
    *,
    server_host: str | None = "localhost",
    options: Sequence[tuple[str, Any]] = (),
    expect_role: str | None = None,
) -> grpc.Channel:
    """Open a mutual-TLS channel to ``address`` (``host:port``).

    When ``address`` names an IP literal (``127.0.0.1:9443``), the server's
    certificate is checked against ``server_host`` instead, via the
    ``grpc.ssl_target_name_override`` option; with a DNS name the name itself is
    checked and ``server_host`` is ignored. With ``server_host=None`` an IP literal
    must itself be an IP SAN of the server. The certificate is verified either way.
    With ``expect_role`` every call must also prove the server has that role
    (:class:`RoleCheck`), or it fails with :class:`ServerRoleError`.
    """
    opts = list(options)
    dialled = _address_host(address)
    try:
        ipaddress.ip_address(dialled)
    except ValueError:
        pass
    else:
        if server_host is not None:
            opts.append(("grpc.ssl_target_name_override", server_host))
            dialled = server_host
    channel = grpc.secure_channel(address, channel_credentials(identity), options=opts)
    if expect_role is None:
        return channel
    return grpc.intercept_channel(channel, RoleCheck(identity, expect_role, dialled))


def peer_role(context: grpc.ServicerContext) -> str | None:
    """Return the role in the caller's verified certificate, or None if there is none.

    gRPC only puts ``x509_pem_cert`` into the auth context after it verified the
    peer's certificate chain against the server's CA.
    """
    auth = context.auth_context() or {}
    pems = auth.get("x509_pem_cert") or []
    if not pems:
        return None
    pem = pems[0]
    try:
        cert = x509.load_pem_x509_certificate(pem if isinstance(pem, bytes) else pem.encode())
    except ValueError:
        return None
    return role_of(cert)


def require_role(context: grpc.ServicerContext, *allowed: str) -> str:
    """Return the caller's role if it is one of ``allowed``; otherwise abort the RPC.

    Aborts with ``PERMISSION_DENIED``, the code ``tls.peer_role`` in trailing
    metadata, and logs one warning line naming the peer. Roles may be spelled
    ``process-server``, ``process_server`` or ``ROLE_PROCESS_SERVER``.
    """
    wanted = tuple(normalize_role(r) for r in allowed)
    role = peer_role(context)
    if role is not None and role in wanted:
        return role
    _deny(context, role, wanted)


def _deny(context: grpc.ServicerContext, role: str | None, wanted: tuple[str, ...]) -> NoReturn:
    shown = f"role {role!r}" if role is not None else "no role in its certificate"
    message = f"peer with {shown} may not call this; allowed: {', '.join(wanted) or 'none'}"
    log.warning("denied %s: %s", context.peer(), message)
    context.set_trailing_metadata(((ERROR_CODE_METADATA, PeerRoleError.code),))
    context.abort(grpc.StatusCode.PERMISSION_DENIED, message)
    raise AssertionError("grpc context.abort returned")  # pragma: no cover


# --- servers prove their role to clients ----------------------------------------------


def _proof_message(challenge: bytes, client_cert_der: bytes) -> bytes:
    return _PROOF_CONTEXT + challenge + hashlib.sha256(client_cert_der).digest()


class RoleProver(grpc.ServerInterceptor):
    """Answer every call that brings a challenge with a proof of this server's role."""

    def __init__(self, identity: Identity) -> None:
        cert = x509.load_pem_x509_certificate(identity.cert_pem)
        self._cert_der = cert.public_bytes(serialization.Encoding.DER)
        key = serialization.load_pem_private_key(identity.key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PeerRoleError("a server key must be an EC key to prove its role")
        self._key = key

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        metadata = dict(handler_call_details.invocation_metadata or ())
        challenge = metadata.get(CHALLENGE_METADATA)
        if handler is None or not isinstance(challenge, bytes):
            return handler  # an older client asks for nothing
        return _run_first(handler, lambda context: self._prove(context, challenge))

    def _prove(self, context: grpc.ServicerContext, challenge: bytes) -> None:
        pems = (context.auth_context() or {}).get("x509_pem_cert") or []
        if not pems or len(challenge) != _CHALLENGE_SIZE:
            return  # nothing to bind the proof to: the client will refuse the call
        pem = pems[0] if isinstance(pems[0], bytes) else pems[0].encode()
        client = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
        signature = self._key.sign(_proof_message(challenge, client), ec.ECDSA(hashes.SHA256()))
        context.send_initial_metadata(
            ((SERVER_CERT_METADATA, self._cert_der), (ROLE_PROOF_METADATA, signature))
        )


def _run_first(handler, before: Callable[[grpc.ServicerContext], None]):
    """Return ``handler`` with ``before(context)`` run before its behaviour."""
    kinds = (
        ("unary_unary", grpc.unary_unary_rpc_method_handler, False),
        ("unary_stream", grpc.unary_stream_rpc_method_handler, True),
        ("stream_unary", grpc.stream_unary_rpc_method_handler, False),
        ("stream_stream", grpc.stream_stream_rpc_method_handler, True),
    )
    name, make, streams = next(k for k in kinds if getattr(handler, k[0]) is not None)
    behaviour = getattr(handler, name)

    def unary(request, context):
        before(context)
        return behaviour(request, context)

    def streaming(request, context):
        before(context)
        yield from behaviour(request, context)

    return make(
        streaming if streams else unary,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class _CallDetails(
    collections.namedtuple(
        "_CallDetails",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,
):
    pass


class RoleCheck(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Accept a call's responses only from a server that proves ``role`` (see above).

    A call that failed is left as it is (its error carries no data to trust, and a
    refused TLS handshake has no metadata at all); one that succeeds without a valid
    proof raises :class:`ServerRoleError` instead of returning anything.
    """

    def __init__(self, identity: Identity, role: str, host: str) -> None:
        self.role = normalize_role(role)
        self.host = host
        self._ca = x509.load_pem_x509_certificate(identity.ca_pem)
        own = x509.load_pem_x509_certificate(identity.cert_pem)
        self._own_der = own.public_bytes(serialization.Encoding.DER)

    def _call(self, continuation, details, request):
        challenge = os.urandom(_CHALLENGE_SIZE)
        metadata = (*(details.metadata or ()), (CHALLENGE_METADATA, challenge))
        call = continuation(
            _CallDetails(
                details.method,
                details.timeout,
                metadata,
                details.credentials,
                details.wait_for_ready,
                details.compression,
            ),
            request,
        )
        return call, challenge

    def intercept_unary_unary(self, continuation, client_call_details, request):
        call, challenge = self._call(continuation, client_call_details, request)
        if call.exception() is None:
            self.verify(call.initial_metadata(), challenge)
        return call

    intercept_stream_unary = intercept_unary_unary

    def intercept_unary_stream(self, continuation, client_call_details, request):
        call, challenge = self._call(continuation, client_call_details, request)
        return _CheckedStream(call, lambda: self._check_stream(call, challenge))

    intercept_stream_stream = intercept_unary_stream

    def _check_stream(self, call, challenge: bytes) -> None:
        metadata = call.initial_metadata()  # waits for the headers (or the end)
        if not metadata and call.done() and call.code() != grpc.StatusCode.OK:
            return  # failed before any header: iterating raises its error
        try:
            self.verify(metadata, challenge)
        except ServerRoleError:
            call.cancel()
            raise

    def verify(self, metadata, challenge: bytes) -> None:
        """Raise ServerRoleError unless ``metadata`` proves the role for ``challenge``."""
        found = dict(metadata or ())
        cert_der, signature = found.get(SERVER_CERT_METADATA), found.get(ROLE_PROOF_METADATA)
        if not isinstance(cert_der, bytes) or not isinstance(signature, bytes):
            raise ServerRoleError(
                f"the server at {self.host!r} gave no proof of its role ({self.role} expected)",
                hint="upgrade the server (servers before clients), or check the address",
            )
        cert = self._trusted(cert_der)
        role = role_of(cert)
        if role != self.role:
            raise ServerRoleError(
                f"the server at {self.host!r} is a {role or 'certificate without a role'}, "
                f"not the {self.role} this client dialled",
                hint="deploy on each host only the certificates of the roles it runs",
            )
        key = cert.public_key()
        try:
            if not isinstance(key, ec.EllipticCurvePublicKey):
                raise InvalidSignature  # our servers sign with EC keys only
            key.verify(
                signature, _proof_message(challenge, self._own_der), ec.ECDSA(hashes.SHA256())
            )
        except InvalidSignature:
            raise ServerRoleError(
                f"the server at {self.host!r} sent a {self.role} certificate without "
                "its key's signature (a relayed or replayed proof)"
            ) from None

    def _trusted(self, cert_der: bytes) -> x509.Certificate:
        """The proof's certificate: issued by our CA, valid now, for the dialled host."""
        try:
            cert = x509.load_der_x509_certificate(cert_der)
            cert.verify_directly_issued_by(self._ca)
        except (ValueError, TypeError, InvalidSignature):
            raise ServerRoleError(
                f"the server at {self.host!r} proved its role with a certificate "
                "not issued by this deployment's CA"
            ) from None
        now = dt.datetime.now(dt.UTC)
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise ServerRoleError(
                f"the server at {self.host!r} proved its role with an expired certificate"
            )
        if self.host.lower() not in {name.lower() for name in _names_of(cert)}:
            raise ServerRoleError(
                f"the server's role certificate is not for {self.host!r} "
                f"(it names {', '.join(sorted(_names_of(cert))) or 'no host'})"
            )
        return cert


def _names_of(cert: x509.Certificate) -> set[str]:
    """The DNS names and IP addresses a certificate names."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    names = set(san.get_values_for_type(x509.DNSName))
    return names | {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}


class _CheckedStream:
    """A streaming call whose responses are released only after the server's proof."""

    def __init__(self, call, check: Callable[[], None]) -> None:
        self._call = call
        self._check: Callable[[], None] | None = check

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        if self._check is not None:
            check, self._check = self._check, None
            check()
        return next(self._call)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)

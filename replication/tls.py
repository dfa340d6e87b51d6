"""Mutual TLS for the gRPC services, and role checks on the verified peer certificate.

Every daemon serves with :func:`server_credentials` (client certificates required
and verified against the CA) and connects with :func:`secure_channel`. The role of
the caller is read from its *verified* certificate (:func:`peer_role`), never from
anything the caller says in a message; each RPC handler starts with
:func:`require_role`::

    def Apply(self, request, context):
        tls.require_role(context, "process-server")
        ...
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Sequence
from typing import Any, NoReturn

import grpc
from cryptography import x509

from .certs import Identity, normalize_role, role_of
from .errors import PeerRoleError

__all__ = [
    "ERROR_CODE_METADATA",
    "channel_credentials",
    "peer_role",
    "require_role",
    "secure_channel",
    "server_credentials",
]

log = logging.getLogger(__name__)

#: Trailing-metadata key carrying the stable error code (see common.proto).
ERROR_CODE_METADATA = "replication-error-code"


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
) -> grpc.Channel:
    """Open a mutual-TLS channel to ``address`` (``host:port``).

    When ``address`` names an IP literal (``127.0.0.1:9443``), the server's
    certificate is checked against ``server_host`` instead, via the
    ``grpc.ssl_target_name_override`` option; with a DNS name the name itself is
    checked and ``server_host`` is ignored. With ``server_host=None`` an IP literal
    must itself be an IP SAN of the server. The certificate is verified either way.
    """
    opts = list(options)
    try:
        ipaddress.ip_address(_address_host(address))
    except ValueError:
        pass
    else:
        if server_host is not None:
            opts.append(("grpc.ssl_target_name_override", server_host))
    return grpc.secure_channel(address, channel_credentials(identity), options=opts)


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

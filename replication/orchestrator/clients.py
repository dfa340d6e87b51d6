"""Connections to the agents' control services, as the orchestrator role.

One :class:`~replication.control.ControlClient` per address, kept for the life of
the orchestrator. Every client names the role the agent must prove on each call
(``role=``: a registered server's role from the store, :data:`SOURCE` for the
source agents beside a VM's disks), so a server registered at the wrong address,
or a host serving another role's certificate, is refused with
:class:`~replication.errors.ServerRoleError` (``tls.server_role``) before any
command reaches it. Reachability is decided here: a call that fails without a typed
error from the agent (refused, TLS, deadline) becomes
:class:`~replication.errors.ServerUnreachableError` naming the server and the fix.
"""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
from pathlib import Path

from .. import wire
from ..certs import load_identity, normalize_role
from ..control import ControlClient
from ..errors import PairFailedError, ReplicationError, ServerRoleError, ServerUnreachableError

__all__ = ["SOURCE", "Agents", "certificate_fingerprint"]

#: the certificate role of a source agent (servers: their registered ``Server.role``)
SOURCE = "source"

#: deadline of the preflight's Status calls (an unreachable host costs at most this)
PROBE_TIMEOUT = 10.0


class Agents:
    """Control clients to every agent the orchestrator talks to."""

    def __init__(
        self,
        tls_dir: str | os.PathLike[str],
        *,
        host: str = "localhost",
        server_host: str = "localhost",
        timeout: float = 60.0,
    ) -> None:
        self.tls_dir = Path(tls_dir)
        self.host = host
        self.server_host = server_host
        self.timeout = timeout
        self._identity = None
        self._clients: dict[tuple[str, float], ControlClient] = {}

    def client(self, address: str, timeout: float | None = None, *, role: str) -> ControlClient:
        """The (cached) control client of ``address``, which must prove ``role``."""
        key = (address, timeout or self.timeout, role)
        if key not in self._clients:
            if self._identity is None:
                self._identity = load_identity(self.tls_dir, "orchestrator", self.host)
            self._clients[key] = ControlClient(
                address, self._identity, server_host=self.server_host, timeout=key[1], role=role
            )
        return self._clients[key]

    def status(self, address: str, what: str, *, role: str) -> wire.AgentInfo:
        """``Control.Status`` of ``address``, which must prove ``role``.

        ServerUnreachableError if it does not answer; ServerRoleError (naming
        ``what`` and ``address``) if it answers with another role's certificate.
        """
        try:
            return self.client(address, PROBE_TIMEOUT, role=role).status()
        except ServerRoleError as err:
            raise ServerRoleError(
                f"{what} at {address}: {err.message}",
                hint=f"check the address registered for the {what}: the server there is "
                "not one (or serves another role's certificate)",
            ) from err
        except PairFailedError as err:  # no typed error: the agent did not answer
            raise ServerUnreachableError(
                f"{what} at {address} does not answer: {err.message}",
                hint=f"start the {what}, or check its address, port and firewall "
                "(the control service shares its listener)",
            ) from err

    def fingerprint(self, address: str) -> str:
        """The SHA-256 of ``address``'s TLS certificate (hex); ServerUnreachableError if none."""
        try:
            return certificate_fingerprint(address, self.tls_dir, self.host)
        except (OSError, ssl.SSLError, ValueError) as err:
            raise ServerUnreachableError(
                f"cannot read the certificate of {address}: {err}",
                hint="start the server, or give its --fingerprint",
            ) from err

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()


def certificate_fingerprint(
    address: str, tls_dir: str | os.PathLike[str], host: str = "localhost"
) -> str:
    """Connect with the orchestrator's certificate and hash the server's certificate.

    The chain is not verified here (gRPC verifies it on every call); the pin only
    says "the same server as when it was registered".
    """
    root = Path(tls_dir) / host
    role = normalize_role("orchestrator")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.load_cert_chain(root / f"{role}.pem", root / f"{role}.key")
    context.set_alpn_protocols(["h2"])
    name, _, port = address.rpartition(":")
    where = (name.strip("[]"), int(port))
    with (
        socket.create_connection(where, timeout=PROBE_TIMEOUT) as raw,
        context.wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    if not der:
        raise ValueError("the server sent no certificate")
    return hashlib.sha256(der).hexdigest()


def typed_or_unreachable(err: ReplicationError, what: str, address: str) -> ReplicationError:
    """Keep an agent's typed refusal; turn an untyped failure into ServerUnreachableError."""
    if type(err) is PairFailedError:
        return ServerUnreachableError(
            f"{what} at {address}: {err.message}", hint=f"check that the {what} runs"
        )
    return err

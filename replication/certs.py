"""Certificates for mutual TLS between the daemons.

One private CA signs one certificate per (host, role). The *role* is carried in the
certificate itself, twice: as a SAN URI ``urn:replication:role:<role>`` (the
authoritative copy, read by :func:`role_of`) and as the subject OU (for humans and
``openssl x509 -text``). The host is a DNS SAN (or an IP SAN for an IP literal);
``localhost`` also gets the IP SANs 127.0.0.1 and ::1. Every certificate is good
for both TLS server and client authentication, since daemons are both.

Layout written by :func:`init_tls_dir` (``replication certs init``)::

    DIR/ca.pem                   CA certificate (public; every daemon needs it)
    DIR/ca.key                   CA private key (0600; keep offline after init)
    DIR/passphrase               64 hex digits = 32 random bytes (0600): the shared
                                 frame-key secret of source and master target
    DIR/<host>/<role>.pem        certificate of <role> on <host>
    DIR/<host>/<role>.key        its private key (0600)

with ``<role>`` one of :data:`ROLES`. Keys are EC P-256, PEM, PKCS#8, unencrypted
(protect them with file permissions). Directories are created 0700.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .durable import write_atomically
from .errors import CertificateError, UsageError

__all__ = [
    "DEFAULT_DAYS",
    "ROLES",
    "ROLE_URI_PREFIX",
    "CertAuthority",
    "Identity",
    "create_ca",
    "init_tls_dir",
    "issue",
    "load_ca",
    "load_identity",
    "normalize_role",
    "role_of",
]

log = logging.getLogger(__name__)

#: Roles, as written in certificates and file names (proto ``Role``: ROLE_<NAME>).
ROLES = ("source", "process-server", "master-target", "orchestrator")
#: SAN URI prefix that carries the role.
ROLE_URI_PREFIX = "urn:replication:role:"
#: Default validity of CA and leaf certificates, in days (the CA/B maximum of old).
DEFAULT_DAYS = 825
#: Backdating of ``notBefore`` to tolerate small clock skew between hosts.
_CLOCK_SKEW = dt.timedelta(minutes=5)
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
#: A DNS host name: dot-separated labels, no "..", "/" or leading "-" (it names a directory).
_HOST_RE = re.compile(rf"(?=.{{1,253}}\Z){_LABEL}(\.{_LABEL})*")


@dataclass(frozen=True)
class Identity:
    """What a daemon needs for mutual TLS: its certificate, its key and the CA (all PEM)."""

    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes


@dataclass(frozen=True)
class CertAuthority:
    """A CA certificate and its private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return _key_pem(self.key)


def normalize_role(role: str) -> str:
    """Return the canonical spelling of ``role`` (``process_server`` -> ``process-server``).

    Accepts the proto spelling too (``ROLE_PROCESS_SERVER``). Raises
    :class:`~replication.errors.UsageError` for an unknown role.
    """
    name = role.strip().lower().removeprefix("role_").replace("_", "-")
    if name not in ROLES:
        raise UsageError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
    return name


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _validity(days: int, not_before: dt.datetime | None) -> tuple[dt.datetime, dt.datetime]:
    if days < 1:
        raise UsageError(f"validity must be at least 1 day, not {days}")
    start = not_before if not_before is not None else dt.datetime.now(dt.UTC) - _CLOCK_SKEW
    return start, start + dt.timedelta(days=days)


def create_ca(
    common_name: str = "replication CA",
    *,
    days: int = DEFAULT_DAYS,
    not_before: dt.datetime | None = None,
) -> CertAuthority:
    """Return a new self-signed CA (EC P-256) that may sign leaf certificates only."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "replication"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    start, end = _validity(days, not_before)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertAuthority(cert=cert, key=key)


def _host_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
            continue
        except ValueError:
            pass
        if not _HOST_RE.fullmatch(host):
            raise UsageError(f"host {host!r} is neither a DNS name nor an IP address")
        names.append(x509.DNSName(host))
        if host == "localhost":
            names.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
            names.append(x509.IPAddress(ipaddress.ip_address("::1")))
    return names


def issue(
    ca: CertAuthority,
    host: str,
    role: str,
    *,
    days: int = DEFAULT_DAYS,
    not_before: dt.datetime | None = None,
    extra_hosts: Iterable[str] = (),
) -> Identity:
    """Return a new key and certificate for ``role`` on ``host``, signed by ``ca``.

    ``not_before`` (timezone-aware) and ``days`` let tests make expired or
    not-yet-valid certificates. The result's ``ca_pem`` is ``ca``'s certificate.
    """
    role = normalize_role(role)
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key()
    start, end = _validity(days, not_before)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "replication"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
            x509.NameAttribute(NameOID.COMMON_NAME, host),
        ]
    )
    san = [
        *_host_names([host, *extra_hosts]),
        x509.UniformResourceIdentifier(ROLE_URI_PREFIX + role),
    ]
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca.key, hashes.SHA256())
    )
    return Identity(
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        key_pem=_key_pem(key),
        ca_pem=ca.cert_pem,
    )


def role_of(cert: x509.Certificate | bytes) -> str | None:
    """Return the role in a certificate's SAN URIs, or None if it has none or several."""
    if isinstance(cert, bytes):
        cert = x509.load_pem_x509_certificate(cert)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    found = {
        uri.removeprefix(ROLE_URI_PREFIX)
        for uri in san.get_values_for_type(x509.UniformResourceIdentifier)
        if uri.startswith(ROLE_URI_PREFIX)
    }
    if len(found) != 1:
        return None
    (role,) = found
    return role if role in ROLES else None


# --- files -------------------------------------------------------------------------


def _write_file(path: Path, data: bytes, *, private: bool) -> None:
    """Write ``path`` atomically; mode 0600 for private files, 0644 otherwise."""
    write_atomically(path, data, mode=0o600 if private else 0o644)


def _mkdir_private(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)


def init_tls_dir(
    directory: str | os.PathLike[str],
    hosts: Sequence[str],
    *,
    days: int = DEFAULT_DAYS,
    force: bool = False,
) -> list[Path]:
    """Create a CA, every (host, role) certificate and the passphrase file in ``directory``.

    Refuses (:class:`~replication.errors.CertificateError`) to replace an existing
    CA unless ``force``. An existing passphrase file is kept even with ``force``:
    it keys the replicated data, so rotating it is a separate, deliberate step.
    Returns the paths written.
    """
    if not hosts:
        raise UsageError("at least one --host is needed")
    hosts = list(dict.fromkeys(hosts))
    _host_names(hosts)  # validate every name before writing anything
    root = Path(directory)
    ca_cert, ca_key = root / "ca.pem", root / "ca.key"
    if not force and (ca_cert.exists() or ca_key.exists()):
        raise CertificateError(
            f"{root} already holds a CA ({ca_cert.name}); refusing to overwrite it",
            hint="use --force to replace the CA and every certificate",
        )
    try:
        return _write_tls_dir(root, hosts, days)
    except OSError as err:
        raise CertificateError(
            f"cannot write certificates in {root}: {err.strerror or err}"
        ) from err


def _write_tls_dir(root: Path, hosts: list[str], days: int) -> list[Path]:
    _mkdir_private(root)
    ca = create_ca(days=days)
    written = [root / "ca.key", root / "ca.pem"]
    _write_file(written[0], ca.key_pem, private=True)
    _write_file(written[1], ca.cert_pem, private=False)
    for host in hosts:
        _mkdir_private(root / host)
        for role in ROLES:
            ident = issue(ca, host, role, days=days)
            key_path, cert_path = root / host / f"{role}.key", root / host / f"{role}.pem"
            _write_file(key_path, ident.key_pem, private=True)
            _write_file(cert_path, ident.cert_pem, private=False)
            written += [key_path, cert_path]
    passphrase = root / "passphrase"
    if not passphrase.exists():
        _write_file(passphrase, (secrets.token_hex(32) + "\n").encode(), private=True)
        written.append(passphrase)
    return written


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as err:
        raise CertificateError(
            f"{what} {path} does not exist",
            hint="create the TLS directory with `replication certs init DIR --host NAME`",
        ) from err
    except OSError as err:
        raise CertificateError(f"cannot read {what} {path}: {err.strerror or err}") from err


def load_ca(tls_dir: str | os.PathLike[str]) -> CertAuthority:
    """Load the CA certificate and key of a TLS directory (to issue more certificates)."""
    root = Path(tls_dir)
    cert_pem = _read(root / "ca.pem", "CA certificate")
    key_pem = _read(root / "ca.key", "CA key")
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except ValueError as err:
        raise CertificateError(f"the CA in {root} is not valid PEM: {err}") from err
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise CertificateError(f"{root / 'ca.key'} is not the key of {root / 'ca.pem'}")
    return CertAuthority(cert=cert, key=key)


def load_identity(tls_dir: str | os.PathLike[str], role: str, host: str = "localhost") -> Identity:
    """Load the certificate, key and CA of ``role`` on ``host`` from a TLS directory.

    Checks that the files are PEM, that the key belongs to the certificate, that
    the certificate carries ``role`` and is signed by the CA, and is currently
    valid. Every problem is a :class:`~replication.errors.CertificateError` naming
    the file.
    """
    role = normalize_role(role)
    root = Path(tls_dir)
    if not root.is_dir():
        raise CertificateError(
            f"TLS directory {root} does not exist or is not a directory",
            hint="create it with `replication certs init DIR --host NAME`",
        )
    cert_path, key_path = root / host / f"{role}.pem", root / host / f"{role}.key"
    ident = Identity(
        cert_pem=_read(cert_path, f"{role} certificate"),
        key_pem=_read(key_path, f"{role} key"),
        ca_pem=_read(root / "ca.pem", "CA certificate"),
    )
    _check_identity(ident, role, cert_path, key_path, root / "ca.pem")
    if key_path.stat().st_mode & 0o077:
        log.warning("private key %s is accessible to group or others; chmod 600 it", key_path)
    return ident


def _check_identity(
    ident: Identity, role: str, cert_path: Path, key_path: Path, ca_path: Path
) -> None:
    try:
        cert = x509.load_pem_x509_certificate(ident.cert_pem)
    except ValueError as err:
        raise CertificateError(f"{cert_path} is not a PEM certificate") from err
    try:
        ca = x509.load_pem_x509_certificate(ident.ca_pem)
    except ValueError as err:
        raise CertificateError(f"{ca_path} is not a PEM certificate") from err
    try:
        key = serialization.load_pem_private_key(ident.key_pem, password=None)
    except (ValueError, TypeError) as err:
        raise CertificateError(f"{key_path} is not an unencrypted PEM private key") from err
    if key.public_key() != cert.public_key():
        raise CertificateError(f"{key_path} is not the key of {cert_path}")
    found = role_of(cert)
    if found != role:
        raise CertificateError(f"{cert_path} carries role {found!r}, not {role!r}")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as err:
        raise CertificateError(f"{cert_path} is not signed by the CA {ca_path}") from err
    now = dt.datetime.now(dt.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise CertificateError(
            f"{cert_path} is not valid now (valid {cert.not_valid_before_utc:%Y-%m-%d} to "
            f"{cert.not_valid_after_utc:%Y-%m-%d})",
            hint="issue new certificates with `replication certs init --force`",
        )

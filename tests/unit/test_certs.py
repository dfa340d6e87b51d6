"""Certificates: the files of `certs init`, roles inside certificates, load_identity errors."""

from __future__ import annotations

import datetime as dt
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from replication import certs
from replication.errors import CertificateError, UsageError


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tls") / "pki"
    certs.init_tls_dir(root, ["localhost", "ps.example"], days=30)
    return root


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_writes_every_file_and_keys_are_0600(tls_dir: Path):
    assert _mode(tls_dir / "ca.key") == 0o600
    assert _mode(tls_dir / "passphrase") == 0o600
    assert (tls_dir / "ca.pem").is_file()
    for host in ("localhost", "ps.example"):
        for role in certs.ROLES:
            assert (tls_dir / host / f"{role}.pem").is_file()
            assert _mode(tls_dir / host / f"{role}.key") == 0o600
    text = (tls_dir / "passphrase").read_text().strip()
    assert len(text) == 64 and bytes.fromhex(text)
    leftovers = [p for p in tls_dir.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def test_certificate_carries_role_host_and_validity(tls_dir: Path):
    pem = (tls_dir / "ps.example" / "process-server.pem").read_bytes()
    cert = x509.load_pem_x509_certificate(pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["ps.example"]
    assert san.get_values_for_type(x509.IPAddress) == []
    assert "urn:replication:role:process-server" in san.get_values_for_type(
        x509.UniformResourceIdentifier
    )
    assert certs.role_of(cert) == "process-server"
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert life == dt.timedelta(days=30)
    ca = x509.load_pem_x509_certificate((tls_dir / "ca.pem").read_bytes())
    cert.verify_directly_issued_by(ca)


def test_localhost_gets_loopback_ip_sans(tls_dir: Path):
    cert = x509.load_pem_x509_certificate((tls_dir / "localhost" / "source.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}


def test_load_identity_round_trip(tls_dir: Path):
    ident = certs.load_identity(tls_dir, "master_target", host="ps.example")
    assert ident.ca_pem == (tls_dir / "ca.pem").read_bytes()
    assert certs.role_of(ident.cert_pem) == "master-target"


@pytest.mark.parametrize("missing", ["ca.pem", "localhost/orchestrator.key"])
def test_load_identity_missing_file_is_typed(tls_dir: Path, tmp_path: Path, missing: str):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tls_dir, copy)
    (copy / missing).unlink()
    with pytest.raises(CertificateError, match="does not exist"):
        certs.load_identity(copy, "orchestrator")


def test_load_identity_refuses_mismatched_key(tls_dir: Path, tmp_path: Path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tls_dir, copy)
    (copy / "localhost" / "source.key").write_bytes(
        (copy / "localhost" / "orchestrator.key").read_bytes()
    )
    with pytest.raises(CertificateError, match="not the key"):
        certs.load_identity(copy, "source")


def test_load_identity_refuses_other_ca_and_wrong_role(tls_dir: Path, tmp_path: Path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tls_dir, copy)
    other = certs.issue(certs.create_ca(), "localhost", "source")
    (copy / "localhost" / "source.pem").write_bytes(other.cert_pem)
    (copy / "localhost" / "source.key").write_bytes(other.key_pem)
    with pytest.raises(CertificateError, match="not signed by the CA"):
        certs.load_identity(copy, "source")
    wrong = certs.issue(certs.load_ca(copy), "localhost", "orchestrator")
    (copy / "localhost" / "source.pem").write_bytes(wrong.cert_pem)
    (copy / "localhost" / "source.key").write_bytes(wrong.key_pem)
    with pytest.raises(CertificateError, match="carries role 'orchestrator'"):
        certs.load_identity(copy, "source")


def test_load_identity_refuses_expired(tls_dir: Path, tmp_path: Path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tls_dir, copy)
    old = dt.datetime.now(dt.UTC) - dt.timedelta(days=10)
    expired = certs.issue(certs.load_ca(copy), "localhost", "source", days=1, not_before=old)
    (copy / "localhost" / "source.pem").write_bytes(expired.cert_pem)
    (copy / "localhost" / "source.key").write_bytes(expired.key_pem)
    with pytest.raises(CertificateError, match="not valid now"):
        certs.load_identity(copy, "source")


def test_bad_inputs_are_usage_errors(tmp_path: Path):
    with pytest.raises(UsageError):
        certs.normalize_role("admin")
    with pytest.raises(UsageError):
        certs.init_tls_dir(tmp_path / "x", ["../evil"])
    assert not (tmp_path / "x").exists()
    assert certs.normalize_role("ROLE_PROCESS_SERVER") == "process-server"


def test_refuses_to_overwrite_ca_unless_forced(tmp_path: Path):
    root = tmp_path / "pki"
    certs.init_tls_dir(root, ["a"], days=2)
    ca_before = (root / "ca.pem").read_bytes()
    secret_before = (root / "passphrase").read_bytes()
    with pytest.raises(CertificateError, match="refusing"):
        certs.init_tls_dir(root, ["a"])
    assert (root / "ca.pem").read_bytes() == ca_before
    certs.init_tls_dir(root, ["a"], force=True)
    assert (root / "ca.pem").read_bytes() != ca_before
    assert (root / "passphrase").read_bytes() == secret_before  # data key is never rotated


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "replication", *args], capture_output=True, text=True, timeout=60
    )


def test_cli_init_then_refuse_without_force(tmp_path: Path):
    root = tmp_path / "pki"
    done = _cli("certs", "init", str(root), "--host", "a", "--host", "b", "--days", "10")
    assert done.returncode == 0, done.stderr
    assert (root / "b" / "orchestrator.pem").is_file()
    assert _mode(root / "a" / "master-target.key") == 0o600
    again = _cli("certs", "init", str(root), "--host", "a")
    assert again.returncode != 0
    lines = again.stderr.strip().splitlines()
    assert len(lines) == 1 and "[tls.certificate]" in lines[0], again.stderr
    assert "Traceback" not in again.stderr
    forced = _cli("certs", "init", str(root), "--host", "a", "--force")
    assert forced.returncode == 0, forced.stderr


def test_load_identity_warns_about_loose_key(
    tls_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    import logging
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tls_dir, copy)
    (copy / "localhost" / "source.key").chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="replication.certs"):
        certs.load_identity(copy, "source")
    assert any("chmod 600" in r.getMessage() for r in caplog.records)

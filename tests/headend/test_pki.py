"""The headend CA: issuing client and server certificates, loading and creating the CA directory."""

from __future__ import annotations

import ipaddress
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given
from hypothesis import strategies as st

from gateway.identity import build_csr, generate_key
from headend_min.pki import (
    GATEWAY_URI_PREFIX,
    SITE_URI_PREFIX,
    CaError,
    CertificateAuthority,
    CsrError,
    PeerCertificate,
    PkiError,
    create_ca_certificate,
    gateway_id_of,
    load_csr,
    serial_text,
)

NOW = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.create(tmp_path_factory.mktemp("ca"), now=NOW)


def _csr_with_claims(key: ec.EllipticCurvePrivateKey, common_name: str) -> bytes:
    """A CSR that claims a subject, a SAN and a CA extension the headend must all ignore."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "evil"),
                ]
            )
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(GATEWAY_URI_PREFIX + "x")]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(Encoding.PEM)


def test_client_certificate_takes_subject_from_the_headend(ca: CertificateAuthority) -> None:
    key = generate_key()
    csr = load_csr(_csr_with_claims(key, "gw-other"))
    cert = ca.issue_client_certificate(csr, gateway_id="gw-1", site_id="site-a", now=NOW)

    assert cert.subject == x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gw-1")])
    assert gateway_id_of(cert) == "gw-1"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        GATEWAY_URI_PREFIX + "gw-1",
        SITE_URI_PREFIX + "site-a",
    ]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cert.public_key() == key.public_key()
    cert.verify_directly_issued_by(ca.certificate)
    assert cert.not_valid_after_utc - NOW == timedelta(days=30)
    assert PeerCertificate.of(cert) == PeerCertificate("gw-1", serial_text(cert))


def test_serials_are_random_and_hex(ca: CertificateAuthority) -> None:
    csr = load_csr(build_csr(generate_key(), "gw-1"))
    serials = {
        serial_text(ca.issue_client_certificate(csr, gateway_id="gw-1", site_id="s", now=NOW))
        for _ in range(5)
    }
    assert len(serials) == 5
    assert all(int(s, 16) > 2**64 for s in serials)  # random 159-bit, not a counter


def test_tampered_csr_is_refused() -> None:
    pem = build_csr(generate_key(), "gw-1")
    der = x509.load_pem_x509_csr(pem).public_bytes(Encoding.DER)
    # Flip one bit in the subject's CN: the signature no longer covers the content.
    index = der.index(b"gw-1")
    tampered = der[:index] + b"gw-2" + der[index + 4 :]
    tampered_pem = x509.load_der_x509_csr(tampered).public_bytes(Encoding.PEM)
    with pytest.raises(CsrError, match="proof of possession"):
        load_csr(tampered_pem)


_EMPTY_CSR = b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"


@pytest.mark.parametrize("pem", [b"", b"garbage", _EMPTY_CSR])
def test_malformed_csr_is_refused(pem: bytes) -> None:
    with pytest.raises(CsrError, match="not a PEM"):
        load_csr(pem)


def test_oversized_csr_is_refused() -> None:
    with pytest.raises(CsrError, match="bytes"):
        load_csr(b"x" * 20_000)


def test_non_p256_key_is_refused() -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gw-1")]))
        .sign(rsa_key, hashes.SHA256())
    )
    with pytest.raises(CsrError, match="P-256"):
        load_csr(csr.public_bytes(Encoding.PEM))


def test_server_certificate_names_hosts(ca: CertificateAuthority) -> None:
    issued = ca.issue_server_certificate(["127.0.0.1", "headend.example.net", "[::1]"], now=NOW)
    san = issued.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert san.get_values_for_type(x509.DNSName) == ["headend.example.net"]
    eku = issued.certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    issued.certificate.verify_directly_issued_by(ca.certificate)
    with pytest.raises(PkiError, match="at least one host"):
        ca.issue_server_certificate([], now=NOW)


def test_leaf_never_outlives_the_ca(ca: CertificateAuthority) -> None:
    csr = load_csr(build_csr(generate_key(), "gw-1"))
    cert = ca.issue_client_certificate(
        csr, gateway_id="gw-1", site_id="s", now=NOW, lifetime_s=20 * 365 * 86_400
    )
    assert cert.not_valid_after_utc == ca.certificate.not_valid_after_utc


def test_ca_directory_is_created_once_and_reloaded(tmp_path: Path) -> None:
    created = CertificateAuthority.open(tmp_path / "ca", now=NOW)
    assert stat.S_IMODE((tmp_path / "ca" / "ca.key").stat().st_mode) == 0o600
    loaded = CertificateAuthority.open(tmp_path / "ca", now=NOW)
    assert loaded.certificate == created.certificate
    assert loaded.certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    with pytest.raises(CaError, match="already holds a CA"):
        CertificateAuthority.create(tmp_path / "ca", now=NOW)


def test_broken_ca_directory_is_a_clear_error(tmp_path: Path) -> None:
    CertificateAuthority.create(tmp_path, now=NOW)
    (tmp_path / "ca.pem").write_bytes(b"not a certificate")
    with pytest.raises(CaError, match="unreadable"):
        CertificateAuthority.load(tmp_path)
    (tmp_path / "ca.pem").unlink()
    with pytest.raises(CaError, match="cannot read"):
        CertificateAuthority.open(tmp_path, now=NOW)


def test_mismatched_ca_key_is_refused(tmp_path: Path) -> None:
    one = CertificateAuthority.create(tmp_path / "one", now=NOW)
    two = CertificateAuthority.create(tmp_path / "two", now=NOW)
    with pytest.raises(CaError, match="do not belong together"):
        CertificateAuthority(one.key, two.certificate)


def test_server_certificate_files(ca: CertificateAuthority, tmp_path: Path) -> None:
    cert_path, key_path = ca.write_server_certificate(tmp_path / "tls", ["127.0.0.1"], now=NOW)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    x509.load_pem_x509_certificate(cert_path.read_bytes()).verify_directly_issued_by(ca.certificate)


_KEY = generate_key()
_CA = CertificateAuthority(_KEY, create_ca_certificate(_KEY, common_name="test CA", now=NOW))


@given(st.from_regex(r"[a-z0-9][a-z0-9._-]{0,40}", fullmatch=True))
def test_any_gateway_id_round_trips(gateway_id: str) -> None:
    csr = load_csr(build_csr(_KEY, "ignored"))
    cert = _CA.issue_client_certificate(csr, gateway_id=gateway_id, site_id="s", now=NOW)
    assert gateway_id_of(cert) == gateway_id

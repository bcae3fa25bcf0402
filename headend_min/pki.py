"""The headend's small certificate authority: gateway client certificates and its own TLS cert.

Pure functions over `cryptography` objects (a caller passes the CA key and certificate, the
subject data and the time), plus `CertificateAuthority`, which keeps the CA in a directory:
`ca.key` (EC P-256, PKCS#8 PEM, 0600) and `ca.pem` (self-signed CA certificate).

Gateway certificates follow reference/appliance.md §4.2: the gateway proves possession of its key
(the CSR's signature must verify), and the headend sets subject and SAN from its own records,
never from the CSR: CN=<gateway id>, SAN URIs `urn:dergw:gateway:<id>` and `urn:dergw:site:<id>`,
ExtendedKeyUsage clientAuth only, a random 159-bit serial. Serials are handled as lowercase hex
text (`serial_text`) everywhere outside this module: they do not fit SQLite's 64-bit integers.

Keys are EC P-256 throughout: small, fast on a Pi, accepted by grpc and mosquitto.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dergw.v1.enrollment import write_private_file

__all__ = [
    "DEFAULT_CA_LIFETIME_S",
    "DEFAULT_CLIENT_LIFETIME_S",
    "DEFAULT_SERVER_LIFETIME_S",
    "GATEWAY_URI_PREFIX",
    "HEADEND_IDENTITY",
    "SITE_URI_PREFIX",
    "CaError",
    "CertificateAuthority",
    "CsrError",
    "PeerCertificate",
    "PkiError",
    "ServerCertificate",
    "cert_pem",
    "create_ca_certificate",
    "gateway_id_of",
    "generate_key",
    "issue_client_certificate",
    "issue_server_certificate",
    "key_pem",
    "load_csr",
    "public_key_sha256",
    "serial_text",
]

DEFAULT_CA_LIFETIME_S = 10 * 365 * 86_400
DEFAULT_CLIENT_LIFETIME_S = 30 * 86_400  # short-lived: renewal, not CRLs, is the revocation tool
DEFAULT_SERVER_LIFETIME_S = 90 * 86_400
GATEWAY_URI_PREFIX = "urn:dergw:gateway:"
# The CN of the headend's own MQTT client certificate. No gateway may enroll under this id
# (`enrollment.Enrollment.create_token` refuses it), or it would pass the broker's headend ACL.
HEADEND_IDENTITY = "headend"
SITE_URI_PREFIX = "urn:dergw:site:"
MAX_CSR_BYTES = 16 * 1024
# Tolerate a gateway clock slightly behind the headend's when it first uses a fresh certificate.
_BACKDATE = timedelta(minutes=5)


class PkiError(Exception):
    """Base of the errors raised here."""


class CsrError(PkiError):
    """A certificate signing request that cannot be used (unparseable, wrong key, bad signature)."""


class CaError(PkiError):
    """The CA directory cannot be read or written, or holds something that is not a CA."""


def generate_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Unencrypted PKCS#8 PEM (what grpc and ssl load); protect it with file permissions."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def serial_text(cert: x509.Certificate) -> str:
    """The certificate's serial as lowercase hex: the form stored and compared everywhere."""
    return format(cert.serial_number, "x")


def public_key_sha256(public_key: ec.EllipticCurvePublicKey) -> str:
    """SHA-256 (hex) of the DER SubjectPublicKeyInfo: compares keys across CSRs and certs."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def gateway_id_of(cert: x509.Certificate) -> str | None:
    """The gateway id a certificate was issued to (its CN), or None if it has no CN."""
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        return None
    value = names[0].value
    return value if isinstance(value, str) else value.decode()


def load_csr(pem: str | bytes) -> x509.CertificateSigningRequest:
    """Parse a PEM CSR and check proof of possession; raise CsrError saying what is wrong."""
    data = pem.encode() if isinstance(pem, str) else pem
    if len(data) > MAX_CSR_BYTES:
        raise CsrError(f"CSR is {len(data)} bytes, more than {MAX_CSR_BYTES}")
    try:
        csr = x509.load_pem_x509_csr(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CsrError(f"not a PEM certificate signing request: {exc}") from None
    try:
        public_key = csr.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CsrError(f"CSR public key unreadable: {exc}") from None
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
        public_key.curve, ec.SECP256R1
    ):
        raise CsrError("CSR key must be EC P-256 (secp256r1); generate the key with `dergw enroll`")
    try:
        valid = csr.is_signature_valid
    except (ValueError, UnsupportedAlgorithm):
        valid = False
    if not valid:
        raise CsrError("CSR signature does not verify (no proof of possession of the key)")
    return csr


def _utc(now: datetime) -> datetime:
    return now.replace(tzinfo=UTC) if now.tzinfo is None else now.astimezone(UTC)


def create_ca_certificate(
    key: ec.EllipticCurvePrivateKey,
    *,
    common_name: str,
    now: datetime,
    lifetime_s: int = DEFAULT_CA_LIFETIME_S,
) -> x509.Certificate:
    """A self-signed CA certificate for `key` (path length 0: it signs leaves only)."""
    now = _utc(now)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + timedelta(seconds=lifetime_s))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
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
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )


def _leaf_builder(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    public_key: ec.EllipticCurvePublicKey,
    *,
    common_name: str,
    now: datetime,
    lifetime_s: int,
) -> x509.CertificateBuilder:
    if lifetime_s <= 0:
        raise PkiError(f"certificate lifetime must be positive, got {lifetime_s} s")
    now = _utc(now)
    not_after = now + timedelta(seconds=lifetime_s)
    # A leaf never outlives its CA: clients would reject it at the CA's expiry anyway.
    not_after = min(not_after, ca_cert.not_valid_after_utc)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(not_after)
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )


def issue_client_certificate(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    csr: x509.CertificateSigningRequest,
    *,
    gateway_id: str,
    site_id: str,
    lifetime_s: int = DEFAULT_CLIENT_LIFETIME_S,
    now: datetime,
) -> x509.Certificate:
    """A clientAuth certificate for the CSR's key; subject and SAN from the arguments only.

    The CSR's own subject, SAN and extensions are ignored: a gateway cannot name itself.
    """
    if not csr.is_signature_valid:
        raise CsrError("CSR signature does not verify (no proof of possession of the key)")
    public_key = csr.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise CsrError("CSR key must be EC P-256 (secp256r1)")
    builder = _leaf_builder(
        ca_key, ca_cert, public_key, common_name=gateway_id, now=now, lifetime_s=lifetime_s
    )
    builder = builder.add_extension(
        x509.SubjectAlternativeName(
            [
                x509.UniformResourceIdentifier(GATEWAY_URI_PREFIX + gateway_id),
                x509.UniformResourceIdentifier(SITE_URI_PREFIX + site_id),
            ]
        ),
        critical=False,
    ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


@dataclass(frozen=True)
class PeerCertificate:
    """Who a verified client certificate names: what enrollment renews and revocation checks."""

    gateway_id: str
    serial: str  # lowercase hex

    @classmethod
    def of(cls, cert: x509.Certificate) -> PeerCertificate | None:
        gateway_id = gateway_id_of(cert)
        return None if not gateway_id else cls(gateway_id, serial_text(cert))


@dataclass(frozen=True)
class ServerCertificate:
    """The headend's TLS certificate and its freshly generated key."""

    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey

    @property
    def certificate_pem(self) -> bytes:
        return cert_pem(self.certificate)

    @property
    def key_pem(self) -> bytes:
        return key_pem(self.private_key)


def _host_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return x509.DNSName(host)


def issue_server_certificate(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    hosts: Sequence[str],
    *,
    now: datetime,
    lifetime_s: int = DEFAULT_SERVER_LIFETIME_S,
) -> ServerCertificate:
    """A serverAuth certificate (new key) for `hosts`: DNS names and/or IP literals as SANs."""
    if not hosts:
        raise PkiError("a server certificate needs at least one host name or IP address")
    key = generate_key()
    builder = _leaf_builder(
        ca_key, ca_cert, key.public_key(), common_name=hosts[0], now=now, lifetime_s=lifetime_s
    )
    builder = builder.add_extension(
        x509.SubjectAlternativeName([_host_name(h) for h in hosts]), critical=False
    ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    return ServerCertificate(builder.sign(ca_key, hashes.SHA256()), key)


class CertificateAuthority:
    """The CA key and certificate, kept in `directory` (ca.key 0600, ca.pem).

    `CertificateAuthority.open(dir, now=...)` loads it, creating it on first use.
    """

    KEY_FILE = "ca.key"
    CERT_FILE = "ca.pem"

    def __init__(self, key: ec.EllipticCurvePrivateKey, certificate: x509.Certificate) -> None:
        if key.public_key().public_numbers() != _ec_public(certificate).public_numbers():
            raise CaError("CA key and CA certificate do not belong together")
        self.key = key
        self.certificate = certificate

    @property
    def certificate_pem(self) -> bytes:
        return cert_pem(self.certificate)

    @classmethod
    def create(
        cls, directory: Path, *, now: datetime, common_name: str = "dergw headend CA"
    ) -> CertificateAuthority:
        """A new CA in `directory`; refuses to overwrite an existing one."""
        key_path, cert_path = directory / cls.KEY_FILE, directory / cls.CERT_FILE
        if key_path.exists() or cert_path.exists():
            raise CaError(f"{directory} already holds a CA; load it or use another directory")
        key = generate_key()
        cert = create_ca_certificate(key, common_name=common_name, now=now)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            write_private_file(key_path, key_pem(key))
            write_private_file(cert_path, cert_pem(cert), mode=0o644)
        except OSError as exc:
            raise CaError(f"cannot write the CA to {directory}: {exc}") from exc
        return cls(key, cert)

    @classmethod
    def load(cls, directory: Path) -> CertificateAuthority:
        key_path, cert_path = directory / cls.KEY_FILE, directory / cls.CERT_FILE
        try:
            key_data, cert_data = key_path.read_bytes(), cert_path.read_bytes()
        except OSError as exc:
            raise CaError(f"cannot read the CA in {directory}: {exc}") from exc
        try:
            key = serialization.load_pem_private_key(key_data, password=None)
            cert = x509.load_pem_x509_certificate(cert_data)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise CaError(f"{directory}: unreadable CA key or certificate: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CaError(f"{key_path}: not an EC private key")
        return cls(key, cert)

    @classmethod
    def open(
        cls, directory: Path, *, now: datetime, common_name: str = "dergw headend CA"
    ) -> CertificateAuthority:
        """Load the CA in `directory`, creating it there if there is none yet."""
        if not (directory / cls.KEY_FILE).exists() and not (directory / cls.CERT_FILE).exists():
            return cls.create(directory, now=now, common_name=common_name)
        return cls.load(directory)

    def issue_client_certificate(
        self,
        csr: x509.CertificateSigningRequest,
        *,
        gateway_id: str,
        site_id: str,
        lifetime_s: int = DEFAULT_CLIENT_LIFETIME_S,
        now: datetime,
    ) -> x509.Certificate:
        return issue_client_certificate(
            self.key,
            self.certificate,
            csr,
            gateway_id=gateway_id,
            site_id=site_id,
            lifetime_s=lifetime_s,
            now=now,
        )

    def issue_server_certificate(
        self, hosts: Sequence[str], *, now: datetime, lifetime_s: int = DEFAULT_SERVER_LIFETIME_S
    ) -> ServerCertificate:
        return issue_server_certificate(
            self.key, self.certificate, hosts, now=now, lifetime_s=lifetime_s
        )

    def write_server_certificate(
        self,
        directory: Path,
        hosts: Sequence[str],
        *,
        now: datetime,
        lifetime_s: int = DEFAULT_SERVER_LIFETIME_S,
    ) -> tuple[Path, Path]:
        """Issue a server certificate and write `server.pem` + `server.key` (0600) to `directory`.

        Returns (certificate path, key path): what uvicorn's ssl_certfile/ssl_keyfile take.
        Reissued at each start, so it never expires under a running headend's feet for long.
        """
        issued = self.issue_server_certificate(hosts, now=now, lifetime_s=lifetime_s)
        cert_path, key_path = directory / "server.pem", directory / "server.key"
        try:
            directory.mkdir(parents=True, exist_ok=True)
            write_private_file(key_path, issued.key_pem)
            write_private_file(cert_path, issued.certificate_pem, mode=0o644)
        except OSError as exc:
            raise CaError(f"cannot write the server certificate to {directory}: {exc}") from exc
        return cert_path, key_path


def _ec_public(cert: x509.Certificate) -> ec.EllipticCurvePublicKey:
    public_key = cert.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise CaError("the CA certificate does not hold an EC public key")
    return public_key

"""The gateway's X.509 identity: its device key, its client certificate, enrollment and renewal.

The key is generated here, on the device, and never leaves it (EC P-256, a 0600 file written
atomically). The headend signs a certificate with CN=<gateway id>; the gateway uses it for mTLS on
both uplinks through `Identity.ssl_context` (gRPC on grpclib, MQTT; `Identity.tls_files` too).

Layout under `<state_dir>/identity/` (directory 0700):

    current            text: the name of the generation in use, e.g. "g-3f2a9c01d4e5b6a7"
    pending            text: a renewal's new key waiting for its certificate (optional)
    staged             text: a renewed generation, complete, not yet proven (optional)
    g-<random>/key.pem   the private key (PKCS#8 PEM, 0600)
    g-<random>/cert.pem  the client certificate
    g-<random>/ca.pem    the headend CA: trusted for the headend's servers, chains our cert
    g-<random>/cert.json what the gateway reads from cert.pem (gateway id, serial, validity),
                         bound to cert.pem and ca.pem by their SHA-256

Each key/cert pair lives in its own generation directory and the `current` pointer is replaced
atomically, so a power cut at any moment leaves either the old identity or the new one, never a
key from one and a certificate from the other.

Loading an identity does not import `cryptography` (~9 MB resident in a gateway that otherwise
never needs it): the certificate was checked (for this key, signed by this CA) when it was
installed, and `cert.json` records what that check read, with the hashes of the exact files
checked. `Identity.load` recomputes the hashes (hashlib) and has OpenSSL confirm that the key
belongs to the certificate (`ssl` `load_cert_chain`). A generation without `cert.json` (installed
by an older version) or whose files no longer match it gets the full check with `cryptography`,
which either names what is wrong or records `cert.json` again. Only making a key and a CSR
(enrollment, renewal) needs `cryptography` in the gateway process.

Renewal (reference/appliance.md §4.4) uses a new key each time and keeps the old certificate
until the new one has connected: `stage_renewal` (or `begin_renewal` + `stage_certificate`)
writes a staged generation; the uplink connects with `Identity.load(state_dir, staged=True)`;
then `commit_renewal` (the new one works) or `rollback_renewal` (it does not).

Enrollment and renewal talk HTTPS with the standard library (urllib + ssl): the gateway's
runtime dependencies hold no HTTP client. Enrollment authenticates the server (`ca_bundle`, or
the system trust store); renewal additionally presents the current client certificate.

`classify_tls_failure` names why a TLS connection failed (expired, unknown CA, revoked, no
certificate, other) for the uplink's backoff and the health report.
"""

from __future__ import annotations

import base64
import contextlib
import enum
import hashlib
import json
import secrets
import shutil
import ssl
import urllib.error
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dergw.v1.enrollment import (
    CERTIFICATE_HEADER,
    SIGNATURE_HEADER,
    build_csr,
    renew_at,
    write_private_file,
)

# X.509 (`cryptography`) and the HTTPS client are imported by the functions that use them:
# making a key or CSR (enrollment, renewal) and the full check of an identity without cert.json.
# A gateway connecting with an enrolled identity never needs them.
if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

__all__ = [
    "CERTIFICATE_HEADER",
    "ENROLL_API_PATH",
    "IDENTITY_DIRNAME",
    "SIGNATURE_HEADER",
    "Enrolled",
    "EnrollmentRefusedError",
    "HeadendUnreachableError",
    "Identity",
    "IdentityError",
    "NotEnrolledError",
    "TlsFailure",
    "begin_renewal",
    "build_csr",
    "classify_tls_failure",
    "commit_renewal",
    "enroll",
    "enroll_api_url",
    "generate_key",
    "renew_at",
    "renewal_headers",
    "rollback_renewal",
    "stage_certificate",
    "stage_renewal",
    "write_private_file",
]

IDENTITY_DIRNAME = "identity"
KEY_FILE, CERT_FILE, CA_FILE = "key.pem", "cert.pem", "ca.pem"
CERT_FACTS_FILE = "cert.json"
CERT_FACTS_FORMAT = 1
CURRENT, PENDING, STAGED = "current", "pending", "staged"
# Where the headend serves POST .../enroll and .../renew under its base URL (headend_min.api).
ENROLL_API_PATH = "/api/v1"
MAX_RESPONSE_BYTES = 256 * 1024
DEFAULT_TIMEOUT_S = 30.0


class IdentityError(Exception):
    """The identity on disk or a certificate received for it is unusable."""


class NotEnrolledError(IdentityError):
    """No identity (or no staged renewal) in the state directory."""


class HeadendUnreachableError(IdentityError):
    """The HTTPS request did not get an answer (network, DNS, TLS handshake)."""

    def __init__(self, message: str, tls_failure: TlsFailure | None = None) -> None:
        super().__init__(message)
        self.tls_failure = tls_failure


class EnrollmentRefusedError(IdentityError):
    """The headend answered with an error status (bad token, revoked, ...)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"headend refused (HTTP {status}): {detail}")
        self.status = status
        self.detail = detail


# -- files -------------------------------------------------------------------------------------


def _identity_dir(state_dir: Path) -> Path:
    directory = state_dir / IDENTITY_DIRNAME
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    return directory


def _read_pointer(directory: Path, name: str) -> str | None:
    try:
        value = (directory / name).read_text().strip()
    except FileNotFoundError:
        return None
    # Only our own generation names: a pointer never escapes the identity directory.
    if not value.startswith("g-") or "/" in value or value in {".", ".."}:
        raise IdentityError(f"{directory / name}: not a generation name ({value!r}); re-enroll")
    return value


def _new_generation(directory: Path) -> Path:
    generation = directory / f"g-{secrets.token_hex(8)}"
    generation.mkdir(mode=0o700)
    return generation


# -- keys, CSRs, timing ------------------------------------------------------------------------


def generate_key() -> ec.EllipticCurvePrivateKey:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


# -- the identity ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """One generation of the gateway's identity: key, certificate and CA, as paths and bytes."""

    gateway_id: str
    key_path: Path
    cert_path: Path
    ca_path: Path
    private_key_pem: bytes
    certificate_pem: bytes  # the leaf certificate (its chain is the CA in ca_pem)
    ca_pem: bytes
    serial: str  # lowercase hex, as the headend stores it
    not_before: datetime
    not_after: datetime

    @classmethod
    def load(cls, state_dir: Path, *, staged: bool = False) -> Identity:
        """The identity in use (or the staged renewal); NotEnrolledError if there is none."""
        directory = state_dir / IDENTITY_DIRNAME
        name = (
            _read_pointer(directory, STAGED if staged else CURRENT) if directory.is_dir() else None
        )
        if name is None:
            what = "no staged renewal" if staged else "not enrolled"
            raise NotEnrolledError(
                f"{what} in {directory}" + ("" if staged else "; run `dergw enroll` first")
            )
        return cls._load_generation(directory / name)

    @classmethod
    def _load_generation(cls, generation: Path) -> Identity:
        key_path, cert_path, ca_path = (
            generation / KEY_FILE,
            generation / CERT_FILE,
            generation / CA_FILE,
        )
        try:
            key_pem, cert_pem, ca_pem = (
                key_path.read_bytes(),
                cert_path.read_bytes(),
                ca_path.read_bytes(),
            )
        except OSError as exc:
            raise IdentityError(f"identity {generation} incomplete: {exc}; re-enroll") from exc
        facts = _CertificateFacts.read(generation / CERT_FACTS_FILE, cert_pem, ca_pem)
        if facts is None or not _key_matches(cert_path, key_path):
            # Installed by an older version, or the files changed since they were checked: the
            # full check either says what is wrong (raises) or records the facts again.
            key = _load_key(key_pem, key_path)
            cert = _check_certificate(cert_pem, ca_pem, key, source=str(cert_path))
            facts = _CertificateFacts.of(cert, cert_pem, ca_pem)
            # A read-only identity stays usable; the next load repeats the full check.
            with contextlib.suppress(OSError):
                facts.write(generation / CERT_FACTS_FILE)
        return cls(
            gateway_id=facts.gateway_id,
            key_path=key_path,
            cert_path=cert_path,
            ca_path=ca_path,
            private_key_pem=key_pem,
            certificate_pem=cert_pem,
            ca_pem=ca_pem,
            serial=facts.serial,
            not_before=facts.not_before,
            not_after=facts.not_after,
        )

    def seconds_left(self, now: datetime) -> float:
        return (self.not_after - _utc(now)).total_seconds()

    def days_left(self, now: datetime) -> float:
        return self.seconds_left(now) / 86_400

    @property
    def renew_at(self) -> datetime:
        return renew_at(self.not_before, self.not_after)

    def renewal_due(self, now: datetime) -> bool:
        return _utc(now) >= self.renew_at

    def tls_files(self) -> tuple[str, str, str]:
        """(ca_certs, certfile, keyfile) as paho's `Client.tls_set` takes them."""
        return str(self.ca_path), str(self.cert_path), str(self.key_path)

    def ssl_context(self) -> ssl.SSLContext:
        """A client context: trusts the headend CA, presents this certificate (mTLS)."""
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=self.ca_pem.decode())
        context.load_cert_chain(str(self.cert_path), str(self.key_path))
        return context


def _utc(now: datetime) -> datetime:
    return now.replace(tzinfo=UTC) if now.tzinfo is None else now.astimezone(UTC)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class _CertificateFacts:
    """What `Identity` reads from a certificate that passed `_check_certificate` (cert.json),
    valid only for the exact certificate and CA files whose hashes it records."""

    gateway_id: str
    serial: str
    not_before: datetime
    not_after: datetime
    cert_sha256: str
    ca_sha256: str

    @classmethod
    def of(cls, cert: x509.Certificate, cert_pem: bytes, ca_pem: bytes) -> _CertificateFacts:
        return cls(
            gateway_id=_common_name(cert),
            serial=format(cert.serial_number, "x"),
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            cert_sha256=_sha256(cert_pem),
            ca_sha256=_sha256(ca_pem),
        )

    @classmethod
    def read(cls, path: Path, cert_pem: bytes, ca_pem: bytes) -> _CertificateFacts | None:
        """The recorded facts if they are for exactly these files; None if absent or not."""
        try:
            raw = json.loads(path.read_bytes())
            if raw["format"] != CERT_FACTS_FORMAT:
                return None
            facts = cls(
                gateway_id=str(raw["gateway_id"]),
                serial=str(raw["serial"]),
                not_before=datetime.fromisoformat(raw["not_before"]),
                not_after=datetime.fromisoformat(raw["not_after"]),
                cert_sha256=str(raw["cert_sha256"]),
                ca_sha256=str(raw["ca_sha256"]),
            )
        except (OSError, ValueError, TypeError, KeyError):
            return None
        if facts.not_before.tzinfo is None or facts.not_after.tzinfo is None:
            return None
        if facts.cert_sha256 != _sha256(cert_pem) or facts.ca_sha256 != _sha256(ca_pem):
            return None
        return facts

    def write(self, path: Path) -> None:
        text = json.dumps(
            {
                "format": CERT_FACTS_FORMAT,
                "gateway_id": self.gateway_id,
                "serial": self.serial,
                "not_before": self.not_before.isoformat(),
                "not_after": self.not_after.isoformat(),
                "cert_sha256": self.cert_sha256,
                "ca_sha256": self.ca_sha256,
            },
            indent=1,
        )
        write_private_file(path, text.encode() + b"\n", mode=0o644)


def _key_matches(cert_path: Path, key_path: Path) -> bool:
    """OpenSSL's check that the private key belongs to the certificate (what a TLS handshake
    would use); no `cryptography` needed."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        # An empty password: an encrypted key fails here instead of prompting on a terminal.
        context.load_cert_chain(str(cert_path), str(key_path), password="")
    except (ssl.SSLError, OSError):
        return False
    return True


def _load_key(pem: bytes, source: Path) -> ec.EllipticCurvePrivateKey:
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise IdentityError(f"{source}: unreadable private key: {exc}; re-enroll") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise IdentityError(f"{source}: not an EC private key; re-enroll")
    return key


def _common_name(cert: x509.Certificate) -> str:
    from cryptography.x509.oid import NameOID

    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = names[0].value if names else ""
    return value if isinstance(value, str) else value.decode()


def _check_certificate(
    cert_pem: bytes, ca_pem: bytes, key: ec.EllipticCurvePrivateKey, *, source: str
) -> x509.Certificate:
    """The leaf in `cert_pem`, checked to hold `key`'s public key and be signed by the CA."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        cas = x509.load_pem_x509_certificates(ca_pem)
    except ValueError as exc:
        raise IdentityError(f"{source}: unreadable certificate or CA: {exc}") from None
    cert_key = cert.public_key()
    if not isinstance(cert_key, ec.EllipticCurvePublicKey) or (
        cert_key.public_numbers() != key.public_key().public_numbers()
    ):
        raise IdentityError(f"{source}: the certificate is not for this device's key")
    for ca in cas:
        with contextlib.suppress(ValueError, TypeError, InvalidSignature):
            cert.verify_directly_issued_by(ca)
            return cert
    raise IdentityError(f"{source}: the certificate is not signed by the CA it came with")


def _write_generation(
    generation: Path,
    key: ec.EllipticCurvePrivateKey,
    cert_pem: bytes,
    ca_pem: bytes,
    *,
    expected_gateway_id: str | None,
) -> None:
    cert = _check_certificate(cert_pem, ca_pem, key, source="the headend's answer")
    if expected_gateway_id is not None and _common_name(cert) != expected_gateway_id:
        raise IdentityError(
            f"the headend issued a certificate for {_common_name(cert)!r}, "
            f"this gateway is {expected_gateway_id!r}; check the token and the config"
        )
    write_private_file(generation / CERT_FILE, cert_pem, mode=0o644)
    write_private_file(generation / CA_FILE, ca_pem, mode=0o644)
    # Last: a generation is published (pointer) only after this, so cert.json always exists
    # for a generation this version installed.
    _CertificateFacts.of(cert, cert_pem, ca_pem).write(generation / CERT_FACTS_FILE)


def _set_pointer(directory: Path, name: str, generation: Path) -> None:
    write_private_file(directory / name, generation.name.encode() + b"\n", mode=0o644)


def _remove_generation(directory: Path, name: str | None) -> None:
    if name is not None:
        shutil.rmtree(directory / name, ignore_errors=True)


# -- HTTPS ---------------------------------------------------------------------------------------


def enroll_api_url(headend_url: str) -> str:
    """The enrollment API under the headend's base URL: "https://h:p" -> "https://h:p/api/v1"
    (a URL that already ends in /api/v1 is kept)."""
    base = headend_url.rstrip("/")
    return base if base.endswith(ENROLL_API_PATH) else base + ENROLL_API_PATH


def _server_context(ca_bundle: Path | bytes | None) -> ssl.SSLContext:
    if ca_bundle is None:
        return ssl.create_default_context()
    if isinstance(ca_bundle, bytes):
        return ssl.create_default_context(cadata=ca_bundle.decode())
    return ssl.create_default_context(cafile=str(ca_bundle))


def _post_json(
    url: str,
    body: bytes,
    context: ssl.SSLContext,
    timeout_s: float,
    *,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    import urllib.request

    if not url.startswith("https://"):
        raise IdentityError(f"{url}: enrollment needs an https:// URL (the token is a secret)")
    request = urllib.request.Request(
        url,
        data=body,
        headers={"Content-Type": "application/json", "Accept": "application/json"}
        | (headers or {}),
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, context=context, timeout=timeout_s) as response:
            raw = response.read(MAX_RESPONSE_BYTES + 1)
    except urllib.error.HTTPError as exc:
        detail = _error_detail(exc.read(MAX_RESPONSE_BYTES))
        raise EnrollmentRefusedError(exc.code, detail) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        failure = classify_tls_failure(reason) if isinstance(reason, ssl.SSLError) else None
        raise HeadendUnreachableError(f"{url}: {reason}", failure) from None
    if len(raw) > MAX_RESPONSE_BYTES:
        raise IdentityError(f"{url}: answer larger than {MAX_RESPONSE_BYTES} bytes")
    try:
        answer = json.loads(raw)
    except ValueError as exc:
        raise IdentityError(f"{url}: answer is not JSON: {exc}") from None
    if not isinstance(answer, dict):
        raise IdentityError(f"{url}: answer is not a JSON object")
    return answer


def _error_detail(raw: bytes) -> str:
    try:
        detail = json.loads(raw).get("detail")
    except (ValueError, AttributeError):
        detail = None
    return str(detail) if detail else raw.decode(errors="replace")[:500] or "no detail"


def _pem_field(answer: dict[str, Any], name: str) -> bytes:
    value = answer.get(name)
    if not isinstance(value, str) or "-----BEGIN CERTIFICATE-----" not in value:
        raise IdentityError(f"the headend's answer has no {name}")
    return value.encode()


@dataclass(frozen=True)
class Enrolled:
    """What `enroll` got: the new identity, and the intent trust file text if the headend sent
    one (dergw.v1.trust format)."""

    identity: Identity
    intent_keys: str | None


def enroll(
    state_dir: Path,
    *,
    headend_url: str,
    token: str,
    gateway_id: str,
    site_id: str,
    ca_bundle: Path | bytes | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> Enrolled:
    """Enroll: new key, CSR + token over server-authenticated HTTPS, store the certificate.

    `headend_url` is the headend's base URL (`https://host:port`; the request goes to
    `enroll_api_url(headend_url) + "/enroll"`); `ca_bundle` the CA to trust
    for it (default: the system store). A previous identity is replaced only on success.
    """
    directory = _identity_dir(state_dir)
    key = generate_key()
    generation = _new_generation(directory)
    try:
        write_private_file(generation / KEY_FILE, _key_pem(key))
        body = {
            "token": token,
            "csr_pem": build_csr(key, gateway_id).decode(),
            "gateway_id": gateway_id,
            "site_id": site_id,
        }
        answer = _post_json(
            enroll_api_url(headend_url) + "/enroll",
            json.dumps(body).encode(),
            _server_context(ca_bundle),
            timeout_s,
        )
        _write_generation(
            generation,
            key,
            _pem_field(answer, "certificate_pem"),
            _pem_field(answer, "ca_pem"),
            expected_gateway_id=gateway_id,
        )
    except BaseException:
        shutil.rmtree(generation, ignore_errors=True)
        raise
    previous = _read_pointer(directory, CURRENT)
    _set_pointer(directory, CURRENT, generation)
    if previous != generation.name:
        _remove_generation(directory, previous)
    rollback_renewal(state_dir)  # a renewal of the replaced identity is moot
    keys = answer.get("intent_keys")
    return Enrolled(
        identity=Identity.load(state_dir), intent_keys=keys if isinstance(keys, str) else None
    )


# -- renewal -------------------------------------------------------------------------------------


def begin_renewal(state_dir: Path) -> bytes:
    """Start a renewal: a new key in a new staged generation; returns its CSR (PEM).

    Replaces an earlier unfinished staged renewal. The current identity is untouched.
    """
    current = Identity.load(state_dir)
    directory = _identity_dir(state_dir)
    rollback_renewal(state_dir)
    key = generate_key()
    generation = _new_generation(directory)
    write_private_file(generation / KEY_FILE, _key_pem(key))
    _set_pointer(directory, PENDING, generation)
    return build_csr(key, current.gateway_id)


def stage_certificate(state_dir: Path, certificate_pem: bytes, ca_pem: bytes) -> Identity:
    """Store the renewed certificate next to the staged key; returns the staged identity."""
    current = Identity.load(state_dir)
    directory = _identity_dir(state_dir)
    name = _read_pointer(directory, PENDING)
    if name is None:
        raise NotEnrolledError("no renewal in progress; call begin_renewal first")
    generation = directory / name
    key = _load_key((generation / KEY_FILE).read_bytes(), generation / KEY_FILE)
    _write_generation(
        generation, key, certificate_pem, ca_pem, expected_gateway_id=current.gateway_id
    )
    _set_pointer(directory, STAGED, generation)
    (directory / PENDING).unlink()
    return Identity.load(state_dir, staged=True)


def renewal_headers(current: Identity, body: bytes) -> dict[str, str]:
    """Authenticate a renewal request by the current identity (headend_min.enroll_api):
    the current certificate (base64 DER) and an ECDSA-SHA256 signature of `body` by its key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = _load_key(current.private_key_pem, current.key_path)
    cert = x509.load_pem_x509_certificate(current.certificate_pem)
    return {
        CERTIFICATE_HEADER: base64.b64encode(
            cert.public_bytes(serialization.Encoding.DER)
        ).decode(),
        SIGNATURE_HEADER: base64.b64encode(key.sign(body, ec.ECDSA(hashes.SHA256()))).decode(),
    }


def stage_renewal(
    state_dir: Path, *, headend_url: str, timeout_s: float = DEFAULT_TIMEOUT_S
) -> Identity:
    """Renew over mTLS (the current certificate authenticates); returns the staged identity.

    The uplink then connects with it and calls `commit_renewal` or `rollback_renewal`.
    """
    current = Identity.load(state_dir)
    csr_pem = begin_renewal(state_dir)
    try:
        body = json.dumps({"csr_pem": csr_pem.decode()}).encode()
        answer = _post_json(
            enroll_api_url(headend_url) + "/renew",
            body,
            current.ssl_context(),
            timeout_s,
            headers=renewal_headers(current, body),
        )
        return stage_certificate(
            state_dir, _pem_field(answer, "certificate_pem"), _pem_field(answer, "ca_pem")
        )
    except BaseException:
        rollback_renewal(state_dir)
        raise


def commit_renewal(state_dir: Path) -> Identity:
    """The staged identity has connected: make it current and delete the old one."""
    staged = Identity.load(state_dir, staged=True)  # complete and consistent, or raise
    directory = state_dir / IDENTITY_DIRNAME
    previous = _read_pointer(directory, CURRENT)
    _set_pointer(directory, CURRENT, staged.key_path.parent)
    (directory / STAGED).unlink()
    if previous != staged.key_path.parent.name:
        _remove_generation(directory, previous)
    return Identity.load(state_dir)


def rollback_renewal(state_dir: Path) -> None:
    """Drop a renewal in progress or staged (if any); the current identity stays in use."""
    directory = state_dir / IDENTITY_DIRNAME
    if not directory.is_dir():
        return
    current = _read_pointer(directory, CURRENT)
    for pointer in (PENDING, STAGED):
        name = _read_pointer(directory, pointer)
        with contextlib.suppress(FileNotFoundError):
            (directory / pointer).unlink()
        if name is not None and name != current:
            _remove_generation(directory, name)


# -- TLS failure classification ------------------------------------------------------------------


class TlsFailure(enum.Enum):
    """Why a TLS connection (or the call right after it) was refused."""

    EXPIRED = "expired"  # our certificate (or the server's) is past not_after
    UNKNOWN_CA = "unknown_ca"  # one side does not trust the other's issuer
    REVOKED = "revoked"  # the headend's deny-list refused our (gateway id, serial)
    NO_CERTIFICATE = "no_certificate"  # we presented no client certificate
    OTHER = "other"  # anything else, including failures that are not about TLS at all

    @property
    def is_rejection(self) -> bool:
        """True when retrying soon cannot help: back off long and show it in health."""
        return self is not TlsFailure.OTHER


# Lower-case markers, checked in order; from OpenSSL/BoringSSL alert and verify texts (what
# Python's ssl errors and grpcio's status details carry) and from the headend's own refusals.
_MARKERS: tuple[tuple[TlsFailure, tuple[str, ...]], ...] = (
    (TlsFailure.REVOKED, ("revoked",)),
    (TlsFailure.EXPIRED, ("expired", "certificate_expired", "not yet valid")),
    (
        TlsFailure.NO_CERTIFICATE,
        ("certificate_required", "peer_did_not_return_a_certificate", "did not return a cert"),
    ),
    (
        TlsFailure.UNKNOWN_CA,
        (
            "unknown_ca",
            "unknown ca",
            "unable to get local issuer",
            "self-signed certificate",
            "self signed certificate",
            "certificate_verify_failed",
            "certificate verify failed",
            "bad_certificate",
            "unable to get issuer",
        ),
    ),
)


def classify_tls_failure(
    failure: BaseException | str | None,
    *,
    identity: Identity | None = None,
    now: datetime | None = None,
) -> TlsFailure:
    """Name a TLS failure from an exception (ssl, a gRPC error of grpclib or grpcio, urllib)
    or a details text.

    The gateway's gRPC client (grpclib) raises Python's ssl errors for handshake refusals it
    sees, grpcio reports them as UNAVAILABLE with the reason in the details; the headend's
    interceptor puts "revoked" in its status message. Under TLS 1.3 a server that refuses
    the *client's* certificate (none, unknown CA, expired) only closes the connection: the
    client sees "Socket closed", indistinguishable from a network drop. So with `identity` and
    `now`, what the gateway knows locally is used too: no identity -> NO_CERTIFICATE, our
    certificate past not_after -> EXPIRED. A repeated unexplained close right after connecting
    is the uplink's to judge (likely UNKNOWN_CA: the headend's CA changed).
    """
    if isinstance(failure, ssl.SSLCertVerificationError) and failure.verify_code == 10:
        return TlsFailure.EXPIRED  # X509_V_ERR_CERT_HAS_EXPIRED
    text = "" if failure is None else _failure_text(failure).lower()
    for kind, markers in _MARKERS:
        if any(marker in text for marker in markers):
            return kind
    if now is not None:
        if identity is None:
            return TlsFailure.NO_CERTIFICATE
        if identity.seconds_left(now) <= 0:
            return TlsFailure.EXPIRED
    return TlsFailure.OTHER


def _failure_text(failure: BaseException | str) -> str:
    if isinstance(failure, str):
        return failure
    parts = [str(failure)]
    details = getattr(failure, "details", None)
    if callable(details):  # grpcio's RpcError
        with contextlib.suppress(Exception):
            parts.append(str(details()))
    message = getattr(failure, "message", None)
    if isinstance(message, str):  # grpclib's GRPCError
        parts.append(message)
    if isinstance(failure, urllib.error.URLError):
        parts.append(str(failure.reason))
    if isinstance(failure, HeadendUnreachableError | EnrollmentRefusedError):
        parts.append(str(getattr(failure, "detail", "")))
    return " ".join(parts)

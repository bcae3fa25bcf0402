"""Gateway enrollment: one-time tokens, certificate issuance, renewal and revocation.

The state machine of reference/appliance.md §4.2, pure over an `EnrollmentStore` (in memory
here, SQLite in `enrollment_sqlite`, PostgreSQL in `enrollment_pg`) and a
`pki.CertificateAuthority`, with an injected clock:

- `create_token(site_id, gateway_id, ttl_s)` makes a one-time token bound to one gateway at one
  site, expiring (default 24 h); only its SHA-256 is stored, the secret is returned once.
- `enroll(token, csr_pem)`: the token must be known, unused and unexpired; the CSR must carry a
  proof of possession. The certificate's subject comes from the token (never from the CSR). A
  gateway that holds an unrevoked certificate for another site is refused: revoke it first.
  The token is burnt atomically (`mark_token_used`), so two racing requests cannot both win.
- `renew(peer_gateway_id, peer_serial, csr_pem)`: authenticated by the current certificate (the
  caller proves that: mTLS or `enroll_api`'s signed request); refused when that certificate is
  unknown, revoked or expired, or when the CSR reuses its key (renewal means a new key).
- `revoke(gateway_id, serial=None)`: one certificate, or every certificate issued to the gateway
  so far. A revoked gateway can neither connect (`grpc_tls.RevocationInterceptor`) nor renew; it
  comes back only through a new token from an admin (a new enrollment, a new serial).

Serials are lowercase hex text (`pki.serial_text`). Times inside are UTC ns since the epoch.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from dergw.v1.enrollment import renew_at
from headend_min.clock import Clock, datetime_from_ns, ns_from_datetime
from headend_min.pki import (
    DEFAULT_CLIENT_LIFETIME_S,
    HEADEND_IDENTITY,
    CertificateAuthority,
    CsrError,
    cert_pem,
    load_csr,
    public_key_sha256,
    serial_text,
)

__all__ = [
    "DEFAULT_TOKEN_TTL_S",
    "TOKEN_PREFIX",
    "CertificateExpiredError",
    "CertificateRevokedError",
    "Enrollment",
    "EnrollmentError",
    "EnrollmentResult",
    "EnrollmentStore",
    "EnrollmentToken",
    "InvalidCsrError",
    "InvalidRequestError",
    "IssuedCertificate",
    "KeyReuseError",
    "MemoryEnrollmentStore",
    "SiteMismatchError",
    "TokenRejectedError",
    "UnknownCertificateError",
    "hash_token",
    "renew_at",
]

DEFAULT_TOKEN_TTL_S = 24 * 3600
MAX_TOKEN_TTL_S = 30 * 86_400
TOKEN_PREFIX = "dgwe_"  # recognisable in logs and secret scanners ("dergw enrollment")
_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")  # gateway.config Slug
_MAX_TOKEN_CHARS = 200


class EnrollmentError(Exception):
    """Base: a refused enrollment, renewal or admin request. Messages say what to do."""


class InvalidRequestError(EnrollmentError):
    """Malformed arguments (ids, lifetimes) -> HTTP 400."""


class InvalidCsrError(EnrollmentError):
    """The CSR is unusable (unparseable, not P-256, no proof of possession) -> HTTP 400."""


class KeyReuseError(EnrollmentError):
    """A renewal CSR with the current certificate's key -> HTTP 400."""


class TokenRejectedError(EnrollmentError):
    """Unknown, used or expired enrollment token -> HTTP 401."""


class SiteMismatchError(EnrollmentError):
    """The token (or the gateway's records) name another gateway or site -> HTTP 403."""


class UnknownCertificateError(EnrollmentError):
    """Renewal with a certificate this headend has no record of -> HTTP 403."""


class CertificateRevokedError(EnrollmentError):
    """Renewal with a revoked certificate -> HTTP 403."""


class CertificateExpiredError(EnrollmentError):
    """Renewal with an expired certificate (enroll again with a new token) -> HTTP 403."""


@dataclass(frozen=True)
class EnrollmentToken:
    token_hash: str  # SHA-256 hex of the secret
    site_id: str
    gateway_id: str
    created_at_ns: int
    expires_at_ns: int
    used_at_ns: int | None = None


@dataclass(frozen=True)
class IssuedCertificate:
    gateway_id: str
    site_id: str
    serial: str  # lowercase hex
    public_key_sha256: str
    not_before_ns: int
    not_after_ns: int
    issued_at_ns: int
    revoked_at_ns: int | None = None


@dataclass(frozen=True)
class EnrollmentResult:
    certificate_pem: str  # the leaf; its chain is ca_pem
    ca_pem: str
    gateway_id: str
    site_id: str
    serial: str
    not_after: datetime


class EnrollmentStore(Protocol):
    """What enrollment keeps: tokens (by hash), issued certificates, revocations."""

    async def put_token(self, token: EnrollmentToken) -> None: ...

    async def get_token(self, token_hash: str) -> EnrollmentToken | None: ...

    async def mark_token_used(self, token_hash: str, used_at_ns: int) -> bool:
        """Atomically burn an unused token; False if it was already used (or is unknown)."""
        ...

    async def record_certificate(self, certificate: IssuedCertificate) -> None: ...

    async def get_certificate(self, gateway_id: str, serial: str) -> IssuedCertificate | None: ...

    async def list_certificates(self, gateway_id: str) -> list[IssuedCertificate]:
        """Every certificate issued to `gateway_id`, oldest first."""
        ...

    async def is_revoked(self, gateway_id: str, serial: str) -> bool: ...

    async def revoke(self, gateway_id: str, serial: str | None, at_ns: int) -> list[str]:
        """Revoke one serial (recorded or not) or, with None, every recorded one; returns the
        serials newly revoked."""
        ...


def hash_token(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _check_id(kind: str, value: str) -> None:
    if not _ID.fullmatch(value):
        raise InvalidRequestError(
            f"{kind} {value!r} is not valid: lower-case letters, digits, '.', '_', '-', "
            "starting with a letter or digit, at most 63 characters"
        )


class Enrollment:
    """Enrollment, renewal and revocation over a store, a CA and a clock."""

    def __init__(
        self,
        store: EnrollmentStore,
        ca: CertificateAuthority,
        clock: Clock,
        *,
        certificate_lifetime_s: int = DEFAULT_CLIENT_LIFETIME_S,
    ) -> None:
        if certificate_lifetime_s <= 0:
            raise InvalidRequestError("certificate_lifetime_s must be positive")
        self._store = store
        self._ca = ca
        self._clock = clock
        self._lifetime_s = certificate_lifetime_s

    @property
    def ca_pem(self) -> str:
        return self._ca.certificate_pem.decode()

    async def create_token(
        self, site_id: str, gateway_id: str, ttl_s: int = DEFAULT_TOKEN_TTL_S
    ) -> str:
        """A new one-time token for `gateway_id` at `site_id`; the secret is returned only here."""
        _check_id("site id", site_id)
        _check_id("gateway id", gateway_id)
        if gateway_id == HEADEND_IDENTITY:
            # CN=headend is the headend's own MQTT identity: a gateway must never hold it.
            raise InvalidRequestError(
                f"gateway id {HEADEND_IDENTITY!r} is reserved for the headend; choose another"
            )
        if not 0 < ttl_s <= MAX_TOKEN_TTL_S:
            raise InvalidRequestError(f"token lifetime must be 1..{MAX_TOKEN_TTL_S} s, not {ttl_s}")
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        now_ns = self._clock.wall_ns()
        await self._store.put_token(
            EnrollmentToken(
                token_hash=hash_token(secret),
                site_id=site_id,
                gateway_id=gateway_id,
                created_at_ns=now_ns,
                expires_at_ns=now_ns + ttl_s * 10**9,
            )
        )
        return secret

    async def enroll(
        self,
        token: str,
        csr_pem: str | bytes,
        *,
        gateway_id: str | None = None,
        site_id: str | None = None,
    ) -> EnrollmentResult:
        """Check `token` and the CSR, issue a certificate, burn the token.

        `gateway_id`/`site_id`, when given, are what the gateway's config says; they must match
        the token (so a token dropped on the wrong gateway fails clearly instead of issuing a
        certificate the gateway cannot use). The certificate names the token's gateway and site.
        """
        csr = _parse_csr(csr_pem)
        now_ns = self._clock.wall_ns()
        record = await self._valid_token(token, now_ns)
        if gateway_id is not None and gateway_id != record.gateway_id:
            raise SiteMismatchError(
                f"this token is for gateway {record.gateway_id!r}, not {gateway_id!r}; "
                "use the token made for this gateway, or fix [gateway] id in its config"
            )
        if site_id is not None and site_id != record.site_id:
            raise SiteMismatchError(
                f"this token is for site {record.site_id!r}, this gateway is configured for "
                f"site {site_id!r}; use the token made for this site"
            )
        for issued in await self._store.list_certificates(record.gateway_id):
            if issued.site_id != record.site_id and issued.revoked_at_ns is None:
                raise SiteMismatchError(
                    f"gateway {record.gateway_id!r} is enrolled at site {issued.site_id!r}; "
                    f"revoke it before enrolling it at site {record.site_id!r}"
                )
        if not await self._store.mark_token_used(record.token_hash, now_ns):
            raise TokenRejectedError("this enrollment token was already used; ask for a new one")
        return await self._issue(csr, gateway_id=record.gateway_id, site_id=record.site_id)

    async def _valid_token(self, token: str, now_ns: int) -> EnrollmentToken:
        if not token or len(token) > _MAX_TOKEN_CHARS:
            raise TokenRejectedError("unknown enrollment token; ask for a new one")
        token_hash = hash_token(token)
        record = await self._store.get_token(token_hash)
        # compare_digest: the lookup is by hash already; this keeps the check constant-time.
        if record is None or not hmac.compare_digest(record.token_hash, token_hash):
            raise TokenRejectedError("unknown enrollment token; check it or ask for a new one")
        if record.used_at_ns is not None:
            raise TokenRejectedError("this enrollment token was already used; ask for a new one")
        if now_ns >= record.expires_at_ns:
            raise TokenRejectedError(
                f"this enrollment token expired at {datetime_from_ns(record.expires_at_ns)}; "
                "ask for a new one"
            )
        return record

    async def renew(
        self, peer_gateway_id: str, peer_serial: str, csr_pem: str | bytes
    ) -> EnrollmentResult:
        """A new certificate for a new key, for the holder of certificate (gateway, serial)."""
        csr = _parse_csr(csr_pem)
        current = await self._store.get_certificate(peer_gateway_id, peer_serial)
        if current is None:
            raise UnknownCertificateError(
                f"no certificate {peer_serial} was issued to {peer_gateway_id!r} here; "
                "enroll again with a new token"
            )
        if current.revoked_at_ns is not None or await self._store.is_revoked(
            peer_gateway_id, peer_serial
        ):
            raise CertificateRevokedError(
                f"certificate {peer_serial} of {peer_gateway_id!r} is revoked; "
                "an admin must issue a new enrollment token"
            )
        if self._clock.wall_ns() >= current.not_after_ns:
            raise CertificateExpiredError(
                f"certificate {peer_serial} of {peer_gateway_id!r} expired at "
                f"{datetime_from_ns(current.not_after_ns)}; enroll again with a new token"
            )
        if public_key_sha256(_ec_key(csr)) == current.public_key_sha256:
            raise KeyReuseError("renewal needs a new key: the CSR reuses the current one")
        return await self._issue(csr, gateway_id=current.gateway_id, site_id=current.site_id)

    async def revoke(self, gateway_id: str, serial: str | None = None) -> list[str]:
        """Revoke one certificate, or (serial None) all of the gateway's; returns the serials."""
        _check_id("gateway id", gateway_id)
        if serial is not None:
            serial = _normalise_serial(serial)
        return await self._store.revoke(gateway_id, serial, self._clock.wall_ns())

    async def is_revoked(self, gateway_id: str, serial: str) -> bool:
        return await self._store.is_revoked(gateway_id, _normalise_serial(serial))

    async def certificates(self, gateway_id: str) -> list[IssuedCertificate]:
        return await self._store.list_certificates(gateway_id)

    async def holds_valid_certificate(self, gateway_id: str) -> bool:
        """Does `gateway_id` hold a certificate that is neither revoked nor expired? Where the
        transport does not show the peer's serial (MQTT through a broker), this is the check."""
        now_ns = self._clock.wall_ns()
        for issued in await self._store.list_certificates(gateway_id):
            live = issued.revoked_at_ns is None and issued.not_after_ns > now_ns
            if live and not await self._store.is_revoked(gateway_id, issued.serial):
                return True
        return False

    async def _issue(
        self, csr: x509.CertificateSigningRequest, *, gateway_id: str, site_id: str
    ) -> EnrollmentResult:
        now_ns = self._clock.wall_ns()
        cert = self._ca.issue_client_certificate(
            csr,
            gateway_id=gateway_id,
            site_id=site_id,
            lifetime_s=self._lifetime_s,
            now=datetime_from_ns(now_ns),
        )
        serial = serial_text(cert)
        await self._store.record_certificate(
            IssuedCertificate(
                gateway_id=gateway_id,
                site_id=site_id,
                serial=serial,
                public_key_sha256=public_key_sha256(_ec_key(csr)),
                not_before_ns=ns_from_datetime(cert.not_valid_before_utc),
                not_after_ns=ns_from_datetime(cert.not_valid_after_utc),
                issued_at_ns=now_ns,
            )
        )
        return EnrollmentResult(
            certificate_pem=cert_pem(cert).decode(),
            ca_pem=self.ca_pem,
            gateway_id=gateway_id,
            site_id=site_id,
            serial=serial,
            not_after=cert.not_valid_after_utc,
        )


def _normalise_serial(serial: str) -> str:
    text = serial.strip().lower().removeprefix("0x").replace(":", "")
    try:
        return format(int(text, 16), "x")
    except ValueError:
        raise InvalidRequestError(f"serial {serial!r} is not hexadecimal") from None


def _parse_csr(csr_pem: str | bytes) -> x509.CertificateSigningRequest:
    try:
        return load_csr(csr_pem)
    except CsrError as exc:
        raise InvalidCsrError(str(exc)) from None


def _ec_key(csr: x509.CertificateSigningRequest) -> ec.EllipticCurvePublicKey:
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):  # load_csr checked it already
        raise InvalidCsrError("CSR key must be EC P-256")
    return key


class MemoryEnrollmentStore:
    """`EnrollmentStore` in memory (tests, the demo without a database)."""

    def __init__(self) -> None:
        self._tokens: dict[str, EnrollmentToken] = {}
        self._certificates: dict[tuple[str, str], IssuedCertificate] = {}
        self._revoked: set[tuple[str, str]] = set()

    async def put_token(self, token: EnrollmentToken) -> None:
        self._tokens[token.token_hash] = token

    async def get_token(self, token_hash: str) -> EnrollmentToken | None:
        return self._tokens.get(token_hash)

    async def mark_token_used(self, token_hash: str, used_at_ns: int) -> bool:
        token = self._tokens.get(token_hash)
        if token is None or token.used_at_ns is not None:
            return False
        self._tokens[token_hash] = replace(token, used_at_ns=used_at_ns)
        return True

    async def record_certificate(self, certificate: IssuedCertificate) -> None:
        self._certificates[(certificate.gateway_id, certificate.serial)] = certificate

    async def get_certificate(self, gateway_id: str, serial: str) -> IssuedCertificate | None:
        return self._certificates.get((gateway_id, serial))

    async def list_certificates(self, gateway_id: str) -> list[IssuedCertificate]:
        found = [c for (g, _), c in self._certificates.items() if g == gateway_id]
        return sorted(found, key=lambda c: c.issued_at_ns)

    async def is_revoked(self, gateway_id: str, serial: str) -> bool:
        return (gateway_id, serial) in self._revoked

    async def revoke(self, gateway_id: str, serial: str | None, at_ns: int) -> list[str]:
        if serial is None:
            serials = [s for (g, s) in self._certificates if g == gateway_id]
        else:
            serials = [serial]
        newly = []
        for s in serials:
            if (gateway_id, s) in self._revoked:
                continue
            self._revoked.add((gateway_id, s))
            issued = self._certificates.get((gateway_id, s))
            if issued is not None:
                self._certificates[(gateway_id, s)] = replace(issued, revoked_at_ns=at_ns)
            newly.append(s)
        return newly

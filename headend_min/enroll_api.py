"""HTTP endpoints of enrollment: `POST /enroll` and `POST /renew` (a FastAPI router).

    app.include_router(
        enrollment_router(
            enrollment, clock=clock, ca_certificate=ca.certificate, intent_keys=read_trust_file
        )
    )

`POST /enroll` {token, csr_pem[, gateway_id, site_id]} -> {certificate_pem, ca_pem, gateway_id,
site_id, serial, not_after, intent_keys}. No operator auth: the one-time token is the credential.
Serve it over HTTPS only (the token is a secret); the gateway refuses http:// URLs.

`POST /renew` {csr_pem} -> the same answer, for the holder of a current certificate. Who that is
comes from the `renew_peer` callable. The default, `signed_request_peer`, works behind any
TLS terminator including uvicorn (which does not hand the client certificate to the app): the
gateway sends its current certificate (`X-Dergw-Certificate`, base64 DER) and an ECDSA-SHA256
signature by the current key over the exact request body (`X-Dergw-Signature`, base64 DER).
The headend checks the certificate against its CA and the clock, then the signature. A replayed
request is harmless: the CSR inside binds the new certificate to the gateway's new key, which the
replayer does not hold. A deployment that terminates mTLS itself can pass its own callable
returning the peer's `PeerCertificate`.

`enrollment_unavailable_router` serves the same paths answering 503 with a reason: the headend
mounts it when TLS is off, so the API's set of routes (and of public routes) does not depend on
the mode and a gateway pointed at a plaintext headend learns why it cannot enroll.

Bodies are bounded (`max_body_bytes`, 413) before any JSON decoding. Errors: 400 malformed
request, CSR or key reuse; 401 bad token or unauthenticated renewal; 403 site mismatch, unknown,
revoked or expired certificate.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Annotated, Any, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from fastapi import APIRouter, HTTPException, Request, status
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dergw.v1.enrollment import CERTIFICATE_HEADER, SIGNATURE_HEADER
from headend_min.clock import Clock, datetime_from_ns
from headend_min.enrollment import (
    CertificateExpiredError,
    CertificateRevokedError,
    Enrollment,
    EnrollmentError,
    EnrollmentResult,
    InvalidCsrError,
    InvalidRequestError,
    KeyReuseError,
    SiteMismatchError,
    TokenRejectedError,
    UnknownCertificateError,
)
from headend_min.pki import PeerCertificate

__all__ = [
    "CERTIFICATE_HEADER",
    "MAX_ENROLL_BODY_BYTES",
    "SIGNATURE_HEADER",
    "EnrollRequest",
    "EnrollResponse",
    "RenewRequest",
    "enrollment_router",
    "enrollment_unavailable_router",
    "signed_request_peer",
]

_M = TypeVar("_M", bound=BaseModel)

MAX_ENROLL_BODY_BYTES = 16 * 1024
_MAX_HEADER_CHARS = 8 * 1024

_Id = Annotated[str, Field(min_length=1, max_length=63, pattern=r"^[a-z0-9][a-z0-9._-]*$")]
_Pem = Annotated[str, Field(min_length=1, max_length=8 * 1024)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EnrollRequest(_Model):
    token: Annotated[str, Field(min_length=1, max_length=200)]
    csr_pem: _Pem
    gateway_id: _Id | None = None  # what the gateway's config says; must match the token
    site_id: _Id | None = None


class RenewRequest(_Model):
    csr_pem: _Pem


class EnrollResponse(_Model):
    certificate_pem: str
    ca_pem: str
    gateway_id: str
    site_id: str
    serial: str
    not_after: datetime
    intent_keys: str | None = None  # gateway.intent_verify trust file (JSON text)


_STATUS: tuple[tuple[type[EnrollmentError], int], ...] = (
    (InvalidRequestError, status.HTTP_400_BAD_REQUEST),
    (InvalidCsrError, status.HTTP_400_BAD_REQUEST),
    (KeyReuseError, status.HTTP_400_BAD_REQUEST),
    (TokenRejectedError, status.HTTP_401_UNAUTHORIZED),
    (SiteMismatchError, status.HTTP_403_FORBIDDEN),
    (UnknownCertificateError, status.HTTP_403_FORBIDDEN),
    (CertificateRevokedError, status.HTTP_403_FORBIDDEN),
    (CertificateExpiredError, status.HTTP_403_FORBIDDEN),
)


def _http_error(exc: EnrollmentError) -> HTTPException:
    for kind, code in _STATUS:
        if isinstance(exc, kind):
            return HTTPException(code, detail=str(exc))
    return HTTPException(status.HTTP_400_BAD_REQUEST, detail=str(exc))


async def _bounded_body(request: Request, limit: int) -> bytes:
    """The body, read at most once per request (renew_peer and the handler share it)."""
    cached = getattr(request.state, "dergw_body", None)
    if isinstance(cached, bytes):
        return cached
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise HTTPException(
            status.HTTP_413_CONTENT_TOO_LARGE, detail=f"request body over {limit} bytes"
        )
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPException(
                status.HTTP_413_CONTENT_TOO_LARGE, detail=f"request body over {limit} bytes"
            )
    request.state.dergw_body = bytes(body)
    return request.state.dergw_body  # type: ignore[no-any-return]


def _parse(model: type[_M], body: bytes) -> _M:
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}"
            for e in exc.errors(include_url=False)
        )
        raise HTTPException(status.HTTP_400_BAD_REQUEST, detail=problems) from None


def _request_body_doc(model: type[BaseModel]) -> dict[str, Any]:
    # The body is read by hand (bounded before decoding); declare it for the OpenAPI document.
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": model.model_json_schema()}},
        }
    }


def _b64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise _unauthenticated(f"{what} header is not base64") from None


def _unauthenticated(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail=detail)


def signed_request_peer(
    ca_certificate: x509.Certificate, clock: Clock, *, max_body_bytes: int = MAX_ENROLL_BODY_BYTES
) -> Callable[[Request], Awaitable[PeerCertificate]]:
    """The `renew_peer` callable for signed requests (see the module docstring)."""

    async def peer(request: Request) -> PeerCertificate:
        cert_text = request.headers.get(CERTIFICATE_HEADER)
        sig_text = request.headers.get(SIGNATURE_HEADER)
        if not cert_text or not sig_text:
            raise _unauthenticated(
                f"renewal needs the current certificate ({CERTIFICATE_HEADER}) and a signature "
                f"of the body by its key ({SIGNATURE_HEADER}); enroll first"
            )
        if len(cert_text) > _MAX_HEADER_CHARS or len(sig_text) > _MAX_HEADER_CHARS:
            raise _unauthenticated("authentication headers too long")
        try:
            cert = x509.load_der_x509_certificate(_b64(cert_text, CERTIFICATE_HEADER))
        except ValueError:
            raise _unauthenticated(f"{CERTIFICATE_HEADER} is not a DER certificate") from None
        _check_client_certificate(cert, ca_certificate, clock)
        body = await _bounded_body(request, max_body_bytes)
        public_key = cert.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise _unauthenticated("the certificate does not hold an EC key")
        try:
            public_key.verify(_b64(sig_text, SIGNATURE_HEADER), body, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise _unauthenticated("the signature does not verify with the certificate") from None
        identity = PeerCertificate.of(cert)
        if identity is None:
            raise _unauthenticated("the certificate names no gateway")
        return identity

    return peer


def _check_client_certificate(
    cert: x509.Certificate, ca_certificate: x509.Certificate, clock: Clock
) -> None:
    try:
        cert.verify_directly_issued_by(ca_certificate)
    except (ValueError, TypeError, InvalidSignature):
        raise _unauthenticated("the certificate was not issued by this headend's CA") from None
    now = datetime_from_ns(clock.wall_ns())
    if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
        raise _unauthenticated(
            f"the certificate is not valid now (valid {cert.not_valid_before_utc} to "
            f"{cert.not_valid_after_utc}); enroll again with a new token"
        )
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usages = None
    if usages is None or ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
        raise _unauthenticated("the certificate is not a client certificate")


def _response(result: EnrollmentResult, intent_keys: Callable[[], str | None] | None) -> Any:
    return EnrollResponse(
        certificate_pem=result.certificate_pem,
        ca_pem=result.ca_pem,
        gateway_id=result.gateway_id,
        site_id=result.site_id,
        serial=result.serial,
        not_after=result.not_after,
        intent_keys=intent_keys() if intent_keys is not None else None,
    )


def enrollment_router(
    enrollment: Enrollment,
    *,
    clock: Clock,
    ca_certificate: x509.Certificate,
    renew_peer: Callable[[Request], Awaitable[PeerCertificate]] | None = None,
    intent_keys: Callable[[], str | None] | None = None,
    max_body_bytes: int = MAX_ENROLL_BODY_BYTES,
    prefix: str = "",
) -> APIRouter:
    """The router; `renew_peer` defaults to `signed_request_peer(ca_certificate, clock)`.

    `renew_peer(request)` returns the authenticated caller of /renew or raises HTTPException.

    `intent_keys` returns the intent-signing trust file text handed to the gateway (or None).
    """
    peer_of = renew_peer or signed_request_peer(
        ca_certificate, clock, max_body_bytes=max_body_bytes
    )
    router = APIRouter(prefix=prefix, tags=["enrollment"])
    errors: dict[int | str, dict[str, Any]] = {
        code: {"description": text}
        for code, text in (
            (400, "malformed request or CSR"),
            (401, "bad token or unauthenticated renewal"),
            (403, "refused: site mismatch, unknown, revoked or expired certificate"),
            (413, "request body over the size limit"),
        )
    }

    @router.post(
        "/enroll",
        response_model=EnrollResponse,
        responses=errors,
        openapi_extra=_request_body_doc(EnrollRequest),
        summary="Enroll a gateway: one-time token + CSR -> client certificate",
    )
    async def enroll(request: Request) -> Any:
        body = _parse(EnrollRequest, await _bounded_body(request, max_body_bytes))
        try:
            result = await enrollment.enroll(
                body.token, body.csr_pem, gateway_id=body.gateway_id, site_id=body.site_id
            )
        except EnrollmentError as exc:
            raise _http_error(exc) from None
        return _response(result, intent_keys)

    @router.post(
        "/renew",
        response_model=EnrollResponse,
        responses=errors,
        openapi_extra=_request_body_doc(RenewRequest),
        summary="Renew the caller's certificate with a new key",
    )
    async def renew(request: Request) -> Any:
        peer = await peer_of(request)  # raises HTTPException 401 when unauthenticated
        body = _parse(RenewRequest, await _bounded_body(request, max_body_bytes))
        try:
            result = await enrollment.renew(peer.gateway_id, peer.serial, body.csr_pem)
        except EnrollmentError as exc:
            raise _http_error(exc) from None
        return _response(result, intent_keys)

    return router


def enrollment_unavailable_router(detail: str, *, prefix: str = "") -> APIRouter:
    """`/enroll` and `/renew` answering 503 `detail` (enrollment switched off)."""
    router = APIRouter(prefix=prefix, tags=["enrollment"])
    unavailable: dict[int | str, dict[str, Any]] = {503: {"description": "enrollment is off"}}

    async def refuse() -> None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail=detail)

    for path, summary in (
        ("/enroll", "Enroll a gateway (needs the headend's TLS)"),
        ("/renew", "Renew the caller's certificate (needs the headend's TLS)"),
    ):
        router.add_api_route(path, refuse, methods=["POST"], responses=unavailable, summary=summary)
    return router

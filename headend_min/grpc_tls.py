"""mTLS for the headend's gRPC server: credentials, the peer's identity, the revocation check.

    creds = server_credentials(ca.certificate_pem, server.certificate_pem, server.key_pem)
    server = grpc.aio.server(interceptors=[RevocationInterceptor(enrollment.is_revoked)])
    server.add_secure_port("0.0.0.0:50051", creds)

The server requires a client certificate issued by the headend CA (`require_client_auth=True`):
grpc refuses one without, from another CA, or expired during the handshake. The client sees
those refusals only as UNAVAILABLE ("Socket closed" under TLS 1.3: the server checks the client
certificate after the client considers the handshake done), so the gateway classifies them with
what it knows locally (gateway.identity.classify_tls_failure).

The gateway's identity is the certificate's CN (`peer_gateway_id`), never a field of a message.

Revocation: grpc puts the verified peer certificate in the auth context (`x509_pem_cert`, checked
with grpcio 1.85.1), so `RevocationInterceptor` reads the serial from it and refuses a revoked
(gateway id, serial) with PERMISSION_DENIED, details "revoked: ...". The check runs when each
call starts: a stream opened before the revocation stays up until it ends (the lead drops the
revoked gateway's session, or the certificate's short lifetime ends it).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio
from cryptography import x509

from headend_min.pki import SITE_URI_PREFIX, PeerCertificate

__all__ = [
    "RevocationInterceptor",
    "peer_certificate",
    "peer_gateway_id",
    "peer_site_id",
    "server_credentials",
]

_log = logging.getLogger(__name__)

IsRevoked = Callable[[str, str], Awaitable[bool]]

if TYPE_CHECKING:  # generic in grpc-stubs only; not subscriptable at run time
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _ServerInterceptor = grpc.aio.ServerInterceptor


def server_credentials(
    ca_pem: bytes, certificate_pem: bytes, private_key_pem: bytes
) -> grpc.ServerCredentials:
    """TLS server credentials that require a client certificate issued by `ca_pem`."""
    return grpc.ssl_server_credentials(
        [(private_key_pem, certificate_pem)],
        root_certificates=ca_pem,
        require_client_auth=True,
    )


def _first(context: grpc.aio.ServicerContext[Any, Any], key: str) -> bytes | None:
    for value in context.auth_context().get(key) or ():
        return value
    return None


def peer_gateway_id(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
    """The gateway id (certificate CN) of the verified TLS peer; None without mTLS."""
    value = _first(context, "x509_common_name")
    return value.decode(errors="replace") if value else None


def _peer_x509(context: grpc.aio.ServicerContext[Any, Any]) -> x509.Certificate | None:
    pem = _first(context, "x509_pem_cert")
    if not pem:
        return None
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError:
        return None


def peer_certificate(context: grpc.aio.ServicerContext[Any, Any]) -> PeerCertificate | None:
    """Gateway id and serial of the verified TLS peer certificate; None without mTLS."""
    cert = _peer_x509(context)
    return None if cert is None else PeerCertificate.of(cert)


def peer_site_id(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
    """The site the verified TLS peer was enrolled at (its `urn:dergw:site:` SAN); None without
    mTLS or without such a SAN."""
    cert = _peer_x509(context)
    if cert is None:
        return None
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    for uri in names.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith(SITE_URI_PREFIX):
            return uri.removeprefix(SITE_URI_PREFIX)
    return None


class RevocationInterceptor(_ServerInterceptor):
    """Refuse every call from a client certificate that `is_revoked(gateway_id, serial)`.

    Calls without a client certificate are refused too (UNAUTHENTICATED): behind
    `server_credentials` there are none, and anything else is a misconfigured server.
    """

    def __init__(self, is_revoked: IsRevoked) -> None:
        self._is_revoked = is_revoked
        self.refused = 0  # calls refused (for metrics)

    async def _refusal(
        self, context: grpc.aio.ServicerContext[Any, Any]
    ) -> tuple[grpc.StatusCode, str] | None:
        peer = peer_certificate(context)
        if peer is None:
            return grpc.StatusCode.UNAUTHENTICATED, "no client certificate: enroll the gateway"
        if await self._is_revoked(peer.gateway_id, peer.serial):
            return (
                grpc.StatusCode.PERMISSION_DENIED,
                f"revoked: certificate {peer.serial} of gateway {peer.gateway_id} is revoked; "
                "an admin must issue a new enrollment token",
            )
        return None

    async def _check(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        refusal = await self._refusal(context)
        if refusal is not None:
            self.refused += 1
            _log.warning("refused gRPC call: %s", refusal[1])
            await context.abort(*refusal)

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler: grpc.RpcMethodHandler[Any, Any] | None = await continuation(handler_call_details)
        if handler is None:  # unknown method: grpc answers UNIMPLEMENTED
            return handler  # type: ignore[return-value]
        # The auth context is only on the call's context: wrap the behaviour to check first.
        for attr, factory in (
            ("unary_unary", grpc.unary_unary_rpc_method_handler),
            ("unary_stream", grpc.unary_stream_rpc_method_handler),
            ("stream_unary", grpc.stream_unary_rpc_method_handler),
            ("stream_stream", grpc.stream_stream_rpc_method_handler),
        ):
            behavior = getattr(handler, attr)
            if behavior is not None:
                return factory(
                    self._wrap(behavior, streaming=attr.endswith("_stream")),
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer,
                )
        return handler

    def _wrap(self, behavior: Callable[..., Any], *, streaming: bool) -> Callable[..., Any]:
        check = self._check
        if streaming and inspect.isasyncgenfunction(behavior):

            async def checked_stream(request: Any, context: Any) -> AsyncIterator[Any]:
                await check(context)
                async for response in behavior(request, context):
                    yield response

            return checked_stream

        async def checked(request: Any, context: Any) -> Any:
            await check(context)
            return await behavior(request, context)

        return checked

"""Enrollment end to end on real sockets: `dergw enroll` against the enroll router on uvicorn
(HTTPS), then mTLS gRPC with the issued certificate, renewal with a new key, revocation.

The gRPC side is a tiny servicer behind the real credentials and interceptor
(headend_min.grpc_tls); it answers with the gateway id it sees on the TLS peer.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import httpx
import pytest
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding
from fastapi import FastAPI

from dergw.v1.trust import TrustedKeys
from gateway import enroll_cli
from gateway.identity import (
    CERTIFICATE_HEADER,
    ENROLL_API_PATH,
    SIGNATURE_HEADER,
    EnrollmentRefusedError,
    Identity,
    TlsFailure,
    build_csr,
    classify_tls_failure,
    commit_renewal,
    generate_key,
    rollback_renewal,
    stage_renewal,
)
from headend_min.clock import SystemClock
from headend_min.enroll_api import enrollment_router
from headend_min.enrollment import Enrollment, MemoryEnrollmentStore
from headend_min.grpc_tls import (
    RevocationInterceptor,
    peer_certificate,
    peer_gateway_id,
    server_credentials,
)
from headend_min.pki import CertificateAuthority, cert_pem, key_pem, load_csr
from tests.headend.gateway_credentials import channel_credentials
from tests.support import async_wait_until

pytestmark = pytest.mark.slow

GATEWAY_CONFIG = """
[gateway]
id = "gw-1"
state_dir = "state"

[site]
id = "site-a"
name = "Test site"

[uplink]
transport = "grpc"
target = "127.0.0.1:50051"
"""


@dataclass
class Headend:
    ca: CertificateAuthority
    enrollment: Enrollment
    url: str
    grpc_target: str
    interceptor: RevocationInterceptor
    intent_keys: TrustedKeys
    ca_file: Path


async def _whoami(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    return (peer_gateway_id(context) or "?").encode()


async def _whoami_stream(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
) -> AsyncIterator[bytes]:
    peer = peer_certificate(context)
    async for _ in requests:
        yield f"{peer.gateway_id if peer else '?'}:{peer.serial if peer else '?'}".encode()


@pytest.fixture
async def headend(tmp_path: Path) -> AsyncIterator[Headend]:
    clock = SystemClock()
    now = datetime.now(UTC)
    ca = CertificateAuthority.create(tmp_path / "ca", now=now)
    enrollment = Enrollment(MemoryEnrollmentStore(), ca, clock)
    signing_key = Ed25519PrivateKey.generate()
    intent_keys = TrustedKeys.of(signing_key.public_key().public_bytes_raw())

    app = FastAPI()
    app.include_router(
        enrollment_router(
            enrollment,
            clock=clock,
            ca_certificate=ca.certificate,
            intent_keys=intent_keys.to_json,
            prefix=ENROLL_API_PATH,  # where `dergw enroll --headend https://host:port` posts
        )
    )
    cert_file, key_file = ca.write_server_certificate(tmp_path / "tls", ["127.0.0.1"], now=now)
    # Bound here and handed over: no window for another process to take the port.
    sock = socket.create_server(("127.0.0.1", 0))
    http_port = sock.getsockname()[1]
    http = uvicorn.Server(
        uvicorn.Config(
            app,
            ssl_certfile=str(cert_file),
            ssl_keyfile=str(key_file),
            log_config=None,
            lifespan="off",
        )
    )
    http_task = asyncio.create_task(http.serve(sockets=[sock]))
    await async_wait_until(lambda: http.started, timeout_s=10, what="uvicorn started")

    interceptor = RevocationInterceptor(enrollment.is_revoked)
    server = grpc.aio.server(interceptors=[interceptor])
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "test.Who",
                {
                    "Ami": grpc.unary_unary_rpc_method_handler(_whoami),
                    "Stream": grpc.stream_stream_rpc_method_handler(_whoami_stream),
                },
            )
        ]
    )
    tls = ca.issue_server_certificate(["127.0.0.1"], now=now)
    grpc_port = server.add_secure_port(
        "127.0.0.1:0", server_credentials(ca.certificate_pem, tls.certificate_pem, tls.key_pem)
    )
    await server.start()
    try:
        yield Headend(
            ca=ca,
            enrollment=enrollment,
            url=f"https://127.0.0.1:{http_port}",
            grpc_target=f"127.0.0.1:{grpc_port}",
            interceptor=interceptor,
            intent_keys=intent_keys,
            ca_file=tmp_path / "ca" / "ca.pem",
        )
    finally:
        await server.stop(None)
        http.should_exit = True
        await http_task
        sock.close()


@pytest.fixture
def gateway_config(tmp_path: Path) -> Path:
    path = tmp_path / "gateway" / "gateway.toml"
    path.parent.mkdir()
    path.write_text(GATEWAY_CONFIG)
    return path


async def _call(target: str, credentials: grpc.ChannelCredentials) -> str:
    async with grpc.aio.secure_channel(target, credentials) as channel:
        answer: bytes = await channel.unary_unary("/test.Who/Ami")(b"", timeout=10)
        return answer.decode()


async def _stream(target: str, credentials: grpc.ChannelCredentials) -> str:
    async with grpc.aio.secure_channel(target, credentials) as channel:
        call = channel.stream_stream("/test.Who/Stream")(iter([b"x"]), timeout=10)
        answers = [answer async for answer in call]
        return b"".join(answers).decode()


async def _refused(target: str, credentials: grpc.ChannelCredentials) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _call(target, credentials)
    return caught.value


async def _enroll_cli(*args: str) -> int:
    return await asyncio.to_thread(enroll_cli.main, list(args))


async def test_enroll_connect_renew_revoke(
    headend: Headend, gateway_config: Path, tmp_path: Path
) -> None:
    state_dir = gateway_config.parent / "state"
    ca_file = tmp_path / "headend-ca.pem"
    ca_file.write_bytes(headend.ca.certificate_pem)
    token_file = tmp_path / "boot" / "dergw-token"
    token_file.parent.mkdir()
    token_file.write_text(await headend.enrollment.create_token("site-a", "gw-1") + "\n")

    # A wrong token is refused clearly and changes nothing.
    assert (
        await _enroll_cli(
            "--headend",
            headend.url,
            "--token",
            "dgwe_wrong",
            "--ca-file",
            str(ca_file),
            "--config",
            str(gateway_config),
        )
        == 1
    )
    assert not (state_dir / "identity" / "current").exists()

    # Unattended first boot: token file in, identity out, token file gone.
    assert (
        await _enroll_cli(
            "--headend",
            headend.url,
            "--token-file",
            str(token_file),
            "--ca-file",
            str(ca_file),
            "--config",
            str(gateway_config),
        )
        == 0
    )
    assert not token_file.exists()
    identity = Identity.load(state_dir)
    assert identity.gateway_id == "gw-1"
    assert (identity.key_path.stat().st_mode & 0o777) == 0o600
    assert TrustedKeys.load(state_dir / "intent-keys.json").keys() == headend.intent_keys.keys()

    # mTLS: the server sees the gateway id of the certificate, on unary and streaming calls.
    assert await _call(headend.grpc_target, channel_credentials(identity)) == "gw-1"
    assert await _stream(headend.grpc_target, channel_credentials(identity)) == (
        f"gw-1:{identity.serial}"
    )

    # Renewal with a new key over HTTPS; the old identity stays until the new one connected.
    staged = await asyncio.to_thread(stage_renewal, state_dir, headend_url=headend.url)
    assert staged.serial != identity.serial
    assert Identity.load(state_dir) == identity
    assert await _call(headend.grpc_target, channel_credentials(staged)) == "gw-1"
    renewed = commit_renewal(state_dir)
    assert renewed == staged
    assert not identity.key_path.exists()

    # Revoked: refused at connect by the interceptor, and refused at renewal.
    await headend.enrollment.revoke("gw-1", renewed.serial)
    refused = await _refused(headend.grpc_target, channel_credentials(renewed))
    assert refused.code() == grpc.StatusCode.PERMISSION_DENIED
    assert classify_tls_failure(refused) is TlsFailure.REVOKED
    assert headend.interceptor.refused == 1
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _stream(headend.grpc_target, channel_credentials(renewed))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(EnrollmentRefusedError) as refusal:
        await asyncio.to_thread(stage_renewal, state_dir, headend_url=headend.url)
    assert refusal.value.status == 403
    assert classify_tls_failure(refusal.value) is TlsFailure.REVOKED
    assert Identity.load(state_dir) == renewed  # the failed renewal left the identity alone
    rollback_renewal(state_dir)


async def test_connections_without_a_valid_certificate_are_refused(
    headend: Headend, tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    root = headend.ca.certificate_pem
    key = generate_key()
    csr = load_csr(build_csr(key, "gw-1"))

    def creds(cert_pem_bytes: bytes) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root, key_pem(key), cert_pem_bytes)

    # Sanity: a certificate from the headend's CA gets through.
    good = headend.ca.issue_client_certificate(csr, gateway_id="gw-1", site_id="site-a", now=now)
    assert await _call(headend.grpc_target, creds(cert_pem(good))) == "gw-1"

    # No client certificate, one from another CA, an expired one: refused in the handshake,
    # which the client sees as UNAVAILABLE (reference/appliance.md §4.3).
    other_ca = CertificateAuthority.create(tmp_path / "other-ca", now=now)
    impostor = other_ca.issue_client_certificate(csr, gateway_id="gw-1", site_id="site-a", now=now)
    expired = headend.ca.issue_client_certificate(
        csr, gateway_id="gw-1", site_id="site-a", now=now - timedelta(days=2), lifetime_s=86_400
    )
    for credentials in (
        grpc.ssl_channel_credentials(root),
        creds(cert_pem(impostor)),
        creds(cert_pem(expired)),
    ):
        refused = await _refused(headend.grpc_target, credentials)
        assert refused.code() == grpc.StatusCode.UNAVAILABLE
    assert headend.interceptor.refused == 0  # the handshake refused them, not the interceptor


async def test_enroll_refusals_over_https(
    headend: Headend, gateway_config: Path, tmp_path: Path
) -> None:
    ca_file = tmp_path / "headend-ca.pem"
    ca_file.write_bytes(headend.ca.certificate_pem)
    other_site = await headend.enrollment.create_token("site-b", "gw-1")
    args = ["--headend", headend.url, "--ca-file", str(ca_file), "--config", str(gateway_config)]
    # A token for another site: 403, nothing written, the token still usable for its site.
    assert await _enroll_cli("--token", other_site, *args) == 1
    assert not (gateway_config.parent / "state" / "identity" / "current").exists()
    # The headend's TLS is checked: without its CA the server is not trusted.
    token = await headend.enrollment.create_token("site-a", "gw-1")
    no_ca = ["--headend", headend.url, "--config", str(gateway_config)]
    assert await _enroll_cli("--token", token, *no_ca) == 1
    assert await _enroll_cli("--token", token, *args) == 0  # the token was not burnt above


async def test_enroll_api_bounds_and_validates_bodies(headend: Headend) -> None:
    tls = ssl.create_default_context(cafile=str(headend.ca_file))
    async with httpx.AsyncClient(verify=tls) as client:
        too_big = await client.post(
            headend.url + ENROLL_API_PATH + "/enroll",
            content=b"x" * 20_000,
            headers={"Content-Type": "application/json"},
        )
        assert too_big.status_code == 413
        malformed = await client.post(
            headend.url + ENROLL_API_PATH + "/enroll", content=b"{not json"
        )
        assert malformed.status_code == 400
        missing = await client.post(headend.url + ENROLL_API_PATH + "/enroll", json={"token": "x"})
        assert missing.status_code == 400
        assert "csr_pem" in missing.json()["detail"]
        bad_token = await client.post(
            headend.url + ENROLL_API_PATH + "/enroll",
            json={"token": "dgwe_nope", "csr_pem": build_csr(generate_key(), "gw-1").decode()},
        )
        assert bad_token.status_code == 401
        assert "unknown enrollment token" in bad_token.json()["detail"]
        bad_csr = await client.post(
            headend.url + ENROLL_API_PATH + "/enroll",
            json={"token": "dgwe_nope", "csr_pem": "nope"},
        )
        assert bad_csr.status_code == 400
        unsigned_renew = await client.post(
            headend.url + ENROLL_API_PATH + "/renew", json={"csr_pem": "x"}
        )
        assert unsigned_renew.status_code == 401
        assert "X-Dergw-Certificate" in unsigned_renew.json()["detail"]


async def test_renewal_must_be_signed_by_a_current_certificate(
    headend: Headend, tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    key = generate_key()
    token = await headend.enrollment.create_token("site-a", "gw-1")
    enrolled = await headend.enrollment.enroll(token, build_csr(key, "gw-1"))
    cert = x509.load_pem_x509_certificate(enrolled.certificate_pem.encode())
    body = json.dumps({"csr_pem": build_csr(generate_key(), "gw-1").decode()}).encode()

    def headers(
        cert: x509.Certificate, signer: ec.EllipticCurvePrivateKey, signed: bytes
    ) -> dict[str, str]:
        return {
            "Content-Type": "application/json",
            CERTIFICATE_HEADER: base64.b64encode(cert.public_bytes(Encoding.DER)).decode(),
            SIGNATURE_HEADER: base64.b64encode(
                signer.sign(signed, ec.ECDSA(hashes.SHA256()))
            ).decode(),
        }

    other_ca = CertificateAuthority.create(tmp_path / "other-ca", now=now)
    impostor = other_ca.issue_client_certificate(
        load_csr(build_csr(key, "gw-1")), gateway_id="gw-1", site_id="site-a", now=now
    )
    tls = ssl.create_default_context(cafile=str(headend.ca_file))
    async with httpx.AsyncClient(verify=tls) as client:

        async def renew(h: dict[str, str]) -> httpx.Response:
            return await client.post(
                headend.url + ENROLL_API_PATH + "/renew", content=body, headers=h
            )

        wrong_key = await renew(headers(cert, generate_key(), body))
        assert wrong_key.status_code == 401
        assert "does not verify" in wrong_key.json()["detail"]
        other_body = await renew(headers(cert, key, body + b" "))
        assert other_body.status_code == 401
        foreign = await renew(headers(impostor, key, body))
        assert foreign.status_code == 401
        assert "not issued by this headend" in foreign.json()["detail"]
        garbage = await renew({CERTIFICATE_HEADER: "!!", SIGNATURE_HEADER: "!!"})
        assert garbage.status_code == 401
        good = await renew(headers(cert, key, body))
        assert good.status_code == 200, good.text
        assert good.json()["gateway_id"] == "gw-1"
        assert good.json()["serial"] != enrolled.serial

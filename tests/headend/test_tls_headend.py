"""The headend with TLS on (`--tls-dir`), on real sockets: enrollment over HTTPS with the
gateway's own client (`gateway.identity.enroll`), the gateway link over mTLS with the issued
certificate, identity from the certificate, revocation at connect, on an open stream and at
renewal; and `dergw headend run --tls-dir` + `enroll-token create` as real processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import grpc.aio
import httpx
import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from dergw.v1 import dergw_pb2_grpc, grpc_channel_options, pb
from dergw.v1.trust import TrustedKeys
from gateway.identity import (
    EnrollmentRefusedError,
    Identity,
    build_csr,
    enroll,
    generate_key,
    stage_renewal,
)
from headend_min.app import HEADEND_CLIENT_CERT_FILE, Headend, prepare_tls
from headend_min.cli import main
from headend_min.clock import ManualClock
from headend_min.config import Endpoint, HeadendConfig, PostgresUrl
from headend_min.enrollment import InvalidRequestError
from headend_min.enrollment_pg import PgEnrollmentStore
from headend_min.gateway_admin_cli import (
    admin_enrollment,
    create_enrollment_token,
    list_gateway_certificates,
    revoke_gateway,
)
from headend_min.pki import CertificateAuthority, cert_pem, key_pem, load_csr
from tests.headend.fake_gateway import FakeGateway, LinkClosedError, site
from tests.headend.gateway_credentials import channel_credentials
from tests.headend.pg_support import PgDatabase, pg_db
from tests.headend.test_cli import _dergw_command, _read_line
from tests.mqtt_support import Mosquitto, mosquitto_binary
from tests.support import async_wait_until, free_tcp_port

pytestmark = pytest.mark.slow

__all__ = ["pg_db"]  # the fixture, for pytest

# The README's broker ACL: the headend (CN=headend) reads and writes every gateway's topics,
# each gateway only its own (its certificate's CN is its username).
MOSQUITTO_ACL = """user headend
topic readwrite dergw/v1/#

pattern readwrite dergw/v1/%u/#
"""

_READY_TLS = re.compile(r"^headend ready grpc=(\S+):(\d+) http=(\S+):(\d+) tls ca=(\S+)$")


class TlsFakeGateway(FakeGateway):
    """A FakeGateway on a TLS channel with the given credentials."""

    def __init__(self, target: str, credentials: grpc.ChannelCredentials, **kwargs: object) -> None:
        super().__init__(target, **kwargs)  # type: ignore[arg-type]
        self.credentials = credentials

    async def open(self, first: pb.UpMessage | None = None) -> None:
        self.closed.clear()
        self._channel = grpc.aio.secure_channel(
            self.target, self.credentials, options=grpc_channel_options(keepalive_s=20.0)
        )
        stub = dergw_pb2_grpc.GatewayLinkStub(self._channel)
        self._call = stub.Connect()  # type: ignore[call-arg]
        await self._call.write(first if first is not None else self.register_message())


@pytest.fixture
async def headend(tmp_path: Path) -> AsyncIterator[Headend]:
    config = HeadendConfig(
        grpc=Endpoint("127.0.0.1", free_tcp_port()),
        http=Endpoint("127.0.0.1", free_tcp_port()),
        db_path=tmp_path / "db" / "headend.sqlite3",
        tls_dir=tmp_path / "tls",
    )
    async with Headend(config, clock=ManualClock(time.time_ns())) as running:
        yield running


def _url(headend: Headend) -> str:
    return f"https://127.0.0.1:{headend.http_endpoint.port}/api/v1"


def _target(headend: Headend) -> str:
    return f"127.0.0.1:{headend.grpc_endpoint.port}"


async def _enroll(headend: Headend, state_dir: Path, gateway_id: str, site_id: str) -> Identity:
    token = await create_enrollment_token(
        headend.enrollment, site_id=site_id, gateway_id=gateway_id
    )
    assert headend.ca_pem_path is not None
    enrolled = await asyncio.to_thread(
        enroll,
        state_dir,
        headend_url=_url(headend),
        token=token,
        gateway_id=gateway_id,
        site_id=site_id,
        ca_bundle=headend.ca_pem_path,
    )
    assert enrolled.intent_keys is not None
    assert headend.signing_key is not None
    trusted = TrustedKeys.parse(enrolled.intent_keys, source="the enroll answer")
    assert set(trusted) == {headend.signing_key.key_id}
    return enrolled.identity


def _gateway(
    headend: Headend, credentials: grpc.ChannelCredentials, gateway_id: str, site_id: str
) -> TlsFakeGateway:
    return TlsFakeGateway(_target(headend), credentials, gateway_id=gateway_id, site=site(site_id))


async def _refusal(fake: FakeGateway) -> tuple[grpc.StatusCode | None, str]:
    try:
        await fake.connect()
    except LinkClosedError as exc:
        return exc.code, exc.details
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    finally:
        await fake.close()
    pytest.fail("the headend accepted the stream")


async def test_enroll_over_https_then_register_over_mtls(headend: Headend, tmp_path: Path) -> None:
    assert headend.tls_dir == tmp_path / "tls"
    assert headend.ca_pem_path == tmp_path / "tls" / "ca.pem"
    identity = await _enroll(headend, tmp_path / "gw-1", "gw-1", "site-a")
    assert identity.gateway_id == "gw-1"

    async with _gateway(headend, channel_credentials(identity), "gw-1", "site-a") as fake:
        assert fake.register_ack is not None
        gateways = await headend.store.list_gateways()
        assert [g.gateway_id for g in gateways] == ["gw-1"]

    rows = await list_gateway_certificates(headend.enrollment, ["gw-1"])
    assert [(r.gateway_id, r.site_id, r.serial, r.revoked) for r in rows] == [
        ("gw-1", "site-a", identity.serial, False)
    ]
    # The headend's own MQTT client certificate: CN=headend, issued by the same CA.
    client = x509.load_pem_x509_certificate(
        (tmp_path / "tls" / HEADEND_CLIENT_CERT_FILE).read_bytes()
    )
    assert client.subject.rfc4514_string() == "CN=headend"
    with pytest.raises(InvalidRequestError, match="reserved"):
        await create_enrollment_token(headend.enrollment, site_id="site-a", gateway_id="headend")


async def test_a_certificate_cannot_register_as_another_gateway_or_site(
    headend: Headend, tmp_path: Path
) -> None:
    identity = await _enroll(headend, tmp_path / "gw-a", "gw-a", "site-a")
    code, details = await _refusal(
        _gateway(headend, channel_credentials(identity), "gw-b", "site-a")
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "issued to gateway 'gw-a'" in details
    code, details = await _refusal(
        _gateway(headend, channel_credentials(identity), "gw-a", "site-b")
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "enrolled at site 'site-a'" in details
    assert headend.link.identity_refusals == 2
    assert await headend.store.list_gateways() == []  # nothing was registered


async def test_connections_without_a_client_certificate_are_refused(
    headend: Headend, tmp_path: Path
) -> None:
    assert headend.ca_pem_path is not None
    ca = headend.ca_pem_path.read_bytes()
    code, _ = await _refusal(_gateway(headend, grpc.ssl_channel_credentials(ca), "gw-1", "s"))
    assert code == grpc.StatusCode.UNAVAILABLE  # refused in the handshake
    # Plaintext against the TLS port: refused too.
    plain = FakeGateway(_target(headend), gateway_id="gw-1", site=site("site-a"))
    code, _ = await _refusal(plain)
    assert code == grpc.StatusCode.UNAVAILABLE
    # A certificate from another CA (self-made with the same CN): refused in the handshake.
    now = datetime.now(UTC)
    other = CertificateAuthority.create(tmp_path / "other-ca", now=now)
    key = generate_key()
    forged = other.issue_client_certificate(
        load_csr(build_csr(key, "gw-1")), gateway_id="gw-1", site_id="site-a", now=now
    )
    credentials = grpc.ssl_channel_credentials(ca, key_pem(key), cert_pem(forged))
    code, _ = await _refusal(_gateway(headend, credentials, "gw-1", "site-a"))
    assert code == grpc.StatusCode.UNAVAILABLE
    assert await headend.store.list_gateways() == []


async def test_revoked_gateway_is_dropped_and_refused_at_connect_and_renewal(
    headend: Headend, tmp_path: Path
) -> None:
    state_dir = tmp_path / "gw-1"
    identity = await _enroll(headend, state_dir, "gw-1", "site-a")
    live = _gateway(headend, channel_credentials(identity), "gw-1", "site-a")
    await live.connect()
    try:
        assert await revoke_gateway(headend.enrollment, "gw-1") == [identity.serial]
        # The open stream ends at the link's next revocation check (the presence loop).
        assert await headend.link.end_revoked() == 1
        code, details = await live.wait_closed()
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert "revoked" in details
    finally:
        await live.close()

    code, details = await _refusal(
        _gateway(headend, channel_credentials(identity), "gw-1", "site-a")
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "revoked" in details
    assert headend.revocation is not None
    assert headend.revocation.refused == 1

    with pytest.raises(EnrollmentRefusedError) as refused:
        await asyncio.to_thread(stage_renewal, state_dir, headend_url=_url(headend))
    assert refused.value.status == 403
    rows = await list_gateway_certificates(headend.enrollment, ["gw-1"])
    assert [r.revoked for r in rows] == [True]


async def test_renewal_over_https_gives_a_certificate_that_connects(
    headend: Headend, tmp_path: Path
) -> None:
    state_dir = tmp_path / "gw-1"
    identity = await _enroll(headend, state_dir, "gw-1", "site-a")
    staged = await asyncio.to_thread(stage_renewal, state_dir, headend_url=_url(headend))
    assert staged.serial != identity.serial
    async with _gateway(headend, channel_credentials(staged), "gw-1", "site-a") as fake:
        assert fake.register_ack is not None


async def test_admin_cli_lists_and_revokes_gateways(
    headend: Headend, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    identity = await _enroll(headend, tmp_path / "gw-1", "gw-1", "site-a")
    db = f"sqlite:///{headend.config.db_path}"
    capsys.readouterr()
    assert await asyncio.to_thread(main, ["gateways", "list", "--db", db]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert len(listed) == 1
    assert listed[0].startswith(f"gw-1  site=site-a  serial={identity.serial}  not_after=")
    assert listed[0].endswith("  active")
    revoke = ["gateways", "revoke", "gw-1", "--serial", identity.serial.upper(), "--db", db]
    assert await asyncio.to_thread(main, revoke) == 0
    assert capsys.readouterr().out == f"revoked gw-1 serial={identity.serial}\n"
    assert await asyncio.to_thread(main, revoke) == 1  # nothing new: said so, exit 1
    assert "nothing newly revoked" in capsys.readouterr().err
    assert await headend.enrollment.is_revoked("gw-1", identity.serial)
    bad = ["enroll-token", "create", "--site", "Site A", "--gateway", "gw-2", "--db", db]
    assert await asyncio.to_thread(main, bad) == 2
    assert "site id 'Site A' is not valid" in capsys.readouterr().err


async def test_tls_headend_on_postgresql(pg_db: PgDatabase, tmp_path: Path) -> None:
    config = HeadendConfig(
        grpc=Endpoint("127.0.0.1", free_tcp_port()),
        http=Endpoint("127.0.0.1", free_tcp_port()),
        db_path=PostgresUrl(pg_db.url),
        signing_key=tmp_path / "signing.pem",
        tls_dir=tmp_path / "tls",
    )
    async with Headend(config) as running:
        identity = await _enroll(running, tmp_path / "gw-1", "gw-1", "site-a")
        async with _gateway(running, channel_credentials(identity), "gw-1", "site-a") as fake:
            assert fake.register_ack is not None
        store = await PgEnrollmentStore.open(pg_db.url)  # a second instance's view
        try:
            assert await store.gateway_ids() == ["gw-1"]
            assert await revoke_gateway(admin_enrollment(store), "gw-1") == [identity.serial]
        finally:
            await store.close()
        code, _ = await _refusal(_gateway(running, channel_credentials(identity), "gw-1", "site-a"))
        assert code == grpc.StatusCode.PERMISSION_DENIED


def test_server_certificate_is_kept_while_it_fits_and_reissued_for_other_hosts(
    tmp_path: Path,
) -> None:
    now = datetime.now(UTC)
    config = HeadendConfig(
        grpc=Endpoint("0.0.0.0", 50051),
        http=Endpoint("127.0.0.1", 8443),
        db_path=tmp_path / "headend.sqlite3",
        tls_dir=tmp_path / "tls",
        tls_hosts=("headend.example",),
    )
    first = prepare_tls(config, now)
    cert = x509.load_pem_x509_certificate(first.server_cert.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["headend.example", "localhost"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert (first.server_key.stat().st_mode & 0o777) == 0o600
    assert (first.client_key.stat().st_mode & 0o777) == 0o600

    def serial() -> int:
        return x509.load_pem_x509_certificate(first.server_cert.read_bytes()).serial_number

    kept = serial()
    prepare_tls(config, now)
    assert serial() == kept  # same CA, same hosts, far from expiry: kept
    prepare_tls(replace(config, tls_hosts=("other.example",)), now)
    assert serial() != kept
    reissued = serial()
    prepare_tls(replace(config, tls_hosts=("other.example",)), now + timedelta(days=70))
    assert serial() != reissued  # within 30 days of expiry


def test_tls_host_without_tls_dir_is_explained(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--tls-host", "headend.example"]) == 2
    assert "--tls-host needs --tls-dir" in capsys.readouterr().err


async def test_plaintext_headend_explains_that_enrollment_needs_tls(tmp_path: Path) -> None:
    config = HeadendConfig(
        grpc=Endpoint("127.0.0.1", free_tcp_port()),
        http=Endpoint("127.0.0.1", free_tcp_port()),
        db_path=tmp_path / "headend.sqlite3",
    )
    async with Headend(config) as running:
        assert running.ca_pem_path is None
        async with httpx.AsyncClient(base_url=f"http://{running.http_endpoint}") as client:
            answer = await client.post("/api/v1/enroll", json={})
        assert answer.status_code == 503
        assert "--tls-dir" in answer.json()["detail"]


async def test_mqtt_link_connects_with_the_headend_client_certificate(tmp_path: Path) -> None:
    tls_dir = tmp_path / "tls"
    ca = CertificateAuthority.open(tls_dir, now=datetime.now(UTC))
    broker_dir = tmp_path / "broker-tls"
    cert, key = ca.write_server_certificate(broker_dir, ["127.0.0.1"], now=datetime.now(UTC))
    acl = broker_dir / "acl"
    acl.write_text(MOSQUITTO_ACL)
    broker = Mosquitto(
        tmp_path / "mosquitto",
        binary=mosquitto_binary(),
        extra_config="\n".join(
            [
                f"cafile {tls_dir / 'ca.pem'}",
                f"certfile {cert}",
                f"keyfile {key}",
                "require_certificate true",
                "use_identity_as_username true",
                f"acl_file {acl}",
            ]
        ),
    )
    await asyncio.to_thread(broker.start)
    try:
        config = HeadendConfig(
            grpc=Endpoint("127.0.0.1", free_tcp_port()),
            http=Endpoint("127.0.0.1", free_tcp_port()),
            db_path=tmp_path / "headend.sqlite3",
            tls_dir=tls_dir,
            mqtt=Endpoint("127.0.0.1", broker.port),
        )
        async with Headend(config) as running:
            link = running.mqtt_link
            assert link is not None
            assert link.stats.connects >= 1
            # The broker took the certificate's CN as the username (its ACL's `%u`).
            assert f"as {link.client_id}" in broker.log_tail(200)
            assert "u'headend'" in broker.log_tail(200)

            # A gateway with its enrolled certificate: the ACL lets it publish under its own
            # id only, and the headend receives what it may publish.
            key = generate_key()
            token = await create_enrollment_token(
                running.enrollment, site_id="site-a", gateway_id="gw-1"
            )
            enrolled = await running.enrollment.enroll(token, build_csr(key, "gw-1"))
            (tmp_path / "gw.pem").write_text(enrolled.certificate_pem)
            (tmp_path / "gw.key").write_bytes(key_pem(key))
            client = await asyncio.to_thread(
                _mqtt_gateway_client, broker.port, tls_dir / "ca.pem", tmp_path
            )
            try:
                for gateway_id in ("gw-2", "gw-1"):  # gw-2's topic first: the ACL drops it
                    register = pb.UpMessage(
                        register=pb.Register(
                            gateway_id=gateway_id, site=site("site-a"), boot_id="b"
                        )
                    )
                    await asyncio.to_thread(
                        _publish, client, f"dergw/v1/{gateway_id}/up/state", register
                    )

                async def registered() -> bool:
                    return bool(await running.store.list_gateways())

                await async_wait_until(registered, timeout_s=10, what="gw-1 registered")
                # In order per client: gw-2's message would have been handled before gw-1's.
                assert [g.gateway_id for g in await running.store.list_gateways()] == ["gw-1"]
            finally:
                client.disconnect()
                client.loop_stop()
    finally:
        await asyncio.to_thread(broker.kill)


def _mqtt_gateway_client(port: int, ca: Path, directory: Path) -> mqtt.Client:
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id="gw-1", protocol=MQTTProtocolVersion.MQTTv5
    )
    context = ssl.create_default_context(cafile=str(ca))
    context.load_cert_chain(str(directory / "gw.pem"), str(directory / "gw.key"))
    client.tls_set_context(context)
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client


def _publish(client: mqtt.Client, topic: str, message: pb.UpMessage) -> None:
    properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    properties.CorrelationData = b"connection-1"
    client.publish(
        topic, message.SerializeToString(), qos=1, properties=properties
    ).wait_for_publish(5)


def test_cli_runs_with_tls_and_creates_enrollment_tokens(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'db' / 'headend.sqlite3'}"
    tls_dir = tmp_path / "tls"
    arguments = ["--grpc", "127.0.0.1:0", "--http", "127.0.0.1:0", "--db", db]
    log_path = tmp_path / "headend.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [*_dergw_command(), "headend", "run", "--tls-dir", str(tls_dir), *arguments],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        try:
            line = _read_line(process, timeout_s=20.0).strip()
            match = _READY_TLS.match(line)
            assert match, f"unexpected first line {line!r}; log: {log_path.read_text()}"
            assert match.group(5) == str(tls_dir / "ca.pem")
            http_port = int(match.group(4))
            health = httpx.get(
                f"https://127.0.0.1:{http_port}/api/v1/healthz",
                verify=ssl.create_default_context(cafile=str(tls_dir / "ca.pem")),
                timeout=5.0,
            )
            assert health.status_code == 200
            created = subprocess.run(
                [
                    *_dergw_command(),
                    "headend",
                    "enroll-token",
                    "create",
                    "--site",
                    "site-a",
                    "--gateway",
                    "gw-1",
                    "--ttl-s",
                    "600",
                    "--db",
                    db,
                ],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            assert created.returncode == 0, created.stderr
            assert re.fullmatch(r"dgwe_[A-Za-z0-9_-]+\n", created.stdout), created.stdout
            listed = subprocess.run(
                [*_dergw_command(), "headend", "gateways", "list", "--db", db],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            assert listed.returncode == 0, listed.stderr
            assert listed.stdout == ""  # a token is no certificate yet
        finally:
            process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
            if process.poll() is None:
                process.kill()
                process.wait()
            if process.stdout is not None:
                process.stdout.close()
    assert process.returncode == 0, log_path.read_text()

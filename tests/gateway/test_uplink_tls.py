"""The uplink over mTLS on real sockets: the gateway's `Uplink` and `GrpcTransport` against a
gRPC server with the headend's credentials (headend_min.grpc_tls) and a minimal GatewayLink
servicer that answers Register with RegisterAck and records the certificate it saw; enrollment
and renewal against the real enroll router on uvicorn (HTTPS).

* an enrolled gateway connects over mTLS and registers;
* not enrolled: the uplink stays down ("not_enrolled"), keeps running, and connects once
  `dergw enroll` has written the identity (no restart);
* a certificate from another CA: UNKNOWN_CA, and the next attempt waits `rejected_backoff_s`
  (one connection attempt, no hammering);
* an expired certificate: EXPIRED in health;
* renewal due: staged over HTTPS, connected with the new certificate, committed after the
  RegisterAck; the old key kept until then;
* MQTT through mosquitto with an mTLS listener (`require_certificate`, the certificate's CN as
  the username, per-gateway ACLs): the enrolled gateway connects, registers and receives on its
  own topics; another gateway's topics, no certificate, another CA are refused;
* the pure `renewal_action` rule.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import paho.mqtt.client as mqtt
import pytest
import uvicorn
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi import FastAPI
from hypothesis import given
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import ValidationError

from dergw.v1 import pb
from dergw.v1.dergw_pb2_grpc import GatewayLinkServicer, add_GatewayLinkServicer_to_server
from drivers import registry
from gateway.clock import SystemClock
from gateway.config import GatewayConfig, GrpcUplinkConfig, MqttUplinkConfig
from gateway.identity import (
    ENROLL_API_PATH,
    IDENTITY_DIRNAME,
    Identity,
    TlsFailure,
    build_csr,
    classify_tls_failure,
    enroll,
    enroll_api_url,
    generate_key,
    write_private_file,
)
from gateway.outbox import Outbox
from gateway.runtime.app import Gateway as GatewayApp
from gateway.runtime.grpc_transport import GrpcTransport
from gateway.runtime.mqtt_transport import MqttTransport
from gateway.runtime.recorder import Recorder
from gateway.runtime.uplink import HANDSHAKE_CLOSES_TO_REJECT, Uplink
from gateway.runtime.uplink_tls import (
    NOT_ENROLLED,
    RenewalAction,
    UplinkCredentials,
    renewal_action,
)
from headend_min.clock import ManualClock
from headend_min.enroll_api import enrollment_router
from headend_min.enrollment import Enrollment, MemoryEnrollmentStore
from headend_min.grpc_tls import peer_certificate, server_credentials
from headend_min.pki import CertificateAuthority, cert_pem, key_pem, load_csr
from hil.mqtt_broker import BrokerTls, Mosquitto
from tests.mqtt_support import mosquitto_binary
from tests.support import async_wait_until, wait_until

pytestmark = pytest.mark.slow

GATEWAY_ID, SITE_ID = "gw-1", "site-a"
DAY_S = 86_400


class _Link(GatewayLinkServicer):
    """Register -> RegisterAck; remembers the serial of every client certificate it served."""

    def __init__(self) -> None:
        self.serials: list[str] = []

    async def Connect(
        self,
        request_iterator: AsyncIterator[pb.UpMessage],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[pb.DownMessage]:
        peer = peer_certificate(context)
        async for message in request_iterator:
            if message.HasField("register"):
                if peer is not None:
                    self.serials.append(peer.serial)
                yield pb.DownMessage(register_ack=pb.RegisterAck())


@dataclass
class Headend:
    ca: CertificateAuthority
    enrollment: Enrollment
    clock: ManualClock
    url: str
    grpc_target: str
    link: _Link
    tmp: Path
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)

    async def token(self) -> str:
        return await self.enrollment.create_token(SITE_ID, GATEWAY_ID)


@pytest.fixture
async def headend(tmp_path: Path) -> AsyncIterator[Headend]:
    # The headend's clock starts two days back (for certificates due for renewal); the CA and
    # the servers' certificates are valid from before that.
    now = datetime.now(UTC)
    clock = ManualClock(int((now - timedelta(days=2)).timestamp() * 1e9))
    ca = CertificateAuthority.create(tmp_path / "ca", now=now - timedelta(days=3))
    # Three-day certificates: one enrolled two days back is due for renewal now (2/3 of its
    # lifetime), a renewed one is not.
    enrollment = Enrollment(MemoryEnrollmentStore(), ca, clock, certificate_lifetime_s=3 * DAY_S)
    app = FastAPI()
    app.include_router(
        enrollment_router(
            enrollment, clock=clock, ca_certificate=ca.certificate, prefix=ENROLL_API_PATH
        )
    )
    cert_file, key_file = ca.write_server_certificate(tmp_path / "tls", ["127.0.0.1"], now=now)
    sock = socket.create_server(("127.0.0.1", 0))
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
    link = _Link()
    server = grpc.aio.server()
    add_GatewayLinkServicer_to_server(link, server)
    tls = ca.issue_server_certificate(["127.0.0.1"], now=now)
    port = server.add_secure_port(
        "127.0.0.1:0", server_credentials(ca.certificate_pem, tls.certificate_pem, tls.key_pem)
    )
    await server.start()
    try:
        yield Headend(
            ca=ca,
            enrollment=enrollment,
            clock=clock,
            url=f"https://127.0.0.1:{sock.getsockname()[1]}",
            grpc_target=f"127.0.0.1:{port}",
            link=link,
            tmp=tmp_path,
        )
    finally:
        await server.stop(None)
        http.should_exit = True
        await http_task
        sock.close()


class _CountingTransport(GrpcTransport):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.connects = 0

    async def connect(self) -> None:
        self.connects += 1
        await super().connect()


@dataclass
class Gateway:
    uplink: Uplink
    transport: _CountingTransport
    credentials: UplinkCredentials
    state_dir: Path


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    box = Outbox(tmp_path / "outbox.sqlite3", clock=SystemClock())
    yield box
    box.close()


@pytest.fixture
async def make_gateway(headend: Headend, outbox: Outbox, tmp_path: Path) -> AsyncIterator[Any]:
    tasks: list[asyncio.Task[None]] = []
    recorder = Recorder(outbox, commit_interval_s=0.05)

    def make(*, enroll_url: str | None = None, **config: object) -> Gateway:
        uplink_config = GrpcUplinkConfig.model_validate(
            {
                "transport": "grpc",
                "target": headend.grpc_target,
                "reconnect_max_s": 0.1,
                "enroll_url": enroll_url,
                **config,
            }
        )
        state_dir = tmp_path / "state"
        state_dir.mkdir(exist_ok=True)
        credentials = UplinkCredentials(state_dir, enroll_url=enroll_url, clock=SystemClock())
        transport = _CountingTransport(
            headend.grpc_target, keepalive_s=20, identity=credentials.selected
        )

        async def on_intent(signed: pb.SignedIntent) -> pb.IntentAck:
            return pb.IntentAck(site_id=SITE_ID, status=pb.INTENT_ACK_STATUS_PERSISTED)

        uplink = Uplink(
            uplink_config,
            transport=transport,
            gateway_id=GATEWAY_ID,
            outbox=outbox,
            recorder=recorder,
            register=lambda: pb.Register(gateway_id=GATEWAY_ID),
            on_intent=on_intent,
            inventory_changed=asyncio.Event(),
            clock=SystemClock(),
            site_id=SITE_ID,
            credentials=credentials,
        )
        tasks.append(asyncio.create_task(uplink.run()))
        return Gateway(uplink, transport, credentials, state_dir)

    try:
        yield make
    finally:
        for task in tasks:
            task.cancel()
        for result in await asyncio.gather(*tasks, return_exceptions=True):
            assert not isinstance(result, Exception), f"the uplink died: {result!r}"


async def _enroll(headend: Headend, state_dir: Path) -> Identity:
    enrolled = await asyncio.to_thread(
        enroll,
        state_dir,
        headend_url=headend.url,
        token=await headend.token(),
        gateway_id=GATEWAY_ID,
        site_id=SITE_ID,
        ca_bundle=headend.ca.certificate_pem,
    )
    return enrolled.identity


def _install_identity(
    state_dir: Path, key: ec.EllipticCurvePrivateKey, certificate: bytes, ca: bytes
) -> Identity:
    """Put a hand-made identity where `dergw enroll` would (for certificates enrollment would
    never hand out: expired, from another CA)."""
    directory = state_dir / IDENTITY_DIRNAME
    generation = directory / "g-0123456789abcdef"
    generation.mkdir(parents=True, mode=0o700)
    write_private_file(generation / "key.pem", key_pem(key))
    write_private_file(generation / "cert.pem", certificate, mode=0o644)
    write_private_file(generation / "ca.pem", ca, mode=0o644)
    write_private_file(directory / "current", generation.name.encode(), mode=0o644)
    return Identity.load(state_dir)


async def test_enrolled_gateway_connects_over_mtls(headend: Headend, make_gateway: Any) -> None:
    headend.clock.advance(2 * DAY_S)  # a fresh certificate, not due for renewal
    gateway: Gateway = make_gateway()
    identity = await _enroll(headend, gateway.state_dir)
    uplink = gateway.uplink
    await async_wait_until(lambda: uplink.health.connected, timeout_s=15, what="mTLS session")
    assert headend.link.serials == [identity.serial]
    assert uplink.health.tls is True
    assert uplink.health.tls_failure is None
    assert uplink.health.cert_serial == identity.serial
    assert uplink.health.cert_days_left is not None
    assert 2.9 < uplink.health.cert_days_left <= 3


async def test_not_enrolled_stays_down_until_enrolled(headend: Headend, make_gateway: Any) -> None:
    headend.clock.advance(2 * DAY_S)
    gateway: Gateway = make_gateway()
    uplink = gateway.uplink
    await async_wait_until(
        lambda: uplink.health.tls_failure == NOT_ENROLLED, timeout_s=10, what="not enrolled"
    )
    assert not uplink.health.connected
    assert "dergw enroll" in uplink.health.last_error
    assert gateway.transport.connects == 0  # nothing was dialled without an identity
    # `dergw enroll` while the gateway runs: the uplink comes up without a restart.
    identity = await _enroll(headend, gateway.state_dir)
    await async_wait_until(lambda: uplink.health.connected, timeout_s=15, what="connected")
    assert uplink.health.tls_failure is None
    assert headend.link.serials == [identity.serial]


async def test_certificate_from_another_ca_backs_off_long(
    headend: Headend, make_gateway: Any
) -> None:
    now = datetime.now(UTC)
    other = CertificateAuthority.create(headend.tmp / "other-ca", now=now)
    key = generate_key()
    cert = other.issue_client_certificate(
        load_csr(build_csr(key, GATEWAY_ID)), gateway_id=GATEWAY_ID, site_id=SITE_ID, now=now
    )
    gateway: Gateway = make_gateway(rejected_backoff_s=600)
    _install_identity(gateway.state_dir, key, cert_pem(cert), other.certificate_pem)
    uplink = gateway.uplink
    await async_wait_until(
        lambda: uplink.health.tls_failure is not None, timeout_s=15, what="classified"
    )
    assert uplink.health.tls_failure == "unknown_ca"
    assert uplink.health.next_retry_s == 600
    assert not uplink.health.connected
    # With reconnect_max_s = 0.1 the normal backoff would have dialled ~10 times in a second;
    # the rejection waits instead. (A deliberate observation window, not a synchronisation.)
    await asyncio.sleep(1.0)
    assert gateway.transport.connects == 1
    assert headend.link.serials == []


async def test_headend_refusing_our_issuer_backs_off_after_a_few_closes(
    headend: Headend, make_gateway: Any
) -> None:
    # We trust the headend, it does not trust our certificate's issuer: under TLS 1.3 it only
    # closes the connection ("Socket closed"), like a network drop, so a few in a row count.
    now = datetime.now(UTC)
    other = CertificateAuthority.create(headend.tmp / "other-ca", now=now)
    key = generate_key()
    cert = other.issue_client_certificate(
        load_csr(build_csr(key, GATEWAY_ID)), gateway_id=GATEWAY_ID, site_id=SITE_ID, now=now
    )
    gateway: Gateway = make_gateway(rejected_backoff_s=600)
    trusted = headend.ca.certificate_pem + other.certificate_pem
    _install_identity(gateway.state_dir, key, cert_pem(cert), trusted)
    uplink = gateway.uplink
    await async_wait_until(
        lambda: uplink.health.tls_failure is not None, timeout_s=15, what="classified"
    )
    assert uplink.health.tls_failure == "unknown_ca"
    assert uplink.health.next_retry_s == 600
    await asyncio.sleep(1.0)  # a deliberate observation window, as above
    assert gateway.transport.connects == HANDSHAKE_CLOSES_TO_REJECT
    assert headend.link.serials == []


async def test_expired_certificate_shows_as_expired(headend: Headend, make_gateway: Any) -> None:
    now = datetime.now(UTC)
    key = generate_key()
    cert = headend.ca.issue_client_certificate(
        load_csr(build_csr(key, GATEWAY_ID)),
        gateway_id=GATEWAY_ID,
        site_id=SITE_ID,
        now=now - timedelta(days=2),
        lifetime_s=DAY_S,
    )
    gateway: Gateway = make_gateway(rejected_backoff_s=600)
    _install_identity(gateway.state_dir, key, cert_pem(cert), headend.ca.certificate_pem)
    uplink = gateway.uplink
    await async_wait_until(
        lambda: uplink.health.tls_failure is not None, timeout_s=15, what="classified"
    )
    assert uplink.health.tls_failure == "expired"
    assert uplink.health.cert_days_left is not None
    assert uplink.health.cert_days_left < 0
    assert uplink.health.next_retry_s == 600
    assert gateway.transport.connects == 1
    assert headend.link.serials == []


async def test_renewal_due_is_staged_connected_and_committed(
    headend: Headend, make_gateway: Any, tmp_path: Path
) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    old = await _enroll(headend, state_dir)  # issued two days back: renewal is due
    assert old.renewal_due(datetime.now(UTC))
    headend.clock.advance(2 * DAY_S)  # the headend is back at the real time
    gateway: Gateway = make_gateway(enroll_url=headend.url)
    uplink = gateway.uplink
    await async_wait_until(lambda: uplink.health.connected, timeout_s=15, what="renewed session")
    # The session presented the new certificate; the old one never connected again.
    assert len(headend.link.serials) == 1
    new = Identity.load(state_dir)
    assert new.serial == headend.link.serials[0] != old.serial
    assert not new.renewal_due(datetime.now(UTC))
    assert uplink.health.cert_serial == new.serial
    assert uplink.health.cert_renewals == 1
    assert not old.key_path.exists()  # deleted only once the new one had worked
    assert not (state_dir / IDENTITY_DIRNAME / "staged").exists()


async def test_renewal_falling_due_in_a_session_reconnects_with_the_new_certificate(
    headend: Headend, make_gateway: Any, tmp_path: Path
) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    # Issued so that its renewal falls due ~3 s from now: at 2/3 of a lifetime that starts
    # 5 minutes before issue (the CA backdates for clock skew): issued + 2 days - 100 s.
    headend.clock.advance(103)
    old = await _enroll(headend, state_dir)
    headend.clock.advance(2 * DAY_S - 103)
    assert 0 < (old.renew_at - datetime.now(UTC)).total_seconds() <= 3
    gateway: Gateway = make_gateway(enroll_url=headend.url)
    uplink = gateway.uplink
    await async_wait_until(lambda: uplink.health.connected, timeout_s=15, what="session")
    assert headend.link.serials == [old.serial]
    await async_wait_until(
        lambda: uplink.health.cert_renewals == 1 and uplink.health.connected,
        timeout_s=20,
        what="renewed in the session",
    )
    new = Identity.load(state_dir)
    assert headend.link.serials == [old.serial, new.serial]
    assert uplink.health.sessions == 2
    assert not old.key_path.exists()


async def test_failed_renewal_keeps_the_current_certificate(
    headend: Headend, make_gateway: Any, tmp_path: Path
) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    old = await _enroll(headend, state_dir)
    headend.clock.advance(2 * DAY_S)
    # The renewal is refused (a wrong URL: HTTP 404): the old certificate stays in use, and
    # renewal is tried again an hour later, not on every reconnect.
    gateway: Gateway = make_gateway(enroll_url=headend.url + "/nowhere")
    uplink = gateway.uplink
    await async_wait_until(lambda: uplink.health.connected, timeout_s=15, what="session")
    assert headend.link.serials == [old.serial]
    assert Identity.load(state_dir) == old
    assert gateway.credentials.renewal_failures == 1
    assert gateway.credentials.renewal_check_in_s() == pytest.approx(3600, abs=60)


# -- the gateway app and its config -------------------------------------------------------------


@pytest.fixture
def memory_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(
        registry.DRIVERS,
        "memory",
        registry.DriverSpec("tests.gateway.fakes", "MemoryParams", "MemoryDriver", "memory"),
    )


def _site_config(state_dir: Path, target: str, **uplink: object) -> GatewayConfig:
    return GatewayConfig.model_validate(
        {
            "gateway": {"id": GATEWAY_ID, "state_dir": str(state_dir)},
            "site": {"id": SITE_ID, "name": "Site", "export_limit_w": 3000},
            "uplink": {"transport": "grpc", "target": target, "reconnect_max_s": 0.2, **uplink},
            "control": {"period_s": 0.1, "revert_timeout_s": 2, "refresh_s": 1},
            "devices": [
                {"id": "pv1", "kind": "pv", "driver": "memory", "poll_period_s": 0.1},
                {
                    "id": "meter1",
                    "kind": "meter",
                    "driver": "memory",
                    "role": "pcc",
                    "poll_period_s": 0.1,
                },
            ],
        }
    )


@pytest.mark.usefixtures("memory_driver")
async def test_gateway_not_enrolled_runs_control_with_the_uplink_down(
    headend: Headend, tmp_path: Path
) -> None:
    headend.clock.advance(2 * DAY_S)
    app = GatewayApp(_site_config(tmp_path / "state", headend.grpc_target))  # tls by default
    assert app.uplink_credentials is not None
    stop = asyncio.Event()
    task = asyncio.create_task(app.run(stop))
    try:
        await async_wait_until(
            lambda: app.uplink.health.tls_failure == NOT_ENROLLED, timeout_s=10, what="down"
        )
        cycles = app.control.cycles
        await async_wait_until(
            lambda: app.control.cycles >= cycles + 5, timeout_s=10, what="control cycles"
        )
        assert not app.uplink.health.connected
        assert not task.done()
        # Enrolled while running: the uplink comes up, nothing restarted.
        identity = await _enroll(headend, tmp_path / "state")
        await async_wait_until(lambda: app.uplink.health.connected, timeout_s=15, what="up")
        assert headend.link.serials == [identity.serial]
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


@pytest.mark.usefixtures("memory_driver")
def test_plaintext_only_when_configured(tmp_path: Path) -> None:
    config = GatewayApp(_site_config(tmp_path, "127.0.0.1:1", tls=False))
    assert config.uplink_credentials is None
    assert config.uplink.health.tls is False


def test_uplink_tls_config_keys() -> None:
    grpc_config = GrpcUplinkConfig(transport="grpc", target="h:1")
    assert grpc_config.tls is True
    assert grpc_config.enroll_url is None
    assert grpc_config.rejected_backoff_s == 600
    mqtt_config = MqttUplinkConfig(
        transport="mqtt", broker="h:1", tls=False, enroll_url="https://headend:8443/"
    )
    assert mqtt_config.tls is False
    assert mqtt_config.enroll_url == "https://headend:8443"
    for bad in ("http://headend:8080", "https://", "headend:8443"):
        with pytest.raises(ValidationError, match="HTTPS URL"):
            GrpcUplinkConfig(transport="grpc", target="h:1", enroll_url=bad)
    with pytest.raises(ValidationError):
        GrpcUplinkConfig(transport="grpc", target="h:1", rejected_backoff_s=0)


def test_enroll_api_url() -> None:
    assert enroll_api_url("https://h:8443") == "https://h:8443/api/v1"
    assert enroll_api_url("https://h:8443/") == "https://h:8443/api/v1"
    assert enroll_api_url("https://h:8443/api/v1/") == "https://h:8443/api/v1"


# -- MQTT over mTLS ------------------------------------------------------------------------------


def _client_identity(
    ca: CertificateAuthority, state_dir: Path, common_name: str, now: datetime
) -> Identity:
    key = generate_key()
    cert = ca.issue_client_certificate(
        load_csr(build_csr(key, common_name)), gateway_id=common_name, site_id=SITE_ID, now=now
    )
    state_dir.mkdir(parents=True)
    return _install_identity(state_dir, key, cert_pem(cert), ca.certificate_pem)


class _HeadendClient:
    """The headend's side of the broker: user "headend" (its certificate's CN), all topics."""

    def __init__(self, broker: Mosquitto, identity: Identity) -> None:
        self.received: list[tuple[str, pb.UpMessage]] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id="headend", protocol=MQTTProtocolVersion.MQTTv5
        )
        self.client.tls_set_context(identity.ssl_context())
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.subscribe("dergw/v1/+/up/#", qos=1)
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        up = pb.UpMessage()
        up.ParseFromString(bytes(message.payload))
        with self._lock:
            self.received.append((message.topic, up))

    def registers(self) -> list[str]:
        with self._lock:
            return [topic for topic, up in self.received if up.HasField("register")]

    def answer(self, gateway_id: str, correlation: bytes) -> None:
        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        properties.CorrelationData = correlation
        down = pb.DownMessage(register_ack=pb.RegisterAck(committed_seq=7))
        self.client.publish(
            f"dergw/v1/{gateway_id}/down/ack",
            down.SerializeToString(),
            qos=1,
            properties=properties,
        ).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _connect_without_certificate(broker: Mosquitto, cafile: Path) -> str | None:
    """None if a client without a certificate got a CONNACK, else how it was refused."""
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id="bare", protocol=MQTTProtocolVersion.MQTTv5
    )
    client.tls_set_context(ssl.create_default_context(cafile=str(cafile)))
    try:
        client.connect(broker.host, broker.port)
        # TLS 1.3: a refused client certificate only shows on the first read.
        for _ in range(50):
            rc = client.loop(timeout=0.1)
            if client.is_connected():
                return None
            if rc != mqtt.MQTT_ERR_SUCCESS:
                return mqtt.error_string(rc)
    except OSError as exc:
        return str(exc)
    finally:
        client.disconnect()
    return "no CONNACK"


async def test_mqtt_over_mtls_keeps_each_gateway_to_its_topics(tmp_path: Path) -> None:
    binary = mosquitto_binary()
    now = datetime.now(UTC)
    ca = CertificateAuthority.create(tmp_path / "ca", now=now)
    certfile, keyfile = ca.write_server_certificate(tmp_path / "broker-tls", ["127.0.0.1"], now=now)
    broker = Mosquitto(
        tmp_path / "broker",
        binary=binary,
        tls=BrokerTls(cafile=tmp_path / "ca" / "ca.pem", certfile=certfile, keyfile=keyfile),
    )
    broker.start()
    headend = None
    try:
        headend = _HeadendClient(broker, _client_identity(ca, tmp_path / "headend", "headend", now))
        identity = _client_identity(ca, tmp_path / "gw", GATEWAY_ID, now)
        config = MqttUplinkConfig(transport="mqtt", broker=broker.address, keepalive_s=5)
        transport = MqttTransport(
            config, gateway_id=GATEWAY_ID, boot_id="boot-1", identity=lambda: identity
        )
        assert transport.target == f"mqtts://{broker.address}"
        try:
            await transport.connect()
            await transport.send(pb.UpMessage(register=pb.Register(gateway_id=GATEWAY_ID)))
            await asyncio.to_thread(
                wait_until,
                lambda: headend is not None and len(headend.registers()) == 1,
                timeout_s=10,
                what="the Register at the headend",
            )
            assert headend.registers() == [f"dergw/v1/{GATEWAY_ID}/up/state"]
            assert transport.connection_id is not None
            await asyncio.to_thread(headend.answer, GATEWAY_ID, transport.connection_id)
            answer = await asyncio.wait_for(transport.receive(), 10)
            assert answer.register_ack.committed_seq == 7
        finally:
            await transport.close()

        # The same certificate under another gateway's id: the ACL (CN = username) drops what
        # it publishes on that gateway's topics. Once the broker has acknowledged those
        # publishes, a Register on the certificate's own topics gets through, theirs never.
        impostor = MqttTransport(
            config, gateway_id="gw-2", boot_id="boot-1", identity=lambda: identity
        )
        try:
            await impostor.connect()
            await impostor.send(pb.UpMessage(register=pb.Register(gateway_id="gw-2")))
            await async_wait_until(
                lambda: impostor.stats.published >= 2, timeout_s=10, what="PUBACKs"
            )
        finally:
            await impostor.close()
        try:
            await transport.connect()
            await transport.send(pb.UpMessage(register=pb.Register(gateway_id=GATEWAY_ID)))
            await asyncio.to_thread(
                wait_until,
                lambda: headend is not None and len(headend.registers()) == 2,
                timeout_s=10,
                what="the second Register",
            )
        finally:
            await transport.close()
        assert headend.registers() == [f"dergw/v1/{GATEWAY_ID}/up/state"] * 2

        # A certificate from another CA: the gateway does not trust the broker either.
        other = CertificateAuthority.create(tmp_path / "other-ca", now=now)
        foreign = _client_identity(other, tmp_path / "foreign", GATEWAY_ID, now)
        stranger = MqttTransport(
            config, gateway_id=GATEWAY_ID, boot_id="boot-1", identity=lambda: foreign
        )
        try:
            with pytest.raises(ssl.SSLError) as refused:
                await stranger.connect()
        finally:
            await stranger.close()
        assert classify_tls_failure(refused.value) is TlsFailure.UNKNOWN_CA

        # No client certificate at all: the broker ends the handshake.
        refusal = await asyncio.to_thread(
            _connect_without_certificate, broker, tmp_path / "ca" / "ca.pem"
        )
        assert refusal is not None
    finally:
        if headend is not None:
            headend.close()
        broker.kill()


# -- the pure rule ----------------------------------------------------------------------------


def _identity(not_before: datetime, lifetime_s: float) -> Identity:
    return Identity(
        gateway_id=GATEWAY_ID,
        key_path=Path("k"),
        cert_path=Path("c"),
        ca_path=Path("a"),
        private_key_pem=b"",
        certificate_pem=b"",
        ca_pem=b"",
        serial="1",
        not_before=not_before,
        not_after=not_before + timedelta(seconds=lifetime_s),
    )


T0 = datetime(2026, 1, 1, tzinfo=UTC)


@given(
    age_s=st.floats(min_value=0, max_value=4 * DAY_S),
    lifetime_s=st.floats(min_value=60, max_value=3 * DAY_S),
    can_renew=st.booleans(),
    staged_age_s=st.none() | st.floats(min_value=0, max_value=4 * DAY_S),
)
def test_renewal_action(
    age_s: float, lifetime_s: float, can_renew: bool, staged_age_s: float | None
) -> None:
    now = T0 + timedelta(seconds=age_s)
    current = _identity(T0, lifetime_s)
    staged = (
        None
        if staged_age_s is None
        else _identity(now - timedelta(seconds=staged_age_s), 3 * DAY_S)
    )
    action = renewal_action(current, staged, now, can_renew=can_renew)
    staged_valid = staged is not None and staged.not_after > now
    if staged_valid:
        assert action is RenewalAction.TRY_STAGED
    elif current.not_after <= now:
        assert action is RenewalAction.REENROLL
    elif can_renew and now >= current.renew_at:
        assert action is RenewalAction.STAGE
    else:
        assert action is RenewalAction.CONNECT


def test_renewal_action_examples() -> None:
    current = _identity(T0, 3 * DAY_S)  # renew at T0 + 2 days
    staged = _identity(T0 + timedelta(days=2), 3 * DAY_S)

    def at(days: float) -> datetime:
        return T0 + timedelta(days=days)

    assert renewal_action(current, None, at(days=1), can_renew=True) is RenewalAction.CONNECT
    assert renewal_action(current, None, at(days=2), can_renew=True) is RenewalAction.STAGE
    assert renewal_action(current, None, at(days=2), can_renew=False) is RenewalAction.CONNECT
    assert renewal_action(current, staged, at(days=2), can_renew=False) is (
        RenewalAction.TRY_STAGED
    )
    assert renewal_action(current, None, at(days=3), can_renew=True) is RenewalAction.REENROLL

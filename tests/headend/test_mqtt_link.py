"""The headend's MQTT link against a real mosquitto: the gateway side is the real MqttTransport.

Covers: register / telemetry / intent ack round trip into a SQLite store, the intent push after a
Register and `publish_intent` for an offline gateway, presence (will) closing the right stream,
bounds and misaddressed messages, protocol violations answered with RetryAfter, a broker restart
under the link, and two headend instances on one shared subscription splitting the load.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

import gateway.runtime.mqtt_transport as gateway_side
import headend_min.mqtt_link as headend_side
from dergw.v1 import MAX_MESSAGE_BYTES, pb
from gateway.config import MqttUplinkConfig
from gateway.runtime.mqtt_transport import MqttTransport
from headend_min import cli
from headend_min.app import Headend
from headend_min.clock import SystemClock
from headend_min.config import ConfigError, Endpoint, HeadendConfig
from headend_min.model import IntentBasis
from headend_min.mqtt_link import MqttLink
from headend_min.session import Admission, GatewaySessions
from headend_min.signing import SigningKey
from headend_min.sqlite_store import SqliteStore
from headend_min.store import Store
from tests.headend.fake_gateway import device, sample_record, site
from tests.mqtt_support import Mosquitto, mosquitto_broker
from tests.support import async_wait_until, free_tcp_port

__all__ = ["mosquitto_broker"]  # the fixture, imported for pytest

SITE = "site-1"


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    opened = await SqliteStore.open(tmp_path / "headend.sqlite3", synchronous="NORMAL")
    yield opened
    await opened.close()


def _sessions(store: Store, **kwargs: object) -> GatewaySessions:
    return GatewaySessions(store, SystemClock(), signing_key=SIGNING_KEY, **kwargs)  # type: ignore[arg-type]


SIGNING_KEY = SigningKey.generate()


def _document(message: pb.DownMessage) -> pb.IntentDocument:
    """The document of the signed intent the link published (intents always go out signed)."""
    assert message.HasField("signed_intent"), message
    return pb.IntentPayload.FromString(message.signed_intent.payload).document


@pytest.fixture
async def link(mosquitto_broker: Mosquitto, store: SqliteStore) -> AsyncIterator[MqttLink]:
    mqtt_link = MqttLink(
        _sessions(store), mosquitto_broker.host, mosquitto_broker.port, presence_interval_s=0.2
    )
    await mqtt_link.start()
    yield mqtt_link
    await mqtt_link.stop()


class Gateway:
    """A gateway speaking through the real MqttTransport, with a seq counter."""

    def __init__(self, broker: Mosquitto, gateway_id: str = "gw-1", intent_version: int = 0):
        config = MqttUplinkConfig(transport="mqtt", broker=broker.address, keepalive_s=5)
        self.gateway_id = gateway_id
        self.intent_version = intent_version
        self.boot_id = f"boot-{gateway_id}"
        self.transport = MqttTransport(config, gateway_id=gateway_id, boot_id=self.boot_id)
        self.next_seq = 1

    def register(self) -> pb.UpMessage:
        return pb.UpMessage(
            register=pb.Register(
                gateway_id=self.gateway_id,
                software_version="test",
                site=site(SITE),
                devices=[device("pv-1")],
                intent_version=self.intent_version,
                next_seq=self.next_seq,
                boot_id=self.boot_id,
            )
        )

    async def connect(self) -> pb.DownMessage:
        await self.transport.connect()
        await self.transport.send(self.register())
        return await self.receive()

    async def receive(self, timeout_s: float = 10.0) -> pb.DownMessage:
        return await asyncio.wait_for(self.transport.receive(), timeout_s)

    def batch(self, count: int = 2) -> pb.TelemetryBatch:
        first = self.next_seq
        batch = pb.TelemetryBatch(gateway_id=self.gateway_id, first_seq=first)
        for offset in range(count):
            record = batch.records.add()
            record.CopyFrom(sample_record("pv-1", {"W": (100.0 + offset, "W")}))
            record.seq = first + offset
        self.next_seq = first + count
        batch.last_seq = self.next_seq - 1
        return batch

    async def send_batch(self, count: int = 2) -> pb.TelemetryBatch:
        batch = self.batch(count)
        await self.transport.send(pb.UpMessage(telemetry=batch))
        return batch

    async def close(self) -> None:
        await self.transport.close()


class RawClient:
    """A bare paho client for messages a real gateway would not send."""

    def __init__(self, broker: Mosquitto, client_id: str = "raw") -> None:
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5
        )
        self.received: list[tuple[str, pb.DownMessage, bytes | None]] = []
        self._lock = threading.Lock()
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def subscribe(self, topic: str) -> None:
        self.client.subscribe(topic, qos=1)[1]
        time.sleep(0.2)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        down = pb.DownMessage()
        down.ParseFromString(msg.payload)
        with self._lock:
            self.received.append(
                (msg.topic, down, getattr(msg.properties, "CorrelationData", None))
            )

    def publish(self, topic: str, payload: bytes, correlation: bytes | None = None) -> None:
        properties = None
        if correlation is not None:
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            properties.CorrelationData = correlation
        self.client.publish(topic, payload, qos=1, properties=properties).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


async def _post_intent(store: Store, version_note: str = "") -> int:
    def compose(basis: IntentBasis) -> pb.IntentDocument:
        return pb.IntentDocument(site_id=basis.site_id, version=basis.next_version)

    stored = await store.append_intent(SITE, compose, time.time_ns())
    return stored.version


async def _drain(gateway: Gateway, quiet_s: float = 0.5) -> list[pb.DownMessage]:
    """Whatever else arrives until nothing has for `quiet_s`."""
    messages = []
    while True:
        try:
            messages.append(await gateway.receive(timeout_s=quiet_s))
        except TimeoutError:
            return messages


async def _stream_open(store: Store, gateway_id: str) -> bool:
    record = await store.get_gateway(gateway_id)
    assert record is not None
    return record.stream_open


# -- tests ----------------------------------------------------------------------------------------


def test_topic_names_match_the_gateway() -> None:
    for name in ("UP_STATE", "UP_TELEMETRY", "UP_EVENTS", "DOWN_INTENT", "DOWN_ACK"):
        assert getattr(gateway_side, name) == getattr(headend_side, name)
    assert gateway_side.MAX_PACKET_BYTES == headend_side.MAX_PACKET_BYTES


async def test_round_trip_into_the_store(
    mosquitto_broker: Mosquitto, link: MqttLink, store: SqliteStore
) -> None:
    gateway = Gateway(mosquitto_broker)
    try:
        first = await gateway.connect()
        assert first.HasField("register_ack")
        assert first.register_ack.committed_seq == 0
        assert await _stream_open(store, "gw-1")
        await gateway.send_batch(3)
        ack = await gateway.receive()
        assert ack.ack.up_to_seq == 3
        await gateway.send_batch(2)
        assert (await gateway.receive()).ack.up_to_seq == 5
        record = await store.get_gateway("gw-1")
        assert record is not None
        assert record.committed_seq == 5

        version = await _post_intent(store)
        assert await link.publish_intent(SITE, version) == 1
        intent = await gateway.receive()
        assert _document(intent).version == version
        ack_message = pb.IntentAck(
            site_id=SITE, version=version, status=pb.INTENT_ACK_STATUS_PERSISTED
        )
        await gateway.transport.send(pb.UpMessage(intent_ack=ack_message))

        async def acked() -> bool:
            record = await store.get_gateway("gw-1")
            return record is not None and record.intent_version == version

        await async_wait_until(acked, timeout_s=5, what="the intent ack in the store")
    finally:
        await gateway.close()

    async def closed() -> bool:
        return not await _stream_open(store, "gw-1")

    # The clean close publishes the will: the stream is closed in the store.
    await async_wait_until(closed, timeout_s=5, what="the stream closed by the will")
    assert link.stats.received == {"register": 1, "telemetry": 2, "intent_ack": 1, "presence": 2}
    assert link.stats.batches_acked == 2


async def test_register_gets_the_newer_intent(
    mosquitto_broker: Mosquitto, link: MqttLink, store: SqliteStore
) -> None:
    # The site must exist before an intent can be posted: register once.
    gateway = Gateway(mosquitto_broker)
    await gateway.connect()
    await gateway.close()
    version = await _post_intent(store)
    gateway = Gateway(mosquitto_broker)  # holds v0
    try:
        await gateway.connect()
        pushed = await gateway.receive()
        assert _document(pushed).version == version

        async def delivered() -> bool:
            deliveries = await store.intent_deliveries(SITE, [version])
            return [d.gateway_id for d in deliveries if d.delivered_at_ns] == ["gw-1"]

        # Recorded once the broker confirmed it (the gateway may have it a moment earlier).
        await async_wait_until(delivered, timeout_s=5, what="the delivery record")
    finally:
        await gateway.close()


async def test_intent_for_an_offline_gateway_waits_in_its_session(
    mosquitto_broker: Mosquitto, link: MqttLink, store: SqliteStore
) -> None:
    gateway = Gateway(mosquitto_broker)
    await gateway.connect()
    await gateway.close()
    version = await _post_intent(store)
    assert await link.publish_intent(SITE, version) == 1  # queued by the broker
    gateway.intent_version = 0
    try:
        answer = await gateway.connect()
        assert answer.HasField("register_ack")
        # Queued in the session, and pushed again after the Register (which still said v0):
        # at least once, never an older version.
        received = await gateway.receive()
        assert _document(received).version == version
        extra = await _drain(gateway)
        assert all(_document(message).version == version for message in extra), extra
    finally:
        await gateway.close()


async def test_late_will_of_an_old_connection_keeps_the_new_stream_open(
    mosquitto_broker: Mosquitto, link: MqttLink, store: SqliteStore
) -> None:
    gateway = Gateway(mosquitto_broker)
    await gateway.connect()
    old_id = gateway.transport.connection_id
    await gateway.close()
    await gateway.connect()
    assert gateway.transport.connection_id != old_id
    raw = RawClient(mosquitto_broker)
    try:
        offline = pb.UpMessage(presence=pb.Presence(online=False, boot_id=gateway.boot_id))
        raw.publish("dergw/v1/gw-1/up/state", offline.SerializeToString(), old_id)
        await async_wait_until(
            lambda: link.stats.received.get("presence", 0) >= 4, timeout_s=5, what="presence"
        )
        await asyncio.sleep(0.2)
        assert await _stream_open(store, "gw-1")
    finally:
        raw.close()
        await gateway.close()


async def test_bad_messages_are_dropped_and_counted(
    mosquitto_broker: Mosquitto, link: MqttLink, store: SqliteStore
) -> None:
    gateway = Gateway(mosquitto_broker)
    raw = RawClient(mosquitto_broker)
    try:
        await gateway.connect()
        raw.publish("dergw/v1/gw-1/up/telemetry", b"\xff\xff\xff")
        raw.publish("dergw/v1/gw-1/up/telemetry", b"\x00" * (MAX_MESSAGE_BYTES + 1))
        register = gateway.register().SerializeToString()
        raw.publish("dergw/v1/gw-1/up/telemetry", register)  # register on the telemetry topic
        raw.publish("dergw/v1/gw-1/up/other", register)
        await async_wait_until(
            lambda: (
                (
                    link.stats.dropped_undecodable,
                    link.stats.dropped_oversize,
                    link.stats.dropped_misaddressed,
                )
                == (1, 1, 2)
            ),
            timeout_s=5,
            what="drops counted",
        )
        # The link still works.
        await gateway.send_batch(1)
        assert (await gateway.receive()).ack.up_to_seq == 1
    finally:
        raw.close()
        await gateway.close()


async def test_protocol_violation_is_answered_with_retry_after(
    mosquitto_broker: Mosquitto, link: MqttLink
) -> None:
    gateway = Gateway(mosquitto_broker)
    try:
        await gateway.connect()
        batch = gateway.batch(1)
        batch.gateway_id = "gw-other"  # not the gateway of the topic
        await gateway.transport.send(pb.UpMessage(telemetry=batch))
        answer = await gateway.receive()
        assert answer.retry_after.seconds == headend_side.PROTOCOL_VIOLATION_RETRY_S
        assert "gw-other" in answer.retry_after.reason
        assert link.stats.protocol_violations == 1
    finally:
        await gateway.close()


async def test_admission_refusal_reaches_the_gateway(
    mosquitto_broker: Mosquitto, store: SqliteStore
) -> None:
    admission = Admission(rate_per_s=0.01, burst=1)
    link = MqttLink(
        _sessions(store, admission=admission), mosquitto_broker.host, mosquitto_broker.port
    )
    await link.start()
    first, second = Gateway(mosquitto_broker, "gw-1"), Gateway(mosquitto_broker, "gw-2")
    try:
        assert (await first.connect()).HasField("register_ack")
        refused = await second.connect()
        assert refused.retry_after.seconds >= 1
        # A re-register on the admitted connection is not a new session: not refused.
        await first.transport.send(first.register())
        assert (await first.receive()).HasField("register_ack")
    finally:
        await first.close()
        await second.close()
        await link.stop()


async def test_link_survives_a_broker_restart(
    mosquitto_broker: Mosquitto, store: SqliteStore
) -> None:
    link = MqttLink(
        _sessions(store),
        mosquitto_broker.host,
        mosquitto_broker.port,
        reconnect_min_s=1,
        reconnect_max_s=1,
    )
    await link.start()
    gateway = Gateway(mosquitto_broker)
    try:
        await gateway.connect()
        mosquitto_broker.kill()
        await async_wait_until(lambda: not link.connected, timeout_s=10, what="link lost")
        await gateway.close()
        mosquitto_broker.start()
        await async_wait_until(lambda: link.stats.connects == 2, timeout_s=15, what="reconnect")
        await asyncio.sleep(0.3)  # the SUBACK of the renewed subscription
        assert (await gateway.connect()).HasField("register_ack")
        await gateway.send_batch(2)
        assert (await gateway.receive()).ack.up_to_seq == 2
    finally:
        await gateway.close()
        await link.stop()


async def test_two_instances_share_the_load(
    mosquitto_broker: Mosquitto, store: SqliteStore
) -> None:
    gateways_n, batches_n = 12, 10
    links = [
        MqttLink(
            _sessions(store),
            mosquitto_broker.host,
            mosquitto_broker.port,
            client_id=f"headend-{i}",
            max_pending=4,
        )
        for i in range(2)
    ]
    for each in links:
        await each.start()
    gateways = [Gateway(mosquitto_broker, f"gw-{i:02d}") for i in range(gateways_n)]
    acks: dict[str, list[int]] = {g.gateway_id: [] for g in gateways}

    async def run(gateway: Gateway) -> None:
        assert (await gateway.connect()).HasField("register_ack")
        for _ in range(batches_n):
            await gateway.send_batch(3)
        while len(acks[gateway.gateway_id]) < batches_n:
            message = await gateway.receive()
            assert message.HasField("ack"), message
            acks[gateway.gateway_id].append(message.ack.up_to_seq)

    try:
        await asyncio.wait_for(asyncio.gather(*(run(g) for g in gateways)), 60)
        # Nothing more arrives: each batch was acked exactly once.
        for gateway in gateways:
            with pytest.raises(TimeoutError):
                await gateway.receive(timeout_s=0.05)
    finally:
        for gateway in gateways:
            await gateway.close()
        for each in links:
            await each.stop()
    per_instance = [each.stats.received.get("telemetry", 0) for each in links]
    print(f"telemetry batches handled per headend instance: {per_instance}")
    assert sum(per_instance) == gateways_n * batches_n
    assert all(count > 0 for count in per_instance)
    assert sum(each.stats.batches_acked for each in links) == gateways_n * batches_n
    for gateway in gateways:
        record = await store.get_gateway(gateway.gateway_id)
        assert record is not None
        assert record.committed_seq == 3 * batches_n


async def test_start_fails_without_a_broker(store: SqliteStore) -> None:
    link = MqttLink(_sessions(store), "127.0.0.1", free_tcp_port())
    with pytest.raises(ConnectionError, match="not reachable"):
        await link.start(timeout_s=0.5)


def test_cli_checks_the_mqtt_address() -> None:
    args = cli._parser().parse_args(["run", "--mqtt", "broker.example.net:1883"])
    assert cli._config(args).mqtt == Endpoint("broker.example.net", 1883)
    assert cli._config(cli._parser().parse_args(["run"])).mqtt is None
    for bad in ("broker.example.net", "127.0.0.1:0"):
        with pytest.raises(ConfigError, match="--mqtt"):
            cli._config(cli._parser().parse_args(["run", "--mqtt", bad]))


async def test_headend_serves_mqtt_and_publishes_posted_intents(
    mosquitto_broker: Mosquitto, tmp_path: Path
) -> None:
    config = HeadendConfig(
        grpc=Endpoint("127.0.0.1", free_tcp_port()),
        http=Endpoint("127.0.0.1", free_tcp_port()),
        db_path=tmp_path / "headend.sqlite3",
        mqtt=Endpoint(mosquitto_broker.host, mosquitto_broker.port),
        admin_token_file=tmp_path / "admin-token",
    )
    gateway = Gateway(mosquitto_broker)
    async with Headend(config) as headend:
        assert headend.mqtt_link is not None
        assert headend.mqtt_link.connected
        try:
            assert (await gateway.connect()).HasField("register_ack")
            async with httpx.AsyncClient(
                base_url=f"http://{headend.http_endpoint}",
                headers={"Authorization": f"Bearer {headend.admin_token}"},
            ) as http:
                response = await http.post(
                    f"/api/v1/sites/{SITE}/intents",
                    json={"events": [{"duration_s": 300, "controls": {"export_limit_w": 2000}}]},
                )
                assert response.status_code == 201, response.text
            pushed = await gateway.receive()
            assert _document(pushed).version == response.json()["version"]
            assert _document(pushed).site_id == SITE
        finally:
            await gateway.close()
    assert headend.mqtt_link is None  # stopped with the headend

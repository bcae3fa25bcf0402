"""The gateway's MQTT v5 transport against a real mosquitto, with a raw paho client as headend.

Covers: the `[uplink] transport = "mqtt"` config, a round trip, the persistent session (an intent
published while the gateway is away arrives once on reconnect, also across a broker restart),
answers meant for an earlier connection, the last will on kill -9 and on close, a broker that
dies under a connected transport, bounds on received payloads and send backpressure.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from dergw.v1 import MAX_MESSAGE_BYTES, pb
from gateway.config import (
    ConfigError,
    GrpcUplinkConfig,
    MqttUplinkConfig,
    check_config_main,
    load_config,
)
from gateway.runtime.mqtt_transport import MqttTransport, up_topic_for
from gateway.runtime.transport import TransportClosedError
from headend_min.signing import SigningKey, sign_intent
from tests.mqtt_support import Mosquitto, mosquitto_binary, mosquitto_broker
from tests.support import async_wait_until, free_tcp_port, wait_until

__all__ = ["mosquitto_broker"]  # the fixture, imported for pytest

REPO = Path(__file__).resolve().parents[2]
GATEWAY = "gw-mqtt"

# -- config ---------------------------------------------------------------------------------------

BASE = """\
[gateway]
id = "gw-1"
state_dir = "state"

[site]
id = "site-a"
name = "Site A"

[uplink]
"""


def _load(tmp_path: Path, uplink: str) -> MqttUplinkConfig | GrpcUplinkConfig:
    path = tmp_path / "site.toml"
    path.write_text(BASE + uplink)
    return load_config(path).uplink


def _problems(tmp_path: Path, uplink: str) -> list[str]:
    path = tmp_path / "site.toml"
    path.write_text(BASE + uplink)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    prefix = f"{path}: "
    assert all(problem.startswith(prefix) for problem in info.value.problems)
    return [problem.removeprefix(prefix) for problem in info.value.problems]


def test_mqtt_config_defaults(tmp_path: Path) -> None:
    uplink = _load(tmp_path, 'transport = "mqtt"\nbroker = "broker.example.net:8883"\n')
    assert isinstance(uplink, MqttUplinkConfig)
    assert (uplink.transport, uplink.target) == ("mqtt", "broker.example.net:8883")
    assert (uplink.host, uplink.port) == ("broker.example.net", 8883)
    assert uplink.client_id is None  # = the gateway id
    assert uplink.session_expiry_s == 7 * 24 * 3600
    assert uplink.topic_prefix == "dergw/v1"
    assert (uplink.batch_max_records, uplink.inflight_batches, uplink.reconnect_max_s) == (
        500,
        4,
        30.0,
    )


def test_grpc_config_still_loads(tmp_path: Path) -> None:
    uplink = _load(tmp_path, 'transport = "grpc"\ntarget = "127.0.0.1:50051"\n')
    assert isinstance(uplink, GrpcUplinkConfig)
    assert (uplink.transport, uplink.target) == ("grpc", "127.0.0.1:50051")


@pytest.mark.parametrize(
    ("uplink", "expected"),
    [
        ('transport = "mqtt"\n', ["uplink.broker: required key is missing"]),
        ('transport = "amqp"\n', ["uplink.transport: Input should be 'grpc' or 'mqtt'"]),
        ('broker = "h:1"\n', ["uplink.transport: required key is missing"]),
        (
            'transport = "mqtt"\nbroker = "localhost"\n',
            ["uplink.broker: 'localhost': expected \"host:port\""],
        ),
        (
            'transport = "mqtt"\nbroker = "h:1"\nsession_expiry_s = -1\n',
            ["uplink.session_expiry_s: Input should be greater than or equal to 0"],
        ),
        (
            'transport = "mqtt"\nbroker = "h:1"\ntopic_prefix = "dergw/+/v1"\n',
            ["uplink.topic_prefix: String should match pattern"],
        ),
        (
            'transport = "mqtt"\nbroker = "h:1"\npassword = "secret"\n',
            ["uplink.password: a password needs a username"],
        ),
        (
            'transport = "mqtt"\nbroker = "h:1"\nbrokr = "h:2"\n',
            ["uplink.brokr: unknown key; did you mean 'broker'? allowed here (transport = 'mqtt')"],
        ),
        (
            # A gRPC key in an MQTT table: the hint lists the MQTT keys.
            'transport = "mqtt"\nbroker = "h:1"\ntarget = "h:2"\n',
            ["uplink.target: unknown key; allowed here (transport = 'mqtt'): transport, broker,"],
        ),
        (
            'transport = "grpc"\ntarget = "h:1"\nbroker = "h:2"\n',
            ["uplink.broker: unknown key; allowed here (transport = 'grpc'): transport, target,"],
        ),
        (
            'transport = "mqtt"\nbroker = "h:0"\nkeepalive_s = 1\n',
            [
                "uplink.broker: 'h:0': port must be a number in 1..65535",
                "uplink.keepalive_s: Input should be greater than or equal to 5",
            ],
        ),
    ],
)
def test_bad_mqtt_config_is_named(tmp_path: Path, uplink: str, expected: list[str]) -> None:
    problems = _problems(tmp_path, uplink)
    assert len(problems) == len(expected), problems
    for problem, start in zip(problems, expected, strict=True):
        assert problem.startswith(start), problem


def test_check_config_summary_names_the_broker(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "site.toml"
    path.write_text(BASE + 'transport = "mqtt"\nbroker = "127.0.0.1:1883"\n')
    assert check_config_main([str(path)]) == 0
    assert "uplink   mqtt 127.0.0.1:1883" in capsys.readouterr().out


def test_up_topics() -> None:
    assert up_topic_for(pb.UpMessage(register=pb.Register())) == "up/state"
    assert up_topic_for(pb.UpMessage(presence=pb.Presence())) == "up/state"
    assert up_topic_for(pb.UpMessage(telemetry=pb.TelemetryBatch())) == "up/telemetry"
    assert up_topic_for(pb.UpMessage(intent_ack=pb.IntentAck())) == "up/events"
    with pytest.raises(ValueError, match="no MQTT topic"):
        up_topic_for(pb.UpMessage())


# -- a raw paho client standing in for the headend -------------------------------------------------


class FakeHeadend:
    """Subscribes to every gateway's up/#; answers Register (correlated) and telemetry when
    `auto_answer`; records (topic, UpMessage, CorrelationData)."""

    def __init__(self, broker: Mosquitto, *, auto_answer: bool = True) -> None:
        self.received: list[tuple[str, pb.UpMessage, bytes | None]] = []
        self.auto_answer = auto_answer
        self.committed_seq = 0
        self.subscribes = 0
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id="fake-headend",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.reconnect_delay_set(1, 1)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert self._subscribed.wait(5), "fake headend could not subscribe"

    def _on_subscribe(self, *args: object) -> None:
        self.subscribes += 1
        self._subscribed.set()

    def _on_connect(self, client: mqtt.Client, *args: object) -> None:
        client.subscribe("dergw/v1/+/up/#", qos=1)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        up = pb.UpMessage()
        up.ParseFromString(msg.payload)
        correlation = getattr(msg.properties, "CorrelationData", None)
        with self._lock:
            self.received.append((msg.topic, up, correlation))
        if not self.auto_answer:
            return
        gateway_id = msg.topic.split("/")[2]
        if up.HasField("register"):
            answer = pb.RegisterAck(committed_seq=self.committed_seq, intent_version=1)
            down = pb.DownMessage(register_ack=answer)
            self.publish(gateway_id, "down/ack", down, correlation, wait=False)
        elif up.HasField("telemetry"):
            ack = pb.Ack(up_to_seq=up.telemetry.last_seq)
            self.publish(gateway_id, "down/ack", pb.DownMessage(ack=ack), wait=False)

    def publish(
        self,
        gateway_id: str,
        suffix: str,
        message: pb.DownMessage | bytes,
        correlation: bytes | None = None,
        *,
        wait: bool = True,  # not from a paho callback: the PUBACK comes on that same thread
    ) -> None:
        properties = None
        if correlation is not None:
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            properties.CorrelationData = correlation
        payload = message if isinstance(message, bytes) else message.SerializeToString()
        info = self.client.publish(
            f"dergw/v1/{gateway_id}/{suffix}", payload, qos=1, properties=properties
        )
        if wait:
            info.wait_for_publish(5)

    def bodies(self, kind: str | None = None) -> list[pb.UpMessage]:
        with self._lock:
            return [m for _, m, _ in self.received if kind is None or m.HasField(kind)]

    def correlations(self, kind: str) -> list[bytes | None]:
        with self._lock:
            return [c for _, m, c in self.received if m.HasField(kind)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def headend(mosquitto_broker: Mosquitto) -> Iterator[FakeHeadend]:
    fake = FakeHeadend(mosquitto_broker)
    yield fake
    fake.close()


def _transport(broker: Mosquitto, **kwargs: int | float) -> MqttTransport:
    config = MqttUplinkConfig(transport="mqtt", broker=broker.address, keepalive_s=5)
    return MqttTransport(config, gateway_id=GATEWAY, boot_id="boot-1", **kwargs)  # type: ignore[arg-type]


def _register() -> pb.UpMessage:
    return pb.UpMessage(register=pb.Register(gateway_id=GATEWAY, boot_id="boot-1"))


async def _receive(transport: MqttTransport, timeout_s: float = 5.0) -> pb.DownMessage:
    return await asyncio.wait_for(transport.receive(), timeout_s)


async def _nothing_more(transport: MqttTransport, within_s: float = 0.5) -> None:
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(transport.receive(), within_s)


# -- behaviour ------------------------------------------------------------------------------------


async def test_round_trip(mosquitto_broker: Mosquitto, headend: FakeHeadend) -> None:
    headend.committed_seq = 41
    transport = _transport(mosquitto_broker)
    assert transport.target == f"mqtt://{mosquitto_broker.address}"
    try:
        await transport.connect()
        await transport.send(_register())
        first = await _receive(transport)
        assert first.register_ack.committed_seq == 41
        batch = pb.TelemetryBatch(gateway_id=GATEWAY, first_seq=42, last_seq=43)
        batch.records.add(seq=42)
        batch.records.add(seq=43)
        await transport.send(pb.UpMessage(telemetry=batch))
        assert (await _receive(transport)).ack.up_to_seq == 43
        ack = pb.IntentAck(site_id="s", version=1, status=pb.INTENT_ACK_STATUS_PERSISTED)
        await transport.send(pb.UpMessage(intent_ack=ack))
        await async_wait_until(lambda: len(headend.bodies("intent_ack")) == 1, timeout_s=5)
    finally:
        await transport.close()
    topics = [topic for topic, _, _ in headend.received]
    assert topics[:4] == [
        f"dergw/v1/{GATEWAY}/up/state",  # Presence online
        f"dergw/v1/{GATEWAY}/up/state",  # Register
        f"dergw/v1/{GATEWAY}/up/telemetry",
        f"dergw/v1/{GATEWAY}/up/events",
    ]
    presence = headend.bodies("presence")
    assert presence[0].presence.online
    assert presence[0].presence.boot_id == "boot-1"
    # Every message carries the connection's id.
    ids = {correlation for _, _, correlation in headend.received}
    assert len(ids) == 1
    assert None not in ids
    # A clean close publishes the will: offline, same connection id.
    await async_wait_until(lambda: len(headend.bodies("presence")) == 2, timeout_s=5)
    assert not headend.bodies("presence")[1].presence.online
    assert transport.stats.published >= 3  # the last PUBACK may come after close()


async def test_receive_and_send_raise_after_close(mosquitto_broker: Mosquitto) -> None:
    transport = _transport(mosquitto_broker)
    with pytest.raises(TransportClosedError):
        await transport.receive()
    await transport.connect()
    pending = asyncio.ensure_future(transport.receive())
    await asyncio.sleep(0.1)
    await transport.close()
    with pytest.raises(TransportClosedError):
        await pending
    with pytest.raises(TransportClosedError):
        await transport.send(_register())
    await transport.close()  # idempotent


async def test_connect_fails_without_broker(tmp_path: Path) -> None:
    config = MqttUplinkConfig(transport="mqtt", broker=f"127.0.0.1:{free_tcp_port()}")
    transport = MqttTransport(config, gateway_id=GATEWAY, boot_id="b")
    with pytest.raises(ConnectionRefusedError):
        await transport.connect()
    await transport.close()


async def test_intent_published_while_offline_arrives_once(
    mosquitto_broker: Mosquitto, headend: FakeHeadend
) -> None:
    transport = _transport(mosquitto_broker)
    await transport.connect()  # creates the broker session and its subscription
    assert not transport.stats.session_present
    await transport.close()

    signed = sign_intent(
        pb.IntentDocument(site_id="site-a", version=2),
        gateway_id=GATEWAY,
        key=SigningKey.generate(),
        now_ns=time.time_ns(),
    )
    intent = pb.DownMessage(signed_intent=signed)
    headend.publish(GATEWAY, "down/intent", intent)
    # The broker keeps the queued message across a restart (persistence).
    mosquitto_broker.restart()
    headend.close()
    headend = FakeHeadend(mosquitto_broker)

    try:
        await transport.connect()
        assert transport.stats.session_present
        await transport.send(_register())
        # The answer to this connection's Register first, then what waited in the session.
        assert (await _receive(transport)).HasField("register_ack")
        received = await _receive(transport)
        assert received.signed_intent == signed
        await _nothing_more(transport)
        await transport.close()

        await transport.connect()
        await transport.send(_register())
        assert (await _receive(transport)).HasField("register_ack")
        await _nothing_more(transport)  # delivered once: not again on the next connection
    finally:
        await transport.close()
        headend.close()


async def test_answers_for_an_earlier_connection_are_dropped(
    mosquitto_broker: Mosquitto,
) -> None:
    headend = FakeHeadend(mosquitto_broker, auto_answer=False)
    transport = _transport(mosquitto_broker)
    try:
        await transport.connect()
        # Left over from an earlier connection: a stale RegisterAck and RetryAfter, an Ack.
        old = b"\x00" * 16
        stale = pb.DownMessage(register_ack=pb.RegisterAck(committed_seq=1))
        headend.publish(GATEWAY, "down/ack", stale, old)
        headend.publish(GATEWAY, "down/ack", pb.DownMessage(retry_after=pb.RetryAfter()), old)
        headend.publish(GATEWAY, "down/ack", pb.DownMessage(ack=pb.Ack(up_to_seq=5)))
        await transport.send(_register())
        await async_wait_until(lambda: len(headend.bodies("register")) == 1, timeout_s=5)
        correlation = headend.correlations("register")[0]
        assert correlation == transport.connection_id
        await _nothing_more(transport, 0.3)  # held until the answer to our Register
        answer = pb.DownMessage(register_ack=pb.RegisterAck(committed_seq=9))
        headend.publish(GATEWAY, "down/ack", answer, correlation)
        assert (await _receive(transport)).register_ack.committed_seq == 9
        assert (await _receive(transport)).ack.up_to_seq == 5
        assert transport.stats.dropped_stale_answers == 2
        # A second Register on the same connection is flagged as an update.
        await transport.send(_register())
        await async_wait_until(lambda: len(headend.bodies("register")) == 2, timeout_s=5)
    finally:
        await transport.close()
        headend.close()


async def test_oversize_and_undecodable_messages_are_dropped(
    mosquitto_broker: Mosquitto, headend: FakeHeadend
) -> None:
    transport = _transport(mosquitto_broker)
    try:
        await transport.connect()
        await transport.send(_register())
        assert (await _receive(transport)).HasField("register_ack")
        headend.publish(GATEWAY, "down/ack", b"\xff\xff\xff")
        headend.publish(GATEWAY, "down/ack", b"\x00" * (MAX_MESSAGE_BYTES + 1))
        headend.publish(GATEWAY, "down/ack", pb.DownMessage(ack=pb.Ack(up_to_seq=3)))
        assert (await _receive(transport)).ack.up_to_seq == 3
        assert transport.stats.dropped_undecodable == 1
        assert transport.stats.dropped_oversize == 1
        batch = pb.TelemetryBatch(gateway_id=GATEWAY)
        batch.records.add(seq=1).sample.device_id = "x" * (MAX_MESSAGE_BYTES + 1)
        with pytest.raises(ValueError, match="exceeds MAX_MESSAGE_BYTES"):
            await transport.send(pb.UpMessage(telemetry=batch))
    finally:
        await transport.close()


async def test_send_waits_for_room_and_keeps_order(
    mosquitto_broker: Mosquitto, headend: FakeHeadend
) -> None:
    headend.auto_answer = False
    transport = _transport(mosquitto_broker, max_unacked=2)
    try:
        await transport.connect()
        for seq in range(1, 301):
            batch = pb.TelemetryBatch(gateway_id=GATEWAY, first_seq=seq, last_seq=seq)
            await transport.send(pb.UpMessage(telemetry=batch))
        await async_wait_until(lambda: len(headend.bodies("telemetry")) == 300, timeout_s=10)
        seqs = [m.telemetry.first_seq for m in headend.bodies("telemetry")]
        assert seqs == list(range(1, 301))
    finally:
        await transport.close()


async def test_broker_loss_raises_and_a_new_connect_works(
    mosquitto_broker: Mosquitto, headend: FakeHeadend
) -> None:
    transport = _transport(mosquitto_broker)
    try:
        await transport.connect()
        pending = asyncio.ensure_future(transport.receive())
        mosquitto_broker.kill()
        with pytest.raises(TransportClosedError):
            await asyncio.wait_for(pending, 10)
        with pytest.raises(TransportClosedError):
            await transport.send(_register())
        await transport.close()
        with pytest.raises(ConnectionRefusedError):
            await transport.connect()  # broker still down
        await transport.close()

        mosquitto_broker.start()
        await async_wait_until(lambda: headend.subscribes == 2, timeout_s=10, what="resubscribe")
        await transport.connect()
        await transport.send(_register())
        await async_wait_until(lambda: len(headend.bodies("register")) == 1, timeout_s=15)
        assert (await _receive(transport, 10)).HasField("register_ack")
    finally:
        await transport.close()


_KILLED_GATEWAY = """
import asyncio, sys
from gateway.config import MqttUplinkConfig
from gateway.runtime.mqtt_transport import MqttTransport

async def main():
    config = MqttUplinkConfig(transport="mqtt", broker=sys.argv[1])
    transport = MqttTransport(config, gateway_id="gw-killed", boot_id="boot-killed")
    await transport.connect()
    print(transport.connection_id.hex(), flush=True)
    await asyncio.sleep(120)

asyncio.run(main())
"""


def test_last_will_on_kill(mosquitto_broker: Mosquitto, headend: FakeHeadend) -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", _KILLED_GATEWAY, mosquitto_broker.address],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        connection_id = bytes.fromhex(process.stdout.readline().strip())
        wait_until(lambda: len(headend.bodies("presence")) == 1, timeout_s=10, what="online")
        process.kill()
        process.wait()
        wait_until(lambda: len(headend.bodies("presence")) == 2, timeout_s=10, what="the will")
    finally:
        process.kill()
        process.wait()
    online, offline = headend.bodies("presence")
    assert online.presence.online
    assert not offline.presence.online
    assert offline.presence.boot_id == "boot-killed"
    assert headend.correlations("presence") == [connection_id, connection_id]


async def test_refused_connection_raises_connection_error(tmp_path: Path) -> None:
    # No anonymous clients and no password file: every CONNECT is refused.
    broker = Mosquitto(
        tmp_path / "closed", binary=mosquitto_binary(), extra_config="allow_anonymous false"
    )
    broker.start()
    try:
        config = MqttUplinkConfig(
            transport="mqtt", broker=broker.address, username="gw", password="wrong"
        )
        transport = MqttTransport(config, gateway_id=GATEWAY, boot_id="b")
        with pytest.raises(ConnectionError, match="refused the connection: Not authorized"):
            await transport.connect()
        await transport.close()
    finally:
        broker.kill()

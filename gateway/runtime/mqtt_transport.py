"""The uplink over MQTT v5 (paho-mqtt 2.x): `MqttTransport`, an `UplinkTransport`.

Topics (all QoS 1, prefix `<topic_prefix>/<gateway_id>/`, `topic_prefix` default "dergw/v1"):

    up/state       UpMessage(register) on every connect and on inventory changes;
                   UpMessage(presence): online=true after connecting; the last will (published by
                   the broker when the connection dies, or on a clean close) is online=false.
    up/telemetry   UpMessage(telemetry=TelemetryBatch)
    up/events      UpMessage(intent_ack) (direct acknowledgements of intents)
    down/intent    DownMessage(signed_intent=SignedIntent); queued by the broker while we are
                   offline (verified by the gateway like any intent: the broker is not trusted)
    down/ack       DownMessage(register_ack | ack | retry_after)

Payloads are serialized `dergw.v1` messages, at most `MAX_MESSAGE_BYTES` (checked before decode;
the CONNECT also tells the broker our MaximumPacketSize). Oversize or undecodable messages are
dropped, counted in `stats` and logged.

Session: client id = the gateway id (or `client_id`), `clean_start=False` and
SessionExpiryInterval = `session_expiry_s` (default 7 days), so the broker keeps the subscription
to `down/#` and queues QoS 1 messages for us while we are offline: an intent posted meanwhile is
delivered on reconnect. One paho client per `connect()` (paho's own reconnect is off; the uplink
owns retry and backoff) with the same client id, so the broker session carries over.

Each connection has a random id, sent as the MQTT v5 CorrelationData of every message and of the
will; the headend uses it as the stream id (so a late will of an old connection cannot mark a
newer one offline) and echoes it on its RegisterAck / RetryAfter. A later Register on the same
connection (inventory change) carries the user property `register=update`. Because the
persistent session may hold replies to an earlier connection, the transport shows the uplink the
same order as gRPC: nothing is returned by `receive()` until this connection's answer to its
Register (RegisterAck or RetryAfter with our correlation) has arrived; answers to earlier
connections are dropped; Acks and intents that arrive before the answer are held and returned
right after it (an Ack states what the headend committed, valid whenever it arrives; intents
apply by version).

paho runs its network loop in its own thread (`loop_start`); its callbacks hand results to the
event loop with `call_soon_threadsafe`. `send()` never blocks the event loop: at most
`max_unacked` publishes wait for the broker's PUBACK, further sends wait for room.

Broker ACLs (mosquitto): `pattern write dergw/v1/%c/up/#` and `pattern read dergw/v1/%c/down/#`
keep a gateway to its own topics (the headend checks that message ids match the topic too).

TLS (`[uplink] tls = true`): the connection is mTLS with the enrolled identity (`identity()`
per connection): the broker is trusted by the headend CA and sees our certificate, whose CN is
the gateway id; with `use_identity_as_username true` the ACLs above are written with `%u`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from google.protobuf.message import DecodeError
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from dergw.v1 import MAX_MESSAGE_BYTES, pb
from gateway.config import MqttUplinkConfig
from gateway.identity import Identity
from gateway.runtime.transport import TransportClosedError

__all__ = [
    "DOWN_ACK",
    "DOWN_INTENT",
    "MAX_PACKET_BYTES",
    "UP_EVENTS",
    "UP_STATE",
    "UP_TELEMETRY",
    "MqttTransport",
    "MqttTransportStats",
    "up_topic_for",
]

log = logging.getLogger(__name__)


class _QuietPahoFilter(logging.Filter):
    """paho logs one ERROR after every clean disconnect ("Client is not connected"): drop it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Client is not connected")


_paho_log = logging.getLogger("paho.mqtt.gateway")
_paho_log.addFilter(_QuietPahoFilter())


def _no_delay(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    """TCP_NODELAY on the broker connection (paho leaves Nagle on): a QoS 1 exchange is small
    packets both ways, and Nagle with delayed ACKs adds ~40 ms to many of them."""
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


UP_STATE = "up/state"
UP_TELEMETRY = "up/telemetry"
UP_EVENTS = "up/events"
DOWN_INTENT = "down/intent"
DOWN_ACK = "down/ack"

# Largest MQTT packet we accept: a full message plus room for topic and properties.
MAX_PACKET_BYTES = MAX_MESSAGE_BYTES + 64 * 1024

_UP_TOPICS = {
    "register": UP_STATE,
    "presence": UP_STATE,
    "telemetry": UP_TELEMETRY,
    "intent_ack": UP_EVENTS,
}
# Down messages that answer a Register (correlated with the connection that sent it).
_ANSWERS = frozenset({"register_ack", "retry_after"})


def up_topic_for(message: pb.UpMessage) -> str:
    """The topic suffix ("up/...") an up message travels on."""
    body = message.WhichOneof("body")
    topic = _UP_TOPICS.get(body or "")
    if topic is None:
        raise ValueError(f"no MQTT topic for an UpMessage with body {body!r}")
    return topic


@dataclass(slots=True)
class MqttTransportStats:
    connects: int = 0
    session_present: bool = False  # the broker still held our session at the last connect
    published: int = 0
    received: int = 0
    dropped_oversize: int = 0
    dropped_undecodable: int = 0
    dropped_stale_answers: int = 0  # RegisterAck / RetryAfter meant for an earlier connection


@dataclass(frozen=True, slots=True)
class _Closed:
    reason: str


class _Connection:
    """One paho client and what the event loop knows about it. paho's callbacks run in its
    thread and only post to the loop; all other methods run on the loop."""

    def __init__(
        self,
        transport: MqttTransport,
        loop: asyncio.AbstractEventLoop,
        client: mqtt.Client,
        connection_id: bytes,
    ) -> None:
        self.transport = transport
        self.loop = loop
        self.client = client
        self.connection_id = connection_id
        self.incoming: asyncio.Queue[pb.DownMessage | _Closed] = asyncio.Queue()
        self.held: list[pb.DownMessage] = []
        self.answered = False
        self.registered = False  # a Register was sent on this connection
        self.connected = False  # CONNACK was a success
        self.closed: str | None = None
        self.unacked = 0
        self.room = asyncio.Event()
        self.connack: asyncio.Future[tuple[bool, ReasonCode]] = loop.create_future()
        self.suback: dict[int, asyncio.Future[list[ReasonCode]]] = {}
        self.opening: asyncio.Future[None] | None = None

    # -- paho thread ----------------------------------------------------------------------------

    def _post(self, callback: Any, *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop is already closed
            self.loop.call_soon_threadsafe(callback, *args)

    def on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._post(_resolve, self.connack, (flags.session_present, reason_code))

    def on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._post(self.mark_closed, f"disconnected from the MQTT broker: {reason_code}")

    def on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        self._post(self._subscribed, mid, list(reason_codes))

    def on_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._post(self._published)

    def on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        stats = self.transport.stats
        try:
            payload = message.payload
            if len(payload) > MAX_MESSAGE_BYTES:
                stats.dropped_oversize += 1
                log.warning(
                    "mqtt: dropped a %d-byte message on %s (limit %d)",
                    len(payload),
                    message.topic,
                    MAX_MESSAGE_BYTES,
                )
                return
            down = pb.DownMessage()
            try:
                down.ParseFromString(bytes(payload))
            except DecodeError as exc:
                stats.dropped_undecodable += 1
                log.warning("mqtt: dropped an undecodable message on %s: %s", message.topic, exc)
                return
            correlation = getattr(message.properties, "CorrelationData", None)
            stats.received += 1
            self._post(self.deliver, down, correlation)
        except Exception:  # paho would end its network thread on an exception
            log.exception("mqtt: error handling a message on %s", message.topic)

    # -- event loop -----------------------------------------------------------------------------

    def _subscribed(self, mid: int, reason_codes: list[ReasonCode]) -> None:
        future = self.suback.pop(mid, None)
        if future is not None:
            _resolve(future, reason_codes)

    def _published(self) -> None:
        self.unacked = max(0, self.unacked - 1)
        self.transport.stats.published += 1
        self.room.set()

    def deliver(self, message: pb.DownMessage, correlation: bytes | None) -> None:
        if self.closed is not None:
            return
        body = message.WhichOneof("body")
        if body in _ANSWERS:
            if correlation is not None and bytes(correlation) != self.connection_id:
                self.transport.stats.dropped_stale_answers += 1
                log.debug("mqtt: dropped a %s meant for an earlier connection", body)
                return
            self.incoming.put_nowait(message)
            if not self.answered:
                self.answered = True
                for held in self.held:
                    self.incoming.put_nowait(held)
                self.held.clear()
        elif self.answered:
            self.incoming.put_nowait(message)
        else:
            self.held.append(message)

    def mark_closed(self, reason: str) -> None:
        if self.closed is not None:
            return
        self.closed = reason
        self.held.clear()
        self.incoming.put_nowait(_Closed(reason))
        self.room.set()
        _fail(self.connack, ConnectionError(reason))
        for future in self.suback.values():
            _fail(future, ConnectionError(reason))


def _resolve(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _fail(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
        future.exception()  # whoever awaits it gets the error; nobody awaiting is no error


class MqttTransport:
    """`UplinkTransport` over MQTT v5; see the module docstring for topics and semantics."""

    name = "mqtt"

    def __init__(
        self,
        config: MqttUplinkConfig,
        *,
        gateway_id: str,
        boot_id: str,
        connect_timeout_s: float = 10.0,
        max_unacked: int = 32,
        identity: Callable[[], Identity] | None = None,
    ) -> None:
        self.config = config
        self.gateway_id = gateway_id
        self.boot_id = boot_id
        self._identity = identity  # None: plaintext (local development)
        self.target = f"{'mqtts' if identity is not None else 'mqtt'}://{config.broker}"
        self.client_id = config.client_id or gateway_id
        self.topic_prefix = f"{config.topic_prefix}/{gateway_id}"
        self.connect_timeout_s = connect_timeout_s
        self.max_unacked = max_unacked
        self.stats = MqttTransportStats()
        self._conn: _Connection | None = None

    def topic(self, suffix: str) -> str:
        return f"{self.topic_prefix}/{suffix}"

    @property
    def connection_id(self) -> bytes | None:
        """CorrelationData of the current connection (None when not connected)."""
        return None if self._conn is None else self._conn.connection_id

    def _presence(self, online: bool) -> bytes:
        message = pb.UpMessage(presence=pb.Presence(online=online, boot_id=self.boot_id))
        return message.SerializeToString()

    def _correlated(self, packet_type: int, connection_id: bytes) -> Properties:
        properties = Properties(packet_type)  # type: ignore[no-untyped-call]
        properties.CorrelationData = connection_id
        return properties

    async def connect(self) -> None:
        await self.close()
        loop = asyncio.get_running_loop()
        connection_id = uuid.uuid4().bytes
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
            reconnect_on_failure=False,
        )
        conn = _Connection(self, loop, client, connection_id)
        self._conn = conn
        client.enable_logger(_paho_log)
        client.connect_timeout = self.connect_timeout_s
        client.max_inflight_messages_set(self.max_unacked)
        client.max_queued_messages_set(0)
        if self.config.username is not None:
            client.username_pw_set(self.config.username, self.config.password)
        if self._identity is not None:
            # Hostname checked against the broker's certificate (the config's host).
            client.tls_set_context(self._identity().ssl_context())
        client.will_set(
            self.topic(UP_STATE),
            self._presence(False),
            qos=1,
            retain=False,
            properties=self._correlated(PacketTypes.WILLMESSAGE, connection_id),
        )
        client.on_connect = conn.on_connect
        client.on_disconnect = conn.on_disconnect
        client.on_subscribe = conn.on_subscribe
        client.on_publish = conn.on_publish
        client.on_message = conn.on_message
        client.on_socket_open = _no_delay
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = self.config.session_expiry_s
        properties.MaximumPacketSize = MAX_PACKET_BYTES

        def open_connection() -> None:
            client.connect(
                self.config.host,
                self.config.port,
                keepalive=self.config.keepalive_s,
                clean_start=False,
                properties=properties,
            )
            client.loop_start()

        # Not cancelled with connect(): close() waits for it, so no client is left running.
        conn.opening = asyncio.ensure_future(asyncio.to_thread(open_connection))
        async with asyncio.timeout(self.connect_timeout_s):
            await asyncio.shield(conn.opening)
            session_present, reason_code = await conn.connack
        if reason_code.is_failure:
            raise ConnectionError(
                f"MQTT broker {self.target} refused the connection: {reason_code}"
            )
        conn.connected = True
        self.stats.connects += 1
        self.stats.session_present = session_present
        # Re-subscribing is idempotent and covers a session the broker lost or let expire.
        result, mid = client.subscribe(self.topic("down/#"), options=SubscribeOptions(qos=1))
        if result != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise TransportClosedError(f"MQTT subscribe failed: {mqtt.error_string(result)}")
        # Registered before the SUBACK can be handled: paho's callback only posts to this loop.
        suback = conn.suback[mid] = loop.create_future()
        async with asyncio.timeout(self.connect_timeout_s):
            reason_codes = await suback
        failed = [str(code) for code in reason_codes if code.is_failure]
        if failed:
            raise ConnectionError(f"MQTT broker {self.target} refused our subscription: {failed}")
        await self._publish(conn, UP_STATE, self._presence(True))
        log.info(
            "mqtt: connected to %s as %s (session %s)",
            self.target,
            self.client_id,
            "resumed" if session_present else "new",
        )

    def _require(self) -> _Connection:
        conn = self._conn
        if conn is None:
            raise TransportClosedError("MQTT transport is not connected")
        if conn.closed is not None:
            raise TransportClosedError(conn.closed)
        return conn

    async def _publish(
        self, conn: _Connection, suffix: str, payload: bytes, *, update: bool = False
    ) -> None:
        while conn.unacked >= self.max_unacked and conn.closed is None:
            conn.room.clear()
            await conn.room.wait()
        if conn.closed is not None:
            raise TransportClosedError(conn.closed)
        properties = self._correlated(PacketTypes.PUBLISH, conn.connection_id)
        if update:
            properties.UserProperty = [("register", "update")]
        info = conn.client.publish(self.topic(suffix), payload, qos=1, properties=properties)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            conn.mark_closed(f"MQTT publish failed: {mqtt.error_string(info.rc)}")
            raise TransportClosedError(conn.closed or "")
        conn.unacked += 1

    async def send(self, message: pb.UpMessage) -> None:
        conn = self._require()
        suffix = up_topic_for(message)
        payload = message.SerializeToString()
        if len(payload) > MAX_MESSAGE_BYTES:
            raise ValueError(
                f"an UpMessage of {len(payload)} bytes exceeds MAX_MESSAGE_BYTES "
                f"({MAX_MESSAGE_BYTES}); send smaller batches"
            )
        # A second Register on one connection updates the inventory (not a new session).
        update = message.HasField("register") and conn.registered
        await self._publish(conn, suffix, payload, update=update)
        if message.HasField("register"):
            conn.registered = True

    async def receive(self) -> pb.DownMessage:
        conn = self._conn
        if conn is None:
            raise TransportClosedError("MQTT transport is not connected")
        item = await conn.incoming.get()
        if isinstance(item, _Closed):
            conn.incoming.put_nowait(item)  # every later receive() raises too
            raise TransportClosedError(item.reason)
        return item

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        was_open = conn.connected and conn.closed is None
        conn.mark_closed("MQTT transport closed")
        if conn.opening is not None:
            await asyncio.wait({conn.opening}, timeout=self.connect_timeout_s)
            if conn.opening.done() and not conn.opening.cancelled():
                conn.opening.exception()  # retrieved: a failed connect was already reported
        client = conn.client
        if was_open:
            # "Disconnect with will message": the broker publishes our Presence(online=false).
            client.disconnect(reasoncode=ReasonCode(PacketTypes.DISCONNECT, identifier=4))
        else:
            client.disconnect()
        stopping = asyncio.ensure_future(asyncio.to_thread(client.loop_stop))
        done, _ = await asyncio.wait({stopping}, timeout=5.0)
        if not done:
            log.warning("mqtt: the network thread of %s did not stop within 5 s", self.target)

"""The gateway link over MQTT v5: `MqttLink`, the headend's client of the broker (paho-mqtt 2.x).

Topics (all QoS 1, payloads serialized `dergw.v1` messages, prefix `dergw/v1/<gateway_id>/`):

    up/state       UpMessage(register): admitted and stored, answered on down/ack with a
                   RegisterAck (or a RetryAfter), then the site's newest intent on down/intent
                   when the gateway holds an older version;
                   UpMessage(presence): online=false (the gateway's last will, or its clean
                   close) closes the stream in the store.
    up/telemetry   UpMessage(telemetry): committed, then Ack on down/ack.
    up/events      UpMessage(intent_ack): recorded.
    down/intent    DownMessage(signed_intent): `publish_intent()` and the register path, signed
                   for that gateway when published; the broker queues it in the gateway's
                   persistent session while the gateway is offline (its accept-by time bounds
                   how long a queued copy stays acceptable).
    down/ack       DownMessage(register_ack | ack | retry_after)

The gateway sends the MQTT v5 CorrelationData of its connection (random per connection) on
every message and its last will: the stream id is derived from it, so a late will of an old
connection cannot close a newer one; it is echoed on the RegisterAck / RetryAfter so the gateway
can drop answers meant for an earlier connection. A Register with the user property
`register=update` re-registers on the same connection (inventory change; not admission
controlled).

Several headend instances share the load with one shared subscription,
`$share/<share_group>/dergw/v1/+/up/#`: the broker hands each message to one of them. They keep
no session state between messages (everything is in the store), so consecutive messages of a
gateway may be handled by different instances. Within one instance messages are handled
concurrently across gateways and in order per gateway. Flow control: messages are PUBACKed
(manual acks, in arrival order) only once handled, and the CONNECT's ReceiveMaximum =
`max_pending`, so the broker holds back the rest while that many are in hand; paho's network
thread never blocks.

Every received payload is bounded by `MAX_MESSAGE_BYTES` before decode; oversize, undecodable
or misaddressed messages (topic gateway id different from the message's) are dropped, counted in
`stats` and logged. A storage error or a protocol violation is answered with a RetryAfter to
that connection (as the gRPC link ends the stream): the gateway reconnects later and resends
what was not acknowledged.

The headend's own connection: `clean_start=True` (a shared subscription needs no persistent
session), paho reconnects with backoff (`reconnect_min_s`..`reconnect_max_s`) when the broker
goes away and the subscription is renewed on every connect. `stop()` unsubscribes first and
finishes the messages in hand, so a rolling restart hands the load to the other instances.

TLS (`tls=MqttTls(ca, cert, key)`): the connection verifies the broker against the headend CA and
presents the headend's client certificate (CN=headend), which the broker maps to the username
its ACL grants the headend's topics (mosquitto: `require_certificate true`,
`use_identity_as_username true`).

Latency: both clients set TCP_NODELAY; set `set_tcp_nodelay true` on mosquitto as well (without
these, Nagle and delayed ACKs took a telemetry round trip from 7.5 ms to 85 ms in
bench/mqtt_round_trip.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import threading
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from google.protobuf.message import DecodeError
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from dergw.v1 import MAX_ID_LENGTH, MAX_MESSAGE_BYTES, pb
from headend_min.clock import Clock, SystemClock
from headend_min.ingest import ProtocolViolation
from headend_min.model import StreamRef
from headend_min.notify import IntentSubscription, Notifier
from headend_min.session import GatewaySessions
from headend_min.store import StoreError

__all__ = [
    "MAX_PACKET_BYTES",
    "MqttIntentNotifier",
    "MqttLink",
    "MqttLinkStats",
    "MqttTls",
    "stream_ref",
]

_log = logging.getLogger(__name__)

UP_STATE = "up/state"
UP_TELEMETRY = "up/telemetry"
UP_EVENTS = "up/events"
DOWN_INTENT = "down/intent"
DOWN_ACK = "down/ack"
# Largest MQTT packet accepted: a full message plus room for topic and properties.
MAX_PACKET_BYTES = MAX_MESSAGE_BYTES + 64 * 1024
# What each up topic may carry.
_BODIES = {
    UP_STATE: frozenset({"register", "presence"}),
    UP_TELEMETRY: frozenset({"telemetry"}),
    UP_EVENTS: frozenset({"intent_ack"}),
}
# Seconds a gateway waits after a storage error / a protocol violation before reconnecting.
STORE_ERROR_RETRY_S = 5
PROTOCOL_VIOLATION_RETRY_S = 30
# A revoked gateway is told to come back much later (it cannot recover without re-enrolling).
REVOKED_RETRY_S = 600
# How long a gateway's "holds a valid certificate" answer is reused (revocation takes effect
# within this, like a gRPC stream ended by the presence loop).
ADMISSION_CACHE_S = 5.0


class _QuietPahoFilter(logging.Filter):
    """paho logs one ERROR after every clean disconnect ("Client is not connected"): drop it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Client is not connected")


_paho_log = logging.getLogger("paho.mqtt.headend")
_paho_log.addFilter(_QuietPahoFilter())


def _no_delay(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    """TCP_NODELAY on the broker connection (paho leaves Nagle on): a QoS 1 exchange is small
    packets both ways, and Nagle with delayed ACKs adds ~40 ms to many of them."""
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def stream_ref(gateway_id: str, correlation: bytes | None, boot_id: str = "") -> StreamRef:
    """The stream of one MQTT connection of a gateway (from its CorrelationData)."""
    if correlation:
        return StreamRef(gateway_id, f"mqtt-{bytes(correlation).hex()}")
    return StreamRef(gateway_id, f"mqtt-boot-{boot_id}")


@dataclass(frozen=True, slots=True)
class MqttTls:
    """PEM files of a TLS connection with a client certificate."""

    ca: Path  # the CA the broker's certificate must chain to
    cert: Path
    key: Path

    def context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca))
        context.load_cert_chain(str(self.cert), str(self.key))
        return context


@dataclass(slots=True)
class MqttLinkStats:
    connects: int = 0
    received: dict[str, int] = field(default_factory=dict)  # by message body
    published: int = 0
    batches_acked: int = 0
    dropped_oversize: int = 0
    dropped_undecodable: int = 0
    dropped_misaddressed: int = 0
    protocol_violations: int = 0
    store_errors: int = 0
    refused_revoked: int = 0  # messages of gateways without a valid certificate (refused)


@dataclass(slots=True)
class _Receipt:
    """A received QoS 1 message that still owes its PUBACK."""

    mid: int
    qos: int
    generation: int  # which connection received it
    done: bool = False


@dataclass(frozen=True, slots=True)
class _Incoming:
    gateway_id: str
    suffix: str
    message: pb.UpMessage
    correlation: bytes | None
    update: bool  # a Register with user property register=update
    receipt: _Receipt


def _resolve(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


class MqttLink:
    def __init__(
        self,
        sessions: GatewaySessions,
        broker_host: str,
        broker_port: int,
        *,
        share_group: str = "dergw-headend",
        client_id: str | None = None,
        topic_prefix: str = "dergw/v1",
        username: str | None = None,
        password: str | None = None,
        keepalive_s: int = 20,
        presence_interval_s: float = 10.0,
        max_pending: int = 1000,
        reconnect_min_s: int = 1,
        reconnect_max_s: int = 30,
        clock: Clock | None = None,
        tls: MqttTls | None = None,
        admitted: Callable[[str], Awaitable[bool]] | None = None,
    ) -> None:
        self.sessions = sessions
        self.tls = tls
        # With TLS: does the gateway still hold a valid certificate? The broker authenticates
        # the certificate but knows nothing of revocations, so the link refuses a revoked
        # gateway's messages itself (answers kept for a few seconds, not a query per message).
        self._admitted = admitted
        self._admission_cache: dict[str, tuple[bool, float]] = {}
        self.clock: Clock = clock or SystemClock()
        self.broker_host = broker_host
        self.broker_port = broker_port
        self.share_group = share_group
        self.client_id = client_id or f"dergw-headend-{uuid.uuid4().hex[:12]}"
        self.topic_prefix = topic_prefix
        self.subscription = f"$share/{share_group}/{topic_prefix}/+/up/#"
        self.keepalive_s = keepalive_s
        self.presence_interval_s = presence_interval_s
        self.stats = MqttLinkStats()
        self._username = username
        self._password = password
        self._reconnect = (reconnect_min_s, reconnect_max_s)
        if not 1 <= max_pending <= 65535:
            raise ValueError("max_pending must be 1..65535 (MQTT ReceiveMaximum)")
        self.max_pending = max_pending
        # Received messages in arrival order, PUBACKed once handled (manual acks).
        self._receipts: deque[_Receipt] = deque()
        self._generation = 0  # connections so far (paho thread)
        self._acking_generation = 0  # the connection PUBACKs go to (event loop)
        self._stopping = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: mqtt.Client | None = None
        self._subscribed: asyncio.Event | None = None
        self._connected = False
        self._suback_mids: set[int] = set()
        self._puback: dict[int, asyncio.Future[None]] = {}
        # Per gateway: messages waiting, and the task draining them (in order).
        self._queues: dict[str, deque[_Incoming]] = {}
        self._workers: dict[str, asyncio.Task[None]] = {}
        # Streams that sent something since the last presence refresh.
        self._active: dict[str, StreamRef] = {}
        # Site of each gateway seen registering here (intent acks need it).
        self._sites: dict[str, str] = {}
        self._presence_task: asyncio.Task[None] | None = None

    @property
    def target(self) -> str:
        return f"mqtt://{self.broker_host}:{self.broker_port}"

    @property
    def connected(self) -> bool:
        return self._connected

    def topic(self, gateway_id: str, suffix: str) -> str:
        return f"{self.topic_prefix}/{gateway_id}/{suffix}"

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self, *, timeout_s: float = 10.0) -> None:
        """Connect and subscribe; raises ConnectionError when the broker is not reachable
        within `timeout_s`. Afterwards paho reconnects on its own whenever the broker goes."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._subscribed = asyncio.Event()
        self._stopping.clear()
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
            manual_ack=True,
        )
        self._client = client
        client.enable_logger(_paho_log)
        client.reconnect_delay_set(*self._reconnect)
        client.max_inflight_messages_set(1000)
        client.max_queued_messages_set(0)
        if self._username is not None:
            client.username_pw_set(self._username, self._password)
        if self.tls is not None:
            try:
                client.tls_set_context(self.tls.context())
            except (OSError, ssl.SSLError) as exc:
                raise ConnectionError(f"MQTT TLS files unusable: {exc}") from exc
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.on_socket_open = _no_delay
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.MaximumPacketSize = MAX_PACKET_BYTES
        properties.ReceiveMaximum = self.max_pending
        client.connect_async(
            self.broker_host,
            self.broker_port,
            keepalive=self.keepalive_s,
            clean_start=True,
            properties=properties,
        )
        client.loop_start()
        try:
            async with asyncio.timeout(timeout_s):
                await self._subscribed.wait()
        except TimeoutError:
            await self.stop()
            raise ConnectionError(
                f"MQTT broker {self.target} not reachable (or refused the subscription) "
                f"within {timeout_s:g} s"
            ) from None
        self._presence_task = asyncio.create_task(self._run_presence())
        _log.info("mqtt link: subscribed to %s at %s", self.subscription, self.target)

    async def stop(self, *, grace_s: float = 2.0) -> None:
        """Unsubscribe (the broker then hands new messages to the other instances), finish what
        is in hand for up to `grace_s`, then disconnect."""
        client = self._client
        if client is not None and self._connected and not self._stopping.is_set():
            client.unsubscribe(self.subscription)
            deadline = asyncio.get_running_loop().time() + grace_s
            while self._workers and asyncio.get_running_loop().time() < deadline:
                await asyncio.wait(
                    list(self._workers.values()),
                    timeout=max(0.0, deadline - asyncio.get_running_loop().time()),
                )
        self._stopping.set()
        if self._presence_task is not None:
            self._presence_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._presence_task
            self._presence_task = None
        client, self._client = self._client, None
        if client is not None:
            client.disconnect()
            stopping = asyncio.ensure_future(asyncio.to_thread(client.loop_stop))
            await asyncio.wait({stopping}, timeout=5.0)
        workers = list(self._workers.values())
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        self._workers.clear()
        self._queues.clear()
        for future in self._puback.values():
            future.cancel()
        self._puback.clear()
        self._connected = False

    async def __aenter__(self) -> MqttLink:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- paho thread ----------------------------------------------------------------------------

    def _post(self, callback: Any, *args: Any) -> bool:
        loop = self._loop
        if loop is None:
            return False
        try:
            loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the event loop is closed
            return False
        return True

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            _log.warning(
                "mqtt link: broker %s refused the connection: %s", self.target, reason_code
            )
            return
        self._generation += 1
        self._post(self._reset_receipts, self._generation)
        # clean_start=True: the subscription is renewed on every (re)connect.
        result, mid = client.subscribe(self.subscription, options=SubscribeOptions(qos=1))
        if result == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
            self._suback_mids.add(mid)
        self._post(self._set_connected, True)

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if not self._stopping.is_set():
            _log.warning(
                "mqtt link: lost the broker %s (%s); reconnecting", self.target, reason_code
            )
        self._post(self._set_connected, False)

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        if mid not in self._suback_mids:
            return
        self._suback_mids.discard(mid)
        failed = [str(code) for code in reason_codes if code.is_failure]
        if failed:
            _log.error(
                "mqtt link: broker refused the subscription %s: %s", self.subscription, failed
            )
            return
        self._post(self._on_subscribed)

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._post(self._published, mid)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        receipt = _Receipt(message.mid, message.qos, self._generation)
        incoming = None
        try:
            incoming = self._parse(message, receipt)
        except Exception:  # paho would end its network thread on an exception
            _log.exception("mqtt link: error receiving a message on %s", message.topic)
        # Always posted, also when dropped: PUBACKs go out in arrival order.
        self._post(self._received, receipt, incoming)

    def _parse(self, message: mqtt.MQTTMessage, receipt: _Receipt) -> _Incoming | None:
        topic = message.topic
        prefix = f"{self.topic_prefix}/"
        rest = topic[len(prefix) :] if topic.startswith(prefix) else ""
        gateway_id, _, suffix = rest.partition("/")
        if not gateway_id or len(gateway_id) > MAX_ID_LENGTH or suffix not in _BODIES:
            self.stats.dropped_misaddressed += 1
            _log.warning("mqtt link: dropped a message on unexpected topic %r", topic)
            return None
        payload = message.payload
        if len(payload) > MAX_MESSAGE_BYTES:
            self.stats.dropped_oversize += 1
            _log.warning(
                "mqtt link: dropped a %d-byte message on %s (limit %d)",
                len(payload),
                topic,
                MAX_MESSAGE_BYTES,
            )
            return None
        up = pb.UpMessage()
        try:
            up.ParseFromString(bytes(payload))
        except DecodeError as exc:
            self.stats.dropped_undecodable += 1
            _log.warning("mqtt link: dropped an undecodable message on %s: %s", topic, exc)
            return None
        properties = message.properties
        correlation = getattr(properties, "CorrelationData", None)
        user = getattr(properties, "UserProperty", None) or []
        update = ("register", "update") in [tuple(pair) for pair in user]
        return _Incoming(
            gateway_id, suffix, up, bytes(correlation) if correlation else None, update, receipt
        )

    # -- event loop -----------------------------------------------------------------------------

    def _set_connected(self, connected: bool) -> None:
        if connected and not self._connected:
            self.stats.connects += 1
        self._connected = connected

    def _on_subscribed(self) -> None:
        if self._subscribed is not None:
            self._subscribed.set()

    def _published(self, mid: int) -> None:
        self.stats.published += 1
        future = self._puback.pop(mid, None)
        if future is not None:
            _resolve(future, None)

    def _reset_receipts(self, generation: int) -> None:
        """A new connection (clean start): PUBACKs owed on the old one are void."""
        self._receipts.clear()
        self._acking_generation = generation

    def _received(self, receipt: _Receipt, incoming: _Incoming | None) -> None:
        if self._stopping.is_set() or receipt.generation != self._acking_generation:
            return
        self._receipts.append(receipt)
        if incoming is None:
            self._done(receipt)
        else:
            self._enqueue(incoming)

    def _done(self, receipt: _Receipt) -> None:
        """Handled: PUBACK it and every earlier handled message, in arrival order. Until then
        the broker counts it against our ReceiveMaximum (`max_pending`): flow control."""
        receipt.done = True
        client = self._client
        while self._receipts and self._receipts[0].done:
            head = self._receipts.popleft()
            if client is not None and head.generation == self._acking_generation:
                client.ack(head.mid, head.qos)

    def _enqueue(self, incoming: _Incoming) -> None:
        gateway_id = incoming.gateway_id
        queue = self._queues.setdefault(gateway_id, deque())
        queue.append(incoming)
        if gateway_id not in self._workers:
            self._workers[gateway_id] = asyncio.create_task(
                self._drain(gateway_id, queue), name=f"mqtt {gateway_id}"
            )

    async def _drain(self, gateway_id: str, queue: deque[_Incoming]) -> None:
        """Handle one gateway's messages in order; ends when its queue is empty."""
        try:
            while queue:
                incoming = queue.popleft()
                try:
                    await self._handle(incoming)
                except Exception:
                    # Task boundary: log and go on with the next message.
                    _log.exception("mqtt link: error handling a message of %s", gateway_id)
                finally:
                    self._done(incoming.receipt)
        finally:
            if self._workers.get(gateway_id) is asyncio.current_task():
                del self._workers[gateway_id]
            if not queue:
                self._queues.pop(gateway_id, None)
            elif not self._stopping.is_set():  # cancelled with messages left: restart
                self._workers[gateway_id] = asyncio.create_task(self._drain(gateway_id, queue))

    async def _handle(self, incoming: _Incoming) -> None:
        body = incoming.message.WhichOneof("body") or ""
        self.stats.received[body] = self.stats.received.get(body, 0) + 1
        gateway_id = incoming.gateway_id
        if body not in _BODIES[incoming.suffix]:
            self.stats.dropped_misaddressed += 1
            _log.warning(
                "mqtt link: dropped %r from %s on %s",
                body or "an empty message",
                gateway_id,
                incoming.suffix,
            )
            return
        stream = stream_ref(gateway_id, incoming.correlation)
        # An offline presence (the broker's will) always counts: it is how a refused gateway
        # that disconnects shows offline.
        offline = body == "presence" and not incoming.message.presence.online
        if not offline and not await self._still_admitted(gateway_id):
            self.stats.refused_revoked += 1
            _log.warning("mqtt link: refused %s from %s: no valid certificate", body, gateway_id)
            await self._retry_after(
                incoming,
                REVOKED_RETRY_S,
                "revoked: this gateway holds no valid certificate; an admin must issue a new "
                "enrollment token",
            )
            return
        if body != "presence":
            self._active[gateway_id] = stream
        try:
            if body == "register":
                await self._register(incoming, stream)
            elif body == "presence":
                await self._presence(incoming)
            elif body == "telemetry":
                await self._telemetry(incoming)
            elif body == "intent_ack":
                await self._intent_ack(incoming)
        except ProtocolViolation as exc:
            self.stats.protocol_violations += 1
            _log.warning("mqtt link: protocol violation by %s: %s", gateway_id, exc)
            await self._retry_after(incoming, PROTOCOL_VIOLATION_RETRY_S, f"protocol: {exc}")
        except StoreError:
            self.stats.store_errors += 1
            _log.exception("mqtt link: storage failed for gateway %s", gateway_id)
            await self._retry_after(
                incoming, STORE_ERROR_RETRY_S, "headend storage error; resend unacked records"
            )

    async def _register(self, incoming: _Incoming, stream: StreamRef) -> None:
        registration = self.sessions.parse_register(incoming.message.register)
        gateway_id = incoming.gateway_id
        if registration.gateway_id != gateway_id:
            raise ProtocolViolation(
                f"Register of gateway {registration.gateway_id!r} on the topic of {gateway_id!r}"
            )
        result = await self.sessions.register(registration, stream, new_session=not incoming.update)
        for reply in result.replies:
            await self.publish(gateway_id, DOWN_ACK, reply, correlation=incoming.correlation)
        outcome = result.outcome
        if outcome is None:
            return  # RetryAfter: not admitted now
        site_id = registration.site.site_id
        self._sites[gateway_id] = site_id
        _log.info(
            "gateway %s (site %s) registered over MQTT: committed_seq=%d, holds v%d, latest v%d",
            gateway_id,
            site_id,
            outcome.committed_seq,
            registration.intent_version,
            outcome.site_intent_version,
        )
        if outcome.site_intent_version > registration.intent_version:
            document = await self.sessions.latest_intent_after(site_id, registration.intent_version)
            if document is not None:
                await self._send_intent(gateway_id, document)

    async def _presence(self, incoming: _Incoming) -> None:
        presence = incoming.message.presence
        if presence.online:
            return  # the Register that follows opens the stream
        stream = stream_ref(incoming.gateway_id, incoming.correlation, presence.boot_id)
        self._active.pop(incoming.gateway_id, None)
        await self.sessions.close_stream(stream)

    async def _telemetry(self, incoming: _Incoming) -> None:
        batch = incoming.message.telemetry
        if batch.gateway_id and batch.gateway_id != incoming.gateway_id:
            raise ProtocolViolation(
                f"telemetry of gateway {batch.gateway_id!r} on the topic of {incoming.gateway_id!r}"
            )
        ack = await self.sessions.telemetry(incoming.gateway_id, batch)
        await self.publish(incoming.gateway_id, DOWN_ACK, ack, wait=False)
        self.stats.batches_acked += 1

    async def _intent_ack(self, incoming: _Incoming) -> None:
        gateway_id = incoming.gateway_id
        site_id = self._sites.get(gateway_id)
        if site_id is None:
            record = await self.sessions.store.get_gateway(gateway_id)
            if record is None:
                raise ProtocolViolation(f"intent_ack from unregistered gateway {gateway_id!r}")
            site_id = self._sites[gateway_id] = record.site_id
        await self.sessions.intent_ack(gateway_id, site_id, incoming.message.intent_ack)

    async def _still_admitted(self, gateway_id: str) -> bool:
        if self._admitted is None:
            return True
        now = time.monotonic()
        cached = self._admission_cache.get(gateway_id)
        if cached is not None and cached[1] > now:
            return cached[0]
        verdict = await self._admitted(gateway_id)
        self._admission_cache[gateway_id] = (verdict, now + ADMISSION_CACHE_S)
        return verdict

    async def _retry_after(self, incoming: _Incoming, seconds: int, reason: str) -> None:
        message = pb.DownMessage(retry_after=pb.RetryAfter(seconds=seconds, reason=reason[:200]))
        with contextlib.suppress(ConnectionError):
            await self.publish(
                incoming.gateway_id, DOWN_ACK, message, correlation=incoming.correlation, wait=False
            )

    async def _send_intent(self, gateway_id: str, document: pb.IntentDocument) -> None:
        message = self.sessions.intent_message(gateway_id, document)
        await self.publish(gateway_id, DOWN_INTENT, message)
        await self.sessions.record_delivery(gateway_id, document)

    async def _run_presence(self) -> None:
        """Refresh last_seen of the streams that sent something since the last refresh."""
        while True:
            await asyncio.sleep(self.presence_interval_s)
            streams, self._active = list(self._active.values()), {}
            if not streams:
                continue
            try:
                await self.sessions.store.touch_streams(streams, self.clock.wall_ns())
            except StoreError:
                _log.exception("mqtt link: presence refresh failed for %d streams", len(streams))

    # -- publishing -----------------------------------------------------------------------------

    async def publish(
        self,
        gateway_id: str,
        suffix: str,
        message: pb.DownMessage,
        *,
        correlation: bytes | None = None,
        wait: bool = True,
        timeout_s: float = 10.0,
    ) -> None:
        """Publish one down message (QoS 1). With `wait`, return once the broker has it
        (PUBACK): then it is queued for the gateway even while the gateway is offline.
        Raises ConnectionError when the broker is not connected or does not confirm in time."""
        client = self._client
        if client is None or self._loop is None:
            raise ConnectionError("the MQTT link is not started")
        properties = None
        if correlation is not None:
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            properties.CorrelationData = correlation
        info = client.publish(
            self.topic(gateway_id, suffix),
            message.SerializeToString(),
            qos=1,
            properties=properties,
        )
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise ConnectionError(f"MQTT publish failed: {mqtt.error_string(info.rc)}")
        # NO_CONN: paho keeps the message and sends it once reconnected.
        if not wait:
            return
        # Registered before the PUBACK can be handled: paho's callback only posts to this loop.
        future = self._puback[info.mid] = self._loop.create_future()
        try:
            async with asyncio.timeout(timeout_s):
                await future
        except TimeoutError:
            raise ConnectionError(
                f"MQTT broker {self.target} did not confirm a publish within {timeout_s:g} s"
            ) from None
        finally:
            self._puback.pop(info.mid, None)

    async def publish_intent(self, site_id: str, version: int = 0) -> int:
        """Publish the site's newest intent document (if at least `version`) to the down/intent
        topic of each gateway of the site that does not hold it yet. The broker queues it for
        gateways that are offline (persistent sessions). Returns how many were published to."""
        document = await self.sessions.latest_intent_after(site_id, max(0, version - 1))
        if document is None:
            return 0
        sent = 0
        for gateway in await self.sessions.store.list_gateways(site_id):
            if gateway.intent_version >= document.version:
                continue
            await self._send_intent(gateway.gateway_id, document)
            sent += 1
        return sent


class MqttIntentNotifier:
    """A `Notifier` that also publishes each posted intent to the site's MQTT gateways.

    Wraps the headend's notifier for the HTTP API only: `publish` runs in the instance that took
    the post, so each version goes out over MQTT once, whatever the number of instances (the
    wrapped notifier still wakes gRPC streams in every instance). A broker failure is logged,
    not raised: the intent is stored, and a gateway gets it with its next RegisterAck.
    """

    def __init__(self, inner: Notifier, link: MqttLink) -> None:
        self.inner = inner
        self.link = link

    async def publish(self, site_id: str, version: int) -> None:
        await self.inner.publish(site_id, version)
        try:
            await self.link.publish_intent(site_id, version)
        except (ConnectionError, StoreError) as exc:
            _log.warning(
                "mqtt link: could not publish v%d of site %s now (%s); gateways get it when "
                "they next register",
                version,
                site_id,
                exc,
            )

    def subscribe(self, site_id: str) -> AbstractAsyncContextManager[IntentSubscription]:
        return self.inner.subscribe(site_id)

    async def close(self) -> None:
        await self.inner.close()

"""The uplink's session rules, against a scripted in-memory transport (the real transports have
their own tests: gRPC end to end in tests/e2e and below, MQTT against mosquitto in
test_mqtt_transport.py).

* the live lane is never starved: with the backlog lane's window full and unacknowledged, a new
  live record still goes out at once;
* acks by range delete exactly the acked rows, the watermark deletes the rest;
* a RetryAfter ends the session, and the next attempt waits at least that long;
* the gRPC transport (grpclib) against a grpcio server like the headend's: messages both ways,
  a refusal's status and details, messages above MAX_MESSAGE_BYTES refused both ways (an
  incoming one before its body is read), a dead target.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from dergw.v1 import MAX_MESSAGE_BYTES, pb
from dergw.v1.dergw_pb2_grpc import GatewayLinkServicer, add_GatewayLinkServicer_to_server
from gateway.clock import SystemClock
from gateway.config import GrpcUplinkConfig
from gateway.outbox import Outbox, RecordKind
from gateway.runtime.grpc_transport import GrpcTransport
from gateway.runtime.recorder import Recorder
from gateway.runtime.transport import TransportClosedError
from gateway.runtime.uplink import Uplink

SAMPLE = int(RecordKind.SAMPLE)


def _sample(i: int) -> bytes:
    return pb.DeviceSample(device_id="pv1", names=["W"], values=[float(i)]).SerializeToString()


class ScriptedTransport:
    """Answers Register with `first_answers` (one per session, then RegisterAck), records
    every TelemetryBatch, and acks nothing unless the test puts an Ack in `down`."""

    name = "fake"
    target = "memory"

    def __init__(self, first_answers: list[pb.DownMessage] | None = None) -> None:
        self.first_answers = list(first_answers or [])
        self.batches: list[pb.TelemetryBatch] = []
        self.intent_acks: list[pb.IntentAck] = []
        self.down: asyncio.Queue[pb.DownMessage] = asyncio.Queue()
        self.connects: list[float] = []
        self._open = False

    async def connect(self) -> None:
        self._open = True
        self.connects.append(time.monotonic())

    async def send(self, message: pb.UpMessage) -> None:
        if not self._open:
            raise TransportClosedError("closed")
        if message.HasField("register"):
            answer = (
                self.first_answers.pop(0)
                if self.first_answers
                else pb.DownMessage(register_ack=pb.RegisterAck())
            )
            self.down.put_nowait(answer)
        elif message.HasField("telemetry"):
            self.batches.append(message.telemetry)
        elif message.HasField("intent_ack"):
            self.intent_acks.append(message.intent_ack)

    async def receive(self) -> pb.DownMessage:
        if not self._open:
            raise TransportClosedError("closed")
        return await self.down.get()

    async def close(self) -> None:
        self._open = False


def _uplink(
    outbox: Outbox,
    recorder: Recorder,
    transport: ScriptedTransport,
    received: list[pb.SignedIntent] | None = None,
    **config: object,
) -> Uplink:
    uplink_config = GrpcUplinkConfig.model_validate(
        {"transport": "grpc", "target": "127.0.0.1:1", "reconnect_max_s": 0.2, **config}
    )

    async def on_intent(signed: pb.SignedIntent) -> pb.IntentAck:
        if received is not None:
            received.append(signed)
        return pb.IntentAck(site_id="site", version=1, status=pb.INTENT_ACK_STATUS_PERSISTED)

    return Uplink(
        uplink_config,
        transport=transport,
        gateway_id="gw",
        outbox=outbox,
        recorder=recorder,
        register=lambda: pb.Register(gateway_id="gw"),
        on_intent=on_intent,
        inventory_changed=asyncio.Event(),
        clock=SystemClock(),
        site_id="site",
    )


async def _until(predicate: object, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_live_records_overtake_a_stalled_backlog(tmp_path: Path) -> None:
    with Outbox(tmp_path / "outbox.sqlite3", clock=SystemClock()) as outbox:
        outbox.append([(SAMPLE, _sample(i)) for i in range(1000)])  # the outage's backlog
        recorder = Recorder(outbox, commit_interval_s=0.05)
        transport = ScriptedTransport()
        uplink = _uplink(outbox, recorder, transport, batch_max_records=100, inflight_batches=2)
        task = asyncio.create_task(uplink.run())
        try:
            # The backlog lane fills its window of 2 batches and gets no ack...
            await _until(lambda: len(transport.batches) >= 2)
            await asyncio.sleep(0.2)
            assert [b.first_seq for b in transport.batches] == [1, 101]
            # ...and a live record still goes out at once, on its own lane.
            recorder.record(SAMPLE, _sample(-1))
            await recorder.flush()
            await _until(lambda: any(b.first_seq == 1001 for b in transport.batches))
            live = next(b for b in transport.batches if b.first_seq == 1001)
            assert (live.first_seq, live.last_seq) == (1001, 1001)
            # The headend commits the live batch first: acked by range, the backlog stays held.
            transport.down.put_nowait(
                pb.DownMessage(
                    ack=pb.Ack(up_to_seq=0, ranges=[pb.SeqRange(first_seq=1001, last_seq=1001)])
                )
            )
            await _until(lambda: outbox.stats().rows == 1000)
            # Then the backlog batches: the watermark deletes them and the backlog moves on.
            transport.down.put_nowait(pb.DownMessage(ack=pb.Ack(up_to_seq=200)))
            await _until(lambda: outbox.stats().rows == 800)
            await _until(lambda: any(b.first_seq == 201 for b in transport.batches))
        finally:
            task.cancel()


async def test_retry_after_is_honoured(tmp_path: Path) -> None:
    with Outbox(tmp_path / "outbox.sqlite3", clock=SystemClock()) as outbox:
        recorder = Recorder(outbox, commit_interval_s=0.05)
        transport = ScriptedTransport(
            [pb.DownMessage(retry_after=pb.RetryAfter(seconds=1, reason="busy"))]
        )
        uplink = _uplink(outbox, recorder, transport)
        task = asyncio.create_task(uplink.run())
        try:
            await _until(lambda: uplink.health.connected, timeout_s=5.0)
            assert uplink.health.retry_after_count == 1
            assert len(transport.connects) == 2
            # At least the headend's delay (its own jitter adds up to half of it).
            assert transport.connects[1] - transport.connects[0] >= 1.0
        finally:
            task.cancel()


async def test_signed_intents_go_to_on_intent_and_bare_ones_are_refused_unread(
    tmp_path: Path,
) -> None:
    with Outbox(tmp_path / "outbox.sqlite3", clock=SystemClock()) as outbox:
        recorder = Recorder(outbox, commit_interval_s=0.05)
        transport = ScriptedTransport()
        received: list[pb.SignedIntent] = []
        uplink = _uplink(outbox, recorder, transport, received)
        task = asyncio.create_task(uplink.run())
        try:
            signed = pb.SignedIntent(payload=b"payload", key_id="k", signature=b"s")
            transport.down.put_nowait(pb.DownMessage(signed_intent=signed))
            await _until(lambda: len(transport.intent_acks) == 1)
            assert received == [signed]
            bare = pb.IntentDocument(site_id="elsewhere", version=7)
            transport.down.put_nowait(pb.DownMessage(intent=bare))
            await _until(lambda: len(transport.intent_acks) == 2)
            assert received == [signed]  # never handed on
            refused = transport.intent_acks[1]
            assert refused.status == pb.INTENT_ACK_STATUS_REJECTED
            assert refused.rejection == pb.INTENT_REJECTION_UNSIGNED
            # Acked as this gateway's site whatever the bare document claims.
            assert (refused.site_id, refused.version) == ("site", 7)
            assert uplink.health.intents_received == 2
            assert uplink.health.intent_rejections == {"UNSIGNED": 1}
        finally:
            task.cancel()


# -- the gRPC transport (grpclib) against a grpcio server, as the headend runs it ----------------


class _ScriptedLink(GatewayLinkServicer):
    """Answers each Register by what its gateway id asks for: "ok" a RegisterAck, "big" a
    DownMessage above MAX_MESSAGE_BYTES, "denied" PERMISSION_DENIED (as the headend refuses a
    revoked certificate)."""

    async def Connect(
        self,
        request_iterator: AsyncIterator[pb.UpMessage],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[pb.DownMessage]:
        async for message in request_iterator:
            behaviour = message.register.gateway_id
            if behaviour == "denied":
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, "certificate revoked")
            elif behaviour == "big":
                reason = "x" * (MAX_MESSAGE_BYTES + 1)
                yield pb.DownMessage(retry_after=pb.RetryAfter(seconds=1, reason=reason))
            else:
                yield pb.DownMessage(register_ack=pb.RegisterAck(committed_seq=7))


@pytest.fixture
async def grpcio_server() -> AsyncIterator[str]:
    # The headend's bounds on receive, none on send: the gateway must enforce its own.
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
    add_GatewayLinkServicer_to_server(_ScriptedLink(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


def _register(behaviour: str) -> pb.UpMessage:
    return pb.UpMessage(register=pb.Register(gateway_id=behaviour))


async def test_grpc_transport_talks_to_a_grpcio_server(grpcio_server: str) -> None:
    transport = GrpcTransport(grpcio_server, keepalive_s=20)
    try:
        await transport.connect()
        await transport.send(_register("ok"))
        answer = await asyncio.wait_for(transport.receive(), 10)
        assert answer.register_ack.committed_seq == 7
        # A refusal carries the gRPC status and its details, and ends the stream.
        await transport.send(_register("denied"))
        with pytest.raises(TransportClosedError, match="PERMISSION_DENIED: certificate revoked"):
            await asyncio.wait_for(transport.receive(), 10)
        with pytest.raises(TransportClosedError, match="PERMISSION_DENIED"):
            await transport.send(_register("ok"))  # and so does every later send
    finally:
        await transport.close()
    with pytest.raises(TransportClosedError, match="not open"):
        await transport.receive()


async def test_grpc_transport_refuses_an_oversize_message_before_reading_it(
    grpcio_server: str,
) -> None:
    transport = GrpcTransport(grpcio_server, keepalive_s=20)
    try:
        await transport.connect()
        await transport.send(_register("big"))
        with pytest.raises(TransportClosedError, match=r"RESOURCE_EXHAUSTED: .* not read"):
            await asyncio.wait_for(transport.receive(), 10)
        # Sending one is refused too, before it is written.
        huge = pb.UpMessage(register=pb.Register(gateway_id="x" * (MAX_MESSAGE_BYTES + 1)))
        with pytest.raises(TransportClosedError, match="exceeds MAX_MESSAGE_BYTES"):
            await transport.send(huge)
    finally:
        await transport.close()


async def test_grpc_transport_to_nobody_fails_to_connect() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        target = f"127.0.0.1:{sock.getsockname()[1]}"
    transport = GrpcTransport(target, keepalive_s=20)
    try:
        with pytest.raises(ConnectionRefusedError):
            await transport.connect()
    finally:
        await transport.close()


async def test_grpc_transport_close_wakes_a_pending_receive(grpcio_server: str) -> None:
    transport = GrpcTransport(grpcio_server, keepalive_s=20)
    await transport.connect()
    await transport.send(_register("ok"))
    await asyncio.wait_for(transport.receive(), 10)
    pending = asyncio.ensure_future(transport.receive())  # nothing more will come
    await asyncio.sleep(0.1)  # let it block in the read
    assert not pending.done()
    await transport.close()
    with pytest.raises(TransportClosedError):
        await asyncio.wait_for(pending, 5)

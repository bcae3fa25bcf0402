"""The uplink over gRPC: the gateway dials out to the headend and keeps one stream open.

Per session: send Register, wait for RegisterAck (which tells us what the headend already
committed), then concurrently
  * drain the outbox oldest-first in batches, with at most `inflight_batches` unacknowledged;
    rows are deleted only when the headend's Ack covers them (after its own commit);
  * receive Acks and IntentDocuments; an intent is validated and persisted before it is
    acknowledged (IntentAck), and only then handed to the control loop.
A broken session is retried forever with full-jitter exponential backoff (tenacity), reset after
a session that stayed up. HTTP/2 keepalive detects dead peers. The gateway never listens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
from tenacity import RetryCallState, wait_random_exponential

from dergw.v1 import MAX_RECORDS_PER_BATCH, grpc_channel_options, pb
from dergw.v1.dergw_pb2_grpc import GatewayLinkStub
from gateway.clock import Clock
from gateway.config import UplinkConfig
from gateway.outbox import AckBeyondHeadError, Outbox
from gateway.runtime.recorder import Recorder

__all__ = ["GrpcUplink", "UplinkHealth", "UplinkProtocolError"]

log = logging.getLogger(__name__)

# A session that stayed up this long resets the backoff to its first step.
HEALTHY_SESSION_S = 30.0
REGISTER_TIMEOUT_S = 10.0

_BODY_FIELD = {
    field_descriptor.number: field_descriptor.name
    for field_descriptor in pb.Record.DESCRIPTOR.oneofs_by_name["body"].fields
}


class UplinkProtocolError(Exception):
    """The headend broke the protocol (e.g. no RegisterAck first); the session is dropped."""


@dataclass(slots=True)
class UplinkHealth:
    connected: bool = False
    sessions: int = 0
    reconnects: int = 0
    last_error: str = ""
    last_ack_mono_ns: int | None = None
    acked_seq: int = 0
    sent_batches: int = 0
    next_retry_s: float = 0.0
    intents_received: int = 0
    # Since when the headend has been unreachable (monotonic ns); None while connected.
    down_since_mono_ns: int | None = None
    notes: list[str] = field(default_factory=list)


class GrpcUplink:
    def __init__(
        self,
        config: UplinkConfig,
        *,
        gateway_id: str,
        outbox: Outbox,
        recorder: Recorder,
        register: Callable[[], pb.Register],
        on_intent: Callable[[pb.IntentDocument], Awaitable[pb.IntentAck]],
        inventory_changed: asyncio.Event,
        clock: Clock,
    ) -> None:
        self._config = config
        self._gateway_id = gateway_id
        self._outbox = outbox
        self._recorder = recorder
        self._register = register
        self._on_intent = on_intent
        self._inventory_changed = inventory_changed
        self._clock = clock
        self._wait = wait_random_exponential(multiplier=0.5, max=config.reconnect_max_s)
        self.health = UplinkHealth(down_since_mono_ns=clock.mono_ns())

    def offline_for_s(self) -> float | None:
        """How long the headend has been unreachable (None while connected)."""
        since = self.health.down_since_mono_ns
        return None if since is None else (self._clock.mono_ns() - since) / 1e9

    async def run(self) -> None:
        attempt = 0
        while True:
            started = time.monotonic()
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                self.health.last_error = f"{exc.code().name}: {exc.details()}"
            except (UplinkProtocolError, TimeoutError, ConnectionError, OSError) as exc:
                self.health.last_error = f"{type(exc).__name__}: {exc}"
            finally:
                was_connected = self.health.connected
                self.health.connected = False
                if was_connected:
                    self.health.down_since_mono_ns = self._clock.mono_ns()
            if was_connected:
                log.warning("uplink lost: %s", self.health.last_error)
            attempt = 1 if time.monotonic() - started > HEALTHY_SESSION_S else attempt + 1
            state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
            state.attempt_number = attempt
            delay = self._wait(state)
            self.health.next_retry_s = delay
            if attempt in (1, 2) or attempt % 20 == 0:
                log.info("uplink: retrying in %.1f s (%s)", delay, self.health.last_error)
            await asyncio.sleep(delay)
            self.health.reconnects += 1

    async def _session(self) -> None:
        options = grpc_channel_options(keepalive_s=self._config.keepalive_s)
        async with grpc.aio.insecure_channel(self._config.target, options=options) as channel:
            # No request iterator: this side writes with call.write() (reader/writer style).
            call = GatewayLinkStub(channel).Connect(None)
            write_lock = asyncio.Lock()

            async def send(message: pb.UpMessage) -> None:
                async with write_lock:
                    await call.write(message)

            self._inventory_changed.clear()
            await send(pb.UpMessage(register=self._register()))
            first = await asyncio.wait_for(call.read(), timeout=REGISTER_TIMEOUT_S)
            if not isinstance(first, pb.DownMessage) or not first.HasField("register_ack"):
                raise UplinkProtocolError("headend did not answer Register with RegisterAck")
            last_sent = await self._on_register_ack(first.register_ack)
            self.health.connected = True
            self.health.down_since_mono_ns = None
            self.health.sessions += 1
            log.info("uplink connected to %s (committed seq %d)", self._config.target, last_sent)

            inflight: deque[int] = deque()
            acked = asyncio.Event()
            sender = asyncio.create_task(self._send_loop(send, last_sent, inflight, acked))
            try:
                while True:
                    reader = asyncio.ensure_future(call.read())
                    done, _ = await asyncio.wait(
                        {reader, sender}, return_when=asyncio.FIRST_COMPLETED
                    )
                    if sender in done:
                        reader.cancel()
                        sender.result()  # re-raise what stopped the sender
                        raise UplinkProtocolError("sender stopped")
                    message = reader.result()
                    if not isinstance(message, pb.DownMessage):  # grpc.aio.EOF
                        raise ConnectionError("headend closed the stream")
                    await self._dispatch(message, send, inflight, acked)
            finally:
                sender.cancel()
                call.cancel()

    async def _on_register_ack(self, ack: pb.RegisterAck) -> int:
        """Reconcile with what the headend already committed; return the last seq to skip."""
        stats = await asyncio.to_thread(self._outbox.stats)
        committed = ack.committed_seq
        if committed >= stats.next_seq:
            if stats.rows == 0:
                # A re-flashed gateway: continue numbering after what the headend holds.
                await asyncio.to_thread(self._outbox.fast_forward, committed + 1)
                return committed
            log.error(
                "headend committed seq %d but our outbox only reached %d: this outbox was "
                "re-created while holding data; sending it anyway (the headend may drop it)",
                committed,
                stats.next_seq - 1,
            )
            return 0
        if committed > 0:
            # Our ack for these may have been lost (e.g. kill -9 right after sending).
            await asyncio.to_thread(self._outbox.ack, committed)
        return committed

    async def _send_loop(
        self,
        send: Callable[[pb.UpMessage], Awaitable[None]],
        last_sent: int,
        inflight: deque[int],
        acked: asyncio.Event,
    ) -> None:
        limit = min(self._config.batch_max_records, MAX_RECORDS_PER_BATCH)
        while True:
            if self._inventory_changed.is_set():
                self._inventory_changed.clear()
                await send(pb.UpMessage(register=self._register()))
            if len(inflight) >= self._config.inflight_batches:
                acked.clear()
                await acked.wait()
                continue
            self._recorder.committed.clear()
            rows = await asyncio.to_thread(self._outbox.read_after, last_sent, limit)
            if not rows:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._recorder.committed.wait(), timeout=1.0)
                continue
            batch = pb.TelemetryBatch(
                gateway_id=self._gateway_id, first_seq=rows[0].seq, last_seq=rows[-1].seq
            )
            for row in rows:
                record = batch.records.add()
                record.seq = row.seq
                getattr(record, _BODY_FIELD[row.kind]).MergeFromString(row.payload)
            await send(pb.UpMessage(telemetry=batch))
            inflight.append(rows[-1].seq)
            last_sent = rows[-1].seq
            self.health.sent_batches += 1

    async def _dispatch(
        self,
        message: pb.DownMessage,
        send: Callable[[pb.UpMessage], Awaitable[None]],
        inflight: deque[int],
        acked: asyncio.Event,
    ) -> None:
        body = message.WhichOneof("body")
        if body == "ack":
            up_to = message.ack.up_to_seq
            try:
                await asyncio.to_thread(self._outbox.ack, up_to)
            except AckBeyondHeadError as exc:
                raise UplinkProtocolError(f"headend acknowledged seq {up_to}: {exc}") from exc
            while inflight and inflight[0] <= up_to:
                inflight.popleft()
            self.health.acked_seq = up_to
            self.health.last_ack_mono_ns = self._clock.mono_ns()
            acked.set()
        elif body == "intent":
            self.health.intents_received += 1
            intent_ack = await self._on_intent(message.intent)
            await send(pb.UpMessage(intent_ack=intent_ack))
        elif body == "register_ack":
            pass  # answer to a mid-session re-register (inventory change)
        else:
            log.warning("uplink: ignoring unknown down message %r", body)

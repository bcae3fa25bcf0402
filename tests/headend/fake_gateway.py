"""A fake gateway that speaks the real GatewayLink protocol over grpc.aio.

Test equipment, and the seed of the fleet load generator: it holds no pytest dependency, keeps
its own seq counter like a real outbox, and records everything the headend sends down.

    async with FakeGateway(target, gateway_id="gw-1", site=site(...), devices=[...]) as gateway:
        batch = await gateway.send_records([sample_record("pv-1", {"W": (1200.0, "W")})])
        await gateway.wait_ack(batch.last_seq)
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Mapping, Sequence
from types import TracebackType

import grpc
from grpc.aio import EOF  # type: ignore[attr-defined]  # missing from grpc-stubs

from dergw.v1 import dergw_pb2_grpc, grpc_channel_options, pb, timestamp_from_ns

__all__ = [
    "FakeGateway",
    "LinkClosedError",
    "device",
    "event_response_record",
    "intent_status_record",
    "reported_state_record",
    "sample_record",
    "site",
]


class LinkClosedError(RuntimeError):
    """The headend ended the stream; `code` and `details` say how."""

    def __init__(self, code: grpc.StatusCode | None, details: str) -> None:
        super().__init__(f"stream ended: {code} {details}")
        self.code = code
        self.details = details


def site(
    site_id: str,
    *,
    substation: str = "sub-1",
    feeder: str = "fdr-1",
    export_limit_w: float | None = None,
    import_limit_w: float | None = None,
) -> pb.Site:
    message = pb.Site(site_id=site_id, name=f"Site {site_id}", substation=substation, feeder=feeder)
    if export_limit_w is not None:
        message.export_limit_w = export_limit_w
    if import_limit_w is not None:
        message.import_limit_w = import_limit_w
    return message


def device(
    device_id: str,
    kind: pb.DeviceKind.ValueType = pb.DEVICE_KIND_PV,
    *,
    max_w: float = 5000.0,
    points: Sequence[tuple[str, str]] = (("W", "W"), ("WMaxLimPct", "%")),
    role: str = "",
) -> pb.Device:
    return pb.Device(
        device_id=device_id,
        kind=kind,
        protocol="sunspec-modbus-tcp",
        address="127.0.0.1:15020/unit 1",
        manufacturer="Fake",
        model="F-1",
        serial_number=f"SN-{device_id}",
        nameplate=pb.Nameplate(max_w=max_w, max_va=max_w),
        points=[
            pb.PointInfo(name=name, unit=unit, writable=name.startswith("WMax"))
            for name, unit in points
        ],
        role=role,
    )


def sample_record(
    device_id: str,
    points: Mapping[str, tuple[float, str]],
    *,
    time_ns: int | None = None,
    quality: pb.Quality.ValueType = pb.QUALITY_GOOD,
    error: str = "",
) -> pb.Record:
    """One read of one device (seq is assigned when sent)."""
    wall_ns = time.time_ns() if time_ns is None else time_ns
    return pb.Record(
        sample=pb.DeviceSample(
            device_id=device_id,
            time=timestamp_from_ns(wall_ns),
            monotonic_ns=time.monotonic_ns(),
            names=list(points),
            units=[unit for _, unit in points.values()],
            values=[value for value, _ in points.values()],
            quality=[quality] * len(points),
            error=error,
        )
    )


def event_response_record(
    intent_version: int,
    event_id: str,
    status: pb.ResponseStatus.ValueType,
    *,
    reason: str = "",
    time_ns: int | None = None,
) -> pb.Record:
    return pb.Record(
        event_response=pb.EventResponse(
            intent_version=intent_version,
            event_id=event_id,
            status=status,
            reason=reason,
            time=timestamp_from_ns(time.time_ns() if time_ns is None else time_ns),
        )
    )


def intent_status_record(
    version: int,
    state: pb.IntentState.ValueType,
    *,
    reason: str = "",
    active_event_id: str = "",
) -> pb.Record:
    return pb.Record(
        intent_status=pb.IntentStatus(
            version=version,
            state=state,
            reason=reason,
            time=timestamp_from_ns(time.time_ns()),
            active_event_id=active_event_id,
        )
    )


def reported_state_record(
    intent_version: int,
    *,
    active_event_id: str = "",
    source: pb.ControlSource.ValueType = pb.CONTROL_SOURCE_DEFAULT,
    setpoints: Sequence[pb.DeviceSetpoint] = (),
) -> pb.Record:
    return pb.Record(
        reported_state=pb.ReportedState(
            time=timestamp_from_ns(time.time_ns()),
            intent_version=intent_version,
            active_event_id=active_event_id,
            source=source,
            setpoints=list(setpoints),
        )
    )


class FakeGateway:
    """One gateway: one channel, one Connect stream, a seq counter and inboxes for down messages."""

    def __init__(
        self,
        target: str,
        *,
        gateway_id: str,
        site: pb.Site,
        devices: Sequence[pb.Device] = (),
        intent_version: int = 0,
        software_version: str = "fake-0.1",
        keepalive_s: float = 20.0,
    ) -> None:
        self.target = target
        self.gateway_id = gateway_id
        self.site = site
        self.devices = list(devices)
        self.intent_version = intent_version
        self.software_version = software_version
        self.boot_id = uuid.uuid4().hex
        self.next_seq = 1
        self.register_ack: pb.RegisterAck | None = None
        self.acks: asyncio.Queue[int] = asyncio.Queue()
        # Documents of the signed intents received (decoded, not verified), and the envelopes.
        self.intents: asyncio.Queue[pb.IntentDocument] = asyncio.Queue()
        self.signed_intents: list[pb.SignedIntent] = []
        self._keepalive_s = keepalive_s
        self._channel: grpc.aio.Channel | None = None
        self._call: grpc.aio.StreamStreamCall[pb.UpMessage, pb.DownMessage] | None = None
        self._reader: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()
        self.close_code: grpc.StatusCode | None = None
        self.close_details = ""

    # -- connection -----------------------------------------------------------------------------

    def register_message(self) -> pb.UpMessage:
        return pb.UpMessage(
            register=pb.Register(
                gateway_id=self.gateway_id,
                software_version=self.software_version,
                site=self.site,
                devices=self.devices,
                intent_version=self.intent_version,
                oldest_unacked_seq=0,
                next_seq=self.next_seq,
                boot_id=self.boot_id,
            )
        )

    async def open(self, first: pb.UpMessage | None = None) -> None:
        """Open the channel and the stream and send `first` (default: register) - no waiting."""
        self.closed.clear()
        self._channel = grpc.aio.insecure_channel(
            self.target, options=grpc_channel_options(keepalive_s=self._keepalive_s)
        )
        stub = dergw_pb2_grpc.GatewayLinkStub(self._channel)
        self._call = stub.Connect()  # type: ignore[call-arg]  # grpc-stubs: iterator optional
        await self._call.write(first if first is not None else self.register_message())

    async def connect(self, *, timeout_s: float = 5.0) -> pb.RegisterAck:
        """Open, register and wait for the RegisterAck; then read down messages in background."""
        await self.open()
        call = self._require_call()
        first = await asyncio.wait_for(call.read(), timeout_s)
        if first is EOF:
            code = await call.code()
            details = await call.details()
            self._mark_closed(code, details)
            raise LinkClosedError(code, details)
        assert isinstance(first, pb.DownMessage)
        if first.WhichOneof("body") != "register_ack":
            raise AssertionError(f"first down message is not register_ack: {first}")
        self.register_ack = first.register_ack
        # A real gateway never reuses a seq at or below what the headend committed.
        self.next_seq = max(self.next_seq, first.register_ack.committed_seq + 1)
        self._reader = asyncio.create_task(self._read_loop(call))
        return first.register_ack

    async def wait_closed(self, *, timeout_s: float = 5.0) -> tuple[grpc.StatusCode | None, str]:
        """Wait for the headend to end the stream; returns (status code, details)."""
        call = self._require_call()
        if self._reader is None:
            # Nothing reads yet (e.g. the register was refused): drain until the end.
            async def drain() -> None:
                while await call.read() is not EOF:
                    pass

            with contextlib.suppress(grpc.aio.AioRpcError):
                await asyncio.wait_for(drain(), timeout_s)
            self._mark_closed(await call.code(), await call.details())
        await asyncio.wait_for(self.closed.wait(), timeout_s)
        return self.close_code, self.close_details

    async def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        if self._channel is not None:
            await self._channel.close(None)
            self._channel = None
        self._call = None

    async def __aenter__(self) -> FakeGateway:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    # -- up -------------------------------------------------------------------------------------

    async def send(self, message: pb.UpMessage) -> None:
        await self._require_call().write(message)

    def batch(self, records: Sequence[pb.Record]) -> pb.TelemetryBatch:
        """Assign the next seqs to `records` (copies) and wrap them in a batch."""
        first_seq = self.next_seq
        numbered: list[pb.Record] = []
        for offset, record in enumerate(records):
            copy = pb.Record()
            copy.CopyFrom(record)
            copy.seq = first_seq + offset
            numbered.append(copy)
        self.next_seq = first_seq + len(numbered)
        return pb.TelemetryBatch(
            gateway_id=self.gateway_id,
            first_seq=first_seq,
            last_seq=self.next_seq - 1,
            records=numbered,
        )

    async def send_batch(self, batch: pb.TelemetryBatch) -> None:
        await self.send(pb.UpMessage(telemetry=batch))

    async def send_records(self, records: Sequence[pb.Record]) -> pb.TelemetryBatch:
        batch = self.batch(records)
        await self.send_batch(batch)
        return batch

    async def ack_intent(
        self,
        version: int,
        status: pb.IntentAckStatus.ValueType = pb.INTENT_ACK_STATUS_PERSISTED,
        reason: str = "",
    ) -> None:
        if status == pb.INTENT_ACK_STATUS_PERSISTED:
            self.intent_version = max(self.intent_version, version)
        await self.send(
            pb.UpMessage(
                intent_ack=pb.IntentAck(
                    site_id=self.site.site_id, version=version, status=status, reason=reason
                )
            )
        )

    # -- down -----------------------------------------------------------------------------------

    async def wait_ack(self, up_to_seq: int, *, timeout_s: float = 5.0) -> int:
        """Wait for an Ack covering `up_to_seq`; returns its up_to_seq."""

        async def until_covered() -> int:
            while True:
                acked = await self.acks.get()
                if acked >= up_to_seq:
                    return acked

        return await asyncio.wait_for(until_covered(), timeout_s)

    async def next_intent(self, *, timeout_s: float = 5.0) -> pb.IntentDocument:
        return await asyncio.wait_for(self.intents.get(), timeout_s)

    async def _read_loop(
        self, call: grpc.aio.StreamStreamCall[pb.UpMessage, pb.DownMessage]
    ) -> None:
        try:
            while True:
                message = await call.read()
                if message is EOF:
                    break
                assert isinstance(message, pb.DownMessage)
                kind = message.WhichOneof("body")
                if kind == "ack":
                    self.acks.put_nowait(message.ack.up_to_seq)
                elif kind == "signed_intent":
                    self.signed_intents.append(message.signed_intent)
                    payload = pb.IntentPayload.FromString(message.signed_intent.payload)
                    assert payload.gateway_id == self.gateway_id, payload.gateway_id
                    self.intents.put_nowait(payload.document)
                elif kind == "intent":
                    raise AssertionError("the headend sent an unsigned intent")
            self._mark_closed(await call.code(), await call.details())
        except grpc.aio.AioRpcError as exc:
            self._mark_closed(exc.code(), exc.details() or "")

    def _mark_closed(self, code: grpc.StatusCode | None, details: str | None) -> None:
        self.close_code = code
        self.close_details = details or ""
        self.closed.set()

    def _require_call(self) -> grpc.aio.StreamStreamCall[pb.UpMessage, pb.DownMessage]:
        if self._call is None:
            raise RuntimeError("not connected; call connect() first")
        return self._call

"""Benchmark `backlog-drain`: drain a 1 h outage backlog while live telemetry keeps flowing.

Budgets (ARCHITECTURE.md): a 1 h outage at 1,000 points/s drained in <= 30 s, live telemetry
latency p99 < 2 s while draining. A gateway was cut off for an hour at 1,000 points/s: its outbox
holds that backlog (samples of 20 points: 3.6 M points). A real headend (`dergw headend run`,
SQLite) comes back, directly over gRPC, then through a private mosquitto over MQTT; the product's
`Uplink` (in this process) drains the backlog on its paced lane while the recorder keeps
appending live samples at the same 1,000 points/s. Per transport:

* drain time: session start until every backlog seq is acknowledged;
* live latency: for each live record, its outbox commit until the headend's Ack covering it,
  while the backlog drains (budgeted) and for a few seconds after.

Quick: a 3 minute backlog.

    dergw bench backlog-drain [--quick]
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.core import BenchOptions, Budget, Figure, latency_figure
from dergw.v1 import pb, timestamp_from_ns
from gateway.clock import SystemClock
from gateway.config import GrpcUplinkConfig, MqttUplinkConfig
from gateway.outbox import Outbox, RecordKind
from gateway.runtime.recorder import Recorder
from gateway.runtime.transport import UplinkTransport
from gateway.runtime.uplink import Uplink, create_transport
from hil.mqtt_broker import Mosquitto
from hil.scenarios.harness import spawn_dergw, wait_headend_ready

BENCH = "backlog-drain"
GATEWAY = "gw-drain"
SITE = "site-drain"
RATE = 1000  # points/s, backlog and live
POINTS = 20  # per sample
DRAIN_BUDGET_S = 30.0
LIVE_P99_BUDGET_MS = 2000.0


@dataclass(frozen=True)
class Backlog:
    path: Path  # a closed outbox file holding the backlog
    hours: float
    records: int
    last_seq: int

    @property
    def points(self) -> int:
        return self.records * POINTS


def _sample(t_ns: int, index: int) -> bytes:
    return pb.DeviceSample(
        device_id=f"inverter-{index % 10:02d}",
        time=timestamp_from_ns(t_ns),
        monotonic_ns=t_ns,
        names=[f"point_{i:02d}" for i in range(POINTS)],
        units=["W"] * POINTS,
        values=[1000.0 + i + index % 97 for i in range(POINTS)],
        quality=[pb.QUALITY_GOOD] * POINTS,
        boot_id="bench",
        clock_synced=True,
    ).SerializeToString()


def _register() -> pb.Register:
    return pb.Register(
        gateway_id=GATEWAY,
        software_version="bench",
        site=pb.Site(site_id=SITE, name="bench"),
        devices=[pb.Device(device_id="inverter-00", kind=pb.DEVICE_KIND_PV, protocol="bench")],
        boot_id="bench",
    )


async def _no_intent(signed: pb.SignedIntent) -> pb.IntentAck:
    return pb.IntentAck(site_id=SITE, status=pb.INTENT_ACK_STATUS_STALE)


class _AckTap:
    """Wraps the transport to see every Ack (which seqs it covers) the moment it arrives."""

    def __init__(self, inner: UplinkTransport, on_ack: Callable[[pb.Ack], None]) -> None:
        self._inner = inner
        self._on_ack = on_ack
        self.name = inner.name
        self.target = inner.target

    async def connect(self) -> None:
        await self._inner.connect()

    async def send(self, message: pb.UpMessage) -> None:
        await self._inner.send(message)

    async def receive(self) -> pb.DownMessage:
        message = await self._inner.receive()
        if message.HasField("ack"):
            self._on_ack(message.ack)
        return message

    async def close(self) -> None:
        await self._inner.close()


def _write_backlog(path: Path, hours: float) -> Backlog:
    records_per_s = RATE / POINTS
    records = int(hours * 3600 * records_per_s)
    t0 = time.time_ns() - int(hours * 3600e9)
    with Outbox(path, clock=SystemClock()) as outbox:
        batch: list[tuple[int, bytes]] = []
        for index in range(records):
            batch.append(
                (int(RecordKind.SAMPLE), _sample(t0 + int(index / records_per_s * 1e9), index))
            )
            if len(batch) == 2000:
                outbox.append(batch)
                batch = []
        if batch:
            outbox.append(batch)
        last_seq = outbox.stats().next_seq - 1
    return Backlog(path, hours, records, last_seq)


def _duration(hours: float) -> str:
    return f"{hours:g} h" if hours >= 1 else f"{hours * 60:g} min"


def _copy_of(backlog: Backlog, workdir: Path) -> Path:
    """Each transport drains its own copy of the same backlog (the file is closed: complete)."""
    workdir.mkdir()
    path = workdir / "outbox.sqlite3"
    shutil.copyfile(backlog.path, path)
    return path


async def _drain(
    transport_name: str, backlog: Backlog, workdir: Path, *, timeout_s: float, after_s: float
) -> list[Figure]:
    clock = SystemClock()
    outbox = Outbox(_copy_of(backlog, workdir), clock=clock)
    broker = Mosquitto(workdir / "broker") if transport_name == "mqtt" else None
    headend = None
    tasks: list[asyncio.Task[None]] = []
    try:
        args = ["headend", "run", "--grpc", "127.0.0.1:0", "--http", "127.0.0.1:0"]
        args += ["--db", str(workdir / "headend.sqlite3")]
        if broker is not None:
            broker.start()
            args += ["--mqtt", broker.address]
        headend = await spawn_dergw("headend", args, workdir / "headend.log")
        grpc_target, _ = await wait_headend_ready(headend)
        config: GrpcUplinkConfig | MqttUplinkConfig
        if broker is not None:
            config = MqttUplinkConfig.model_validate(
                {"transport": "mqtt", "broker": broker.address, "ack_timeout_s": 60}
            )
        else:
            config = GrpcUplinkConfig.model_validate(
                {"transport": "grpc", "target": grpc_target, "ack_timeout_s": 60}
            )
        recorder = Recorder(outbox, commit_interval_s=0.1)
        committed_at: dict[int, float] = {}
        live_latency: list[tuple[float, float]] = []  # (ack time, latency)
        drained_at: list[float] = []
        drained = asyncio.Event()
        acked: set[int] = set()
        watermark = [0]

        def on_ack(ack: pb.Ack) -> None:
            now = time.monotonic()
            covered = [(watermark[0] + 1, ack.up_to_seq)] if ack.up_to_seq > watermark[0] else []
            watermark[0] = max(watermark[0], ack.up_to_seq)
            covered += [(r.first_seq, r.last_seq) for r in ack.ranges]
            for first, last in covered:
                for seq in range(max(first, backlog.last_seq + 1), last + 1):
                    if seq in committed_at and seq not in acked:
                        acked.add(seq)
                        live_latency.append((now, now - committed_at.pop(seq)))
            if not drained_at and watermark[0] >= backlog.last_seq:
                drained_at.append(now)
                drained.set()

        transport = _AckTap(create_transport(config, gateway_id=GATEWAY, boot_id="bench"), on_ack)
        uplink = Uplink(
            config,
            transport=transport,
            gateway_id=GATEWAY,
            outbox=outbox,
            recorder=recorder,
            register=_register,
            on_intent=_no_intent,
            inventory_changed=asyncio.Event(),
            clock=clock,
            site_id=SITE,
        )
        records_per_s = RATE / POINTS

        async def live() -> None:
            index = 0
            next_at = time.monotonic()
            while True:
                recorder.record(int(RecordKind.SAMPLE), _sample(time.time_ns(), index))
                index += 1
                next_at += 1.0 / records_per_s
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))

        async def commit() -> None:
            # The recorder's commit as the runtime paces it; the commit time is when each live
            # record became durable, where its latency starts.
            while True:
                await asyncio.sleep(0.1)
                before = outbox.stats().next_seq
                await recorder.flush()
                now = time.monotonic()
                for seq in range(before, outbox.stats().next_seq):
                    committed_at[seq] = now

        session_start = time.monotonic()
        tasks = [asyncio.create_task(c) for c in (uplink.run(), live(), commit())]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(drained.wait(), timeout=timeout_s)
        drain_end = drained_at[0] if drained_at else time.monotonic()
        await asyncio.sleep(after_s)
        health = uplink.health
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if headend is not None:
            await headend.stop()
        outbox.close()
        if broker is not None:
            broker.stop()
    label = {"grpc": "gRPC", "mqtt": "MQTT"}[transport_name]
    drain_s = drain_end - session_start
    during = [lat for at, lat in live_latency if at <= drain_end]
    after = [lat for at, lat in live_latency if at > drain_end]
    drain_note = (
        f"{_duration(backlog.hours)} at {RATE:,} points/s: {backlog.points:,} points, "
        f"{backlog.points / drain_s:,.0f} points/s"
        if drained_at
        else f"NOT DRAINED in {timeout_s:.0f} s: acked through {watermark[0]} of {backlog.last_seq}"
    )
    return [
        Figure(
            bench=BENCH,
            name=f"backlog drain time, {label}",
            value=drain_s,
            unit="s",
            budget=Budget("<=", DRAIN_BUDGET_S),
            note=drain_note,
            extra={
                "backlog_points": backlog.points,
                "backlog_records": backlog.records,
                "drained": bool(drained_at),
                "backlog_batches": health.sent_backlog_batches,
                "live_batches": health.sent_live_batches,
            },
        ),
        latency_figure(
            BENCH,
            f"live latency while draining, {label}",
            during,
            budget=Budget("<=", LIVE_P99_BUDGET_MS, checked="p99"),
            note=f"n={len(during)}, outbox commit -> headend Ack",
        ),
        latency_figure(
            BENCH,
            f"live latency after the drain, {label}",
            after,
            note=f"n={len(after)} in the {after_s:g} s after",
        ),
    ]


async def run(options: BenchOptions) -> list[Figure]:
    hours = 3 / 60 if options.quick else 1.0
    timeout_s = 30.0 if options.quick else 90.0
    after_s = 1.0 if options.quick else 3.0
    with tempfile.TemporaryDirectory(prefix="dergw-bench-drain-", dir=options.workdir) as tmp:
        base = Path(tmp)
        started = time.monotonic()
        backlog = _write_backlog(base / "backlog.sqlite3", hours)
        print(
            f"backlog of {backlog.points:,} points written in {time.monotonic() - started:.1f} s",
            flush=True,
        )
        figures: list[Figure] = []
        for transport_name in ("grpc", "mqtt"):
            figures += await _drain(
                transport_name, backlog, base / transport_name, timeout_s=timeout_s, after_s=after_s
            )
            print(f"{transport_name}: {figures[-3].value:.1f} s", flush=True)
        return figures

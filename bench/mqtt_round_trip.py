"""Benchmark `mqtt-round-trip`: telemetry round trips through mosquitto (gateway MqttTransport ->
broker -> headend MqttLink -> SQLite commit -> Ack -> broker -> gateway). No budget.

A private mosquitto on a free port, the headend's GatewaySessions on a SQLite file
(synchronous=FULL, as the headend runs it), one gateway sending 500 batches (quick: 50) of 100
samples with at most 1, 4 or 16 batches unacknowledged (the uplink's inflight_batches).

    dergw bench mqtt-round-trip [--quick]
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

from bench.core import BenchOptions, Figure, latency_figure
from dergw.v1 import pb, timestamp_from_ns
from gateway.config import MqttUplinkConfig
from gateway.runtime.mqtt_transport import MqttTransport
from headend_min.clock import SystemClock
from headend_min.mqtt_link import MqttLink
from headend_min.session import GatewaySessions
from headend_min.signing import SigningKey
from headend_min.sqlite_store import SqliteStore
from hil.mqtt_broker import Mosquitto

BENCH = "mqtt-round-trip"
GATEWAY = "gw-bench"
RECORDS = 100  # per batch
WINDOWS = (1, 4, 16)  # batches in flight


def _register() -> pb.UpMessage:
    device = pb.Device(device_id="pv-1", kind=pb.DEVICE_KIND_PV, protocol="bench")
    return pb.UpMessage(
        register=pb.Register(
            gateway_id=GATEWAY,
            software_version="bench",
            site=pb.Site(site_id="site-bench", name="bench"),
            devices=[device],
            next_seq=1,
            boot_id="bench",
        )
    )


def _batch(first_seq: int, records: int) -> pb.TelemetryBatch:
    batch = pb.TelemetryBatch(
        gateway_id=GATEWAY, first_seq=first_seq, last_seq=first_seq + records - 1
    )
    now = time.time_ns()
    for offset in range(records):
        record = batch.records.add(seq=first_seq + offset)
        sample = record.sample
        sample.device_id = "pv-1"
        sample.time.CopyFrom(timestamp_from_ns(now + offset))
        sample.monotonic_ns = time.monotonic_ns()
        sample.names.extend(["W", "WMaxLimPct"])
        sample.units.extend(["W", "%"])
        sample.values.extend([1000.0 + offset, 100.0])
        sample.quality.extend([pb.QUALITY_GOOD, pb.QUALITY_GOOD])
    return batch


async def _run(directory: Path, batches: int, records: int, window: int) -> list[Figure]:
    broker = Mosquitto(directory / "mosquitto")
    broker.start()
    store = await SqliteStore.open(directory / "headend.sqlite3")
    sessions = GatewaySessions(store, SystemClock(), signing_key=SigningKey.generate())
    link = MqttLink(sessions, broker.host, broker.port)
    await link.start()
    config = MqttUplinkConfig(transport="mqtt", broker=broker.address)
    transport = MqttTransport(config, gateway_id=GATEWAY, boot_id="bench")
    try:
        await transport.connect()
        await transport.send(_register())
        first = await transport.receive()
        if not first.HasField("register_ack"):
            raise RuntimeError(f"expected a RegisterAck from the headend, got {first}")
        sent_at: dict[int, float] = {}
        rtts: list[float] = []
        credits = asyncio.Semaphore(window)

        async def reader() -> None:
            while len(rtts) < batches:
                message = await transport.receive()
                if not message.HasField("ack"):
                    continue
                acked = message.ack.up_to_seq
                for last_seq in sorted(s for s in sent_at if s <= acked):
                    rtts.append(time.perf_counter() - sent_at.pop(last_seq))
                    credits.release()

        task = asyncio.create_task(reader())
        started = time.perf_counter()
        seq = 1
        for _ in range(batches):
            await credits.acquire()
            batch = _batch(seq, records)
            sent_at[batch.last_seq] = time.perf_counter()
            await transport.send(pb.UpMessage(telemetry=batch))
            seq += records
        await task
        elapsed = time.perf_counter() - started
    finally:
        await transport.close()
        await link.stop()
        await store.close()
        broker.stop()
    in_flight = f"{window} batch{'es' if window > 1 else ''} in flight"
    note = f"{batches} batches of {records} records"
    return [
        latency_figure(BENCH, f"round trip, {in_flight}", rtts, note=note),
        Figure(
            BENCH,
            f"batches/s, {in_flight}",
            batches / elapsed,
            "batches/s",
            note=f"{note}, {batches * records / elapsed:,.0f} records/s",
        ),
    ]


async def run(options: BenchOptions) -> list[Figure]:
    batches = 50 if options.quick else 500
    figures: list[Figure] = []
    for window in WINDOWS:
        with tempfile.TemporaryDirectory(prefix="dergw-bench-mqtt-", dir=options.workdir) as tmp:
            figures += await _run(Path(tmp), batches, RECORDS, window)
    return figures

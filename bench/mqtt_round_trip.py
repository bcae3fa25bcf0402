"""Benchmark: telemetry round trips through mosquitto (gateway MqttTransport -> broker -> headend
MqttLink -> SQLite commit -> Ack -> broker -> gateway).

Not a test: it prints figures. A private mosquitto on a free port, the headend's GatewaySessions
on a SQLite file (synchronous=FULL, as the headend runs it), one gateway sending batches of
`--records` samples with at most `--window` batches unacknowledged (the uplink's
inflight_batches).

    .venv/bin/python bench/mqtt_round_trip.py [--batches N] [--records N] [--window N]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from dergw.v1 import pb, timestamp_from_ns
from gateway.config import MqttUplinkConfig
from gateway.runtime.mqtt_transport import MqttTransport
from headend_min.clock import SystemClock
from headend_min.mqtt_link import MqttLink
from headend_min.session import GatewaySessions
from headend_min.signing import SigningKey
from headend_min.sqlite_store import SqliteStore
from hil.mqtt_broker import Mosquitto

GATEWAY = "gw-bench"


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


async def _run(directory: Path, batches: int, records: int, window: int) -> None:
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
        assert first.HasField("register_ack"), first
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
    rtts_ms = sorted(rtt * 1000 for rtt in rtts)
    p99 = rtts_ms[min(len(rtts_ms) - 1, int(len(rtts_ms) * 0.99))]
    print(
        f"window {window:2d}, {records} records/batch: {batches / elapsed:7.1f} batches/s "
        f"({batches * records / elapsed:8.0f} records/s), round trip p50 "
        f"{statistics.median(rtts_ms):.1f} ms, p99 {p99:.1f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=500)
    parser.add_argument("--records", type=int, default=100)
    parser.add_argument("--window", type=int, nargs="*", default=[1, 4, 16])
    args = parser.parse_args()
    for window in args.window:
        with tempfile.TemporaryDirectory() as directory:
            asyncio.run(_run(Path(directory), args.batches, args.records, window))


if __name__ == "__main__":
    main()

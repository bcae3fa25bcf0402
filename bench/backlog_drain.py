"""Benchmark: drain a 1 h outage backlog while live telemetry keeps flowing; live latency p99.

Not a test: it prints figures. A gateway was cut off for `--hours` at `--rate` points/s: its outbox
holds that backlog (samples of `--points` points). The headend (a real `dergw headend run`
process, SQLite; with `--transport mqtt` a private mosquitto in between) comes back; the gateway's
uplink (the product's `Uplink`, in this process) drains the backlog on its paced lane while the
recorder keeps appending live samples at the same rate. Measured:

* drain time: session start until every backlog seq is acknowledged;
* live latency: for each live record, its outbox commit until the headend's Ack covering it
  (p50 / p99 during the drain, and after it).

    .venv/bin/python bench/backlog_drain.py [--transport grpc|mqtt] [--hours 1] [--rate 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

from dergw.v1 import pb, timestamp_from_ns
from gateway.clock import SystemClock
from gateway.config import GrpcUplinkConfig, MqttUplinkConfig
from gateway.outbox import Outbox, RecordKind
from gateway.runtime.recorder import Recorder
from gateway.runtime.transport import UplinkTransport
from gateway.runtime.uplink import Uplink, create_transport
from hil.mqtt_broker import Mosquitto

GATEWAY = "gw-drain"
SITE = "site-drain"
READY = re.compile(r"headend ready grpc=(\S+) http=(\S+)")


def _sample(points: int, t_ns: int, index: int) -> bytes:
    return pb.DeviceSample(
        device_id=f"inverter-{index % 10:02d}",
        time=timestamp_from_ns(t_ns),
        monotonic_ns=t_ns,
        names=[f"point_{i:02d}" for i in range(points)],
        units=["W"] * points,
        values=[1000.0 + i + index % 97 for i in range(points)],
        quality=[pb.QUALITY_GOOD] * points,
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


class _AckTap:
    """Wraps the transport to timestamp every Ack (which seqs it covers, when it arrived)."""

    def __init__(self, inner: UplinkTransport, on_ack: object) -> None:
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
            self._on_ack(message.ack)  # type: ignore[operator]
        return message

    async def close(self) -> None:
        await self._inner.close()


async def _start_headend(
    workdir: Path, broker: Mosquitto | None
) -> tuple[asyncio.subprocess.Process, str]:
    args = [
        sys.executable, "-m", "gateway.cli", "headend", "run",
        "--grpc", "127.0.0.1:0", "--http", "127.0.0.1:0", "--db", str(workdir / "headend.sqlite3"),
    ]  # fmt: skip
    if broker is not None:
        args += ["--mqtt", broker.address]
    log = (workdir / "headend.log").open("w")
    process = await asyncio.create_subprocess_exec(*args, stdout=log, stderr=log)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        match = READY.search((workdir / "headend.log").read_text(errors="replace"))
        if match:
            return process, match.group(1)
        await asyncio.sleep(0.05)
    process.kill()
    raise RuntimeError(f"headend did not start; see {workdir / 'headend.log'}")


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(args: argparse.Namespace, workdir: Path) -> None:
    clock = SystemClock()
    records_per_s = args.rate / args.points
    backlog_records = int(args.hours * 3600 * records_per_s)
    outbox = Outbox(workdir / "outbox.sqlite3", clock=clock)
    t0 = time.time_ns() - int(args.hours * 3600e9)
    started = time.monotonic()
    batch: list[tuple[int, bytes]] = []
    for index in range(backlog_records):
        t_ns = t0 + int(index / records_per_s * 1e9)
        batch.append((int(RecordKind.SAMPLE), _sample(args.points, t_ns, index)))
        if len(batch) == 2000:
            outbox.append(batch)
            batch = []
    if batch:
        outbox.append(batch)
    backlog_last = outbox.stats().next_seq - 1
    print(
        f"backlog: {args.hours:g} h at {args.rate} points/s = {backlog_records:,} records of "
        f"{args.points} points ({backlog_records * args.points:,} points), written in "
        f"{time.monotonic() - started:.1f} s",
        flush=True,
    )
    broker = None
    if args.transport == "mqtt":
        broker = Mosquitto(workdir / "broker")
        broker.start()
    headend, grpc_target = await _start_headend(workdir, broker)
    try:
        if broker is not None:
            config: GrpcUplinkConfig | MqttUplinkConfig = MqttUplinkConfig.model_validate(
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
                for seq in range(max(first, backlog_last + 1), last + 1):
                    if seq in committed_at and seq not in acked:
                        acked.add(seq)
                        live_latency.append((now, now - committed_at.pop(seq)))
            if not drained_at and watermark[0] >= backlog_last:
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
            on_intent=lambda signed: _no_intent(signed),
            inventory_changed=asyncio.Event(),
            clock=clock,
            site_id=SITE,
        )

        async def live() -> None:
            index = 0
            period = 1.0 / records_per_s
            next_at = time.monotonic()
            while True:
                recorder.record(int(RecordKind.SAMPLE), _sample(args.points, time.time_ns(), index))
                index += 1
                next_at += period
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))

        async def commit() -> None:
            while True:
                await asyncio.sleep(0.1)
                before = outbox.stats().next_seq
                await recorder.flush()
                now = time.monotonic()
                for seq in range(before, outbox.stats().next_seq):
                    committed_at[seq] = now

        session_start = time.monotonic()
        tasks = [
            asyncio.create_task(uplink.run()),
            asyncio.create_task(live()),
            asyncio.create_task(commit()),
        ]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(drained.wait(), timeout=args.timeout_s)
        drain_end = drained_at[0] if drained_at else time.monotonic()
        await asyncio.sleep(args.after_s)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        during = [lat for at, lat in live_latency if at <= drain_end]
        after = [lat for at, lat in live_latency if at > drain_end]
        drain_s = drain_end - session_start
        print(f"transport {args.transport}: backlog drained in {drain_s:.1f} s "
              f"({backlog_records / drain_s:,.0f} records/s = "
              f"{backlog_records * args.points / drain_s:,.0f} points/s)"
              + ("" if drained_at else " (TIMED OUT)"))  # fmt: skip
        print(
            f"live latency during the drain: p50 {_pct(during, 0.5) * 1e3:.0f} ms, "
            f"p99 {_pct(during, 0.99) * 1e3:.0f} ms over {len(during)} records; after: "
            f"p50 {_pct(after, 0.5) * 1e3:.0f} ms, p99 {_pct(after, 0.99) * 1e3:.0f} ms "
            f"({len(after)})"
        )
        print(
            f"uplink: {uplink.health.sent_backlog_batches} backlog batches, "
            f"{uplink.health.sent_live_batches} live batches, "
            f"median live latency {statistics.median(during or [float('nan')]) * 1e3:.0f} ms"
        )
    finally:
        headend.terminate()
        await headend.wait()
        outbox.close()
        if broker is not None:
            broker.stop()


async def _no_intent(signed: pb.SignedIntent) -> pb.IntentAck:
    return pb.IntentAck(site_id=SITE, status=pb.INTENT_ACK_STATUS_STALE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transport", choices=("grpc", "mqtt"), default="grpc")
    parser.add_argument("--hours", type=float, default=1.0)
    parser.add_argument("--rate", type=int, default=1000, help="points/s, backlog and live")
    parser.add_argument("--points", type=int, default=20, help="points per sample")
    parser.add_argument("--after-s", type=float, default=3.0)
    parser.add_argument("--timeout-s", type=float, default=600.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dergw-drain-") as tmp:
        asyncio.run(run(args, Path(tmp)))


if __name__ == "__main__":
    main()

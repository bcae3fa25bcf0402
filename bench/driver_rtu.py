"""Benchmark `driver-rtu`: read latency and points/s of the SunSpec driver over Modbus RTU on a
socat pty. No budget.

One PV inverter (1/103/120/121/123) alone, then PV + meter polled concurrently on one bus. The
pty moves bytes at process speed: the figures measure the stack (pymodbus RTU framing, bus
lock, t3.5 pacing at 115200 baud), not a real line's baud rate. 300 reads per device (quick: 30).

    dergw bench driver-rtu [--quick]
"""

from __future__ import annotations

import asyncio
import time

from bench.core import BenchOptions, Figure, latency_figure
from drivers.contract import DeviceKind
from drivers.sunspec.driver import SunSpecModbusDriver, SunSpecModbusParams
from gateway.clock import SystemClock
from hil.rtu_sim import RtuSiteSimulator
from hil.server import SiteSimulator
from hil.site import parse_site

BENCH = "driver-rtu"
BAUD = 115200
SITE = """
name = "bench-rtu"
[[devices]]
id = "pv1"
kind = "pv"
unit_id = 1
rating_w = 10000
[[devices]]
id = "meter1"
kind = "meter"
role = "pcc"
unit_id = 4
"""


async def _poll(driver: SunSpecModbusDriver, n: int) -> tuple[list[float], int]:
    latencies: list[float] = []
    points = 0
    for _ in range(n):
        started = time.perf_counter()
        reading = await driver.read()
        latencies.append(time.perf_counter() - started)
        if not reading.ok:
            raise RuntimeError(f"RTU read of {driver.device_id} failed: {reading.error}")
        points += len(reading.schema)
    return latencies, points


async def run(options: BenchOptions) -> list[Figure]:
    reads = 30 if options.quick else 300
    figures: list[Figure] = []
    async with (
        SiteSimulator(parse_site(SITE)) as sim,
        RtuSiteSimulator(sim, baudrate=BAUD) as rtu,
    ):
        drivers = {
            d: SunSpecModbusDriver(
                d,
                DeviceKind.PV if d == "pv1" else DeviceKind.METER,
                SunSpecModbusParams(
                    transport="rtu",
                    serial_port=rtu.client_port,
                    baudrate=BAUD,
                    unit_id=rtu.unit_ids[d],
                    timeout_s=1.0,
                ),
                SystemClock(),
            )
            for d in ("pv1", "meter1")
        }
        try:
            for driver in drivers.values():
                await driver.connect()
            started = time.perf_counter()
            latencies, points = await _poll(drivers["pv1"], reads)
            wall = time.perf_counter() - started
            note = f"n={reads}, {BAUD} baud pty"
            figures += [
                latency_figure(BENCH, "read, PV alone on the bus", latencies, note=note),
                Figure(BENCH, "PV alone, points/s", points / wall, "points/s", note=note),
            ]
            started = time.perf_counter()
            results = await asyncio.gather(*(_poll(d, reads) for d in drivers.values()))
            wall = time.perf_counter() - started
            for device_id, (latencies, _) in zip(drivers, results, strict=True):
                figures.append(
                    latency_figure(
                        BENCH, f"read, {device_id} on a shared bus", latencies, note=note
                    )
                )
            total = sum(p for _, p in results) / wall
            figures.append(Figure(BENCH, "shared bus, points/s", total, "points/s", note=note))
        finally:
            for driver in drivers.values():
                await driver.close()
    return figures

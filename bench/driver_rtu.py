"""Read latency (p50/p99) and points/s of the SunSpec driver over Modbus RTU on a socat pty.

    .venv/bin/python bench/driver_rtu.py [--reads 300]

One PV inverter (1/103/120/121/123) alone, then PV + meter polled concurrently on one bus. The
pty moves bytes at process speed: the figures measure the stack (pymodbus RTU framing, bus
lock, t3.5 pacing at 115200 baud), not a real line's baud rate.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from drivers.contract import DeviceKind
from drivers.sunspec.driver import SunSpecModbusDriver, SunSpecModbusParams
from gateway.clock import SystemClock
from hil.rtu_sim import RtuSiteSimulator
from hil.server import SiteSimulator
from hil.site import parse_site

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


def pct(xs: list[float], q: float) -> float:
    return sorted(xs)[min(len(xs) - 1, int(q * len(xs)))]


async def poll(drv: SunSpecModbusDriver, n: int) -> tuple[list[float], int]:
    lat: list[float] = []
    points = 0
    for _ in range(n):
        t = time.perf_counter()
        r = await drv.read()
        lat.append((time.perf_counter() - t) * 1000)
        assert r.ok, r.error
        points += len(r.schema)
    return lat, points


async def main(reads: int) -> None:
    async with (
        SiteSimulator(parse_site(SITE)) as sim,
        RtuSiteSimulator(sim, baudrate=115200) as rtu,
    ):
        drivers = {
            d: SunSpecModbusDriver(
                d,
                DeviceKind.PV if d == "pv1" else DeviceKind.METER,
                SunSpecModbusParams(
                    transport="rtu",
                    serial_port=rtu.client_port,
                    baudrate=115200,
                    unit_id=rtu.unit_ids[d],
                    timeout_s=1.0,
                ),
                SystemClock(),
            )
            for d in ("pv1", "meter1")
        }
        for drv in drivers.values():
            await drv.connect()
        t0 = time.perf_counter()
        lat, points = await poll(drivers["pv1"], reads)
        wall = time.perf_counter() - t0
        print(
            f"rtu pv alone: p50 {statistics.median(lat):.2f} ms  p99 {pct(lat, 0.99):.2f} ms  "
            f"{points / wall:.0f} points/s"
        )
        t0 = time.perf_counter()
        results = await asyncio.gather(*(poll(d, reads) for d in drivers.values()))
        wall = time.perf_counter() - t0
        for name, (lat, _) in zip(drivers, results, strict=True):
            print(
                f"rtu shared bus {name}: p50 {statistics.median(lat):.2f} ms"
                f"  p99 {pct(lat, 0.99):.2f} ms"
            )
        print(f"rtu shared bus total: {sum(p for _, p in results) / wall:.0f} points/s")
        for drv in drivers.values():
            await drv.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--reads", type=int, default=300)
    asyncio.run(main(ap.parse_args().reads))

"""Benchmark `multi-site`: read latency per device on the mixed-protocol site
(hil/sites/multi.toml), loopback. No budget.

One `SiteSimulator` serves the four devices over Modbus TCP, Modbus RTU (pty), OPC UA and DNP3 on
one physics; each device's driver is built from the same config lines the HIL bench writes for the
gateway, connected, and read 200 times (quick: 20) in turn (sequentially, as one gateway poll
cycle would at worst). Per device: read latency p50 / p99, and points/s (points per reading /
mean latency) in the note.

    dergw bench multi-site [--quick]
"""

from __future__ import annotations

import statistics
import time
import tomllib
from dataclasses import replace
from pathlib import Path

from bench.core import BenchOptions, Figure, latency_figure
from drivers.contract import DeviceKind, Driver
from drivers.registry import create_driver, params_model
from gateway.clock import SystemClock
from hil.scenarios.harness import device_driver_lines
from hil.server import SiteSimulator
from hil.site import load_site

BENCH = "multi-site"
SITE = Path(__file__).resolve().parents[1] / "hil" / "sites" / "multi.toml"


def _driver(sim: SiteSimulator, device_id: str) -> Driver:
    spec = next(d for d in sim.spec.devices if d.id == device_id)
    name, lines = device_driver_lines(sim.endpoints[device_id])
    params = params_model(name).model_validate(tomllib.loads("\n".join(lines)))
    return create_driver(name, device_id, DeviceKind(spec.kind), params, SystemClock())


async def run(options: BenchOptions) -> list[Figure]:
    reads = 20 if options.quick else 200
    spec = load_site(SITE)
    figures: list[Figure] = []
    async with SiteSimulator(spec) as sim:
        drivers = {d.id: _driver(sim, d.id) for d in spec.devices}
        try:
            for device_id, driver in drivers.items():
                info = await driver.connect()
                latencies: list[float] = []
                points = 0
                bad = 0
                for _ in range(reads):
                    started = time.perf_counter()
                    reading = await driver.read()
                    latencies.append(time.perf_counter() - started)
                    points = len(reading.values)
                    bad += not reading.ok
                rate = points / statistics.fmean(latencies)
                figure = latency_figure(
                    BENCH,
                    f"read, {device_id} ({info.protocol})",
                    latencies,
                    note=f"n={reads}, {points} points, {rate:,.0f} points/s, bad {bad}",
                )
                figures.append(replace(figure, extra={"points_per_s": rate, "bad_reads": bad}))
        finally:
            for driver in drivers.values():
                await driver.close()
    return figures

"""Benchmark `driver-dnp3`: DNP3 driver read latency and points/s on loopback, against the 1815.2
plant simulator, for every DNP3 backend installed (pydnp3, dnp3py). No budget.

Each read is a full driver read: pipe to the master child, a poll and decoding into a Reading.
`integrity`: class 1/2/3 then class 0 of the whole 1815.2 `full` profile (1527 AI, 329 BI, 66 BO,
six fragments); `events`: class 1/2/3 only. 300 reads each (quick: 20) after 5 untimed.

    dergw bench driver-dnp3 [--quick]
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Literal

from bench.core import BenchOptions, Figure, latency_figure
from drivers.contract import DeviceKind
from drivers.dnp3.driver import Dnp3Driver, Dnp3Params, available_backends
from gateway.clock import SystemClock
from hil.dnp3_sim import Dnp3PlantSimulator

BENCH = "driver-dnp3"
BACKENDS = ("pydnp3", "dnp3py")
Poll = Literal["integrity", "events"]


async def _bench(backend: str, poll: Poll, reads: int) -> list[Figure]:
    async with Dnp3PlantSimulator() as sim:
        params = Dnp3Params.model_validate(
            {"host": "127.0.0.1", "port": sim.port, "backend": backend, "poll": poll}
        )
        driver = Dnp3Driver("plant1", DeviceKind.PV, params, SystemClock())
        try:
            info = await driver.connect()
            for _ in range(5):
                await driver.read()
            latencies: list[float] = []
            started = time.perf_counter()
            for _ in range(reads):
                began = time.perf_counter()
                reading = await driver.read()
                latencies.append(time.perf_counter() - began)
                if not reading.ok:
                    raise RuntimeError(f"DNP3 {backend} read failed: {reading.error}")
            total = time.perf_counter() - started
        finally:
            await driver.close()
    points = len(info.schema)
    note = f"n={reads}, {points} canonical points/read"
    return [
        latency_figure(BENCH, f"{poll} poll, {backend}", latencies, note=note),
        Figure(BENCH, f"{poll} poll, {backend}, points/s", reads * points / total, "points/s"),
    ]


async def run(options: BenchOptions) -> list[Figure]:
    reads = 20 if options.quick else 300
    installed = available_backends()
    missing = [b for b in BACKENDS if b not in installed]
    if missing:
        print(f"DNP3 backends not installed, not measured: {', '.join(missing)}", flush=True)
    figures: list[Figure] = []
    for backend in installed:
        for poll in ("integrity", "events"):
            figures += await _bench(backend, poll, reads)
    absent = f"{', '.join(missing)} not installed" if missing else ""
    return [replace(f, note=f"{f.note}; {absent}".lstrip("; ")) if absent else f for f in figures]

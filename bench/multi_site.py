"""Benchmark: read latency per device on the mixed-protocol site (hil/sites/multi.toml), loopback.

Not a test: it prints figures. One `SiteSimulator` serves the four devices over Modbus TCP,
Modbus RTU (pty), OPC UA and DNP3 on one physics; each device's driver is built from the same
config lines the HIL bench writes for the gateway, connected, and read `--reads` times in turn
(sequentially, as one gateway poll cycle would at worst). Per device: p50 / p99 read latency and
points/s (points per reading / mean latency).

    .venv/bin/python bench/multi_site.py [--reads 200]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import tomllib
from pathlib import Path
from typing import Any

from drivers.contract import DeviceKind
from drivers.registry import create_driver, params_model
from gateway.clock import SystemClock
from hil.scenarios.harness import device_driver_lines
from hil.server import SiteSimulator
from hil.site import load_site

SITE = Path(__file__).resolve().parents[1] / "hil" / "sites" / "multi.toml"


def _driver(sim: SiteSimulator, device_id: str) -> Any:
    spec = next(d for d in sim.spec.devices if d.id == device_id)
    name, lines = device_driver_lines(sim.endpoints[device_id])
    params = params_model(name).model_validate(tomllib.loads("\n".join(lines)))
    return create_driver(name, device_id, DeviceKind(spec.kind), params, SystemClock())


async def main(reads: int) -> None:
    spec = load_site(SITE)
    async with SiteSimulator(spec) as sim:
        drivers = {d.id: _driver(sim, d.id) for d in spec.devices}
        try:
            for device_id, driver in drivers.items():
                info = await driver.connect()
                lat: list[float] = []
                points = 0
                bad = 0
                for _ in range(reads):
                    t = time.perf_counter()
                    reading = await driver.read()
                    lat.append(time.perf_counter() - t)
                    points = len(reading.values)
                    bad += not reading.ok
                lat.sort()
                p50 = statistics.median(lat) * 1000
                p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1000
                rate = points / statistics.fmean(lat)
                print(
                    f"{device_id:<7} {info.protocol:<19} p50 {p50:6.1f} ms  p99 {p99:6.1f} ms  "
                    f"{points:3d} points  {rate:8.0f} points/s  bad {bad}/{reads}"
                )
        finally:
            for driver in drivers.values():
                await driver.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=200)
    asyncio.run(main(parser.parse_args().reads))

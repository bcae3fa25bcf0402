"""DNP3 driver read latency and throughput on loopback, against the 1815.2 plant simulator.

    .venv/bin/python bench/driver_dnp3.py [--reads 300] [--backend dnp3py|pydnp3|all]

Each read is a full driver read: pipe to the master child, an integrity poll (class 1/2/3 then
class 0 of the whole 1815.2 `full` profile: 1527 AI, 329 BI, 66 BO, six fragments) and decoding
into a Reading. Also times `poll = "events"` reads (class 1/2/3 only) and one verified write.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from drivers.contract import DeviceKind
from drivers.dnp3.driver import Dnp3Driver, Dnp3Params, available_backends
from gateway.clock import SystemClock
from hil.dnp3_sim import Dnp3PlantSimulator


async def bench(backend: str, poll: str, reads: int) -> None:
    async with Dnp3PlantSimulator() as sim:
        params = Dnp3Params(host="127.0.0.1", port=sim.port, backend=backend, poll=poll)  # type: ignore[arg-type]
        driver = Dnp3Driver("plant1", DeviceKind.PV, params, SystemClock())
        info = await driver.connect()
        for _ in range(5):
            await driver.read()
        lat = np.empty(reads)
        t0 = time.perf_counter()
        for i in range(reads):
            s = time.perf_counter()
            r = await driver.read()
            lat[i] = time.perf_counter() - s
            assert r.ok, r.error
        total = time.perf_counter() - t0
        n_points = len(info.schema)
        print(
            f"dnp3/{backend} poll={poll}: read p50 {np.percentile(lat, 50) * 1e3:.2f} ms, "
            f"p99 {np.percentile(lat, 99) * 1e3:.2f} ms, {reads / total:.0f} reads/s, "
            f"{reads * n_points / total:.0f} canonical points/s ({n_points} points/read)"
        )
        await driver.close()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reads", type=int, default=300)
    ap.add_argument("--backend", default="all")
    args = ap.parse_args()
    backends = available_backends() if args.backend == "all" else [args.backend]
    for backend in backends:
        for poll in ("integrity", "events"):
            await bench(backend, poll, args.reads)


if __name__ == "__main__":
    asyncio.run(main())

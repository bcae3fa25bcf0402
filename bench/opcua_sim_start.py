"""Start and restart time of the OPC UA battery simulator, with and without the address-space shelf.

`OpcUaBatterySim(aspace_cache=False)` builds asyncua's standard address space on every start (what
asyncua does by default); the default loads it from the shelf `hil.opcua_aspace` keeps on disk.
Usage: .venv/bin/python bench/opcua_sim_start.py [N]
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

from hil.opcua_aspace import aspace_cache_dir
from hil.opcua_sim import OpcUaBatterySim


async def _measure(cache: bool, n: int) -> tuple[list[float], list[float]]:
    starts: list[float] = []
    restarts: list[float] = []
    for _ in range(n):
        sim = OpcUaBatterySim(
            cert_dir=Path(tempfile.mkdtemp(prefix="dergw-bench-")), aspace_cache=cache
        )
        t = time.perf_counter()
        await sim.start()
        starts.append(time.perf_counter() - t)
        t = time.perf_counter()
        await sim.restart()
        restarts.append(time.perf_counter() - t)
        await sim.stop()
    return starts, restarts


def _fmt(samples: list[float]) -> str:
    median = statistics.median(samples)
    return f"median {median:.2f} s (min {min(samples):.2f}, max {max(samples):.2f})"


async def main(n: int) -> None:
    await _measure(True, 1)  # make sure the shelf exists before timing it
    print(f"shelf: {aspace_cache_dir()}")
    for cache in (False, True):
        starts, restarts = await _measure(cache, n)
        label = "from shelf" if cache else "built     "
        print(f"{label}: start {_fmt(starts)}; restart {_fmt(restarts)}; n={n}")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 3))

"""Benchmark `opcua-sim-start`: start and restart time of the OPC UA battery simulator, with and
without the address-space shelf. No budget.

`OpcUaBatterySim(aspace_cache=False)` builds asyncua's standard address space on every start (what
asyncua does by default); the default loads it from the shelf `hil.opcua_aspace` keeps on disk.
3 starts each (quick: 1).

    dergw bench opcua-sim-start [--quick]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from bench.core import BenchOptions, Figure, latency_figure
from hil.opcua_aspace import aspace_cache_dir
from hil.opcua_sim import OpcUaBatterySim

BENCH = "opcua-sim-start"


async def _measure(base: Path, cache: bool, n: int) -> tuple[list[float], list[float]]:
    starts: list[float] = []
    restarts: list[float] = []
    for i in range(n):
        sim = OpcUaBatterySim(cert_dir=base / f"{cache}-{i}", aspace_cache=cache)
        try:
            started = time.perf_counter()
            await sim.start()
            starts.append(time.perf_counter() - started)
            started = time.perf_counter()
            await sim.restart()
            restarts.append(time.perf_counter() - started)
        finally:
            await sim.stop()
    return starts, restarts


async def run(options: BenchOptions) -> list[Figure]:
    n = 1 if options.quick else 3
    figures: list[Figure] = []
    with tempfile.TemporaryDirectory(prefix="dergw-bench-opcua-", dir=options.workdir) as tmp:
        base = Path(tmp)
        await _measure(base / "warm", True, 1)  # the shelf exists before it is timed
        for cache in (False, True):
            starts, restarts = await _measure(base, cache, n)
            how = "from the shelf" if cache else "address space built"
            note = f"n={n}" + (f", shelf {aspace_cache_dir()}" if cache else "")
            figures += [
                latency_figure(BENCH, f"start, {how}", starts, unit="s", note=note),
                latency_figure(BENCH, f"restart, {how}", restarts, unit="s", note=note),
            ]
    return figures

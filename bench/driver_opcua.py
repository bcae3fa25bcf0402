"""Benchmark `driver-opcua`: read latency and points/s of the OPC UA driver against the OPC UA
battery simulator on loopback (Basic256Sha256 SignAndEncrypt). No budget.

`read()` serves the subscription cache, so its latency is the driver's own cost; the second
figure is the end-to-end freshness path: a one-shot Read of every point over the secure channel
(what a polling client would pay per read). 2,000 cached reads and 200 one-shot Reads (quick:
200 and 50).

    dergw bench driver-opcua [--quick]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from bench.core import BenchOptions, Figure, latency_figure
from drivers.contract import DeviceKind
from drivers.opcua.driver import OpcUaDriver, OpcUaParams
from gateway.clock import SystemClock
from hil.opcua_sim import OpcUaBatterySim, make_self_signed

BENCH = "driver-opcua"


def _figures(label: str, samples: list[float], points: int, unit: str) -> list[Figure]:
    rate = points * len(samples) / sum(samples)
    note = f"n={len(samples)}, {points} points"
    return [
        latency_figure(BENCH, label, samples, unit=unit, note=note),
        Figure(BENCH, f"{label}, points/s", rate, "points/s", note=f"n={len(samples)}"),
    ]


async def run(options: BenchOptions) -> list[Figure]:
    reads = 200 if options.quick else 2000
    with tempfile.TemporaryDirectory(prefix="dergw-bench-opcua-", dir=options.workdir) as tmp:
        base = Path(tmp)
        async with OpcUaBatterySim(cert_dir=base / "server") as sim:
            cert, key = make_self_signed(base / "client", "gw", "urn:dergw:gateway", server=False)
            params = OpcUaParams(url=sim.url, root="Battery1", client_cert=cert, client_key=key)
            driver = OpcUaDriver("bat1", DeviceKind.BATTERY, params, SystemClock())
            try:
                info = await driver.connect()
                points = len(info.schema)
                cached: list[float] = []
                for _ in range(reads):
                    started = time.perf_counter()
                    reading = await driver.read()
                    cached.append(time.perf_counter() - started)
                    if not reading.ok:
                        raise RuntimeError(f"OPC UA read failed: {reading.error}")
                # The secure session the driver holds, read directly: the one-shot path.
                session = driver._session
                if session is None:
                    raise RuntimeError("the OPC UA driver has no session after connect")
                polled: list[float] = []
                for _ in range(max(reads // 10, 50)):
                    started = time.perf_counter()
                    await session.client.read_attributes(session.nodes)
                    polled.append(time.perf_counter() - started)
            finally:
                await driver.close()
    return [
        *_figures("read() from the subscription cache", cached, points, "µs"),
        *_figures("one-shot Read of all points, secure", polled, points, "ms"),
    ]

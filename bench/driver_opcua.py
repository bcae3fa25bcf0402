"""Read latency and points/s of the OPC UA driver against the OPC UA battery simulator (loopback).

`read()` serves the subscription cache, so its latency is the driver's own cost; the second
figure is the end-to-end freshness path: a one-shot Read of every point over the secure channel
(what a polling client would pay per read). Usage: .venv/bin/python bench/driver_opcua.py [N]
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from drivers.contract import DeviceKind
from drivers.opcua.driver import OpcUaDriver, OpcUaParams
from gateway.clock import SystemClock
from hil.opcua_sim import OpcUaBatterySim, make_self_signed


def _report(label: str, samples: list[float], points: int) -> None:
    arr = np.array(samples) * 1e6
    total_s = sum(samples)
    print(
        f"{label}: n={len(samples)} p50={np.percentile(arr, 50):.1f} us "
        f"p99={np.percentile(arr, 99):.1f} us points/s={points * len(samples) / total_s:,.0f}"
    )


async def main(n: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="dergw-bench-opcua-"))
    async with OpcUaBatterySim(cert_dir=tmp / "server") as sim:
        cert, key = make_self_signed(tmp / "client", "gw", "urn:dergw:gateway", server=False)
        params = OpcUaParams(url=sim.url, root="Battery1", client_cert=cert, client_key=key)
        driver = OpcUaDriver("bat1", DeviceKind.BATTERY, params, SystemClock())
        info = await driver.connect()
        points = len(info.schema)
        cached: list[float] = []
        for _ in range(n):
            t = time.perf_counter()
            r = await driver.read()
            cached.append(time.perf_counter() - t)
            assert r.ok, r.error
        session = driver._session
        assert session is not None
        polled: list[float] = []
        for _ in range(max(n // 10, 50)):
            t = time.perf_counter()
            await session.client.read_attributes(session.nodes)
            polled.append(time.perf_counter() - t)
        await driver.close()
    print(f"OPC UA Basic256Sha256 SignAndEncrypt, {points} points, loopback")
    _report("read() from subscription cache", cached, points)
    _report("one-shot Read of all points (secure)", polled, points)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000))

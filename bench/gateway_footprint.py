"""Benchmark: the gateway process's resident memory and CPU, 20 devices at 1 s polling.

The real `dergw gateway run` process on the `hil/sites/bench-20.toml` site (simulated by
`dergw hil run`), streaming over gRPC to a real headend, the local console closed (its API socket
open, no client). After a warm-up the benchmark reads /proc/PID/status over a window:

* VmRSS, the budget figure: everything resident, including the shared libraries' file-backed
  pages (so it moves by several MB with the page cache; docs/benchmarks.md);
* RssAnon, the process's private memory, which does not;
* CPU: user + system time over the window / wall time (psutil).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import psutil

from bench.core import BenchOptions, Budget, Figure
from bench.e2e_telemetry import cpu_seconds, open_rig

BENCH = "gateway-footprint"
DEVICES = 20
RSS_BUDGET_MB = Budget("<=", 70)


def memory_mb(pid: int) -> dict[str, float]:
    """VmRSS, RssAnon, RssFile and VmHWM of a process, in MB (MiB, as /proc counts kB)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


async def run(options: BenchOptions) -> list[Figure]:
    warmup_s, window_s = (2.0, 2.0) if options.quick else (20.0, 10.0)
    transports = ("grpc",) if options.quick else ("grpc", "mqtt")
    async with open_rig(options, BENCH) as rig:
        await rig.start_site(DEVICES)
        await rig.start_headend(mqtt="mqtt" in transports)
        # One gateway per uplink, side by side on the same site: each imports only its own
        # uplink's library, which is most of the difference between them.
        gateways = {}
        for transport in transports:
            gateway_id = f"gw-footprint-{transport}"
            config = rig.gateway_config(
                gateway_id, DEVICES, poll_period_s=1.0, raw_points=False, transport=transport
            )
            gateways[transport] = await rig.start_gateway(config)
            await rig.wait_all_reporting(gateways[transport], gateway_id, DEVICES)
        await asyncio.sleep(warmup_s)
        processes = {t: psutil.Process(g.process.pid) for t, g in gateways.items()}
        cpu0, t0 = {t: cpu_seconds(p) for t, p in processes.items()}, time.monotonic()
        readings: dict[str, list[dict[str, float]]] = {t: [] for t in gateways}
        end = t0 + window_s
        while True:
            for transport, gateway in gateways.items():
                readings[transport].append(memory_mb(gateway.process.pid))
            if time.monotonic() >= end:
                break
            await asyncio.sleep(min(1.0, window_s / 4))
        elapsed = time.monotonic() - t0
        cpu_pct = {t: 100 * (cpu_seconds(p) - cpu0[t]) / elapsed for t, p in processes.items()}
    figures: list[Figure] = []
    for transport in transports:
        figures += _figures(transport, readings[transport], cpu_pct[transport], warmup_s, window_s)
    return figures


def _figures(
    transport: str,
    readings: list[dict[str, float]],
    cpu_pct: float,
    warmup_s: float,
    window_s: float,
) -> list[Figure]:
    vm_rss = max(r["VmRSS"] for r in readings)
    anon = max(r["RssAnon"] for r in readings)
    last = readings[-1]
    context = f"{DEVICES} devices, 1 s polling, {transport} uplink, console closed"
    return [
        Figure(
            bench=BENCH,
            name=f"gateway resident memory (VmRSS), {transport}",
            value=vm_rss,
            unit="MB",
            budget=RSS_BUDGET_MB,
            note=(
                f"largest VmRSS over a {window_s:.0f} s window after {warmup_s:.0f} s warm-up; "
                f"{context}; counts shared-library pages"
            ),
            extra={"readings": readings},
        ),
        Figure(
            bench=BENCH,
            name=f"gateway private memory (RssAnon), {transport}",
            value=anon,
            unit="MB",
            note=f"same window; RssFile {last['RssFile']:.1f} MB, VmHWM {last['VmHWM']:.1f} MB",
        ),
        Figure(
            bench=BENCH,
            name=f"gateway CPU, {transport}",
            value=cpu_pct,
            unit="%",
            note=f"of one core over the same {window_s:.0f} s window; {context}",
        ),
    ]

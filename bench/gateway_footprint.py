"""Benchmark: the gateway process's resident memory and CPU, 20 devices at 1 s polling.

The real `dergw gateway run` process on the `hil/sites/bench-20.toml` site, streaming to a real
headend, the local console closed (its API socket open, no client), in two set-ups side by side:

* plaintext (`[uplink] tls = false`), over gRPC and MQTT: the `Rig` of bench/e2e_telemetry.py
  (the site simulated by `dergw hil run`);
* as installed (`tls = true`, the default): the HIL bench with TLS (hil/scenarios/harness.py
  `open_bench(tls=True)`: a headend with `--tls-dir`, for MQTT a TLS broker, the gateway
  enrolled by `dergw enroll` with a one-time token), over gRPC and MQTT. mTLS needs the
  certificate files only; loading them must not bring in `cryptography` (gateway/identity.py).

After a warm-up the benchmark reads /proc/PID/status of every gateway over the same window:

* VmRSS, the budget figure: everything resident, including the shared libraries' file-backed
  pages (so it moves by several MB with the page cache; docs/benchmarks.md);
* RssAnon, the process's private memory, which does not;
* CPU: user + system time over the window / wall time (psutil).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import psutil

from bench.core import BenchOptions, Budget, Figure
from bench.e2e_telemetry import SITES, cpu_seconds, open_rig
from hil.scenarios.harness import ManagedProcess, open_bench
from hil.site import load_site

BENCH = "gateway-footprint"
DEVICES = 20
RSS_BUDGET_MB = Budget("<=", 70)
# Variants: the uplink transport, "-tls" for the as-installed set-up (enrolled, mTLS).
FULL_VARIANTS = ("grpc", "mqtt", "grpc-tls", "mqtt-tls")
QUICK_VARIANTS = ("grpc", "grpc-tls")


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
    variants = QUICK_VARIANTS if options.quick else FULL_VARIANTS
    plaintext = [v for v in variants if not v.endswith("-tls")]
    async with open_rig(options, BENCH) as rig, contextlib.AsyncExitStack() as stack:
        await rig.start_site(DEVICES)
        await rig.start_headend(mqtt="mqtt" in plaintext)
        # One gateway per variant, side by side: each imports only its own uplink's library
        # (and, with TLS, its certificate handling), which is most of the difference.
        gateways: dict[str, ManagedProcess] = {}
        for variant in plaintext:
            gateway_id = f"gw-footprint-{variant}"
            config = rig.gateway_config(
                gateway_id, DEVICES, poll_period_s=1.0, raw_points=False, transport=variant
            )
            gateways[variant] = await rig.start_gateway(config)
            await rig.wait_all_reporting(gateways[variant], gateway_id, DEVICES)
        for variant in variants:
            if variant.endswith("-tls"):
                gateways[variant] = await _start_enrolled_gateway(stack, rig.workdir, variant)
        await asyncio.sleep(warmup_s)
        processes = {v: psutil.Process(g.process.pid) for v, g in gateways.items()}
        cpu0, t0 = {v: cpu_seconds(p) for v, p in processes.items()}, time.monotonic()
        readings: dict[str, list[dict[str, float]]] = {v: [] for v in gateways}
        end = t0 + window_s
        while True:
            for variant, gateway in gateways.items():
                readings[variant].append(memory_mb(gateway.process.pid))
            if time.monotonic() >= end:
                break
            await asyncio.sleep(min(1.0, window_s / 4))
        elapsed = time.monotonic() - t0
        cpu_pct = {v: 100 * (cpu_seconds(p) - cpu0[v]) / elapsed for v, p in processes.items()}
    figures: list[Figure] = []
    for variant in variants:
        figures += _figures(variant, readings[variant], cpu_pct[variant], warmup_s, window_s)
    return figures


async def _start_enrolled_gateway(
    stack: contextlib.AsyncExitStack, workdir: Path, variant: str
) -> ManagedProcess:
    """A gateway as installed (`variant` "grpc-tls" / "mqtt-tls"): the HIL bench with TLS, its
    own headend (and broker), the gateway enrolled; running once every device is registered."""
    transport = variant.removesuffix("-tls")
    bench = await stack.enter_async_context(
        open_bench(
            load_site(SITES / f"bench-{DEVICES}.toml"),
            workdir / variant,
            gateway_id=f"gw-footprint-{variant}",
            site_id=f"site-footprint-{variant}",
            transport=transport,
            tls=True,
            poll_period_s=1.0,
            control_period_s=1.0,
        )
    )
    gateway = await bench.start_gateway()
    await bench.wait_registered(timeout_s=60)
    return gateway


def _figures(
    variant: str,
    readings: list[dict[str, float]],
    cpu_pct: float,
    warmup_s: float,
    window_s: float,
) -> list[Figure]:
    vm_rss = max(r["VmRSS"] for r in readings)
    anon = max(r["RssAnon"] for r in readings)
    last = readings[-1]
    transport, tls = variant.removesuffix("-tls"), variant.endswith("-tls")
    uplink = f"{transport} uplink" + (", mTLS, enrolled" if tls else ", plaintext")
    context = f"{DEVICES} devices, 1 s polling, {uplink}, console closed"
    return [
        Figure(
            bench=BENCH,
            name=f"gateway resident memory (VmRSS), {variant}",
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
            name=f"gateway private memory (RssAnon), {variant}",
            value=anon,
            unit="MB",
            note=f"same window; RssFile {last['RssFile']:.1f} MB, VmHWM {last['VmHWM']:.1f} MB",
        ),
        Figure(
            bench=BENCH,
            name=f"gateway CPU, {variant}",
            value=cpu_pct,
            unit="%",
            note=f"of one core over the same {window_s:.0f} s window; {context}",
        ),
    ]

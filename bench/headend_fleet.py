"""Benchmark: how many gateways one headend process holds, intent fan-out, mass reconnect.

A real `dergw headend run` (plaintext gRPC: a headend without --tls-dir admits a gateway at its
word, so thousands of simulated gateways need no enrollment; TLS would add the handshake and the
record layer) on SQLite on disk, then on a fresh PostgreSQL database. The load is `hil.fleet`:
simulated gateways on the real GatewayLink protocol, each its own TCP connection, in separate
worker processes, one batch (one DeviceSample of 20 points) per second each, staggered.

Per database:
* N is stepped up (STEPS) by adding gateways to the running fleet (their connects spread below
  the headend's admission rate); after all are connected, a steady window measures the ack
  latency (send -> Ack covering the seq). The first step with ack p99 >= 1 s, or that does not
  get every gateway connected and acked, stops the stepping; the figure is the largest N that
  held, with its latency, the headend's CPU% and RSS and the load generator's CPU%.
* fan-out: the fleet is brought back to that N, every gateway shares one site, and one intent
  is posted to it; the time from just before the POST until the last gateway received its
  signed copy (the headend reads, signs and sends one per gateway).
* mass reconnect: the headend is restarted (SIGTERM, start again on the same ports) with the
  fleet connected; the time from "ready" until 50 / 90 / 100 % are connected again (paced by
  the headend's admission limiter: burst 400, then 200/s, RetryAfter for the rest) and the
  latency of GET /healthz (which reads the store) meanwhile.

The machine runs the headend and the load generator on the same 2 cores: both processes' CPU%
is reported, since the load generator's own cost bounds what can be measured here.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench.core import BenchOptions, Budget, Figure, latency_figure, percentile
from hil.fleet import Fleet, FleetSpec, Second, reconnect_curve
from hil.scenarios.harness import (
    DEFAULT_POSTGRES_URL,
    BenchError,
    HeadendApi,
    ManagedProcess,
    fresh_postgres_database,
    spawn_dergw,
    wait_headend_ready,
)

NAME = "headend-fleet"
STEPS = (1000, 2000, 2500, 3000, 4000, 5000, 7000)
QUICK_STEPS = (30,)
WINDOW_S = 5.0
QUICK_WINDOW_S = 2.0
ACK_P99_LIMIT_S = 1.0
# Just below the headend's admission rate (200/s after a burst of 400): stepping up is hardly
# refused; the mass reconnect is what exercises the limiter.
CONNECTS_PER_S = 180.0
# The reconnect curve is followed this long after the restart: the last gateways' backoff (full
# jitter, doubling up to 30 s while the headend was down) makes a long thin tail.
RECONNECT_WAIT_S = 45.0
SITE_PREFIX = "bench"
SITE_ID = f"{SITE_PREFIX}-site-00000"


@dataclass
class _Headend:
    """A `dergw headend run` child process on fixed ports once started (restart keeps them)."""

    workdir: Path
    db: str
    grpc_addr: str = "127.0.0.1:0"
    http_addr: str = "127.0.0.1:0"
    process: ManagedProcess | None = None
    api: HeadendApi | None = None

    def args(self) -> list[str]:
        return [
            "headend",
            "run",
            "--grpc",
            self.grpc_addr,
            "--http",
            self.http_addr,
            "--db",
            self.db,
            "--admin-token-file",
            str(self.workdir / "admin-token"),
            "--signing-key",
            str(self.workdir / "signing-key.pem"),
            "--log-level",
            "WARNING",
        ]

    async def start(self) -> None:
        append = self.process is not None
        self.process = await spawn_dergw(
            "headend", self.args(), self.workdir / "headend.log", append=append
        )
        self.grpc_addr, self.http_addr = await wait_headend_ready(self.process)
        token = (self.workdir / "admin-token").read_text().strip()
        self.api = HeadendApi(f"http://{self.http_addr}", token)

    async def stop(self) -> None:
        if self.process is not None:
            await self.process.stop()

    @property
    def pid(self) -> int:
        if self.process is None:
            raise BenchError("the headend is not started")
        return self.process.process.pid


@dataclass
class _Load:
    """Fleets added one after another (one worker process each), read as one fleet."""

    target: str
    backend: str
    fleets: list[Fleet] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.sizes)

    async def add(self, count: int) -> None:
        spec = FleetSpec(
            target=self.target,
            gateways=count,
            id_prefix=f"{self.backend}{self.total}",
            site_prefix=SITE_PREFIX,
        )
        fleet = Fleet(spec, processes=1, connect_over_s=count / CONNECTS_PER_S)
        await fleet.start()
        self.fleets.append(fleet)
        self.sizes.append(count)

    async def remove_last(self) -> None:
        fleet = self.fleets.pop()
        self.sizes.pop()
        await fleet.stop(drain_s=2.0)

    @property
    def connected(self) -> int:
        return sum(fleet.connected for fleet in self.fleets)

    async def wait_for(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() > deadline:
                return False
            for fleet in self.fleets:
                fleet.check()
            await asyncio.sleep(0.2)
        return True

    def seconds(self, since: float, until: float | None = None) -> list[Second]:
        """Seconds every fleet reported, merged, in order."""
        merged: dict[int, Second] = {}
        reported: dict[int, int] = {}
        for fleet in self.fleets:
            for second in fleet.window(since, until):
                merged.setdefault(second.t, Second(second.t)).merge(second)
                reported[second.t] = reported.get(second.t, 0) + 1
        return [merged[t] for t in sorted(merged) if reported[t] == len(self.fleets)]

    def intent_times(self, version: int) -> list[float]:
        return [t for fleet in self.fleets for t in fleet.intent_times.get(version, [])]

    @property
    def pids(self) -> list[int]:
        return [pid for fleet in self.fleets for pid in fleet.pids]

    async def kill(self) -> None:
        for fleet in self.fleets:
            await fleet.kill()


def _postgres_pids() -> list[int]:
    """Every PostgreSQL server process on this machine (other users of the server included)."""
    return [p.pid for p in psutil.process_iter(["name"]) if p.info["name"] == "postgres"]


def _cpu_s(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
    return total


@dataclass
class _Step:
    gateways: int
    connected: int
    acked_per_s: float
    latencies_s: list[float]
    headend_cpu_pct: float
    headend_rss_mb: float
    fleet_cpu_pct: float
    failure: str = ""
    database_cpu_pct: float | None = None  # the PostgreSQL server's processes

    @property
    def p99_s(self) -> float:
        return percentile(self.latencies_s, 99)

    def to_json(self) -> dict[str, Any]:
        return {
            "gateways": self.gateways,
            "connected": self.connected,
            "acked_per_s": round(self.acked_per_s, 1),
            "ack_p50_ms": round(percentile(self.latencies_s, 50) * 1e3, 1),
            "ack_p99_ms": round(self.p99_s * 1e3, 1),
            "headend_cpu_pct": round(self.headend_cpu_pct, 1),
            "headend_rss_mb": round(self.headend_rss_mb, 1),
            "fleet_cpu_pct": round(self.fleet_cpu_pct, 1),
            "database_cpu_pct": (
                None if self.database_cpu_pct is None else round(self.database_cpu_pct, 1)
            ),
            "failure": self.failure,
        }


async def _step(load: _Load, headend: _Headend, gateways: int, window_s: float) -> _Step:
    added = gateways - load.total
    await load.add(added)
    if not await load.wait_for(lambda: load.connected >= gateways, added / CONNECTS_PER_S + 20):
        return _Step(gateways, load.connected, 0, [], 0, 0, 0, "not all gateways connected")
    await asyncio.sleep(2.0)  # the newest gateways' first batches
    fleet_pids = load.pids
    started = time.time()
    database_pids = _postgres_pids() if headend.db.startswith("postgresql:") else []
    headend_cpu, fleet_cpu = _cpu_s([headend.pid]), _cpu_s(fleet_pids)
    database_cpu = _cpu_s(database_pids)
    await asyncio.sleep(window_s + 1.5)  # + the seconds still being reported
    ended = started + window_s
    elapsed = time.time() - started
    headend_cpu_pct = 100 * (_cpu_s([headend.pid]) - headend_cpu) / elapsed
    fleet_cpu_pct = 100 * (_cpu_s(fleet_pids) - fleet_cpu) / elapsed
    database_cpu_pct = 100 * (_cpu_s(database_pids) - database_cpu) / elapsed
    rss_mb = psutil.Process(headend.pid).memory_info().rss / 2**20
    seconds = load.seconds(math.ceil(started), ended)
    latencies = [x for s in seconds for x in s.latencies_s]
    acked_per_s = sum(s.acked for s in seconds) / max(1, len(seconds))
    step = _Step(
        gateways,
        load.connected,
        acked_per_s,
        latencies,
        headend_cpu_pct,
        rss_mb,
        fleet_cpu_pct,
    )
    if database_pids:
        step.database_cpu_pct = database_cpu_pct
    if not latencies or step.p99_s >= ACK_P99_LIMIT_S:
        step.failure = f"ack p99 {step.p99_s * 1e3:.0f} ms"
    elif acked_per_s < 0.9 * gateways:
        step.failure = f"only {acked_per_s:.0f} batches acked/s"
    return step


async def _fan_out(load: _Load, headend: _Headend) -> tuple[float, list[float], int]:
    """(s until the last gateway received it, every gateway's delay, gateways reached)."""
    assert headend.api is not None
    expected = load.connected
    posted = time.time()
    created = await headend.api.post(
        f"/sites/{SITE_ID}/intents", {"default_control": {"export_limit_w": 4000.0}}
    )
    version = int(created["version"])
    await load.wait_for(lambda: len(load.intent_times(version)) >= expected, 30.0)
    await asyncio.sleep(1.2)  # the last second's report
    delays = sorted(t - posted for t in load.intent_times(version))
    return (delays[-1] if delays else math.nan), delays, len(delays)


@dataclass
class _Reconnect:
    down_s: float
    reached: dict[int, float | None]
    curve: list[tuple[float, int]]
    healthz_s: list[float]
    healthz_failures: int
    gateways: int
    retry_afters: int  # RetryAfter answers of the admission limiter during the reconnect


async def _mass_reconnect(load: _Load, headend: _Headend) -> _Reconnect:
    assert headend.api is not None
    expected = load.connected
    stopping = time.time()
    await headend.stop()
    await headend.start()
    ready = time.time()
    api = headend.api
    latencies: list[float] = []
    failures = 0

    async def poll() -> None:
        nonlocal failures
        while True:
            started = time.monotonic()
            try:
                await api.get("/healthz")
                latencies.append(time.monotonic() - started)
            except (BenchError, OSError):
                failures += 1
            await asyncio.sleep(max(0.0, 0.1 - (time.monotonic() - started)))

    poller = asyncio.create_task(poll())
    try:
        await load.wait_for(lambda: load.connected >= expected, RECONNECT_WAIT_S)
    finally:
        poller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await poller
    await asyncio.sleep(1.2)
    seconds = load.seconds(math.floor(stopping))
    curve, reached = reconnect_curve(seconds, ready, expected)
    retry_afters = sum(second.retry_afters for second in seconds)
    return _Reconnect(ready - stopping, reached, curve, latencies, failures, expected, retry_afters)


async def _run_backend(backend: str, db: str, workdir: Path, options: BenchOptions) -> list[Figure]:
    steps = QUICK_STEPS if options.quick else STEPS
    window_s = QUICK_WINDOW_S if options.quick else WINDOW_S
    await asyncio.to_thread(workdir.mkdir, parents=True, exist_ok=True)
    headend = _Headend(workdir, db)
    await headend.start()
    load = _Load(headend.grpc_addr, backend)
    try:
        results: list[_Step] = []
        for gateways in steps:
            step = await _step(load, headend, gateways, window_s)
            results.append(step)
            if step.failure:
                await load.remove_last()
                break
        held = [s for s in results if not s.failure]
        best = held[-1] if held else results[0]
        await asyncio.sleep(2.0)  # settle at the N that held
        fan_out_s, delays, reached = await _fan_out(load, headend)
        reconnect = await _mass_reconnect(load, headend)
    finally:
        await load.kill()
        await headend.stop()
    return _figures(backend, best if held else None, results, fan_out_s, delays, reached, reconnect)


def _cpu_per_batch_us(step: _Step) -> float:
    if step.acked_per_s <= 0:
        return math.nan
    return step.headend_cpu_pct / 100 / step.acked_per_s * 1e6


def _figures(
    backend: str,
    best: _Step | None,
    steps: list[_Step],
    fan_out_s: float,
    delays: list[float],
    reached: int,
    reconnect: _Reconnect,
) -> list[Figure]:
    label = {"sqlite": "SQLite", "pg": "PostgreSQL"}[backend]
    load_note = "headend and load generator share 2 cores"
    held = best.gateways if best is not None else 0
    shown = best if best is not None else steps[0]
    step_table = [s.to_json() for s in steps]
    figures = [
        Figure(
            bench=NAME,
            name=f"gateways held, 1 batch/s each, ack p99 < 1 s ({label})",
            value=float(held),
            unit="gateways",
            budget=Budget(">=", 5000),
            note=f"steps {', '.join(str(s.gateways) for s in steps)}; stopped at: "
            f"{steps[-1].failure or 'last step'}; {load_note}",
            extra={"steps": step_table},
        ),
        latency_figure(
            NAME,
            f"ack latency at {shown.gateways} gateways ({label})",
            shown.latencies_s,
            budget=Budget("<=", ACK_P99_LIMIT_S * 1e3, checked="p99"),
            note=f"n={len(shown.latencies_s)} batches, {shown.acked_per_s:.0f} acked/s",
        ),
        Figure(
            bench=NAME,
            name=f"headend CPU at {shown.gateways} gateways ({label})",
            value=shown.headend_cpu_pct,
            unit="%",
            note=f"RSS {shown.headend_rss_mb:.0f} MB; load generator "
            f"{shown.fleet_cpu_pct:.0f} % CPU"
            + (
                ""
                if shown.database_cpu_pct is None
                else f"; PostgreSQL server {shown.database_cpu_pct:.0f} % CPU"
            ),
            extra={
                "headend_rss_mb": shown.headend_rss_mb,
                "fleet_cpu_pct": shown.fleet_cpu_pct,
                "database_cpu_pct": shown.database_cpu_pct,
            },
        ),
        Figure(
            # What bounds N on one process: its Python runs under one GIL, so one core's worth
            # of CPU divided by this is the most batches/s it can take, whatever the cores.
            bench=NAME,
            name=f"headend CPU per batch at {shown.gateways} gateways ({label})",
            value=_cpu_per_batch_us(shown),
            unit="µs",
            note=f"one core holds ~{1e6 / _cpu_per_batch_us(shown):,.0f} batches/s at this cost"
            if _cpu_per_batch_us(shown) > 0
            else "",
        ),
        Figure(
            bench=NAME,
            name=f"intent fan-out to {reached} gateways of one site ({label})",
            value=fan_out_s,
            unit="s",
            p50=statistics.median(delays) if delays else None,
            note="POST -> last gateway received its signed copy; p50 = median gateway",
        ),
    ]
    share = reconnect.reached

    def text(value: float | None) -> str:
        return "never" if value is None else f"{value:.1f} s"

    figures.append(
        Figure(
            bench=NAME,
            name=f"mass reconnect of {reconnect.gateways} gateways to 100 % ({label})",
            value=share[100] if share[100] is not None else math.nan,
            unit="s",
            note=f"from headend ready: 50 % {text(share[50])}, 90 % {text(share[90])}; "
            f"headend down {reconnect.down_s:.1f} s; admission (400 burst + 200/s) answered "
            f"{reconnect.retry_afters} RetryAfter",
            extra={
                "curve": reconnect.curve,
                "reached": share,
                "retry_afters": reconnect.retry_afters,
            },
        )
    )
    healthz = latency_figure(
        NAME,
        f"GET /healthz during the reconnect ({label})",
        reconnect.healthz_s,
        note=f"n={len(reconnect.healthz_s)}, {reconnect.healthz_failures} failed, every 100 ms",
    )
    figures.append(healthz)
    return figures


@contextlib.asynccontextmanager
async def _workdir(options: BenchOptions) -> AsyncIterator[Path]:
    with tempfile.TemporaryDirectory(prefix="dergw-bench-fleet-", dir=options.workdir) as name:
        yield Path(name)


async def run(options: BenchOptions) -> list[Figure]:
    figures: list[Figure] = []
    async with _workdir(options) as workdir:
        figures += await _run_backend(
            "sqlite", str(workdir / "sqlite" / "headend.sqlite3"), workdir / "sqlite", options
        )
        if options.quick:
            return figures  # PostgreSQL: the full run only (the quick run stays ~15 s)
        try:
            async with fresh_postgres_database(DEFAULT_POSTGRES_URL) as url:
                figures += await _run_backend("pg", url, workdir / "pg", options)
        except BenchError as exc:
            figures.append(
                Figure(
                    bench=NAME,
                    name="gateways held (PostgreSQL)",
                    value=math.nan,
                    unit="gateways",
                    budget=Budget(">=", 5000),
                    note=f"not run: {exc}",
                )
            )
    return figures

"""Benchmark: the headend store's `commit_telemetry` under many concurrent gateways.

A component benchmark of the storage side of "N gateways at 1 batch/s each" (the fleet figure
over the real gRPC protocol is `headend-fleet`). The store is opened directly - SQLite on a file
on disk (synchronous=FULL), PostgreSQL in a fresh database (synchronous_commit=on), both as the
headend opens them - N gateways are registered, then N asyncio tasks each commit one batch a
second, staggered over the second: each batch is one DeviceSample of 20 points, planned by the
real `plan_telemetry`, with the gateway's next seq. A gateway whose commit takes longer than its
slot sends the next batch as soon as it returns (one batch in flight per gateway, as a stream).

Reported per N, after a warm-up: commit latency (the call of `commit_telemetry` to its return,
i.e. to the moment the link may ack) p50/p99; committed batches/s against the offered N/s; "late
slots", batches that started over 1 s after their slot (the store fell behind); and CPU per
batch of this process (generator, plan_telemetry, store) and of the store's own worker (SQLite's
worker thread, or the PostgreSQL server processes of the database). No budget: the fleet budget
(ack p99 < 1 s at >= 5,000 gateways) is judged by `headend-fleet`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil
import psycopg

from bench.core import BenchOptions, Figure, latency_figure
from dergw.v1 import pb, timestamp_from_ns
from headend_min.ingest import plan_telemetry, registration_from_pb
from headend_min.model import StreamRef
from headend_min.pg_store import PgStore
from headend_min.sqlite_store import SqliteStore
from headend_min.store import Store, StoreError
from hil.scenarios.harness import DEFAULT_POSTGRES_URL, BenchError, fresh_postgres_database

NAME = "headend-commit"
POINTS_PER_SAMPLE = 20


@dataclass(frozen=True)
class _Plan:
    gateway_counts: tuple[int, ...]
    duration_s: float  # of each measured run, after the warm-up
    warmup_s: float


FULL = _Plan(gateway_counts=(1000, 2500, 5000), duration_s=6.0, warmup_s=1.5)
QUICK = _Plan(gateway_counts=(200,), duration_s=1.5, warmup_s=0.5)


@dataclass
class _Run:
    latencies_s: list[float]
    committed: int
    elapsed_s: float
    cpu_s: float  # this process (the store's callers, the store, its SQLite worker)
    store_cpu_s: float  # the store's own work: SQLite's worker thread, or the PG backends
    late_starts: int  # batches that started more than 1 s after their slot (store fell behind)
    errors: int  # commits that failed (StoreError: e.g. no pool connection within its timeout)


def _gateway_id(index: int) -> str:
    return f"gw-{index:05d}"


def _register_message(gateway_id: str) -> pb.Register:
    return pb.Register(
        gateway_id=gateway_id,
        software_version="bench",
        site=pb.Site(site_id=f"site-{gateway_id}", name="bench", substation="s", feeder="f"),
        devices=[pb.Device(device_id="inverter-1", kind=pb.DEVICE_KIND_PV, protocol="bench")],
        next_seq=1,
        boot_id="bench-boot",
    )


async def _register_all(store: Store, count: int) -> None:
    limit = asyncio.Semaphore(8)

    async def one(index: int) -> None:
        gateway_id = _gateway_id(index)
        async with limit:
            await store.register_gateway(
                registration_from_pb(_register_message(gateway_id)),
                StreamRef(gateway_id, "bench"),
                time.time_ns(),
            )

    await asyncio.gather(*(one(i) for i in range(count)))


class _Gateway:
    """One simulated gateway: its next seq and a 20-point sample it re-stamps per batch."""

    def __init__(self, gateway_id: str) -> None:
        self.gateway_id = gateway_id
        self.next_seq = 1
        self._names = [f"point_{i:02d}" for i in range(POINTS_PER_SAMPLE)]
        self._units = (["W", "V", "A", "Hz", "%"] * 4)[:POINTS_PER_SAMPLE]

    def batch(self) -> pb.TelemetryBatch:
        seq = self.next_seq
        self.next_seq += 1
        now_ns = time.time_ns()
        sample = pb.DeviceSample(
            device_id="inverter-1",
            time=timestamp_from_ns(now_ns),
            monotonic_ns=time.monotonic_ns(),
            names=self._names,
            units=self._units,
            values=[1000.0 + 17.25 * j + seq for j in range(POINTS_PER_SAMPLE)],
            quality=[pb.QUALITY_GOOD] * POINTS_PER_SAMPLE,
            boot_id="bench-boot",
            clock_synced=True,
        )
        return pb.TelemetryBatch(
            gateway_id=self.gateway_id,
            first_seq=seq,
            last_seq=seq,
            records=[pb.Record(seq=seq, sample=sample)],
        )


async def _measure(
    store: Store,
    store_cpu: _CpuProbe,
    gateways: Sequence[_Gateway],
    duration_s: float,
    warmup_s: float,
) -> _Run:
    """Every gateway commits one batch a second (slots staggered over the second) until the end;
    samples count from the end of the warm-up."""
    count = len(gateways)
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.2
    measure_from = start + warmup_s
    stop = measure_from + duration_s
    latencies: list[float] = []
    late = errors = 0

    async def stream(index: int, gateway: _Gateway) -> None:
        nonlocal late, errors
        slot = start + index / count
        while slot < stop:
            delay = slot - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            elif -delay > 1.0 and slot >= measure_from:
                late += 1
            rows = plan_telemetry(gateway.batch(), gateway.gateway_id)
            began = time.perf_counter()
            try:
                await store.commit_telemetry(rows, time.time_ns())
            except StoreError:
                errors += 1
                gateway.next_seq -= 1  # resent as the gateway would, after its reconnect
            else:
                if slot >= measure_from:
                    latencies.append(time.perf_counter() - began)
            slot += 1.0

    tasks = [asyncio.create_task(stream(i, g)) for i, g in enumerate(gateways)]
    try:
        await asyncio.sleep(max(0.0, measure_from - loop.time()))
        cpu_before = time.process_time()
        store_cpu_before = await store_cpu()
        wall_before = time.perf_counter()
        await asyncio.gather(*tasks)
        elapsed_s = time.perf_counter() - wall_before
        cpu_s = time.process_time() - cpu_before
        store_cpu_s = await store_cpu() - store_cpu_before
    finally:
        for task in tasks:
            task.cancel()
    return _Run(
        latencies_s=latencies,
        committed=len(latencies),
        elapsed_s=elapsed_s,
        cpu_s=cpu_s,
        store_cpu_s=store_cpu_s,
        late_starts=late,
        errors=errors,
    )


_CpuProbe = Callable[[], Awaitable[float]]


def _sqlite_worker_cpu() -> _CpuProbe:
    """CPU seconds of the SqliteStore worker thread (statements, binding, fsync waits excluded)."""

    async def seconds() -> float:
        ids = {t.native_id for t in threading.enumerate() if t.name.startswith("headend-sqlite")}
        return sum(t.user_time + t.system_time for t in psutil.Process().threads() if t.id in ids)

    return seconds


def _postgres_backends_cpu(url: str) -> _CpuProbe:
    """CPU seconds of the server processes serving `url`'s database (the store's pool)."""
    seen: dict[int, float] = {}

    async def seconds() -> float:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            cursor = await conn.execute(
                "SELECT pid FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            pids = [int(pid) for (pid,) in await cursor.fetchall()]
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                times = psutil.Process(pid).cpu_times()
                seen[pid] = times.user + times.system
        # A backend that went away keeps its last reading, so the difference stays meaningful.
        return sum(seen.values())

    return seconds


def _figures(backend: str, count: int, run: _Run, duration_s: float) -> list[Figure]:
    note = (
        f"{count} gateways x 1 batch/s (1 sample, 20 points), {duration_s:g} s measured, "
        f"late slots {run.late_starts}, failed commits {run.errors}"
    )
    latency = latency_figure(
        NAME, f"{backend}: commit latency, {count} gateways", run.latencies_s, note=note
    )
    rate = run.committed / run.elapsed_s if run.elapsed_s > 0 else math.nan
    cpu_us = 1e6 * run.cpu_s / run.committed if run.committed else math.nan
    store_us = 1e6 * run.store_cpu_s / run.committed if run.committed else math.nan
    store_part = "SQLite worker thread" if backend == "SQLite" else "PostgreSQL backends"
    return [
        latency,
        Figure(
            bench=NAME,
            name=f"{backend}: committed batches/s, {count} gateways",
            value=rate,
            unit="batches/s",
            note=(
                f"offered {count}/s; CPU per batch: this process {cpu_us:.0f} µs "
                f"(generator, plan_telemetry, store), {store_part} {store_us:.0f} µs"
            ),
            extra={
                "gateways": count,
                "committed": run.committed,
                "elapsed_s": run.elapsed_s,
                "cpu_s": run.cpu_s,
                "store_cpu_s": run.store_cpu_s,
                "late_slots": run.late_starts,
                "errors": run.errors,
            },
        ),
    ]


async def _sweep(store: Store, store_cpu: _CpuProbe, backend: str, plan: _Plan) -> list[Figure]:
    """One measured run per gateway count, on a store where the largest count is registered."""
    largest = max(plan.gateway_counts)
    gateways = [_Gateway(_gateway_id(i)) for i in range(largest)]
    figures: list[Figure] = []
    for count in plan.gateway_counts:
        run = await _measure(store, store_cpu, gateways[:count], plan.duration_s, plan.warmup_s)
        figures += _figures(backend, count, run, plan.duration_s)
    return figures


@contextlib.asynccontextmanager
async def _workdir(options: BenchOptions) -> AsyncIterator[Path]:
    with tempfile.TemporaryDirectory(prefix="dergw-commit-", dir=options.workdir) as tmp:
        yield Path(tmp)


async def _sqlite(options: BenchOptions, plan: _Plan) -> list[Figure]:
    async with _workdir(options) as tmp:
        path = tmp / "headend.sqlite3"
        # Registering thousands of gateways is set-up, not the figure: no fsync per register.
        setup = await SqliteStore.open(path, synchronous="NORMAL")
        try:
            await _register_all(setup, max(plan.gateway_counts))
        finally:
            await setup.close()
        store = await SqliteStore.open(path)
        try:
            return await _sweep(store, _sqlite_worker_cpu(), "SQLite", plan)
        finally:
            await store.close()


async def _postgres(plan: _Plan) -> list[Figure]:
    try:
        async with fresh_postgres_database(DEFAULT_POSTGRES_URL) as url:
            store = await PgStore.open(url)
            try:
                await _register_all(store, max(plan.gateway_counts))
                return await _sweep(store, _postgres_backends_cpu(url), "PostgreSQL", plan)
            finally:
                await store.close()
    except BenchError as exc:
        return [
            Figure(
                bench=NAME,
                name="PostgreSQL: commit latency",
                value=math.nan,
                unit="ms",
                note=f"not measured: {exc}",
            )
        ]


async def run(options: BenchOptions) -> list[Figure]:
    plan = QUICK if options.quick else FULL
    return [*await _sqlite(options, plan), *await _postgres(plan)]

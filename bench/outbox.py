"""Benchmark `outbox`: outbox append and drain throughput, in points/s.

Budgets (ARCHITECTURE.md): >= 500,000 points/s appended and >= 200,000 points/s drained. A point
is one value of a DeviceSample; the rows are realistic samples of 20 points (names, units, values,
quality, boot id, clock state) as the pollers record them. Appends are batched as the recorder
commits them (one transaction per 1,000 rows); the drain is what the uplink does per batch:
read_after (whose first call fsyncs) and then ack of the batch. Each figure is the median of 5
runs on a fresh file (quick: 1 run of a tenth of the rows).

Also measured: appending while the quota is full, so that every 5 % of quota the oldest raw
samples are thinned to aggregates (the shedding policy's first step).

    dergw bench outbox [--quick]
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.core import BenchOptions, Budget, Figure
from dergw.v1 import MAX_RECORDS_PER_BATCH, pb, timestamp_from_ns
from gateway.clock import SystemClock
from gateway.outbox import ROW_OVERHEAD_BYTES, Outbox, RecordKind

BENCH = "outbox"
NS = 1_000_000_000
POINTS = 20  # per DeviceSample
BATCH = 1000  # rows per append (one commit)
SAMPLE = int(RecordKind.SAMPLE)


def _samples(rows: int, points: int, devices: int = 10) -> list[tuple[int, bytes]]:
    """`rows` DeviceSamples as the pollers record them: `devices` devices read once a second."""
    names = [f"point_{i:02d}" for i in range(points)]
    units = ["W", "V", "A", "Hz", "%"] * (points // 5 + 1)
    t0 = 1_700_000_000 * NS
    out = []
    for i in range(rows):
        second, device = divmod(i, devices)
        out.append(
            (
                SAMPLE,
                pb.DeviceSample(
                    device_id=f"inverter-{device:02d}",
                    time=timestamp_from_ns(t0 + second * NS + device * 1_000_000),
                    monotonic_ns=123_456_789_000 + second * NS,
                    names=names,
                    units=units[:points],
                    values=[1000.0 + 17.25 * j + (i % 97) for j in range(points)],
                    quality=[pb.QUALITY_GOOD] * points,
                    boot_id="0b1f6c1e-3b1a-4c52-9a55-3f3b2e1d0c9a",
                    clock_synced=True,
                ).SerializeToString(),
            )
        )
    return out


def _append(ob: Outbox, items: list[tuple[int, bytes]], batch: int) -> float:
    t0 = time.perf_counter()
    for start in range(0, len(items), batch):
        ob.append(items[start : start + batch])
    return time.perf_counter() - t0


def _drain(ob: Outbox, batch: int) -> float:
    t0 = time.perf_counter()
    after = 0
    while rows := ob.read_after(after, batch):
        after = rows[-1].through_seq
        ob.ack(after)
    elapsed = time.perf_counter() - t0
    if ob.stats().rows:
        raise RuntimeError(f"the drain left {ob.stats().rows} rows in the outbox")
    return elapsed


def _timings(runs: int, once: Callable[[int], float]) -> list[float]:
    return [once(run) for run in range(runs)]


async def run(options: BenchOptions) -> list[Figure]:
    rows, runs = (5_000, 1) if options.quick else (50_000, 5)
    items = _samples(rows, POINTS)
    payload = len(items[0][1])
    points = rows * POINTS
    drain_batch = min(BATCH, MAX_RECORDS_PER_BATCH)
    held = sum(len(p) + ROW_OVERHEAD_BYTES for _, p in items)
    quota = max(held // 4, 1 << 20)
    with tempfile.TemporaryDirectory(prefix="dergw-bench-outbox-", dir=options.workdir) as tmp:
        base = Path(tmp)

        def append_once(run: int) -> float:
            with Outbox(base / f"append-{run}.sqlite3", clock=SystemClock()) as ob:
                return _append(ob, items, BATCH)

        def drain_once(run: int) -> float:
            with Outbox(base / f"drain-{run}.sqlite3", clock=SystemClock()) as ob:
                _append(ob, items, BATCH)
                return _drain(ob, drain_batch)

        def shed_once(run: int) -> float:
            path = base / f"shed-{run}.sqlite3"
            with Outbox(path, clock=SystemClock(), quota_bytes=quota) as ob:
                _append(ob, items, BATCH)  # fills the quota: shedding from here on
                elapsed = _append(ob, items, BATCH)
                if ob.stats().held_bytes > quota:
                    raise RuntimeError(f"outbox holds {ob.stats().held_bytes:,} B > quota")
                return elapsed

        measured = {
            "append, batched": (_timings(runs, append_once), Budget(">=", 500_000)),
            "drain (read_after + ack)": (_timings(runs, drain_once), Budget(">=", 200_000)),
            "append, quota full (thinning)": (_timings(runs, shed_once), None),
        }
    note = (
        f"{rows:,} rows of {POINTS} points ({payload} B), {BATCH} rows/append, "
        f"drain batches of {drain_batch}, median of {runs}"
    )
    figures = []
    for name, (seconds, budget) in measured.items():
        median_s = statistics.median(seconds)
        figures.append(
            Figure(
                bench=BENCH,
                name=name,
                value=points / median_s,
                unit="points/s",
                budget=budget,
                note=note if budget else f"{note}; quota {quota:,} B for {held:,} B of rows",
                extra={
                    "runs_points_per_s": [points / s for s in seconds],
                    "rows_per_s": rows / median_s,
                },
            )
        )
    return figures

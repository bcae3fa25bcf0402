"""Benchmark: outbox append and drain throughput, in points/s.

Not a test: it prints figures. Budget (docs/architecture.md): >= 500k points/s appended and
>= 200k points/s drained on the 2-core x86 dev machine. A point is one value of a DeviceSample; the
rows are realistic samples of `--points` points (names, units, values, quality, boot id, clock
state) as the pollers record them. Appends are batched as the recorder commits them (one
transaction per batch); the drain is what the uplink does per batch: read_after (whose first call
fsyncs) and then ack of the batch. Each figure is the median of `--runs` runs on a fresh file.

Also measured: appending while the quota is full, so that every 5 % of quota the oldest raw
samples are thinned to aggregates (the shedding policy's first step).

    .venv/bin/python bench/outbox.py [--rows N] [--points N] [--batch N] [--runs N] [--dir D]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from dergw.v1 import MAX_RECORDS_PER_BATCH, pb, timestamp_from_ns
from gateway.clock import SystemClock
from gateway.outbox import ROW_OVERHEAD_BYTES, Outbox, RecordKind

NS = 1_000_000_000
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
    assert ob.stats().rows == 0
    return elapsed


def _median(runs: int, once: Callable[[int], float]) -> float:
    return statistics.median(once(run) for run in range(runs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--points", type=int, default=20)
    parser.add_argument("--batch", type=int, default=1000, help="rows per append (commit)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None, help="where the files go (disk!)")
    args = parser.parse_args()
    items = _samples(args.rows, args.points)
    payload = len(items[0][1])
    points = args.rows * args.points
    drain_batch = min(args.batch, MAX_RECORDS_PER_BATCH)
    held = sum(len(p) + ROW_OVERHEAD_BYTES for _, p in items)
    quota = max(held // 4, 1 << 20)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        base = Path(tmp)
        results: dict[str, float] = {}

        def append_once(run: int) -> float:
            with Outbox(base / f"append-{run}.sqlite3", clock=SystemClock()) as ob:
                return _append(ob, items, args.batch)

        def drain_once(run: int) -> float:
            with Outbox(base / f"drain-{run}.sqlite3", clock=SystemClock()) as ob:
                _append(ob, items, args.batch)
                return _drain(ob, drain_batch)

        def shed_once(run: int) -> float:
            path = base / f"shed-{run}.sqlite3"
            with Outbox(path, clock=SystemClock(), quota_bytes=quota) as ob:
                _append(ob, items, args.batch)  # fills the quota: shedding from here on
                elapsed = _append(ob, items, args.batch)
                assert ob.stats().held_bytes <= quota
                return elapsed

        results["append"] = _median(args.runs, append_once)
        results["drain (read_after + ack)"] = _median(args.runs, drain_once)
        results["append, quota full (thinning)"] = _median(args.runs, shed_once)

    print(
        f"outbox: {args.rows:,} DeviceSample rows of {args.points} points ({payload} B each), "
        f"{args.batch} rows per append, drain batches of {drain_batch}; median of {args.runs} runs"
    )
    print(f"{'operation':<32} {'rows/s':>12} {'points/s':>14} {'budget':>12}")
    budgets = {"append": 500_000, "drain (read_after + ack)": 200_000}
    for name, seconds in results.items():
        budget = budgets.get(name)
        print(
            f"{name:<32} {args.rows / seconds:>12,.0f} {points / seconds:>14,.0f} "
            f"{f'>= {budget:,}' if budget else '':>12}"
        )
    print(f"(quota for the last line: {quota:,} B, a quarter of what {args.rows:,} rows hold)")


if __name__ == "__main__":
    main()

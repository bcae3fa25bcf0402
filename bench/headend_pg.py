"""Benchmark: headend telemetry commits on SQLite vs PostgreSQL, with the same batches.

Not a test: it prints figures. Each batch is what a gateway sends at most: 500 records, every
one a DeviceSample of 20 points, with consecutive seqs. The timed part is `commit_telemetry`
(one transaction per batch, durable on return: SQLite synchronous=FULL, PostgreSQL
synchronous_commit=on); the batches are planned (`plan_telemetry`) beforehand. Runs:

* sequential: one gateway, one batch after another (what one stream does);
* replay: the same batches again, every record a duplicate (a resend after lost acks):
  SQLite ignores each row (INSERT OR IGNORE), PostgreSQL finds the stored seqs and COPYs none;
* concurrent: N gateways committing at once (PostgreSQL runs them in parallel; SQLite
  serializes every commit on its single writer).

    .venv/bin/python bench/headend_pg.py [--batches N] [--gateways N]
        [--pg postgresql://postgres@127.0.0.1:5432/test]

PostgreSQL runs in a throwaway database created on the --pg server and dropped afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql

from dergw.v1 import pb, timestamp_from_ns
from headend_min.ingest import plan_telemetry, registration_from_pb
from headend_min.model import StreamRef, TelemetryRows
from headend_min.pg_store import PgStore
from headend_min.sqlite_store import SqliteStore
from headend_min.store import Store

RECORDS_PER_BATCH = 500
POINTS_PER_RECORD = 20
NOW = 1_700_000_000 * 10**9


DEVICES = 10


def _register_message(gateway_id: str) -> pb.Register:
    return pb.Register(
        gateway_id=gateway_id,
        software_version="bench",
        site=pb.Site(site_id=f"site-{gateway_id}", name="bench", substation="s", feeder="f"),
        devices=[
            pb.Device(device_id=f"dev-{d}", kind=pb.DEVICE_KIND_PV, protocol="bench")
            for d in range(DEVICES)
        ],
        next_seq=1,
        boot_id="bench-boot",
    )


def _batches(gateway_id: str, count: int) -> list[TelemetryRows]:
    names = [f"P{p}" for p in range(POINTS_PER_RECORD)]
    batches: list[TelemetryRows] = []
    seq = 1
    for b in range(count):
        records: list[pb.Record] = []
        for r in range(RECORDS_PER_BATCH):
            time_ns = NOW + (b * RECORDS_PER_BATCH + r) * 10**9
            sample = pb.DeviceSample(
                device_id=f"dev-{r % DEVICES}",
                time=timestamp_from_ns(time_ns),
                monotonic_ns=time_ns - NOW,
                names=names,
                units=["W"] * POINTS_PER_RECORD,
                values=[float(b * 1000 + r + p) for p in range(POINTS_PER_RECORD)],
                quality=[pb.QUALITY_GOOD] * POINTS_PER_RECORD,
                boot_id="bench-boot",
                clock_synced=True,
            )
            records.append(pb.Record(seq=seq + r, sample=sample))
        batch = pb.TelemetryBatch(
            gateway_id=gateway_id,
            first_seq=seq,
            last_seq=seq + RECORDS_PER_BATCH - 1,
            records=records,
        )
        seq += RECORDS_PER_BATCH
        batches.append(plan_telemetry(batch, gateway_id))
    return batches


async def _register(store: Store, gateway_ids: Sequence[str]) -> None:
    for gateway_id in gateway_ids:
        registration = registration_from_pb(_register_message(gateway_id))
        await store.register_gateway(registration, StreamRef(gateway_id, "bench"), NOW)


async def _timed(commits: list[Callable[[], Awaitable[object]]]) -> list[float]:
    durations = []
    for commit in commits:
        started = time.perf_counter()
        await commit()
        durations.append(time.perf_counter() - started)
    return durations


def _report(label: str, batches: int, elapsed_s: float, durations: list[float]) -> None:
    points = batches * RECORDS_PER_BATCH * POINTS_PER_RECORD
    p50 = 1000 * statistics.median(durations)
    p99 = 1000 * sorted(durations)[max(0, round(0.99 * len(durations)) - 1)]
    print(
        f"{label:<40} {batches / elapsed_s:8.1f} batches/s {points / elapsed_s:>12,.0f} points/s"
        f"   commit p50 {p50:6.1f} ms  p99 {p99:6.1f} ms"
    )


async def _run(store: Store, label: str, args: argparse.Namespace, *, replay: bool) -> None:
    gateway_ids = [f"gw-{i}" for i in range(max(1, args.gateways))]
    await _register(store, gateway_ids)
    batches = {gateway_id: _batches(gateway_id, args.batches) for gateway_id in gateway_ids}
    first = batches[gateway_ids[0]]

    def commit(rows: TelemetryRows) -> Callable[[], Awaitable[object]]:
        return lambda: store.commit_telemetry(rows, NOW)

    started = time.perf_counter()
    durations = await _timed([commit(rows) for rows in first])
    _report(f"{label} sequential", len(first), time.perf_counter() - started, durations)
    if replay:
        started = time.perf_counter()
        durations = await _timed([commit(rows) for rows in first])
        _report(
            f"{label} replay (all duplicates)", len(first), time.perf_counter() - started, durations
        )
    if len(gateway_ids) > 1:
        others = [batches[gateway_id] for gateway_id in gateway_ids[1:]]
        started = time.perf_counter()
        results = await asyncio.gather(
            *(_timed([commit(rows) for rows in gateway_batches]) for gateway_batches in others)
        )
        count = sum(len(b) for b in others)
        merged = [d for durations in results for d in durations]
        _report(
            f"{label} {len(others)} gateways at once", count, time.perf_counter() - started, merged
        )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=40, help="batches per gateway")
    parser.add_argument("--gateways", type=int, default=5, help="1 + concurrent gateways")
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    print(
        f"{args.batches} batches x {RECORDS_PER_BATCH} records x {POINTS_PER_RECORD} points "
        "per gateway"
    )

    with tempfile.TemporaryDirectory() as tmp:
        sqlite = await SqliteStore.open(Path(tmp) / "bench.sqlite3")
        try:
            await _run(sqlite, "SQLite (synchronous=FULL)", args, replay=True)
        finally:
            await sqlite.close()

    name = f"dergw_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(args.pg, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        url = urlunsplit(urlsplit(args.pg)._replace(path=f"/{name}"))
        pg = await PgStore.open(url, max_size=max(10, args.gateways + 2))
        try:
            await _run(pg, "PostgreSQL (synchronous_commit=on)", args, replay=True)
        finally:
            await pg.close()
    finally:
        with psycopg.connect(args.pg, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


if __name__ == "__main__":
    asyncio.run(main())

"""Benchmark: the whole telemetry path, simulated devices -> gateway -> outbox -> uplink -> headend.

Every part is a real process started by its entry point: the simulated site (`dergw hil run`, the
`hil/sites/bench-20.toml` / `bench-100.toml` sites), the headend (`dergw headend run`, SQLite),
mosquitto for the MQTT uplink, and the gateway under test (`dergw gateway run`).

* throughput: all raw SunSpec points (named, typed: ~140 per device), polled fast enough to offer
  ~140,000 points/s (20 devices at 20 ms, 100 devices at 100 ms). Points are counted where they
  land: the samples the headend committed (its `samples` table, each row a DeviceSample whose
  values are decoded and counted) between two moments of the steady state; the gateway's CPU over
  the same window comes from psutil (user + system time of the gateway process / wall time).
* latency: 20 devices at 1 s polling (canonical points). A reader polls the headend's database
  every `LATENCY_POLL_S`; a row seen for the first time at wall time T has latency
  T - its DeviceSample time (the gateway's wall clock when the read completed). The headend's
  rows carry no commit time, so this is an upper bound: it adds up to one poll interval plus the
  reader's query time.

This module also owns the orchestration the gateway footprint benchmark reuses (`Rig`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench.core import BenchOptions, Budget, Figure, latency_figure
from dergw.v1 import pb
from headend_min.signing import trust_file_path
from hil.mqtt_broker import Mosquitto, MosquittoError, find_mosquitto
from hil.scenarios.harness import (
    BenchError,
    ManagedProcess,
    device_driver_lines,
    spawn_dergw,
    wait_headend_ready,
)
from hil.server import Endpoint

BENCH = "e2e-telemetry"
SITES = Path(__file__).resolve().parent.parent / "hil" / "sites"
THROUGHPUT_BUDGET = Budget(">=", 100_000)
LATENCY_BUDGET_P99 = Budget("<=", 250, checked="p99")
LATENCY_BUDGET_P50_MS = 100.0
LATENCY_POLL_S = 0.01
# Poll periods that offer ~140,000 raw points/s from each site size.
THROUGHPUT_POLL_S = {20: 0.02, 100: 0.1}


@dataclass
class Rig:
    """The processes of one benchmark run; `close()` stops every one of them."""

    workdir: Path
    sites: dict[int, dict[str, Any]] = field(default_factory=dict)  # size -> manifest
    processes: list[ManagedProcess] = field(default_factory=list)
    site_processes: dict[int, ManagedProcess] = field(default_factory=dict)
    broker: Mosquitto | None = None
    headend: ManagedProcess | None = None
    grpc_target: str = ""

    @property
    def headend_db(self) -> Path:
        return self.workdir / "headend.sqlite3"

    @property
    def signing_key(self) -> Path:
        return self.workdir / "headend-signing-key.pem"

    async def start_site(self, devices: int) -> dict[str, Any]:
        """`dergw hil run` on `hil/sites/bench-<devices>.toml`; its manifest once listening."""
        manifest_path = self.workdir / f"site-{devices}.json"
        process = await spawn_dergw(
            f"site-{devices}",
            [
                "hil",
                "run",
                "--site",
                str(SITES / f"bench-{devices}.toml"),
                "--port",
                "0",
                "--manifest",
                str(manifest_path),
            ],
            self.workdir / f"site-{devices}.log",
        )
        self.processes.append(process)
        self.site_processes[devices] = process
        deadline = time.monotonic() + 30
        while not manifest_path.exists():
            if not process.running or time.monotonic() > deadline:
                raise BenchError(f"simulated site did not start:\n{process.log_tail()}")
            await asyncio.sleep(0.05)
        manifest: dict[str, Any] = json.loads(manifest_path.read_text())
        self.sites[devices] = manifest
        return manifest

    async def start_headend(self, *, mqtt: bool) -> None:
        """A fresh headend (SQLite in the workdir); with `mqtt`, behind a mosquitto of its own."""
        await self.stop_headend()
        for path in self.workdir.glob("headend.sqlite3*"):
            path.unlink()
        if mqtt:
            if find_mosquitto() is None:
                raise BenchError("the MQTT uplink needs mosquitto (apt install mosquitto)")
            self.broker = Mosquitto(self.workdir / "broker")
            try:
                await asyncio.to_thread(self.broker.start)
            except MosquittoError as exc:
                raise BenchError(f"mosquitto did not start: {exc}") from exc
        args = ["headend", "run", "--grpc", "127.0.0.1:0", "--http", "127.0.0.1:0"]
        args += ["--db", str(self.headend_db), "--signing-key", str(self.signing_key)]
        args += ["--admin-token-file", str(self.workdir / "headend-admin-token")]
        if self.broker is not None:
            args += ["--mqtt", self.broker.address]
        self.headend = await spawn_dergw("headend", args, self.workdir / "headend.log", append=True)
        self.grpc_target, _ = await wait_headend_ready(self.headend)

    async def stop_headend(self) -> None:
        if self.headend is not None:
            await self.headend.stop()
            self.headend = None
        if self.broker is not None:
            await asyncio.to_thread(self.broker.stop)
            self.broker = None

    def gateway_config(
        self,
        gateway_id: str,
        devices: int,
        *,
        poll_period_s: float,
        raw_points: bool,
        transport: str | None = None,
    ) -> Path:
        """A gateway config for the site of `devices` devices, on the headend's uplink
        (`transport`: "grpc" or "mqtt"; default MQTT when the headend has a broker)."""
        state_dir = self.workdir / f"state-{gateway_id}"
        if transport is None:
            transport = "mqtt" if self.broker is not None else "grpc"
        if transport == "mqtt":
            if self.broker is None:
                raise BenchError("an MQTT uplink needs the headend started with mqtt=True")
            uplink = ['transport = "mqtt"', f'broker = "{self.broker.address}"']
        else:
            uplink = ['transport = "grpc"', f'target = "{self.grpc_target}"']
        lines = [
            "[gateway]",
            f'id = "{gateway_id}"',
            f'state_dir = "{state_dir}"',
            'log_level = "WARNING"',
            "[security]",
            f'intent_keys_file = "{trust_file_path(self.signing_key)}"',
            "[site]",
            f'id = "site-{gateway_id}"',
            f'name = "bench {devices} devices"',
            "[uplink]",
            *uplink,
            "tls = false",
            "[control]",
            "period_s = 1.0",
        ]
        for device in self.sites[devices]["devices"]:
            endpoint = Endpoint(device["host"], device["port"], device["unit_id"])
            driver, params = device_driver_lines(endpoint, raw_points=raw_points)
            lines += [
                "[[devices]]",
                f'id = "{device["id"]}"',
                f'kind = "{device["kind"]}"',
                f'driver = "{driver}"',
                f"poll_period_s = {poll_period_s}",
                *([f'role = "{device["role"]}"'] if device["role"] else []),
                "[devices.params]",
                *params,
            ]
        path = self.workdir / f"{gateway_id}.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    async def start_gateway(self, config: Path) -> ManagedProcess:
        process = await spawn_dergw(
            config.stem, ["gateway", "run", "--config", str(config)], config.with_suffix(".log")
        )
        self.processes.append(process)
        return process

    async def wait_all_reporting(
        self, gateway: ManagedProcess, gateway_id: str, devices: int, timeout_s: float = 60
    ) -> None:
        """Until the headend holds a good sample of every device from this gateway."""
        deadline = time.monotonic() + timeout_s
        while True:
            if not gateway.running:
                raise BenchError(f"gateway exited early:\n{gateway.log_tail()}")
            reporting = await asyncio.to_thread(
                self._query,
                "SELECT COUNT(*) FROM sample_status WHERE gateway_id = ? AND ok = 1",
                (gateway_id,),
            )
            if reporting and reporting[0][0] >= devices:
                return
            if time.monotonic() > deadline:
                raise BenchError(
                    f"only {reporting[0][0] if reporting else 0} of {devices} devices reached "
                    f"the headend within {timeout_s:.0f} s; gateway log:\n{gateway.log_tail()}"
                )
            await asyncio.sleep(0.2)

    def _query(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        with contextlib.closing(
            sqlite3.connect(f"file:{self.headend_db}?mode=ro", uri=True, timeout=10)
        ) as db:
            try:
                return db.execute(sql, params).fetchall()
            except sqlite3.OperationalError:  # the headend has not created its schema yet
                return []

    def max_seq(self, gateway_id: str) -> int:
        rows = self._query("SELECT MAX(seq) FROM samples WHERE gateway_id = ?", (gateway_id,))
        return int(rows[0][0] or 0) if rows else 0

    def points_between(self, gateway_id: str, after_seq: int, upto_seq: int) -> tuple[int, int]:
        """(samples, points) the headend committed with after_seq < seq <= upto_seq."""
        rows = self._query(
            "SELECT payload FROM samples WHERE gateway_id = ? AND seq > ? AND seq <= ?",
            (gateway_id, after_seq, upto_seq),
        )
        points = sum(len(pb.DeviceSample.FromString(payload).values) for (payload,) in rows)
        return len(rows), points

    async def close(self) -> None:
        for process in reversed(self.processes):
            with contextlib.suppress(ProcessLookupError):
                await process.stop()
        await self.stop_headend()


@contextlib.asynccontextmanager
async def open_rig(options: BenchOptions, name: str) -> AsyncIterator[Rig]:
    with tempfile.TemporaryDirectory(prefix=f"{name}-", dir=options.workdir) as tmp:
        rig = Rig(Path(tmp))
        try:
            yield rig
        finally:
            await rig.close()


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


async def _throughput(
    rig: Rig, transport: str, devices: int, warmup_s: float, window_s: float
) -> Figure:
    gateway_id = f"gw-{transport}-{devices}"
    poll_s = THROUGHPUT_POLL_S[devices]
    config = rig.gateway_config(gateway_id, devices, poll_period_s=poll_s, raw_points=True)
    gateway = await rig.start_gateway(config)
    try:
        await rig.wait_all_reporting(gateway, gateway_id, devices)
        await asyncio.sleep(warmup_s)
        watched = {
            "gateway": psutil.Process(gateway.process.pid),
            "headend": psutil.Process(rig.headend.process.pid) if rig.headend else None,
            "site": psutil.Process(rig.site_processes[devices].process.pid),
        }
        cpu0 = {k: cpu_seconds(p) for k, p in watched.items() if p is not None}
        seq0, t0 = await asyncio.to_thread(rig.max_seq, gateway_id), time.monotonic()
        await asyncio.sleep(window_s)
        seq1, t1 = await asyncio.to_thread(rig.max_seq, gateway_id), time.monotonic()
        cpu1 = {k: cpu_seconds(p) for k, p in watched.items() if p is not None}
    finally:
        await gateway.stop()
    samples, points = await asyncio.to_thread(rig.points_between, gateway_id, seq0, seq1)
    elapsed = t1 - t0
    cpu_pct = {k: round(100 * (cpu1[k] - cpu0[k]) / elapsed, 1) for k in cpu1}
    offered = devices / poll_s
    return Figure(
        bench=BENCH,
        name=f"throughput, {devices} devices, {transport}",
        value=points / elapsed,
        unit="points/s",
        budget=THROUGHPUT_BUDGET,
        note=(
            f"{points:,} points in {samples:,} samples committed at the headend over "
            f"{elapsed:.1f} s; gateway {cpu_pct['gateway']:.0f} % of a core, headend "
            f"{cpu_pct.get('headend', 0):.0f} %, simulator {cpu_pct['site']:.0f} %; "
            f"raw SunSpec points, {poll_s * 1e3:.0f} ms polling"
        ),
        extra={
            "points": points,
            "samples": samples,
            "window_s": elapsed,
            "cpu_pct": cpu_pct,
            "devices": devices,
            "poll_period_s": poll_s,
            "samples_offered_per_s": offered,
            "samples_per_s": samples / elapsed,
        },
    )


async def _latency(rig: Rig, devices: int, warmup_s: float, window_s: float) -> list[Figure]:
    gateway_id = "gw-latency"
    config = rig.gateway_config(gateway_id, devices, poll_period_s=1.0, raw_points=False)
    gateway = await rig.start_gateway(config)
    latencies: list[float] = []
    try:
        await rig.wait_all_reporting(gateway, gateway_id, devices)
        await asyncio.sleep(warmup_s)
        process = psutil.Process(gateway.process.pid)
        cpu0, t0 = cpu_seconds(process), time.monotonic()
        latencies = await asyncio.to_thread(_watch_commits, rig.headend_db, gateway_id, window_s)
        cpu_pct = 100 * (cpu_seconds(process) - cpu0) / (time.monotonic() - t0)
    finally:
        await gateway.stop()
    figure = latency_figure(
        BENCH,
        f"latency sample -> headend commit, {devices} devices, 1 s polling, grpc",
        latencies,
        budget=LATENCY_BUDGET_P99,
        note=(
            f"n={len(latencies)} samples over {window_s:.0f} s; upper bound (headend db polled "
            f"every {LATENCY_POLL_S * 1e3:.0f} ms); gateway {cpu_pct:.1f} % of a core"
        ),
    )
    p50 = Figure(
        bench=BENCH,
        name="latency p50, same run",
        value=figure.value,
        unit="ms",
        p50=figure.p50,
        p99=figure.p99,
        budget=Budget("<=", LATENCY_BUDGET_P50_MS, checked="p50"),
        note="the p50 half of the latency budget",
    )
    return [figure, p50]


def _watch_commits(db_path: Path, gateway_id: str, window_s: float) -> list[float]:
    """Poll the headend's samples table; the latency of each row as it first appears."""
    latencies: list[float] = []
    with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as db:
        (last_seq,) = db.execute(
            "SELECT COALESCE(MAX(seq), 0) FROM samples WHERE gateway_id = ?", (gateway_id,)
        ).fetchone()
        end = time.monotonic() + window_s
        while time.monotonic() < end:
            rows = db.execute(
                "SELECT seq, payload FROM samples WHERE gateway_id = ? AND seq > ?",
                (gateway_id, last_seq),
            ).fetchall()
            seen_ns = time.time_ns()
            for seq, payload in rows:
                sample = pb.DeviceSample.FromString(payload)
                taken_ns = sample.time.seconds * 1_000_000_000 + sample.time.nanos
                latencies.append((seen_ns - taken_ns) / 1e9)
                last_seq = max(last_seq, seq)
            time.sleep(LATENCY_POLL_S)
    return latencies


async def run(options: BenchOptions) -> list[Figure]:
    warmup_s, window_s = (1.0, 2.0) if options.quick else (2.0, 8.0)
    sizes = (20,) if options.quick else (20, 100)
    transports = ("grpc",) if options.quick else ("grpc", "mqtt")
    figures: list[Figure] = []
    async with open_rig(options, BENCH) as rig:
        for size in sizes:
            await rig.start_site(size)
        for transport in transports:
            await rig.start_headend(mqtt=transport == "mqtt")
            figures += [
                await _throughput(rig, transport, size, warmup_s, window_s) for size in sizes
            ]
            if transport == "grpc":
                figures += await _latency(rig, 20, warmup_s, 4.0 if options.quick else 10.0)
    return figures

"""The fleet simulator: many lightweight gateways (no physics) on the real GatewayLink protocol.

Each `SimGateway` is what the headend sees of a real gateway: its own gRPC channel (its own TCP
connection: `grpc.use_local_subchannel_pool`, or grpc would share one connection between
channels to the same target), one `Connect` stream, `Register` -> `RegisterAck` (or `RetryAfter`
from the headend's admission limiter), one `TelemetryBatch` per interval with consecutive seqs
(one DeviceSample of `points` points), Acks that settle what was sent, and every `SignedIntent`
acknowledged with an `IntentAck` (PERSISTED; the signature is not verified: this is load, not
the gateway). Unacked batches are kept like an outbox and resent in one batch after a reconnect,
so no seq is ever skipped; while disconnected a simulated gateway records nothing (a real one
would build a backlog, which `backlog-drain` measures). A broken stream is retried like the
product's uplink: full-jitter exponential backoff (0.5 s doubling, capped at `reconnect_max_s`),
or the headend's RetryAfter plus up to half of it again.

`FleetWorker` runs many gateways on one asyncio loop and reports each second (connected, batches
sent and acked, ack latencies, intents received). `Fleet` spreads the gateways over worker
processes (`python -m hil.fleet worker`, JSON lines on stdout) so the load generator can use
every core, and merges their seconds into one timeline. `dergw hil fleet` is its command line.

Plaintext gRPC only: a headend started without `--tls-dir` admits unknown gateways at their
word, which is what a load test needs (no enrollment of thousands of gateways).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc.aio import EOF  # type: ignore[attr-defined]  # missing from grpc-stubs

from dergw.v1 import dergw_pb2_grpc, grpc_channel_options, pb, timestamp_from_ns

__all__ = [
    "Fleet",
    "FleetError",
    "FleetSpec",
    "FleetWorker",
    "Second",
    "SimGateway",
    "fleet_main",
    "percentile",
]

# Backoff of a broken session, as the gateway's uplink (full-jitter exponential).
BACKOFF_MULTIPLIER_S = 0.5
HEALTHY_SESSION_S = 30.0
REGISTER_TIMEOUT_S = 10.0
# Unacked records resent in one batch after a reconnect (the protocol's limit is 2000).
MAX_RESEND_RECORDS = 1000


class FleetError(RuntimeError):
    """The fleet could not be run (a worker died, bad arguments); the message says which."""


@dataclass(frozen=True)
class FleetSpec:
    """What to simulate; `first` and `count` select this worker's share of the gateways."""

    target: str
    gateways: int
    batch_interval_s: float = 1.0
    points: int = 20
    # Gateways are spread over this many sites (1 = every gateway on one site: one intent post
    # then fans out to the whole fleet).
    sites: int = 1
    id_prefix: str = "fleet"
    # Prefix of the site ids ("" = id_prefix): fleets started one after another with different
    # id prefixes can still share their sites.
    site_prefix: str = ""
    reconnect_max_s: float = 30.0
    keepalive_s: float = 20.0
    first: int = 0
    count: int | None = None

    def gateway_id(self, index: int) -> str:
        return f"{self.id_prefix}-gw-{index:05d}"

    def site_id(self, index: int) -> str:
        return f"{self.site_prefix or self.id_prefix}-site-{index % self.sites:05d}"

    def share(self, first: int, count: int) -> FleetSpec:
        return FleetSpec(**{**asdict(self), "first": first, "count": count})


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100), as bench.core.percentile (hil does not import
    bench)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return float(ordered[min(rank, len(ordered)) - 1])


@dataclass
class Second:
    """One second of the fleet (wall-clock second `t`), merged over workers."""

    t: int
    connected: int = 0
    sent: int = 0
    acked: int = 0
    connects: int = 0
    disconnects: int = 0
    retry_afters: int = 0
    latencies_s: list[float] = field(default_factory=list)
    # intent version -> wall times (s) at which a gateway received it, this second.
    intents: dict[int, list[float]] = field(default_factory=dict)

    def merge(self, other: Second) -> None:
        self.connected += other.connected
        self.sent += other.sent
        self.acked += other.acked
        self.connects += other.connects
        self.disconnects += other.disconnects
        self.retry_afters += other.retry_afters
        self.latencies_s += other.latencies_s
        for version, times in other.intents.items():
            self.intents.setdefault(version, []).extend(times)

    def to_json(self) -> dict[str, Any]:
        document = asdict(self)
        document["latencies_s"] = [round(x, 5) for x in self.latencies_s]
        document["intents"] = {str(v): t for v, t in self.intents.items()}
        return document

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> Second:
        second = cls(**{k: v for k, v in document.items() if k not in ("intents", "type")})
        second.intents = {int(v): list(t) for v, t in document.get("intents", {}).items()}
        return second

    def summary(self) -> str:
        p50 = percentile(self.latencies_s, 50) * 1e3
        p99 = percentile(self.latencies_s, 99) * 1e3
        return (
            f"t={self.t} connected={self.connected} sent={self.sent} acked={self.acked} "
            f"ack_p50={p50:.1f}ms ack_p99={p99:.1f}ms connects={self.connects} "
            f"retry_after={self.retry_afters}"
        )


class _Meter:
    """Counters of the current second, shared by the gateways of one worker."""

    def __init__(self) -> None:
        self.connected = 0
        self.current = Second(int(time.time()))

    def take(self) -> Second:
        second = self.current
        second.connected = self.connected
        self.current = Second(int(time.time()))
        return second


class _SessionEnded(Exception):
    """The stream ended; `retry_after_s` is set when the headend said when to come back."""

    def __init__(self, reason: str, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after_s = retry_after_s


class SimGateway:
    """One simulated gateway: a session loop with reconnects, batches on a fixed phase."""

    def __init__(self, spec: FleetSpec, index: int, meter: _Meter, start_mono: float) -> None:
        self.spec = spec
        self.gateway_id = spec.gateway_id(index)
        self.site_id = spec.site_id(index)
        self._meter = meter
        # Staggered: gateway i sends at phase i/N of every interval.
        self._phase_s = spec.batch_interval_s * (index / max(1, spec.gateways))
        self._start_mono = start_mono
        self.boot_id = uuid.uuid4().hex
        self.next_seq = 1
        self.acked_seq = 0
        self.intent_version = 0
        self.connected = False
        self.sessions = 0
        # Sent (or waiting to be sent) and not yet acked: (first_seq, last_seq, sent_mono).
        self._pending: list[tuple[int, int, float]] = []
        self._records: dict[int, pb.Record] = {}
        self._sample = pb.DeviceSample(
            device_id="pv-1",
            names=[f"P{i}" for i in range(spec.points)],
            units=["W"] * spec.points,
            values=[float(i) for i in range(spec.points)],
            quality=[pb.QUALITY_GOOD] * spec.points,
            boot_id=self.boot_id,
            clock_synced=True,
        )
        self._write_lock = asyncio.Lock()
        self._stopped = asyncio.Event()  # no more new batches (drain)

    def register_message(self) -> pb.UpMessage:
        return pb.UpMessage(
            register=pb.Register(
                gateway_id=self.gateway_id,
                software_version="dergw-fleet-sim",
                site=pb.Site(
                    site_id=self.site_id, name=self.site_id, substation="sub-1", feeder="fdr-1"
                ),
                devices=[
                    pb.Device(
                        device_id="pv-1",
                        kind=pb.DEVICE_KIND_PV,
                        protocol="sim",
                        nameplate=pb.Nameplate(max_w=5000.0, max_va=5000.0),
                        points=[pb.PointInfo(name=n, unit="W") for n in self._sample.names],
                    )
                ],
                intent_version=self.intent_version,
                oldest_unacked_seq=self._pending[0][0] if self._pending else 0,
                next_seq=self.next_seq,
                boot_id=self.boot_id,
            )
        )

    def stop_sending(self) -> None:
        self._stopped.set()

    @property
    def unacked(self) -> int:
        return self.next_seq - 1 - self.acked_seq

    def _new_record(self) -> None:
        """One read, appended to the outbox (sent now if connected, else after reconnect)."""
        seq = self.next_seq
        self.next_seq += 1
        now_ns = time.time_ns()
        sample = self._sample
        sample.time.CopyFrom(timestamp_from_ns(now_ns))
        sample.monotonic_ns = time.monotonic_ns()
        sample.values[0] = float(seq % 5000)
        self._records[seq] = pb.Record(seq=seq, sample=sample)

    def _batch(self, first_seq: int, last_seq: int) -> pb.UpMessage:
        return pb.UpMessage(
            telemetry=pb.TelemetryBatch(
                gateway_id=self.gateway_id,
                first_seq=first_seq,
                last_seq=last_seq,
                records=[self._records[s] for s in range(first_seq, last_seq + 1)],
            )
        )

    def _settle(self, up_to_seq: int, ranges: Sequence[pb.SeqRange] = ()) -> None:
        now = time.monotonic()
        if up_to_seq > self.acked_seq:
            for seq in range(self.acked_seq + 1, up_to_seq + 1):
                self._records.pop(seq, None)
            self.acked_seq = up_to_seq
        settled = [p for p in self._pending if p[1] <= self.acked_seq]
        if settled:
            self._pending = self._pending[len(settled) :]
            second = self._meter.current
            second.acked += len(settled)
            second.latencies_s.extend(now - sent for _, _, sent in settled if sent > 0)

    async def run(self) -> None:
        """Sessions forever (cancel to stop), with the uplink's backoff between them."""
        attempt = 0
        while True:
            started = time.monotonic()
            retry_after_s: float | None = None
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except _SessionEnded as exc:
                retry_after_s = exc.retry_after_s
            except (grpc.aio.AioRpcError, TimeoutError, OSError):
                pass
            finally:
                if self.connected:
                    self.connected = False
                    self._meter.connected -= 1
                    self._meter.current.disconnects += 1
            attempt = 1 if time.monotonic() - started > HEALTHY_SESSION_S else attempt + 1
            if retry_after_s is not None:
                self._meter.current.retry_afters += 1
                delay = retry_after_s + random.uniform(0, retry_after_s / 2)
            else:
                high = BACKOFF_MULTIPLIER_S * 2 ** (attempt - 1)
                delay = random.uniform(0, min(self.spec.reconnect_max_s, high))
            await asyncio.sleep(delay)

    async def _session(self) -> None:
        options = [
            *grpc_channel_options(keepalive_s=self.spec.keepalive_s),
            ("grpc.use_local_subchannel_pool", 1),
        ]
        channel = grpc.aio.insecure_channel(self.spec.target, options=options)
        sender: asyncio.Task[None] | None = None
        try:
            stub = dergw_pb2_grpc.GatewayLinkStub(channel)
            call = stub.Connect()  # type: ignore[call-arg]  # grpc-stubs: iterator optional
            self.sessions += 1
            await call.write(self.register_message())
            first = await asyncio.wait_for(call.read(), REGISTER_TIMEOUT_S)
            if first is EOF:
                raise _SessionEnded(f"stream ended before RegisterAck: {await call.code()}")
            assert isinstance(first, pb.DownMessage)
            body = first.WhichOneof("body")
            if body == "retry_after":
                raise _SessionEnded("retry after", float(first.retry_after.seconds))
            if body != "register_ack":
                raise _SessionEnded(f"first down message is {body}, not register_ack")
            ack = first.register_ack
            # A gateway never reuses a seq at or below what the headend committed.
            self.next_seq = max(self.next_seq, ack.committed_seq + 1)
            self._settle(ack.committed_seq, ack.committed_ranges)
            self.connected = True
            self._meter.connected += 1
            self._meter.current.connects += 1
            # The outbox as the headend left it: everything unacked goes again, in order.
            self._pending = []
            if self.next_seq - 1 > self.acked_seq:
                await self._resend(call)
            sender = asyncio.create_task(self._send_loop(call))
            while True:
                message = await call.read()
                if message is EOF:
                    raise _SessionEnded(f"stream ended: {await call.code()}")
                assert isinstance(message, pb.DownMessage)
                await self._on_down(call, message)
        finally:
            if sender is not None:
                sender.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await sender
            await channel.close(None)

    async def _resend(self, call: grpc.aio.StreamStreamCall[pb.UpMessage, pb.DownMessage]) -> None:
        first = self.acked_seq + 1
        last_seq = self.next_seq - 1
        while first <= last_seq:
            last = min(last_seq, first + MAX_RESEND_RECORDS - 1)
            self._pending.append((first, last, 0.0))  # not timed: not a live batch
            async with self._write_lock:
                await call.write(self._batch(first, last))
            first = last + 1

    async def _send_loop(
        self, call: grpc.aio.StreamStreamCall[pb.UpMessage, pb.DownMessage]
    ) -> None:
        interval = self.spec.batch_interval_s
        while not self._stopped.is_set():
            now = time.monotonic()
            # The next tick of this gateway's phase.
            ticks = math.floor((now - self._start_mono - self._phase_s) / interval) + 1
            await asyncio.sleep(self._start_mono + self._phase_s + ticks * interval - now)
            if self._stopped.is_set():
                return
            self._new_record()
            seq = self.next_seq - 1
            self._pending.append((seq, seq, time.monotonic()))
            self._meter.current.sent += 1
            async with self._write_lock:
                await call.write(self._batch(seq, seq))

    async def _on_down(
        self,
        call: grpc.aio.StreamStreamCall[pb.UpMessage, pb.DownMessage],
        message: pb.DownMessage,
    ) -> None:
        body = message.WhichOneof("body")
        if body == "ack":
            self._settle(message.ack.up_to_seq, message.ack.ranges)
        elif body == "signed_intent":
            payload = pb.IntentPayload.FromString(message.signed_intent.payload)
            received = time.time()
            self._meter.current.intents.setdefault(payload.version, []).append(received)
            self.intent_version = max(self.intent_version, payload.version)
            ack = pb.IntentAck(
                site_id=self.site_id,
                version=payload.version,
                status=pb.INTENT_ACK_STATUS_PERSISTED,
            )
            async with self._write_lock:
                await call.write(pb.UpMessage(intent_ack=ack))
        elif body == "retry_after":
            raise _SessionEnded("retry after", float(message.retry_after.seconds))


class FleetWorker:
    """The gateways `spec.first .. first+count-1` on this event loop."""

    def __init__(self, spec: FleetSpec, *, connect_over_s: float = 1.0) -> None:
        self.spec = spec
        self.meter = _Meter()
        count = spec.count if spec.count is not None else spec.gateways - spec.first
        start = time.monotonic()
        self.gateways = [
            SimGateway(spec, index, self.meter, start)
            for index in range(spec.first, spec.first + count)
        ]
        self._connect_over_s = connect_over_s
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Start every gateway, their first connects spread over `connect_over_s`."""
        count = len(self.gateways)
        for number, gateway in enumerate(self.gateways):
            self._tasks.append(asyncio.create_task(self._delayed(gateway, number, count)))

    async def _delayed(self, gateway: SimGateway, number: int, count: int) -> None:
        await asyncio.sleep(self._connect_over_s * number / max(1, count))
        await gateway.run()

    async def seconds(self) -> AsyncIterator[Second]:
        """One `Second` at each wall-clock second boundary, forever."""
        while True:
            now = time.time()
            await asyncio.sleep(math.floor(now) + 1 - now)
            yield self.meter.take()

    async def drain(self, timeout_s: float) -> None:
        """Stop new batches and wait (bounded) until every connected gateway is fully acked."""
        for gateway in self.gateways:
            gateway.stop_sending()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(g.unacked == 0 for g in self.gateways):
                return
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def final(self) -> dict[str, Any]:
        return {
            "type": "final",
            "gateways": len(self.gateways),
            "connected": sum(g.connected for g in self.gateways),
            "records": sum(g.next_seq - 1 for g in self.gateways),
            "unacked": sum(g.unacked for g in self.gateways),
            "sessions": sum(g.sessions for g in self.gateways),
            "seqs": {g.gateway_id: [g.next_seq - 1, g.acked_seq] for g in self.gateways},
        }


async def _worker_main(spec: FleetSpec, connect_over_s: float, drain_s: float) -> int:
    """A worker process: JSON lines on stdout (one per second, then a final one); stops on
    stdin EOF / a `stop` line, or SIGTERM."""
    worker = FleetWorker(spec, connect_over_s=connect_over_s)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    # Ctrl-C reaches the whole process group: the parent asks this worker to stop and drain.
    loop.add_signal_handler(signal.SIGINT, lambda: None)

    def emit(document: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(document, separators=(",", ":")) + "\n")
        sys.stdout.flush()

    async def report() -> None:
        async for second in worker.seconds():
            emit({"type": "second", **second.to_json()})

    async def watch_stdin() -> None:
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := await reader.readline():
            if line.strip() == b"stop":
                break
        stop.set()

    await worker.start()
    reporter = asyncio.create_task(report())
    watcher = asyncio.create_task(watch_stdin())
    await stop.wait()
    watcher.cancel()
    await worker.drain(drain_s)
    reporter.cancel()
    emit({"type": "second", **worker.meter.take().to_json()})
    emit(worker.final())
    await worker.stop()
    return 0


class Fleet:
    """`spec.gateways` gateways over `processes` worker processes; a merged per-second
    timeline (`seconds`) and the workers' final counts (`finals`) once stopped."""

    def __init__(
        self,
        spec: FleetSpec,
        *,
        processes: int = 1,
        connect_over_s: float = 1.0,
        on_second: Callable[[Second], None] | None = None,
        log_dir: Path | None = None,
    ) -> None:
        if spec.gateways < 1 or processes < 1:
            raise FleetError("a fleet needs --gateways >= 1 and --processes >= 1")
        self.spec = spec
        self.processes = min(processes, spec.gateways)
        self._connect_over_s = connect_over_s
        self._on_second = on_second
        self._log_dir = log_dir
        self.workers: list[asyncio.subprocess.Process] = []
        self._readers: list[asyncio.Task[None]] = []
        # wall second -> merged Second, and how many workers reported it.
        self._seconds: dict[int, Second] = {}
        self._reported: dict[int, int] = {}
        self.seconds: list[Second] = []  # complete seconds, in order
        self.finals: list[dict[str, Any]] = []
        self.connected = 0  # latest merged count
        self._changed = asyncio.Event()
        # version -> receive times of every gateway (the fan-out).
        self.intent_times: dict[int, list[float]] = {}

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self.workers]

    async def start(self) -> None:
        per = self.spec.gateways // self.processes
        extra = self.spec.gateways % self.processes
        first = 0
        for number in range(self.processes):
            count = per + (1 if number < extra else 0)
            share = self.spec.share(first, count)
            first += count
            stderr: Any = asyncio.subprocess.DEVNULL
            if self._log_dir is not None:
                stderr = (self._log_dir / f"fleet-worker-{number}.log").open("wb")
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "hil.fleet",
                "worker",
                json.dumps(asdict(share)),
                str(self._connect_over_s),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
                limit=64 * 1024 * 1024,
            )
            self.workers.append(process)
            self._readers.append(asyncio.create_task(self._read(process)))

    async def _read(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        while line := await process.stdout.readline():
            document = json.loads(line)
            if document.get("type") == "final":
                self.finals.append(document)
                continue
            second = Second.from_json(document)
            merged = self._seconds.setdefault(second.t, Second(second.t))
            merged.merge(second)
            for version, times in second.intents.items():
                self.intent_times.setdefault(version, []).extend(times)
            self._reported[second.t] = self._reported.get(second.t, 0) + 1
            if self._reported[second.t] >= len(self.workers):
                self._complete(second.t)
            self._changed.set()

    def _complete(self, t: int) -> None:
        second = self._seconds.pop(t)
        del self._reported[t]
        self.connected = second.connected
        self.seconds.append(second)
        if self._on_second is not None:
            self._on_second(second)

    async def wait_for(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        """Wait until `predicate()` holds (checked after every report); False on timeout."""
        deadline = time.monotonic() + timeout_s
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._changed.clear()
            self.check()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(remaining, 1.0))
        return True

    def check(self) -> None:
        """Raise FleetError when a worker process has exited."""
        for process in self.workers:
            if process.returncode is not None:
                raise FleetError(f"fleet worker {process.pid} exited ({process.returncode})")

    async def wait_connected(self, count: int, timeout_s: float) -> bool:
        return await self.wait_for(lambda: self.connected >= count, timeout_s)

    def window(self, since: float, until: float | None = None) -> list[Second]:
        """Complete seconds with `since <= t < until` (wall clock)."""
        return [s for s in self.seconds if s.t >= since and (until is None or s.t < until)]

    async def stop(self, drain_s: float = 5.0) -> None:
        """Stop sending, let each worker drain its acks (bounded), collect the finals."""
        for process in self.workers:
            if process.returncode is None and process.stdin is not None:
                with contextlib.suppress(ConnectionError):
                    process.stdin.write(b"stop\n")
                    await process.stdin.drain()
        for process in self.workers:
            try:
                await asyncio.wait_for(process.wait(), drain_s + 10)
            except TimeoutError:
                process.kill()
                await process.wait()
        await asyncio.gather(*self._readers, return_exceptions=True)
        for t in sorted(self._seconds):
            self._complete(t)

    async def kill(self) -> None:
        """Kill every worker now (cleanup on error)."""
        for process in self.workers:
            if process.returncode is None:
                process.kill()
                await process.wait()
        for reader in self._readers:
            reader.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)

    async def __aenter__(self) -> Fleet:
        try:
            await self.start()
        except BaseException:
            await self.kill()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.kill()

    def final(self) -> dict[str, Any]:
        """The workers' finals summed: records sent, unacked, sessions opened."""
        total: dict[str, Any] = {"gateways": 0, "records": 0, "unacked": 0, "sessions": 0}
        seqs: dict[str, list[int]] = {}
        for document in self.finals:
            for key in ("gateways", "records", "unacked", "sessions"):
                total[key] += document[key]
            seqs.update(document["seqs"])
        total["seqs"] = seqs
        return total


def reconnect_curve(
    seconds: Sequence[Second], since: float, total: int
) -> tuple[list[tuple[float, int]], dict[int, float | None]]:
    """(seconds after `since`, connected) and the time to reach 50/90/100 % of `total`."""
    curve = [(s.t + 1 - since, s.connected) for s in seconds if s.t + 1 >= since]
    reached: dict[int, float | None] = {}
    for share in (50, 90, 100):
        needed = math.ceil(total * share / 100)
        reached[share] = next((t for t, c in curve if c >= needed), None)
    return curve, reached


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dergw hil fleet",
        description="Simulated gateways (no physics) on the real gRPC GatewayLink protocol, "
        "against a plaintext headend (`dergw headend run` without --tls-dir).",
    )
    parser.add_argument("--gateways", type=int, required=True, help="how many gateways")
    parser.add_argument("--headend", default="127.0.0.1:50051", help="gRPC HOST:PORT")
    parser.add_argument("--batch-interval", type=float, default=1.0, help="seconds per batch")
    parser.add_argument("--points", type=int, default=20, help="points per batch")
    parser.add_argument(
        "--sites", type=int, default=1, help="sites the gateways are spread over (default 1)"
    )
    parser.add_argument("--processes", type=int, default=1, help="worker processes")
    parser.add_argument("--duration", type=float, default=None, help="stop after S seconds")
    parser.add_argument("--id-prefix", default="fleet", help="prefix of gateway and site ids")
    parser.add_argument("--json", type=Path, default=None, help="write the timeline here")
    return parser


async def _run_cli(args: argparse.Namespace) -> int:
    spec = FleetSpec(
        target=args.headend,
        gateways=args.gateways,
        batch_interval_s=args.batch_interval,
        points=args.points,
        sites=args.sites,
        id_prefix=args.id_prefix,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)

    def show(second: Second) -> None:
        print(second.summary(), flush=True)

    started = time.time()
    async with Fleet(spec, processes=args.processes, on_second=show) as fleet:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), args.duration)
        await fleet.stop()
        final = fleet.final()
        latencies = [x for s in fleet.seconds for x in s.latencies_s]
        print(
            f"fleet: {final['gateways']} gateways, {final['records']} records sent, "
            f"{final['unacked']} unacked at the end, {final['sessions']} sessions; ack p50 "
            f"{percentile(latencies, 50) * 1e3:.1f} ms p99 {percentile(latencies, 99) * 1e3:.1f} "
            "ms",
            flush=True,
        )
        if args.json is not None:
            document = {
                "spec": asdict(spec),
                "started": started,
                "seconds": [s.to_json() for s in fleet.seconds],
                "final": {k: v for k, v in final.items() if k != "seqs"},
            }
            args.json.write_text(json.dumps(document) + "\n")
    return 0


def fleet_main(argv: list[str]) -> int:
    """`dergw hil fleet ...`; returns the process exit code."""
    args = _parser().parse_args(argv)
    if args.gateways < 1 or args.processes < 1 or args.batch_interval <= 0 or args.points < 1:
        print(
            "dergw hil fleet: --gateways, --processes and --points must be >= 1 and "
            "--batch-interval > 0",
            file=sys.stderr,
        )
        return 2
    try:
        return asyncio.run(_run_cli(args))
    except FleetError as exc:
        print(f"dergw hil fleet: {exc}", file=sys.stderr)
        return 1


def _main(argv: list[str]) -> int:
    if argv[:1] == ["worker"]:
        spec = FleetSpec(**json.loads(argv[1]))
        connect_over_s = float(argv[2]) if len(argv) > 2 else 1.0
        return asyncio.run(_worker_main(spec, connect_over_s, drain_s=5.0))
    return fleet_main(argv)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(_main(sys.argv[1:]))

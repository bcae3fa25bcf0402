"""What the control scenarios observe: the site's devices, the simulator sampled in the background,
the headend's view (reported state, event responses), and waiting on a condition with a deadline.

Shared by export-step, soc-floor, overlapping-programs and randomized-start. Like the rest of the
bench it imports nothing from gateway/ or drivers/: it reads the simulator in-process and the
gateway only through the headend's HTTP API.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TextIO, TypeVar

from hil.scenarios.harness import Bench, BenchError
from hil.scenarios.report import Check, Timeline
from hil.server import SiteState
from hil.site import DeviceSpec

__all__ = [
    "Sample",
    "Sampler",
    "SiteDevices",
    "event_responses",
    "parse_time",
    "reported_state",
    "sampling",
    "site_devices",
    "statuses",
    "wait_until",
]

T = TypeVar("T")


def parse_time(text: str) -> float:
    """An ISO-8601 time from the headend API → POSIX seconds."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


@dataclass(frozen=True)
class SiteDevices:
    """The simulated site's devices by role, found generically from the site file."""

    pv: tuple[DeviceSpec, ...]
    batteries: tuple[DeviceSpec, ...]
    pcc_meter: DeviceSpec | None

    def requirements(self, *needs: str) -> list[Check]:
        """A failed check per missing need ("pv", "battery", "pcc meter"); [] if all are met."""
        have = {
            "pv": bool(self.pv),
            "battery": bool(self.batteries),
            "pcc meter": self.pcc_meter is not None,
        }
        article = {"pv": "a PV inverter", "battery": "a battery", "pcc meter": "a PCC meter"}
        return [
            Check(
                f"this scenario needs {article[need]}",
                False,
                f"the site file has no {need} device; choose a site with one (e.g. demo.toml)",
            )
            for need in needs
            if not have[need]
        ]


def site_devices(bench: Bench) -> SiteDevices:
    devices = bench.spec.devices
    return SiteDevices(
        pv=tuple(d for d in devices if d.kind == "pv"),
        batteries=tuple(d for d in devices if d.kind == "battery"),
        pcc_meter=next((d for d in devices if d.kind == "meter" and d.role == "pcc"), None),
    )


@dataclass(frozen=True)
class Sample:
    wall: float  # time.time() when taken
    mono: float  # time.monotonic() when taken
    state: SiteState

    @property
    def export_w(self) -> float:
        return -self.state.meter_w


@dataclass
class Sampler:
    """The simulator's state sampled at a fixed rate (in the background, see `sampling`)."""

    period_s: float = 0.05
    samples: list[Sample] = field(default_factory=list)

    def take(self, bench: Bench) -> Sample:
        sample = Sample(time.time(), time.monotonic(), bench.sim.state())
        self.samples.append(sample)
        return sample

    def between(self, start_mono: float, end_mono: float = float("inf")) -> list[Sample]:
        return [s for s in self.samples if start_mono <= s.mono < end_mono]

    @property
    def latest(self) -> Sample | None:
        return self.samples[-1] if self.samples else None


async def reported_state(bench: Bench, gateway_id: str | None = None) -> dict[str, Any] | None:
    """The newest reported state of `gateway_id` (default: the bench's gateway), or None."""
    wanted = gateway_id or bench.gateway_id
    site = await bench.api.get(f"/sites/{bench.site_id}")
    return next((r for r in site["reported_state"] if r["gateway_id"] == wanted), None)


async def event_responses(
    bench: Bench, *, gateway_id: str | None = None, limit: int = 1000
) -> list[dict[str, Any]]:
    """The site's event responses from `gateway_id` (default: the bench's), oldest seq first."""
    wanted = gateway_id or bench.gateway_id
    body = await bench.api.get(f"/events?site_id={bench.site_id}&limit={limit}")
    return sorted((r for r in body if r["gateway_id"] == wanted), key=lambda r: r["seq"])


def statuses(responses: Sequence[dict[str, Any]], event_id: str) -> list[str]:
    """The response statuses of one event, in the order the gateway emitted them."""
    return [r["status"] for r in responses if r["event_id"] == event_id]


async def wait_until(
    probe: Callable[[], Awaitable[T | None]], *, timeout_s: float, period_s: float = 0.1
) -> tuple[T | None, float]:
    """Poll `probe` until it returns something other than None (or the deadline passes).

    Returns (value, seconds waited); value None = the condition never held. A probe that raises
    BenchError (the headend is briefly busy) counts as "not yet".
    """
    started = time.monotonic()
    while True:
        value: T | None = None
        with contextlib.suppress(BenchError):
            value = await probe()
        waited = time.monotonic() - started
        if value is not None or waited >= timeout_s:
            return value, waited
        await asyncio.sleep(period_s)


def _label(reported: dict[str, Any] | None) -> str:
    if not reported:
        return ""
    ids = reported.get("active_event_ids") or []
    return ",".join(ids) if ids else str(reported.get("source", "")).lower()


@contextlib.asynccontextmanager
async def sampling(
    bench: Bench,
    sampler: Sampler,
    *,
    out: TextIO | None = None,
    limit_w: Callable[[], float | None] = lambda: None,
) -> AsyncIterator[Sampler]:
    """Sample the simulator in the background; with `out`, print a timeline row every second.

    The row names what the gateway reports in force (its events, or its control source).
    """
    timeline = Timeline(out, [d.id for d in site_devices(bench).pv]) if out is not None else None

    async def sample() -> None:
        next_tick = time.monotonic()
        while True:
            sampler.take(bench)
            next_tick += sampler.period_s
            await asyncio.sleep(max(0.0, next_tick - time.monotonic()))

    async def print_rows() -> None:
        assert timeline is not None
        timeline.header()
        reported: dict[str, Any] | None = None
        while True:
            with contextlib.suppress(Exception):  # the timeline is best effort; the verdict is not
                reported = await reported_state(bench)
            latest = sampler.latest
            if latest is not None:
                timeline.row(bench.elapsed_s(), latest.state, limit_w(), _label(reported))
            await asyncio.sleep(1.0)

    tasks = [asyncio.create_task(sample())]
    if timeline is not None:
        tasks.append(asyncio.create_task(print_rows()))
    try:
        yield sampler
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

"""PV caps at the simulator's registers, sampled at 20 Hz: for scenarios that judge timing.

Scenarios that judge when a cap reaches or leaves the inverters (an event on time while the
headend is down, a cap back after a gateway restart, an inverter reverting on its own timer, an
open-loop fallback) sample every PV inverter's decoded control registers in the background and
find the edges in the trace afterwards, while a timeline row per second shows what the site
physically does. Unlike `hil.scenarios.probe.sampling`, the timeline's label comes from the
scenario (what should be in force), not from the headend, which may be down or behind. The
site's devices, the headend queries and waiting on them are `hil.scenarios.probe`'s.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Self, TextIO

from hil.scenarios.harness import Bench
from hil.scenarios.probe import site_devices
from hil.scenarios.report import Timeline
from hil.server import DeviceState
from hil.site import DeviceSpec

__all__ = [
    "PCT_TOLERANCE",
    "CapSample",
    "SiteWatcher",
    "cap_w",
    "capped_at",
    "effective_pct",
    "iso",
    "not_capped_at",
    "sleep_until",
    "wait_acked",
]

SAMPLE_PERIOD_S = 0.05
# Two register percentages closer than this are the same cap (registers hold 0.1 % or finer).
PCT_TOLERANCE = 0.15


def effective_pct(device: DeviceState) -> float:
    """The generation cap a PV inverter's registers put in force, % of rating (100 = no limit).

    Decoded from 123 WMaxLim_Ena / WMaxLimPct (1xx) or 704 WMaxLimPctEna / WMaxLimPct (7xx).
    """
    if not device.wmaxlim_ena:
        return 100.0
    return float(device.wmaxlim_pct) if device.wmaxlim_pct is not None else 100.0


def cap_w(spec: DeviceSpec, pct: float) -> float:
    return (spec.rating_w or 0.0) * pct / 100.0


def iso(wall_s: float) -> str:
    """A POSIX timestamp as ISO-8601 UTC, as the headend's API accepts it."""
    return datetime.fromtimestamp(wall_s, tz=UTC).isoformat()


async def wait_acked(bench: Bench, version: int, timeout_s: float = 15.0) -> bool:
    """Wait until the gateway acknowledged intent `version` as persisted."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        intent = await bench.api.get(f"/sites/{bench.site_id}/intents/{version}")
        mine = [g for g in intent["gateways"] if g["gateway_id"] == bench.gateway_id]
        if mine and mine[0]["ack"] == "PERSISTED":
            return True
        await asyncio.sleep(0.1)
    return False


@dataclass(frozen=True)
class CapSample:
    wall: float  # time.time() when sampled
    caps_pct: Mapping[str, float]  # per PV inverter, see effective_pct
    export_w: float  # at the PCC meter (physics truth), + export
    pv_w: float
    revert_rem_s: Mapping[str, float]  # per PV inverter: time left on its cap's revert timer

    def all_at(self, pct: float) -> bool:
        return all(abs(value - pct) <= PCT_TOLERANCE for value in self.caps_pct.values())


def capped_at(pct: float) -> Callable[[CapSample], bool]:
    """A sample predicate: every PV inverter at `pct`."""
    return lambda sample: sample.all_at(pct)


def not_capped_at(pct: float) -> Callable[[CapSample], bool]:
    """A sample predicate: some PV inverter not at `pct` (a cap released or replaced)."""
    return lambda sample: not sample.all_at(pct)


@dataclass
class SiteWatcher:
    """Samples every PV cap every 50 ms and prints a timeline row every second, in the background.

    `label(wall)` gives the timeline's limit column and event label (what the scenario expects
    to be in force then); the headend may be down, so the watcher never asks it.
    """

    bench: Bench
    out: TextIO
    label: Callable[[float], tuple[float | None, str]] = lambda wall: (None, "")
    samples: list[CapSample] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        self._pv_ids = [d.id for d in site_devices(self.bench).pv]
        self._timeline = Timeline(self.out, self._pv_ids)
        self._timeline.header()
        self.sample()
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task

    def note(self, text: str) -> None:
        self._timeline.note(f"{self.bench.elapsed_s():5.1f}s {text}")

    def sample(self) -> CapSample:
        state = self.bench.sim.state()
        sample = CapSample(
            wall=time.time(),
            caps_pct={pv: effective_pct(state.devices[pv]) for pv in self._pv_ids},
            export_w=-state.meter_w,
            pv_w=state.pv_w,
            revert_rem_s={pv: state.devices[pv].wmaxlim_rvrt_rem_s or 0.0 for pv in self._pv_ids},
        )
        self.samples.append(sample)
        return sample

    async def _run(self) -> None:
        next_row = time.monotonic() + 1.0
        while True:
            await asyncio.sleep(SAMPLE_PERIOD_S)
            sample = self.sample()
            if time.monotonic() >= next_row:
                next_row += 1.0
                limit_w, label = self.label(sample.wall)
                self._timeline.row(self.bench.elapsed_s(), self.bench.sim.state(), limit_w, label)

    def first(
        self,
        predicate: Callable[[CapSample], bool],
        *,
        after: float = -math.inf,
        before: float = math.inf,
    ) -> CapSample | None:
        """The first sample in [after, before) that satisfies `predicate`."""
        return next(
            (s for s in self.samples if after <= s.wall < before and predicate(s)),
            None,
        )

    def window(self, start: float, end: float) -> list[CapSample]:
        return [s for s in self.samples if start <= s.wall < end]

    async def wait_for(
        self, predicate: Callable[[CapSample], bool], *, timeout_s: float, after: float = -math.inf
    ) -> CapSample | None:
        """Wait (sampling on) until a sample after `after` satisfies `predicate`; None = timeout."""
        deadline = time.monotonic() + timeout_s
        seen = 0
        while True:
            found = next(
                (s for s in self.samples[seen:] if s.wall >= after and predicate(s)),
                None,
            )
            seen = len(self.samples)
            if found is not None:
                return found
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(SAMPLE_PERIOD_S)


async def sleep_until(wall: float) -> None:
    """Sleep until the wall clock reaches `wall` (the gateway schedules on the wall clock)."""
    delay = wall - time.time()
    if delay > 0:
        await asyncio.sleep(delay)

"""Benchmark: export-limit breach -> curtailment written (HIL, 200 ms poll).

A real `dergw gateway run` (and headend, not on this path) on a PV-only variant of the demo site
simulated in this process: one 10 kW PV inverter and the PCC meter, the battery left out so
that curtailing PV is the only way back under the limit. The gateway polls every device every
200 ms with a 200 ms control period, under a contracted export limit at the PCC
(`[site] export_limit_w`). Irradiance and load are pinned (simulator overrides, the mechanism of
the export-step scenario) and the load's noise is switched off, so that the only breaches are
the ones this benchmark makes.

Each repetition, from a site settled under the limit with PV curtailed: the load steps down, so
the export jumps well above the limit. The breach instant is the simulator's own: a step
listener (`SiteSimulator.add_step_listener`) stamps the first physics step whose PCC export
exceeds the limit, i.e. the moment the meter's registers first serve it. The curtailment
instant is the simulator accepting the first Modbus write that lowers the PV inverter's
WMaxLimPct below its value before the step (`add_write_listener`). Both are time.monotonic() in
this process. The load then steps back up and the gateway relaxes the cap before the next
repetition.

Expected: the breach waits up to one poll (200 ms) to be read and up to one control period to
be acted on, then one Modbus write: a few hundred ms, against the 1 s budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from dataclasses import dataclass, field, replace

from bench.core import BenchOptions, Budget, Figure, latency_figure
from bench.intent_latency import LIMIT_REF, PV_ID, LimitWatch, demo_site, running_site
from hil.scenarios.harness import Bench, BenchError
from hil.server import SiteSimulator
from hil.site import SiteSpec

NAME = "export-breach"
PERIOD_S = 0.2  # gateway poll and control period
LIMIT_W = 1000.0
IRRADIANCE_W_M2 = 800.0  # 8 kW available on the demo's 10 kW PV
LOAD_HIGH_W = 5000.0  # PV capped near 6 kW to hold the export at the limit
LOAD_LOW_W = 3500.0  # the step down: 1.5 kW more export than the limit allows
SETTLE_TIMEOUT_S = 20.0
REACT_TIMEOUT_S = 5.0
AFTER_S = 0.8  # watched after the curtailment, so the loop finishes reacting to the step


@dataclass(frozen=True)
class _Plan:
    steps: int


FULL = _Plan(steps=10)
QUICK = _Plan(steps=2)


def pv_site() -> SiteSpec:
    """The demo site without its battery, and without load noise."""
    data = demo_site().model_dump()
    data["devices"] = [d for d in data["devices"] if d["kind"] != "battery"]
    data["profiles"]["load_noise_pct"] = 0.0
    return SiteSpec.model_validate(data)


@dataclass
class BreachWatch:
    """Stamps the first physics step, once armed, at which the PCC export exceeds the limit."""

    sim: SiteSimulator
    limit_w: float
    armed: bool = False
    breach_mono: float | None = None
    peak_export_w: float = -math.inf
    seen: asyncio.Event = field(default_factory=asyncio.Event)

    def arm(self) -> None:
        self.armed, self.breach_mono, self.peak_export_w = True, None, -math.inf
        self.seen.clear()

    def __call__(self, mono: float) -> None:
        if not self.armed:
            return
        export_w = -self.sim.physics.meter_w
        self.peak_export_w = max(self.peak_export_w, export_w)
        if self.breach_mono is None and export_w > self.limit_w:
            self.breach_mono = mono
            self.seen.set()


def _export_w(bench: Bench) -> float:
    return -bench.sim.physics.meter_w


def _cap_pct(bench: Bench) -> float:
    value = bench.sim.read_point(PV_ID, LIMIT_REF)
    return float(value) if value is not None else math.nan


async def _settle(bench: Bench, watch: LimitWatch) -> float:
    """Wait until the export sits just under the limit with PV curtailed and the cap has not
    moved for a second; returns the cap (%)."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    quiet_since = time.monotonic()
    while time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        export_w = _export_w(bench)
        last_write = watch.writes[-1][0] if watch.writes else -math.inf
        near = LIMIT_W - 400.0 <= export_w <= LIMIT_W
        if not near or _cap_pct(bench) >= 100.0 or last_write > quiet_since:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= 1.0:
            return _cap_pct(bench)
    raise BenchError(
        f"the site did not settle under the {LIMIT_W:.0f} W export limit within "
        f"{SETTLE_TIMEOUT_S:.0f} s (export {_export_w(bench):.0f} W, cap {_cap_pct(bench):g} %); "
        "gateway log:\n" + (bench.gateway.log_tail() if bench.gateway else "")
    )


async def _one_breach(
    bench: Bench, breach: BreachWatch, watch: LimitWatch
) -> tuple[float, float, float]:
    """(breach -> curtailment written s, cap before %, peak export W) for one load step."""
    cap_before = await _settle(bench, watch)
    breach.arm()
    bench.sim.set_load_override(LOAD_LOW_W)
    try:
        async with asyncio.timeout(REACT_TIMEOUT_S):
            await breach.seen.wait()
            assert breach.breach_mono is not None
            breach_mono = breach.breach_mono
            while True:
                written = next(
                    (
                        mono
                        for mono, pct in watch.writes
                        if mono >= breach_mono and pct < cap_before - 0.05
                    ),
                    None,
                )
                if written is not None:
                    break
                watch.changed.clear()
                await watch.changed.wait()
    except TimeoutError:
        raise BenchError(
            f"no curtailment below {cap_before:g} % within {REACT_TIMEOUT_S:g} s of the load "
            f"step (breach {'seen' if breach.breach_mono else 'not seen'}); gateway log:\n"
            + (bench.gateway.log_tail() if bench.gateway else "")
        ) from None
    await asyncio.sleep(AFTER_S)
    breach.armed = False
    bench.sim.set_load_override(LOAD_HIGH_W)
    return written - breach_mono, cap_before, breach.peak_export_w


async def run(options: BenchOptions) -> list[Figure]:
    plan = QUICK if options.quick else FULL
    spec = pv_site()
    async with running_site(
        options,
        spec,
        prefix="dergw-breach-",
        tls=False,  # the headend is not on this path
        poll_period_s=PERIOD_S,
        control_period_s=PERIOD_S,
        extra_site=f"export_limit_w = {LIMIT_W:g}",
    ) as bench:
        bench.sim.set_irradiance_override(IRRADIANCE_W_M2)
        bench.sim.set_load_override(LOAD_HIGH_W)
        watch = LimitWatch(bench.sim, PV_ID, LIMIT_REF)
        breach = BreachWatch(bench.sim, LIMIT_W)
        removers = [bench.sim.add_write_listener(watch), bench.sim.add_step_listener(breach)]
        try:
            results = [await _one_breach(bench, breach, watch) for _ in range(plan.steps)]
        finally:
            for remove in removers:
                with contextlib.suppress(ValueError):
                    remove()
    latencies = [latency for latency, _, _ in results]
    figure = latency_figure(
        NAME,
        "export-limit breach -> PV curtailment written",
        latencies,
        budget=Budget("<=", 1000, checked="p99"),
        note=(
            f"n={len(latencies)} load steps under a {LIMIT_W:.0f} W export limit, "
            f"{PERIOD_S * 1e3:.0f} ms poll/control; first physics step over the limit -> "
            "Modbus write lowering the PV cap, both stamped by the simulator; p99 = worst"
        ),
    )
    extra = {
        "samples_ms": [round(s * 1e3, 1) for s in latencies],
        "caps_before_pct": [cap for _, cap, _ in results],
        "peak_export_w": [round(peak) for _, _, peak in results],
        "worst_ms": max(latencies) * 1e3 if latencies else math.nan,
    }
    return [replace(figure, extra=extra)]

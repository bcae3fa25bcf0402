"""Scenario `export-step`: an export limit holds through a PV step up and a load step down.

Script: the gateway runs at 200 ms polling and a 200 ms control period. The irradiance and the
site load are pinned (simulator overrides) so the steps are clean: half the PV rating available,
a load of 30 % of it, and an export limit of 10 % of it, posted as an event. Once the site has
settled under the limit, the irradiance steps up to full sun and, 6 s later, the load steps down
by 15 % of the PV rating. Each step offers the site more surplus than the limit allows; the
gateway must keep the export at the limit, or bring it back under within 1 s, and hold it there
without a sustained oscillation.

Measured per step, on the simulator's PCC meter (sampled at 20 Hz):

* the step itself, as the site sees it (available PV, or PV minus load, before and after);
* time back under: from the step to the first sample at or under limit + tolerance after which
  the export stays there for `hold_s` (judged ≤ `back_under_s`, 1 s; 0 if it never went over);
* first write: from the step to the first change of any control register (PV limit, battery
  command), i.e. when the gateway's reaction reached the devices;
* peak export in the `observe_s` after the step;
* settled, over the last `settled_window_s` of that: the export never exceeds limit +
  tolerance, and its peak-to-peak stays within a bound ("no sustained oscillation").

The gateway holds its caps steady inside a deadband, so the site load's own noise reaches the
PCC: tolerance = max(100 W, 2 sigma) and the peak-to-peak bound = max(400 W, 6 sigma), where
sigma = pinned load x the site's load noise %. A loop hunting around the limit swings by more
than the load's noise; on the demo site the settled peak-to-peak is 30-90 W.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TextIO

from hil.scenarios.harness import Bench, gateway_config_text
from hil.scenarios.probe import Sample, Sampler, event_responses, sampling, site_devices, statuses
from hil.scenarios.report import Check, ScenarioResult
from hil.server import SiteState

__all__ = ["ExportStepParams", "run_export_step"]

EVENT_ID = "export-step-limit"


@dataclass(frozen=True)
class ExportStepParams:
    # Site conditions as shares of the site's total PV rating (so any --site gets sane steps).
    limit_share: float = 0.10  # export limit
    load_share: float = 0.30  # pinned site load before the load step
    load_step_share: float = 0.15  # the load step down
    irradiance_low_w_m2: float = 500.0
    irradiance_high_w_m2: float = 1000.0
    poll_period_s: float = 0.2
    control_period_s: float = 0.2
    settle_timeout_s: float = 15.0  # to get under the limit before the first step
    back_under_s: float = 1.0  # the requirement
    hold_s: float = 1.0  # "back under" = under and staying under this long
    observe_s: float = 6.0  # each step is watched this long...
    settled_window_s: float = 3.0  # ...and judged settled over its last seconds
    # The gateway holds its PV caps steady inside a deadband, so the site load's own noise passes
    # to the PCC: the tolerance and the oscillation bound grow with it (sigma = load x noise %).
    min_tolerance_w: float = 100.0
    tolerance_sigmas: float = 2.0
    min_settled_pp_w: float = 400.0
    settled_pp_sigmas: float = 6.0


def _controls(state: SiteState) -> tuple[tuple[object, ...], ...]:
    """Every control register the gateway writes, to see when its reaction lands."""
    return tuple(
        (d.wmaxlim_pct, d.wmaxlim_ena, d.stor_ctl_mod, d.in_w_rte, d.out_w_rte, d.conn)
        for d in state.devices.values()
        if d.kind != "meter"
    )


@dataclass(frozen=True)
class _StepFigures:
    back_under_s: float | None
    first_write_s: float | None
    peak_export_w: float
    settled_max_w: float
    settled_pp_w: float


def _judge_step(
    samples: list[Sample], step_mono: float, ceiling_w: float, params: ExportStepParams
) -> _StepFigures:
    after = [s for s in samples if step_mono <= s.mono < step_mono + params.observe_s]
    back_under: float | None = None
    for i, sample in enumerate(after):
        if sample.export_w > ceiling_w:
            continue
        held = [s for s in after[i:] if s.mono < sample.mono + params.hold_s]
        if all(s.export_w <= ceiling_w for s in held) and held[-1].mono - sample.mono >= (
            params.hold_s - 0.2
        ):
            back_under = sample.mono - step_mono
            break
    before = _controls(after[0].state) if after else ()
    first_write = next((s.mono - step_mono for s in after if _controls(s.state) != before), None)
    settled_from = step_mono + params.observe_s - params.settled_window_s
    settled = [s.export_w for s in after if s.mono >= settled_from]
    return _StepFigures(
        back_under_s=back_under,
        first_write_s=first_write,
        peak_export_w=max((s.export_w for s in after), default=float("nan")),
        settled_max_w=max(settled, default=float("nan")),
        settled_pp_w=(max(settled) - min(settled)) if settled else float("nan"),
    )


@dataclass(frozen=True)
class _Step:
    key: str  # figure prefix
    label: str
    mono: float  # when the simulator was told
    measure: Callable[[SiteState], float]  # what the step changes, in W

    @property
    def what(self) -> str:
        return "available PV" if self.key == "pv" else "PV minus load"


def _pv_available_w(state: SiteState) -> float:
    return sum(d.available_w or 0.0 for d in state.devices.values() if d.kind == "pv")


def _surplus_w(state: SiteState) -> float:
    return _pv_available_w(state) - state.load_w


def _mean(values: Iterable[float]) -> float:
    items = list(values)
    return sum(items) / len(items) if items else float("nan")


def _or_nan(value: float | None) -> float:
    return value if value is not None else float("nan")


async def run_export_step(
    bench: Bench, out: TextIO, params: ExportStepParams | None = None
) -> ScenarioResult:
    params = params or ExportStepParams()
    result = ScenarioResult("export-step")
    devices = site_devices(bench)
    missing = devices.requirements("pv", "pcc meter")
    if missing:
        result.checks.extend(missing)
        return result
    pv_rating_w = sum(float(d.rating_w or 0.0) for d in devices.pv)
    limit_w = round(params.limit_share * pv_rating_w, -1)
    load_w = params.load_share * pv_rating_w
    load_low_w = load_w - params.load_step_share * pv_rating_w
    load_sigma_w = load_w * bench.spec.profiles.load_noise_pct / 100.0
    tolerance_w = max(params.min_tolerance_w, params.tolerance_sigmas * load_sigma_w)
    max_pp_w = max(params.min_settled_pp_w, params.settled_pp_sigmas * load_sigma_w)
    ceiling_w = limit_w + tolerance_w

    assert bench.gateway_config is not None
    bench.gateway_config.write_text(
        gateway_config_text(
            bench,
            control_period_s=params.control_period_s,
            poll_period_s=params.poll_period_s,
        )
    )
    bench.sim.set_irradiance_override(params.irradiance_low_w_m2)
    bench.sim.set_load_override(load_w)
    await bench.start_gateway()
    await bench.wait_registered()
    print(
        f"gateway {bench.gateway_id} registered; PV {pv_rating_w:.0f} W, irradiance pinned at "
        f"{params.irradiance_low_w_m2:.0f} W/m², load pinned at {load_w:.0f} W; polling "
        f"{params.poll_period_s:g} s, control period {params.control_period_s:g} s",
        file=out,
    )

    sampler = Sampler(period_s=0.05)
    async with sampling(bench, sampler, out=out, limit_w=lambda: limit_w):
        await asyncio.sleep(1.0)
        uncontrolled = sampler.latest
        posted = await bench.api.post(
            f"/sites/{bench.site_id}/intents",
            {
                "events": [
                    {
                        "event_id": EVENT_ID,
                        "duration_s": 120,
                        "controls": {"export_limit_w": limit_w},
                    }
                ]
            },
        )
        print(f"{'':>6}  >>> posted v{posted['version']}: export limit {limit_w:.0f} W", file=out)
        posted_mono = time.monotonic()
        # Settled: under the ceiling for 2 s in a row.
        settled_at: float | None = None
        while time.monotonic() - posted_mono < params.settle_timeout_s:
            await asyncio.sleep(0.1)
            recent = sampler.between(time.monotonic() - 2.0)
            if (
                recent
                and recent[0].mono >= posted_mono
                and all(s.export_w <= ceiling_w for s in recent)
            ):
                settled_at = time.monotonic() - posted_mono
                break
        result.checks.append(
            Check(
                "the site settled under the export limit before the steps",
                settled_at is not None,
                f"under {limit_w:.0f} W + {tolerance_w:.0f} W for 2 s, "
                f"{settled_at:.1f} s after the post"
                if settled_at is not None
                else f"not within {params.settle_timeout_s:.0f} s",
            )
        )
        if settled_at is None:
            return result

        steps: list[_Step] = []
        print(
            f"{'':>6}  >>> PV step: irradiance {params.irradiance_low_w_m2:.0f} -> "
            f"{params.irradiance_high_w_m2:.0f} W/m²",
            file=out,
        )
        steps.append(_Step("pv", "PV step up", time.monotonic(), _pv_available_w))
        bench.sim.set_irradiance_override(params.irradiance_high_w_m2)
        await asyncio.sleep(params.observe_s)
        print(f"{'':>6}  >>> load step: {load_w:.0f} -> {load_low_w:.0f} W", file=out)
        steps.append(_Step("load", "load step down", time.monotonic(), _surplus_w))
        bench.sim.set_load_override(load_low_w)
        await asyncio.sleep(params.observe_s)

    # -- verdict --------------------------------------------------------------------------------
    samples = sampler.samples
    result.figures["limit_w"] = limit_w
    result.figures["tolerance_w"] = tolerance_w
    if uncontrolled is not None:
        result.figures["uncontrolled_export_w"] = uncontrolled.export_w
    expected_rise = {
        "pv": min(params.irradiance_high_w_m2, 1000.0) / 1000.0 * pv_rating_w
        - params.irradiance_low_w_m2 / 1000.0 * pv_rating_w,
        "load": load_w - load_low_w,
    }
    for step in steps:
        # The step as the site sees it: available PV (or the surplus the load leaves) before
        # and after, whatever the gateway does with it.
        before = _mean(
            step.measure(s.state) for s in samples if step.mono - 1.0 <= s.mono < step.mono
        )
        after = _mean(
            step.measure(s.state) for s in samples if step.mono + 0.5 <= s.mono < step.mono + 1.5
        )
        rise = expected_rise[step.key]
        result.checks.append(
            Check(
                f"{step.label}: the step happened at the site",
                after - before >= 0.7 * rise,
                f"{step.what} {before:.0f} W -> {after:.0f} W (expected +{rise:.0f} W)",
            )
        )
        figures = _judge_step(samples, step.mono, ceiling_w, params)
        result.figures[f"{step.key}_back_under_s"] = _or_nan(figures.back_under_s)
        result.figures[f"{step.key}_first_write_s"] = _or_nan(figures.first_write_s)
        result.figures[f"{step.key}_peak_export_w"] = figures.peak_export_w
        result.figures[f"{step.key}_settled_pp_w"] = figures.settled_pp_w
        back = figures.back_under_s
        first_write = (
            f"{figures.first_write_s:.2f} s" if figures.first_write_s is not None else "never"
        )
        result.checks.append(
            Check(
                f"{step.label}: export back under the limit within {params.back_under_s:g} s",
                back is not None and back <= params.back_under_s,
                (f"{back:.2f} s" if back is not None else "never")
                + f" (at or under {ceiling_w:.0f} W and staying there {params.hold_s:g} s); "
                f"peak export {figures.peak_export_w:.0f} W, first register write after "
                f"{first_write}",
            )
        )
        settled_from = params.observe_s - params.settled_window_s
        result.checks.append(
            Check(
                f"{step.label}: no sustained oscillation ({settled_from:g}-{params.observe_s:g} s "
                "after the step)",
                figures.settled_max_w <= ceiling_w and figures.settled_pp_w <= max_pp_w,
                f"max {figures.settled_max_w:.0f} W (≤ {ceiling_w:.0f} W), peak-to-peak "
                f"{figures.settled_pp_w:.0f} W (≤ {max_pp_w:.0f} W)",
            )
        )

    responses = await event_responses(bench)
    seen = statuses(responses, EVENT_ID)
    result.checks.append(
        Check(
            "the export-limit event was received and started",
            seen[:2] == ["RECEIVED", "STARTED"],
            " -> ".join(seen) or "none",
        )
    )
    return result

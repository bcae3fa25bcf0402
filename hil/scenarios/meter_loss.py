"""Scenario `meter-loss`: the PCC meter goes silent; the conservative limit is in force at once.

Issue item (c): within 2 control cycles of the PCC meter's last good reading going stale, the
site is under the open-loop conservative limit. Script: an export limit as the default control
(closed loop on the PCC meter) with every battery held at 0 W by a device event, so that the PV
caps are the loop's only lever; let the loop settle (PV capped to load + limit); make the meter
silent (no Modbus answer at all). Its last reading goes stale `meter_stale_periods` poll periods
later; from then the sum of the PV caps at the registers must reach the open-loop value (export
limit + `assumed_min_load_w` - `export_margin_w`: no measured load is trusted) within two control
cycles plus a register-latency tolerance, and stay there; the headend's reported state must say
"PCC meter stale: open loop". Restoring the meter must bring the closed loop back.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from typing import Any, TextIO

from hil.scenarios.harness import Bench, gateway_config_text
from hil.scenarios.probe import reported_state, site_devices, wait_until
from hil.scenarios.report import Check, ScenarioResult
from hil.scenarios.watch import CapSample, SiteWatcher, cap_w
from hil.server import Fault

__all__ = ["MeterLossParams", "run_meter_loss"]

STALE_NOTE = "PCC meter stale: open loop"


@dataclass(frozen=True)
class MeterLossParams:
    export_limit_w: float = 1500.0
    assumed_min_load_w: float = 500.0
    export_margin_w: float = 50.0
    control_period_s: float = 0.25
    meter_poll_s: float = 0.2
    meter_stale_periods: int = 3
    settle_timeout_s: float = 15.0
    settle_hold_s: float = 2.0
    silent_s: float = 5.0
    restore_timeout_s: float = 10.0
    latency_tolerance_s: float = 0.5  # register latency on top of the two control cycles
    tolerance_w: float = 100.0  # on the sum of PV caps (registers hold 0.1 % of rating)
    export_tolerance_w: float = 200.0  # on the physical export (noise, one poll of delay)


def _notes(state: dict[str, Any] | None) -> list[str]:
    return list(state["notes"]) if state else []


async def run_meter_loss(
    bench: Bench, out: TextIO, params: MeterLossParams | None = None
) -> ScenarioResult:
    params = params or MeterLossParams()
    result = ScenarioResult("meter-loss")
    devices = site_devices(bench)
    pvs, batteries, meter = devices.pv, devices.batteries, devices.pcc_meter
    result.checks.extend(devices.requirements("pv", "pcc meter"))
    if result.checks:
        return result
    assert meter is not None
    assert bench.gateway_config is not None
    bench.gateway_config.write_text(
        gateway_config_text(
            bench,
            control_period_s=params.control_period_s,
            poll_period_s=params.meter_poll_s,
            extra_control="\n".join(
                [
                    f"meter_stale_periods = {params.meter_stale_periods}",
                    f"assumed_min_load_w = {params.assumed_min_load_w}",
                    f"export_margin_w = {params.export_margin_w}",
                ]
            ),
        )
    )
    await bench.start_gateway()
    await bench.wait_registered()
    cycle_s = params.control_period_s
    bound_s = 2 * cycle_s + params.latency_tolerance_s
    open_loop_w = params.export_limit_w + params.assumed_min_load_w - params.export_margin_w
    ratings_w = sum(p.rating_w or 0.0 for p in pvs)

    def caps_w(sample: CapSample) -> float:
        return sum(cap_w(pv, sample.caps_pct[pv.id]) for pv in pvs)

    def at_open_loop(sample: CapSample) -> bool:
        return abs(caps_w(sample) - open_loop_w) <= params.tolerance_w

    phase = ["closed loop"]

    def label(wall: float) -> tuple[float | None, str]:
        return params.export_limit_w, phase[0]

    async with SiteWatcher(bench, out, label) as watch:
        posted = await bench.api.post(
            f"/sites/{bench.site_id}/intents",
            {
                "default_control": {"export_limit_w": params.export_limit_w},
                "events": [
                    {
                        "event_id": f"hold-{battery.id}",
                        "device_id": battery.id,
                        "duration_s": 600,
                        "controls": {"fixed_w": 0},
                    }
                    for battery in batteries
                ],
            },
        )
        watch.note(
            f"posted intent v{posted['version']}: default export limit "
            f"{params.export_limit_w:.0f} W"
            + (f"; batteries {', '.join(b.id for b in batteries)} held at 0 W" if batteries else "")
        )
        # Settled: export under the limit and the PV caps well above the open-loop value.
        settled_since: list[float] = []

        def settled(sample: CapSample) -> bool:
            steady = (
                sample.export_w <= params.export_limit_w + params.export_tolerance_w
                and caps_w(sample) > open_loop_w + 2 * params.tolerance_w
                and any(pct < 100.0 for pct in sample.caps_pct.values())
            )
            if not steady:
                settled_since.clear()
                return False
            settled_since[:1] = settled_since[:1] or [sample.wall]
            return sample.wall - settled_since[0] >= params.settle_hold_s

        closed = await watch.wait_for(settled, timeout_s=params.settle_timeout_s)
        closed_caps_w = caps_w(closed or watch.samples[-1])
        if closed is None:
            result.checks.append(
                Check(
                    "the closed loop settled: export under the limit, PV caps above the "
                    f"open-loop value ({open_loop_w:.0f} W)",
                    False,
                    f"not within {params.settle_timeout_s:g} s; last PV caps "
                    f"{closed_caps_w:.0f} W, export {watch.samples[-1].export_w:.0f} W",
                )
            )
            return result

        silenced = time.time()
        bench.sim.set_fault(meter.id, Fault.SILENT)
        stale_at = silenced + params.meter_stale_periods * params.meter_poll_s
        phase[0] = "PCC meter silent"
        watch.note(
            f"PCC meter {meter.id} silent (its last reading goes stale "
            f"{stale_at - silenced:.1f} s later); PV caps {closed_caps_w:.0f} W"
        )
        reached = await watch.wait_for(at_open_loop, timeout_s=params.silent_s, after=silenced)
        if reached is not None:
            watch.note(
                f"PV caps at the open-loop value {caps_w(reached):.0f} W, "
                f"{reached.wall - stale_at:+.2f} s from the meter going stale"
            )

        async def stale_noted() -> dict[str, Any] | None:
            state = await reported_state(bench)
            return state if any(STALE_NOTE in n for n in _notes(state)) else None

        state, _ = await wait_until(
            stale_noted, timeout_s=max(0.5, silenced + params.silent_s - time.time())
        )
        noted = state is not None
        await asyncio.sleep(max(0.0, silenced + params.silent_s - time.time()))
        silent_end = time.time()

        restored = time.time()
        bench.sim.set_fault(meter.id, None)
        phase[0] = "PCC meter back"
        watch.note(f"PCC meter {meter.id} answers again")
        relaxed = await watch.wait_for(
            lambda s: caps_w(s) > open_loop_w + 2 * params.tolerance_w,
            timeout_s=params.restore_timeout_s,
            after=restored,
        )

        async def closed_loop_noted() -> dict[str, Any] | None:
            state = await reported_state(bench)
            notes = _notes(state)
            closed = any("closed loop" in n for n in notes)
            return state if closed and not any(STALE_NOTE in n for n in notes) else None

        back_state, _ = await wait_until(closed_loop_noted, timeout_s=params.restore_timeout_s)
        back = back_state is not None
        back_s = time.time() - restored
        await asyncio.sleep(2.0)

    # -- verdict --------------------------------------------------------------------------------
    result.checks.append(
        Check(
            f"the closed loop settled first: export under {params.export_limit_w:.0f} W, "
            f"PV caps above the open-loop value {open_loop_w:.0f} W",
            True,
            f"PV caps {closed_caps_w:.0f} W of {ratings_w:.0f} W",
        )
    )
    to_limit_s = reached.wall - stale_at if reached is not None else math.nan
    result.figures["time_to_open_loop_s"] = to_limit_s
    result.figures["time_to_open_loop_cycles"] = to_limit_s / cycle_s
    result.figures["time_from_silence_s"] = reached.wall - silenced if reached else math.nan
    result.checks.append(
        Check(
            f"the PV caps reached the open-loop value ({open_loop_w:.0f} W = limit "
            f"{params.export_limit_w:.0f} + assumed load {params.assumed_min_load_w:.0f} "
            f"- margin {params.export_margin_w:.0f}) within 2 control cycles "
            f"(+{params.latency_tolerance_s:g} s) of the meter going stale",
            reached is not None and to_limit_s <= bound_s,
            f"{to_limit_s:+.2f} s = {to_limit_s / cycle_s:.1f} cycles of {cycle_s:g} s "
            f"(bound {bound_s:.2f} s)"
            if reached is not None
            else f"not within {params.silent_s:g} s",
        )
    )
    held = watch.window(reached.wall, silent_end) if reached is not None else []
    worst_caps_w = max((caps_w(s) for s in held), default=math.nan)
    result.checks.append(
        Check(
            "the open-loop value held while the meter was silent",
            bool(held) and worst_caps_w <= open_loop_w + params.tolerance_w,
            f"highest PV caps {worst_caps_w:.0f} W",
        )
    )
    silent = watch.window(silenced, silent_end)
    worst_export = max((s.export_w for s in silent), default=math.nan)
    result.figures["worst_export_silent_w"] = worst_export
    result.checks.append(
        Check(
            "export at the PCC stayed under the limit while the meter was silent (physics)",
            bool(silent) and worst_export <= params.export_limit_w + params.export_tolerance_w,
            f"worst export {worst_export:.0f} W",
        )
    )
    result.checks.append(
        Check(
            f'the headend\'s reported state said "{STALE_NOTE}"',
            noted,
            next((n for n in _notes(state) if STALE_NOTE in n), f"notes: {_notes(state)}"),
        )
    )
    result.figures["time_to_closed_loop_s"] = (
        relaxed.wall - restored if relaxed is not None else math.nan
    )
    result.checks.append(
        Check(
            "restoring the meter returned to closed loop (PV caps relaxed, reported state "
            "closed loop)",
            relaxed is not None and back,
            (
                f"caps relaxed {relaxed.wall - restored:.1f} s after; "
                if relaxed
                else "caps not relaxed; "
            )
            + (f"reported {back_s:.1f} s after: " if back else "reported: ")
            + "; ".join(n for n in _notes(back_state) if "loop" in n),
        )
    )
    return result

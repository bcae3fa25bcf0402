"""Scenario `soc-floor`: a battery at its SoC floor refuses discharge, and resumes only above the
hysteresis band.

Script: the gateway runs with a SoC floor and hysteresis of its own (`control.soc_min_pct`,
`control.soc_hysteresis_pct`; the floor sits well above the simulated BMS's own minimum and its
taper, so what stops the battery is the gateway, not the BMS). A fixed-power discharge event is
posted on the battery while its SoC is just above the floor, and the battery discharges. Then:

1. the SoC drops to the floor (simulator `set_soc`): discharge stops, the battery's registers
   carry no discharge command, and the headend's reported state names the SoC guard in the
   battery setpoint's `bound_by`;
2. the SoC rises into the hysteresis band (above the floor, below floor + hysteresis):
   discharge stays blocked;
3. the SoC rises above floor + hysteresis: discharge resumes at the event's power.

Judged on the simulator (battery AC power, 124 StorCtl_Mod / OutWRte) and the headend (reported
state, event responses). Figures: how long each edge took from the SoC change.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

from hil.scenarios.harness import Bench, gateway_config_text
from hil.scenarios.probe import (
    Sampler,
    event_responses,
    reported_state,
    sampling,
    site_devices,
    statuses,
    wait_until,
)
from hil.scenarios.report import Check, ScenarioResult
from hil.server import DeviceState

__all__ = ["SocFloorParams", "run_soc_floor"]

EVENT_ID = "soc-floor-discharge"
STOR_DISCHARGE = 0b10  # model 124 StorCtl_Mod bit 1
GUARD_TEXT = "SoC guard"  # how the safety kernel names the guard in bound_by


@dataclass(frozen=True)
class SocFloorParams:
    min_floor_pct: float = 20.0  # the gateway's floor, at least this...
    floor_above_bms_pct: float = 15.0  # ...and this far above the simulated BMS minimum
    hysteresis_pct: float = 5.0
    discharge_share: float = 0.5  # the event's fixed_w, share of the battery's discharge rating
    start_above_floor_pct: float = 1.0
    poll_period_s: float = 0.2
    control_period_s: float = 0.2
    edge_timeout_s: float = 6.0  # for discharge to start / stop after a SoC change
    band_hold_s: float = 3.0  # watched inside the hysteresis band
    idle_share: float = 0.05  # |output| below this share of fixed_w counts as not discharging
    running_share: float = 0.8  # output above this share of fixed_w counts as discharging


def _discharge_commanded(device: DeviceState) -> bool:
    """The battery's 124 registers ask it to discharge (mode bit set with a non-zero rate)."""
    mode = int(device.stor_ctl_mod or 0)
    return bool(mode & STOR_DISCHARGE) and float(device.out_w_rte or 0.0) > 0.0


def _first(
    sampler: Sampler, since_mono: float, predicate: Callable[[DeviceState], bool], device_id: str
) -> float:
    """Seconds from `since_mono` to the first sample where the device's registers satisfy
    `predicate` (NaN if none): when the gateway's command landed."""
    return next(
        (
            s.mono - since_mono
            for s in sampler.between(since_mono)
            if predicate(s.state.devices[device_id])
        ),
        float("nan"),
    )


def _setpoint(reported: dict[str, Any] | None, device_id: str) -> dict[str, Any] | None:
    if not reported:
        return None
    return next((s for s in reported["setpoints"] if s["device_id"] == device_id), None)


def _guarded(setpoint: dict[str, Any] | None) -> bool:
    return setpoint is not None and any(GUARD_TEXT in why for why in setpoint["bound_by"])


async def run_soc_floor(
    bench: Bench, out: TextIO, params: SocFloorParams | None = None
) -> ScenarioResult:
    params = params or SocFloorParams()
    result = ScenarioResult("soc-floor")
    devices = site_devices(bench)
    missing = devices.requirements("battery")
    if missing:
        result.checks.extend(missing)
        return result
    battery = devices.batteries[0]
    floor = max(params.min_floor_pct, battery.soc_min_pct + params.floor_above_bms_pct)
    band_top = floor + params.hysteresis_pct
    fixed_w = round(params.discharge_share * battery.discharge_w, -1)
    idle_w = params.idle_share * fixed_w
    running_w = params.running_share * fixed_w

    assert bench.gateway_config is not None
    bench.gateway_config.write_text(
        gateway_config_text(
            bench,
            control_period_s=params.control_period_s,
            poll_period_s=params.poll_period_s,
            extra_control=(
                f"soc_min_pct = {floor:g}\nsoc_hysteresis_pct = {params.hysteresis_pct:g}"
            ),
        )
    )
    bench.sim.set_soc(battery.id, floor + params.start_above_floor_pct)
    await bench.start_gateway()
    await bench.wait_registered()
    print(
        f"gateway {bench.gateway_id} registered; battery {battery.id}: gateway SoC floor "
        f"{floor:g} %, hysteresis {params.hysteresis_pct:g} % (discharge resumes above "
        f"{band_top:g} %); the simulated BMS stops at {battery.soc_min_pct:g} %",
        file=out,
    )

    def output_w() -> float:
        return bench.sim.state().devices[battery.id].ac_w

    def registers() -> DeviceState:
        return bench.sim.state().devices[battery.id]

    async def output_where(predicate: Callable[[float], bool]) -> float | None:
        return output_w() if predicate(output_w()) else None

    sampler = Sampler(period_s=0.05)
    async with sampling(bench, sampler, out=out):
        posted = await bench.api.post(
            f"/sites/{bench.site_id}/intents",
            {
                "events": [
                    {
                        "event_id": EVENT_ID,
                        "device_id": battery.id,
                        "duration_s": 120,
                        "controls": {"fixed_w": fixed_w},
                    }
                ]
            },
        )
        print(
            f"{'':>6}  >>> posted v{posted['version']}: {battery.id} discharges {fixed_w:.0f} W "
            f"(SoC {floor + params.start_above_floor_pct:g} %)",
            file=out,
        )

        # 0. Above the floor: the event discharges the battery.
        running, waited = await wait_until(
            lambda: output_where(lambda w: w >= running_w),
            timeout_s=params.edge_timeout_s + 5.0,
            period_s=0.05,
        )
        result.checks.append(
            Check(
                f"above the floor ({floor + params.start_above_floor_pct:g} %) the battery "
                f"discharges at the event's {fixed_w:.0f} W",
                running is not None and _discharge_commanded(registers()),
                f"{output_w():.0f} W after {waited:.1f} s; StorCtl_Mod="
                f"{registers().stor_ctl_mod}, OutWRte={registers().out_w_rte} %",
            )
        )

        # 1. At the floor: discharge stops, and the gateway says why.
        print(f"{'':>6}  >>> SoC -> {floor:g} % (the floor)", file=out)
        bench.sim.set_soc(battery.id, floor)
        floor_mono = time.monotonic()
        stopped, stop_s = await wait_until(
            lambda: output_where(lambda w: abs(w) <= idle_w),
            timeout_s=params.edge_timeout_s,
            period_s=0.05,
        )
        at_floor = registers()
        result.figures["stop_command_s"] = _first(
            sampler, floor_mono, lambda d: not _discharge_commanded(d), battery.id
        )
        result.figures["stop_s"] = stop_s if stopped is not None else float("nan")
        result.checks.append(
            Check(
                f"at the floor ({floor:g} %) discharge stops",
                stopped is not None,
                f"{output_w():.0f} W {stop_s:.1f} s after the SoC reached the floor "
                f"(idle = within {idle_w:.0f} W)",
            )
        )
        result.checks.append(
            Check(
                "at the floor the battery's registers carry no discharge command",
                not _discharge_commanded(at_floor),
                f"StorCtl_Mod={at_floor.stor_ctl_mod}, OutWRte={at_floor.out_w_rte} %, "
                f"InWRte={at_floor.in_w_rte} %",
            )
        )

        async def guard_reported() -> dict[str, Any] | None:
            setpoint = _setpoint(await reported_state(bench), battery.id)
            return setpoint if _guarded(setpoint) else None

        setpoint, report_s = await wait_until(
            guard_reported, timeout_s=params.edge_timeout_s, period_s=0.2
        )
        result.figures["guard_reported_s"] = (
            stop_s + report_s if setpoint is not None else float("nan")
        )
        result.checks.append(
            Check(
                "the reported state says why: the SoC guard bounds the battery setpoint",
                setpoint is not None and (setpoint["active_power_w"] or 0.0) <= idle_w,
                (
                    f"active_power_w={setpoint['active_power_w']}, bound_by={setpoint['bound_by']}"
                    if setpoint is not None
                    else f"no '{GUARD_TEXT}' in bound_by within {params.edge_timeout_s:.0f} s; "
                    f"last: {_setpoint(await reported_state(bench), battery.id)}"
                ),
            )
        )

        # 2. Inside the hysteresis band: still blocked. (Let the ramp down finish first, so
        # that its tail is not mistaken for discharge inside the band.)
        await wait_until(
            lambda: output_where(lambda w: abs(w) <= 0.2 * idle_w), timeout_s=2.0, period_s=0.05
        )
        band_soc = floor + params.hysteresis_pct / 2
        print(f"{'':>6}  >>> SoC -> {band_soc:g} % (inside the hysteresis band)", file=out)
        bench.sim.set_soc(battery.id, band_soc)
        band_start = time.monotonic()
        await asyncio.sleep(params.band_hold_s)
        in_band = sampler.between(band_start)
        worst_w = max((s.state.devices[battery.id].ac_w for s in in_band), default=float("nan"))
        commanded = any(_discharge_commanded(s.state.devices[battery.id]) for s in in_band)

        async def guarded_report() -> dict[str, Any] | None:
            found = _setpoint(await reported_state(bench), battery.id)
            return found if _guarded(found) else None

        # The registers are judged over the hold above; the gateway's report of why (its
        # reported state, uploaded in the background) may lag a loaded machine: poll for it.
        band_setpoint, _ = await wait_until(
            guarded_report, timeout_s=params.edge_timeout_s, period_s=0.2
        )
        result.figures["band_max_output_w"] = worst_w
        result.checks.append(
            Check(
                f"inside the hysteresis band ({band_soc:g} %, above the floor, below "
                f"{band_top:g} %) discharge stays blocked",
                worst_w <= idle_w and not commanded and _guarded(band_setpoint),
                f"max output {worst_w:.0f} W over {params.band_hold_s:g} s, discharge "
                f"{'commanded' if commanded else 'never commanded'}; bound_by="
                f"{band_setpoint['bound_by'] if band_setpoint else None}",
            )
        )

        # 3. Above the band: discharge resumes.
        above_soc = band_top + 1.0
        print(f"{'':>6}  >>> SoC -> {above_soc:g} % (above the hysteresis band)", file=out)
        bench.sim.set_soc(battery.id, above_soc)
        above_mono = time.monotonic()
        resumed, resume_s = await wait_until(
            lambda: output_where(lambda w: w >= running_w),
            timeout_s=params.edge_timeout_s,
            period_s=0.05,
        )
        result.figures["resume_command_s"] = _first(
            sampler, above_mono, _discharge_commanded, battery.id
        )
        result.figures["resume_s"] = resume_s if resumed is not None else float("nan")
        resumed_regs = registers()
        result.checks.append(
            Check(
                f"above floor + hysteresis ({above_soc:g} % > {band_top:g} %) discharge resumes",
                resumed is not None and _discharge_commanded(resumed_regs),
                f"{output_w():.0f} W {resume_s:.1f} s after the SoC change; StorCtl_Mod="
                f"{resumed_regs.stor_ctl_mod}, OutWRte={resumed_regs.out_w_rte} %",
            )
        )

        async def guard_cleared() -> dict[str, Any] | None:
            setpoint = _setpoint(await reported_state(bench), battery.id)
            return setpoint if setpoint is not None and not _guarded(setpoint) else None

        cleared, _ = await wait_until(guard_cleared, timeout_s=params.edge_timeout_s, period_s=0.2)
        result.checks.append(
            Check(
                "the reported state no longer names the SoC guard",
                cleared is not None,
                f"bound_by={cleared['bound_by']}" if cleared is not None else "still guarded",
            )
        )

    responses = await event_responses(bench)
    seen = statuses(responses, EVENT_ID)
    result.checks.append(
        Check(
            "the discharge event was received and started, and never failed",
            seen[:2] == ["RECEIVED", "STARTED"] and "FAILED" not in seen,
            " -> ".join(seen) or "none",
        )
    )
    return result

"""Scenario `frozen-gateway`: the gateway process freezes; the inverters revert on their own.

Issue item (h): a frozen gateway (SIGSTOP: alive, connected, silent) must not leave its last
command in force forever. Every cap the gateway writes arms the inverter's own revert timer
(`revert_timeout_s`), refreshed every `refresh_s` while the gateway lives. Script: a short revert
timer, a standing contract export limit when the site has a PCC meter, and a PV cap event; once
the cap is at the registers, SIGSTOP the gateway. Judged at the registers (sampled at 20 Hz):
each inverter holds the cap until its timer runs out (predicted from the timer's remaining time
at the freeze), then reverts by itself: a 1xx inverter (model 123) to its default, limit
disabled (100 %); a 7xx inverter (model 704) to the reversion values the gateway programmed with
every write, which under a standing export limit is the safe open-loop cap (limit +
`assumed_min_load_w` - `export_margin_w`, shared by rating), not 100 %. Then SIGCONT: the
gateway must resume control and write the cap again (re-arming the timer).
"""

from __future__ import annotations

import asyncio
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from hil.scenarios.harness import Bench, gateway_config_text
from hil.scenarios.probe import site_devices
from hil.scenarios.report import Check, ScenarioResult
from hil.scenarios.watch import PCT_TOLERANCE, CapSample, SiteWatcher, sleep_until

__all__ = ["FrozenGatewayParams", "run_frozen_gateway"]

EVENT_ID = "cap-then-freeze"
# Long enough for requests sent just before SIGSTOP to reach the simulator (same host).
IN_FLIGHT_S = 0.2
# Back at the pre-freeze cap: within this many % of rating (a closed loop may move it a little).
RESTORED_PCT = 1.0


@dataclass(frozen=True)
class FrozenGatewayParams:
    pct: float = 40.0  # the event's PV cap (max_gen_pct)
    revert_timeout_s: int = 6
    # A standing contract export limit (only on sites with a PCC meter). None: derived from the
    # site, loose enough that the event's cap and not the PCC loop sets every cap (see
    # _contract_limit_w); the loop is not what is judged here.
    contract_export_limit_w: float | None = None
    assumed_min_load_w: float = 0.0
    export_margin_w: float = 50.0
    control_period_s: float = 0.25
    settle_timeout_s: float = 10.0
    settle_hold_s: float = 1.5
    timer_tolerance_s: float = 0.5
    after_revert_s: float = 1.5  # watched after the last inverter reverted, still frozen
    resume_bound_s: float = 3.0  # SIGCONT to the cap written again
    restore_bound_s: float = 10.0  # SIGCONT to every cap back at its pre-freeze value


def _contract_limit_w(bench: Bench, pct: float) -> float:
    """An export limit the site stays under with every PV inverter at `pct`: the capped PV less
    the lowest load of the site's profile (less its noise), plus 500 W, rounded up to 100 W."""
    profiles = bench.spec.profiles
    capped_w = sum((pv.rating_w or 0.0) * pct / 100.0 for pv in site_devices(bench).pv)
    min_load_w = min(w for _, w in profiles.load) * (1.0 - 3.0 * profiles.load_noise_pct / 100.0)
    return math.ceil(max(capped_w - min_load_w + 500.0, 500.0) / 100.0) * 100.0


async def run_frozen_gateway(
    bench: Bench, out: TextIO, params: FrozenGatewayParams | None = None
) -> ScenarioResult:
    params = params or FrozenGatewayParams()
    result = ScenarioResult("frozen-gateway")
    devices = site_devices(bench)
    pvs, meter = devices.pv, devices.pcc_meter
    result.checks.extend(devices.requirements("pv"))
    if result.checks:
        return result
    standing_w = (
        (params.contract_export_limit_w or _contract_limit_w(bench, params.pct))
        if meter is not None
        else None
    )
    assert bench.gateway_config is not None
    bench.gateway_config.write_text(
        gateway_config_text(
            bench,
            control_period_s=params.control_period_s,
            poll_period_s=0.5,
            revert_timeout_s=params.revert_timeout_s,
            extra_site=f"export_limit_w = {standing_w}" if standing_w is not None else "",
            extra_control="\n".join(
                [
                    f"assumed_min_load_w = {params.assumed_min_load_w}",
                    f"export_margin_w = {params.export_margin_w}",
                ]
            ),
        )
    )
    await bench.start_gateway()
    await bench.wait_registered()
    ratings_w = sum(pv.rating_w or 0.0 for pv in pvs)
    # What each inverter should fall back to on its own (see the module docstring). The batteries
    # are idle (the event does not touch them), so nothing else enters the open-loop budget.
    safe_pct = (
        min(
            max(standing_w + params.assumed_min_load_w - params.export_margin_w, 0.0)
            / ratings_w
            * 100.0,
            100.0,
        )
        if standing_w is not None
        else 100.0
    )
    expected_pct = {pv.id: safe_pct if pv.family == "7xx" else 100.0 for pv in pvs}
    phase = [f"{EVENT_ID} ({params.pct:g} %)"]

    def label(wall: float) -> tuple[float | None, str]:
        return standing_w, phase[0]

    frozen_at: float | None = None
    async with SiteWatcher(bench, out, label) as watch:
        try:
            posted = await bench.api.post(
                f"/sites/{bench.site_id}/intents",
                {
                    "events": [
                        {
                            "event_id": EVENT_ID,
                            "duration_s": 600,
                            "controls": {"max_gen_pct": params.pct},
                        }
                    ]
                },
            )
            watch.note(
                f"posted intent v{posted['version']}: {EVENT_ID} max_gen_pct {params.pct:g} %"
                + (
                    f" under the contract export limit {standing_w:.0f} W"
                    if standing_w is not None
                    else ""
                )
            )
            steady_since: list[float] = []

            def capped(sample: CapSample) -> bool:
                if not all(p <= params.pct + PCT_TOLERANCE for p in sample.caps_pct.values()):
                    steady_since.clear()
                    return False
                steady_since[:1] = steady_since[:1] or [sample.wall]
                return sample.wall - steady_since[0] >= params.settle_hold_s

            settled = await watch.wait_for(capped, timeout_s=params.settle_timeout_s)
            if settled is None:
                result.checks.append(
                    Check(
                        f"every PV cap at or under {params.pct:g} % before the freeze",
                        False,
                        f"caps {dict(watch.samples[-1].caps_pct)}",
                    )
                )
                return result
            frozen_at = time.time()
            bench.signal_gateway(signal.SIGSTOP)
            phase[0] = "gateway frozen"
            # Requests the gateway sent just before it stopped are still in the simulator's
            # sockets: let them land before taking the state the inverters are left with.
            await asyncio.sleep(IN_FLIGHT_S)
            state = bench.sim.state()
            programmed = {
                pv.id: (device.wmaxlim_pct_rvrt, device.wmaxlim_ena_rvrt)
                for pv in pvs
                if pv.family == "7xx" and (device := state.devices[pv.id])
            }
            before = watch.sample()
            predicted = {pv: before.wall + rem for pv, rem in before.revert_rem_s.items()}
            watch.note(
                "SIGSTOP the gateway; revert timers run out in "
                + ", ".join(f"{pv} {t - frozen_at:.1f} s" for pv, t in predicted.items())
            )
            # Until the last timer has run out, and a little longer (nothing may write meanwhile).
            await sleep_until(
                max(*predicted.values(), frozen_at + params.revert_timeout_s)
                + params.timer_tolerance_s
                + params.after_revert_s
            )
            frozen_end = time.time()
        finally:
            if frozen_at is not None and bench.gateway is not None and bench.gateway.running:
                bench.signal_gateway(signal.SIGCONT)
        resumed_at = time.time()
        phase[0] = "gateway resumed"
        watch.note("SIGCONT the gateway")
        # Control resumed: a write re-armed every revert timer, with the cap limited again.
        rewritten = await watch.wait_for(
            lambda s: (
                all(rem > 0.0 for rem in s.revert_rem_s.values())
                and all(pct <= params.pct + PCT_TOLERANCE for pct in s.caps_pct.values())
            ),
            timeout_s=params.resume_bound_s + 3.0,
            after=resumed_at,
        )
        restored = await watch.wait_for(
            lambda s: all(
                abs(s.caps_pct[pv] - before.caps_pct[pv]) <= RESTORED_PCT for pv in s.caps_pct
            ),
            timeout_s=params.restore_bound_s,
            after=rewritten.wall if rewritten is not None else resumed_at,
        )
        if rewritten is not None:
            watch.note(f"cap written again {rewritten.wall - resumed_at:.2f} s after SIGCONT")
        if restored is not None:
            watch.note(f"cap back at its pre-freeze value {restored.wall - resumed_at:.2f} s after")
        await asyncio.sleep(1.0)

    # -- verdict --------------------------------------------------------------------------------
    result.checks.append(
        Check(
            f"every PV cap at or under {params.pct:g} % before the freeze",
            True,
            ", ".join(f"{pv} {pct:g} %" for pv, pct in before.caps_pct.items()),
        )
    )
    for pv_id, (pct_rvrt, ena_rvrt) in programmed.items():
        want = expected_pct[pv_id]
        got = (pct_rvrt or 0.0) if ena_rvrt else 100.0
        result.checks.append(
            Check(
                f"{pv_id} (704): the gateway programmed its reversion values to "
                + (
                    f"the safe open-loop cap {want:.1f} % (standing export limit "
                    f"{standing_w:.0f} W)"
                    if standing_w is not None
                    else "no limit (no standing export limit)"
                ),
                abs(got - want) <= PCT_TOLERANCE,
                f"WMaxLimPctRvrt {pct_rvrt} %, WMaxLimPctEnaRvrt {ena_rvrt}",
            )
        )
    worst_timer_error = 0.0
    worst_after_stop = 0.0

    def reverted(pv_id: str) -> Callable[[CapSample], bool]:
        # The register changing, or (should the reversion value equal the cap) the timer ending.
        return lambda s: (
            abs(s.caps_pct[pv_id] - before.caps_pct[pv_id]) > PCT_TOLERANCE
            or s.revert_rem_s[pv_id] <= 0.0
        )

    for pv in pvs:
        revert = watch.first(reverted(pv.id), after=before.wall, before=frozen_end)
        after_stop = revert.wall - frozen_at if revert is not None else math.nan
        timer_error = revert.wall - predicted[pv.id] if revert is not None else math.nan
        worst_after_stop = max(worst_after_stop, after_stop)
        worst_timer_error = max(worst_timer_error, abs(timer_error))
        result.checks.append(
            Check(
                f"{pv.id}: held the cap while the gateway was frozen, then reverted on its own "
                f"timer (within {params.revert_timeout_s} s of the freeze, "
                f"±{params.timer_tolerance_s:g} s of the timer)",
                revert is not None
                and after_stop <= params.revert_timeout_s + params.timer_tolerance_s
                and abs(timer_error) <= params.timer_tolerance_s,
                f"reverted {after_stop:.2f} s after SIGSTOP, {timer_error:+.2f} s from its timer"
                if revert is not None
                else "no revert while frozen",
            )
        )
        final = watch.window(revert.wall, frozen_end) if revert is not None else []
        want = expected_pct[pv.id]
        what = (
            "limit disabled = 100 % (model 123 has no reversion values)"
            if pv.family != "7xx"
            else (
                f"the programmed safe open-loop cap {want:.1f} %"
                if standing_w is not None
                else "its programmed reversion: limit disabled = 100 %"
            )
        )
        result.checks.append(
            Check(
                f"{pv.id} ({pv.family}): reverted to {what}, and stayed there while frozen",
                bool(final) and all(abs(s.caps_pct[pv.id] - want) <= PCT_TOLERANCE for s in final),
                f"{final[-1].caps_pct[pv.id]:g} %" if final else "not reverted",
            )
        )
    result.figures["revert_after_sigstop_s"] = worst_after_stop
    result.figures["revert_timer_error_s"] = worst_timer_error
    rewrite_s = rewritten.wall - resumed_at if rewritten is not None else math.nan
    result.figures["cap_rewritten_after_sigcont_s"] = rewrite_s
    result.checks.append(
        Check(
            f"after SIGCONT the gateway wrote the caps again within {params.resume_bound_s:g} s "
            f"(every revert timer re-armed, caps at or under {params.pct:g} %)",
            rewritten is not None and rewrite_s <= params.resume_bound_s,
            (
                f"{rewrite_s:.2f} s: "
                + ", ".join(f"{pv} {pct:g} %" for pv, pct in rewritten.caps_pct.items())
            )
            if rewritten is not None
            else "not re-written",
        )
    )
    restore_s = restored.wall - resumed_at if restored is not None else math.nan
    on_the_way = watch.window(resumed_at, restored.wall if restored is not None else math.inf)
    lowest = min((min(s.caps_pct.values()) for s in on_the_way), default=math.nan)
    result.figures["cap_restored_after_sigcont_s"] = restore_s
    result.figures["lowest_cap_after_sigcont_pct"] = lowest
    result.checks.append(
        Check(
            f"the caps came back to their pre-freeze values (±{RESTORED_PCT:g} %) within "
            f"{params.restore_bound_s:g} s of SIGCONT",
            restored is not None,
            (f"{restore_s:.2f} s" if restored is not None else "not restored")
            + f"; lowest cap on the way {lowest:g} %",
        )
    )
    # Resuming must not dip below where the devices were left (their reversion values) nor
    # below the caps the gateway held before the freeze: it waits for fresh readings instead
    # of deciding on readings that are stale only because it was paused.
    floor = min(min(expected_pct[pv.id] for pv in pvs), min(before.caps_pct[pv.id] for pv in pvs))
    result.checks.append(
        Check(
            "no cap dipped on resumption (below the reversion value or the pre-freeze cap)",
            not math.isnan(lowest) and lowest >= floor - PCT_TOLERANCE,
            f"lowest {lowest:g} %, floor {floor:g} %",
        )
    )
    return result

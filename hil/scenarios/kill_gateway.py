"""Scenario `kill-gateway-mid-event`: kill -9 mid-event; the gateway resumes the same event.

Issue item (b): after a kill -9 the gateway resumes with the remaining duration and the same drawn
randomization, not a fresh one. Script: post an event that caps PV with start and duration
randomization; read the window this gateway drew from its RECEIVED response (the headend's
`effective_start` / `effective_end`); watch the cap reach the registers at the effective start;
kill -9 the gateway mid-event and keep it dead longer than the inverters' revert timer (so they
fall back to their default on their own and the restart has something to re-establish); restart
it. Judged at the registers (sampled at 20 Hz): the cap is back promptly after the restart and
released at the same effective end; and at the headend: the event was announced once
(RECEIVED, STARTED, COMPLETED, nothing re-announcing a different window).
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from typing import Any, TextIO

from hil.scenarios.harness import Bench, gateway_config_text
from hil.scenarios.probe import event_responses, parse_time, site_devices, wait_until
from hil.scenarios.report import Check, ScenarioResult
from hil.scenarios.watch import SiteWatcher, capped_at, iso, not_capped_at, sleep_until

__all__ = ["KillGatewayParams", "run_kill_gateway"]

# The bench's gateway (demo-gw) draws +2 s start and +2 s duration for this id: non-zero, so a
# resumption that forgot its draw would show at the registers.
EVENT_ID = "event-killed"


@dataclass(frozen=True)
class KillGatewayParams:
    pct: float = 35.0  # the event's PV cap (max_gen_pct)
    duration_s: int = 12
    randomize_start_s: int = 3
    randomize_duration_s: int = 3
    lead_s: float = 3.0  # nominal start this long after the post
    kill_after_s: float = 2.0  # after the cap reached the registers
    revert_timeout_s: int = 3  # the inverters' own timer: short, so they revert while it is dead
    dead_s: float = 4.5  # > revert_timeout_s
    control_period_s: float = 0.25
    edge_tolerance_s: float = 0.5  # plus one control period
    restart_bound_s: float = 6.0  # process start to the cap re-written (Python start-up included)
    after_s: float = 3.0


async def run_kill_gateway(
    bench: Bench, out: TextIO, params: KillGatewayParams | None = None
) -> ScenarioResult:
    params = params or KillGatewayParams()
    result = ScenarioResult("kill-gateway-mid-event")
    result.checks.extend(site_devices(bench).requirements("pv"))
    if result.checks:
        return result
    assert bench.gateway_config is not None
    bench.gateway_config.write_text(
        gateway_config_text(
            bench,
            control_period_s=params.control_period_s,
            poll_period_s=0.5,
            revert_timeout_s=params.revert_timeout_s,
        )
    )
    await bench.start_gateway()
    await bench.wait_registered()
    tolerance_s = params.edge_tolerance_s + params.control_period_s
    window: list[float] = []

    def label(wall: float) -> tuple[float | None, str]:
        if window and window[0] <= wall < window[1]:
            return None, f"{EVENT_ID} ({params.pct:g} %)"
        return None, ""

    async def responses() -> list[dict[str, Any]]:
        return [r for r in await event_responses(bench) if r["event_id"] == EVENT_ID]

    async def received() -> dict[str, Any] | None:
        rows = await responses()
        return next((r for r in rows if r["status"] == "RECEIVED" and r["effective_start"]), None)

    async def completed() -> list[dict[str, Any]] | None:
        rows = await responses()
        return rows if any(r["status"] == "COMPLETED" for r in rows) else None

    async with SiteWatcher(bench, out, label) as watch:
        nominal_start = float(math.ceil(time.time() + params.lead_s))
        posted = await bench.api.post(
            f"/sites/{bench.site_id}/intents",
            {
                "events": [
                    {
                        "event_id": EVENT_ID,
                        "start": iso(nominal_start),
                        "duration_s": params.duration_s,
                        "randomize_start_s": params.randomize_start_s,
                        "randomize_duration_s": params.randomize_duration_s,
                        "controls": {"max_gen_pct": params.pct},
                    }
                ]
            },
        )
        watch.note(
            f"posted intent v{posted['version']}: {EVENT_ID} max_gen_pct {params.pct:g} % for "
            f"{params.duration_s} s from {iso(nominal_start)}, randomized start "
            f"+{params.randomize_start_s} s, duration +{params.randomize_duration_s} s"
        )
        announced, _ = await wait_until(received, timeout_s=10.0)
        if announced is None:
            result.checks.append(
                Check(
                    "RECEIVED announced the effective window",
                    False,
                    f"responses: {await responses()}",
                )
            )
            return result
        window[:] = [
            parse_time(announced["effective_start"]),
            parse_time(announced["effective_end"]),
        ]
        effective_start, effective_end = window
        start_offset = effective_start - nominal_start
        duration_offset = (effective_end - effective_start) - params.duration_s
        watch.note(
            f"RECEIVED: effective window {iso(effective_start)} .. {iso(effective_end)} "
            f"(drawn start {start_offset:+.0f} s, duration {duration_offset:+.0f} s)"
        )

        arrived = await watch.wait_for(
            capped_at(params.pct),
            timeout_s=max(0.0, effective_start - time.time()) + 5.0,
        )
        if arrived is None:
            result.checks.append(Check("the event's cap reached the registers", False, "never"))
            return result
        await sleep_until(arrived.wall + params.kill_after_s)
        await bench.kill_gateway()
        killed = time.time()
        watch.note(
            f"kill -9 the gateway, {effective_end - killed:.1f} s before the effective end; "
            f"dead for {params.dead_s:g} s (revert timer {params.revert_timeout_s} s)"
        )
        await asyncio.sleep(params.dead_s)
        reverted = watch.first(not_capped_at(params.pct), after=killed)
        restarted = time.time()
        await bench.start_gateway()
        watch.note("gateway restarted")
        back = await watch.wait_for(
            capped_at(params.pct),
            after=restarted,
            timeout_s=max(params.restart_bound_s, effective_end - time.time()),
        )
        if back is not None:
            watch.note(f"cap back at the registers {back.wall - restarted:.2f} s after the restart")
        await sleep_until(effective_end + params.after_s)
        completed_rows, _ = await wait_until(completed, timeout_s=10.0)
        rows = completed_rows or await responses()

    # -- verdict --------------------------------------------------------------------------------
    result.figures["drawn_start_offset_s"] = start_offset
    result.figures["drawn_duration_offset_s"] = duration_offset
    result.checks.append(
        Check(
            "RECEIVED announced an effective window within the event's randomization",
            0 <= start_offset <= params.randomize_start_s
            and 0 <= duration_offset <= params.randomize_duration_s,
            f"start {start_offset:+.0f} s of +{params.randomize_start_s} s, duration "
            f"{duration_offset:+.0f} s of +{params.randomize_duration_s} s",
        )
    )
    start_error = arrived.wall - effective_start
    result.figures["start_error_s"] = start_error
    result.checks.append(
        Check(
            f"the cap (max_gen_pct {params.pct:g} %) reached every PV register at the effective "
            f"start, ±{tolerance_s:.2f} s",
            abs(start_error) <= tolerance_s,
            f"{start_error:+.2f} s",
        )
    )
    result.checks.append(
        Check(
            "while the gateway was dead the inverters reverted on their own timer "
            f"({params.revert_timeout_s} s), so the restart had control to re-establish",
            reverted is not None,
            f"{reverted.wall - killed:.1f} s after the kill" if reverted else "no revert seen",
        )
    )
    restart_s = back.wall - restarted if back is not None else math.nan
    result.figures["time_to_cap_after_restart_s"] = restart_s
    result.checks.append(
        Check(
            f"after the restart the cap was back within {params.restart_bound_s:g} s "
            "(process start included)",
            back is not None and restart_s <= params.restart_bound_s,
            f"{restart_s:.2f} s" if back is not None else "never",
        )
    )
    release = watch.first(not_capped_at(params.pct), after=back.wall) if back is not None else None
    end_error = release.wall - effective_end if release is not None else math.nan
    result.figures["end_error_s"] = end_error
    result.checks.append(
        Check(
            "the cap held until the same effective end and was released there, "
            f"±{tolerance_s:.2f} s",
            release is not None and abs(end_error) <= tolerance_s,
            f"{end_error:+.2f} s" if release is not None else "never released",
        )
    )
    statuses = [r["status"] for r in rows]
    windows = {
        (r["effective_start"], r["effective_end"])
        for r in rows
        if r["status"] in ("RECEIVED", "STARTED")
    }
    result.checks.append(
        Check(
            "the event was announced once, in one window: RECEIVED, STARTED, COMPLETED",
            statuses == ["RECEIVED", "STARTED", "COMPLETED"]
            and windows == {(announced["effective_start"], announced["effective_end"])},
            " -> ".join(statuses) + f"; windows announced: {len(windows)}",
        )
    )
    return result

"""Scenario `overlapping-programs`: events of two programs overlap and resolve per mode, as
IEEE 2030.5 and CSIP-AUS GEN-10 say (protocols.md §1.3 rules 6-8), with the right responses.

Programs: `dnsp` (primacy 1, default control max_gen_pct 30 %) and `aggregator` (primacy 2, no
default). Script, judged at the PV inverters' registers (the generation cap in force: 123
WMaxLim_Ena / WMaxLimPct, or 704 on 7xx inverters), in the headend's reported state
(`active_modes`: value, source, event, program, label per mode) and in the event responses:

GEN-10
1. only the programs: the primacy-1 default applies (caps 30 %);
2. event A (aggregator, primacy 2, max_gen_pct 80) starts: an active event beats every default,
   whatever the programs' primacies, so the caps go to 80 %;
3. event B (dnsp, primacy 1, max_gen_pct 0), posted later and overlapping A, supersedes A:
   A answers SUPERSEDED, B STARTED, the caps go to 0 %;
4. B ends while A's window is still open: the site returns to the primacy-1 default (30 %), not
   to the superseded A (80 %); B answers COMPLETED, A nothing more.

Per mode
5. event P (aggregator: max_gen_pct 70 and export_limit_w half the PV rating) and event Q (dnsp:
   export_limit_w a fifth of the PV rating) overlap: Q owns export_limit_w, P keeps max_gen_pct
   (it loses only the mode it shares with a higher-priority event, so it is not superseded):
   the caps sit at 70 % (not the default's 30 %) and the export holds Q's limit (needs a PCC
   meter); both answer RECEIVED, STARTED, COMPLETED.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, TextIO

from hil.scenarios.harness import Bench, gateway_config_text
from hil.scenarios.probe import (
    Sampler,
    event_responses,
    parse_time,
    reported_state,
    sampling,
    site_devices,
    statuses,
    wait_until,
)
from hil.scenarios.report import Check, ScenarioResult
from hil.server import SiteState

__all__ = ["OverlappingProgramsParams", "run_overlapping_programs"]

DNSP, AGGREGATOR = "dnsp", "aggregator"
EVENT_A, EVENT_B = "gen10-a-aggregator", "gen10-b-dnsp"
EVENT_P, EVENT_Q = "mode-p-aggregator", "mode-q-dnsp"
# Two register percentages closer than this are the same cap (registers hold 0.1 % or finer).
PCT_TOLERANCE = 0.15


@dataclass(frozen=True)
class OverlappingProgramsParams:
    default_pct: float = 30.0  # dnsp's default control
    a_pct: float = 80.0  # event A (aggregator)
    b_pct: float = 0.0  # event B (dnsp), supersedes A
    a_duration_s: int = 14
    b_duration_s: int = 4
    default_hold_s: float = 2.5  # watched after B ends, inside A's window
    p_pct: float = 70.0  # event P (aggregator): max_gen_pct ...
    p_export_share: float = 0.5  # ... and an export limit it loses, share of the PV rating
    q_export_share: float = 0.2  # event Q (dnsp): the export limit that wins
    pq_duration_s: int = 8
    export_settle_s: float = 4.0  # judged over the rest of P/Q's window
    # At least this; more on sites with noisy loads (2 sigma of the site's mean load).
    min_export_tolerance_w: float = 150.0
    edge_timeout_s: float = 5.0
    poll_period_s: float = 0.2
    control_period_s: float = 0.2


def _cap_pct(state: SiteState, pv_id: str) -> float:
    """The generation cap the registers put in force, % of rating (100 = no limit)."""
    device = state.devices[pv_id]
    if not device.wmaxlim_ena:
        return 100.0
    return float(device.wmaxlim_pct) if device.wmaxlim_pct is not None else 100.0


def _site_mode(reported: dict[str, Any] | None, mode: str) -> dict[str, Any] | None:
    if not reported:
        return None
    return next(
        (m for m in reported["active_modes"] if m["device_id"] is None and m["mode"] == mode),
        None,
    )


def _describe(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "not in force"
    return f"{entry['value']:g} from {entry['source']} ({entry['label']})"


async def run_overlapping_programs(
    bench: Bench, out: TextIO, params: OverlappingProgramsParams | None = None
) -> ScenarioResult:
    params = params or OverlappingProgramsParams()
    result = ScenarioResult("overlapping-programs")
    devices = site_devices(bench)
    missing = devices.requirements("pv")
    if missing:
        result.checks.extend(missing)
        return result
    pv_ids = [d.id for d in devices.pv]
    pv_rating_w = sum(float(d.rating_w or 0.0) for d in devices.pv)
    profile = bench.spec.profiles
    mean_load_w = sum(w for _, w in profile.load) / len(profile.load)
    export_tolerance_w = max(
        params.min_export_tolerance_w, 2 * mean_load_w * profile.load_noise_pct / 100.0
    )

    assert bench.gateway_config is not None
    bench.gateway_config.write_text(
        gateway_config_text(
            bench,
            control_period_s=params.control_period_s,
            poll_period_s=params.poll_period_s,
        )
    )
    await bench.start_gateway()
    await bench.wait_registered()
    print(f"gateway {bench.gateway_id} registered; PV inverters: {', '.join(pv_ids)}", file=out)

    def caps() -> dict[str, float]:
        state = bench.sim.state()
        return {pv: _cap_pct(state, pv) for pv in pv_ids}

    def caps_text() -> str:
        return ", ".join(f"{pv} {pct:g} %" for pv, pct in caps().items())

    async def caps_at(pct: float) -> dict[str, float] | None:
        now = caps()
        return now if all(abs(v - pct) <= PCT_TOLERANCE for v in now.values()) else None

    async def mode_from(
        mode: str, source: str, event_id: str | None, program_id: str | None
    ) -> dict[str, Any] | None:
        entry = _site_mode(await reported_state(bench), mode)
        if (
            entry is not None
            and entry["source"] == source
            and entry["event_id"] == event_id
            and entry["program_id"] == program_id
        ):
            return entry
        return None

    async def post(body: dict[str, Any], note: str) -> dict[str, Any]:
        posted: dict[str, Any] = await bench.api.post(f"/sites/{bench.site_id}/intents", body)
        print(f"{'':>6}  >>> posted v{posted['version']}: {note}", file=out, flush=True)
        return posted

    async def expect_caps(pct: float, what: str) -> float | None:
        reached, waited = await wait_until(
            lambda: caps_at(pct), timeout_s=params.edge_timeout_s, period_s=0.05
        )
        result.checks.append(
            Check(
                f"{what}: every PV cap at {pct:g} % (registers)",
                reached is not None,
                f"{caps_text()} after {waited:.1f} s",
            )
        )
        return waited if reached is not None else None

    async def expect_mode(
        mode: str, source: str, event_id: str | None, program_id: str | None, what: str
    ) -> None:
        entry, _ = await wait_until(
            lambda: mode_from(mode, source, event_id, program_id),
            timeout_s=params.edge_timeout_s,
            period_s=0.2,
        )
        if entry is None:
            entry = _site_mode(await reported_state(bench), mode)
        expected = f"{source} " + (f"event {event_id} " if event_id else "") + f"({program_id})"
        result.checks.append(
            Check(
                f"{what}: the reported state shows {mode} from {expected}",
                entry is not None
                and entry["source"] == source
                and entry["event_id"] == event_id
                and entry["program_id"] == program_id,
                _describe(entry),
            )
        )

    sampler = Sampler(period_s=0.05)
    async with sampling(bench, sampler, out=out):
        # 1. The primacy-1 default.
        await post(
            {
                "programs": [
                    {
                        "program_id": DNSP,
                        "primacy": 1,
                        "default_control": {"max_gen_pct": params.default_pct},
                    },
                    {"program_id": AGGREGATOR, "primacy": 2},
                ]
            },
            f"programs {DNSP} (primacy 1, default max_gen_pct {params.default_pct:g} %) and "
            f"{AGGREGATOR} (primacy 2)",
        )
        await expect_caps(params.default_pct, "the primacy-1 default")
        await expect_mode("max_gen_pct", "DEFAULT", None, DNSP, "the primacy-1 default")

        # 2. A primacy-2 event beats the primacy-1 default.
        posted_a = await post(
            {
                "events": [
                    {
                        "event_id": EVENT_A,
                        "program_id": AGGREGATOR,
                        "duration_s": params.a_duration_s,
                        "controls": {"max_gen_pct": params.a_pct},
                    }
                ]
            },
            f"event {EVENT_A} ({AGGREGATOR}, primacy 2): max_gen_pct {params.a_pct:g} % for "
            f"{params.a_duration_s} s",
        )
        a_event = next(e for e in posted_a["document"]["events"] if e["event_id"] == EVENT_A)
        a_end_wall = parse_time(a_event["end"])
        await expect_caps(params.a_pct, "a primacy-2 event over the primacy-1 default")
        await expect_mode(
            "max_gen_pct", "EVENT", EVENT_A, AGGREGATOR, "a primacy-2 event over the default"
        )

        # 3. A later primacy-1 event supersedes it.
        posted_b = await post(
            {
                "events": [
                    {
                        "event_id": EVENT_B,
                        "program_id": DNSP,
                        "duration_s": params.b_duration_s,
                        "controls": {"max_gen_pct": params.b_pct},
                    }
                ]
            },
            f"event {EVENT_B} ({DNSP}, primacy 1): max_gen_pct {params.b_pct:g} % for "
            f"{params.b_duration_s} s, overlapping {EVENT_A}",
        )
        b_event = next(e for e in posted_b["document"]["events"] if e["event_id"] == EVENT_B)
        b_end_wall = parse_time(b_event["end"])
        await expect_caps(params.b_pct, "the primacy-1 event supersedes the primacy-2 one")
        await expect_mode("max_gen_pct", "EVENT", EVENT_B, DNSP, "the primacy-1 event")

        async def superseded() -> list[str] | None:
            responses = await event_responses(bench)
            seen_a, seen_b = statuses(responses, EVENT_A), statuses(responses, EVENT_B)
            return (
                [*seen_a, "|", *seen_b] if "SUPERSEDED" in seen_a and "STARTED" in seen_b else None
            )

        got, _ = await wait_until(superseded, timeout_s=params.edge_timeout_s, period_s=0.2)
        responses = await event_responses(bench)
        result.checks.append(
            Check(
                f"headend: the older {EVENT_A} answered SUPERSEDED, the newer {EVENT_B} STARTED",
                got is not None,
                f"{EVENT_A}: {' -> '.join(statuses(responses, EVENT_A))}; "
                f"{EVENT_B}: {' -> '.join(statuses(responses, EVENT_B))}",
            )
        )

        # 4. When B ends, the primacy-1 default returns, not the superseded A.
        await asyncio.sleep(max(0.0, b_end_wall - time.time()))
        b_end_mono = time.monotonic()
        back, back_s = await wait_until(
            lambda: caps_at(params.default_pct), timeout_s=params.edge_timeout_s, period_s=0.05
        )
        result.figures["default_back_s"] = back_s if back is not None else float("nan")
        hold_end = b_end_mono + back_s + params.default_hold_s
        await asyncio.sleep(max(0.0, hold_end - time.monotonic()))
        window = sampler.between(b_end_mono + back_s, hold_end)
        a_caps = [
            s
            for s in window
            if any(abs(_cap_pct(s.state, pv) - params.a_pct) <= 1 for pv in pv_ids)
        ]
        in_a_window = time.time() < a_end_wall
        result.checks.append(
            Check(
                f"after {EVENT_B} ends, inside {EVENT_A}'s window, the caps return to the "
                f"primacy-1 default ({params.default_pct:g} %), not to the superseded "
                f"{params.a_pct:g} %",
                back is not None and not a_caps and bool(window) and in_a_window,
                f"{caps_text()} {back_s:.1f} s after {EVENT_B}'s end, held "
                f"{params.default_hold_s:g} s ({len(a_caps)} samples at {params.a_pct:g} %); "
                f"{EVENT_A}'s window {'still open' if in_a_window else 'already closed'}",
            )
        )
        await expect_mode("max_gen_pct", "DEFAULT", None, DNSP, "after the primacy-1 event")

        # 5. Per mode: both events apply, each with the modes it owns.
        p_export_w = round(params.p_export_share * pv_rating_w, -1)
        q_export_w = round(params.q_export_share * pv_rating_w, -1)
        posted_pq = await post(
            {
                "events": [
                    {
                        "event_id": EVENT_P,
                        "program_id": AGGREGATOR,
                        "duration_s": params.pq_duration_s,
                        "controls": {
                            "max_gen_pct": params.p_pct,
                            "export_limit_w": p_export_w,
                        },
                    },
                    {
                        "event_id": EVENT_Q,
                        "program_id": DNSP,
                        "duration_s": params.pq_duration_s,
                        "controls": {"export_limit_w": q_export_w},
                    },
                ]
            },
            f"{EVENT_P} ({AGGREGATOR}): max_gen_pct {params.p_pct:g} % + export limit "
            f"{p_export_w:.0f} W; {EVENT_Q} ({DNSP}): export limit {q_export_w:.0f} W; "
            f"{params.pq_duration_s} s",
        )
        pq_start_mono = time.monotonic()
        p_event = next(e for e in posted_pq["document"]["events"] if e["event_id"] == EVENT_P)
        pq_end_wall = parse_time(p_event["end"])
        await expect_mode(
            "max_gen_pct", "EVENT", EVENT_P, AGGREGATOR, "per mode: the mode only P asks for"
        )
        await expect_mode(
            "export_limit_w", "EVENT", EVENT_Q, DNSP, "per mode: the mode both ask for"
        )
        reported = await reported_state(bench)
        export_entry = _site_mode(reported, "export_limit_w")
        result.checks.append(
            Check(
                f"per mode: the export limit in force is {EVENT_Q}'s {q_export_w:.0f} W, not "
                f"{EVENT_P}'s {p_export_w:.0f} W",
                export_entry is not None and abs(export_entry["value"] - q_export_w) < 1.0,
                _describe(export_entry),
            )
        )
        # P's cap, not the default's: every cap above the default and none above P's.
        pq_caps, _ = await wait_until(
            lambda: _caps_between(caps(), params.default_pct, params.p_pct),
            timeout_s=params.edge_timeout_s,
            period_s=0.05,
        )
        result.checks.append(
            Check(
                f"per mode: {EVENT_P}'s max_gen_pct applies at the registers (caps above the "
                f"default's {params.default_pct:g} %, at most {params.p_pct:g} %)",
                pq_caps is not None,
                caps_text(),
            )
        )
        await asyncio.sleep(max(0.0, pq_end_wall - time.time()))
        if devices.pcc_meter is not None:
            settled = [
                s.export_w
                for s in sampler.between(pq_start_mono + params.export_settle_s)
                if s.wall < pq_end_wall - 0.5
            ]
            worst = max(settled, default=float("nan"))
            result.figures["pq_worst_export_w"] = worst
            result.checks.append(
                Check(
                    f"per mode: the export held {EVENT_Q}'s limit (PCC meter, from "
                    f"{params.export_settle_s:g} s into the events)",
                    bool(settled) and worst <= q_export_w + export_tolerance_w,
                    f"worst export {worst:.0f} W, limit {q_export_w:.0f} W + "
                    f"{export_tolerance_w:.0f} W",
                )
            )

        async def all_completed() -> list[dict[str, Any]] | None:
            responses = await event_responses(bench)
            done = all("COMPLETED" in statuses(responses, e) for e in (EVENT_B, EVENT_P, EVENT_Q))
            return responses if done else None

        final, _ = await wait_until(all_completed, timeout_s=params.edge_timeout_s, period_s=0.2)
        await expect_mode("max_gen_pct", "DEFAULT", None, DNSP, "after all events")

    responses = final if final is not None else await event_responses(bench)
    expected = {
        EVENT_A: ["RECEIVED", "STARTED", "SUPERSEDED"],
        EVENT_B: ["RECEIVED", "STARTED", "COMPLETED"],
        EVENT_P: ["RECEIVED", "STARTED", "COMPLETED"],
        EVENT_Q: ["RECEIVED", "STARTED", "COMPLETED"],
    }
    for event_id, wanted in expected.items():
        seen = statuses(responses, event_id)
        result.checks.append(
            Check(
                f"headend: {event_id} answered {' -> '.join(wanted)}",
                seen == wanted,
                " -> ".join(seen) or "none",
            )
        )
    return result


async def _caps_between(
    caps: dict[str, float], above: float, at_most: float
) -> dict[str, float] | None:
    ok = all(above + PCT_TOLERANCE < v <= at_most + PCT_TOLERANCE for v in caps.values())
    return caps if ok else None

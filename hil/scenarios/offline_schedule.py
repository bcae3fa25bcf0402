"""Scenario `offline-schedule`: the site follows its cached schedule while the headend is down.

Issue items (a) and (g): the headend is killed (-9) before an event; five back-to-back events then
run with no cloud at all. Script: post an intent whose program default caps PV (visible at the
inverter registers) and five successive events of a few seconds each with distinct PV caps,
starting a few seconds ahead; kill the headend before the first starts; watch the registers at
20 Hz: each event's cap must be in force from its start to its end (edges within a tolerance of
the nominal times), then the program default must return and stay. The gateway keeps running
throughout. Finally the headend comes back and the event responses the gateway earned offline
(RECEIVED, STARTED, COMPLETED for all five, stamped when they happened) must reach it: store and
forward.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, TextIO

from hil.scenarios.harness import Bench, gateway_config_text
from hil.scenarios.probe import (
    event_responses,
    parse_time,
    site_devices,
    statuses,
    wait_until,
)
from hil.scenarios.report import Check, ScenarioResult
from hil.scenarios.watch import (
    CapSample,
    SiteWatcher,
    capped_at,
    iso,
    not_capped_at,
    sleep_until,
    wait_acked,
)

__all__ = ["OfflineScheduleParams", "run_offline_schedule"]

PROGRAM_ID = "utility"
EXPECTED = ["RECEIVED", "STARTED", "COMPLETED"]


@dataclass(frozen=True)
class OfflineScheduleParams:
    default_pct: float = 90.0  # the program's default PV cap, in force outside the events
    event_pcts: tuple[float, ...] = (30.0, 45.0, 60.0, 40.0, 55.0)
    event_s: int = 3
    lead_s: float = 6.0  # the first event starts this long after the intent is posted
    after_s: float = 4.0  # watched after the last event ends
    control_period_s: float = 0.25
    edge_tolerance_s: float = 0.5  # plus one control period, on every start and end
    responses_timeout_s: float = 30.0


def _event_id(index: int) -> str:
    return f"offline-{index + 1}"


async def run_offline_schedule(
    bench: Bench, out: TextIO, params: OfflineScheduleParams | None = None
) -> ScenarioResult:
    params = params or OfflineScheduleParams()
    result = ScenarioResult("offline-schedule")
    result.checks.extend(site_devices(bench).requirements("pv"))
    if result.checks:
        return result
    assert bench.gateway_config is not None
    bench.gateway_config.write_text(
        gateway_config_text(bench, control_period_s=params.control_period_s, poll_period_s=0.5)
    )
    gateway = await bench.start_gateway()
    await bench.wait_registered()
    tolerance_s = params.edge_tolerance_s + params.control_period_s

    first_start = float(math.ceil(time.time() + params.lead_s))
    windows = [
        (first_start + i * params.event_s, first_start + (i + 1) * params.event_s)
        for i in range(len(params.event_pcts))
    ]
    last_end = windows[-1][1]

    def label(wall: float) -> tuple[float | None, str]:
        for i, (start, end) in enumerate(windows):
            if start <= wall < end:
                return None, f"{_event_id(i)} ({params.event_pcts[i]:g} %)"
        return None, f"(program default {params.default_pct:g} %)"

    async with SiteWatcher(bench, out, label) as watch:
        posted = await bench.api.post(
            f"/sites/{bench.site_id}/intents",
            {
                "programs": [
                    {
                        "program_id": PROGRAM_ID,
                        "primacy": 10,
                        "default_control": {"max_gen_pct": params.default_pct},
                    }
                ],
                "events": [
                    {
                        "event_id": _event_id(i),
                        "program_id": PROGRAM_ID,
                        "start": iso(start),
                        "duration_s": params.event_s,
                        "controls": {"max_gen_pct": pct},
                    }
                    for i, ((start, _), pct) in enumerate(
                        zip(windows, params.event_pcts, strict=True)
                    )
                ],
            },
        )
        version = posted["version"]
        watch.note(
            f"posted intent v{version}: program {PROGRAM_ID} default max_gen_pct "
            f"{params.default_pct:g} %, {len(windows)} events of {params.event_s} s from "
            f"{iso(first_start)} (caps {', '.join(f'{p:g}' for p in params.event_pcts)} %)"
        )
        acked = await wait_acked(bench, version)
        default_seen = await watch.wait_for(
            capped_at(params.default_pct), timeout_s=max(0.0, first_start - time.time())
        )
        assert bench.headend is not None
        await bench.headend.kill()  # kill -9: no goodbye on the stream
        headend_down = time.time()
        watch.note(
            f"headend killed {first_start - headend_down:.1f} s before the first event starts"
        )
        await sleep_until(last_end + params.after_s)
        gateway_alive = gateway.running and bench.gateway is gateway
        watch.note("restarting the headend")
        headend_up = time.time()
        await bench.restart_headend()

        async def all_delivered() -> list[dict[str, Any]] | None:
            rows = await event_responses(bench)
            done = all(statuses(rows, _event_id(i)) == EXPECTED for i in range(len(windows)))
            return rows if done else None

        delivered_rows, _ = await wait_until(all_delivered, timeout_s=params.responses_timeout_s)
        delivered_s = time.time() - headend_up
        delivered = delivered_rows is not None
        rows = delivered_rows or await event_responses(bench)
        watch.note(f"event responses at the headend {delivered_s:.1f} s after it came back")

    # -- verdict --------------------------------------------------------------------------------
    result.checks.append(
        Check(
            f"intent v{version} persisted by the gateway before the headend went down",
            acked,
            "ack PERSISTED" if acked else "no PERSISTED ack",
        )
    )
    result.checks.append(
        Check(
            "the headend was down (killed) before the first event started",
            headend_down < first_start,
            f"killed {first_start - headend_down:.1f} s before the first start",
        )
    )
    result.checks.append(
        Check(
            f"the program default (max_gen_pct {params.default_pct:g} %) was at every PV "
            "register before the first event",
            default_seen is not None and default_seen.wall < first_start,
            "seen" if default_seen is not None else "not seen",
        )
    )

    start_errors: list[float] = []
    end_errors: list[float] = []
    cursor = windows[0][0] - params.lead_s
    release: CapSample | None = None
    for i, ((start, end), pct) in enumerate(zip(windows, params.event_pcts, strict=True)):
        arrived = watch.first(capped_at(pct), after=cursor)
        release = (
            watch.first(not_capped_at(pct), after=arrived.wall) if arrived is not None else None
        )
        start_error = arrived.wall - start if arrived is not None else math.nan
        end_error = release.wall - end if release is not None else math.nan
        start_errors.append(start_error)
        end_errors.append(end_error)
        if release is not None:
            cursor = release.wall
        result.checks.append(
            Check(
                f"event {_event_id(i)} (max_gen_pct {pct:g} %) in force at every PV register "
                f"from its start to its end, ±{tolerance_s:.2f} s",
                abs(start_error) <= tolerance_s and abs(end_error) <= tolerance_s,
                f"start {start_error:+.2f} s, end {end_error:+.2f} s",
            )
        )
    after = watch.window(release.wall, math.inf) if release is not None else []
    default_back = bool(after) and all(s.all_at(params.default_pct) for s in after[1:])
    # The release sample may catch the inverters mid-write (one at the default, one not yet).
    result.checks.append(
        Check(
            f"after the last event the program default ({params.default_pct:g} %) returned and "
            f"held for {params.after_s:g} s",
            default_back and after[-1].wall >= last_end + params.after_s - 0.5,
            ", ".join(f"{pv} {pct:g} %" for pv, pct in after[-1].caps_pct.items())
            if after
            else "never released",
        )
    )
    result.checks.append(
        Check(
            "the gateway kept running offline throughout",
            gateway_alive,
            f"pid {gateway.process.pid}"
            + ("" if gateway_alive else f" exited with {gateway.process.returncode}"),
        )
    )
    seen = {_event_id(i): statuses(rows, _event_id(i)) for i in range(len(windows))}
    result.checks.append(
        Check(
            "after the headend came back, every event's responses reached it: "
            + ", ".join(EXPECTED),
            delivered,
            "; ".join(f"{e}: {' -> '.join(s) or 'none'}" for e, s in seen.items()),
        )
    )
    # Stamped by the gateway when they happened (offline), forwarded after the reconnection.
    stamp_errors: list[str] = []
    worst_stamp = 0.0
    for i, (start, end) in enumerate(windows):
        for status, nominal in (("STARTED", start), ("COMPLETED", end)):
            row = next(
                (r for r in rows if r["event_id"] == _event_id(i) and r["status"] == status),
                None,
            )
            stamp = parse_time(row["time"]) if row is not None and row["time"] else math.nan
            error = stamp - nominal
            worst_stamp = max(worst_stamp, abs(error)) if not math.isnan(error) else math.inf
            if not (headend_down < stamp < headend_up and abs(error) <= tolerance_s):
                stamp_errors.append(f"{_event_id(i)} {status} {error:+.2f} s")
    result.checks.append(
        Check(
            "STARTED and COMPLETED were stamped during the outage, at each event's start and end",
            delivered and not stamp_errors,
            "; ".join(stamp_errors) or f"worst {worst_stamp:.2f} s from the nominal time",
        )
    )
    result.figures["worst_start_error_s"] = max(start_errors, key=abs)
    result.figures["worst_end_error_s"] = max(end_errors, key=abs)
    result.figures["outage_s"] = headend_up - headend_down
    result.figures["responses_after_reconnect_s"] = delivered_s
    return result

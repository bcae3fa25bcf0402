"""Scenario `randomized-start`: 1,000 events with randomizeStart spread their effective starts over
the window, reproducibly per gateway.

Script: 1,000 events, all with the same nominal start an hour ahead (none executes during the
scenario) and `randomize_start_s` = 600, are posted through the headend's HTTP API in 10 posts of
100 (the most one post takes), so the gateway ends up holding one document of 1,000 events
received through the real path (headend → gRPC → verify → persist → ack). Each event's RECEIVED
response carries the effective start this gateway drew (`GET /events?site_id=...`, which
returns the newest responses first, up to `limit` ≤ 10,000 per call and has no cursor: the
scenario asks for all of them at once).

Checked:

* every effective start lies in [start, start + 600 s];
* the starts are spread uniformly over the window: every tenth of the window holds 6-14 % of
  the events (100 ± 4.2 sigma for a fair draw), and the Kolmogorov-Smirnov distance to the
  uniform distribution is below its 1 % critical value, 1.63 / sqrt(n);
* the same gateway id draws the same starts: the whole run is repeated on a fresh bench (new
  headend, new gateway state) with the same gateway id and the same events, and every event
  gets the same effective start;
* a different gateway id draws different starts (all but a handful: two gateways agree on an
  event by chance with probability 1/601).

All the events ask for the same mode over overlapping windows, so all but a few are superseded
on arrival by a newer (or, within one post, a lower event_id) one (protocols.md §1.3 rule 7);
their RECEIVED responses still carry their effective windows. The superseded count is reported.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from hil.scenarios.harness import Bench, open_bench
from hil.scenarios.probe import event_responses, parse_time, wait_until
from hil.scenarios.report import Check, ScenarioResult

__all__ = ["RandomizedStartParams", "run_randomized_start"]

MAX_EVENTS_PER_POST = 100  # headend_min.schemas.IntentPostIn.events max_length


@dataclass(frozen=True)
class RandomizedStartParams:
    events: int = 1000
    lead_s: int = 3600  # nominal start this far ahead
    randomize_start_s: int = 600
    duration_s: int = 60
    bins: int = 10
    min_bin_share: float = 0.06
    max_bin_share: float = 0.14
    ks_coefficient: float = 1.63  # KS critical value at alpha = 1 %: 1.63 / sqrt(n)
    max_same_by_chance: int = 10  # a different gateway id: at most this many equal draws
    receive_timeout_s: float = 90.0  # generous: a loaded machine persists 1,000 events slowly
    other_gateway_id: str = "demo-gw-other"
    cpu_sample_s: float = 2.0  # the gateway's CPU use while it holds the events (a figure)


@dataclass(frozen=True)
class _Run:
    gateway_id: str
    offsets_s: dict[str, float]  # event id -> effective start - nominal start
    superseded: int
    started: int
    post_s: float
    received_s: float | None  # from the first post to the last RECEIVED at the headend
    persisted: bool  # the gateway acked the last version (all events) as persisted


def _iso(wall_s: float) -> str:
    return datetime.fromtimestamp(wall_s, UTC).isoformat().replace("+00:00", "Z")


def _ks_uniform(values: Sequence[float], width: float) -> float:
    """Kolmogorov-Smirnov distance between `values` and the uniform distribution on [0, width]."""
    ordered = sorted(values)
    n = len(ordered)
    return max(max((i + 1) / n - x / width, x / width - i / n) for i, x in enumerate(ordered))


async def _cpu_share(pid: int, seconds: float) -> float | None:
    """Share of one core a process used over the next `seconds` (Linux /proc), or None."""

    def cpu_s() -> float | None:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        # utime and stime: fields 14 and 15 of stat(5), counted after the ")" from field 3.
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    before, started = cpu_s(), time.monotonic()
    await asyncio.sleep(seconds)
    after = cpu_s()
    if before is None or after is None:
        return None
    return (after - before) / (time.monotonic() - started)


async def _post_and_collect(
    bench: Bench, start_wall_s: float, params: RandomizedStartParams, out: TextIO
) -> _Run:
    """Start the bench's gateway, post the events, and read back the draws it reports."""
    await bench.start_gateway()
    await bench.wait_registered()
    ids = [f"rs-{i:04d}" for i in range(params.events)]
    started = time.monotonic()
    version = 0
    for first in range(0, len(ids), MAX_EVENTS_PER_POST):
        posted = await bench.api.post(
            f"/sites/{bench.site_id}/intents",
            {
                "events": [
                    {
                        "event_id": event_id,
                        "start": _iso(start_wall_s),
                        "duration_s": params.duration_s,
                        "randomize_start_s": params.randomize_start_s,
                        "controls": {"max_gen_pct": 50},
                    }
                    for event_id in ids[first : first + MAX_EVENTS_PER_POST]
                ]
            },
        )
        version = posted["version"]
    post_s = time.monotonic() - started
    held = len(posted["document"]["events"])
    print(
        f"  gateway {bench.gateway_id}: {len(ids)} events posted in "
        f"{len(ids) // MAX_EVENTS_PER_POST} posts ({post_s:.2f} s); version {version} holds "
        f"{held} events",
        file=out,
        flush=True,
    )

    async def all_received() -> list[dict[str, Any]] | None:
        responses = await event_responses(bench, limit=10_000)
        received = {r["event_id"] for r in responses if r["status"] == "RECEIVED"}
        return responses if received >= set(ids) else None

    responses, waited = await wait_until(
        all_received, timeout_s=params.receive_timeout_s, period_s=0.25
    )
    received_s = post_s + waited if responses is not None else None
    if responses is None:
        responses = await event_responses(bench, limit=10_000)
    offsets = {
        r["event_id"]: round(parse_time(r["effective_start"]) - start_wall_s, 3)
        for r in responses
        if r["status"] == "RECEIVED" and r["effective_start"] is not None
    }
    intent = await bench.api.get(f"/sites/{bench.site_id}/intents/{version}")
    ours = next((g for g in intent["gateways"] if g["gateway_id"] == bench.gateway_id), None)
    run = _Run(
        gateway_id=bench.gateway_id,
        offsets_s=offsets,
        superseded=sum(1 for r in responses if r["status"] == "SUPERSEDED"),
        started=sum(1 for r in responses if r["status"] == "STARTED"),
        post_s=post_s,
        received_s=received_s,
        persisted=ours is not None and ours["ack"] == "PERSISTED",
    )
    print(
        f"  gateway {bench.gateway_id}: {len(offsets)} RECEIVED with an effective start"
        + (f" {received_s:.1f} s after the first post" if received_s is not None else "")
        + f", {run.superseded} superseded on arrival",
        file=out,
        flush=True,
    )
    return run


async def run_randomized_start(
    bench: Bench, out: TextIO, params: RandomizedStartParams | None = None
) -> ScenarioResult:
    params = params or RandomizedStartParams()
    result = ScenarioResult("randomized-start")
    window = float(params.randomize_start_s)
    # Whole seconds, the same for every run: a second run must see the very same events.
    start_wall_s = float(math.ceil(time.time()) + params.lead_s)
    print(
        f"{params.events} events starting {_iso(start_wall_s)} (in {params.lead_s} s), "
        f"randomize_start_s = {params.randomize_start_s}",
        file=out,
        flush=True,
    )

    first = await _post_and_collect(bench, start_wall_s, params, out)
    if bench.gateway is not None:
        cpu = await _cpu_share(bench.gateway.process.pid, params.cpu_sample_s)
        if cpu is not None:
            result.figures["gateway_cpu_pct_holding"] = 100.0 * cpu
            print(
                f"  gateway {bench.gateway_id} holding {params.events} events: "
                f"{100.0 * cpu:.0f} % of a core over {params.cpu_sample_s:g} s",
                file=out,
                flush=True,
            )
    print(f"  fresh bench, same gateway id {bench.gateway_id}:", file=out, flush=True)
    async with open_bench(bench.spec, bench.workdir / "same-id", gateway_id=bench.gateway_id) as b:
        again = await _post_and_collect(b, start_wall_s, params, out)
    print(f"  fresh bench, gateway id {params.other_gateway_id}:", file=out, flush=True)
    async with open_bench(
        bench.spec, bench.workdir / "other-id", gateway_id=params.other_gateway_id
    ) as b:
        other = await _post_and_collect(b, start_wall_s, params, out)

    # -- verdict --------------------------------------------------------------------------------
    offsets = list(first.offsets_s.values())
    n = len(offsets)
    result.figures["events"] = n
    result.figures["post_s"] = first.post_s
    result.figures["received_s"] = first.received_s if first.received_s is not None else math.nan
    result.figures["superseded_on_arrival"] = first.superseded
    result.checks.append(
        Check(
            f"all {params.events} events reached the gateway through the headend and were "
            "acknowledged as persisted",
            n == params.events and first.persisted,
            f"{n} RECEIVED responses with an effective start"
            + (f", {first.received_s:.1f} s after the first post" if first.received_s else "")
            + f"; last version acked {'PERSISTED' if first.persisted else 'not persisted'}",
        )
    )
    result.checks.append(
        Check(
            "none executed during the scenario (their window is an hour ahead)",
            first.started == 0 and again.started == 0 and other.started == 0,
            f"STARTED responses: {first.started}, {again.started}, {other.started}",
        )
    )
    if not offsets:
        return result
    low, high = min(offsets), max(offsets)
    mean = sum(offsets) / n
    result.figures["offset_min_s"] = low
    result.figures["offset_max_s"] = high
    result.figures["offset_mean_s"] = mean
    result.checks.append(
        Check(
            f"every effective start lies in [start, start + {params.randomize_start_s} s]",
            low >= 0.0 and high <= window,
            f"offsets {low:.0f}-{high:.0f} s, mean {mean:.0f} s (uniform: {window / 2:.0f} s)",
        )
    )
    counts = [0] * params.bins
    for offset in offsets:
        counts[min(int(offset / window * params.bins), params.bins - 1)] += 1
    shares = [c / n for c in counts]
    result.figures["bin_min_share"] = min(shares)
    result.figures["bin_max_share"] = max(shares)
    result.checks.append(
        Check(
            f"spread over the window: each tenth holds {params.min_bin_share:.0%}-"
            f"{params.max_bin_share:.0%} of the events",
            all(params.min_bin_share <= s <= params.max_bin_share for s in shares),
            "per tenth: " + " ".join(str(c) for c in counts),
        )
    )
    ks = _ks_uniform(offsets, window)
    critical = params.ks_coefficient / math.sqrt(n)
    result.figures["ks_distance"] = ks
    result.checks.append(
        Check(
            "uniform over the window: Kolmogorov-Smirnov distance below the 1 % critical value",
            ks < critical,
            f"D = {ks:.4f} < {critical:.4f}",
        )
    )
    same = sum(
        1 for event_id, offset in first.offsets_s.items() if again.offsets_s.get(event_id) == offset
    )
    result.figures["same_id_equal"] = same
    result.checks.append(
        Check(
            f"reproducible: a fresh gateway with the same id ({bench.gateway_id}) draws the same "
            "effective start for every event",
            same == n and len(again.offsets_s) == n,
            f"{same} of {n} equal ({len(again.offsets_s)} reported by the second run)",
        )
    )
    differ = sum(
        1
        for event_id, offset in first.offsets_s.items()
        if event_id in other.offsets_s and other.offsets_s[event_id] != offset
    )
    compared = sum(1 for event_id in first.offsets_s if event_id in other.offsets_s)
    result.figures["other_id_differ"] = differ
    result.checks.append(
        Check(
            f"per gateway: gateway {params.other_gateway_id} draws different effective starts",
            compared == n and compared - differ <= params.max_same_by_chance,
            f"{differ} of {compared} differ ({compared - differ} equal by chance; "
            f"expected ~{n / (window + 1):.1f})",
        )
    )
    return result

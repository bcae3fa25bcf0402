"""Durability scenarios: a full outbox, an intent posted to an absent gateway, two headends.

`quota-overflow`: the headend is down long enough for the gateway's outbox to reach its quota.
Judged: control never stops (a PV cap with a 3 s revert timer stays in force at the registers for
the whole outage, so the control loop kept refreshing it); the outbox stays within its quota;
after the headend returns every seq is accounted for (stored, or inside a Gap record) and the Gap
records at the headend state exactly what the outbox shed (records, time range).

`offline-intent` (`--transport grpc|mqtt`): the gateway is stopped, an intent with an event is
posted, the gateway returns. Judged: the event is applied at the registers, the gateway persisted
that version once (one PERSISTED ack, one RECEIVED and one STARTED response for the event).

`two-headends` (PostgreSQL): two headend processes on one database; the gateway streams to A; an
intent posted to B reaches the gateway (persisted and acknowledged) within 1 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any, TextIO

from hil.scenarios.harness import Bench, BenchError, gateway_config_text
from hil.scenarios.ledger import OutboxLedger, compare, outbox_ledger
from hil.scenarios.probe import event_responses, site_devices, wait_until
from hil.scenarios.report import Check, ScenarioResult
from hil.scenarios.watch import SiteWatcher, capped_at, iso

__all__ = [
    "OfflineIntentParams",
    "QuotaParams",
    "TwoHeadendParams",
    "run_offline_intent",
    "run_quota_overflow",
    "run_two_headends",
]


async def _intent_progress(bench: Bench, version: int, api: Any = None) -> dict[str, Any] | None:
    api = api or bench.api
    with contextlib.suppress(BenchError, OSError):
        intent = await api.get(f"/sites/{bench.site_id}/intents/{version}")
        mine = [g for g in intent["gateways"] if g["gateway_id"] == bench.gateway_id]
        return mine[0] if mine else None
    return None


# -- quota-overflow --------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuotaParams:
    quota_bytes: int = 96 * 1024
    outage_s: float = 14.0
    poll_period_s: float = 0.1
    cap_pct: float = 60.0
    revert_timeout_s: int = 3  # short: if control stopped, the inverters would revert visibly
    drain_timeout_s: float = 60.0


async def run_quota_overflow(
    bench: Bench, out: TextIO, params: QuotaParams | None = None
) -> ScenarioResult:
    params = params or QuotaParams()
    result = ScenarioResult("quota-overflow")
    result.checks.extend(site_devices(bench).requirements("pv"))
    if result.checks:
        return result
    assert bench.gateway_config is not None
    bench.gateway_config.write_text(
        gateway_config_text(
            bench,
            poll_period_s=params.poll_period_s,
            control_period_s=0.25,
            revert_timeout_s=params.revert_timeout_s,
            refresh_s=1.0,
            extra_outbox=f"quota_bytes = {params.quota_bytes}",
        )
    )
    await bench.start_gateway()
    await bench.wait_registered()
    posted = await bench.api.post(
        f"/sites/{bench.site_id}/intents", {"default_control": {"max_gen_pct": params.cap_pct}}
    )
    async with SiteWatcher(bench, out) as watch:
        reached = await watch.wait_for(capped_at(params.cap_pct), timeout_s=10.0)
        if reached is None:
            result.checks.append(
                Check(f"default cap {params.cap_pct:g} % written", False, f"v{posted['version']}")
            )
            return result
        await bench.stop_headend()
        outage_start = time.time()
        watch.note(f"headend stopped: {params.outage_s:g} s outage, quota {params.quota_bytes} B")
        await asyncio.sleep(params.outage_s)
        outage_end = time.time()
        during = watch.window(outage_start, outage_end)
        held = sum(1 for sample in during if sample.all_at(params.cap_pct))
        result.checks.append(
            Check(
                "control kept running through the outage (cap held at the registers)",
                bool(during) and held == len(during),
                f"{held}/{len(during)} samples at {params.cap_pct:g} % "
                f"(inverter revert timer {params.revert_timeout_s} s)",
            )
        )
    assert bench.gateway is not None
    await bench.gateway.stop()
    outbox_path = bench.workdir / "gateway-state" / "outbox.sqlite3"
    at_stop = outbox_ledger(outbox_path)
    file_bytes = sum(
        p.stat().st_size for p in outbox_path.parent.glob("outbox.sqlite3*") if p.exists()
    )
    result.figures["held_payload_bytes"] = float(at_stop.held_payload_bytes)
    result.figures["quota_bytes"] = float(params.quota_bytes)
    result.figures["file_bytes"] = float(file_bytes)
    result.figures["shed_records"] = float(at_stop.shed_records)
    result.checks.append(
        Check(
            "the outbox stayed within its quota",
            at_stop.held_payload_bytes <= params.quota_bytes,
            f"held {at_stop.held_payload_bytes} B of payload in {len(at_stop.held)} seqs, quota "
            f"{params.quota_bytes} B (the quota also counts a per-row overhead; the file is "
            f"{file_bytes} B with SQLite's free pages)",
        )
    )
    result.checks.append(
        Check(
            "the quota was reached and data shed",
            at_stop.shed_records > 0,
            f"{at_stop.shed_records} records shed",
        )
    )
    await bench.restart_headend()
    await bench.start_gateway()
    target = OutboxLedger(at_stop.last_seq, frozenset(), at_stop.shed_records)
    started = time.monotonic()
    ledger = await asyncio.to_thread(compare, target, bench.headend_db, bench.gateway_id)
    while not ledger.ok and time.monotonic() - started < params.drain_timeout_s:
        await asyncio.sleep(0.5)
        ledger = await asyncio.to_thread(compare, target, bench.headend_db, bench.gateway_id)
    result.figures["drain_s"] = time.monotonic() - started
    result.checks.append(
        Check("every seq is stored or inside a Gap record (0 gaps)", ledger.ok, ledger.describe())
    )
    gaps = await _gaps(bench)
    shed_total = sum(int(g["records"]) for g in gaps)
    in_window = all(
        g["first_time"] is None or outage_start - 30 <= _wall(g["first_time"]) <= outage_end + 5
        for g in gaps
    )
    result.checks.append(
        Check(
            "the Gap records at the headend state exactly what was shed",
            shed_total == at_stop.shed_records and bool(gaps) and in_window,
            f"{len(gaps)} gap records at the headend say {shed_total} records shed; the outbox "
            f"counted {at_stop.shed_records}; "
            + "; ".join(
                f"{g['what']}: {g['records']} records, {g['points']} points, "
                f"{g['first_time']}..{g['last_time']}"
                for g in gaps[:3]
            ),
        )
    )
    return result


def _wall(text: str) -> float:
    from hil.scenarios.probe import parse_time

    return parse_time(text)


async def _gaps(bench: Bench) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 10.0
    while True:
        with contextlib.suppress(BenchError, OSError):
            gaps: list[dict[str, Any]] = await bench.api.get(f"/gateways/{bench.gateway_id}/gaps")
            if gaps or time.monotonic() > deadline:
                return gaps
        if time.monotonic() > deadline:
            return []
        await asyncio.sleep(0.3)


# -- offline-intent --------------------------------------------------------------------------------

OFFLINE_EVENT_ID = "offline-event"


@dataclass(frozen=True)
class OfflineIntentParams:
    pct: float = 45.0
    offline_s: float = 3.0
    duration_s: int = 120
    apply_timeout_s: float = 20.0


async def run_offline_intent(
    bench: Bench, out: TextIO, params: OfflineIntentParams | None = None
) -> ScenarioResult:
    params = params or OfflineIntentParams()
    result = ScenarioResult(f"offline-intent ({bench.transport})")
    result.checks.extend(site_devices(bench).requirements("pv"))
    if result.checks:
        return result
    await bench.start_gateway()
    await bench.wait_registered()
    assert bench.gateway is not None
    await bench.gateway.stop()
    async with SiteWatcher(bench, out) as watch:
        watch.note("gateway stopped")
        posted = await bench.api.post(
            f"/sites/{bench.site_id}/intents",
            {
                "events": [
                    {
                        "event_id": OFFLINE_EVENT_ID,
                        "start": iso(time.time()),
                        "duration_s": params.duration_s,
                        "controls": {"max_gen_pct": params.pct},
                    }
                ]
            },
        )
        version = int(posted["version"])
        watch.note(f"posted v{version} while the gateway is away: max_gen_pct {params.pct:g} %")
        await asyncio.sleep(params.offline_s)
        returned = time.time()
        await bench.start_gateway()
        watch.note("gateway started again")
        applied = await watch.wait_for(
            capped_at(params.pct), timeout_s=params.apply_timeout_s, after=returned
        )
        result.checks.append(
            Check(
                "the intent posted while the gateway was away is applied when it returns",
                applied is not None,
                f"cap {params.pct:g} % at the registers "
                + (f"{applied.wall - returned:.2f} s after the restart" if applied else "never"),
            )
        )
        if applied is not None:
            result.figures["applied_after_return_s"] = applied.wall - returned
        # Let any re-delivery (register reconciliation, the broker's queued copy) happen.
        await asyncio.sleep(2.0)

    async def responses() -> list[dict[str, Any]]:
        return [r for r in await event_responses(bench) if r["event_id"] == OFFLINE_EVENT_ID]

    rows, _ = await wait_until(
        lambda: _when(responses(), lambda rs: any(r["status"] == "STARTED" for r in rs)),
        timeout_s=10.0,
    )
    rows = rows or []
    counts = {
        status: sum(r["status"] == status for r in rows) for status in ("RECEIVED", "STARTED")
    }
    progress = await _intent_progress(bench, version)
    result.checks.append(
        Check(
            "applied once: persisted once, RECEIVED once, STARTED once",
            counts == {"RECEIVED": 1, "STARTED": 1}
            and progress is not None
            and progress["ack"] == "PERSISTED",
            f"responses {counts}; v{version} at the headend: "
            + (f"ack {progress['ack']}, state {progress['state']}" if progress else "no record"),
        )
    )
    return result


async def _when(rows_awaitable: Any, predicate: Any) -> list[dict[str, Any]] | None:
    rows = await rows_awaitable
    return rows if predicate(rows) else None


# -- two-headends ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TwoHeadendParams:
    posts: int = 5
    bound_s: float = 1.0


async def run_two_headends(
    bench: Bench, out: TextIO, params: TwoHeadendParams | None = None
) -> ScenarioResult:
    params = params or TwoHeadendParams()
    result = ScenarioResult("two-headends")
    if not bench.db_url:
        result.checks.append(Check("runs on PostgreSQL", False, "give --db postgresql://..."))
        return result
    await bench.start_gateway()
    await bench.wait_registered()
    other, other_api = await bench.start_extra_headend("headend-b")
    try:
        print(
            f"  [{bench.elapsed_s():6.1f} s] headend B up at {other_api.base_url}; the gateway "
            f"streams to A ({bench.grpc_target})",
            file=out,
            flush=True,
        )
        latencies: list[float] = []
        for index in range(params.posts):
            body = {"default_control": {"max_gen_pct": 90.0 - index * 5}}
            posted_at = time.monotonic()
            reply = await other_api.post(f"/sites/{bench.site_id}/intents", body)
            version = int(reply["version"])
            seen = None
            while time.monotonic() - posted_at < 10.0:
                progress = await _intent_progress(bench, version, other_api)
                if progress is not None and progress["ack"] == "PERSISTED":
                    seen = time.monotonic() - posted_at
                    break
                await asyncio.sleep(0.01)
            print(
                f"  [{bench.elapsed_s():6.1f} s] v{version} posted to B: persisted by the "
                + (f"gateway {seen:.3f} s later (via A)" if seen is not None else "gateway: never"),
                file=out,
                flush=True,
            )
            latencies.append(seen if seen is not None else math.inf)
            await asyncio.sleep(0.5)
        worst = max(latencies)
        result.figures["worst_s"] = worst
        result.figures["median_s"] = sorted(latencies)[len(latencies) // 2]
        result.checks.append(
            Check(
                "an intent posted to headend B reaches the gateway on A within "
                f"{params.bound_s:g} s",
                worst <= params.bound_s,
                f"{params.posts} posts, worst {worst:.3f} s",
            )
        )
    finally:
        await other.stop()
    return result

"""Chaos scenarios: kill -9 the gateway, the headend or the MQTT broker, again and again, while
telemetry flows and the operator keeps changing the intent; then prove nothing was lost.

`chaos-kill-gateway`: N random `kill -9` of the gateway (each restarted at once, so some kills
land during start-up, register, an outbox commit or an intent write).
`chaos-kill-headend`: N random `kill -9` of the headend (restarted on the same ports/database).
`mqtt-broker-restart`: the gateway and headend talk through mosquitto; the broker is killed
(kill -9) and restarted N times.

Judged by the loss ledger (`hil.scenarios.ledger`), reading both ends' storage directly: after
the chaos the gateway runs until the headend holds every seq the outbox ever assigned; then 0
seqs missing and 0 stored twice. Also: the last intent posted is the one the gateway holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from dataclasses import dataclass
from typing import Any, TextIO

from hil.scenarios.harness import Bench, BenchError, gateway_config_text
from hil.scenarios.ledger import Ledger, OutboxLedger, compare, outbox_ledger
from hil.scenarios.report import Check, ScenarioResult

__all__ = [
    "ChaosParams",
    "run_chaos_kill_gateway",
    "run_chaos_kill_headend",
    "run_mqtt_broker_restart",
]


@dataclass(frozen=True)
class ChaosParams:
    kills: int = 50
    # Each victim lives a random time in this range (s) before the next kill.
    alive_min_s: float = 0.2
    alive_max_s: float = 1.6
    down_s: float = 0.0  # how long the victim stays dead before its restart
    intent_every_s: float = 1.5  # the operator changes the intent this often
    poll_period_s: float = 0.2
    drain_timeout_s: float = 90.0
    seed: int | None = None


async def _post_intents(bench: Bench, every_s: float, posted: list[int], out: TextIO) -> None:
    """Keep changing the site's default control (a headend that is down just misses a beat)."""
    step = 0
    while True:
        step += 1
        body = {"default_control": {"max_gen_pct": 70.0 + (step % 4) * 10.0}}
        with contextlib.suppress(BenchError, OSError):
            reply = await bench.api.post(f"/sites/{bench.site_id}/intents", body)
            posted.append(int(reply["version"]))
        await asyncio.sleep(every_s)


async def _held_intent_version(bench: Bench) -> int | None:
    with contextlib.suppress(BenchError, OSError):
        gateway = await bench.api.get(f"/gateways/{bench.gateway_id}")
        return int(gateway["intent_version"])
    return None


async def _latest_version(bench: Bench) -> int | None:
    with contextlib.suppress(BenchError, OSError):
        versions = await bench.api.get(f"/sites/{bench.site_id}/intents?limit=1")
        return int(versions[0]["version"]) if versions else None
    return None


async def _drain_and_judge(
    bench: Bench, result: ScenarioResult, out: TextIO, params: ChaosParams, posted: list[int]
) -> None:
    """Stop the gateway to read its outbox, restart it, and wait until the headend holds every
    seq the outbox had assigned; record the ledger checks."""
    assert bench.gateway is not None
    await bench.gateway.stop()
    outbox_path = bench.workdir / "gateway-state" / "outbox.sqlite3"
    at_stop = outbox_ledger(outbox_path)
    print(
        f"  [{bench.elapsed_s():6.1f} s] gateway stopped: it assigned seqs 1..{at_stop.last_seq}, "
        f"{len(at_stop.held)} still unacknowledged; restarting it to drain",
        file=out,
        flush=True,
    )
    await bench.start_gateway()
    # Nothing may stay "held": everything up to last_seq has to reach the headend now.
    target = OutboxLedger(at_stop.last_seq, frozenset(), at_stop.shed_records)
    started = time.monotonic()
    ledger: Ledger | None = None
    while time.monotonic() - started < params.drain_timeout_s:
        ledger = await asyncio.to_thread(compare, target, bench.headend_db, bench.gateway_id)
        if ledger.ok:
            break
        await asyncio.sleep(0.5)
    assert ledger is not None
    drain_s = time.monotonic() - started
    result.figures["records"] = float(at_stop.last_seq)
    result.figures["drain_s"] = drain_s
    result.checks.append(
        Check(
            "every seq committed to the outbox is at the headend (0 gaps)",
            not ledger.missing,
            ledger.describe(),
        )
    )
    result.checks.append(
        Check("no seq is stored twice (0 duplicates)", ledger.duplicates == 0, ledger.describe())
    )
    latest_at_headend = await _latest_version(bench)
    if latest_at_headend is not None:
        # The headend's newest version, not the poster's list: a post cancelled at the end of the
        # chaos may still have been stored.
        posted.append(latest_at_headend)
    if posted:
        latest = max(posted)
        held = None
        deadline = time.monotonic() + 15.0
        while time.monotonic() < deadline:
            held = await _held_intent_version(bench)
            if held == latest:
                break
            await asyncio.sleep(0.3)
        result.checks.append(
            Check(
                "the gateway holds the last intent posted",
                held == latest,
                f"posted {len(posted)} versions, last v{latest}; the gateway holds v{held}",
            )
        )


async def _start(bench: Bench, params: ChaosParams, extra_outbox: str = "") -> None:
    assert bench.gateway_config is not None
    bench.gateway_config.write_text(
        gateway_config_text(
            bench,
            poll_period_s=params.poll_period_s,
            control_period_s=0.5,
            extra_outbox=extra_outbox,
        )
    )
    await bench.start_gateway()
    await bench.wait_registered()


async def _chaos(
    bench: Bench,
    out: TextIO,
    params: ChaosParams,
    name: str,
    victim: str,
    kill_and_restart: Any,
) -> ScenarioResult:
    result = ScenarioResult(name)
    rng = random.Random(params.seed)
    await _start(bench, params)
    posted: list[int] = []
    poster = asyncio.create_task(_post_intents(bench, params.intent_every_s, posted, out))
    print(
        f"  [{bench.elapsed_s():6.1f} s] {params.kills} x kill -9 of the {victim}, each after "
        f"{params.alive_min_s:g}..{params.alive_max_s:g} s alive; intent changes every "
        f"{params.intent_every_s:g} s",
        file=out,
        flush=True,
    )
    chaos_started = time.monotonic()
    try:
        for kill in range(1, params.kills + 1):
            await asyncio.sleep(rng.uniform(params.alive_min_s, params.alive_max_s))
            await kill_and_restart()
            if kill % 10 == 0 or kill == params.kills:
                print(
                    f"  [{bench.elapsed_s():6.1f} s] {kill} kills of the {victim} so far",
                    file=out,
                    flush=True,
                )
    finally:
        poster.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await poster
    result.figures["kills"] = float(params.kills)
    result.figures["chaos_s"] = time.monotonic() - chaos_started
    if bench.gateway is None or not bench.gateway.running:
        await bench.start_gateway()
    await _drain_and_judge(bench, result, out, params, posted)
    return result


async def run_chaos_kill_gateway(
    bench: Bench, out: TextIO, params: ChaosParams | None = None
) -> ScenarioResult:
    params = params or ChaosParams()

    async def kill_and_restart() -> None:
        await bench.kill_gateway()
        if params.down_s:
            await asyncio.sleep(params.down_s)
        await bench.start_gateway()

    return await _chaos(bench, out, params, "chaos-kill-gateway", "gateway", kill_and_restart)


async def run_chaos_kill_headend(
    bench: Bench, out: TextIO, params: ChaosParams | None = None
) -> ScenarioResult:
    params = params or ChaosParams(kills=10, alive_min_s=1.0, alive_max_s=3.0)

    async def kill_and_restart() -> None:
        await bench.restart_headend(kill=True, down_s=params.down_s)

    return await _chaos(bench, out, params, "chaos-kill-headend", "headend", kill_and_restart)


async def run_mqtt_broker_restart(
    bench: Bench, out: TextIO, params: ChaosParams | None = None
) -> ScenarioResult:
    params = params or ChaosParams(kills=3, alive_min_s=2.0, alive_max_s=4.0, down_s=1.0)
    if bench.broker is None:
        result = ScenarioResult("mqtt-broker-restart")
        result.checks.append(
            Check("runs over MQTT", False, "start it with --transport mqtt (the default for it)")
        )
        return result
    broker = bench.broker

    async def kill_and_restart() -> None:
        await asyncio.to_thread(broker.kill)
        if params.down_s:
            await asyncio.sleep(params.down_s)
        await asyncio.to_thread(broker.start)

    return await _chaos(bench, out, params, "mqtt-broker-restart", "MQTT broker", kill_and_restart)

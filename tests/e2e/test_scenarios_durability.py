"""Issue 4's acceptance, run as the scenarios users run (`dergw hil scenario NAME --check`).

* chaos: 50 random kill -9 of the gateway, 10 of the headend, and the MQTT broker killed and
  restarted, each during steady telemetry and intent changes: 0 gaps, 0 duplicates in seq at the
  headend for everything committed to the outbox (judged by `hil.scenarios.ledger`, which reads
  both ends' storage directly);
* quota: a long outage fills the outbox quota; control keeps running; the gap records at the
  headend state exactly what was shed;
* an intent posted while the gateway is away is applied when it returns, once (both transports);
* two headends on one PostgreSQL database: an intent posted to B reaches a gateway on A in < 1 s.
Services (mosquitto, PostgreSQL) skip when absent, and fail when DERGW_REQUIRE_SERVICES=1.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from hil.scenarios.report import ScenarioResult
from hil.scenarios.runner import SCENARIOS, run_scenario
from tests.headend.pg_support import ADMIN_URL, require_postgres
from tests.mqtt_support import mosquitto_binary

pytestmark = pytest.mark.hil  # real processes and sockets on loopback


def _failures(result: ScenarioResult, out: io.StringIO) -> str:
    failed = "\n".join(f"{c.name}: {c.detail}" for c in result.checks if not c.passed)
    return f"failed checks:\n{failed}\nfigures: {result.figures}\n--- output ---\n{out.getvalue()}"


async def _run(name: str, workdir: Path, **options: str) -> ScenarioResult:
    out = io.StringIO()
    result = await run_scenario(name, workdir=workdir, out=out, **options)
    assert result.passed, _failures(result, out)
    return result


def test_the_durability_scenarios_are_registered() -> None:
    for name in (
        "chaos-kill-gateway",
        "chaos-kill-headend",
        "mqtt-broker-restart",
        "quota-overflow",
        "offline-intent",
        "two-headends",
    ):
        assert name in SCENARIOS


async def test_chaos_kill_gateway_50_times_loses_nothing(tmp_path: Path) -> None:
    result = await _run("chaos-kill-gateway", tmp_path)
    assert result.figures["kills"] == 50


async def test_chaos_kill_headend_10_times_loses_nothing(tmp_path: Path) -> None:
    result = await _run("chaos-kill-headend", tmp_path)
    assert result.figures["kills"] == 10


async def test_mqtt_broker_restart_loses_nothing(tmp_path: Path) -> None:
    mosquitto_binary()
    await _run("mqtt-broker-restart", tmp_path, transport="mqtt")


async def test_quota_overflow_sheds_by_policy_and_reports_it(tmp_path: Path) -> None:
    result = await _run("quota-overflow", tmp_path)
    assert result.figures["shed_records"] > 0


@pytest.mark.parametrize("transport", ["grpc", "mqtt"])
async def test_offline_intent_is_applied_once_on_return(tmp_path: Path, transport: str) -> None:
    if transport == "mqtt":
        mosquitto_binary()
    await _run("offline-intent", tmp_path, transport=transport)


async def test_two_headends_on_postgres_fan_an_intent_out_within_a_second(
    tmp_path: Path,
) -> None:
    require_postgres()
    await _run("two-headends", tmp_path, db_url=ADMIN_URL)

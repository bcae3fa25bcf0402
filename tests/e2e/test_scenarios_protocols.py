"""The mixed-protocol scenarios (issue 5), run in-process against real gateway and headend.

multi-protocol: the export-limit scenario on hil/sites/multi.toml (PV on Modbus TCP and DNP3, the
PCC meter on Modbus RTU, the battery on OPC UA). dnp3-crash: kill -9 of the DNP3 driver's master
child mid-event; the limit holds, the plant is reported unavailable and comes back with its cap.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from hil.scenarios.harness import gateway_config_text, open_bench
from hil.scenarios.report import ScenarioResult
from hil.scenarios.runner import SCENARIOS, run_scenario
from tests.e2e.conftest import site_spec

pytestmark = pytest.mark.hil  # real processes and sockets on loopback


def _failures(result: ScenarioResult, out: io.StringIO) -> str:
    failed = "\n".join(f"{c.name}: {c.detail}" for c in result.checks if not c.passed)
    return f"failed checks:\n{failed}\nfigures: {result.figures}\n--- output ---\n{out.getvalue()}"


async def _run(name: str, workdir: Path) -> ScenarioResult:
    out = io.StringIO()
    result = await run_scenario(name, workdir=workdir, out=out)
    assert result.passed, _failures(result, out)
    return result


def test_the_protocol_scenarios_are_registered_on_the_mixed_site() -> None:
    for name in ("multi-protocol", "dnp3-crash"):
        assert SCENARIOS[name].default_site == "multi.toml"


async def test_gateway_config_names_each_devices_protocol_driver(tmp_path: Path) -> None:
    async with open_bench(site_spec("multi.toml"), tmp_path) as bench:
        import tomllib

        config = tomllib.loads(
            gateway_config_text(bench, extra_params={"plant1": "restart_backoff_s = 3.0"})
        )
    by_id = {d["id"]: d for d in config["devices"]}
    assert {i: d["driver"] for i, d in by_id.items()} == {
        "pv1": "sunspec-modbus",
        "meter1": "sunspec-modbus",
        "bat1": "opcua",
        "plant1": "dnp3",
    }
    assert by_id["meter1"]["params"]["transport"] == "rtu"
    assert by_id["meter1"]["params"]["serial_port"]
    assert by_id["bat1"]["params"]["url"].startswith("opc.tcp://127.0.0.1:")
    assert by_id["plant1"]["params"]["outstation_address"] == 10
    assert by_id["plant1"]["params"]["restart_backoff_s"] == 3.0


async def test_multi_protocol_follows_an_export_limit(tmp_path: Path) -> None:
    result = await _run("multi-protocol", tmp_path)
    assert result.figures["time_to_limit_s"] <= 10.0


async def test_dnp3_crash_keeps_the_limit_and_recovers_the_plant(tmp_path: Path) -> None:
    result = await _run("dnp3-crash", tmp_path)
    assert result.figures["outage_s"] > 0

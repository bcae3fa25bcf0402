"""The resilience scenarios, run in-process against real gateway and headend processes.

offline-schedule (issue items a + g), kill-gateway-mid-event (b), meter-loss (c) and
frozen-gateway (h), the last also on the 7xx site, whose inverters revert to the values the
gateway programmed rather than to no limit. Each scenario judges itself; a failure prints its
failed checks and the figures it measured.
"""

from __future__ import annotations

import io
import textwrap
from importlib import resources
from pathlib import Path

import pytest

from hil.scenarios.report import ScenarioResult
from hil.scenarios.runner import SCENARIOS, run_scenario

pytestmark = pytest.mark.hil  # real processes and sockets on loopback


def _site(name: str) -> Path:
    return Path(str(resources.files("hil") / "sites" / name))


def _failures(result: ScenarioResult, out: io.StringIO) -> str:
    failed = "\n".join(f"{c.name}: {c.detail}" for c in result.checks if not c.passed)
    return f"failed checks:\n{failed}\nfigures: {result.figures}\n--- output ---\n{out.getvalue()}"


async def _run(name: str, workdir: Path, site: str | None = None) -> ScenarioResult:
    out = io.StringIO()
    result = await run_scenario(
        name, workdir=workdir, site_file=_site(site) if site else None, out=out
    )
    assert result.passed, _failures(result, out)
    return result


def test_the_resilience_scenarios_are_registered() -> None:
    for name in ("offline-schedule", "kill-gateway-mid-event", "meter-loss", "frozen-gateway"):
        assert name in SCENARIOS


async def test_offline_schedule_follows_five_events_then_the_default(tmp_path: Path) -> None:
    result = await _run("offline-schedule", tmp_path)
    assert abs(result.figures["worst_start_error_s"]) < 1.0
    assert abs(result.figures["worst_end_error_s"]) < 1.0


async def test_kill_gateway_mid_event_resumes_the_same_window(tmp_path: Path) -> None:
    result = await _run("kill-gateway-mid-event", tmp_path)
    # The scenario's event id draws non-zero offsets for the bench's gateway: the resumed window
    # is the randomized one, not the nominal one.
    assert result.figures["drawn_start_offset_s"] > 0


async def test_meter_loss_goes_open_loop_within_two_cycles(tmp_path: Path) -> None:
    await _run("meter-loss", tmp_path)


async def test_frozen_gateway_1xx_inverter_reverts_to_no_limit(tmp_path: Path) -> None:
    await _run("frozen-gateway", tmp_path, "demo.toml")


async def test_frozen_gateway_7xx_inverter_reverts_to_the_safe_cap(tmp_path: Path) -> None:
    result = await _run("frozen-gateway", tmp_path, "pv7xx.toml")
    assert any("safe open-loop cap" in c.name and c.passed for c in result.checks)


async def test_meter_loss_needs_a_pcc_meter(tmp_path: Path) -> None:
    site = tmp_path / "no-meter.toml"
    pv_only = """
        name = "pv-only"
        [[devices]]
        id = "pv1"
        kind = "pv"
        unit_id = 1
        rating_w = 5000
    """
    site.write_text(textwrap.dedent(pv_only))
    out = io.StringIO()
    result = await run_scenario("meter-loss", workdir=tmp_path / "run", site_file=site, out=out)
    assert not result.passed
    assert [c.name for c in result.checks] == ["this scenario needs a PCC meter"]

"""The control scenarios, run in-process against real gateway and headend processes.

export-step (issue item d), soc-floor (e), overlapping-programs (f) and randomized-start (i).
Each scenario judges itself; a failure prints its failed checks and the figures it measured.
soc-floor also runs on the twelve-device site (another battery size), overlapping-programs on
the 7xx site (caps in 704 instead of 123), export-step on a PV-only site; a site without a
battery gets a clear "needs a battery" verdict from soc-floor.
"""

from __future__ import annotations

import io
from importlib import resources
from pathlib import Path

import pytest

from hil.scenarios.report import ScenarioResult
from hil.scenarios.runner import SCENARIOS, run_scenario

pytestmark = pytest.mark.hil  # real processes and sockets on loopback

# The demo site without its battery: PV inverter and PCC meter only.
PV_ONLY_SITE = """
name = "pv-only"
seed = 1
physics_hz = 20
host = "127.0.0.1"
port = 0

[profiles]
irradiance = [[0, 850], [30, 875], [60, 840], [90, 825], [120, 850]]
load = [[0, 3000], [20, 3150], [45, 2900], [70, 3050], [90, 3000]]
irradiance_noise_pct = 1.0
load_noise_pct = 1.5

[[devices]]
id = "pv1"
kind = "pv"
unit_id = 1
rating_w = 10000
w_sf = 1
pct_sf = -1

[[devices]]
id = "meter1"
kind = "meter"
role = "pcc"
unit_id = 3
"""


def _site(name: str) -> Path:
    return Path(str(resources.files("hil") / "sites" / name))


def _failures(result: ScenarioResult, out: io.StringIO) -> str:
    failed = "\n".join(f"{c.name}: {c.detail}" for c in result.checks if not c.passed)
    return f"failed checks:\n{failed}\nfigures: {result.figures}\n--- output ---\n{out.getvalue()}"


async def _scenario(
    name: str, workdir: Path, site_file: Path | None = None
) -> tuple[ScenarioResult, io.StringIO]:
    out = io.StringIO()
    return await run_scenario(name, workdir=workdir, site_file=site_file, out=out), out


async def _run(name: str, workdir: Path, site_file: Path | None = None) -> ScenarioResult:
    result, out = await _scenario(name, workdir, site_file)
    assert result.passed, _failures(result, out)
    return result


def test_the_control_scenarios_are_registered() -> None:
    for name in ("export-step", "soc-floor", "overlapping-programs", "randomized-start"):
        assert name in SCENARIOS


# The 1 s "back under the limit" requirement is the scenario's own check (`dergw hil scenario
# export-step --check` on the site's hardware; 0.43-0.52 s measured, docs/benchmarks.md). Inside
# the suite, three workers share two cores, so the tests judge that timing against a bound that
# catches a broken loop (seconds over the limit), not the scheduler: DEVELOPERS.md, timing targets
# are measured, not asserted on shared machines. Every other check must pass as is.
SUITE_BACK_UNDER_S = 3.0


async def _run_export_step(workdir: Path, site_file: Path | None = None) -> None:
    result, out = await _scenario("export-step", workdir, site_file)
    timing = [c for c in result.checks if "back under the limit within" in c.name]
    others = [c for c in result.checks if c not in timing]
    assert timing, "the scenario no longer judges the time back under the limit"
    assert others, _failures(result, out)
    assert all(c.passed for c in others), _failures(result, out)
    for key in ("pv_back_under_s", "load_back_under_s"):
        value = result.figures[key]
        assert value <= SUITE_BACK_UNDER_S, f"{key} = {value:.2f} s\n{_failures(result, out)}"


async def test_export_step_holds_the_limit_through_pv_and_load_steps(tmp_path: Path) -> None:
    # The demo site soaks surplus into its battery: PV must not outrun the battery's ramp
    # (the kernel once let it, and export stayed ~1.8 s over the limit after the PV step).
    await _run_export_step(tmp_path)


async def test_export_step_on_a_pv_only_site(tmp_path: Path) -> None:
    site = tmp_path / "pv-only.toml"
    site.write_text(PV_ONLY_SITE)
    await _run_export_step(tmp_path / "run", site)


async def test_soc_floor_blocks_discharge_until_above_the_hysteresis_band(tmp_path: Path) -> None:
    await _run("soc-floor", tmp_path)


async def test_soc_floor_on_the_twelve_device_site(tmp_path: Path) -> None:
    await _run("soc-floor", tmp_path, _site("twelve.toml"))


async def test_soc_floor_says_it_needs_a_battery(tmp_path: Path) -> None:
    site = tmp_path / "pv-only.toml"
    site.write_text(PV_ONLY_SITE)
    result, _ = await _scenario("soc-floor", tmp_path / "run", site)
    assert not result.passed
    assert [c.name for c in result.checks] == ["this scenario needs a battery"]


async def test_overlapping_programs_resolve_per_mode_with_responses(tmp_path: Path) -> None:
    await _run("overlapping-programs", tmp_path)


async def test_overlapping_programs_on_the_7xx_site(tmp_path: Path) -> None:
    await _run("overlapping-programs", tmp_path, _site("pv7xx.toml"))


async def test_randomized_start_spreads_1000_events_reproducibly(tmp_path: Path) -> None:
    result = await _run("randomized-start", tmp_path)
    assert result.figures["events"] == 1000
    assert result.figures["same_id_equal"] == 1000
    assert result.figures["other_id_differ"] >= 990

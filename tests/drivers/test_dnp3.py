"""DNP3 driver against the 1815.2 plant simulator: control modes, reversion, child isolation."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from drivers.contract import Control, LinkState, Quality
from drivers.dnp3 import points as P
from drivers.dnp3.backend_dnp3py import _statuses
from drivers.dnp3.driver import Dnp3Driver
from tests.drivers.dnp3_support import BACKENDS, PYDNP3_WHY, RATING_W, backend_param, plant
from tests.drivers.setpoints import pv_setpoint
from tests.support import require_module

pytestmark = pytest.mark.hil

ALL = [backend_param(b) for b in BACKENDS]


async def _settle(
    driver: Dnp3Driver, name: str, want: float, tol: float, within_s: float = 5.0
) -> float:
    deadline = time.monotonic() + within_s
    while True:
        r = await driver.read()
        v = r.get(name)
        if v is not None and abs(v - want) <= tol:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} = {v}, wanted {want} ± {tol}")
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("mode", ["select_before_operate", "direct"])
async def test_cap_lands_and_limits_the_plant(backend: str, mode: str) -> None:
    async with plant(backend, control_mode=mode) as (_sim, driver):
        info = await driver.connect()
        assert info.nameplate.max_w == RATING_W
        assert info.controls == {Control.GENERATION_CAP, Control.CONNECT}
        assert {"W", "Hz", "WMaxLimPct", "WMaxLimEna", "Conn"} <= set(info.schema.names)
        before = await driver.read()
        assert (before.get("W") or 0) > 3_000_000  # 900 W/m² on a 5 MW plant
        result = await driver.write(pv_setpoint("plant1", 2_000_000.0, max_w=RATING_W))
        assert result.ok, result.reason
        assert result.readback == {"AI145": 60.0, "AI148": 400.0, "BI69": 1.0}
        await _settle(driver, "W", 2_000_000.0, 1.0)
        r = await driver.read()
        assert r.get("WMaxLimPct") == 40.0
        assert r.get("WMaxLimEna") == 1.0
        assert r.get("WMaxLimRvrtTms") == 60.0
        # Uncapped: the enable goes off, the plant returns to what the sun gives.
        result = await driver.write(pv_setpoint("plant1", None, max_w=RATING_W))
        assert result.ok, result.reason
        await _settle(driver, "WMaxLimEna", 0.0, 0.0)


@pytest.mark.parametrize("backend", ALL)
async def test_cap_is_floored_and_revert_cap_is_a_note(backend: str) -> None:
    async with plant(backend) as (_sim, driver):
        await driver.connect()
        sp = pv_setpoint("plant1", 1_234_567.0, max_w=RATING_W, revert_cap_w=3_000_000.0)
        result = await driver.write(sp)
        assert result.ok, result.reason
        assert result.readback["AI148"] == 246.0  # 24.69 % floored to 24.6 %
        assert result.reason
        assert "revert cap" in result.reason


@pytest.mark.parametrize("backend", ALL)
async def test_reversion_timeout_disables_the_limit(backend: str) -> None:
    async with plant(backend, control_mode="direct") as (_sim, driver):
        await driver.connect()
        sp = pv_setpoint("plant1", 1_000_000.0, max_w=RATING_W, revert_after_s=1)
        assert (await driver.write(sp)).ok
        await _settle(driver, "W", 1_000_000.0, 1.0)
        # Not refreshed: after 1 s the plant reverts to no limit on its own (1815.2 AO85).
        await _settle(driver, "WMaxLimEna", 0.0, 0.0, within_s=4.0)
        await _settle(driver, "W", 4_000_000.0, 600_000.0, within_s=4.0)


@pytest.mark.parametrize("backend", ALL)
async def test_disconnect_and_reconnect(backend: str) -> None:
    async with plant(backend) as (_sim, driver):
        await driver.connect()
        result = await driver.write(pv_setpoint("plant1", None, max_w=RATING_W, connect=False))
        assert result.ok, result.reason
        assert result.readback["BI23"] == 0.0
        await _settle(driver, "W", 0.0, 1.0)
        result = await driver.write(pv_setpoint("plant1", None, max_w=RATING_W, connect=True))
        assert result.ok, result.reason
        assert result.readback["BI23"] == 1.0


@pytest.mark.parametrize("backend", ALL)
async def test_killed_master_process_is_contained_and_restarted(backend: str) -> None:
    async with plant(backend, restart_backoff_s=0.3) as (sim, driver):
        await driver.connect()
        first = driver.backend_pid
        assert first is not None
        assert first != os.getpid()
        assert (await driver.read()).ok
        os.kill(first, signal.SIGKILL)  # a native crash of the backend
        await asyncio.sleep(0.1)
        bad = await driver.read()
        assert not bad.ok
        assert bad.error
        assert "exited" in bad.error
        assert (bad.quality == Quality.BAD_COMM).all()
        assert driver.health().state is LinkState.FAILED
        # Within the backoff no new child is started: still unavailable, fast.
        started = time.monotonic()
        again = await driver.read()
        assert not again.ok
        assert "restart in" in (again.error or "")
        assert time.monotonic() - started < 0.1
        await asyncio.sleep(0.35)
        good = await driver.read()
        assert good.ok, good.error
        assert driver.backend_pid not in (None, first)
        assert driver.restarts == 1
        assert driver.health().consecutive_failures == 0
        # The new child controls the plant as the old one did.
        assert (await driver.write(pv_setpoint("plant1", 2_500_000.0, max_w=RATING_W))).ok
        assert sim.physics.pv_wmaxlim_pct[0] == 50.0


@pytest.mark.parametrize("backend", ALL)
async def test_unreachable_outstation_is_a_driver_error(backend: str) -> None:
    from drivers.contract import DriverError

    async with plant(backend, port=1) as (_sim, driver):
        with pytest.raises(DriverError, match="not reachable"):
            await driver.connect()
        r = await driver.read()
        assert not r.ok


def test_point_map_is_1815_2() -> None:
    idx = {p.name: (p.kind, p.index) for p in P.PV_POINTS}
    assert idx["W"] == (P.Kind.AI, 537)
    assert idx["Hz"] == (P.Kind.AI, 536)
    assert idx["WMaxLimPct"] == (P.Kind.AI, 148)
    assert idx["WMaxLimEna"] == (P.Kind.BI, 69)
    assert (P.AO.WLIM_MAX_PCT, P.AO.WLIM_RVRT_S, P.BO.WLIM_ENABLE) == (87, 85, 17)


def test_control_status_decoding() -> None:
    from dnp3.application.fragment import ObjectBlock
    from dnp3.application.qualifiers import ObjectHeader

    ao = ObjectBlock(ObjectHeader(41, 1, 0x17), bytes.fromhex("02553c0000000057f401000000"))
    crob = ObjectBlock(ObjectHeader(12, 1, 0x17), bytes.fromhex("0111030100000000000000000c"))
    assert _statuses([ao, crob]) == [0, 0, 12]


def test_pydnp3_command_status_and_completion_mapping() -> None:
    require_module("pydnp3", PYDNP3_WHY)
    from drivers.dnp3 import backend_pydnp3 as B

    assert B._status(5, 0) == 0  # SUCCESS: the device's own status octet
    assert B._status(3, 12) == 12  # SELECT_FAIL with OUT_OF_RANGE
    assert B._status(1, 0) == 0  # selected, then the set was not operated: not a refusal
    assert B._status(0, 0) == 1  # INIT: never answered -> TIMEOUT
    assert B._status(2, 0) == 127  # SELECT_MISMATCH -> UNDEFINED
    assert B._completion(2).link  # FAILURE_RESPONSE_TIMEOUT: no answer
    assert not B._completion(1).link
    assert "malformed" in str(B._completion(4))


@pytest.mark.parametrize("backend", ALL)
async def test_event_polls_after_the_outstation_restarts_report_every_point(backend: str) -> None:
    # poll = "events" with a long integrity interval: after a reconnection the master must still
    # report every point (pydnp3: the first poll on a new connection is an integrity poll).
    async with plant(backend, poll="events", integrity_interval_s=3600.0) as (sim, driver):
        await driver.connect()
        first = await driver.read()
        assert first.get("W") is not None
        await sim.restart()
        deadline = time.monotonic() + 10.0
        r = await driver.read()
        while not r.ok and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            r = await driver.read()
        assert r.ok, r.error
        assert r.get("W") is not None
        assert r.get("WMax") == RATING_W

"""7xx PV inverters, injected site conditions and inverter trips, on real sockets.

Checked with pysunspec2 (an independent SunSpec client) and pymodbus: what a client reads is
what the physics does.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sunspec2.modbus.client import SunSpecModbusClientDeviceTCP

from hil.server import SimulatorError, SiteSimulator
from tests.support import async_wait_until

from .conftest import PV7, QUIET_SITE, site_spec

pytestmark = pytest.mark.hil


@pytest.fixture
async def sim() -> AsyncIterator[SiteSimulator]:
    simulator = SiteSimulator(site_spec(devices=[*QUIET_SITE["devices"], PV7]))
    await simulator.start()
    try:
        yield simulator
    finally:
        await simulator.stop()


async def _scan(sim: SiteSimulator, device_id: str) -> SunSpecModbusClientDeviceTCP:
    ep = sim.endpoints[device_id]

    def scan() -> SunSpecModbusClientDeviceTCP:
        device = SunSpecModbusClientDeviceTCP(
            slave_id=ep.unit_id, ipaddr=ep.host, ipport=ep.port, timeout=2
        )
        device.scan()
        return device

    return await asyncio.to_thread(scan)


async def _read(model: Any, name: str) -> Any:
    await asyncio.to_thread(model.read)
    return getattr(model, name).cvalue


async def _steps(sim: SiteSimulator, n: int = 2) -> None:
    start = sim.state().steps
    await async_wait_until(lambda: sim.state().steps >= start + n, timeout_s=5, what="steps")


async def test_pysunspec2_scans_a_7xx_inverter_and_reads_the_physics(sim: SiteSimulator) -> None:
    pv7 = await _scan(sim, "pv7")
    try:
        assert sorted(k for k in pv7.models if isinstance(k, int)) == [1, 701, 702, 704]
        m701, m702, m704 = (pv7.models[m][0] for m in (701, 702, 704))
        assert pv7.models[1][0].SN.cvalue == "pv7"
        assert m701.W.cvalue == pytest.approx(5100.0)  # 850 W/m² on 6 kW
        assert m701.Hz.cvalue == pytest.approx(50.0)
        assert (m701.InvSt.value, m701.ConnSt.value, m701.Alrm.value) == (3, 1, 0)  # RUNNING
        assert m701.TotWhInj.cvalue > 0
        assert (m702.WMaxRtg.cvalue, m702.WMax.cvalue) == (6000.0, 6000.0)
        assert (m704.WMaxLimPctEna.value, m704.WMaxLimPct.cvalue) == (0, 100.0)
        assert (m704.WMaxLimPctRvrt.cvalue, m704.WMaxLimPctEnaRvrt.value) == (100.0, 0)
        assert m704.WMaxLimPctRvrtRem.value == 0
        assert m704.AntiIslEna.value == 1
    finally:
        pv7.close()


async def test_704_limit_reverts_to_the_reversion_values(sim: SiteSimulator) -> None:
    pv7 = await _scan(sim, "pv7")
    try:
        m701, m704 = pv7.models[701][0], pv7.models[704][0]
        m704.WMaxLimPctEna.value = 1
        m704.WMaxLimPct.cvalue = 20
        m704.WMaxLimPctRvrt.cvalue = 50
        m704.WMaxLimPctEnaRvrt.value = 1
        m704.WMaxLimPctRvrtTms.value = 2
        await asyncio.to_thread(m704.write)
        await async_wait_until(
            lambda: sim.state().devices["pv7"].ac_w == pytest.approx(1200.0),
            timeout_s=5,
            what="pv7 at 20 % of 6 kW",
        )
        state = sim.state().devices["pv7"]
        assert (state.wmaxlim_pct, state.wmaxlim_ena) == (20.0, 1)
        assert (state.wmaxlim_pct_rvrt, state.wmaxlim_ena_rvrt) == (50.0, 1)
        assert state.wmaxlim_rvrt_rem_s is not None
        assert 0 < state.wmaxlim_rvrt_rem_s <= 2.0
        assert await _read(m701, "ThrotSrc") == 1  # MAX_W

        # Nothing is written again: the device applies WMaxLimPctRvrt / WMaxLimPctEnaRvrt.
        async def reverted() -> bool:
            return await _read(m704, "WMaxLimPct") == pytest.approx(50.0)

        await async_wait_until(reverted, timeout_s=5, what="WMaxLimPct reverted to 50 %")
        assert m704.WMaxLimPctEna.value == 1
        assert m704.WMaxLimPctRvrtRem.value == 0
        await async_wait_until(
            lambda: sim.state().devices["pv7"].ac_w == pytest.approx(3000.0),
            timeout_s=5,
            what="pv7 at the 50 % reversion cap",
        )
    finally:
        pv7.close()


async def test_grid_frequency_reaches_the_meter_and_inverters_which_droop(
    sim: SiteSimulator,
) -> None:
    sim.set_grid_frequency(50.5)
    await _steps(sim)
    state = sim.state()
    assert state.grid_hz == 50.5
    assert state.grid_hz_override == 50.5
    assert sim.read_point("meter1", "203.Hz") == pytest.approx(50.5)
    assert sim.read_point("pv1", "103.Hz") == pytest.approx(50.5)
    assert sim.read_point("pv7", "701.Hz") == pytest.approx(50.5)
    # 5 % droop beyond 0.036 Hz: -(0.464 / 2.5) = -18.56 % of each rating.
    assert state.devices["pv1"].droop_w == pytest.approx(-1856.0)
    assert state.devices["pv1"].ac_w == pytest.approx(8500.0 - 1856.0)
    assert state.devices["pv7"].ac_w == pytest.approx(5100.0 - 0.1856 * 6000.0)
    assert state.devices["bat1"].ac_w == pytest.approx(-0.1856 * 5000.0)  # charging
    assert sim.read_point("pv7", "701.ThrotSrc") == 1 << 5  # FREQ_WATT
    assert sim.read_point("pv1", "103.St") == 5  # THROTTLED
    sim.set_grid_frequency(None)
    await _steps(sim)
    state = sim.state()
    assert (state.grid_hz, state.grid_hz_override) == (50.0, None)  # quiet site: no noise
    assert state.devices["pv1"].ac_w == pytest.approx(8500.0)
    with pytest.raises(SimulatorError, match="frequency"):
        sim.set_grid_frequency(-50.0)


async def test_irradiance_and_load_steps_show_at_the_meter(sim: SiteSimulator) -> None:
    sim.set_irradiance_override(200.0)
    sim.set_load_override(9000.0)
    await _steps(sim)
    state = sim.state()
    assert (state.irradiance_w_m2, state.irradiance_override, state.load_override) == (
        200.0,
        200.0,
        9000.0,
    )
    assert state.pv_w == pytest.approx(2000.0 + 1200.0)
    assert sim.read_point("meter1", "203.W") == pytest.approx(9000.0 - 3200.0)
    sim.set_irradiance_override(None)
    sim.set_load_override(None)
    await _steps(sim, 40)  # PV ramps back up at 100 %/s
    assert sim.read_point("meter1", "203.W") == pytest.approx(3000.0 - 8500.0 - 5100.0)


async def test_set_soc_is_served_with_the_bms_limits(sim: SiteSimulator) -> None:
    sim.set_soc("bat1", 7.5)
    assert sim.state().devices["bat1"].soc_pct == 7.5
    await _steps(sim)
    assert sim.read_point("bat1", "802.SoC") == pytest.approx(7.5)
    assert sim.read_point("bat1", "802.WDisChaRteMax") == pytest.approx(1250.0)  # taper
    assert sim.read_point("bat1", "124.ChaState") == pytest.approx(7.5)
    with pytest.raises(SimulatorError, match="batteries"):
        sim.set_soc("pv1", 50.0)


async def test_a_trip_serves_fault_state_and_alarm_bits_then_clears(sim: SiteSimulator) -> None:
    sim.set_device_fault("pv1", True)
    sim.set_device_fault("pv7", True, alarm="OVER_TEMP")
    sim.set_device_fault("bat1", True, alarm="AC_OVER_VOLT")
    await _steps(sim)
    state = sim.state().devices
    assert (state["pv1"].tripped, state["pv1"].trip_alarm, state["pv1"].ac_w) == (
        True,
        "GROUND_FAULT",
        0.0,
    )
    assert (state["pv7"].tripped, state["pv7"].ac_w) == (True, 0.0)
    assert sim.read_point("pv1", "103.St") == 7  # FAULT
    assert sim.read_point("pv1", "103.Evt1") == 1 << 0  # GROUND_FAULT
    assert sim.read_point("pv7", "701.InvSt") == 6  # FAULT
    assert sim.read_point("pv7", "701.Alrm") == 1 << 7  # OVER_TEMP
    assert sim.read_point("pv7", "701.ConnSt") == 0
    assert sim.read_point("bat1", "103.St") == 7
    assert sim.read_point("bat1", "103.Evt1") == 1 << 10
    assert sim.read_point("meter1", "203.W") == pytest.approx(3000.0)  # nothing generates

    for device_id in ("pv1", "pv7", "bat1"):
        sim.set_device_fault(device_id, False)
    await async_wait_until(
        lambda: sim.state().devices["pv1"].ac_w == pytest.approx(8500.0),
        timeout_s=5,
        what="pv1 back at full output",
    )
    await _steps(sim)
    assert sim.read_point("pv1", "103.St") == 4  # MPPT
    assert sim.read_point("pv1", "103.Evt1") == 0
    assert sim.read_point("pv7", "701.InvSt") == 3  # RUNNING
    assert sim.read_point("pv7", "701.Alrm") == 0
    assert sim.state().devices["pv1"].trip_alarm is None

    with pytest.raises(SimulatorError, match="meter"):
        sim.set_device_fault("meter1", True)
    with pytest.raises(SimulatorError, match=r"unknown 103\.Evt1 alarm"):
        sim.set_device_fault("pv1", True, alarm="SMOKE")

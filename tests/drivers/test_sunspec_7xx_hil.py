"""The SunSpec driver against the HIL simulator: 7xx PV, 704 reversion, trips and grid conditions.

The simulator (hil/) shares no code with drivers/: a 704 write that the simulator's physics turns
into output, and a trip or frequency the simulator injects that the driver reports, are two
independent SunSpec implementations agreeing over real sockets.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest

from drivers.contract import Control, DeviceKind, Quality, Reading
from drivers.sunspec.driver import SunSpecModbusDriver, SunSpecModbusParams
from drivers.sunspec.status import device_fault
from gateway.clock import SystemClock
from hil.server import SiteSimulator
from hil.site import parse_site
from tests.drivers.setpoints import pv_setpoint
from tests.support import async_wait_until

pytestmark = pytest.mark.hil

SITE = """
name = "drivers-7xx"
seed = 3
physics_hz = 20
host = "127.0.0.1"
port = 0

[grid]
hz_noise = 0.0
v_noise = 0.0

[profiles]
irradiance = [[0, 850]]
load = [[0, 3000]]
irradiance_noise_pct = 0.0
load_noise_pct = 0.0

[[devices]]
id = "pv7"
kind = "pv"
family = "7xx"
unit_id = 1
rating_w = 10000
ramp_pct_per_s = 200
w_sf = 1
pct_sf = -1

[[devices]]
id = "pv1"
kind = "pv"
unit_id = 2
rating_w = 6000
ramp_pct_per_s = 200

[[devices]]
id = "bat1"
kind = "battery"
unit_id = 3
rating_w = 5000
capacity_wh = 10000
soc_pct = 50
pct_sf = -2

[[devices]]
id = "meter1"
kind = "meter"
role = "pcc"
unit_id = 4
"""

KINDS = {
    "pv7": DeviceKind.PV,
    "pv1": DeviceKind.PV,
    "bat1": DeviceKind.BATTERY,
    "meter1": DeviceKind.METER,
}


@pytest.fixture
async def sim() -> AsyncIterator[SiteSimulator]:
    simulator = SiteSimulator(parse_site(SITE))
    await simulator.start()
    yield simulator
    await simulator.stop()


@pytest.fixture
async def drivers(sim: SiteSimulator) -> AsyncIterator[dict[str, SunSpecModbusDriver]]:
    out: dict[str, SunSpecModbusDriver] = {}
    for device_id, kind in KINDS.items():
        ep = sim.endpoints[device_id]
        params = SunSpecModbusParams(host=ep.host, port=ep.port, unit_id=ep.unit_id, timeout_s=0.5)
        out[device_id] = SunSpecModbusDriver(device_id, kind, params, SystemClock())
        await out[device_id].connect()
    yield out
    for drv in out.values():
        await drv.close()


def good(reading: Reading, name: str) -> float:
    value = reading.get(name)
    assert value is not None, f"{reading.device_id}.{name} is not GOOD"
    return value


async def read_until(
    drv: SunSpecModbusDriver, check: Callable[[Reading], bool], what: str
) -> Reading:
    """Read until `check(reading)` holds (the physics applies injections at its next step)."""
    last: list[Reading] = []

    async def ok() -> bool:
        last[:] = [await drv.read()]
        return check(last[0])

    await async_wait_until(ok, timeout_s=5.0, interval_s=0.05, what=what)
    return last[0]


async def test_discovers_a_7xx_pv_inverter(
    sim: SiteSimulator, drivers: dict[str, SunSpecModbusDriver]
) -> None:
    drv = drivers["pv7"]
    info = await drv.connect()
    assert [m.model_id for m in drv.models] == [1, 701, 702, 704]
    assert info.serial_number == "pv7"
    assert info.nameplate.max_w == 10_000.0  # 702 WMax
    assert info.controls == {Control.GENERATION_CAP}
    assert {"WMaxLimPct", "WMaxLimEna", "WMaxLimPctRvrt", "WMaxLimEnaRvrt"} <= info.schema.writable
    reading = await drv.read()
    assert reading.ok
    assert (reading.quality == Quality.GOOD).all(), dict(
        zip(reading.schema.names, reading.quality.tolist(), strict=True)
    )
    assert good(reading, "W") == pytest.approx(sim.state().devices["pv7"].ac_w, abs=10.0)
    assert good(reading, "St") == 4.0  # 701 InvSt RUNNING (3) on the 103 scale: MPPT
    assert (good(reading, "Evt1"), good(reading, "ThrotSrc")) == (0.0, 0.0)
    assert (good(reading, "WMaxLimPctRvrt"), good(reading, "WMaxLimEnaRvrt")) == (100.0, 0.0)
    assert good(reading, "Hz") == pytest.approx(50.0)
    assert reading.fault is None


async def test_704_cap_reads_back_and_reverts_to_the_revert_cap(
    sim: SiteSimulator, drivers: dict[str, SunSpecModbusDriver]
) -> None:
    drv = drivers["pv7"]
    result = await drv.write(
        pv_setpoint("pv7", cap_w=3000.0, revert_cap_w=1800.0, revert_after_s=2)
    )
    assert result.ok, result.reason
    assert result.readback["704.WMaxLimPct"] == 30.0
    assert result.readback["704.WMaxLimPctRvrt"] == 18.0
    assert result.readback["704.WMaxLimPctEnaRvrt"] == 1.0
    assert result.readback["704.WMaxLimPctRvrtTms"] == 2.0
    await async_wait_until(
        lambda: sim.state().devices["pv7"].ac_w == pytest.approx(3000.0),
        timeout_s=3.0,
        what="pv7 at its 3 kW cap",
    )
    reading = await drv.read()
    assert (good(reading, "WMaxLimPct"), good(reading, "WMaxLimEna")) == (30.0, 1.0)
    assert good(reading, "ThrotSrc") == 1.0  # MAX_W

    # The gateway goes quiet: after WMaxLimPctRvrtTms the simulator applies the reversion
    # values (18 %, enabled), not 100 %.
    reverted = await read_until(
        drv, lambda r: r.get("WMaxLimPct") == 18.0, "WMaxLimPct reverted to 18 %"
    )
    assert good(reverted, "WMaxLimEna") == 1.0
    await async_wait_until(
        lambda: sim.state().devices["pv7"].ac_w == pytest.approx(1800.0),
        timeout_s=3.0,
        what="pv7 at the 1.8 kW revert cap",
    )
    state = sim.state().devices["pv7"]
    assert (state.wmaxlim_pct, state.wmaxlim_ena, state.wmaxlim_rvrt_rem_s) == (18.0, 1, 0.0)


async def test_injected_trips_are_reported_as_device_faults(
    sim: SiteSimulator, drivers: dict[str, SunSpecModbusDriver]
) -> None:
    sim.set_device_fault("pv7", True, alarm="OVER_TEMP")
    sim.set_device_fault("pv1", True)  # GROUND_FAULT
    sim.set_device_fault("bat1", True, alarm="AC_UNDER_VOLT")
    pv7 = await read_until(drivers["pv7"], lambda r: r.fault is not None, "pv7 fault")
    assert pv7.fault == "St=FAULT, Evt1: OVER_TEMP"
    assert device_fault(pv7) == pv7.fault  # the same judgement on any Reading
    assert good(pv7, "W") == 0.0
    assert good(pv7, "Conn") == 0.0  # 701 ConnSt
    pv1 = await read_until(drivers["pv1"], lambda r: r.fault is not None, "pv1 fault")
    assert pv1.fault == "St=FAULT, Evt1: GROUND_FAULT"
    bat = await read_until(drivers["bat1"], lambda r: r.fault is not None, "bat1 fault")
    assert bat.fault == "St=FAULT, Evt1: AC_UNDER_VOLT"
    assert (await drivers["meter1"].read()).fault is None

    for device_id in ("pv7", "pv1", "bat1"):
        sim.set_device_fault(device_id, False)
        cleared = await read_until(
            drivers[device_id], lambda r: r.fault is None, f"{device_id} cleared"
        )
        assert good(cleared, "Evt1") == 0.0


async def test_grid_frequency_reaches_every_reading_and_pv_droops(
    sim: SiteSimulator, drivers: dict[str, SunSpecModbusDriver]
) -> None:
    sim.set_grid_frequency(50.25)
    meter = await read_until(drivers["meter1"], lambda r: r.get("Hz") == 50.25, "meter Hz")
    assert good(meter, "Hz") == 50.25
    pv7 = await read_until(drivers["pv7"], lambda r: r.get("Hz") == 50.25, "pv7 Hz")
    # 5 % droop, 0.214 Hz beyond the 0.036 Hz band: -8.56 % of 10 kW, FREQ_WATT throttling.
    assert good(pv7, "W") == pytest.approx(8500.0 - 856.0, abs=10.0)
    assert good(pv7, "ThrotSrc") == float(1 << 5)
    assert pv7.fault is None  # responding to frequency is not a fault
    pv1 = await drivers["pv1"].read()
    assert good(pv1, "Hz") == 50.25
    sim.set_grid_frequency(None)
    await read_until(drivers["meter1"], lambda r: r.get("Hz") == 50.0, "meter back at 50 Hz")


async def test_soc_injection_shows_with_the_bms_limits(
    sim: SiteSimulator, drivers: dict[str, SunSpecModbusDriver]
) -> None:
    sim.set_soc("bat1", 8.0)
    bat = await read_until(drivers["bat1"], lambda r: r.get("SoC") == 8.0, "SoC 8 %")
    # 3 % above SoCMin inside a 10 % taper band: 30 % of the 5 kW discharge limit.
    assert good(bat, "WDisChaRteMax") == pytest.approx(1500.0)
    assert good(bat, "WChaRteMax") == 5000.0

"""The SunSpec driver against the HIL simulator (hil/, the independent peer) on loopback.

The simulator shares no code with drivers/ (only pysunspec2's JSON): agreement here means two
implementations of SunSpec read the same registers the same way, and that writes move physics.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import numpy as np
import pytest

from drivers.contract import Control, DeviceKind, LinkState, Quality, Reading
from drivers.sunspec.driver import MAX_READ_REGISTERS, SunSpecModbusDriver, SunSpecModbusParams
from drivers.sunspec.models import get_layout
from gateway.clock import SystemClock
from hil.server import Fault, SiteSimulator
from hil.site import parse_site
from tests.drivers.setpoints import battery_setpoint, pv_setpoint
from tests.support import async_wait_until

pytestmark = pytest.mark.hil

SITE = """
name = "drivers-test"
seed = 7
physics_hz = 20
host = "127.0.0.1"
port = 0

[profiles]
irradiance = [[0, 850]]
load = [[0, 3000]]
irradiance_noise_pct = 0.5
load_noise_pct = 0.5

[[devices]]
id = "pv1"
kind = "pv"
unit_id = 1
rating_w = 10000
ramp_pct_per_s = 200
w_sf = 1
pct_sf = -1

[[devices]]
id = "pv2"
kind = "pv"
unit_id = 2
rating_w = 6000
ramp_pct_per_s = 200
base_address = 50000
pct_sf = -2

[[devices]]
id = "bat1"
kind = "battery"
unit_id = 3
rating_w = 5000
capacity_wh = 10000
soc_pct = 50
soc_min_pct = 5
soc_max_pct = 95
ramp_pct_per_s = 200
pct_sf = -2

[[devices]]
id = "meter1"
kind = "meter"
role = "pcc"
unit_id = 4
"""

KINDS = {
    "pv1": DeviceKind.PV,
    "pv2": DeviceKind.PV,
    "bat1": DeviceKind.BATTERY,
    "meter1": DeviceKind.METER,
}


@pytest.fixture
async def sim() -> AsyncIterator[SiteSimulator]:
    simulator = SiteSimulator(parse_site(SITE), seed=7)
    await simulator.start()
    yield simulator
    await simulator.stop()


def driver_for(sim: SiteSimulator, device_id: str, **params: object) -> SunSpecModbusDriver:
    ep = sim.endpoints[device_id]
    p = SunSpecModbusParams.model_validate(
        {"host": ep.host, "port": ep.port, "unit_id": ep.unit_id, "timeout_s": 0.3, **params}
    )
    return SunSpecModbusDriver(device_id, KINDS[device_id], p, SystemClock())


@pytest.fixture
async def drivers(sim: SiteSimulator) -> AsyncIterator[dict[str, SunSpecModbusDriver]]:
    out = {d: driver_for(sim, d) for d in KINDS}
    for drv in out.values():
        await drv.connect()
    yield out
    for drv in out.values():
        await drv.close()


def good(reading: Reading, name: str) -> float:
    value = reading.get(name)
    assert value is not None, f"{reading.device_id}.{name} is not GOOD"
    return value


async def test_discovers_pv_battery_and_meter(sim: SiteSimulator) -> None:
    for device_id, kind in KINDS.items():
        drv = driver_for(sim, device_id)
        info = await drv.connect()
        try:
            assert info.kind is kind
            assert info.serial_number == device_id  # the simulator serves its id as 1.SN
            assert info.manufacturer == "dergw-sim"
            plan = drv.read_plan
            assert plan is not None
            assert all(r.count <= MAX_READ_REGISTERS for r in plan.requests)
            reading = await drv.read()
            assert reading.ok
            assert (reading.quality == Quality.GOOD).all(), dict(
                zip(reading.schema.names, reading.quality.tolist(), strict=True)
            )
        finally:
            await drv.close()
    pv2 = driver_for(sim, "pv2")
    await pv2.connect()
    assert pv2.base_address == 50000
    await pv2.close()


async def test_nameplates(drivers: dict[str, SunSpecModbusDriver]) -> None:
    pv = await drivers["pv1"].connect()
    assert pv.nameplate.max_w == 10000.0
    bat = await drivers["bat1"].connect()
    assert bat.nameplate.max_w == 5000.0
    assert bat.nameplate.max_charge_w == 5000.0
    assert bat.nameplate.max_discharge_w == 5000.0
    assert bat.nameplate.energy_wh == 10000.0
    assert "SoC" in bat.schema.names
    assert "WMaxLimPct" not in bat.schema.names  # the simulated battery has no model 123


async def test_controls_follow_the_discovered_models(
    drivers: dict[str, SunSpecModbusDriver],
) -> None:
    # What the safety kernel may command: 123 gives a cap and connect, 124 fixed power.
    pv = await drivers["pv1"].connect()
    assert pv.controls == {Control.GENERATION_CAP, Control.CONNECT}
    bat = await drivers["bat1"].connect()
    assert bat.controls == {Control.ACTIVE_POWER}
    meter = await drivers["meter1"].connect()
    assert meter.controls == frozenset()


async def test_values_match_the_simulators_physics(
    sim: SiteSimulator, drivers: dict[str, SunSpecModbusDriver]
) -> None:
    start = sim.state().steps
    await async_wait_until(lambda: sim.state().steps >= start + 5, timeout_s=5, what="5 steps")
    readings = {d: await drv.read() for d, drv in drivers.items()}
    state = sim.state()
    # The physics steps at 20 Hz between our reads and the snapshot: compare within a step's drift
    # plus the register resolution (pv1 serves W in tens of watts).
    assert good(readings["pv1"], "W") == pytest.approx(state.devices["pv1"].ac_w, abs=150.0)
    assert good(readings["pv2"], "W") == pytest.approx(state.devices["pv2"].ac_w, abs=100.0)
    assert good(readings["bat1"], "W") == pytest.approx(state.devices["bat1"].ac_w, abs=100.0)
    assert good(readings["bat1"], "SoC") == pytest.approx(state.devices["bat1"].soc_pct, abs=0.2)
    assert good(readings["meter1"], "W") == pytest.approx(state.meter_w, abs=300.0)
    for device_id in ("pv1", "meter1"):
        assert good(readings[device_id], "Hz") == pytest.approx(state.grid_hz, abs=0.05)
    # The meter's sign convention (+ import) matches the physics: PV 8.5 kW > 3 kW load = export.
    assert good(readings["meter1"], "W") < 0
    # Exact register agreement with the simulator's own decoder for static points.
    assert good(readings["pv1"], "WRtg") == sim.read_point("pv1", "120.WRtg")
    assert good(readings["pv2"], "WMaxLimPct") == sim.read_point("pv2", "123.WMaxLimPct")


async def test_pv_cap_write_reads_back_and_moves_physics(
    sim: SiteSimulator, drivers: dict[str, SunSpecModbusDriver]
) -> None:
    result = await drivers["pv1"].write(pv_setpoint("pv1", cap_w=3000.0, revert_after_s=60))
    assert result.ok, result.reason
    assert sim.read_point("pv1", "123.WMaxLimPct") == 30.0
    assert sim.read_point("pv1", "123.WMaxLim_Ena") == 1
    assert sim.read_point("pv1", "123.WMaxLimPct_RvrtTms") == 60

    await async_wait_until(
        lambda: sim.state().devices["pv1"].ac_w <= 3000.0 + 1.0,
        timeout_s=3.0,
        what="pv1 output to fall to its 3 kW cap",
    )
    reading = await drivers["pv1"].read()
    assert good(reading, "WMaxLimPct") == 30.0
    assert good(reading, "WMaxLimEna") == 1.0
    assert good(reading, "W") <= 3000.0 + 10.0

    released = await drivers["pv1"].write(pv_setpoint("pv1", cap_w=None))
    assert released.ok
    assert sim.read_point("pv1", "123.WMaxLim_Ena") == 0
    await async_wait_until(
        lambda: sim.state().devices["pv1"].ac_w > 5000.0, timeout_s=3.0, what="pv1 uncapped"
    )


async def test_battery_write_reads_back_and_moves_physics(
    sim: SiteSimulator, drivers: dict[str, SunSpecModbusDriver]
) -> None:
    bat = drivers["bat1"]
    charge = await bat.write(battery_setpoint("bat1", active_w=-2000.0))
    assert charge.ok, charge.reason
    assert sim.read_point("bat1", "124.StorCtl_Mod") == 1
    assert sim.read_point("bat1", "124.InWRte") == 40.0  # 2000 W of WChaMax 5000 W
    await async_wait_until(
        lambda: abs(sim.state().devices["bat1"].ac_w + 2000.0) < 20.0,
        timeout_s=3.0,
        what="battery charging at 2 kW",
    )
    soc0 = sim.state().devices["bat1"].soc_pct
    assert soc0 is not None

    discharge = await bat.write(battery_setpoint("bat1", active_w=1500.0))
    assert discharge.ok, discharge.reason
    assert sim.read_point("bat1", "124.StorCtl_Mod") == 2
    assert sim.read_point("bat1", "124.OutWRte") == 30.0
    await async_wait_until(
        lambda: abs(sim.state().devices["bat1"].ac_w - 1500.0) < 20.0,
        timeout_s=3.0,
        what="battery discharging at 1.5 kW",
    )
    reading = await bat.read()
    assert good(reading, "W") == pytest.approx(1500.0, abs=20.0)
    assert good(reading, "StorCtlMod") == 2.0
    assert good(reading, "OutWRte") == 30.0

    idle = await bat.write(battery_setpoint("bat1", active_w=None))
    assert idle.ok
    assert sim.read_point("bat1", "124.StorCtl_Mod") == 0


def control_registers(sim: SiteSimulator, device_id: str, model_id: int) -> dict[str, object]:
    layout = get_layout(model_id)
    return {
        p.name: sim.read_point(device_id, f"{model_id}.{p.name}")
        for p in layout.points
        if p.writable and "." not in p.name
    }


async def test_a_write_changes_only_its_device(
    sim: SiteSimulator, drivers: dict[str, SunSpecModbusDriver]
) -> None:
    before_pv2 = control_registers(sim, "pv2", 123)
    before_bat = control_registers(sim, "bat1", 124)
    before_pv1 = control_registers(sim, "pv1", 123)
    result = await drivers["pv1"].write(pv_setpoint("pv1", cap_w=2500.0, connect=True))
    assert result.ok, result.reason
    # A few physics steps (writes apply at the next step): nothing may leak to other devices.
    start = sim.state().steps
    await async_wait_until(lambda: sim.state().steps >= start + 2, timeout_s=5, what="2 steps")
    assert control_registers(sim, "pv2", 123) == before_pv2
    assert control_registers(sim, "bat1", 124) == before_bat
    after_pv1 = control_registers(sim, "pv1", 123)
    assert after_pv1 != before_pv1
    assert after_pv1["WMaxLimPct"] == 25.0
    state = sim.state()
    assert state.devices["pv2"].wmaxlim_ena == 0
    assert state.devices["bat1"].stor_ctl_mod == 0


@pytest.mark.parametrize("fault", [Fault.SILENT, Fault.EXCEPTION])
async def test_fault_gives_bad_comm_then_recovers(
    sim: SiteSimulator, drivers: dict[str, SunSpecModbusDriver], fault: Fault
) -> None:
    pv1 = drivers["pv1"]
    last_good = await pv1.read()
    assert last_good.ok
    sim.set_fault("pv1", fault)
    bad = await pv1.read()
    assert not bad.ok
    assert bad.error is not None
    assert np.isnan(bad.values).all()  # never the last good values
    assert (bad.quality == Quality.BAD_COMM).all()
    assert bad.wall_ns > last_good.wall_ns
    assert bad.mono_ns > last_good.mono_ns
    health = pv1.health()
    assert health.state is LinkState.FAILED
    assert health.consecutive_failures == 1
    assert health.total_failures == 1
    assert health.last_error == bad.error

    # Another device on the same server is unaffected.
    assert (await drivers["pv2"].read()).ok

    result = await pv1.write(pv_setpoint("pv1", cap_w=1000.0))
    assert not result.ok
    assert result.reason
    assert pv1.health().consecutive_failures == 2
    assert sim.read_point("pv1", "123.WMaxLim_Ena") == 0  # nothing landed

    sim.set_fault("pv1", None)
    recovered = await pv1.read()
    assert recovered.ok, recovered.error
    assert good(recovered, "W") > 0
    assert pv1.health().state is LinkState.CONNECTED
    assert pv1.health().consecutive_failures == 0
    assert pv1.health().total_failures == 2


async def test_throughput_one_device(sim: SiteSimulator) -> None:
    """Print (not assert) reads/s and points/s for one device over loopback."""
    lines = []
    for raw in (False, True):
        drv = driver_for(sim, "pv1", raw_points=raw)
        info = await drv.connect()
        plan = drv.read_plan
        assert plan is not None
        n = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 0.5:
            reading = await drv.read()
            assert reading.ok
            n += 1
        elapsed = time.perf_counter() - t0
        await drv.close()
        lines.append(
            f"raw_points={raw}: {n / elapsed:,.0f} reads/s x {len(info.schema)} points = "
            f"{n * len(info.schema) / elapsed:,.0f} points/s "
            f"({len(plan.requests)} requests, {plan.registers} registers per read)"
        )
    print("\nSunSpec driver, one PV inverter on loopback (simulator in the same process):")
    print("\n".join(lines))

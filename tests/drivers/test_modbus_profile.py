"""Device profiles as data and the generic Modbus driver that executes them.

Against: the SDM630-style meter simulator (non-SunSpec float32 input registers) over TCP and on
an RTU bus shared with a SunSpec inverter, and the HIL PV inverter read as a fixed map.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from drivers.contract import DeviceKind, DriverError, Quality
from drivers.modbus_profile.driver import ModbusProfileDriver, ModbusProfileParams
from drivers.modbus_profile.profile import (
    ProfileError,
    load_profile,
    parse_profile,
    shipped_profiles,
)
from drivers.registry import create_driver, params_model
from drivers.sunspec.driver import SunSpecModbusDriver, SunSpecModbusParams
from gateway.clock import SystemClock
from hil.meter_sim import Sdm630Meter
from hil.rtu_sim import RtuSiteSimulator
from hil.server import SiteSimulator
from hil.site import parse_site
from tests.drivers.setpoints import pv_setpoint
from tests.support import async_wait_until, require_binary

SITE = """
name = "profile-test"
seed = 5
physics_hz = 20
host = "127.0.0.1"
port = 0
[profiles]
irradiance = [[0, 850]]
load = [[0, 3000]]
[[devices]]
id = "pv1"
kind = "pv"
unit_id = 1
rating_w = 10000
ramp_pct_per_s = 200
[[devices]]
id = "meter1"
kind = "meter"
role = "pcc"
unit_id = 4
"""

GOOD = """
[profile]
name = "t"
kind = "meter"
[points.W]
table = "input"
address = 0
type = "float32"
unit = "W"
"""


def test_shipped_profiles_validate() -> None:
    names = {p.stem for p in shipped_profiles()}
    assert {"eastron-sdm630", "dergw-sim-pv", "dergw-sim-meter"} <= names
    for path in shipped_profiles():
        profile = load_profile(path)
        assert profile.points


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        (("float32", "float"), r"t\.toml: points\.W\.type: .*'int16'"),
        (("[points.W]", "[points.Watts]"), r"points\.Watts: not a canonical point name"),
        (('unit = "W"', 'unit = "kW"'), r"points\.W\.unit: 'kW', but canonical W is in 'W'"),
        (('table = "input"', 'table = "input"\nwritable = true'), r"points\.W: .*holding"),
        (('kind = "meter"', 'kind = "meter"\ncolour = 1'), r"profile\.colour: Extra inputs"),
        (("address = 0", "address = -1"), r"points\.W\.address: .*greater than or equal to 0"),
        (("[points.W]", "[points.W"), r"t\.toml: not valid TOML"),
    ],
)
def test_validation_errors_name_file_key_and_reason(patch: tuple[str, str], message: str) -> None:
    text = GOOD.replace(*patch)
    assert text != GOOD
    with pytest.raises(ProfileError, match=message):
        parse_profile(text, "t.toml")


def test_unknown_profile_lists_the_shipped_ones() -> None:
    with pytest.raises(ProfileError, match="eastron-sdm630"):
        load_profile("no-such-profile")


def test_registry_builds_a_profile_driver() -> None:
    model = params_model("modbus-profile")
    params = model.model_validate({"profile": "eastron-sdm630", "host": "127.0.0.1"})
    drv = create_driver("modbus-profile", "m", DeviceKind.METER, params, SystemClock())
    assert isinstance(drv, ModbusProfileDriver)
    with pytest.raises(DriverError, match="describes a meter"):
        ModbusProfileDriver(
            "m",
            DeviceKind.PV,
            ModbusProfileParams(profile="eastron-sdm630", host="h"),
            SystemClock(),
        )


@pytest.fixture
async def sim() -> AsyncIterator[SiteSimulator]:
    async with SiteSimulator(parse_site(SITE)) as simulator:
        yield simulator


@pytest.mark.hil
async def test_sdm630_over_tcp_matches_the_site_physics(sim: SiteSimulator) -> None:
    meter = Sdm630Meter(sim, unit_id=7)
    port = await meter.start_tcp()
    drv = ModbusProfileDriver(
        "sdm",
        DeviceKind.METER,
        ModbusProfileParams(
            profile="eastron-sdm630", host="127.0.0.1", port=port, unit_id=7, timeout_s=0.3
        ),
        SystemClock(),
    )
    try:
        info = await drv.connect()
        assert info.manufacturer == "Eastron"
        assert "W" in info.schema.index
        reading = await drv.read()
        assert reading.ok, reading.error
        assert (reading.quality == Quality.GOOD).all()
        w = reading.get("W")
        assert w == pytest.approx(sim.physics.meter_w, abs=200.0)
        hz = reading.get("Hz")
        assert hz == pytest.approx(50.0, abs=1.0)
        meter.fault = "silent"
        bad = await drv.read()
        assert not bad.ok
        assert (bad.quality == Quality.BAD_COMM).all()
        meter.fault = None
        assert (await drv.read()).ok
    finally:
        await drv.close()
        await meter.stop()


@pytest.mark.hil
async def test_sdm630_shares_an_rtu_bus_with_a_sunspec_inverter(sim: SiteSimulator) -> None:
    require_binary("socat", "RTU tests run over a pty pair")
    meter = Sdm630Meter(sim, unit_id=9)
    async with RtuSiteSimulator(sim, ["pv1"], extra=[meter.sim_device()]) as rtu:
        sdm = ModbusProfileDriver(
            "sdm",
            DeviceKind.METER,
            ModbusProfileParams(
                profile="eastron-sdm630",
                transport="rtu",
                serial_port=rtu.client_port,
                baudrate=19200,
                unit_id=9,
                timeout_s=0.3,
            ),
            SystemClock(),
        )
        pv = SunSpecModbusDriver(
            "pv1",
            DeviceKind.PV,
            SunSpecModbusParams(
                transport="rtu", serial_port=rtu.client_port, unit_id=1, timeout_s=0.3
            ),
            SystemClock(),
        )
        try:
            await sdm.connect()
            await pv.connect()
            for _ in range(3):
                assert (await sdm.read()).ok
                assert (await pv.read()).ok
        finally:
            await sdm.close()
            await pv.close()


@pytest.mark.hil
async def test_sim_pv_profile_reads_and_writes_a_verified_cap(sim: SiteSimulator) -> None:
    ep = sim.endpoints["pv1"]
    drv = ModbusProfileDriver(
        "pv1",
        DeviceKind.PV,
        ModbusProfileParams(
            profile="dergw-sim-pv", host=ep.host, port=ep.port, unit_id=1, timeout_s=0.3
        ),
        SystemClock(),
    )
    try:
        info = await drv.connect()
        assert info.nameplate.max_w == pytest.approx(10000.0)
        reading = await drv.read()
        assert reading.ok, reading.error
        w = reading.get("W")
        assert w is not None
        assert w == pytest.approx(sim.physics.pv_ac_w[0], abs=300.0)
        result = await drv.write(pv_setpoint("pv1", 3000.0))
        assert result.ok, result.reason
        assert result.readback["WMaxLimPct"] == pytest.approx(30.0)
        assert result.readback["WMaxLimEna"] == 1.0
        await async_wait_until(
            lambda: sim.state().devices["pv1"].ac_w <= 3100.0, timeout_s=5.0, what="cap applied"
        )
        released = await drv.write(pv_setpoint("pv1", None))
        assert released.ok, released.reason
        assert released.readback["WMaxLimEna"] == 0.0
    finally:
        await drv.close()

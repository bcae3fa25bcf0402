"""The SunSpec driver over Modbus RTU: a socat pty pair to the HIL simulator speaking RTU.

Several devices share one serial port (one RS-485 bus): one FIFO lock per bus, t3.5 pacing, a
silent or garbling device costs the others at most its own timeouts and never their data.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from drivers.contract import DeviceKind, LinkState, Quality
from drivers.sunspec.driver import PROTOCOL_RTU, SunSpecModbusDriver, SunSpecModbusParams
from drivers.sunspec.transport import RtuLink, frame_gap_s
from gateway.clock import SystemClock
from hil.rtu_sim import RtuSiteSimulator
from hil.server import Fault, SiteSimulator
from hil.site import parse_site
from tests.drivers.setpoints import pv_setpoint
from tests.support import async_wait_until, require_binary

pytestmark = pytest.mark.hil

SITE = """
name = "rtu-test"
seed = 3
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

KINDS = {"pv1": DeviceKind.PV, "meter1": DeviceKind.METER}


@pytest.fixture
async def rtu() -> AsyncIterator[RtuSiteSimulator]:
    require_binary("socat", "RTU tests run over a pty pair")
    async with SiteSimulator(parse_site(SITE)) as sim, RtuSiteSimulator(sim) as server:
        yield server


def rtu_driver(rtu: RtuSiteSimulator, device_id: str, **extra: object) -> SunSpecModbusDriver:
    params = SunSpecModbusParams.model_validate(
        {
            "transport": "rtu",
            "serial_port": rtu.client_port,
            "baudrate": 19200,
            "unit_id": rtu.unit_ids[device_id],
            "timeout_s": 0.3,
            **extra,
        }
    )
    return SunSpecModbusDriver(device_id, KINDS[device_id], params, SystemClock())


def test_params_need_the_right_address() -> None:
    with pytest.raises(ValueError, match="serial_port"):
        SunSpecModbusParams(transport="rtu")
    with pytest.raises(ValueError, match="host"):
        SunSpecModbusParams(transport="tcp")
    p = SunSpecModbusParams(transport="rtu", serial_port="/dev/ttyUSB0", parity="E")
    assert p.serial.describe() == "/dev/ttyUSB0@192008E1"
    with pytest.raises(ValueError, match="parity"):
        SunSpecModbusParams(transport="rtu", serial_port="/dev/x", parity="X")


def test_frame_gap() -> None:
    assert frame_gap_s(9600) == pytest.approx(3.5 * 11 / 9600)
    assert frame_gap_s(115200) == pytest.approx(0.00175)


async def test_discovery_read_and_verified_write_over_rtu(rtu: RtuSiteSimulator) -> None:
    pv = rtu_driver(rtu, "pv1")
    try:
        info = await pv.connect()
        assert info.protocol == PROTOCOL_RTU
        assert info.serial_number == "pv1"
        assert info.address.endswith("/unit 1")
        reading = await pv.read()
        assert reading.ok, reading.error
        assert (reading.quality == Quality.GOOD).all()
        w = reading.get("W")
        assert w is not None
        assert w > 0
        result = await pv.write(pv_setpoint("pv1", 4000.0))
        assert result.ok, result.reason
        assert result.readback["123.WMaxLimPct"] == pytest.approx(40.0)
        await async_wait_until(
            lambda: rtu.sim.state().devices["pv1"].ac_w <= 4100.0,
            timeout_s=5.0,
            what="PV output under the 4 kW cap",
        )
    finally:
        await pv.close()


async def test_two_devices_share_one_bus_fairly(rtu: RtuSiteSimulator) -> None:
    pv, meter = rtu_driver(rtu, "pv1"), rtu_driver(rtu, "meter1")
    await pv.connect()
    await meter.connect()
    try:
        assert isinstance(pv.link, RtuLink)
        assert isinstance(meter.link, RtuLink)
        assert pv.link.bus is meter.link.bus  # one port, one bus object
        bus = pv.link.bus
        assert bus is not None
        assert bus.refs == 2
        counts = {"pv1": 0, "meter1": 0}

        async def poll(drv: SunSpecModbusDriver, until: float) -> None:
            while time.monotonic() < until:
                reading = await drv.read()
                assert reading.ok, reading.error
                counts[drv.device_id] += 1

        until = time.monotonic() + 1.0
        await asyncio.gather(poll(pv, until), poll(meter, until))
        # Per-request FIFO: neither device starves; the pv needs more requests per read than
        # the meter, so the meter may get up to that many more reads, not orders of magnitude.
        assert min(counts.values()) >= 5, counts
        assert max(counts.values()) <= 4 * min(counts.values()), counts
    finally:
        await pv.close()
        await meter.close()
    assert bus.refs == 0
    assert not bus.is_open


async def test_silent_device_does_not_starve_its_bus_neighbour(rtu: RtuSiteSimulator) -> None:
    pv, meter = rtu_driver(rtu, "pv1"), rtu_driver(rtu, "meter1")
    await pv.connect()
    await meter.connect()
    try:
        rtu.sim.set_fault("pv1", Fault.SILENT)
        t0 = time.monotonic()
        bad, good = await asyncio.gather(pv.read(), meter.read())
        assert not bad.ok
        assert (bad.quality == Quality.BAD_COMM).all()
        assert good.ok, good.error  # the port was re-opened inside the lock, data intact
        assert time.monotonic() - t0 < 2.0
        assert pv.health().state is LinkState.FAILED
        for _ in range(3):
            assert (await meter.read()).ok
        rtu.sim.set_fault("pv1", None)
        assert (await pv.read()).ok
        assert pv.health().state is LinkState.CONNECTED
    finally:
        await pv.close()
        await meter.close()


async def test_malformed_frames_are_errors_and_recover(rtu: RtuSiteSimulator) -> None:
    pv, meter = rtu_driver(rtu, "pv1"), rtu_driver(rtu, "meter1")
    await pv.connect()
    await meter.connect()
    try:
        rtu.set_malformed("pv1", True)
        bad = await pv.read()
        assert not bad.ok
        assert pv.health().total_failures >= 1
        assert (await meter.read()).ok
        rtu.set_malformed("pv1", False)
        assert (await pv.read()).ok
    finally:
        await pv.close()
        await meter.close()


async def test_conflicting_line_settings_on_one_port_are_refused(rtu: RtuSiteSimulator) -> None:
    pv = rtu_driver(rtu, "pv1")
    meter = rtu_driver(rtu, "meter1", baudrate=9600)
    await pv.connect()
    try:
        with pytest.raises(Exception, match="already in use"):
            await meter.connect()
    finally:
        await pv.close()
        await meter.close()

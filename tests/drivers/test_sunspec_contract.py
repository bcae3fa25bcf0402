"""The driver contract suite (contract_suite.py) on SunSpec over Modbus TCP: PV and battery."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from drivers.contract import DeviceKind
from drivers.sunspec.driver import SunSpecModbusDriver, SunSpecModbusParams
from gateway.clock import SystemClock
from hil.server import Fault, SiteSimulator
from hil.site import parse_site
from tests.drivers.contract_suite import *  # noqa: F403 - the shared contract tests
from tests.drivers.contract_suite import DriverCase

pytestmark = pytest.mark.hil

SITE = """
name = "contract"
port = 0  # any free port: tests run in parallel
[[devices]]
id = "pv1"
kind = "pv"
unit_id = 1
rating_w = 10000
[[devices]]
id = "bat1"
kind = "battery"
unit_id = 2
rating_w = 5000
capacity_wh = 10000
"""


@pytest.fixture(params=["pv1", "bat1"])
async def driver_case(request: pytest.FixtureRequest) -> AsyncIterator[DriverCase]:
    device_id: str = request.param
    sim = SiteSimulator(parse_site(SITE), seed=3)
    await sim.start()
    endpoint = sim.endpoints[device_id]
    params = SunSpecModbusParams.model_validate(
        {
            "host": endpoint.host,
            "port": endpoint.port,
            "unit_id": endpoint.unit_id,
            "timeout_s": 0.3,
        }
    )
    kind = DeviceKind.PV if device_id == "pv1" else DeviceKind.BATTERY
    driver = SunSpecModbusDriver(device_id, kind, params, SystemClock())

    async def silent() -> None:
        sim.set_fault(device_id, Fault.SILENT)

    async def restore() -> None:
        sim.set_fault(device_id, None)

    async def malformed() -> None:
        sim.set_fault(device_id, Fault.EXCEPTION)

    try:
        yield DriverCase(
            driver=driver,
            kind=kind,
            make_silent=silent,
            restore=restore,
            make_malformed=malformed,
            expect_points=("W", "WMaxLimPct") if kind is DeviceKind.PV else ("W", "SoC"),
            rating_w=10_000.0 if kind is DeviceKind.PV else 5_000.0,
        )
    finally:
        await driver.close()
        await sim.stop()

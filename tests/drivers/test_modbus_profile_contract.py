"""The driver contract suite (contract_suite.py) on the profile-driven Modbus driver.

The HIL PV inverter read through the `dergw-sim-pv` profile (a fixed register map, no SunSpec
discovery) over Modbus TCP: the path a non-SunSpec vendor device takes. Malformed = Modbus
exception responses.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from drivers.contract import DeviceKind
from drivers.modbus_profile.driver import ModbusProfileDriver, ModbusProfileParams
from gateway.clock import SystemClock
from hil.server import Fault, SiteSimulator
from hil.site import parse_site
from tests.drivers.contract_suite import *  # noqa: F403 - the shared contract tests
from tests.drivers.contract_suite import DriverCase

pytestmark = pytest.mark.hil

SITE = """
name = "contract-profile"
port = 0  # any free port: tests run in parallel
[[devices]]
id = "pv1"
kind = "pv"
unit_id = 1
rating_w = 10000
"""


@pytest.fixture
async def driver_case() -> AsyncIterator[DriverCase]:
    sim = SiteSimulator(parse_site(SITE), seed=3)
    await sim.start()
    endpoint = sim.endpoints["pv1"]
    params = ModbusProfileParams(
        profile="dergw-sim-pv",
        host=endpoint.host,
        port=endpoint.port,
        unit_id=endpoint.unit_id,
        timeout_s=0.3,
    )
    driver = ModbusProfileDriver("pv1", DeviceKind.PV, params, SystemClock())

    async def silent() -> None:
        sim.set_fault("pv1", Fault.SILENT)

    async def restore() -> None:
        sim.set_fault("pv1", None)

    async def malformed() -> None:
        sim.set_fault("pv1", Fault.EXCEPTION)

    try:
        yield DriverCase(
            driver=driver,
            kind=DeviceKind.PV,
            make_silent=silent,
            restore=restore,
            make_malformed=malformed,
            expect_points=("W", "WMaxLimPct"),
            rating_w=10_000.0,
        )
    finally:
        await driver.close()
        await sim.stop()

"""The driver contract suite (contract_suite.py) on DNP3 (IEEE 1815.2), every backend present."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from drivers.contract import DeviceKind
from tests.drivers.contract_suite import *  # noqa: F403 - the shared contract tests
from tests.drivers.contract_suite import DriverCase
from tests.drivers.dnp3_support import BACKENDS, RATING_W, backend_param, plant

pytestmark = pytest.mark.hil


@pytest.fixture(params=[backend_param(b) for b in BACKENDS])
async def driver_case(request: pytest.FixtureRequest) -> AsyncIterator[DriverCase]:
    async with plant(request.param) as (sim, driver):

        async def silent() -> None:
            sim.make_silent()

        async def restore() -> None:  # the plant controller reboots and answers again
            sim.restore()
            await sim.restart()

        async def malformed() -> None:
            sim.make_malformed()

        yield DriverCase(
            driver=driver,
            kind=DeviceKind.PV,
            make_silent=silent,
            restore=restore,
            make_malformed=malformed,
            expect_points=("W", "WMaxLimPct", "Hz"),
            rating_w=RATING_W,
        )

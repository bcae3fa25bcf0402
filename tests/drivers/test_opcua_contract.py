"""The driver contract suite (contract_suite.py) on OPC UA: the battery PCS simulator, secure.

The driver talks to the simulator through `hil.opcua_relay.OpcUaFaultRelay`, which corrupts the
server's messages for the malformed-answer test (a flipped octet in each message's last block: the
SignAndEncrypt channel rejects it) and passes them unchanged otherwise.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from drivers.contract import DeviceKind
from drivers.opcua.driver import OpcUaDriver, OpcUaParams
from gateway.clock import SystemClock
from hil.opcua_relay import OpcUaFaultRelay
from hil.opcua_sim import OpcUaBatterySim, make_self_signed
from tests.drivers.contract_suite import *  # noqa: F403 - the shared contract tests
from tests.drivers.contract_suite import DriverCase

pytestmark = pytest.mark.hil


@pytest.fixture
async def driver_case(tmp_path: Path) -> AsyncIterator[DriverCase]:
    sim = OpcUaBatterySim(cert_dir=tmp_path / "server")
    await sim.start()
    relay = OpcUaFaultRelay(sim.host, sim.port)
    await relay.start()
    cert, key = make_self_signed(tmp_path / "client", "gw", "urn:dergw:gateway", server=False)
    params = OpcUaParams(
        url=relay.url("/dergw-sim/"),
        root="Battery1",
        client_cert=cert,
        client_key=key,
        timeout_s=1.0,
        stale_after_s=2.0,
        reconnect_min_s=0.2,
        reconnect_max_s=1.0,
    )
    driver = OpcUaDriver("bat1", DeviceKind.BATTERY, params, SystemClock())

    async def silent() -> None:
        await sim.stop_serving()
        await asyncio.sleep(0.3)  # the client sees the closed socket asynchronously

    async def restore() -> None:
        relay.restore()
        if sim.server is None:
            await sim.restart()

    async def malformed() -> None:
        # Returns once the client has hung up on a corrupted message (it reads none of them).
        await relay.break_stream("body", timeout_s=5.0)

    try:
        yield DriverCase(
            driver=driver,
            kind=DeviceKind.BATTERY,
            make_silent=silent,
            restore=restore,
            make_malformed=malformed,
            expect_points=("W", "SoC", "Hz"),
            rating_w=5_000.0,
            recovery_timeout_s=30.0,
        )
    finally:
        await driver.close()
        await relay.stop()
        await sim.stop()

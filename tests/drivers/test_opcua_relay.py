"""Broken OPC UA streams (hil/opcua_relay.py) and the cached address space (hil/opcua_aspace.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

import pytest
from asyncua import ua
from asyncua.client.client import Client
from asyncua.ua.object_ids import ObjectIds

from drivers.contract import DeviceKind, LinkState, Quality
from drivers.opcua.driver import OpcUaDriver, OpcUaParams
from gateway.clock import SystemClock
from hil.opcua_aspace import aspace_cache_dir
from hil.opcua_relay import OpcUaFaultRelay
from hil.opcua_sim import OpcUaBatterySim, make_self_signed
from tests.support import async_wait_until

pytestmark = pytest.mark.hil


@pytest.fixture
async def relayed(tmp_path: Path) -> AsyncIterator[tuple[OpcUaBatterySim, OpcUaFaultRelay]]:
    async with (
        OpcUaBatterySim(cert_dir=tmp_path / "server") as sim,
        OpcUaFaultRelay(sim.host, sim.port) as relay,
    ):
        yield sim, relay


def _driver(relay: OpcUaFaultRelay, **extra: Any) -> OpcUaDriver:
    fields: dict[str, Any] = {
        "url": relay.url("/dergw-sim/"),
        "root": "Battery1",
        "security": "none",
        "timeout_s": 1.0,
        "reconnect_min_s": 0.2,
        "reconnect_max_s": 0.5,
    } | extra
    return OpcUaDriver("bat1", DeviceKind.BATTERY, OpcUaParams(**fields), SystemClock())


async def _recovers(driver: OpcUaDriver) -> None:
    async def ok() -> bool:
        return (await driver.read()).ok

    await async_wait_until(ok, timeout_s=15.0, interval_s=0.1, what="session restored")


@pytest.mark.parametrize(
    ("security", "where"),
    [("none", "header"), ("basic256sha256-sign-encrypt", "body")],
    ids=["garbled-type-unsecured", "flipped-octet-signed-encrypted"],
)
async def test_malformed_messages_are_an_error_and_restore_heals(
    relayed: tuple[OpcUaBatterySim, OpcUaFaultRelay],
    tmp_path: Path,
    security: str,
    where: Literal["body", "header"],
) -> None:
    _, relay = relayed
    extra: dict[str, Any] = {"security": security}
    if security != "none":
        cert, key = make_self_signed(tmp_path / "client", "gw", "urn:dergw:gateway", server=False)
        extra |= {"client_cert": cert, "client_key": key}
    driver = _driver(relay, **extra)
    try:
        await driver.connect()
        assert (await driver.read()).ok
        failures = driver.health().total_failures
        await relay.break_stream(where)
        assert relay.messages_corrupted >= 1
        bad = await driver.read()
        assert not bad.ok
        assert bad.error
        assert (bad.quality == Quality.BAD_COMM).all()
        assert driver.health().total_failures > failures
        assert driver.health().state is LinkState.FAILED
        # Reconnecting while the stream is still broken fails too, and is counted; no exception.
        await asyncio.sleep(0.3)  # past the backoff: the next read tries (and fails) a reconnect
        assert not (await driver.read()).ok
        assert driver.health().total_failures >= failures + 2
        relay.restore()
        await _recovers(driver)
        assert driver.health().consecutive_failures == 0
    finally:
        await driver.close()


async def test_dropped_messages_make_the_subscription_stale_then_it_recovers(
    relayed: tuple[OpcUaBatterySim, OpcUaFaultRelay],
) -> None:
    _, relay = relayed
    driver = _driver(relay, stale_after_s=1.0, publishing_interval_ms=100)
    try:
        await driver.connect()
        assert (await driver.read()).ok
        relay.make_silent()

        async def stale() -> bool:
            return not (await driver.read()).ok

        await async_wait_until(stale, timeout_s=5.0, interval_s=0.1, what="stale subscription")
        assert relay.messages_dropped > 0
        # Either the stale check or the client's keep-alive watchdog notices first.
        assert driver.health().last_error
        relay.restore()
        await _recovers(driver)
    finally:
        await driver.close()


async def test_relay_passes_a_secure_session_unchanged(
    tmp_path: Path, relayed: tuple[OpcUaBatterySim, OpcUaFaultRelay]
) -> None:
    sim, relay = relayed
    cert, key = make_self_signed(tmp_path / "client", "gw", "urn:dergw:gateway", server=False)
    driver = _driver(
        relay, security="basic256sha256-sign-encrypt", client_cert=cert, client_key=key
    )
    try:
        info = await driver.connect()
        assert info.serial_number == sim.serial
        assert (await driver.read()).ok
        assert relay.messages_relayed > 0
        assert relay.messages_corrupted == relay.messages_dropped == 0
    finally:
        await driver.close()


async def test_the_simulator_serves_the_standard_address_space_from_the_cached_shelf(
    relayed: tuple[OpcUaBatterySim, OpcUaFaultRelay],
) -> None:
    sim, _ = relayed
    assert (aspace_cache_dir() / "aspace").is_file()  # built by the first start on this machine
    client = Client(sim.url, timeout=2.0)
    await client.connect()
    try:
        state_node = client.get_node(f"i={ObjectIds.Server_ServerStatus_State}")
        state = await state_node.read_value()
        assert state == ua.ServerState.Running
        namespaces = await client.get_namespace_array()
        assert "urn:dergw:sim" in namespaces
        types = await client.nodes.base_object_type.get_children()
        assert len(types) > 10  # the standard types are there, lazily loaded
    finally:
        await client.disconnect()

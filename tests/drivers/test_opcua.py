"""The OPC UA driver against the OPC UA battery PCS simulator (hil/opcua_sim.py) on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pydantic
import pytest
from asyncua import ua
from asyncua.ua.status_codes import StatusCodes

from drivers.contract import Control, DeviceKind, DriverError, LinkState, Quality
from drivers.opcua.driver import OpcUaDriver, OpcUaParams
from drivers.registry import create_driver, params_model
from gateway.clock import SystemClock
from hil.opcua_sim import OpcUaBatterySim, make_self_signed
from tests.drivers.setpoints import battery_setpoint
from tests.support import async_wait_until

pytestmark = pytest.mark.hil


@pytest.fixture
async def sim(tmp_path: Path) -> AsyncIterator[OpcUaBatterySim]:
    async with OpcUaBatterySim(cert_dir=tmp_path / "server") as s:
        yield s


@pytest.fixture
def client_cert(tmp_path: Path) -> tuple[Path, Path]:
    return make_self_signed(tmp_path / "client", "gw", "urn:dergw:gateway", server=False)


def _driver(sim: OpcUaBatterySim, certs: tuple[Path, Path] | None, **extra: Any) -> OpcUaDriver:
    fields: dict[str, Any] = {"url": sim.url, "root": "Battery1", "timeout_s": 1.0} | extra
    if certs is None:
        fields["security"] = "none"
    else:
        fields["client_cert"], fields["client_key"] = certs
    return OpcUaDriver("bat1", DeviceKind.BATTERY, OpcUaParams(**fields), SystemClock())


def test_security_defaults_to_basic256sha256_and_none_must_be_explicit() -> None:
    with pytest.raises(pydantic.ValidationError, match='security = "none"'):
        OpcUaParams(url="opc.tcp://127.0.0.1:4840/", root="Battery1")
    assert OpcUaParams.model_fields["security"].default == "basic256sha256-sign-encrypt"
    assert OpcUaParams(url="opc.tcp://h:1/", root="B", security="none").security == "none"
    with pytest.raises(pydantic.ValidationError):
        OpcUaParams(url="opc.tcp://h:1/", root="B", security="none", bogus=1)  # type: ignore[call-arg]


def test_registry_builds_the_opcua_driver(client_cert: tuple[Path, Path]) -> None:
    model = params_model("opcua")
    params = model.model_validate(
        {
            "url": "opc.tcp://127.0.0.1:1/",
            "root": "Battery1",
            "client_cert": str(client_cert[0]),
            "client_key": str(client_cert[1]),
        }
    )
    driver = create_driver("opcua", "bat1", DeviceKind.BATTERY, params, SystemClock())
    assert isinstance(driver, OpcUaDriver)


async def test_secure_discovery_identity_nameplate_and_schema(
    sim: OpcUaBatterySim, client_cert: tuple[Path, Path]
) -> None:
    driver = _driver(sim, client_cert)
    try:
        info = await driver.connect()
        assert info.protocol == "opcua"
        assert (info.manufacturer, info.serial_number) == ("dergw-sim", "bat-opcua-1")
        assert info.nameplate.max_w == 5000.0
        assert info.nameplate.max_charge_w == info.nameplate.max_discharge_w == 5000.0
        assert info.nameplate.energy_wh == 10000.0
        assert info.controls == {Control.ACTIVE_POWER, Control.GENERATION_CAP}
        for name, unit in {
            "W": "W",
            "Var": "var",
            "Hz": "Hz",
            "SoC": "%",
            "WMaxLimPct": "%",
        }.items():
            assert info.schema.units[info.schema.index[name]] == unit
        assert {"WMaxLimPct", "WMaxLimEna", "StorCtlMod", "OutWRte"} <= info.schema.writable
        session = driver._session
        assert session is not None
        policy = session.client.security_policy
        assert policy.URI.endswith("#Basic256Sha256")
        assert policy.Mode == ua.MessageSecurityMode.SignAndEncrypt
    finally:
        await driver.close()


async def test_security_none_is_refused_unless_configured(
    tmp_path: Path, client_cert: tuple[Path, Path]
) -> None:
    # A server that offers only None: the default (secure) driver must not fall back to it.
    async with OpcUaBatterySim(cert_dir=tmp_path / "s2", policies=("none",)) as only_none:
        secure = _driver(only_none, client_cert)
        with pytest.raises(DriverError, match="Basic256Sha256"):
            await secure.connect()
        assert secure.health().state is LinkState.FAILED
        explicit = _driver(only_none, None)
        try:
            info = await explicit.connect()
            assert info.schema.names
        finally:
            await explicit.close()


async def test_read_is_from_the_subscription_with_quality(
    sim: OpcUaBatterySim, client_cert: tuple[Path, Path]
) -> None:
    driver = _driver(sim, client_cert, publishing_interval_ms=100, sampling_interval_ms=50)
    try:
        await driver.connect()
        r = await driver.read()
        assert r.ok, r.error
        assert r.get("SoC") == pytest.approx(50.0, abs=1.0)
        assert r.get("Hz") == pytest.approx(50.0, abs=0.1)
        assert driver._cache is not None
        await async_wait_until(lambda: driver._cache.notifications > 0, timeout_s=5.0)  # type: ignore[union-attr]
        # A bad StatusCode on one point: that point is BAD_COMM (NaN), the others stay GOOD.
        sim.set_point_status("SoC", StatusCodes.BadSensorFailure)

        async def soc_bad() -> bool:
            return bool((await driver.read()).quality[r.schema.index["SoC"]] == Quality.BAD_COMM)

        await async_wait_until(soc_bad, timeout_s=5.0)
        r2 = await driver.read()
        assert r2.ok
        assert r2.get("W") is not None
        assert r2.get("SoC") is None
        sim.set_point_status("Hz", StatusCodes.UncertainLastUsableValue)

        async def hz_uncertain() -> bool:
            return bool((await driver.read()).quality[r.schema.index["Hz"]] == Quality.OUT_OF_RANGE)

        await async_wait_until(hz_uncertain, timeout_s=5.0)
        assert r2.mono_ns > r.mono_ns
    finally:
        await driver.close()


async def test_write_reads_back_and_moves_the_physics(
    sim: OpcUaBatterySim, client_cert: tuple[Path, Path]
) -> None:
    driver = _driver(sim, client_cert)
    try:
        await driver.connect()
        result = await driver.write(battery_setpoint("bat1", active_w=2000.0, max_w=5000.0))
        assert result.ok, result.reason
        assert result.readback["StorCtlMod"] == 2.0
        assert result.readback["OutWRte"] == pytest.approx(40.0)

        async def discharging() -> bool:
            w = (await driver.read()).get("W")
            return w is not None and w == pytest.approx(2000.0, abs=50.0)

        await async_wait_until(discharging, timeout_s=5.0, what="battery discharging at 2 kW")
        charge = await driver.write(battery_setpoint("bat1", active_w=-1000.0, max_w=5000.0))
        assert charge.ok, charge.reason

        async def charging() -> bool:
            w = (await driver.read()).get("W")
            return w is not None and w == pytest.approx(-1000.0, abs=50.0)

        await async_wait_until(charging, timeout_s=5.0, what="battery charging at 1 kW")
    finally:
        await driver.close()


async def test_storage_revert_timer_is_honoured(
    sim: OpcUaBatterySim, client_cert: tuple[Path, Path]
) -> None:
    driver = _driver(sim, client_cert)
    try:
        await driver.connect()
        result = await driver.write(
            battery_setpoint("bat1", active_w=1000.0, max_w=5000.0, revert_after_s=1)
        )
        assert result.ok, result.reason

        async def reverted() -> bool:
            return (await driver.read()).get("StorCtlMod") == 0.0

        await async_wait_until(reverted, timeout_s=5.0, what="StorCtlMod reverting to 0")
    finally:
        await driver.close()


async def test_server_stop_gives_bad_comm_and_restart_recovers(
    sim: OpcUaBatterySim, client_cert: tuple[Path, Path]
) -> None:
    driver = _driver(sim, client_cert, reconnect_min_s=0.2, reconnect_max_s=1.0)
    try:
        await driver.connect()
        assert (await driver.read()).ok
        await sim.stop_serving()
        await asyncio.sleep(0.3)
        bad = await driver.read()
        assert not bad.ok
        assert (bad.quality == Quality.BAD_COMM).all()
        assert driver.health().state is LinkState.FAILED
        # Reads during the outage return at once (backoff), without hammering the endpoint.
        again = await driver.read()
        assert not again.ok
        await sim.restart()

        async def back() -> bool:
            return (await driver.read()).ok

        await async_wait_until(back, timeout_s=30.0, interval_s=0.2, what="session restored")
        assert driver.reconnects == 1
        r = await driver.read()
        assert r.get("SoC") is not None
        # The subscription was re-created: new values keep arriving.
        assert driver._cache is not None
        before = driver._cache.notifications
        await async_wait_until(
            lambda: driver._cache.notifications > before,  # type: ignore[union-attr]
            timeout_s=5.0,
        )
        assert (await driver.write(battery_setpoint("bat1", active_w=500.0, max_w=5000.0))).ok
    finally:
        await driver.close()

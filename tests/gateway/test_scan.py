"""`dergw scan`: finds the simulated site's SunSpec devices with the driver's own discovery, and
browses the OPC UA battery simulator for DER objects."""

from __future__ import annotations

import asyncio
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from drivers.contract import DeviceKind
from drivers.opcua.driver import OpcUaDriver, OpcUaParams
from gateway.clock import SystemClock
from gateway.config import DeviceConfig
from gateway.scan import (
    ScanUsageError,
    browse_opcua,
    opcua_toml_block,
    parse_units,
    scan,
    scan_main,
)
from hil.opcua_sim import OpcUaBatterySim, make_self_signed
from hil.server import SiteSimulator
from hil.site import parse_site
from tests.support import free_tcp_port

SITE = """
name = "scan"
port = 0  # any free port: tests run in parallel
[[devices]]
id = "pv1"
kind = "pv"
unit_id = 1
rating_w = 8000
[[devices]]
id = "bat1"
kind = "battery"
unit_id = 2
rating_w = 5000
capacity_wh = 10000
[[devices]]
id = "meter1"
kind = "meter"
role = "pcc"
unit_id = 3
"""


async def test_scan_finds_each_device_with_its_kind_and_nameplate() -> None:
    sim = SiteSimulator(parse_site(SITE), seed=1)
    await sim.start()
    try:
        endpoint = sim.endpoints["pv1"]
        params = {"host": endpoint.host, "port": endpoint.port, "timeout_s": 0.2}
        found = await scan(params, [1, 2, 3, 4])
    finally:
        await sim.stop()
    kinds = {f.unit_id: f.info.kind for f in found}
    assert kinds == {1: DeviceKind.PV, 2: DeviceKind.BATTERY, 3: DeviceKind.METER}
    pv = next(f for f in found if f.unit_id == 1)
    assert pv.info.nameplate.max_w == 8000
    assert 103 in pv.model_ids or 701 in pv.model_ids


def test_unit_ranges() -> None:
    assert parse_units("1-3,7, 9-9") == [1, 2, 3, 7, 9]
    for bad in ("0-3", "5-2", "x", "248"):
        with pytest.raises(ScanUsageError, match="--units"):
            parse_units(bad)


def test_usage_errors_are_explained(capsys: pytest.CaptureFixture[str]) -> None:
    assert scan_main(["modbus", "127.0.0.1:1", "--units", "0-9"]) == 2
    assert "--units" in capsys.readouterr().err
    # OPC UA: secure by default, so a scan without a client certificate is a usage error.
    assert scan_main(["opcua", "opc.tcp://127.0.0.1:4840"]) == 2
    assert "--security none" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ OPC UA


@pytest.fixture
async def opcua_sim(tmp_path: Path) -> AsyncIterator[OpcUaBatterySim]:
    async with OpcUaBatterySim(cert_dir=tmp_path / "server") as sim:
        assert sim.server is not None
        ns = sim.ns
        # A plant folder with a meter one level down, and an object that is no DER at all.
        plant = await sim.server.nodes.objects.add_folder(f"ns={ns};s=Plant", f"{ns}:Plant")
        meter = await plant.add_object(f"ns={ns};s=Plant.Meter1", f"{ns}:Meter1")
        for name, value in (("W", 1200.0), ("Hz", 50.0), ("TotWhImp", 5.0e6), ("SN", "m-1")):
            await meter.add_variable(f"ns={ns};s=Plant.Meter1.{name}", f"{ns}:{name}", value)
        misc = await sim.server.nodes.objects.add_object(f"ns={ns};s=Misc", f"{ns}:Misc")
        await misc.add_variable(f"ns={ns};s=Misc.Temperature", f"{ns}:Temperature", 21.0)
        yield sim


async def test_opcua_scan_finds_the_der_objects_and_the_driver_confirms_them(
    opcua_sim: OpcUaBatterySim, tmp_path: Path
) -> None:
    cert, key = make_self_signed(tmp_path / "client", "gw", "urn:dergw:gateway", server=False)
    found = await browse_opcua(opcua_sim.url, cert=cert, key=key, timeout_s=2.0)
    by_path = {f.path: f for f in found}
    assert set(by_path) == {("Battery1",), ("Plant", "Meter1")}  # not Misc, not the Server object
    battery, meter = by_path[("Battery1",)], by_path[("Plant", "Meter1")]
    assert battery.kind is DeviceKind.BATTERY
    assert meter.kind is DeviceKind.METER
    assert battery.info is not None, battery.error
    assert battery.info.serial_number == "bat-opcua-1"
    assert battery.info.nameplate.max_w == 5000.0
    assert {"W", "SoC", "WMaxLimPct", "StorCtlMod"} <= set(battery.points)
    assert meter.info is not None, meter.error
    assert meter.params["root"] == "Plant/Meter1"
    assert meter.params["namespace_uri"] == "urn:dergw:sim"
    assert battery.params["client_cert"] == str(cert)

    # The printed block is a valid device entry, and a driver built from it reads the battery.
    doc = tomllib.loads(opcua_toml_block(battery, "battery1"))
    device = DeviceConfig.model_validate(doc["devices"][0])
    assert device.driver == "opcua"
    assert device.kind is DeviceKind.BATTERY
    assert isinstance(device.params, OpcUaParams)
    driver = OpcUaDriver(device.id, device.kind, device.params, SystemClock())
    try:
        await driver.connect()
        reading = await driver.read()
        assert reading.ok, reading.error
        assert reading.get("SoC") is not None
    finally:
        await driver.close()


async def test_opcua_scan_cli_prints_ready_blocks(
    opcua_sim: OpcUaBatterySim, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = await asyncio.to_thread(
        scan_main, ["opcua", opcua_sim.url, "--security", "none", "--depth", "1"]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "dergw-sim sim-battery-pcs-opcua, serial bat-opcua-1" in out
    assert "Meter1" not in out  # two levels down: beyond --depth 1
    doc = tomllib.loads(out)  # comments and blocks: the whole output pastes as TOML
    (device,) = doc["devices"]
    assert device["driver"] == "opcua"
    assert device["params"]["security"] == "none"
    assert device["params"]["root"] == "Battery1"


def test_opcua_scan_of_nothing_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"opc.tcp://127.0.0.1:{free_tcp_port()}/"
    assert scan_main(["opcua", url, "--security", "none", "--timeout", "0.5"]) == 1
    assert "cannot open an OPC UA session" in capsys.readouterr().err

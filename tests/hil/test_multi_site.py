"""Mixed-protocol sites: the `protocol` key, and one physics served over four protocols.

The drivers are built from the same config lines the HIL bench writes for the gateway
(`hil.scenarios.harness.device_driver_lines`), so a device that reads here is one the bench's
gateway can reach.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from drivers.contract import DeviceKind
from drivers.registry import create_driver, params_model
from gateway.clock import SystemClock
from hil.scenarios.harness import device_driver_lines
from hil.server import Fault, SimulatorError, SiteSimulator
from hil.site import SiteFileError, load_site, parse_site
from tests.drivers.setpoints import pv_setpoint

SITES = Path(__file__).resolve().parents[2] / "hil" / "sites"

BASE = """
name = "t"
[[devices]]
id = "pv1"
kind = "pv"
unit_id = 1
rating_w = 5000
"""


def test_multi_site_has_one_device_per_protocol() -> None:
    spec = load_site(SITES / "multi.toml")
    protocols = {d.id: d.protocol for d in spec.devices}
    assert protocols == {
        "pv1": "modbus-tcp",
        "meter1": "modbus-rtu",
        "bat1": "opcua",
        "plant1": "dnp3",
    }
    assert next(d for d in spec.devices if d.protocol == "modbus-rtu").role == "pcc"


def test_protocol_defaults_to_modbus_tcp() -> None:
    assert parse_site(BASE).devices[0].protocol == "modbus-tcp"


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ('protocol = "opcua"\n', "batteries only"),
        ('protocol = "dnp3"\nfamily = "7xx"\n', "family '1xx' only"),
        ('protocol = "modbus-rtu"\nport = 1502\n', "port does not apply"),
        ('protocol = "dnp3"\nbase_address = 0\n', "base_address only applies"),
        ('protocol = "iec104"\n', "devices.0.protocol"),
    ],
)
def test_invalid_protocol_use_names_the_device(extra: str, expected: str) -> None:
    with pytest.raises(SiteFileError) as err:
        parse_site(BASE + extra, source="t.toml")
    assert expected in str(err.value)


def test_rtu_devices_need_distinct_unit_ids_but_not_across_protocols() -> None:
    rtu = '[[devices]]\nid = "pv{n}"\nkind = "pv"\nunit_id = 1\nrating_w = 1\nprotocol = "{p}"\n'
    with pytest.raises(SiteFileError, match="RS-485 bus"):
        parse_site(
            BASE.replace("rating_w = 5000", 'rating_w = 5000\nprotocol = "modbus-rtu"')
            + rtu.format(n=2, p="modbus-rtu")
        )
    # Same unit id on the TCP server, the RTU bus and a DNP3 outstation: three wires.
    spec = parse_site(BASE + rtu.format(n=2, p="modbus-rtu") + rtu.format(n=3, p="dnp3"))
    assert [d.protocol for d in spec.devices] == ["modbus-tcp", "modbus-rtu", "dnp3"]


def _driver(sim: SiteSimulator, device_id: str) -> Any:
    spec = next(d for d in sim.spec.devices if d.id == device_id)
    name, lines = device_driver_lines(sim.endpoints[device_id])
    import tomllib

    params = params_model(name).model_validate(tomllib.loads("\n".join(lines)))
    return create_driver(name, device_id, DeviceKind(spec.kind), params, SystemClock())


@pytest.mark.hil
async def test_one_physics_served_over_four_protocols() -> None:
    spec = load_site(SITES / "multi.toml")
    async with SiteSimulator(spec) as sim:
        drivers = {d.id: _driver(sim, d.id) for d in spec.devices}
        try:
            infos = {i: await d.connect() for i, d in drivers.items()}
            assert {i: info.protocol for i, info in infos.items()} == {
                "pv1": "sunspec-modbus-tcp",
                "meter1": "sunspec-modbus-rtu",
                "bat1": "opcua",
                "plant1": "dnp3-tcp",
            }
            readings = {i: await d.read() for i, d in drivers.items()}
            for i, reading in readings.items():
                assert reading.ok, (i, reading.error)
            state = sim.state()
            # The PCC meter (RTU) sees both PV inverters (TCP and DNP3): export of ~17 kW.
            meter_w = readings["meter1"].get("W")
            assert meter_w is not None
            assert meter_w < -10_000
            assert abs(meter_w - state.meter_w) < 0.1 * abs(state.meter_w)
            plant_w = readings["plant1"].get("W")
            assert plant_w is not None
            assert abs(plant_w - state.devices["plant1"].ac_w) < 0.1 * state.devices["plant1"].ac_w

            # A cap written over DNP3 lands in the shared physics: the meter's export drops.
            result = await drivers["plant1"].write(
                pv_setpoint("plant1", 3000.0, max_w=infos["plant1"].nameplate.max_w or 15000.0)
            )
            assert result.ok, result
            for _ in range(100):  # the registers mirror the physics at its next step
                await asyncio.sleep(0.1)
                if sim.state().devices["plant1"].ac_w <= 3100.0:
                    break
            assert sim.state().devices["plant1"].wmaxlim_ena == 1
            assert sim.state().devices["plant1"].ac_w <= 3100.0
            assert sim.state().meter_w > state.meter_w + 8000.0

            # Faults reach the protocol simulators: a silent DNP3 relay, a frozen OPC UA server.
            sim.set_fault("plant1", Fault.SILENT)
            assert sim.state().devices["plant1"].fault is Fault.SILENT
            sim.set_fault("plant1", None)
            with pytest.raises(SimulatorError, match="does not simulate"):
                sim.set_fault("bat1", Fault.EXCEPTION)
        finally:
            for d in drivers.values():
                await d.close()

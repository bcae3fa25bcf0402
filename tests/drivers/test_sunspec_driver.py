"""The SunSpec driver against a minimal pymodbus server serving images encoded by pysunspec2.

These tests do not depend on hil/: each builds its own register image (pysunspec2's codec, not
ours) and serves it with pymodbus' SimDevice on a free loopback port.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from pymodbus.exceptions import ModbusIOException
from pymodbus.pdu.register_message import ReadHoldingRegistersResponse

from drivers.contract import Control, DeviceKind, Driver, DriverError, LinkState, Quality
from drivers.registry import create_driver, params_model
from drivers.sunspec.driver import (
    MAX_READ_REGISTERS,
    SunSpecModbusDriver,
    SunSpecModbusParams,
    plan_reads,
)
from drivers.sunspec.models import get_layout
from drivers.sunspec.transport import HoldingRegistersResponse
from gateway.clock import ManualClock
from gateway.safety import PlannedSetpoint
from tests.drivers.setpoints import battery_setpoint, pv_setpoint
from tests.drivers.sunspec_images import (
    ImageServer,
    ModelSpec,
    battery_7xx_models,
    image,
    meter_models,
    pv_7xx_models,
    pv_models,
    readonly_offsets,
)


def model_offset(specs: Sequence[ModelSpec], model_id: int) -> int:
    """Offset from the base address of `model_id`'s ID register in an image of `specs`."""
    at = 2
    for spec in specs:
        if spec.model_id == model_id:
            return at
        at += get_layout(spec.model_id, spec.length).size
    raise KeyError(model_id)


async def serve(
    specs: Sequence[ModelSpec], *, address: int = 40000, end: bool = True, **kwargs: Any
) -> ImageServer:
    server = ImageServer(image(specs, end=end), address=address, **kwargs)
    await server.start()
    return server


def make_driver(
    server: ImageServer,
    kind: DeviceKind,
    *,
    device_id: str = "pv1",
    clock: ManualClock | None = None,
    **params: Any,
) -> SunSpecModbusDriver:
    p = SunSpecModbusParams(
        host="127.0.0.1", port=server.port, unit_id=server.unit_id, timeout_s=0.3, **params
    )
    return SunSpecModbusDriver(device_id, kind, p, clock or ManualClock())


@pytest.fixture
async def pv_server() -> AsyncIterator[ImageServer]:
    server = await serve(pv_models())
    yield server
    await server.stop()


def values(reading: Any) -> dict[str, tuple[float, int]]:
    return {
        n: (float(v), int(q))
        for n, v, q in zip(reading.schema.names, reading.values, reading.quality, strict=True)
    }


# --------------------------------------------------------------------------- discovery


@pytest.mark.parametrize("base", [40000, 0, 50000])
async def test_discovers_pv_at_each_base_address(base: int) -> None:
    server = await serve(pv_models(), address=base)
    driver = make_driver(server, DeviceKind.PV)
    try:
        info = await driver.connect()
        assert driver.base_address == base
        assert [m.model_id for m in driver.models] == [1, 103, 120, 121, 123]
        assert (info.manufacturer, info.model, info.serial_number) == ("Acme", "PV-10", "SN123")
        assert info.protocol == "sunspec-modbus-tcp"
        assert info.address == f"127.0.0.1:{server.port}/unit 1"
        assert info.kind is DeviceKind.PV
        assert info.nameplate.max_w == 8000.0  # the WMax setting, below the 10 kW rating
        assert info.nameplate.max_va == 10000.0
        assert info.schema.writable == {"WMaxLimPct", "WMaxLimEna", "Conn"}
        got = values(await driver.read())
        assert got["W"] == (4321.0, Quality.GOOD)
        assert got["PF"] == (pytest.approx(0.981), Quality.GOOD)  # percent -> ratio
        assert got["V"] == (pytest.approx(230.4), Quality.GOOD)
        assert got["Hz"] == (pytest.approx(50.02), Quality.GOOD)
        assert got["WRtg"] == (10000.0, Quality.GOOD)
        assert got["WMaxLimPct"] == (100.0, Quality.GOOD)
        assert got["WMaxLimEna"] == (0.0, Quality.GOOD)
        assert got["St"] == (4.0, Quality.GOOD)
        assert set(info.schema.names) == set(got)
        assert "SoC" not in got  # battery points only where a source model exists
    finally:
        await driver.close()
        await server.stop()


async def test_legacy_common_model_with_65_registers() -> None:
    specs = pv_models(common_length=65)
    server = await serve(specs)
    driver = make_driver(server, DeviceKind.PV)
    try:
        info = await driver.connect()
        assert driver.models[0].length == 65
        assert driver.models[1].address == 40000 + 2 + 67
        assert info.serial_number == "SN123"
        assert values(await driver.read())["W"] == (4321.0, Quality.GOOD)
    finally:
        await driver.close()
        await server.stop()


async def test_chain_that_ends_with_an_illegal_address_exception() -> None:
    server = await serve(pv_models(), end=False)
    driver = make_driver(server, DeviceKind.PV)
    try:
        await driver.connect()
        assert [m.model_id for m in driver.models] == [1, 103, 120, 121, 123]
        assert (await driver.read()).ok
    finally:
        await driver.close()
        await server.stop()


async def test_no_sunspec_marker_says_what_to_check() -> None:
    server = ImageServer(image(pv_models(), marker=[0x1234, 0x5678]))
    await server.start()
    driver = make_driver(server, DeviceKind.PV)
    try:
        with pytest.raises(DriverError) as err:
            await driver.connect()
        message = str(err.value)
        assert "no SunSpec marker 'SunS' at 40000, 0, 50000" in message
        assert "40000: found 0x1234 0x5678" in message
        assert "illegal data address" in message  # what 0 and 50000 answered
        assert "check the unit id and that SunSpec is enabled" in message
        assert driver.health().state is LinkState.FAILED
    finally:
        await driver.close()
        await server.stop()


async def test_unreachable_device_is_a_driver_error() -> None:
    from tests.support import free_tcp_port

    params = SunSpecModbusParams(host="127.0.0.1", port=free_tcp_port(), timeout_s=0.3)
    driver = SunSpecModbusDriver("pv1", DeviceKind.PV, params, ManualClock())
    with pytest.raises(DriverError, match=r"cannot connect to 127\.0\.0\.1"):
        await driver.connect()


async def test_kind_mismatch_names_what_was_found_and_expected(pv_server: ImageServer) -> None:
    driver = make_driver(pv_server, DeviceKind.BATTERY, device_id="bat1")
    with pytest.raises(DriverError) as err:
        await driver.connect()
    message = str(err.value)
    assert "configured as battery" in message
    assert "storage (124, 802 or 713)" in message
    assert "found SunSpec models [1, 103, 120, 121, 123]" in message
    meter = make_driver(pv_server, DeviceKind.METER, device_id="m1")
    with pytest.raises(DriverError, match=r"lacks a meter model \(201-204 or 211-214\)"):
        await meter.connect()


async def test_meter_discovery_and_values() -> None:
    server = await serve(meter_models(w=-2500.0))
    driver = make_driver(server, DeviceKind.METER, device_id="m1")
    try:
        info = await driver.connect()
        assert info.nameplate.max_w == 0.0
        got = values(await driver.read())
        assert got["W"] == (-2500.0, Quality.GOOD)  # + import: this meter sees export
        assert got["WphA"][0] == pytest.approx(-833.0, abs=1.0)
        assert got["PF"] == (pytest.approx(-0.95), Quality.GOOD)
        assert got["V"] == (pytest.approx(229.9), Quality.GOOD)
        assert got["TotWhExp"] == (2000.0, Quality.GOOD)
        assert info.schema.writable == frozenset()
        result = await driver.write(pv_setpoint("m1"))
        assert not result.ok
        assert "meter" in (result.reason or "")
    finally:
        await driver.close()
        await server.stop()


async def test_7xx_battery_resolves_7xx_sources_and_splits_long_models() -> None:
    specs = battery_7xx_models()
    server = await serve(specs)
    driver = make_driver(server, DeviceKind.BATTERY, device_id="bat7")
    try:
        info = await driver.connect()
        plan = driver.read_plan
        assert plan is not None
        assert all(r.count <= MAX_READ_REGISTERS for r in plan.requests)
        # 701 alone is 155 registers: at least two requests, and no more than needed.
        assert len(plan.requests) == math.ceil(plan.registers / MAX_READ_REGISTERS)
        assert info.nameplate.max_w == 5000.0  # 702 WMax
        assert info.nameplate.max_charge_w == 4000.0  # 702 WChaRteMax
        assert info.nameplate.energy_wh == 9000.0
        got = values(await driver.read())
        assert got["W"] == (-1500.0, Quality.GOOD)  # from 701: charging
        assert got["Hz"] == (pytest.approx(50.001), Quality.GOOD)  # 701 uint32 Hz
        assert got["PF"] == (pytest.approx(0.99), Quality.GOOD)  # 701 serves a ratio
        assert got["SoC"] == (pytest.approx(63.5), Quality.GOOD)  # 802 before 713
        assert got["WRtg"] == (6000.0, Quality.GOOD)  # 702 WMaxRtg
        assert got["WChaRteMax"] == (3000.0, Quality.GOOD)  # 802 dynamic limit
        assert got["WMaxLimEna"] == (0.0, Quality.GOOD)  # 704
        assert got["BatState"] == (3.0, Quality.GOOD)
        assert "StorCtlMod" not in got  # no 124 on this device
    finally:
        await driver.close()
        await server.stop()


async def test_raw_points_name_every_numeric_point(pv_server: ImageServer) -> None:
    driver = make_driver(pv_server, DeviceKind.PV, raw_points=True)
    info = await driver.connect()
    got = values(await driver.read())
    assert got["103.W"] == got["W"]
    assert got["123.WMaxLimPct_SF"] == (-2.0, Quality.GOOD)
    assert got["103.AphB"][1] == Quality.NOT_IMPLEMENTED
    assert "103.ID" not in got
    assert "1.Mn" not in got  # strings are not numeric points
    assert info.schema.units[info.schema.index["103.W"]] == "W"
    await driver.close()


async def test_out_of_range_measurements() -> None:
    specs = pv_models(w=150000.0)  # > 10 x the 10 kW nameplate: a broken sensor or wrong SF
    specs[1] = ModelSpec(
        103, raw={**specs[1].raw, "W_SF": 1}, scaled={**specs[1].scaled, "Hz": 80.0}
    )
    server = await serve(specs)
    driver = make_driver(server, DeviceKind.PV)
    try:
        await driver.connect()
        reading = await driver.read()
        got = values(reading)
        assert got["Hz"] == (80.0, Quality.OUT_OF_RANGE)
        assert got["W"] == (150000.0, Quality.OUT_OF_RANGE)
        assert got["V"][1] == Quality.GOOD
        assert reading.get("Hz") is None
        assert reading.ok  # a range problem is not a communication error
    finally:
        await driver.close()
        await server.stop()


# --------------------------------------------------------------------------- read plan


def test_plan_reads_coalesces_and_splits() -> None:
    plan = plan_reads([(40070, 52), (40122, 28), (40150, 32), (40182, 26)])
    assert [(r.address, r.count) for r in plan.requests] == [(40070, 125), (40195, 13)]
    plan = plan_reads([(100, 10), (5000, 10)])  # far apart: two requests, the gap not read
    assert [(r.address, r.count) for r in plan.requests] == [(100, 10), (5000, 10)]
    plan = plan_reads([(0, 300)])
    assert [r.count for r in plan.requests] == [125, 125, 50]
    assert plan_reads([]).requests == ()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2000), st.integers(1, 200)), min_size=1, max_size=8))
def test_plan_reads_covers_every_register_in_bounded_requests(spans: list[tuple[int, int]]) -> None:
    plan = plan_reads(spans)
    needed = {a + k for a, c in spans for k in range(c)}
    covered = {r.address + k for r in plan.requests for k in range(r.count)}
    assert needed <= covered
    assert all(1 <= r.count <= MAX_READ_REGISTERS for r in plan.requests)
    assert all(r.address in needed and r.address + r.count - 1 in needed for r in plan.requests)
    # Greedy left-to-right covering with fixed windows is optimal: compare with a lower bound.
    starts = sorted(needed)
    lower, reach = 0, -1
    for x in starts:
        if x > reach:
            lower += 1
            reach = x + MAX_READ_REGISTERS - 1
    assert len(plan.requests) == lower
    assert plan.start == min(needed)
    assert plan.start + plan.size == max(needed) + 1


async def test_every_read_request_is_at_most_125_registers(pv_server: ImageServer) -> None:
    driver = make_driver(pv_server, DeviceKind.PV, raw_points=True)
    await driver.connect()
    pv_server.reads.clear()
    await driver.read()
    assert pv_server.reads
    assert all(count <= MAX_READ_REGISTERS for _, count in pv_server.reads)
    plan = driver.read_plan
    assert plan is not None
    assert [(r.address, r.count) for r in plan.requests] == pv_server.reads
    await driver.close()


# --------------------------------------------------------------------------- failures


@pytest.mark.parametrize("mode", ["silent", "exception"])
async def test_fault_gives_bad_comm_nan_fresh_timestamp_then_recovers(
    pv_server: ImageServer, mode: str
) -> None:
    clock = ManualClock()
    driver = make_driver(pv_server, DeviceKind.PV, clock=clock)
    await driver.connect()
    good = await driver.read()
    assert good.ok
    pv_server.mode = mode
    for attempt in (1, 2):
        clock.advance(1.0)
        bad = await driver.read()
        assert not bad.ok
        assert bad.error is not None
        assert (mode == "silent") == ("ModbusIOException" in bad.error or "Timeout" in bad.error)
        assert np.isnan(bad.values).all()
        assert (bad.quality == Quality.BAD_COMM).all()
        assert bad.wall_ns == clock.wall_ns() > good.wall_ns
        assert bad.mono_ns == clock.mono_ns()
        assert bad.schema is good.schema
        health = driver.health()
        assert health.state is LinkState.FAILED
        assert health.consecutive_failures == attempt
        assert health.total_failures == attempt
        assert health.last_ok_mono_ns == good.mono_ns
    result = await driver.write(pv_setpoint())
    assert not result.ok
    assert "write not attempted" in (result.reason or "")
    pv_server.mode = None
    clock.advance(1.0)
    again = await driver.read()
    assert again.ok
    assert values(again)["W"] == (4321.0, Quality.GOOD)
    assert driver.health().state is LinkState.CONNECTED
    assert driver.health().consecutive_failures == 0
    assert driver.health().total_failures == 3
    await driver.close()
    assert driver.health().state is LinkState.DISCONNECTED


async def test_server_gone_then_back() -> None:
    server = await serve(pv_models())
    driver = make_driver(server, DeviceKind.PV)
    await driver.connect()
    assert (await driver.read()).ok
    await server.stop()
    bad = await driver.read()
    assert not bad.ok
    assert (bad.quality == Quality.BAD_COMM).all()
    revived = ImageServer(image(pv_models()))
    await revived.start(port=server.port)  # the same device back on its configured port
    try:
        assert (await driver.read()).ok
    finally:
        await driver.close()
        await revived.stop()


async def test_map_change_is_detected_not_misread(pv_server: ImageServer) -> None:
    driver = make_driver(pv_server, DeviceKind.PV)
    await driver.connect()
    assert (await driver.read()).ok
    pv_server.poke(model_offset(pv_models(), 103), 101)  # firmware now serves another model
    reading = await driver.read()
    assert not reading.ok
    assert "SunSpec map changed" in (reading.error or "")
    assert "expected model 103" in (reading.error or "")
    assert (reading.quality == Quality.BAD_COMM).all()
    await driver.close()


async def test_failed_rediscovery_keeps_the_previous_map(pv_server: ImageServer) -> None:
    driver = make_driver(pv_server, DeviceKind.PV)
    await driver.connect()
    pv_server.mode = "exception"
    with pytest.raises(DriverError, match="server device failure"):
        await driver.connect()
    pv_server.mode = None
    assert [m.model_id for m in driver.models] == [1, 103, 120, 121, 123]
    assert (await driver.read()).ok
    assert (await driver.write(pv_setpoint(cap_w=4000.0))).ok
    await driver.close()


async def test_read_before_connect_is_a_programming_error(pv_server: ImageServer) -> None:
    driver = make_driver(pv_server, DeviceKind.PV)
    with pytest.raises(RuntimeError, match="before connect"):
        await driver.read()
    result = await driver.write(pv_setpoint())
    assert not result.ok
    assert "not connected" in (result.reason or "")


# --------------------------------------------------------------------------- writes


async def test_pv_cap_is_one_fc16_and_verified(pv_server: ImageServer) -> None:
    driver = make_driver(pv_server, DeviceKind.PV)
    await driver.connect()
    base = 40000 + model_offset(pv_models(), 123)
    result = await driver.write(pv_setpoint(cap_w=5000.0, revert_after_s=60))
    assert result.ok, result.reason
    # 5000 W of WMax 8000 W = 62.5 %, WMaxLimPct_SF -2: 6250; one FC16 over offsets 5..9.
    assert pv_server.writes == [(base + 5, [6250, 0, 60, 0, 1])]
    assert result.readback["123.WMaxLimPct"] == 62.5
    assert result.readback["123.WMaxLim_Ena"] == 1.0
    assert result.readback["123.WMaxLimPct_RvrtTms"] == 60.0
    got = values(await driver.read())
    assert got["WMaxLimPct"] == (62.5, Quality.GOOD)
    assert got["WMaxLimEna"] == (1.0, Quality.GOOD)

    pv_server.writes.clear()
    result = await driver.write(pv_setpoint(cap_w=None))
    assert result.ok, result.reason
    assert pv_server.writes == [(base + 5, [10000, 0, 60, 0, 0])]  # 100 %, DISABLED
    await driver.close()


async def test_cap_is_floored_to_the_register_resolution(pv_server: ImageServer) -> None:
    driver = make_driver(pv_server, DeviceKind.PV)
    await driver.connect()
    # 3333.33 W / 8000 W = 41.6666 %: 4166 (41.66 %), never rounded up above the enforced cap.
    result = await driver.write(pv_setpoint(cap_w=3333.33))
    assert result.ok
    assert pv_server.writes[-1][1][0] == 4166
    # Above WMax clamps to 100 %.
    result = await driver.write(pv_setpoint(cap_w=9000.0, max_w=20000.0))
    assert result.ok
    assert pv_server.writes[-1][1][0] == 10000
    await driver.close()


async def test_cap_falls_back_to_wrtg_without_wmax() -> None:
    server = await serve(pv_models(wmax=None))  # 121 WMax not implemented
    driver = make_driver(server, DeviceKind.PV)
    try:
        info = await driver.connect()
        assert info.nameplate.max_w == 10000.0
        result = await driver.write(pv_setpoint(cap_w=5000.0))
        assert result.ok
        assert server.writes[-1][1][0] == 5000  # 50 % of WRtg
    finally:
        await driver.close()
        await server.stop()


async def test_disconnect_goes_first_connect_goes_last(pv_server: ImageServer) -> None:
    driver = make_driver(pv_server, DeviceKind.PV)
    await driver.connect()
    base = 40000 + model_offset(pv_models(), 123)
    result = await driver.write(pv_setpoint(cap_w=4000.0, connect=False, revert_after_s=30))
    assert result.ok, result.reason
    assert pv_server.writes == [(base + 2, [0, 30, 0]), (base + 5, [5000, 0, 30, 0, 1])]
    assert result.readback["123.Conn"] == 0.0
    pv_server.writes.clear()
    result = await driver.write(pv_setpoint(cap_w=4000.0, connect=True, revert_after_s=30))
    assert result.ok
    assert [a for a, _ in pv_server.writes] == [base + 5, base + 2]
    await driver.close()


async def test_readback_mismatch_names_the_point(pv_server: ImageServer) -> None:
    driver = make_driver(pv_server, DeviceKind.PV)
    await driver.connect()
    pv_server.ignore_writes = True
    result = await driver.write(pv_setpoint(cap_w=5000.0))
    assert not result.ok
    assert "read-back mismatch" in (result.reason or "")
    assert "123.WMaxLimPct: wrote 0x186A, read back 0x2710" in (result.reason or "")
    assert "123.WMaxLim_Ena" in (result.reason or "")
    assert result.readback["123.WMaxLimPct"] == 100.0
    assert driver.health().consecutive_failures == 0  # the link is fine; the device refused
    await driver.close()


async def test_unencodable_setpoint_is_refused_before_any_write(pv_server: ImageServer) -> None:
    driver = make_driver(pv_server, DeviceKind.PV)
    await driver.connect()
    result = await driver.write(pv_setpoint(cap_w=5000.0, revert_after_s=70000))
    assert not result.ok
    assert "write not attempted" in (result.reason or "")
    assert "123.WMaxLimPct_RvrtTms" in (result.reason or "")
    assert "outside uint16 range 0..65534" in (result.reason or "")
    assert pv_server.writes == []
    assert driver.health().consecutive_failures == 0
    await driver.close()


async def test_refused_write_is_not_a_link_failure(pv_server: ImageServer) -> None:
    driver = make_driver(pv_server, DeviceKind.PV)
    await driver.connect()
    pv_server.refuse_writes = True
    result = await driver.write(pv_setpoint(cap_w=5000.0))
    assert not result.ok
    assert "device refused the write" in (result.reason or "")
    assert "illegal data value" in (result.reason or "")
    assert driver.health().state is LinkState.CONNECTED
    assert driver.health().total_failures == 0
    assert (await driver.read()).ok
    await driver.close()


async def test_write_rejects_anything_but_a_safe_setpoint(pv_server: ImageServer) -> None:
    driver = make_driver(pv_server, DeviceKind.PV)
    await driver.connect()
    fake = SimpleNamespace(
        device_id="pv1", max_active_power_w=1.0, active_power_w=None, connect=None,
        revert_after_s=60, bound_by=(),
    )  # fmt: skip
    with pytest.raises(TypeError, match=r"accepts only gateway\.safety\.SafeSetpoint"):
        await driver.write(fake)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        await driver.write(PlannedSetpoint(device_id="pv1", max_active_power_w=1.0))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sent to driver of 'pv1'"):
        await driver.write(pv_setpoint("pv2"))
    assert pv_server.writes == []
    await driver.close()


async def test_pv_refuses_fixed_power(pv_server: ImageServer) -> None:
    driver = make_driver(pv_server, DeviceKind.PV, device_id="bat1")
    await driver.connect()
    result = await driver.write(battery_setpoint("bat1", active_w=1000.0))
    assert not result.ok
    assert "no storage control" in (result.reason or "")
    assert pv_server.writes == []
    await driver.close()


def battery_124_models() -> list[ModelSpec]:
    """A battery inverter like the simulator's: 1, 103, 120, 124, 802 (no 123)."""
    pv = pv_models()
    return [
        ModelSpec(1, raw={"Mn": "Acme", "Md": "BAT-1", "SN": "B1"}),
        pv[1],
        ModelSpec(
            120,
            raw={"DERTyp": 82, "WRtg_SF": 0, "MaxChaRte_SF": 0, "MaxDisChaRte_SF": 0},
            scaled={"WRtg": 5000.0, "MaxChaRte": 4000.0, "MaxDisChaRte": 5000.0},
        ),
        ModelSpec(
            124,
            raw={
                "WChaMax_SF": 0,
                "InOutWRte_SF": -2,
                "ChaState_SF": -1,
                "StorCtl_Mod": 0,
                "InOutWRte_WinTms": 0,
                "InOutWRte_RvrtTms": 0,
                "ChaSt": 6,
            },
            scaled={"WChaMax": 4000.0, "ChaState": 55.0, "InWRte": 0.0, "OutWRte": 0.0},
        ),
        ModelSpec(
            802,
            raw={"SoC_SF": -1, "WChaDisChaMax_SF": 0, "WHRtg_SF": 0, "State": 3},
            scaled={"SoC": 55.5, "WChaRteMax": 4000.0, "WDisChaRteMax": 5000.0, "WHRtg": 10000.0},
        ),
    ]


async def test_battery_124_writes_only_writable_registers_in_safe_order() -> None:
    specs = battery_124_models()
    # Refuse writes to read-only registers (ChaState, StorAval, InBatV, ChaSt sit inside the
    # 124 control range), as the simulator and SMA inverters do.
    server = await serve(specs, readonly=readonly_offsets(specs))
    driver = make_driver(server, DeviceKind.BATTERY, device_id="bat1")
    base = 40000 + model_offset(specs, 124)
    try:
        info = await driver.connect()
        assert info.schema.writable == {"StorCtlMod", "InWRte", "OutWRte"}
        assert values(await driver.read())["SoC"] == (55.5, Quality.GOOD)  # 802 before 124

        charge = await driver.write(battery_setpoint("bat1", active_w=-2000.0))
        assert charge.ok, charge.reason
        # Rates first (OutWRte, InWRte, WinTms, RvrtTms), then the mode that enables them.
        # InWRte = 2000 / WChaMax 4000 = 50 % -> 5000 at SF -2.
        assert server.writes == [(base + 12, [0, 5000, 0, 60]), (base + 5, [1])]
        assert charge.readback["124.StorCtl_Mod"] == 1.0

        server.writes.clear()
        discharge = await driver.write(battery_setpoint("bat1", active_w=1500.0))
        assert discharge.ok
        # OutWRte = 1500 / MaxDisChaRte 5000 = 30 %.
        assert server.writes == [(base + 12, [3000, 0, 0, 60]), (base + 5, [2])]

        server.writes.clear()
        release = await driver.write(battery_setpoint("bat1", active_w=None))
        assert release.ok
        assert server.writes == [(base + 5, [0]), (base + 12, [0, 0, 0, 60])]  # mode first

        hold = await driver.write(battery_setpoint("bat1", active_w=0.0))
        assert hold.ok
        assert hold.readback["124.StorCtl_Mod"] == 3.0  # both limits at 0 %: hold

        got = values(await driver.read())
        assert got["StorCtlMod"] == (3.0, Quality.GOOD)
    finally:
        await driver.close()
        await server.stop()


async def test_battery_via_704(monkeypatch: pytest.MonkeyPatch) -> None:
    specs = battery_7xx_models()
    server = await serve(specs, readonly=readonly_offsets(specs))
    driver = make_driver(server, DeviceKind.BATTERY, device_id="bat7")
    base = 40000 + model_offset(specs, 704)
    layout = get_layout(704)
    try:
        await driver.connect()
        result = await driver.write(battery_setpoint("bat7", active_w=-1234.5, revert_after_s=90))
        assert result.ok, result.reason
        assert result.readback["704.WSet"] == -1234.0  # magnitude floored to 1 W (WSet_SF 0)
        assert result.readback["704.WSetEna"] == 1.0
        assert result.readback["704.WSetMod"] == 1.0  # WATTS
        assert result.readback["704.WSetRvrtTms"] == 90.0
        assert result.readback["704.WMaxLimPctEna"] == 0.0
        wset_start = base + layout.point("WSetEna").offset
        cap_start = base + layout.point("WMaxLimPctEna").offset
        assert [a for a, _ in server.writes] == [wset_start, cap_start]
        assert all(len(w) == 11 for a, w in server.writes if a == wset_start)  # one FC16
        got = values(await driver.read())
        assert got["WMaxLimEna"] == (0.0, Quality.GOOD)
    finally:
        await driver.close()
        await server.stop()


async def test_pv_cap_via_704_carries_the_reversion_values_in_one_fc16() -> None:
    specs = pv_7xx_models()
    server = await serve(specs, readonly=readonly_offsets(specs))
    driver = make_driver(server, DeviceKind.PV, device_id="pv7")
    start = 40000 + model_offset(specs, 704) + get_layout(704).point("WMaxLimPctEna").offset
    try:
        info = await driver.connect()
        assert info.controls == {Control.GENERATION_CAP}  # 704 has no Conn
        result = await driver.write(
            pv_setpoint("pv7", cap_w=4000.0, revert_cap_w=1600.0, revert_after_s=60)
        )
        assert result.ok, result.reason
        assert result.reason is None
        # Ena, WMaxLimPct 50 % (of 702 WMax 8000 W, SF -1), WMaxLimPctRvrt 20 %, EnaRvrt,
        # RvrtTms (uint32): one FC16 over the writable run 14..19.
        assert server.writes == [(start, [1, 500, 200, 1, 0, 60])]
        assert result.readback["704.WMaxLimPctRvrt"] == 20.0
        assert result.readback["704.WMaxLimPctEnaRvrt"] == 1.0
        got = values(await driver.read())
        assert got["WMaxLimPct"] == (50.0, Quality.GOOD)
        assert got["WMaxLimPctRvrt"] == (20.0, Quality.GOOD)
        assert got["WMaxLimEnaRvrt"] == (1.0, Quality.GOOD)

        # No revert cap: the device's own default (EnaRvrt DISABLED); the value is left as is.
        server.writes.clear()
        result = await driver.write(pv_setpoint("pv7", cap_w=4000.0, revert_after_s=60))
        assert result.ok, result.reason
        assert server.writes == [(start, [1, 500, 200, 0, 0, 60])]
        # A revert cap is floored like the cap and clamped to 100 %.
        server.writes.clear()
        result = await driver.write(
            pv_setpoint("pv7", cap_w=None, revert_cap_w=9000.0, revert_after_s=30)
        )
        assert result.ok, result.reason
        assert server.writes == [(start, [0, 1000, 1000, 1, 0, 30])]
    finally:
        await driver.close()
        await server.stop()


async def test_704_without_reversion_registers_caps_and_says_so() -> None:
    specs = pv_7xx_models(reversion=False)
    server = await serve(specs, readonly=readonly_offsets(specs))
    driver = make_driver(server, DeviceKind.PV, device_id="pv7")
    start = 40000 + model_offset(specs, 704) + get_layout(704).point("WMaxLimPctEna").offset
    try:
        await driver.connect()
        result = await driver.write(pv_setpoint("pv7", cap_w=4000.0, revert_cap_w=1000.0))
        assert result.ok, result.reason
        assert "revert cap 1000 W not set" in (result.reason or "")
        # The not-implemented reversion registers are rewritten as they were (0xFFFF).
        assert server.writes == [(start, [1, 500, 0xFFFF, 0xFFFF, 0, 60])]
        plain = await driver.write(pv_setpoint("pv7", cap_w=4000.0))
        assert plain.ok
        assert plain.reason is None
    finally:
        await driver.close()
        await server.stop()


async def test_704_is_preferred_over_123_when_both_are_served() -> None:
    specs = [*pv_models(), *pv_7xx_models()[3:]]  # 1, 103, 120, 121, 123, 704
    server = await serve(specs, readonly=readonly_offsets(specs))
    driver = make_driver(server, DeviceKind.PV)
    m704 = 40000 + model_offset(specs, 704)
    try:
        await driver.connect()
        result = await driver.write(pv_setpoint(cap_w=4000.0, revert_cap_w=2000.0))
        assert result.ok, result.reason
        assert [a for a, _ in server.writes] == [
            m704 + get_layout(704).point("WMaxLimPctEna").offset
        ]
        assert "123.WMaxLimPct" not in result.readback
        got = values(await driver.read())
        assert got["WMaxLimPct"] == (50.0, Quality.GOOD)  # read from 704, what was written
        assert got["WMaxLimEna"] == (1.0, Quality.GOOD)
    finally:
        await driver.close()
        await server.stop()


async def test_123_cannot_hold_a_revert_cap_and_says_so(pv_server: ImageServer) -> None:
    driver = make_driver(pv_server, DeviceKind.PV)
    await driver.connect()
    result = await driver.write(pv_setpoint(cap_w=5000.0, revert_cap_w=1000.0))
    assert result.ok, result.reason
    assert "model 123 has no reversion values" in (result.reason or "")
    await driver.close()


async def test_concurrent_reads_and_writes_are_serialised(pv_server: ImageServer) -> None:
    driver = make_driver(pv_server, DeviceKind.PV)
    await driver.connect()
    results = await asyncio.gather(
        *[driver.read() for _ in range(10)],
        driver.write(pv_setpoint(cap_w=2000.0)),
        *[driver.read() for _ in range(10)],
    )
    assert all(r.ok for r in results)
    await driver.close()


# --------------------------------------------------------------------------- params, registry


def test_params_validation() -> None:
    p = SunSpecModbusParams(host="10.0.0.5")
    assert (p.port, p.unit_id, p.timeout_s, p.base_addresses, p.raw_points) == (
        502,
        1,
        1.0,
        (40000, 0, 50000),
        False,
    )
    for bad in (
        {"host": "h", "port": 0},
        {"host": "h", "port": 65536},
        {"host": "h", "unit_id": 0},
        {"host": "h", "unit_id": 248},
        {"host": "h", "revert_timeout_s": 60},
        {"host": "h", "base_addresses": []},
        {"host": ""},
    ):
        with pytest.raises(ValidationError):
            SunSpecModbusParams(**bad)


async def test_registry_builds_the_driver(pv_server: ImageServer) -> None:
    model = params_model("sunspec-modbus")
    assert model is SunSpecModbusParams
    params = model.model_validate({"host": "127.0.0.1", "port": pv_server.port, "timeout_s": 0.3})
    driver = create_driver("sunspec-modbus", "pv1", DeviceKind.PV, params, ManualClock())
    assert isinstance(driver, Driver)
    assert driver.device_id == "pv1"
    info = await driver.connect()
    assert info.kind is DeviceKind.PV
    await driver.close()


@given(st.binary(min_size=0, max_size=252))
def test_holding_registers_decode_matches_pymodbus(payload: bytes) -> None:
    """The C-speed FC3 decoder the links register gives pymodbus's own answer, for any
    byte count (odd, even, zero) and the same refusal of a frame shorter than its count."""
    for frame in (bytes([len(payload)]) + payload, bytes([len(payload) + 2]) + payload):
        ours, theirs = HoldingRegistersResponse(), ReadHoldingRegistersResponse()
        try:
            theirs.decode(frame)
        except ModbusIOException:
            with pytest.raises(ModbusIOException):
                ours.decode(frame)
            continue
        ours.decode(frame)
        assert ours.registers == theirs.registers

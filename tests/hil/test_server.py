"""The simulator on real sockets, checked with independent clients (pysunspec2, pymodbus)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ModbusIOException
from sunspec2.modbus.client import SunSpecModbusClientDeviceTCP

from hil.server import AcceptedWrite, Endpoint, Fault, SimulatorError, SiteSimulator
from hil.site import load_site
from tests.support import async_wait_until, free_tcp_port

from .conftest import QUIET_SITE, site_spec
from .test_site import SITES

pytestmark = pytest.mark.hil


def _scan(ep: Endpoint) -> SunSpecModbusClientDeviceTCP:
    device = SunSpecModbusClientDeviceTCP(
        slave_id=ep.unit_id, ipaddr=ep.host, ipport=ep.port, timeout=2
    )
    device.scan()
    return device


def _model_ids(device: SunSpecModbusClientDeviceTCP) -> list[int]:
    return sorted(k for k in device.models if isinstance(k, int))


async def _read_cvalue(model: Any, name: str) -> Any:
    await asyncio.to_thread(model.read)
    return getattr(model, name).cvalue


@pytest.fixture
async def client(quiet_sim: SiteSimulator) -> AsyncIterator[AsyncModbusTcpClient]:
    ep = quiet_sim.endpoints["pv1"]
    modbus = AsyncModbusTcpClient(ep.host, port=ep.port, timeout=1, retries=0)
    assert await modbus.connect()
    try:
        yield modbus
    finally:
        modbus.close()


async def test_pysunspec2_scans_every_device_and_reads_the_physics(
    quiet_sim: SiteSimulator,
) -> None:
    sim = quiet_sim
    pv, bat, meter = [
        await asyncio.to_thread(_scan, sim.endpoints[i]) for i in ("pv1", "bat1", "meter1")
    ]
    try:
        assert _model_ids(pv) == [1, 103, 120, 121, 123]
        assert _model_ids(bat) == [1, 103, 120, 124, 802]
        assert _model_ids(meter) == [1, 203]
        assert pv.base_addr == 40000
        common = pv.models[1][0]
        assert (common.Mn.cvalue, common.Md.cvalue, common.SN.cvalue) == (
            "dergw-sim",
            "sim-pv-inverter",
            "pv1",
        )
        assert bat.models[1][0].SN.cvalue == "bat1"
        state = sim.state()
        # Quiet site: 850 W/m² on 10 kW, 3 kW load, idle battery at 50 %.
        assert state.devices["pv1"].ac_w == pytest.approx(8500.0)
        assert pv.models[103][0].W.cvalue == pytest.approx(8500.0)
        assert pv.models[103][0].W_SF.value == 1  # served in tens of watts
        assert pv.models[103][0].Hz.cvalue == pytest.approx(50.0)
        assert pv.models[120][0].WRtg.cvalue == pytest.approx(10_000.0)
        assert pv.models[120][0].DERTyp.value == 4
        assert pv.models[123][0].WMaxLimPct.cvalue == pytest.approx(100.0)
        assert pv.models[123][0].WMaxLim_Ena.value == 0
        assert pv.models[123][0].Conn.value == 1
        m203 = meter.models[203][0]
        expected_meter = state.load_w - state.pv_w - state.battery_w
        assert expected_meter == pytest.approx(-5500.0)
        assert m203.W.cvalue == pytest.approx(expected_meter)
        assert sum(m203.points[f"Wph{p}"].cvalue for p in "ABC") == pytest.approx(-5500.0, abs=3)
        assert m203.TotWhExp.cvalue >= m203.TotWhImp.cvalue > 0
        assert m203.Hz.cvalue == pytest.approx(50.0)
        assert m203.PhV.cvalue == pytest.approx(230.0)
        b802, b124, b120 = bat.models[802][0], bat.models[124][0], bat.models[120][0]
        assert b802.SoC.cvalue == pytest.approx(state.devices["bat1"].soc_pct) == 50.0
        assert b124.ChaState.cvalue == pytest.approx(50.0)
        assert b802.State.value == 3  # CONNECTED
        assert (b802.SoCMin.cvalue, b802.SoCMax.cvalue) == (5.0, 95.0)
        assert b802.WChaRteMax.cvalue == b802.WDisChaRteMax.cvalue == 5000.0
        assert (b120.DERTyp.value, b120.WRtg.cvalue, b120.WHRtg.cvalue) == (82, 5000.0, 10_000.0)
        assert (b120.MaxChaRte.cvalue, b120.MaxDisChaRte.cvalue) == (5000.0, 5000.0)
        assert b124.StorCtl_Mod.value == 0
        assert bat.models[103][0].W.cvalue == 0
    finally:
        for device in (pv, bat, meter):
            device.close()


async def test_pysunspec2_curtails_pv_which_ramps_then_reverts(quiet_sim: SiteSimulator) -> None:
    sim = quiet_sim
    pv = await asyncio.to_thread(_scan, sim.endpoints["pv1"])
    try:
        inverter, controls = pv.models[103][0], pv.models[123][0]
        controls.WMaxLimPct.cvalue = 30
        controls.WMaxLim_Ena.cvalue = 1
        controls.WMaxLimPct_RvrtTms.cvalue = 2
        await asyncio.to_thread(controls.write)
        trace: list[float] = []

        async def curtailed() -> bool:
            trace.append(await _read_cvalue(inverter, "W"))
            return trace[-1] <= 3000.0

        await async_wait_until(curtailed, timeout_s=5, interval_s=0.01, what="PV at 30 %")
        # A ramp (10 kW/s here), not a step: the poller saw values on the way down.
        assert any(3100.0 < w < 8400.0 for w in trace), trace
        limited = sim.state().devices["pv1"]
        assert (limited.wmaxlim_pct, limited.wmaxlim_ena) == (30.0, 1)

        async def reverted() -> bool:
            return await _read_cvalue(controls, "WMaxLim_Ena") == 0

        # Nothing was written since: the device itself reverted after WMaxLimPct_RvrtTms.
        await async_wait_until(reverted, timeout_s=5, what="WMaxLim_Ena reverted")

        async def back_to_full() -> bool:
            return await _read_cvalue(inverter, "W") == pytest.approx(8500.0)

        await async_wait_until(back_to_full, timeout_s=5, what="PV back at 100 %")
    finally:
        pv.close()


async def test_pysunspec2_discharges_the_battery_and_the_meter_follows(
    quiet_sim: SiteSimulator,
) -> None:
    sim = quiet_sim
    bat = await asyncio.to_thread(_scan, sim.endpoints["bat1"])
    meter = await asyncio.to_thread(_scan, sim.endpoints["meter1"])
    try:
        storage = bat.models[124][0]
        storage.StorCtl_Mod.value = 2  # DISCHARGE
        storage.OutWRte.cvalue = 40  # % of 5 kW, InOutWRte_SF = -2 on this site
        await asyncio.to_thread(storage.write)
        m203 = meter.models[203][0]

        async def meter_shows_discharge() -> bool:
            return await _read_cvalue(m203, "W") == pytest.approx(3000 - 8500 - 2000)

        await async_wait_until(meter_shows_discharge, timeout_s=5, what="battery discharging")
        state = sim.state().devices["bat1"]
        assert (state.stor_ctl_mod, state.out_w_rte, state.ac_w) == (2, 40.0, 2000.0)
        assert await _read_cvalue(bat.models[103][0], "W") == pytest.approx(2000.0)
    finally:
        bat.close()
        meter.close()


async def test_writes_to_read_only_or_out_of_range_points_are_refused(
    quiet_sim: SiteSimulator, client: AsyncModbusTcpClient
) -> None:
    sim = quiet_sim
    addr = lambda ref: sim.address_of("pv1", ref)  # noqa: E731
    refused = {
        addr("103.W"): (1234, 2),  # read-only: ILLEGAL_ADDRESS
        addr("123.WMaxLimPct_SF"): (0, 2),
        addr("123.WMaxLimPct"): (1500, 3),  # 150 %: ILLEGAL_VALUE
        addr("123.WMaxLim_Ena"): (7, 3),  # not an enum symbol
        addr("123.WMaxLimPct_RvrtTms"): (0xFFFF, 3),  # the not-implemented value
    }
    for address, (value, code) in refused.items():
        before = (await client.read_holding_registers(address, count=1, device_id=1)).registers
        response = await client.write_register(address, value, device_id=1)
        assert response.isError(), address
        assert response.exception_code == code, address
        after = (await client.read_holding_registers(address, count=1, device_id=1)).registers
        assert after == before
    # A block spanning a writable and a read-only register is refused as a whole.
    response = await client.write_registers(addr("123.VArPct_Ena"), [1, 0], device_id=1)
    assert response.exception_code == 2
    bat = sim.endpoints["bat1"]
    response = await client.write_register(
        sim.address_of("bat1", "124.StorCtl_Mod"), 0b100, device_id=bat.unit_id
    )
    assert response.exception_code == 3


async def test_atomic_block_write_takes_effect_at_the_next_step(
    quiet_sim: SiteSimulator, client: AsyncModbusTcpClient
) -> None:
    sim = quiet_sim
    start = sim.address_of("pv1", "123.WMaxLimPct")
    assert sim.address_of("pv1", "123.WMaxLim_Ena") == start + 4
    response = await client.write_registers(start, [500, 0, 0, 0, 1], device_id=1)
    assert not response.isError()
    assert sim.read_point("pv1", "123.WMaxLimPct") == 50.0
    await async_wait_until(
        lambda: sim.state().devices["pv1"].ac_w == pytest.approx(5000.0),
        timeout_s=5,
        what="PV at 50 %",
    )


async def test_write_listener_times_accepted_writes_only(
    quiet_sim: SiteSimulator, client: AsyncModbusTcpClient
) -> None:
    sim = quiet_sim
    accepted: list[tuple[AcceptedWrite, object]] = []
    remove = sim.add_write_listener(
        lambda write: accepted.append((write, sim.read_point("pv1", "123.WMaxLimPct")))
    )
    start = sim.address_of("pv1", "123.WMaxLimPct")
    before = time.monotonic()
    assert not (await client.write_registers(start, [500, 0, 0, 0, 1], device_id=1)).isError()
    after = time.monotonic()
    assert (await client.write_register(start, 1500, device_id=1)).isError()  # 150 %: refused
    sim.set_fault("pv1", Fault.IGNORE_WRITES)
    assert not (await client.write_register(start, 600, device_id=1)).isError()
    sim.set_fault("pv1", None)
    assert len(accepted) == 1
    write, value_seen = accepted[0]
    assert write.device_id == "pv1"
    assert {"123.WMaxLimPct", "123.WMaxLim_Ena"} <= set(write.refs)
    assert before <= write.mono <= after
    assert value_seen == 50.0  # the listener sees the registers already holding the write
    remove()
    assert not (await client.write_register(start, 700, device_id=1)).isError()
    assert len(accepted) == 1


async def test_step_listener_sees_each_step_after_encoding() -> None:
    sim = SiteSimulator(site_spec())
    seen: list[tuple[float, int]] = []
    remove = sim.add_step_listener(lambda mono: seen.append((mono, sim.state().steps)))
    sim.step()
    sim.step()
    remove()
    sim.step()
    assert [steps for _, steps in seen] == [1, 2]
    assert seen[0][0] <= seen[1][0] <= time.monotonic()


async def test_silent_fault_times_out_and_clears(quiet_sim: SiteSimulator) -> None:
    sim = quiet_sim
    ep = sim.endpoints["pv1"]
    sim.set_fault("pv1", Fault.SILENT)
    silent = AsyncModbusTcpClient(ep.host, port=ep.port, timeout=0.3, retries=0)
    other = AsyncModbusTcpClient(ep.host, port=ep.port, timeout=1, retries=0)
    assert await silent.connect()
    assert await other.connect()
    try:
        started = time.monotonic()
        with pytest.raises(ModbusIOException):
            await silent.read_holding_registers(40000, count=2, device_id=ep.unit_id)
        assert time.monotonic() - started >= 0.25  # it waited for an answer that never came
        # The other devices on the same port keep answering.
        meter = sim.endpoints["meter1"]
        response = await other.read_holding_registers(40000, count=2, device_id=meter.unit_id)
        assert response.registers == [0x5375, 0x6E53]
        assert sim.state().devices["pv1"].fault is Fault.SILENT
        sim.set_fault("pv1", None)
        response = await other.read_holding_registers(40000, count=2, device_id=ep.unit_id)
        assert response.registers == [0x5375, 0x6E53]
    finally:
        silent.close()
        other.close()


async def test_exception_fault_returns_device_failure(
    quiet_sim: SiteSimulator, client: AsyncModbusTcpClient
) -> None:
    quiet_sim.set_fault("pv1", Fault.EXCEPTION)
    response = await client.read_holding_registers(40000, count=2, device_id=1)
    assert response.isError()
    assert response.exception_code == 4  # SERVER_DEVICE_FAILURE
    quiet_sim.set_fault("pv1", None)
    response = await client.read_holding_registers(40000, count=2, device_id=1)
    assert not response.isError()


async def test_frozen_fault_stops_updates_but_accepts_writes(
    quiet_sim: SiteSimulator, client: AsyncModbusTcpClient
) -> None:
    sim = quiet_sim
    w_addr = sim.address_of("pv1", "103.W")
    sim.set_fault("pv1", Fault.FROZEN)
    response = await client.write_registers(
        sim.address_of("pv1", "123.WMaxLimPct"), [100, 0, 0, 0, 1], device_id=1
    )
    assert not response.isError()
    await async_wait_until(
        lambda: sim.state().devices["pv1"].ac_w == pytest.approx(1000.0), timeout_s=5, what="10 %"
    )
    frozen = await client.read_holding_registers(w_addr, count=1, device_id=1)
    assert frozen.registers == [850]  # still 8500 W (W_SF = 1)
    assert sim.read_point("pv1", "123.WMaxLimPct") == 10.0  # the write landed
    sim.set_fault("pv1", None)
    live = await client.read_holding_registers(w_addr, count=1, device_id=1)
    assert live.registers == [100]


async def test_nan_meter_fault_serves_the_not_implemented_value(
    quiet_sim: SiteSimulator, client: AsyncModbusTcpClient
) -> None:
    sim = quiet_sim
    unit = sim.endpoints["meter1"].unit_id
    w_addr = sim.address_of("meter1", "203.W")
    sim.set_fault("meter1", Fault.NAN_METER)
    response = await client.read_holding_registers(w_addr, count=5, device_id=unit)
    assert response.registers[:4] == [0x8000] * 4  # W, WphA, WphB, WphC
    assert sim.read_point("meter1", "203.W") is None
    assert sim.state().meter_w == pytest.approx(-5500.0)  # the physics goes on
    steps = sim.state().steps
    await async_wait_until(lambda: sim.state().steps >= steps + 2, timeout_s=5, what="2 steps")
    assert sim.read_point("meter1", "203.W") is None
    sim.set_fault("meter1", None)
    assert sim.read_point("meter1", "203.W") == pytest.approx(-5500.0)
    with pytest.raises(SimulatorError, match="meters"):
        sim.set_fault("pv1", Fault.NAN_METER)
    with pytest.raises(SimulatorError, match="unknown device"):
        sim.read_point("nope", "203.W")


async def test_base_addresses_0_and_50000_scan() -> None:
    spec = load_site(SITES / "twelve.toml").with_overrides(port=0)
    async with SiteSimulator(spec) as sim:
        by_base = {0: "pv3", 50000: "pv5", 40000: "pv2"}
        for base, device_id in by_base.items():
            device = await asyncio.to_thread(_scan, sim.endpoints[device_id])
            try:
                assert device.base_addr == base
                assert _model_ids(device) == [1, 103, 120, 121, 123]
                assert device.models[1][0].SN.cvalue == device_id
                assert device.models[123][0].WMaxLimPct.cvalue == pytest.approx(100.0)
            finally:
                device.close()


async def test_devices_on_their_own_ports_and_fixed_ports() -> None:
    fixed = free_tcp_port()
    devices = [dict(d) for d in QUIET_SITE["devices"]]
    devices[1]["port"] = 0  # the battery gets a private free port
    devices[2]["port"] = fixed
    async with SiteSimulator(site_spec(devices=devices)) as sim:
        ports = {i: ep.port for i, ep in sim.endpoints.items()}
        assert len(set(ports.values())) == 3
        assert ports["meter1"] == fixed
        manifest = sim.manifest()
        assert manifest["site"] == "quiet"
        assert {d["id"]: d["port"] for d in manifest["devices"]} == ports
        assert {d["id"]: d["role"] for d in manifest["devices"]}["meter1"] == "pcc"
        for ep in sim.endpoints.values():
            modbus = AsyncModbusTcpClient(ep.host, port=ep.port, timeout=1, retries=0)
            assert await modbus.connect()
            response = await modbus.read_holding_registers(40000, count=2, device_id=ep.unit_id)
            modbus.close()
            assert response.registers == [0x5375, 0x6E53]


async def test_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        sim = SiteSimulator(site_spec(port=busy.getsockname()[1]))
        with pytest.raises(SimulatorError, match="port in use"):
            await sim.start()
    assert sim.physics_task is None


async def test_physics_runs_at_the_configured_rate(quiet_sim: SiteSimulator) -> None:
    started, first = time.monotonic(), quiet_sim.state().steps
    await async_wait_until(lambda: quiet_sim.state().steps >= first + 10, timeout_s=5, what="steps")
    rate = (quiet_sim.state().steps - first) / (time.monotonic() - started)
    assert 10 <= rate <= 30  # 20 Hz configured; loose bounds for a loaded machine


async def test_step_without_start_advances_simulated_time() -> None:
    sim = SiteSimulator(site_spec())
    for _ in range(20):
        sim.step()
    assert sim.state().t_s == pytest.approx(1.0)
    with pytest.raises(SimulatorError, match="start the simulator"):
        sim.manifest()

"""The driver contract, as one test suite every protocol's driver runs against its simulator.

A protocol's test module provides a `driver_case` fixture (an async generator yielding a
`DriverCase`: a built, not yet connected driver plus hooks on its simulator) and imports these
tests by name:

    from tests.drivers.contract_suite import *  # noqa: F403 - the shared contract tests

Each test is protocol-independent: discovery, a read with per-point quality, a write verified by
read-back, a silent device giving BAD_COMM (never old values, never an exception), recovery
after the device comes back, and a malformed answer counted as an error without a crash. The
SunSpec Modbus TCP case is in test_sunspec_contract.py.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np
import pytest

from drivers.contract import DeviceKind, Driver, LinkState, Quality
from gateway.safety import SafeSetpoint
from tests.drivers.setpoints import battery_setpoint, pv_setpoint

__all__ = [
    "DriverCase",
    "test_contract_discovery",
    "test_contract_malformed_answer_is_an_error",
    "test_contract_read_with_quality",
    "test_contract_recovers_after_restart",
    "test_contract_silent_device_is_bad_comm",
    "test_contract_write_reads_back",
]

Hook = Callable[[], Awaitable[None]]


@dataclass
class DriverCase:
    driver: Driver
    kind: DeviceKind
    make_silent: Hook  # the device stops answering (or its server goes away)
    restore: Hook  # the device answers again (a restart)
    make_malformed: Hook  # answers that break the protocol (every simulator can send them)
    # Points the driver must report under their canonical names (as the SunSpec driver does).
    expect_points: tuple[str, ...] = ("W",)
    rating_w: float = 10_000.0
    read_timeout_s: float = 5.0  # a read of a silent device returns within this
    recovery_timeout_s: float = 15.0
    notes: list[str] = field(default_factory=list)


def _setpoint(case: DriverCase) -> tuple[SafeSetpoint, str]:
    device_id = case.driver.device_id
    if case.kind is DeviceKind.PV:
        return pv_setpoint(device_id, cap_w=case.rating_w / 2, max_w=case.rating_w), "cap"
    if case.kind is DeviceKind.BATTERY:
        return (
            battery_setpoint(device_id, active_w=-case.rating_w / 4, max_w=case.rating_w),
            "fixed power",
        )
    pytest.skip("a meter takes no setpoints")


async def test_contract_discovery(driver_case: DriverCase) -> None:
    info = await driver_case.driver.connect()
    assert info.device_id == driver_case.driver.device_id
    assert info.kind is driver_case.kind
    assert info.protocol
    assert info.address
    missing = [name for name in driver_case.expect_points if name not in info.schema.index]
    assert not missing, f"{info.protocol} does not report {missing} (has {info.schema.names})"
    if driver_case.kind is not DeviceKind.METER:
        assert info.nameplate.max_w > 0
    assert driver_case.driver.health().state is LinkState.CONNECTED


async def test_contract_read_with_quality(driver_case: DriverCase) -> None:
    driver = driver_case.driver
    await driver.connect()
    reading = await driver.read()
    assert reading.ok, reading.error
    assert len(reading.values) == len(reading.quality) == len(reading.schema)
    good = reading.quality == Quality.GOOD
    assert good.any()
    assert np.isfinite(reading.values[good]).all()
    assert np.isnan(reading.values[reading.quality == Quality.BAD_COMM]).all()
    for name in driver_case.expect_points:
        assert reading.get(name) is not None, f"{name} is not GOOD"
    assert reading.wall_ns > 0
    assert reading.mono_ns > 0


async def test_contract_write_reads_back(driver_case: DriverCase) -> None:
    driver = driver_case.driver
    await driver.connect()
    setpoint, what = _setpoint(driver_case)
    result = await driver.write(setpoint)
    assert result.ok, f"{what} write not verified: {result.reason}"
    assert result.readback, "a verified write reports what it read back"


async def test_contract_silent_device_is_bad_comm(driver_case: DriverCase) -> None:
    driver = driver_case.driver
    await driver.connect()
    before = await driver.read()
    assert before.ok, before.error
    await driver_case.make_silent()
    started = time.monotonic()
    bad = await driver.read()
    assert time.monotonic() - started < driver_case.read_timeout_s
    assert not bad.ok
    assert bad.error
    assert (bad.quality == Quality.BAD_COMM).all()
    assert np.isnan(bad.values).all()  # never the last good values
    assert bad.mono_ns > before.mono_ns
    health = driver.health()
    assert health.consecutive_failures >= 1
    assert health.last_error
    if driver_case.kind is not DeviceKind.METER:
        setpoint, _ = _setpoint(driver_case)
        result = await driver.write(setpoint)
        assert not result.ok
        assert result.reason


async def test_contract_recovers_after_restart(driver_case: DriverCase) -> None:
    driver = driver_case.driver
    await driver.connect()
    await driver_case.make_silent()
    assert not (await driver.read()).ok
    await driver_case.restore()
    deadline = time.monotonic() + driver_case.recovery_timeout_s
    reading = await driver.read()
    while not reading.ok and time.monotonic() < deadline:
        reading = await driver.read()
    assert reading.ok, f"no recovery within {driver_case.recovery_timeout_s} s: {reading.error}"
    assert driver.health().consecutive_failures == 0
    assert driver.health().state is LinkState.CONNECTED
    value = reading.get(driver_case.expect_points[0])
    assert value is not None
    assert not math.isnan(value)


async def test_contract_malformed_answer_is_an_error(driver_case: DriverCase) -> None:
    driver = driver_case.driver
    await driver.connect()
    failures = driver.health().total_failures
    await driver_case.make_malformed()
    reading = await driver.read()
    assert not reading.ok
    assert reading.error
    assert driver.health().total_failures > failures
    await driver_case.restore()

"""drivers.sunspec.status: fault and trip detection from canonical points (pure)."""

from __future__ import annotations

import numpy as np
import pytest

from drivers.contract import PointSchema, Quality, Reading
from drivers.sunspec.status import (
    BATTERY_STATE_FAULT,
    INVERTER_STATE_FAULT,
    TRIP_EVENTS,
    device_fault,
    event_names,
    grid_response_reason,
)

NAMES = ("W", "St", "Evt1", "BatState", "BatEvt1")
SCHEMA = PointSchema(NAMES, ("W", "", "", "", ""))


def reading(
    *,
    st: float = 4.0,
    evt1: float = 0.0,
    bat_state: float = 3.0,
    bat_evt1: float = 0.0,
    quality: dict[str, Quality] | None = None,
    error: str | None = None,
) -> Reading:
    q = quality or {}
    return Reading(
        device_id="d",
        wall_ns=1,
        mono_ns=1,
        schema=SCHEMA,
        values=np.array([1000.0, st, evt1, bat_state, bat_evt1]),
        quality=np.array([q.get(n, Quality.GOOD) for n in NAMES], dtype=np.uint8),
        error=error,
    )


def test_symbols_come_from_the_model_json() -> None:
    assert INVERTER_STATE_FAULT == 7  # 103 St FAULT (701 InvSt 6 + the profile's offset 1)
    assert BATTERY_STATE_FAULT == 99  # 802 State FAULT
    assert event_names(0b1000_0001) == ("GROUND_FAULT", "OVER_TEMP")
    assert event_names(1 << 16) == ("MANUFACTURER_ALRM",)  # 701 Alrm only
    assert event_names(1 << 20) == ("BIT_20",)
    assert {"OVER_FREQUENCY", "UNDER_FREQUENCY", "AC_OVER_VOLT", "AC_UNDER_VOLT"} <= TRIP_EVENTS


def test_healthy_device_has_no_fault() -> None:
    assert device_fault(reading()) is None
    assert device_fault(reading(st=5.0)) is None  # THROTTLED
    assert device_fault(reading(evt1=float(1 << 7))) is None  # OVER_TEMP alone: derating


@pytest.mark.parametrize(
    ("st", "evt1", "expected"),
    [
        (7.0, 1.0, "St=FAULT, Evt1: GROUND_FAULT"),
        (7.0, 0.0, "St=FAULT, Evt1: none set"),
        (7.0, float(1 << 7 | 1 << 5), "St=FAULT, Evt1: CABINET_OPEN, OVER_TEMP"),
        (1.0, float(1 << 10), "Evt1: AC_OVER_VOLT"),  # a grid trip bit with St OFF
        (3.0, float(1 << 8 | 1 << 14), "Evt1: OVER_FREQUENCY, MEMORY_LOSS"),
    ],
)
def test_fault_state_and_trip_bits_are_named(st: float, evt1: float, expected: str) -> None:
    assert device_fault(reading(st=st, evt1=evt1)) == expected


def test_battery_bank_fault() -> None:
    fault = device_fault(reading(bat_state=99.0, bat_evt1=float(1 << 1 | 1 << 20)))
    assert fault == "battery State=FAULT, battery Evt1: OVER_TEMP_ALARM, CONTACTOR_ERROR"
    assert device_fault(reading(bat_state=5.0)) is None  # SOC PROTECTION is the BMS working


def test_points_that_are_not_good_say_nothing() -> None:
    assert device_fault(reading(st=7.0, quality={"St": Quality.NOT_IMPLEMENTED})) is None
    nan = reading(st=float("nan"), evt1=1.0, quality={"Evt1": Quality.OUT_OF_RANGE})
    assert device_fault(nan) is None
    failed = reading(st=7.0, quality=dict.fromkeys(NAMES, Quality.BAD_COMM), error="read failed")
    assert device_fault(failed) is None


def test_a_schema_without_status_points_has_no_fault() -> None:
    meter = Reading(
        device_id="m",
        wall_ns=1,
        mono_ns=1,
        schema=PointSchema(("W", "Hz"), ("W", "Hz")),
        values=np.array([-2000.0, 50.0]),
        quality=np.array([Quality.GOOD, Quality.GOOD], dtype=np.uint8),
    )
    assert device_fault(meter) is None


@pytest.mark.parametrize(
    ("throt_src", "quality", "expected"),
    [
        (0.0, Quality.GOOD, None),
        (float(1 << 0), Quality.GOOD, None),  # MAX_W: throttled by a setpoint, not the grid
        (float(1 << 5), Quality.GOOD, "ThrotSrc FREQ_WATT"),
        (float((1 << 5) | (1 << 10)), Quality.GOOD, "ThrotSrc FREQ_WATT, VOLT_WATT"),
        (float(1 << 5), Quality.NOT_IMPLEMENTED, None),  # says nothing
    ],
)
def test_grid_response_from_701_throttle_source(
    throt_src: float, quality: Quality, expected: str | None
) -> None:
    schema = PointSchema(("W", "ThrotSrc"), ("W", ""))
    values = np.array([1000.0, throt_src])
    qualities = np.array([Quality.GOOD, quality], dtype=np.uint8)
    assert grid_response_reason(schema, values, qualities) == expected

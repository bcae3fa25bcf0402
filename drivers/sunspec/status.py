"""Device protection state from a SunSpec reading: is the device in a fault or trip state, and why.

Owns the interpretation of the canonical status points (`drivers.sunspec.profile`) that say a
device has tripped, so that the gateway stops commanding it (protocols.md §3.2 rule 3: when the
inverter reports a trip, back off and report it; do not reissue the same control in a loop):

  * `St` = FAULT (the 101-103 enum; 7xx devices serve 701 `InvSt`, mapped onto it by the profile);
  * an `Evt1` trip bit (101-103 `Evt1`, 701 `Alrm`): GROUND_FAULT and the grid trips
    OVER_FREQUENCY, UNDER_FREQUENCY, AC_OVER_VOLT, AC_UNDER_VOLT (bits 8-11, §3.2). Other events
    (CABINET_OPEN, OVER_TEMP derating, ...) are named in the reason when the device is faulted
    but do not make a fault on their own;
  * battery `BatState` = FAULT (802 `State`), with the 802 `Evt1` alarms named when present.

Every symbol (enum values, bit positions) comes from pysunspec2's model JSON through
`drivers.sunspec.models`; only the choice of which events count as trips is written here, and
those names are checked against the JSON at import.

A point that is not GOOD (not implemented, failed read, out of range) says nothing: a device whose
read failed is unavailable, which is the snapshot's business, not a fault.

Pure: no I/O. The driver sets `Reading.fault` from `fault_reason()` on every read; the gateway
may call `device_fault(reading)` on any `drivers.contract.Reading` with the canonical names.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

import numpy as np
import numpy.typing as npt

from drivers.contract import PointSchema, Quality, Reading
from drivers.sunspec import models

__all__ = [
    "BATTERY_STATE_FAULT",
    "GRID_RESPONSES",
    "INVERTER_STATE_FAULT",
    "TRIP_EVENTS",
    "device_fault",
    "event_names",
    "fault_reason",
]


def _symbols(model_id: int, point: str) -> Mapping[str, int]:
    return models.get_layout(model_id).point(point).symbols


_ST: Final = _symbols(103, "St")
INVERTER_STATE_FAULT: Final = _ST["FAULT"]  # 7; 701 InvSt FAULT (6) arrives as 7
_ST_NAMES: Final = MappingProxyType({v: k for k, v in _ST.items()})
_BAT_STATE: Final = _symbols(802, "State")
BATTERY_STATE_FAULT: Final = _BAT_STATE["FAULT"]  # 99
# Evt1 bit -> name: 101-103 Evt1, plus the bits only 701 Alrm defines (same positions below 16).
_EVT1_BITS: Final = MappingProxyType(
    {v: k for k, v in _symbols(701, "Alrm").items()}
    | {v: k for k, v in _symbols(103, "Evt1").items()}
)
_GOOD: Final = int(Quality.GOOD)
_BAT_EVT1_BITS: Final = MappingProxyType({v: k for k, v in _symbols(802, "Evt1").items()})

TRIP_EVENTS: Final = frozenset(
    {"GROUND_FAULT", "OVER_FREQUENCY", "UNDER_FREQUENCY", "AC_OVER_VOLT", "AC_UNDER_VOLT"}
)
_unknown = TRIP_EVENTS - set(_EVT1_BITS.values())
if _unknown:  # pragma: no cover - a pysunspec2 upgrade renamed a symbol
    raise ImportError(f"Evt1 trip events {sorted(_unknown)} are not in the SunSpec 103 JSON")


def event_names(bits: int, table: Mapping[int, str] = _EVT1_BITS) -> tuple[str, ...]:
    """Names of the bits set in an Evt1 value, lowest bit first ("BIT_20" for undefined bits)."""
    return tuple(table.get(b, f"BIT_{b}") for b in range(bits.bit_length()) if bits >> b & 1)


def _good_int(
    schema: PointSchema, values: npt.NDArray[np.float64], quality: npt.NDArray[np.uint8], name: str
) -> int | None:
    i = schema.index.get(name)
    if i is None or int(quality[i]) != _GOOD:
        return None
    value = float(values[i])
    return int(value) if math.isfinite(value) else None


def fault_reason(
    schema: PointSchema, values: npt.NDArray[np.float64], quality: npt.NDArray[np.uint8]
) -> str | None:
    """Why the device is in a fault or trip state, or None; `device_fault` on packed arrays."""
    st = _good_int(schema, values, quality, "St")
    evt1 = _good_int(schema, values, quality, "Evt1") or 0
    bat_state = _good_int(schema, values, quality, "BatState")
    if st != INVERTER_STATE_FAULT and not evt1 and bat_state != BATTERY_STATE_FAULT:
        return None  # the common case, on every read: keep it cheap
    events = event_names(evt1)
    faulted = st == INVERTER_STATE_FAULT
    trips = [e for e in events if e in TRIP_EVENTS]
    parts: list[str] = []
    if faulted:
        parts.append(f"St={_ST_NAMES[INVERTER_STATE_FAULT]}")
    if faulted or trips:
        parts.append(f"Evt1: {', '.join(events)}" if events else "Evt1: none set")
    if bat_state == BATTERY_STATE_FAULT:
        parts.append("battery State=FAULT")
        bat_evt1 = _good_int(schema, values, quality, "BatEvt1")
        if bat_evt1:
            parts.append(f"battery Evt1: {', '.join(event_names(bat_evt1, _BAT_EVT1_BITS))}")
    return ", ".join(parts) if parts else None


# 701 ThrotSrc reasons that are autonomous grid support (IEEE 1547 §3.4 of protocols.md): while
# one is in force the inverter's output follows the grid, not the setpoint.
GRID_RESPONSES: Final = ("FREQ_WATT", "VOLT_WATT")
_THROT_SRC: Final = _symbols(701, "ThrotSrc")
_GRID_RESPONSE_BITS: Final = MappingProxyType({name: _THROT_SRC[name] for name in GRID_RESPONSES})


def grid_response_reason(
    schema: PointSchema, values: npt.NDArray[np.float64], quality: npt.NDArray[np.uint8]
) -> str | None:
    """Which grid-support response throttles the inverter now (701 ThrotSrc), or None."""
    throttled = _good_int(schema, values, quality, "ThrotSrc")
    if not throttled:
        return None
    active = [name for name, bit in _GRID_RESPONSE_BITS.items() if throttled >> bit & 1]
    return f"ThrotSrc {', '.join(active)}" if active else None


def device_fault(reading: Reading) -> str | None:
    """Why `reading`'s device reports a fault or trip, e.g. "St=FAULT, Evt1: GROUND_FAULT".

    None when the device looks healthy, or when the status points are not GOOD (a failed read
    is unavailability, judged by the snapshot's staleness rules, not a device fault).
    """
    if not reading.ok:
        return None
    return fault_reason(reading.schema, reading.values, reading.quality)

"""The canonical point set of SunSpec devices: a declarative table, and the rules to resolve it.

This module owns the mapping from what the gateway calls a point (`W`, `SoC`, `WMaxLimPct`, ...)
to where a SunSpec device serves it, in the style of Home Assistant's `EntityDescription`: one
frozen `CanonicalPoint` per name with its unit, its preferred sources `(model_id, point)` in order,
an optional linear conversion per source, and its physical range.

Source order rules:
  * the 7xx (IEEE 1547-2018 DER) models come before the 1xx models where both define the point;
  * control points list the model the driver *writes* first, so that a reading shows what the
    driver commanded, not a parallel control the driver does not touch: the power limit
    (`WMaxLimPct`, `WMaxLimEna`) 704 before 123 (protocols.md §2.2 "Which to use"); `Conn` 123
    (704 has none; 701 `ConnSt` reports it); storage (`StorCtlMod`, `InWRte`, `OutWRte`) 124.

Conversions (declared per source, never guessed):
  * `PF` is a ratio (-1..1): models 101-103/111-113 and 201-204 serve percent (units "Pct"),
    converted with scale 0.01; 701 and 211-214 serve the ratio.
  * `St` uses the 101-103 enum (OFF=1 ... MPPT=4 ... STANDBY=8); 701 `InvSt` is the same list
    starting at 0, converted with offset +1.
  * `Evt1` uses the 101-103 bit positions; 701 `Alrm` has the same bits 0-15 (and adds
    MANUFACTURER_ALRM = 16). `drivers.sunspec.status.device_fault` names them.

Protection inputs (what the gateway judges device protection and BMS limits on; all present on
both model families where the device serves them): `St` (103 enum, FAULT = 7), `Evt1` (trip
bits), `Hz` (inverters and meters), battery `SoC`, `WChaRteMax` / `WDisChaRteMax` (802 BMS
dynamic limits), `BatState` (802, FAULT = 99), `BatEvt1` (802 alarms) and, on 7xx devices,
`ThrotSrc` (701: MAX_W, FREQ_WATT, ... = why the output is throttled) and the 704 reversion
values `WMaxLimPctRvrt` / `WMaxLimEnaRvrt` that the driver writes.
Sign conventions: inverter `W` + = export/discharge (SunSpec AC power out of the inverter);
meter `W` + = import from the grid (SunSpec meter convention); both as served, no sign flips.

Pure data and pure functions: no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from drivers.contract import DeviceKind

__all__ = [
    "BATTERY_MODELS",
    "CONTROL_MODELS",
    "INVERTER_MODELS",
    "METER_MODELS",
    "NAMEPLATE_SOURCES",
    "PROFILES",
    "STORAGE_CONTROL_MODELS",
    "CanonicalPoint",
    "ResolvedPoint",
    "Source",
    "kind_requirements",
    "missing_for_kind",
    "resolve",
]

INVERTER_INT: Final = (101, 102, 103)
INVERTER_FLOAT: Final = (111, 112, 113)
INVERTER_MODELS: Final = frozenset((*INVERTER_INT, *INVERTER_FLOAT, 701))
CONTROL_MODELS: Final = frozenset((123, 704))
BATTERY_MODELS: Final = frozenset((124, 802, 713))
STORAGE_CONTROL_MODELS: Final = frozenset((124, 704))
METER_INT: Final = (201, 202, 203, 204)
METER_FLOAT: Final = (211, 212, 213, 214)
METER_MODELS: Final = frozenset((*METER_INT, *METER_FLOAT))


@dataclass(frozen=True, slots=True)
class Source:
    """Where a device may serve a canonical point: value = served × scale + offset."""

    model_id: int
    point: str
    scale: float = 1.0
    offset: float = 0.0


@dataclass(frozen=True, slots=True)
class CanonicalPoint:
    """One canonical point: name, unit, sources in preference order and physical range.

    A GOOD value outside [valid_min, valid_max] (or NaN/inf) is reported OUT_OF_RANGE. When
    `nameplate_factor` is set, |value| must also be ≤ factor × the device's power rating
    (max of max_w and max_va) if that rating is known.
    """

    name: str
    unit: str
    sources: tuple[Source, ...]
    valid_min: float = -math.inf
    valid_max: float = math.inf
    nameplate_factor: float | None = None
    control: bool = False  # changed by Driver.write()


@dataclass(frozen=True, slots=True)
class ResolvedPoint:
    """A canonical point bound to the source chosen on one device."""

    point: CanonicalPoint
    source: Source


def _each(model_ids: Iterable[int], point: str, scale: float = 1.0) -> tuple[Source, ...]:
    return tuple(Source(m, point, scale) for m in model_ids)


_INV_ALL: Final = (*INVERTER_INT, *INVERTER_FLOAT)

_INVERTER: Final[tuple[CanonicalPoint, ...]] = (
    CanonicalPoint("W", "W", (Source(701, "W"), *_each(_INV_ALL, "W")), nameplate_factor=10.0),
    CanonicalPoint("VA", "VA", (Source(701, "VA"), *_each(_INV_ALL, "VA")), nameplate_factor=10.0),
    CanonicalPoint(
        "Var", "var", (Source(701, "Var"), *_each(_INV_ALL, "VAr")), nameplate_factor=10.0
    ),
    CanonicalPoint(
        "PF", "", (Source(701, "PF"), *_each(_INV_ALL, "PF", 0.01)), valid_min=-1.0, valid_max=1.0
    ),
    CanonicalPoint("Hz", "Hz", (Source(701, "Hz"), *_each(_INV_ALL, "Hz")), 40.0, 70.0),
    CanonicalPoint("V", "V", (Source(701, "VL1"), *_each(_INV_ALL, "PhVphA")), 0.0, 1000.0),
    CanonicalPoint("A", "A", (Source(701, "A"), *_each(_INV_ALL, "A"))),
    CanonicalPoint("WH", "Wh", (Source(701, "TotWhInj"), *_each(_INV_ALL, "WH")), valid_min=0.0),
    CanonicalPoint("DCW", "W", _each(_INV_ALL, "DCW"), nameplate_factor=10.0),
    CanonicalPoint(
        "TmpCab", "C", (Source(701, "TmpCab"), *_each(_INV_ALL, "TmpCab")), -60.0, 150.0
    ),
    CanonicalPoint("St", "", (Source(701, "InvSt", offset=1.0), *_each(_INV_ALL, "St"))),
    CanonicalPoint("Evt1", "", (Source(701, "Alrm"), *_each(_INV_ALL, "Evt1"))),
    CanonicalPoint("ThrotSrc", "", (Source(701, "ThrotSrc"),)),
    CanonicalPoint("WRtg", "W", (Source(702, "WMaxRtg"), Source(120, "WRtg")), valid_min=0.0),
    CanonicalPoint("WMax", "W", (Source(702, "WMax"), Source(121, "WMax")), valid_min=0.0),
    CanonicalPoint(
        "WMaxLimPct",
        "%",
        (Source(704, "WMaxLimPct"), Source(123, "WMaxLimPct")),
        0.0,
        100.0,
        control=True,
    ),
    CanonicalPoint(
        "WMaxLimEna",
        "",
        (Source(704, "WMaxLimPctEna"), Source(123, "WMaxLim_Ena")),
        0.0,
        1.0,
        control=True,
    ),
    CanonicalPoint(
        "WMaxLimPctRvrt", "%", (Source(704, "WMaxLimPctRvrt"),), 0.0, 100.0, control=True
    ),
    CanonicalPoint(
        "WMaxLimEnaRvrt", "", (Source(704, "WMaxLimPctEnaRvrt"),), 0.0, 1.0, control=True
    ),
    CanonicalPoint(
        "Conn", "", (Source(123, "Conn"), Source(701, "ConnSt")), 0.0, 1.0, control=True
    ),
)

_BATTERY_EXTRA: Final[tuple[CanonicalPoint, ...]] = (
    CanonicalPoint(
        "SoC", "%", (Source(802, "SoC"), Source(713, "SoC"), Source(124, "ChaState")), 0.0, 100.0
    ),
    CanonicalPoint("WChaMax", "W", (Source(702, "WChaRteMax"), Source(124, "WChaMax")), 0.0),
    CanonicalPoint("WChaRteMax", "W", (Source(802, "WChaRteMax"),), valid_min=0.0),
    CanonicalPoint("WDisChaRteMax", "W", (Source(802, "WDisChaRteMax"),), valid_min=0.0),
    CanonicalPoint("StorCtlMod", "", (Source(124, "StorCtl_Mod"),), 0.0, 3.0, control=True),
    CanonicalPoint("InWRte", "%", (Source(124, "InWRte"),), -100.0, 100.0, control=True),
    CanonicalPoint("OutWRte", "%", (Source(124, "OutWRte"),), -100.0, 100.0, control=True),
    CanonicalPoint("BatState", "", (Source(802, "State"),)),
    CanonicalPoint("BatEvt1", "", (Source(802, "Evt1"),)),
)

_METER_ALL: Final = (*METER_INT, *METER_FLOAT)

_METER: Final[tuple[CanonicalPoint, ...]] = (
    CanonicalPoint("W", "W", _each(_METER_ALL, "W")),
    CanonicalPoint("WphA", "W", _each(_METER_ALL, "WphA")),
    CanonicalPoint("WphB", "W", _each(_METER_ALL, "WphB")),
    CanonicalPoint("WphC", "W", _each(_METER_ALL, "WphC")),
    CanonicalPoint("Var", "var", _each(_METER_ALL, "VAR")),
    CanonicalPoint("VA", "VA", _each(_METER_ALL, "VA")),
    CanonicalPoint(
        "PF",
        "",
        (*_each(METER_INT, "PF", 0.01), *_each(METER_FLOAT, "PF")),
        valid_min=-1.0,
        valid_max=1.0,
    ),
    CanonicalPoint("Hz", "Hz", _each(_METER_ALL, "Hz"), 40.0, 70.0),
    CanonicalPoint(
        "V", "V", (*_each(_METER_ALL, "PhVphA"), *_each(_METER_ALL, "PhV")), 0.0, 1000.0
    ),
    CanonicalPoint("A", "A", _each(_METER_ALL, "A")),
    CanonicalPoint("TotWhImp", "Wh", _each(_METER_ALL, "TotWhImp"), valid_min=0.0),
    CanonicalPoint("TotWhExp", "Wh", _each(_METER_ALL, "TotWhExp"), valid_min=0.0),
)

# The canonical table per device kind (PV and battery share the inverter points).
PROFILES: Final[Mapping[DeviceKind, tuple[CanonicalPoint, ...]]] = MappingProxyType(
    {
        DeviceKind.PV: _INVERTER,
        DeviceKind.BATTERY: (*_INVERTER, *_BATTERY_EXTRA),
        DeviceKind.METER: _METER,
    }
)

# Nameplate fields (drivers.contract.Nameplate) and their sources, first GOOD value > 0 wins.
# max_w prefers the WMax *setting* (the effective limit, ≤ the rating) over the rating.
NAMEPLATE_SOURCES: Final[Mapping[str, tuple[Source, ...]]] = MappingProxyType(
    {
        "max_w": (
            Source(702, "WMax"),
            Source(121, "WMax"),
            Source(702, "WMaxRtg"),
            Source(120, "WRtg"),
        ),
        "max_va": (
            Source(702, "VAMax"),
            Source(121, "VAMax"),
            Source(702, "VAMaxRtg"),
            Source(120, "VARtg"),
        ),
        "max_var": (
            Source(702, "VarMaxInj"),
            Source(121, "VArMaxQ1"),
            Source(702, "VarMaxInjRtg"),
            Source(120, "VArRtgQ1"),
        ),
        "max_charge_w": (
            Source(120, "MaxChaRte"),
            Source(702, "WChaRteMax"),
            Source(702, "WChaRteMaxRtg"),
            Source(802, "WChaRteMax"),
            Source(124, "WChaMax"),
        ),
        "max_discharge_w": (
            Source(120, "MaxDisChaRte"),
            Source(702, "WDisChaRteMax"),
            Source(702, "WDisChaRteMaxRtg"),
            Source(802, "WDisChaRteMax"),
        ),
        "energy_wh": (Source(802, "WHRtg"), Source(713, "WHRtg"), Source(120, "WHRtg")),
    }
)


def kind_requirements(kind: DeviceKind) -> tuple[tuple[str, frozenset[int]], ...]:
    """What a device of `kind` must serve: (what, any-of model ids) pairs.

    A PV inverter needs measurements and a power limit (123 or 704). A battery inverter needs
    measurements, storage data and a way to command its power (124 or 704 WSet); 123 is optional
    for it (many storage inverters, and the simulator, control storage through 124 alone).
    """
    inverter = ("an inverter model (101-103, 111-113 or 701)", INVERTER_MODELS)
    if kind is DeviceKind.METER:
        return (("a meter model (201-204 or 211-214)", METER_MODELS),)
    if kind is DeviceKind.BATTERY:
        return (
            inverter,
            ("storage (124, 802 or 713)", BATTERY_MODELS),
            ("storage controls (124 or 704)", STORAGE_CONTROL_MODELS),
        )
    return (inverter, ("controls (123 or 704)", CONTROL_MODELS))


def missing_for_kind(kind: DeviceKind, model_ids: Collection[int]) -> list[str]:
    """The requirements of `kind` that `model_ids` does not meet (empty = the device fits)."""
    present = set(model_ids)
    return [what for what, ids in kind_requirements(kind) if not present & ids]


def resolve(
    kind: DeviceKind,
    has_point: Callable[[int, str], bool],
    implemented: Callable[[int, str], bool] | None = None,
) -> list[ResolvedPoint]:
    """Bind each canonical point of `kind` to the first source the device serves.

    `has_point(model_id, point)` says whether the device's map has that point. When
    `implemented(model_id, point)` is given, a source whose value is the "not implemented"
    sentinel is passed over in favour of a later source that is implemented; if none is, the
    first present source is kept (the point then reads NOT_IMPLEMENTED, which is the truth).
    Points without any present source are left out: they are not part of the device's schema.
    """
    out: list[ResolvedPoint] = []
    for cp in PROFILES[kind]:
        present = [s for s in cp.sources if has_point(s.model_id, s.point)]
        if not present:
            continue
        chosen = present[0]
        if implemented is not None:
            chosen = next((s for s in present if implemented(s.model_id, s.point)), present[0])
        out.append(ResolvedPoint(cp, chosen))
    return out

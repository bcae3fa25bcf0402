"""The canonical point table: every source exists in the shipped models, resolution rules hold."""

from __future__ import annotations

import pytest

from drivers.contract import DeviceKind
from drivers.sunspec.models import get_layout
from drivers.sunspec.profile import (
    NAMEPLATE_SOURCES,
    PROFILES,
    missing_for_kind,
    resolve,
)

INVERTER_NAMES = {"W", "VA", "Var", "PF", "Hz", "V", "A", "WH", "DCW", "TmpCab", "St", "Evt1"}
INVERTER_NAMES |= {"WRtg", "WMax", "WMaxLimPct", "WMaxLimEna", "Conn", "ThrotSrc"}
INVERTER_NAMES |= {"WMaxLimPctRvrt", "WMaxLimEnaRvrt"}
BATTERY_EXTRA = {"SoC", "WChaMax", "WChaRteMax", "WDisChaRteMax", "StorCtlMod", "InWRte"}
BATTERY_EXTRA |= {"OutWRte", "BatState", "BatEvt1"}
METER_NAMES = {"W", "WphA", "WphB", "WphC", "Var", "VA", "PF", "Hz", "V", "A", "TotWhImp"}
METER_NAMES |= {"TotWhExp"}


def test_canonical_names_per_kind() -> None:
    assert {p.name for p in PROFILES[DeviceKind.PV]} == INVERTER_NAMES
    assert {p.name for p in PROFILES[DeviceKind.BATTERY]} == INVERTER_NAMES | BATTERY_EXTRA
    assert {p.name for p in PROFILES[DeviceKind.METER]} == METER_NAMES


def test_every_source_names_a_numeric_point_of_a_shipped_model() -> None:
    sources = [s for pts in PROFILES.values() for cp in pts for s in cp.sources]
    sources += [s for ss in NAMEPLATE_SOURCES.values() for s in ss]
    for s in sources:
        layout = get_layout(s.model_id)
        assert s.point in layout, s
        assert layout.point(s.point).numeric, s


def test_7xx_before_1xx_for_measurements() -> None:
    for cp in PROFILES[DeviceKind.BATTERY]:
        ids = [s.model_id for s in cp.sources]
        if cp.control:
            continue  # control points list the written model first (documented)
        sevens = [i for i, m in enumerate(ids) if m >= 700]
        ones = [i for i, m in enumerate(ids) if m < 200]
        if sevens and ones:
            assert max(sevens) < min(ones), cp.name


def _has(models: dict[int, set[str] | None]):
    def has_point(mid: int, point: str) -> bool:
        return mid in models and (models[mid] is None or point in models[mid])  # type: ignore[operator]

    return has_point


def test_resolve_picks_first_present_source_and_skips_absent_points() -> None:
    resolved = resolve(DeviceKind.PV, _has({103: None, 120: None, 123: None}))
    by_name = {r.point.name: r.source for r in resolved}
    assert by_name["W"].model_id == 103
    assert by_name["PF"].scale == 0.01
    assert "WMax" not in by_name  # no 121 or 702 on this device
    both = {r.point.name: r.source for r in resolve(DeviceKind.PV, _has({701: None, 103: None}))}
    assert both["W"].model_id == 701
    assert both["St"].point == "InvSt"
    assert both["St"].offset == 1.0


def test_resolve_passes_over_unimplemented_sources() -> None:
    resolved = resolve(
        DeviceKind.PV,
        _has({701: None, 103: None}),
        implemented=lambda mid, point: not (mid == 701 and point == "W"),
    )
    by_name = {r.point.name: r.source for r in resolved}
    assert by_name["W"].model_id == 103  # 701 W serves the sentinel
    assert by_name["VA"].model_id == 701


@pytest.mark.parametrize(
    ("kind", "models", "missing"),
    [
        (DeviceKind.PV, [1, 103, 123], []),
        (DeviceKind.PV, [1, 701, 704], []),
        (DeviceKind.PV, [1, 103], ["controls (123 or 704)"]),
        (DeviceKind.BATTERY, [1, 103, 120, 124, 802], []),
        (
            DeviceKind.BATTERY,
            [1, 103, 123],
            ["storage (124, 802 or 713)", "storage controls (124 or 704)"],
        ),
        (DeviceKind.METER, [1, 203], []),
        (DeviceKind.METER, [1, 103, 123], ["a meter model (201-204 or 211-214)"]),
    ],
)
def test_kind_requirements(kind: DeviceKind, models: list[int], missing: list[str]) -> None:
    assert missing_for_kind(kind, models) == missing


def test_power_limit_reads_from_704_before_123() -> None:
    # The driver writes the cap to 704 when both are served: the reading must show 704.
    both = {r.point.name: r.source for r in resolve(DeviceKind.PV, _has({123: None, 704: None}))}
    assert (both["WMaxLimPct"].model_id, both["WMaxLimEna"].model_id) == (704, 704)
    assert both["Conn"].model_id == 123  # 704 has no connect control
    only_123 = {r.point.name for r in resolve(DeviceKind.PV, _has({103: None, 123: None}))}
    assert not {"WMaxLimPctRvrt", "WMaxLimEnaRvrt", "ThrotSrc"} & only_123

"""Layouts compiled from pysunspec2's JSON equal pysunspec2's own view of each model."""

from __future__ import annotations

import pytest
from sunspec2.device import Model

from drivers.sunspec.models import (
    LayoutError,
    UnknownModelError,
    available_model_ids,
    get_layout,
)

USED = (1, 101, 102, 103, 111, 112, 113, 120, 121, 122, 123, 124, 201, 202, 203, 204)
USED += (211, 212, 213, 214, 701, 702, 703, 704, 713, 802)


def _pysunspec2_points(model_id: int, length: int | None = None) -> tuple[int, dict[str, tuple]]:
    m = Model(model_id, model_len=length or 0)
    assert not m.error_info, m.error_info
    points = {name: (p.offset, p.len, p.pdef["type"]) for name, p in m.points.items()}
    for gname, group in m.groups.items():
        if not isinstance(group, list):  # fixed (non-repeating) nested group
            points |= {
                f"{gname}.{name}": (p.offset, p.len, p.pdef["type"])
                for name, p in group.points.items()
            }
    return m.len, points


@pytest.mark.parametrize("model_id", USED)
def test_layout_matches_pysunspec2(model_id: int) -> None:
    layout = get_layout(model_id)
    total, expected = _pysunspec2_points(model_id)
    assert layout.size == total  # L + 2
    assert {p.name: (p.offset, p.size, p.type) for p in layout.points} == expected
    assert layout.skipped_groups == ()


def test_every_shipped_model_without_counts_matches_pysunspec2() -> None:
    compared = 0
    for model_id in available_model_ids():
        layout = get_layout(model_id)
        if layout.skipped_groups:
            continue  # repeating groups need counts from a device: not compiled (documented)
        _, expected = _pysunspec2_points(model_id)
        assert {p.name: (p.offset, p.size, p.type) for p in layout.points} == expected, model_id
        compared += 1
    assert compared > 50


def test_point_metadata_from_json() -> None:
    layout = get_layout(103)
    w = layout.point("W")
    assert (w.offset, w.size, w.type, w.units, w.access, w.mandatory) == (
        14,
        1,
        "int16",
        "W",
        "R",
        True,
    )
    assert w.sf == "W_SF"
    assert w.sf_index is not None
    assert layout.points[w.sf_index].name == "W_SF"
    assert layout.point("St").symbols["MPPT"] == 4
    ctl = get_layout(123)
    assert ctl.point("WMaxLimPct").writable
    assert ctl.point("WMaxLimPct").offset == 5
    assert ctl.point("WMaxLim_Ena").offset == 9
    assert ctl.point("WMaxLim_Ena").symbols == {"DISABLED": 0, "ENABLED": 1}
    assert not ctl.point("WMaxLimPct_SF").writable


def test_legacy_common_model_without_pad() -> None:
    legacy = get_layout(1, 65)
    assert legacy.size == 67
    assert "Pad" not in legacy
    assert legacy.point("DA").offset == 66
    total, expected = _pysunspec2_points(1, 65)
    assert total == 67
    assert {p.name: (p.offset, p.size, p.type) for p in legacy.points} == expected
    assert "Pad" in get_layout(1)
    assert get_layout(1).size == 68


def test_layouts_are_cached() -> None:
    assert get_layout(103) is get_layout(103)
    assert get_layout(103) is get_layout(103, 50)
    assert get_layout(1, 65) is not get_layout(1)


def test_repeating_groups_are_skipped_and_named() -> None:
    mppt = get_layout(160, 8 + 20 * 2)
    assert mppt.skipped_groups == ("module",)
    assert max(p.end for p in mppt.points) == 10  # the fixed part only
    ctl = get_layout(704)  # fixed nested groups are compiled with a prefix
    assert ctl.point("PFWInj.PF").offset == 59
    assert ctl.point("PFWInj.PF").sf == "PF_SF"


def test_short_model_length_truncates_points() -> None:
    short = get_layout(103, 40)  # a device serving an older, shorter 103
    assert short.length == 40
    assert "EvtVnd4" in short.truncated
    assert "EvtVnd4" not in short
    assert all(p.end <= 42 for p in short.points)
    assert short.point("W").sf_index is not None


def test_unknown_model_and_bad_length() -> None:
    with pytest.raises(UnknownModelError, match="no SunSpec definition for model 64999"):
        get_layout(64999)
    with pytest.raises(LayoutError):
        get_layout(103, -1)

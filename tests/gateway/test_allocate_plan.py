"""Allocation and planning: deterministic splits, each share within its device's limits."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.contract import DeviceKind
from gateway.allocate import split_proportional
from gateway.intent import Controls, SiteConstraints
from gateway.plan import plan
from gateway.safety import DeviceState
from gateway.schedule import MODES, ActiveControls, ControlSource, ModeSource, ScopeControls


@settings(max_examples=300, deadline=None)
@given(
    st.floats(0, 1e6),
    st.lists(st.tuples(st.floats(0, 1e4), st.floats(0, 1e4)), min_size=1, max_size=12),
)
def test_split_respects_caps_and_conserves(total: float, pairs: list[tuple[float, float]]) -> None:
    weights = np.array([w for w, _ in pairs])
    caps = np.array([c for _, c in pairs])
    shares = split_proportional(total, weights, caps)
    assert np.all(shares >= 0.0)
    assert np.all(shares <= caps + 1e-6)
    assert np.all(shares[weights <= 0] == 0.0)
    reachable = min(total, float(caps[(weights > 0) & (caps > 0)].sum()))
    assert shares.sum() == pytest.approx(reachable, rel=1e-9, abs=1e-4)
    # Deterministic: same inputs, same bits.
    assert np.array_equal(shares, split_proportional(total, weights, caps))


def test_split_terminates_with_subnormal_weights() -> None:
    # Regression: remaining * 5e-324 underflowed to 0 and the loop never progressed.
    shares = split_proportional(1e6, np.array([1.0, 5e-324]), np.array([0.0, 2e-6]))
    assert shares.tolist() == pytest.approx([0.0, 2e-6])


def test_split_redistributes_what_a_capped_device_cannot_take() -> None:
    shares = split_proportional(
        9000.0, np.array([1.0, 1.0, 1.0]), np.array([1000.0, 5000.0, 5000.0])
    )
    assert shares.tolist() == pytest.approx([1000.0, 4000.0, 4000.0])


def _devices() -> dict[str, DeviceState]:
    return {
        "pv_a": DeviceState("pv_a", DeviceKind.PV, 3000.0),
        "pv_b": DeviceState("pv_b", DeviceKind.PV, 6000.0),
        "pv_c": DeviceState("pv_c", DeviceKind.PV, 12000.0),
        "pv_down": DeviceState("pv_down", DeviceKind.PV, 5000.0, available=False),
        "bat": DeviceState("bat", DeviceKind.BATTERY, 5000.0, 5000.0, 5000.0),
    }


def _from_event(controls: Controls, event_id: str) -> ScopeControls:
    source = ModeSource(ControlSource.EVENT, f"event {event_id}", event_id)
    modes = {m: source for m in MODES if getattr(controls, m) is not None}
    return ScopeControls(controls, modes)


def _active(site: Controls) -> ActiveControls:
    return ActiveControls(intent_version=4, site=_from_event(site, "e1"))


def test_site_gen_limit_is_split_by_rating_across_available_devices_and_logged() -> None:
    result = plan(_active(Controls(gen_limit_w=13000.0)), _devices())
    caps = {p.device_id: p.max_active_power_w for p in result.planned}
    assert "pv_down" not in caps  # unavailable devices take no share
    assert caps == pytest.approx({"pv_a": 1500.0, "pv_b": 3000.0, "pv_c": 6000.0, "bat": 2500.0})
    assert any("split gen_limit_w 13000 W" in line for line in result.log)


def test_site_target_beyond_capacity_clamps_each_device_to_its_rating() -> None:
    result = plan(_active(Controls(target_w=1e6)), _devices())
    by_id = {p.device_id: p for p in result.planned}
    assert by_id["pv_c"].max_active_power_w == pytest.approx(12000.0)
    assert by_id["bat"].active_power_w == pytest.approx(5000.0)


def test_device_scoped_controls_touch_only_that_device() -> None:
    active = ActiveControls(
        intent_version=4,
        site=ScopeControls(),
        device={"pv_b": _from_event(Controls(max_gen_pct=50.0), "d1")},
    )
    by_id = {p.device_id: p for p in plan(active, _devices()).planned}
    assert by_id["pv_b"].max_active_power_w == 3000.0
    assert by_id["pv_b"].origin == ("event d1: max_gen_pct 50 %",)
    assert all(p.max_active_power_w is None for k, p in by_id.items() if k != "pv_b")


def test_limits_collect_every_source() -> None:
    result = plan(
        _active(Controls(export_limit_w=2000.0)),
        _devices(),
        contract_export_limit_w=5000.0,
        constraints=SiteConstraints(export_limit_w=4000.0),
    )
    assert [(limit.source, limit.watts) for limit in result.export_limits] == [
        ("event e1", 2000.0),
        ("site constraints v4", 4000.0),
        ("site contract (config)", 5000.0),
    ]


def test_battery_fixed_charge_is_split_by_charge_rating() -> None:
    devices = _devices() | {
        "bat2": DeviceState("bat2", DeviceKind.BATTERY, 10000.0, 15000.0, 10000.0)
    }
    by_id = {p.device_id: p for p in plan(_active(Controls(fixed_w=-10000.0)), devices).planned}
    assert by_id["bat"].active_power_w == pytest.approx(-2500.0)
    assert by_id["bat2"].active_power_w == pytest.approx(-7500.0)

"""Allocation and planning: deterministic splits, each share within its device's limits."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.contract import DeviceKind
from gateway.allocate import (
    allocate_export,
    allocate_import,
    split_by_headroom,
    split_proportional,
)
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
    # A target is not a limit: PV gets it as a target cap (ramped), not as a limit cap.
    assert by_id["pv_c"].target_cap_w == pytest.approx(12000.0)
    assert by_id["pv_c"].max_active_power_w is None
    assert by_id["pv_c"].target_source == "event e1: target_w share"
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


# -- headroom splits (the safety kernel's allocation) -------------------------------------------

_room = st.lists(st.floats(0.0, 1e4), min_size=0, max_size=8).map(
    lambda xs: np.array(xs, dtype=np.float64)
)


@settings(max_examples=10_000, deadline=None)
@given(st.floats(0.0, 1e5), _room)
def test_split_by_headroom_conserves_and_respects_every_headroom(
    total: float, room: np.ndarray
) -> None:
    shares = split_by_headroom(total, room)
    assert np.all(shares >= 0.0)
    assert np.all(shares <= room * (1 + 1e-12) + 1e-9)
    assert shares.sum() == pytest.approx(min(total, float(room.sum())), rel=1e-9, abs=1e-6)
    # Proportional: every device moves the same share of its headroom.
    visible = room > 1e-3
    if visible.any():
        moved = shares[visible] / room[visible]
        assert float(moved.max() - moved.min()) <= 1e-9


def _export_case(seed: int, n_pv: int, n_free: int, n_cmd: int) -> dict[str, object]:
    rng = np.random.default_rng(seed)
    pv_ceiling = rng.uniform(0.0, 1e4, n_pv) * (rng.random(n_pv) > 0.1)
    pv_floor = pv_ceiling * rng.uniform(0.0, 1.0, n_pv) * (rng.random(n_pv) < 0.3)
    pv_ref = pv_floor + (pv_ceiling - pv_floor) * rng.uniform(0.0, 1.0, n_pv)
    free_now = rng.uniform(-5e3, 5e3, n_free)
    free_floor = free_now - rng.uniform(0.0, 5e3, n_free) * (rng.random(n_free) > 0.2)
    free_release = np.maximum(-free_now, 0.0) * (rng.random(n_free) < 0.5)
    commanded = rng.uniform(-5e3, 5e3, n_cmd)
    commanded_floor = np.minimum(np.maximum(commanded, 0.0) * rng.uniform(0, 1, n_cmd), commanded)
    return {
        "budget_w": float(rng.uniform(-1e4, 5e4)),
        "pv_reference_w": pv_ref,
        "pv_floor_w": pv_floor,
        "pv_ceiling_w": pv_ceiling,
        "free_now_w": free_now,
        "free_floor_w": free_floor,
        "free_release_w": free_release,
        "commanded_w": commanded,
        "commanded_floor_w": commanded_floor,
    }


@settings(max_examples=10_000, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(0, 6), st.integers(0, 3), st.integers(0, 3))
def test_export_allocation_meets_the_budget_within_every_device_limit(
    seed: int, n_pv: int, n_free: int, n_cmd: int
) -> None:
    case = _export_case(seed, n_pv, n_free, n_cmd)
    budget = float(case.pop("budget_w"))  # type: ignore[arg-type]
    arrays: dict[str, np.ndarray] = case  # type: ignore[assignment]
    result = allocate_export(budget, **arrays)
    tol = 1e-6 * max(1.0, abs(budget)) + 1e-6
    # Every device within its own limits.
    assert np.all(result.pv_caps_w >= arrays["pv_floor_w"] - tol)
    assert np.all(result.pv_caps_w <= arrays["pv_ceiling_w"] + tol)
    assert np.all(result.free_w >= arrays["free_floor_w"] - tol)
    assert np.all(result.free_w <= arrays["free_now_w"] + arrays["free_release_w"] + tol)
    assert np.all(result.commanded_w >= arrays["commanded_floor_w"] - tol)
    assert np.all(result.commanded_w <= arrays["commanded_w"] + tol)
    total = result.pv_caps_w.sum() + result.free_w.sum() + result.commanded_w.sum()
    before = (
        arrays["pv_reference_w"].sum() + arrays["free_now_w"].sum() + arrays["commanded_w"].sum()
    )
    if before > budget:
        # Conserves: exactly the excess is removed, or everything removable and the rest reported.
        assert total == pytest.approx(budget + result.shortfall_w, rel=1e-9, abs=1e-6)
        # Soak before curtail: PV is curtailed only once the free batteries are at their floor.
        if np.any(result.pv_caps_w < arrays["pv_reference_w"] - tol):
            assert np.allclose(result.free_w, arrays["free_floor_w"], atol=tol)
        if np.any(result.commanded_w < arrays["commanded_w"] - tol):
            assert np.allclose(result.pv_caps_w, arrays["pv_floor_w"], atol=tol)
    else:
        assert result.shortfall_w == 0.0
        assert total <= budget + tol
        assert np.all(result.pv_caps_w >= arrays["pv_reference_w"] - tol)


@settings(max_examples=10_000, deadline=None)
@given(st.floats(0.0, 2e4), st.integers(0, 2**32 - 1), st.integers(0, 4))
def test_import_allocation_raises_batteries_within_their_ceilings(
    needed: float, seed: int, n: int
) -> None:
    rng = np.random.default_rng(seed)
    now = rng.uniform(-5e3, 5e3, n)
    ceiling = now + rng.uniform(0.0, 5e3, n) * (rng.random(n) > 0.2)
    result = allocate_import(needed, battery_now_w=now, battery_ceiling_w=ceiling)
    assert np.all(result.battery_w >= now - 1e-9)
    assert np.all(result.battery_w <= ceiling + 1e-6)
    raised = float((result.battery_w - now).sum())
    assert raised + result.shortfall_w == pytest.approx(needed, rel=1e-9, abs=1e-6)


# -- planning -----------------------------------------------------------------------------------


def test_faulted_devices_take_no_share_but_are_still_planned() -> None:
    devices = _devices() | {
        "pv_b": DeviceState("pv_b", DeviceKind.PV, 6000.0, fault="St=FAULT"),
    }
    result = plan(_active(Controls(gen_limit_w=10_000.0)), devices)
    by_id = {p.device_id: p for p in result.planned}
    # pv_b is planned (the kernel holds it safe) but takes no share; the others take over.
    assert by_id["pv_b"].max_active_power_w is None
    assert by_id["pv_a"].max_active_power_w == pytest.approx(1500.0)
    assert by_id["pv_c"].max_active_power_w == pytest.approx(6000.0)
    assert by_id["bat"].max_active_power_w == pytest.approx(2500.0)


def test_reallocation_is_automatic_each_cycle_when_a_device_drops_out() -> None:
    active = _active(Controls(target_w=9000.0))
    healthy = {p.device_id: p.target_cap_w for p in plan(active, _devices()).planned}
    assert healthy["pv_b"] == pytest.approx(9000.0 * 6 / 26)
    devices = _devices() | {
        "pv_b": DeviceState("pv_b", DeviceKind.PV, 6000.0, available=False),
    }
    dropped = {p.device_id: p for p in plan(active, devices).planned}
    assert "pv_b" not in dropped
    # The same 9 kW, now over 20 kW of rating instead of 26 kW.
    assert dropped["pv_a"].target_cap_w == pytest.approx(9000.0 * 3 / 20)
    assert dropped["pv_c"].target_cap_w == pytest.approx(9000.0 * 12 / 20)
    assert dropped["bat"].active_power_w == pytest.approx(9000.0 * 5 / 20)


def test_shares_respect_what_each_device_can_do_now() -> None:
    devices = _devices() | {
        "bat": DeviceState(
            "bat", DeviceKind.BATTERY, 5000.0, 5000.0, 5000.0, bms_discharge_max_w=1000.0
        )
    }
    by_id = {p.device_id: p for p in plan(_active(Controls(target_w=13_000.0)), devices).planned}
    # By rating the battery would get 2500 W; its BMS allows 1000 W, the PV takes the rest.
    assert by_id["bat"].active_power_w == pytest.approx(1000.0)
    pv_total = sum(by_id[k].target_cap_w or 0.0 for k in ("pv_a", "pv_b", "pv_c"))
    assert pv_total == pytest.approx(12_000.0)


def test_device_scope_overrides_the_site_mode_by_mode_and_the_site_total_still_holds() -> None:
    active = ActiveControls(
        intent_version=4,
        site=_from_event(Controls(max_gen_pct=50.0, gen_limit_w=12_000.0, connect=True), "s1"),
        device={"pv_c": _from_event(Controls(max_gen_pct=80.0, gen_limit_w=2000.0), "d1")},
    )
    by_id = {p.device_id: p for p in plan(active, _devices()).planned}
    # pv_c: its own max_gen_pct replaces the site's, and its own gen limit binds.
    assert by_id["pv_c"].max_active_power_w == pytest.approx(2000.0)
    assert by_id["pv_c"].cap_source == "event d1: gen_limit_w"
    # The others share the 10 kW left of the site's 12 kW, each under the site's 50 %.
    assert by_id["pv_a"].max_active_power_w == pytest.approx(1500.0)
    assert by_id["pv_b"].max_active_power_w == pytest.approx(3000.0)
    assert by_id["bat"].max_active_power_w == pytest.approx(2500.0)
    assert all(p.connect is True for p in by_id.values())


def test_limits_ramps_connect_and_soc_reach_the_planned_setpoints() -> None:
    active = _active(
        Controls(load_limit_w=3000.0, energize=False, ramp_time_s=30.0, fixed_w=-2000.0)
    )
    constraints = SiteConstraints(soc_min_pct=20.0, soc_max_pct=90.0)
    by_id = {p.device_id: p for p in plan(active, _devices(), constraints=constraints).planned}
    bat = by_id["bat"]
    assert bat.max_charge_w == 3000.0
    assert bat.charge_source == "event e1: load_limit_w share"
    assert bat.active_power_w == -2000.0
    assert (bat.soc_min_pct, bat.soc_max_pct, bat.soc_source) == (20.0, 90.0, "site constraints v4")
    # energize=False is a disconnect (there is no separate energize control).
    assert all(p.connect is False for p in by_id.values())
    assert by_id["pv_a"].connect_source == "event e1: de-energize"
    assert all(p.ramp_time_s == 30.0 for p in by_id.values())
    assert by_id["pv_a"].soc_min_pct is None


def test_limits_from_defaults_and_the_contract_are_standing() -> None:
    default = ModeSource(ControlSource.DEFAULT, "default v4")
    active = ActiveControls(
        intent_version=4,
        site=ScopeControls(Controls(export_limit_w=3000.0), {"export_limit_w": default}),
    )
    result = plan(active, _devices(), contract_export_limit_w=5000.0)
    assert [(lim.source, lim.standing) for lim in result.export_limits] == [
        ("default v4", True),
        ("site contract (config)", True),
    ]
    event = plan(_active(Controls(export_limit_w=3000.0)), _devices())
    assert [lim.standing for lim in event.export_limits] == [False]

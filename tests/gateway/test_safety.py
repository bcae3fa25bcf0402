"""The safety kernel: SafeSetpoint is unforgeable, and no enforced setpoint violates a limit."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.contract import ALL_CONTROLS, Control, DeviceKind
from gateway.safety import (
    DeviceState,
    KernelPolicy,
    KernelState,
    Limit,
    PlannedSetpoint,
    SafeSetpoint,
    SiteConditions,
    UnsafeSetpointError,
    enforce,
)

PV = DeviceKind.PV
BATTERY = DeviceKind.BATTERY


def _pv(device_id: str, max_w: float, measured_w: float | None = None) -> DeviceState:
    return DeviceState(device_id=device_id, kind=PV, max_w=max_w, measured_w=measured_w)


def _battery(device_id: str, max_w: float, measured_w: float | None = 0.0) -> DeviceState:
    return DeviceState(
        device_id=device_id,
        kind=BATTERY,
        max_w=max_w,
        max_charge_w=max_w,
        max_discharge_w=max_w,
        measured_w=measured_w,
    )


def test_safe_setpoint_cannot_be_built_outside_the_kernel() -> None:
    with pytest.raises(TypeError):
        SafeSetpoint(  # type: ignore[call-arg]
            device_id="pv1",
            max_active_power_w=1e9,
            active_power_w=None,
            connect=None,
            revert_after_s=60,
            bound_by=(),
        )
    with pytest.raises(UnsafeSetpointError):
        SafeSetpoint(
            device_id="pv1",
            max_active_power_w=1e9,
            active_power_w=None,
            connect=None,
            revert_after_s=60,
            bound_by=(),
            mint=object(),
        )


def test_safe_setpoint_cannot_be_copied_with_changes() -> None:
    (setpoint,) = enforce(
        [PlannedSetpoint("pv1", max_active_power_w=1000.0)],
        {"pv1": _pv("pv1", 5000.0)},
        SiteConditions(pcc_w=None),
        revert_after_s=60,
    ).setpoints
    with pytest.raises(ValueError, match="InitVar"):
        dataclasses.replace(setpoint, max_active_power_w=1e9)


def test_nameplate_clamps_and_says_why() -> None:
    (setpoint,) = enforce(
        [PlannedSetpoint("pv1", max_active_power_w=9000.0)],
        {"pv1": _pv("pv1", 5000.0)},
        SiteConditions(pcc_w=None),
        revert_after_s=60,
    ).setpoints
    assert setpoint.max_active_power_w == 5000.0
    assert setpoint.bound_by == ("nameplate pv1: 5000 W",)
    assert setpoint.revert_after_s == 60


def test_unknown_and_unavailable_devices_are_never_commanded() -> None:
    result = enforce(
        [PlannedSetpoint("ghost", max_active_power_w=1.0), PlannedSetpoint("pv1")],
        {"pv1": DeviceState("pv1", PV, 5000.0, available=False, unavailable_reason="silent")},
        SiteConditions(pcc_w=None),
        revert_after_s=60,
    )
    assert result.setpoints == ()
    assert dict(result.skipped) == {
        "ghost": "unknown device: not in this gateway's inventory",
        "pv1": "silent",
    }


def test_export_limit_closed_loop_curtails_pv_by_rating_share() -> None:
    # Exporting 6 kW (pcc -6000) with PV making 9 kW; limit 2 kW -> PV budget 5 kW - margin.
    result = enforce(
        [PlannedSetpoint("pv1"), PlannedSetpoint("pv2")],
        {"pv1": _pv("pv1", 6000.0, 6000.0), "pv2": _pv("pv2", 3000.0, 3000.0)},
        SiteConditions(pcc_w=-6000.0, export_limits=(Limit("event e1", 2000.0),)),
        revert_after_s=30,
        policy=KernelPolicy(export_margin_w=50.0),
    )
    caps = {s.device_id: s.max_active_power_w for s in result.setpoints}
    assert caps["pv1"] == pytest.approx((9000 - 6000 + 2000 - 50) * 6 / 9)
    assert caps["pv2"] == pytest.approx((9000 - 6000 + 2000 - 50) * 3 / 9)
    assert all("export limit (event e1): 2000 W" in s.bound_by[0] for s in result.setpoints)


def test_tightest_export_limit_wins_and_is_named() -> None:
    result = enforce(
        [PlannedSetpoint("pv1")],
        {"pv1": _pv("pv1", 10000.0, 5000.0)},
        SiteConditions(
            pcc_w=-1000.0,
            export_limits=(Limit("site contract (config)", 5000.0), Limit("event e2", 500.0)),
        ),
        revert_after_s=30,
        policy=KernelPolicy(export_margin_w=0.0),
    )
    (setpoint,) = result.setpoints
    assert setpoint.max_active_power_w == pytest.approx(5000 - 1000 + 500)
    assert "event e2" in setpoint.bound_by[0]


def test_stale_meter_switches_to_open_loop() -> None:
    (setpoint,) = enforce(
        [PlannedSetpoint("pv1")],
        {"pv1": _pv("pv1", 10000.0, 8000.0)},
        SiteConditions(
            pcc_w=None,
            export_limits=(Limit("event e1", 1000.0),),
        ),
        revert_after_s=30,
        policy=KernelPolicy(export_margin_w=0.0, assumed_min_load_w=300.0),
    ).setpoints
    assert setpoint.max_active_power_w == pytest.approx(1300.0)
    assert "open loop" in setpoint.bound_by[0]


def test_zero_export_with_discharging_battery_cuts_discharge() -> None:
    result = enforce(
        [PlannedSetpoint("pv1"), PlannedSetpoint("bat1", active_power_w=4000.0)],
        {"pv1": _pv("pv1", 5000.0, 0.0), "bat1": _battery("bat1", 5000.0, 0.0)},
        SiteConditions(pcc_w=1000.0, export_limits=(Limit("event z", 0.0),)),
        revert_after_s=30,
        policy=KernelPolicy(export_margin_w=0.0),
    )
    by_id = {s.device_id: s for s in result.setpoints}
    # Load is 1 kW: discharging 4 kW would export 3 kW; discharge is cut to the load.
    assert by_id["bat1"].active_power_w == pytest.approx(1000.0)
    assert by_id["pv1"].max_active_power_w == 0.0


finite_w = st.floats(min_value=-2e5, max_value=2e5, allow_nan=False)
any_w = st.one_of(st.none(), finite_w, st.just(math.nan), st.just(math.inf))


Case = tuple[list[PlannedSetpoint], dict[str, DeviceState], SiteConditions, KernelPolicy]


@st.composite
def sites(draw: st.DrawFn) -> Case:
    n_pv = draw(st.integers(0, 4))
    n_bat = draw(st.integers(0, 2))
    # Mostly fully controllable devices (where the export bound is asserted), sometimes not.
    controls = st.one_of(
        st.just(ALL_CONTROLS),
        st.just(ALL_CONTROLS),
        st.frozensets(st.sampled_from(list(Control))),
    )
    connect = st.sampled_from([None, True, False])
    devices: dict[str, DeviceState] = {}
    planned: list[PlannedSetpoint] = []
    for i in range(n_pv):
        rating = draw(st.floats(100.0, 50000.0))
        pv = _pv(f"pv{i}", rating, draw(st.floats(0.0, rating)))
        devices[f"pv{i}"] = dataclasses.replace(pv, controls=draw(controls))
        planned.append(
            PlannedSetpoint(f"pv{i}", max_active_power_w=draw(any_w), connect=draw(connect))
        )
    for i in range(n_bat):
        rating = draw(st.floats(100.0, 20000.0))
        battery = _battery(f"bat{i}", rating, draw(st.floats(-rating, rating)))
        devices[f"bat{i}"] = dataclasses.replace(battery, controls=draw(controls))
        planned.append(
            PlannedSetpoint(
                f"bat{i}",
                max_active_power_w=draw(any_w),
                active_power_w=draw(any_w),
                connect=draw(connect),
            )
        )
    limits = tuple(
        Limit(f"l{i}", draw(st.floats(0.0, 1e5))) for i in range(draw(st.integers(0, 3)))
    )
    site = SiteConditions(pcc_w=draw(st.one_of(st.none(), finite_w)), export_limits=limits)
    policy = KernelPolicy(
        export_margin_w=draw(st.floats(0.0, 500.0)),
        assumed_min_load_w=draw(st.floats(0.0, 1000.0)),
    )
    return planned, devices, site, policy


@settings(max_examples=400, deadline=None)
@given(sites())
def test_no_enforced_setpoint_ever_violates_a_limit(case: Case) -> None:
    planned, devices, site, policy = case
    result = enforce(planned, devices, site, revert_after_s=60, policy=policy)
    for setpoint in result.setpoints:
        device = devices[setpoint.device_id]
        # Never a command the device has no control for.
        if setpoint.max_active_power_w is not None:
            assert Control.GENERATION_CAP in device.controls
        if setpoint.active_power_w is not None:
            assert Control.ACTIVE_POWER in device.controls
        if setpoint.connect is not None:
            assert Control.CONNECT in device.controls
        cap = setpoint.max_active_power_w
        if cap is not None:
            assert math.isfinite(cap)
            assert 0.0 <= cap <= device.max_w
        active = setpoint.active_power_w
        if active is not None:
            assert device.kind is BATTERY
            assert math.isfinite(active)
            assert -device.max_charge_w <= active <= device.max_discharge_w
            if cap is not None:
                assert active <= cap + 1e-6
    fully_controllable = all(d.controls == ALL_CONTROLS for d in devices.values())
    if site.export_limits and devices and fully_controllable:
        # Predicted export after the commands never exceeds the tightest limit.
        limit = min(limit.watts for limit in site.export_limits)
        pv = [s for s in result.setpoints if devices[s.device_id].kind is PV]
        bat = [s for s in result.setpoints if devices[s.device_id].kind is BATTERY]
        pv_after = sum(
            s.max_active_power_w if s.max_active_power_w is not None else devices[s.device_id].max_w
            for s in pv
        )
        bat_after = sum(
            s.active_power_w
            if s.active_power_w is not None
            else (devices[s.device_id].measured_w or 0.0)
            for s in bat
        )
        if site.pcc_w is not None:
            pv_now = sum(devices[s.device_id].measured_w or 0.0 for s in pv)
            bat_now = sum(devices[s.device_id].measured_w or 0.0 for s in bat)
            load = site.pcc_w + pv_now + bat_now
        else:
            load = policy.assumed_min_load_w
        export_after = pv_after + bat_after - load
        # Only when the limit is reachable by curtailment and cutting discharge (charging
        # batteries are never asked to charge harder by the export limiter).
        if load + max(0.0, -bat_after) >= 0.0 and bat_after >= 0.0:
            assert export_after <= limit + 1e-6


def test_uncontrollable_generation_is_a_given_not_a_share() -> None:
    # Found by hypothesis: pv2 cannot be capped and makes 200 W; under a 0 W export limit the
    # budget must not hand that 200 W to pv0/pv1 as if pv2 would obey.
    fixed = dataclasses.replace(_pv("pv2", 200.0, 200.0), controls=frozenset())
    result = enforce(
        [PlannedSetpoint("pv0"), PlannedSetpoint("pv1"), PlannedSetpoint("pv2")],
        {"pv0": _pv("pv0", 100.0, 0.0), "pv1": _pv("pv1", 100.0, 0.0), "pv2": fixed},
        SiteConditions(pcc_w=0.0, export_limits=(Limit("l", 0.0),)),
        revert_after_s=60,
        policy=KernelPolicy(export_margin_w=0.0),
    )
    caps = {s.device_id: s.max_active_power_w for s in result.setpoints}
    assert caps["pv0"] == 0.0
    assert caps["pv1"] == 0.0


def test_every_enforced_setpoint_is_a_safe_setpoint() -> None:
    result = enforce(
        [PlannedSetpoint("pv1", max_active_power_w=1.0)],
        {"pv1": _pv("pv1", 10.0)},
        SiteConditions(pcc_w=None),
        revert_after_s=60,
    )
    assert all(isinstance(s, SafeSetpoint) for s in result.setpoints)


def test_controls_a_device_lacks_are_never_commanded_and_caps_become_fixed_power() -> None:
    # A battery with only a storage control (SunSpec 124, no 123): asked to connect and capped
    # below its rating, it gets no connect and its cap as fixed power (idle here).
    battery = dataclasses.replace(
        _battery("bat1", 5000.0), controls=frozenset({Control.ACTIVE_POWER})
    )
    (setpoint,) = enforce(
        [PlannedSetpoint("bat1", max_active_power_w=2000.0, connect=True)],
        {"bat1": battery},
        SiteConditions(pcc_w=None),
        revert_after_s=60,
    ).setpoints
    assert setpoint.connect is None
    assert setpoint.max_active_power_w is None
    assert setpoint.active_power_w == 0.0
    assert any("no connect control" in why for why in setpoint.bound_by)
    # A non-binding cap (100 %) is simply not needed.
    (setpoint,) = enforce(
        [PlannedSetpoint("bat1", max_active_power_w=5000.0)],
        {"bat1": battery},
        SiteConditions(pcc_w=None),
        revert_after_s=60,
    ).setpoints
    assert (setpoint.max_active_power_w, setpoint.active_power_w) == (None, None)


def test_a_binding_cap_on_a_device_without_any_lever_is_refused_with_a_reason() -> None:
    meterless_pv = dataclasses.replace(_pv("pv1", 5000.0), controls=frozenset())
    result = enforce(
        [PlannedSetpoint("pv1", max_active_power_w=1000.0)],
        {"pv1": meterless_pv},
        SiteConditions(pcc_w=None),
        revert_after_s=60,
    )
    assert result.setpoints == ()
    assert result.skipped == (
        ("pv1", "device pv1 cannot be capped at 1000 W: it has no generation-cap control"),
    )


def test_default_controls_are_all() -> None:
    assert _pv("pv1", 1.0).controls == ALL_CONTROLS


def test_export_budget_tightens_at_once_and_relaxes_gradually() -> None:
    devices = {"pv1": _pv("pv1", 10000.0, 4000.0)}

    def budget(pcc_w: float, previous: float | None) -> float | None:
        return enforce(
            [PlannedSetpoint("pv1")],
            devices,
            SiteConditions(pcc_w=pcc_w, export_limits=(Limit("event e", 2000.0),)),
            revert_after_s=60,
            policy=KernelPolicy(export_margin_w=0.0, export_relax_gain=0.5),
            state=KernelState(pv_budget_w=previous),
        ).state.pv_budget_w

    # Headroom of 1 kW (export 1 kW under a 2 kW limit): half of it per cycle.
    assert budget(-1000.0, previous=4000.0) == pytest.approx(4500.0)
    # Over the limit by 1 kW: the whole correction at once.
    assert budget(-3000.0, previous=4000.0) == pytest.approx(3000.0)
    # No history (first cycle under this limit): the measured budget.
    assert budget(-1000.0, previous=None) == pytest.approx(5000.0)

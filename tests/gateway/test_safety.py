"""The safety kernel: SafeSetpoint is unforgeable, and no enforced setpoint violates a limit.

Composition order, protection, interlocks, the SoC guard, the ramp, reversion values and the
"why" of every setpoint; the closed loop against a plant is in test_pcc.py.
"""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.contract import ALL_CONTROLS, Control, DeviceKind
from gateway.intent import Controls
from gateway.pcc import PccLoopState
from gateway.safety import (
    DeviceMemory,
    DeviceState,
    Enforcement,
    Interlock,
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
        soc_pct=50.0,
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
            state=KernelState(loop=PccLoopState(export_budget_w=previous)),
        ).state.export_budget_w

    # Headroom of 1 kW (export 1 kW under a 2 kW limit): half of it per cycle.
    assert budget(-1000.0, previous=4000.0) == pytest.approx(4500.0)
    # Over the limit by 1 kW: the whole correction at once.
    assert budget(-3000.0, previous=4000.0) == pytest.approx(3000.0)
    # No history (first cycle under this limit): the measured budget.
    assert budget(-1000.0, previous=None) == pytest.approx(5000.0)


# -- composition order and protection -----------------------------------------------------------

NS = 1_000_000_000


def _enforce(
    planned: list[PlannedSetpoint],
    devices: dict[str, DeviceState],
    site: SiteConditions | None = None,
    *,
    policy: KernelPolicy | None = None,
    state: KernelState | None = None,
) -> dict[str, SafeSetpoint]:
    result = enforce(
        planned,
        devices,
        site or SiteConditions(pcc_w=None),
        revert_after_s=60,
        policy=policy or KernelPolicy(),
        state=state or KernelState(),
    )
    return {s.device_id: s for s in result.setpoints}


def test_a_faulted_device_is_only_commanded_towards_safety() -> None:
    pv = dataclasses.replace(_pv("pv1", 5000.0, 0.0), fault="St=FAULT (over-voltage trip)")
    battery = dataclasses.replace(_battery("bat1", 5000.0, 800.0), fault="BMS alarm")
    by_id = _enforce(
        [
            PlannedSetpoint("pv1", max_active_power_w=4000.0, connect=True, cap_source="event e"),
            PlannedSetpoint("bat1", active_power_w=3000.0, connect=False),
        ],
        {"pv1": pv, "bat1": battery},
    )
    # Held at 0 W and never pushed back into service; a disconnect still goes through.
    assert by_id["pv1"].max_active_power_w == 0.0
    assert by_id["pv1"].connect is None
    assert by_id["pv1"].bound_by[0].startswith("protection pv1: fault (St=FAULT")
    assert by_id["bat1"].active_power_w == 0.0
    assert by_id["bat1"].connect is False
    assert by_id["bat1"].bound_by[0].startswith("protection bat1: fault (BMS alarm)")


def test_bms_limits_clamp_battery_setpoints_at_once() -> None:
    battery = dataclasses.replace(
        _battery("bat1", 5000.0), bms_discharge_max_w=1200.0, bms_charge_max_w=700.0
    )
    policy = KernelPolicy(ramp_pct_per_s=1.0)  # a slow ramp does not delay protection
    state = KernelState(devices={"bat1": DeviceMemory(mono_ns=0, active_w=4000.0)})
    site = SiteConditions(pcc_w=None, now_mono_ns=NS)
    by_id = _enforce(
        [PlannedSetpoint("bat1", active_power_w=4000.0, target_source="event d")],
        {"bat1": battery},
        site,
        policy=policy,
        state=state,
    )
    assert by_id["bat1"].active_power_w == 1200.0
    assert by_id["bat1"].bound_by == ("protection bat1: BMS discharge max 1200 W",)
    charge = _enforce([PlannedSetpoint("bat1", active_power_w=-4000.0)], {"bat1": battery})
    assert charge["bat1"].active_power_w == -700.0


def test_interlocks_rank_above_the_intent_and_disconnect_wins() -> None:
    devices = {"pv1": _pv("pv1", 10_000.0, 9000.0), "pv2": _pv("pv2", 10_000.0, 9000.0)}
    site = SiteConditions(
        pcc_w=None,
        interlocks=(
            Interlock("fire panel", Controls(connect=False), device_id="pv2"),
            Interlock("transformer", Controls(max_gen_pct=30.0)),
        ),
    )
    by_id = _enforce(
        [
            PlannedSetpoint("pv1", max_active_power_w=5000.0, cap_source="event e: max_gen_pct"),
            PlannedSetpoint("pv2", connect=True, connect_source="event e"),
        ],
        devices,
        site,
    )
    assert by_id["pv1"].max_active_power_w == 3000.0
    # The interlock binds; the event's looser cap did not, so it is not named.
    assert by_id["pv1"].bound_by == ("interlock transformer: 30 %",)
    assert by_id["pv2"].connect is False
    assert by_id["pv2"].bound_by[0] == "interlock fire panel: disconnect"


def test_energize_false_from_an_interlock_is_a_disconnect() -> None:
    site = SiteConditions(pcc_w=None, interlocks=(Interlock("isolator", Controls(energize=False)),))
    by_id = _enforce([PlannedSetpoint("pv1", connect=True)], {"pv1": _pv("pv1", 5000.0)}, site)
    assert by_id["pv1"].connect is False
    assert by_id["pv1"].bound_by == ("interlock isolator: de-energize",)


def test_an_interlock_export_limit_is_a_pcc_limit_named_before_the_intents() -> None:
    site = SiteConditions(
        pcc_w=-2000.0,
        export_limits=(Limit("event e", 3000.0),),
        interlocks=(Interlock("zero-export relay", Controls(export_limit_w=0.0)),),
    )
    result = enforce(
        [PlannedSetpoint("pv1")],
        {"pv1": _pv("pv1", 10_000.0, 5000.0)},
        site,
        revert_after_s=60,
        policy=KernelPolicy(export_margin_w=0.0),
    )
    (setpoint,) = result.setpoints
    assert setpoint.max_active_power_w == pytest.approx(3000.0)  # 5 kW - 2 kW exported
    assert setpoint.bound_by[0].startswith("export limit (interlock zero-export relay): 0 W")


def test_bound_by_lists_protection_then_interlock_then_intent_then_target_then_ramp() -> None:
    battery = dataclasses.replace(
        _battery("bat1", 10_000.0), bms_discharge_max_w=8000.0, soc_pct=50.0
    )
    site = SiteConditions(
        pcc_w=None,
        interlocks=(Interlock("feeder", Controls(gen_limit_w=6000.0), device_id="bat1"),),
        now_mono_ns=NS,
    )
    state = KernelState(devices={"bat1": DeviceMemory(mono_ns=0, active_w=0.0)})
    by_id = _enforce(
        [
            PlannedSetpoint(
                "bat1",
                active_power_w=9000.0,
                max_active_power_w=7000.0,
                cap_source="default: max_gen_pct 70 %",
                target_source="event e: fixed_w",
            )
        ],
        {"bat1": battery},
        site,
        policy=KernelPolicy(ramp_pct_per_s=10.0),
        state=state,
    )
    setpoint = by_id["bat1"]
    assert setpoint.active_power_w == pytest.approx(1000.0)  # 10 %/s of 10 kW for 1 s
    assert setpoint.bound_by == (
        "protection bat1: BMS discharge max 8000 W",
        "interlock feeder: generation 6000 W",
        "ramp bat1: 1000 W/s",
    )


# -- SoC guard ----------------------------------------------------------------------------------


def test_soc_guard_blocks_discharge_with_hysteresis_and_says_so() -> None:
    policy = KernelPolicy(soc_min_pct=20.0, soc_hysteresis_pct=5.0)
    state = KernelState()
    seen: list[float | None] = []
    for k, soc in enumerate((30.0, 20.0, 23.0, 25.0, 25.5)):
        battery = dataclasses.replace(_battery("bat1", 5000.0), soc_pct=soc)
        result = enforce(
            [PlannedSetpoint("bat1", active_power_w=2000.0)],
            {"bat1": battery},
            SiteConditions(pcc_w=None, now_mono_ns=k * NS),
            revert_after_s=60,
            policy=policy,
            state=state,
        )
        state = result.state
        (setpoint,) = result.setpoints
        seen.append(setpoint.active_power_w)
        if setpoint.active_power_w == 0.0:
            assert setpoint.bound_by[0] == (
                f"SoC guard bat1: SoC {soc:g} %, floor 20 % (policy): "
                "discharge blocked until above 25 %"
            )
    assert seen == [2000.0, 0.0, 0.0, 0.0, 2000.0]


def test_unknown_soc_blocks_discharge_but_not_charging() -> None:
    battery = dataclasses.replace(_battery("bat1", 5000.0), soc_pct=None)
    discharge = _enforce([PlannedSetpoint("bat1", active_power_w=3000.0)], {"bat1": battery})
    assert discharge["bat1"].active_power_w == 0.0
    assert "SoC unknown" in discharge["bat1"].bound_by[0]
    charge = _enforce([PlannedSetpoint("bat1", active_power_w=-3000.0)], {"bat1": battery})
    assert charge["bat1"].active_power_w == -3000.0
    # A block shows even while it does not move the setpoint.
    assert any("discharge blocked" in why for why in charge["bat1"].bound_by)


def test_intent_soc_window_tightens_the_policy_and_a_battery_left_alone_is_held() -> None:
    battery = dataclasses.replace(_battery("bat1", 5000.0, measured_w=1500.0), soc_pct=35.0)
    by_id = _enforce(
        [PlannedSetpoint("bat1", soc_min_pct=40.0, soc_source="site constraints v3")],
        {"bat1": battery},
    )
    # Not commanded by the intent, but discharging on its own below the floor: held idle.
    assert by_id["bat1"].active_power_w == 0.0
    assert "floor 40 % (site constraints v3)" in by_id["bat1"].bound_by[0]
    full = dataclasses.replace(_battery("bat1", 5000.0), soc_pct=96.0)
    by_id = _enforce(
        [PlannedSetpoint("bat1", active_power_w=-2000.0, soc_max_pct=95.0)], {"bat1": full}
    )
    assert by_id["bat1"].active_power_w == 0.0
    assert "charging blocked until below 90 %" in by_id["bat1"].bound_by[0]


# -- software ramp ------------------------------------------------------------------------------


def _cap_after(
    cap_w: float | None,
    last_cap_w: float | None,
    *,
    policy: KernelPolicy,
    pcc_w: float | None = None,
    limit_w: float | None = None,
    measured_w: float = 2000.0,
    ramp_time_s: float | None = None,
    target: bool = False,
) -> SafeSetpoint:
    planned = (
        PlannedSetpoint("pv1", target_cap_w=cap_w, ramp_time_s=ramp_time_s)
        if target
        else PlannedSetpoint("pv1", max_active_power_w=cap_w, ramp_time_s=ramp_time_s)
    )
    result = enforce(
        [planned],
        {"pv1": _pv("pv1", 10_000.0, measured_w)},
        SiteConditions(
            pcc_w=pcc_w,
            export_limits=() if limit_w is None else (Limit("event x", limit_w),),
            now_mono_ns=2 * NS,
        ),
        revert_after_s=60,
        policy=policy,
        state=KernelState(devices={"pv1": DeviceMemory(mono_ns=NS, cap_w=last_cap_w)}),
    )
    (setpoint,) = result.setpoints
    return setpoint


def test_ramp_limits_rises_and_target_reductions_but_not_limit_reductions() -> None:
    policy = KernelPolicy(ramp_pct_per_s=10.0, export_margin_w=0.0)  # 1000 W/s on 10 kW
    # The end of a curtailment: the cap rises at the rate, then is released.
    assert _cap_after(None, 2000.0, policy=policy).max_active_power_w == pytest.approx(3000.0)
    assert _cap_after(None, 9500.0, policy=policy).max_active_power_w is None
    # An optimisation target going down ramps too.
    ramped = _cap_after(1000.0, 5000.0, policy=policy, target=True)
    assert ramped.max_active_power_w == pytest.approx(4000.0)
    assert ramped.bound_by[-1] == "ramp pv1: 1000 W/s"
    # A limit going down applies at once (ramp_down_immediate).
    assert _cap_after(1000.0, 5000.0, policy=policy).max_active_power_w == 1000.0
    # An export limit tightening applies at once: exporting 3 kW over a 0 W limit.
    at_once = _cap_after(None, 5000.0, policy=policy, pcc_w=-3000.0, limit_w=0.0, measured_w=5000.0)
    assert at_once.max_active_power_w == pytest.approx(2000.0)
    # Unless the jurisdiction wants reductions ramped as well.
    slow = dataclasses.replace(policy, ramp_down_immediate=False)
    assert _cap_after(1000.0, 5000.0, policy=slow).max_active_power_w == pytest.approx(4000.0)
    slow_export = _cap_after(
        None, 5000.0, policy=slow, pcc_w=-3000.0, limit_w=0.0, measured_w=5000.0
    )
    assert slow_export.max_active_power_w == pytest.approx(4000.0)


def test_event_ramp_time_moves_to_the_new_value_over_that_time() -> None:
    policy = KernelPolicy()  # no policy ramp: the event's ramp_time_s decides
    devices = {"pv1": _pv("pv1", 10_000.0, 9000.0)}
    state = KernelState(devices={"pv1": DeviceMemory(mono_ns=0, cap_w=None)})
    caps = []
    for k in range(1, 6):
        result = enforce(
            [PlannedSetpoint("pv1", target_cap_w=5000.0, ramp_time_s=4.0, target_source="ev")],
            devices,
            SiteConditions(pcc_w=None, now_mono_ns=k * NS),
            revert_after_s=60,
            policy=policy,
            state=state,
        )
        state = result.state
        caps.append(result.setpoints[0].max_active_power_w)
    assert caps == pytest.approx([8750.0, 7500.0, 6250.0, 5000.0, 5000.0])


# -- PCC loop: soak, import, dropouts, notes ----------------------------------------------------


def test_free_battery_soaks_before_pv_is_curtailed_and_a_commanded_one_does_not() -> None:
    devices = {
        "pv1": _pv("pv1", 10_000.0, 9000.0),
        "bat1": _battery("bat1", 3000.0, 0.0),
        "bat2": _battery("bat2", 6000.0, 0.0),
        "bat3": _battery("bat3", 5000.0, 0.0),
    }
    # Exporting 7 kW against a 2 kW limit: 5 kW too much. bat3 is commanded idle by the intent.
    result = enforce(
        [
            PlannedSetpoint("pv1"),
            PlannedSetpoint("bat1"),
            PlannedSetpoint("bat2"),
            PlannedSetpoint("bat3", active_power_w=0.0),
        ],
        devices,
        SiteConditions(pcc_w=-7000.0, export_limits=(Limit("event e", 2000.0),)),
        revert_after_s=60,
        policy=KernelPolicy(export_margin_w=0.0, export_probe_pct=0.0),
    )
    by_id = {s.device_id: s for s in result.setpoints}
    # Shares proportional to charge room (3 kW : 6 kW), PV untouched at what it makes.
    assert by_id["bat1"].active_power_w == pytest.approx(-5000.0 / 3)
    assert by_id["bat2"].active_power_w == pytest.approx(-10000.0 / 3)
    assert by_id["bat3"].active_power_w == 0.0
    assert by_id["pv1"].max_active_power_w == pytest.approx(9000.0)
    assert "soaking surplus" in by_id["bat1"].bound_by[0]


def test_a_soak_is_handed_back_at_the_ramp_when_the_limit_goes_away() -> None:
    devices = {"bat1": _battery("bat1", 5000.0, -4000.0)}
    policy = KernelPolicy(ramp_pct_per_s=10.0)  # 500 W/s
    state = KernelState(devices={"bat1": DeviceMemory(mono_ns=0, active_w=-4000.0, held="soak")})
    values = []
    for k in range(1, 10):
        result = enforce(
            [PlannedSetpoint("bat1")],
            devices,
            SiteConditions(pcc_w=0.0, now_mono_ns=k * NS),  # no export limit any more
            revert_after_s=60,
            policy=policy,
            state=state,
        )
        state = result.state
        values.append(result.setpoints[0].active_power_w)
    # Back towards idle at 500 W/s, then no longer commanded (the battery's own mode).
    assert values == [-3500.0, -3000.0, -2500.0, -2000.0, -1500.0, -1000.0, -500.0, None, None]


def test_curtailment_is_shared_by_what_each_inverter_makes_above_its_floor() -> None:
    devices = {"pv1": _pv("pv1", 10_000.0, 6000.0), "pv2": _pv("pv2", 10_000.0, 2000.0)}
    result = enforce(
        [PlannedSetpoint("pv1"), PlannedSetpoint("pv2")],
        devices,
        SiteConditions(pcc_w=-6000.0, export_limits=(Limit("event e", 2000.0),)),
        revert_after_s=60,
        policy=KernelPolicy(export_margin_w=0.0, export_probe_pct=0.0),
    )
    caps = {s.device_id: s.max_active_power_w for s in result.setpoints}
    # 4 kW to take off 8 kW of output: 3 kW from pv1, 1 kW from pv2.
    assert caps == pytest.approx({"pv1": 3000.0, "pv2": 1000.0})


def test_a_device_that_drops_out_takes_no_share_and_the_others_take_over() -> None:
    devices = {
        "pv1": _pv("pv1", 10_000.0, 5000.0),
        "pv2": _pv("pv2", 10_000.0, 5000.0),
    }
    planned = [PlannedSetpoint("pv1"), PlannedSetpoint("pv2")]
    policy = KernelPolicy(export_margin_w=0.0, export_probe_pct=0.0, export_relax_gain=1.0)
    limits = (Limit("event e", 2000.0),)
    first = enforce(
        planned,
        devices,
        SiteConditions(pcc_w=-4000.0, export_limits=limits, now_mono_ns=NS),
        revert_after_s=60,
        policy=policy,
    )
    caps = {s.device_id: s.max_active_power_w for s in first.setpoints}
    assert caps == pytest.approx({"pv1": 4000.0, "pv2": 4000.0})
    # pv2 goes silent (unavailable) and trips to 0 W: the PCC shows it, pv1 takes its share.
    devices["pv2"] = dataclasses.replace(devices["pv2"], available=False, measured_w=None)
    devices["pv1"] = dataclasses.replace(devices["pv1"], measured_w=4000.0)
    second = enforce(
        planned,
        devices,
        SiteConditions(pcc_w=2000.0, export_limits=limits, now_mono_ns=2 * NS),
        revert_after_s=60,
        policy=policy,
        state=first.state,
    )
    assert dict(second.skipped) == {"pv2": "device unavailable"}
    (setpoint,) = second.setpoints
    assert setpoint.max_active_power_w == pytest.approx(8000.0)  # 4 kW + 2 kW import + 2 kW


def test_import_limit_discharges_batteries_soc_permitting_and_says_when_short() -> None:
    devices = {
        "bat1": _battery("bat1", 3000.0, 0.0),
        "bat2": dataclasses.replace(_battery("bat2", 3000.0, 0.0), soc_pct=5.0),
    }
    result = enforce(
        [PlannedSetpoint("bat1"), PlannedSetpoint("bat2")],
        devices,
        SiteConditions(pcc_w=9000.0, import_limits=(Limit("event peak", 5000.0),)),
        revert_after_s=60,
        policy=KernelPolicy(export_margin_w=0.0),
    )
    by_id = {s.device_id: s for s in result.setpoints}
    assert by_id["bat1"].active_power_w == pytest.approx(3000.0)
    assert by_id["bat2"].active_power_w is None  # at its SoC floor: takes no share
    assert "import limit (event peak): 5000 W at PCC" in by_id["bat1"].bound_by[0]
    assert "import limit not met: no controllable load" in result.notes
    assert by_id["bat1"].bound_by[-1].endswith("short by 1000 W")


def test_frequency_response_holds_the_budget_and_says_so() -> None:
    devices = {"pv1": _pv("pv1", 10_000.0, 4000.0)}
    state = KernelState(loop=PccLoopState(export_budget_w=4000.0))
    result = enforce(
        [PlannedSetpoint("pv1")],
        devices,
        SiteConditions(pcc_w=-6000.0, export_limits=(Limit("e", 2000.0),), grid_hz=49.9),
        revert_after_s=60,
        policy=KernelPolicy(export_margin_w=0.0),
        state=state,
    )
    assert result.state.export_budget_w == 4000.0  # not chased down to 0
    assert (
        "frequency response: PCC loop held (grid frequency outside the 0.036 Hz droop "
        "deadband)" in result.notes
    )


def test_a_device_throttled_by_grid_support_holds_the_loop_too() -> None:
    result = enforce(
        [PlannedSetpoint("pv1")],
        {"pv1": _pv("pv1", 10_000.0, 4000.0)},
        SiteConditions(
            pcc_w=-6000.0,
            export_limits=(Limit("e", 2000.0),),
            grid_hz=50.0,
            grid_response="pv1 ThrotSrc VOLT_WATT",
        ),
        revert_after_s=60,
        policy=KernelPolicy(export_margin_w=0.0),
        state=KernelState(loop=PccLoopState(export_budget_w=4000.0)),
    )
    assert result.state.export_budget_w == 4000.0
    assert "grid support: PCC loop held (pv1 ThrotSrc VOLT_WATT)" in result.notes


def test_stale_meter_open_loop_is_in_force_on_the_first_stale_cycle() -> None:
    devices = {"pv1": _pv("pv1", 10_000.0, 8000.0)}
    result = enforce(
        [PlannedSetpoint("pv1")],
        devices,
        SiteConditions(pcc_w=None, export_limits=(Limit("e", 1000.0),)),
        revert_after_s=60,
        policy=KernelPolicy(export_margin_w=0.0, assumed_min_load_w=500.0),
        state=KernelState(loop=PccLoopState(export_budget_w=9000.0)),  # a looser closed loop
    )
    assert result.setpoints[0].max_active_power_w == pytest.approx(1500.0)
    assert result.notes[0].startswith("PCC meter stale: open loop")


# -- safe reversion value -----------------------------------------------------------------------


def test_revert_cap_is_the_open_loop_share_of_a_standing_export_limit() -> None:
    devices = {
        "pv1": _pv("pv1", 6000.0, 3000.0),
        "pv2": _pv("pv2", 3000.0, 1500.0),
        "fixed": dataclasses.replace(_pv("fixed", 1000.0, 400.0), controls=frozenset()),
    }
    planned = [PlannedSetpoint("pv1"), PlannedSetpoint("pv2"), PlannedSetpoint("fixed")]
    policy = KernelPolicy(export_margin_w=100.0, assumed_min_load_w=500.0)
    standing = enforce(
        planned,
        devices,
        SiteConditions(
            pcc_w=-1000.0,
            export_limits=(
                Limit("event e", 500.0),
                Limit("site contract (config)", 5000.0, standing=True),
            ),
        ),
        revert_after_s=60,
        policy=policy,
    )
    revert = {s.device_id: s.revert_cap_w for s in standing.setpoints}
    # 5000 + 500 load - 400 uncontrolled - 100 margin = 5000 W, shared 2:1 by rating.
    assert revert["pv1"] == pytest.approx(5000.0 * 2 / 3)
    assert revert["pv2"] == pytest.approx(5000.0 / 3)
    assert revert.get("fixed") is None
    # Only an event's limit: nothing still applies without the gateway.
    event_only = enforce(
        planned,
        devices,
        SiteConditions(pcc_w=-1000.0, export_limits=(Limit("event e", 500.0),)),
        revert_after_s=60,
        policy=policy,
    )
    assert all(s.revert_cap_w is None for s in event_only.setpoints)


# -- property tests (>= 10,000 cases each) ------------------------------------------------------

Case = tuple[list[PlannedSetpoint], dict[str, DeviceState], SiteConditions, KernelPolicy]

# With 10,000 examples per test, hypothesis's own cost per drawn value dominates (~0.3 ms per
# example for a single draw, several ms for a site drawn value by value). So hypothesis draws the
# structure (device counts) and a seed; the values come from random.Random(seed), biased towards
# the edges (0, the maximum, exactly the rating) where bugs live. A failure prints its seed.


def _pick(rng: random.Random, low: float, high: float) -> float:
    roll = rng.random()
    if roll < 0.15:
        return low
    if roll < 0.3:
        return high
    return rng.uniform(low, high)


def _maybe(rng: random.Random, low: float, high: float, *, nan: bool = False) -> float | None:
    roll = rng.random()
    if roll < 0.4:
        return None
    if nan and roll < 0.45:
        return math.nan
    return _pick(rng, low, high)


_CONTROLS = [
    ALL_CONTROLS,
    ALL_CONTROLS,
    ALL_CONTROLS,
    frozenset({Control.ACTIVE_POWER}),
    frozenset(),
]
_FAULTS = [None, None, None, "trip"]
_CONNECTS = [None, True, False]


def _make_site(n_pv: int, n_bat: int, seed: int) -> Case:
    """A small random site: faults, BMS, SoC, interlocks, PCC limits, partial controls."""
    rng = random.Random(seed)
    devices: dict[str, DeviceState] = {}
    planned: list[PlannedSetpoint] = []
    for i in range(n_pv):
        device_id, rating = f"pv{i}", _pick(rng, 100.0, 20_000.0)
        devices[device_id] = DeviceState(
            device_id,
            PV,
            rating,
            measured_w=_pick(rng, 0.0, rating),
            controls=rng.choice(_CONTROLS),
            fault=rng.choice(_FAULTS),
        )
        planned.append(
            PlannedSetpoint(
                device_id,
                max_active_power_w=_maybe(rng, 0.0, 3e4, nan=True),
                target_cap_w=_maybe(rng, 0.0, 3e4, nan=True),
                connect=rng.choice(_CONNECTS),
            )
        )
    for i in range(n_bat):
        device_id, rating = f"bat{i}", _pick(rng, 100.0, 10_000.0)
        devices[device_id] = DeviceState(
            device_id,
            BATTERY,
            rating,
            max_charge_w=rating,
            max_discharge_w=rating,
            measured_w=_pick(rng, -rating, rating),
            controls=rng.choice(_CONTROLS),
            soc_pct=_maybe(rng, 0.0, 100.0),
            bms_charge_max_w=_maybe(rng, 0.0, rating),
            bms_discharge_max_w=_maybe(rng, 0.0, rating),
            fault=rng.choice(_FAULTS),
        )
        planned.append(
            PlannedSetpoint(
                device_id,
                max_active_power_w=_maybe(rng, 0.0, 3e4, nan=True),
                active_power_w=_maybe(rng, -2e4, 2e4),
                max_charge_w=_maybe(rng, 0.0, 2e4),
                soc_min_pct=_maybe(rng, 0.0, 60.0),
                connect=rng.choice(_CONNECTS),
            )
        )
    interlocks: tuple[Interlock, ...] = ()
    if devices and rng.random() < 0.5:
        controls = Controls(
            max_gen_pct=_maybe(rng, 0.0, 100.0),
            load_limit_w=_maybe(rng, 0.0, 1e4),
            connect=rng.choice([None, False]),
        )
        target = rng.choice([None, *sorted(devices)])
        interlocks = (Interlock("ilk", controls, device_id=target),)
    site = SiteConditions(
        pcc_w=_maybe(rng, -5e4, 5e4) if rng.random() < 0.9 else None,
        export_limits=tuple(Limit(f"l{i}", _pick(rng, 0.0, 5e4)) for i in range(rng.randint(0, 2))),
        import_limits=tuple(Limit(f"i{i}", _pick(rng, 0.0, 5e4)) for i in range(rng.randint(0, 1))),
        interlocks=interlocks,
    )
    policy = KernelPolicy(
        export_margin_w=_pick(rng, 0.0, 500.0), assumed_min_load_w=_pick(rng, 0.0, 1000.0)
    )
    return planned, devices, site, policy


sites = st.builds(_make_site, st.integers(0, 3), st.integers(0, 2), st.integers(0, 2**32 - 1))


def _check_setpoint(
    setpoint: SafeSetpoint,
    device: DeviceState,
    plan: PlannedSetpoint,
    site: SiteConditions,
    policy: KernelPolicy,
) -> None:
    # Never a command the device has no control for.
    if setpoint.max_active_power_w is not None:
        assert Control.GENERATION_CAP in device.controls
    if setpoint.active_power_w is not None:
        assert Control.ACTIVE_POWER in device.controls
    if setpoint.connect is not None:
        assert Control.CONNECT in device.controls
    interlocks = [i for i in site.interlocks if i.device_id in (None, device.device_id)]
    # Connect: the safe side wins, a tripped device is never reconnected.
    if any(i.controls.connect is False for i in interlocks) or plan.connect is False:
        assert setpoint.connect in (False, None)
    if device.fault is not None:
        assert setpoint.connect is not True
    cap = setpoint.max_active_power_w
    if cap is not None:
        assert math.isfinite(cap)
        assert 0.0 <= cap <= device.max_w + 1e-9
        if device.fault is not None:
            assert cap == 0.0
        for interlock in interlocks:
            if interlock.controls.max_gen_pct is not None:
                assert cap <= device.max_w * interlock.controls.max_gen_pct / 100.0 + 1e-6
        asked = plan.max_active_power_w
        if asked is not None and math.isfinite(asked):
            assert cap <= asked + 1e-6
    active = setpoint.active_power_w
    if active is None:
        return
    assert device.kind is BATTERY
    assert math.isfinite(active)
    assert -device.max_charge_w - 1e-9 <= active <= device.max_discharge_w + 1e-9
    if cap is not None:
        assert active <= cap + 1e-6
    if device.fault is not None:
        assert active == 0.0
    if device.bms_discharge_max_w is not None:
        assert active <= device.bms_discharge_max_w + 1e-6
    if device.bms_charge_max_w is not None:
        assert active >= -device.bms_charge_max_w - 1e-6
    floor = max(policy.soc_min_pct, plan.soc_min_pct or 0.0)
    if device.soc_pct is None or device.soc_pct <= floor:
        assert active <= 1e-9  # SoC guard: no discharge
    if device.soc_pct is not None and device.soc_pct >= policy.soc_max_pct:
        assert active >= -1e-9
    if plan.max_charge_w is not None:
        assert active >= -plan.max_charge_w - 1e-6
    if plan.max_active_power_w is not None and math.isfinite(plan.max_active_power_w):
        assert active <= max(plan.max_active_power_w, 0.0) + 1e-6
    for interlock in interlocks:
        if interlock.controls.max_gen_pct is not None:
            assert active <= device.max_w * interlock.controls.max_gen_pct / 100.0 + 1e-6


def _predicted_export_w(
    result: Enforcement, devices: dict[str, DeviceState], site: SiteConditions, policy: KernelPolicy
) -> float:
    """Export at the PCC if every device did what it was told (uncapped PV: its rating)."""
    commanded = {s.device_id: s for s in result.setpoints}
    output_w = 0.0
    for device_id, device in devices.items():
        setpoint = commanded.get(device_id)
        measured = device.measured_w or 0.0
        if device.kind is PV and Control.GENERATION_CAP in device.controls and device.available:
            cap = setpoint.max_active_power_w if setpoint is not None else None
            output_w += device.max_w if cap is None else cap
        elif device.kind is BATTERY and setpoint is not None:
            output_w += setpoint.active_power_w if setpoint.active_power_w is not None else measured
        else:
            output_w += measured
    if site.pcc_w is not None:
        load_w = site.pcc_w + sum(d.measured_w or 0.0 for d in devices.values())
    else:
        load_w = policy.assumed_min_load_w
    return output_w - load_w


@settings(max_examples=10_000, deadline=None)
@given(sites)
def test_no_enforced_setpoint_ever_violates_a_limit(case: Case) -> None:
    planned, devices, site, policy = case
    result = enforce(planned, devices, site, revert_after_s=60, policy=policy)
    plans = {p.device_id: p for p in planned}
    for setpoint in result.setpoints:
        _check_setpoint(
            setpoint, devices[setpoint.device_id], plans[setpoint.device_id], site, policy
        )
    limits = [*site.export_limits]
    limits += [
        Limit(i.source, i.controls.export_limit_w)
        for i in site.interlocks
        if i.controls.export_limit_w is not None
    ]
    if any(n.startswith("export limit not met") for n in result.notes):
        # Only once every inverter the kernel can cap is at 0 W.
        for setpoint in result.setpoints:
            device = devices[setpoint.device_id]
            if device.kind is PV and Control.GENERATION_CAP in device.controls:
                assert setpoint.max_active_power_w == 0.0
    elif limits:
        # Unless the kernel says it cannot, predicted export stays within the tightest limit.
        limit_w = min(limit.watts for limit in limits)
        export_w = _predicted_export_w(result, devices, site, policy)
        assert export_w <= limit_w + 1e-6 * max(1.0, abs(limit_w), abs(export_w))


RampRun = tuple[
    KernelPolicy, list[tuple[float, list[PlannedSetpoint], SiteConditions, dict[str, DeviceState]]]
]


def _make_ramp_run(n_cycles: int, seed: int) -> RampRun:
    """A few cycles of one PV and one battery under changing asks, limits and protection.

    The policy's ramp only (an event's ramp_time_s sets its own rate: see the unit test).
    """
    rng = random.Random(seed)
    policy = KernelPolicy(
        ramp_pct_per_s=_pick(rng, 1.0, 50.0),
        ramp_down_immediate=rng.random() < 0.5,
        export_margin_w=0.0,
    )
    cycles = []
    t_ns = 0
    for _ in range(n_cycles):
        t_ns += int(_pick(rng, 0.05, 2.0) * NS)
        devices = {
            "pv": DeviceState("pv", PV, 10_000.0, measured_w=_pick(rng, 0.0, 10_000.0)),
            "bat": DeviceState(
                "bat",
                BATTERY,
                5000.0,
                max_charge_w=5000.0,
                max_discharge_w=5000.0,
                measured_w=_pick(rng, -5000.0, 5000.0),
                soc_pct=_pick(rng, 0.0, 100.0),
                bms_discharge_max_w=_maybe(rng, 0.0, 5000.0),
                bms_charge_max_w=_maybe(rng, 0.0, 5000.0),
                fault=rng.choice(_FAULTS),
            ),
        }
        planned = [
            PlannedSetpoint(
                "pv",
                max_active_power_w=_maybe(rng, 0.0, 12_000.0),
                target_cap_w=_maybe(rng, 0.0, 12_000.0),
            ),
            PlannedSetpoint(
                "bat",
                active_power_w=_maybe(rng, -6000.0, 6000.0),
                max_active_power_w=_maybe(rng, 0.0, 6000.0),
            ),
        ]
        interlocks = ()
        if rng.random() < 0.3:
            interlocks = (Interlock("ilk", Controls(max_gen_pct=_pick(rng, 0.0, 100.0))),)
        site = SiteConditions(
            pcc_w=_maybe(rng, -2e4, 2e4),
            export_limits=tuple(Limit("e", _pick(rng, 0.0, 2e4)) for _ in range(rng.randint(0, 1))),
            interlocks=interlocks,
            now_mono_ns=t_ns,
        )
        cycles.append((t_ns / NS, planned, site, devices))
    return policy, cycles


ramp_runs = st.builds(_make_ramp_run, st.integers(2, 4), st.integers(0, 2**32 - 1))


@settings(max_examples=10_000, deadline=None)
@given(ramp_runs)
def test_the_ramp_never_exceeds_its_rate(run: RampRun) -> None:
    """Rises never exceed rate x time; a faster move is only ever a reduction towards 0 W.

    (Protection and limits may cut at once; nothing ever rises faster than the ramp. An import
    limit, which may raise discharge at once, is left out here.)
    """
    policy, cycles = run
    assert policy.ramp_pct_per_s is not None
    state = KernelState()
    previous: dict[str, SafeSetpoint] | None = None
    previous_t = 0.0
    for t_s, planned, site, devices in cycles:
        result = enforce(planned, devices, site, revert_after_s=60, policy=policy, state=state)
        state = result.state
        now = {s.device_id: s for s in result.setpoints}
        if previous is not None:
            pv_step = policy.ramp_pct_per_s / 100.0 * 10_000.0 * (t_s - previous_t) + 1e-6
            bat_step = policy.ramp_pct_per_s / 100.0 * 5000.0 * (t_s - previous_t) + 1e-6
            before = previous["pv"].max_active_power_w
            after = now["pv"].max_active_power_w
            before = 10_000.0 if before is None else before
            after = 10_000.0 if after is None else after
            assert after - before <= pv_step
            last = previous["bat"].active_power_w
            if last is None:
                last = devices["bat"].measured_w or 0.0
            value = now["bat"].active_power_w
            if value is not None:
                assert abs(value) <= abs(last) + bat_step
                if abs(value - last) > bat_step:
                    assert abs(value) < abs(last)  # a cut, never a faster rise
        previous, previous_t = now, t_s


def test_a_device_with_unknown_output_holds_the_pcc_loop_instead_of_teaching_it() -> None:
    # Found in HIL (frozen-gateway): after SIGCONT the PCC meter was fresh but the PV reading
    # still stale; the loop took the PV's generation for negative load, learned a budget of
    # -3620 W and the caps fell to 0 W, then relaxed slowly.
    limits = (Limit("contract", 2000.0, standing=True),)
    planned = [PlannedSetpoint("pv1", max_active_power_w=4000.0)]
    state = KernelState()
    second = 1_000_000_000

    def cycle(t_s: float, pv_w: float | None, pcc_w: float) -> Enforcement:
        nonlocal state
        pv = _pv("pv1", 10_000.0, pv_w)
        if pv_w is None:
            pv = dataclasses.replace(pv, available=False, unavailable_reason="stale")
        now = round(t_s * second)
        result = enforce(
            planned,
            {"pv1": pv},
            SiteConditions(pcc_w=pcc_w, export_limits=limits, now_mono_ns=now, pcc_mono_ns=now),
            revert_after_s=6,
            state=state,
        )
        state = result.state
        return result

    for i in range(12):
        cycle(0.25 * i, 4000.0, -1000.0)
    settled = state.export_budget_w
    blind = cycle(11.0, None, -5570.0)  # meter fresh, PV stale: hold, do not learn
    assert state.export_budget_w == settled
    assert any("output of pv1 unknown" in note for note in blind.notes)
    back = cycle(11.25, 8600.0, -5570.0)
    (setpoint,) = back.setpoints
    assert setpoint.max_active_power_w == pytest.approx(4000.0)


def test_a_blind_device_that_keeps_producing_has_its_share_kept_from_the_others() -> None:
    # Found in HIL (dnp3-crash): the DNP3 driver's master process was killed; the plant kept
    # producing at its last cap while its output was unknown, and the held budget (which
    # included its share) went to the other devices: export overshot the limit by ~7 kW.
    devices = {
        "pv1": _pv("pv1", 10_000.0, 5000.0),
        "pv2": _pv("pv2", 10_000.0, 5000.0),
    }
    planned = [PlannedSetpoint("pv1"), PlannedSetpoint("pv2")]
    policy = KernelPolicy(export_margin_w=0.0, export_probe_pct=0.0, export_relax_gain=1.0)
    limits = (Limit("event e", 2000.0),)
    first = enforce(
        planned,
        devices,
        SiteConditions(pcc_w=-4000.0, export_limits=limits, now_mono_ns=NS),
        revert_after_s=60,
        policy=policy,
    )
    # pv2's output is unknown but it still produces its 4 kW cap: export is at the limit.
    devices["pv2"] = dataclasses.replace(devices["pv2"], available=False, measured_w=None)
    devices["pv1"] = dataclasses.replace(devices["pv1"], measured_w=4000.0)
    second = enforce(
        planned,
        devices,
        SiteConditions(pcc_w=-2000.0, export_limits=limits, now_mono_ns=2 * NS),
        revert_after_s=60,
        policy=policy,
        state=first.state,
    )
    (setpoint,) = second.setpoints
    assert setpoint.max_active_power_w == pytest.approx(4000.0)
    # What was learned is kept for when pv2 is back.
    assert second.state.loop.export_budget_w == first.state.loop.export_budget_w


def test_a_blind_device_does_not_hold_the_import_floor_below_what_the_pcc_needs() -> None:
    # The import side of the dnp3-crash finding: while bat2's output is unknown the learned floor
    # is held, but the load grows; holding the old floor would leave the site over its limit.
    devices = {"bat1": _battery("bat1", 6000.0, 0.0), "bat2": _battery("bat2", 6000.0, 0.0)}
    planned = [PlannedSetpoint("bat1"), PlannedSetpoint("bat2")]
    policy = KernelPolicy(export_margin_w=0.0, export_relax_gain=1.0)
    limits = (Limit("event peak", 2000.0),)
    first = enforce(
        planned,
        devices,
        SiteConditions(pcc_w=6000.0, import_limits=limits, now_mono_ns=NS),
        revert_after_s=60,
        policy=policy,
    )
    learned = first.state.loop.import_floor_w
    assert learned == pytest.approx(4000.0)
    # bat2 goes blind still discharging its 2 kW share; the load grows by 3 kW.
    devices["bat2"] = dataclasses.replace(devices["bat2"], available=False, measured_w=None)
    devices["bat1"] = dataclasses.replace(devices["bat1"], measured_w=2000.0)
    second = enforce(
        planned,
        devices,
        SiteConditions(pcc_w=5000.0, import_limits=limits, now_mono_ns=2 * NS),
        revert_after_s=60,
        policy=policy,
        state=first.state,
    )
    (setpoint,) = second.setpoints
    assert setpoint.active_power_w == pytest.approx(5000.0)  # 2 kW + 3 kW of new load
    assert second.state.loop.import_floor_w == learned  # kept for when bat2 is back

"""SafeSetpoints for driver tests, minted by the real safety kernel (gateway.safety.enforce)."""

from __future__ import annotations

from drivers.contract import DeviceKind
from gateway.safety import (
    DeviceState,
    KernelPolicy,
    Limit,
    PlannedSetpoint,
    SafeSetpoint,
    SiteConditions,
    enforce,
)


def pv_setpoint(
    device_id: str = "pv1",
    cap_w: float | None = 5000.0,
    *,
    max_w: float = 10000.0,
    connect: bool | None = None,
    revert_after_s: int = 60,
    revert_cap_w: float | None = None,
) -> SafeSetpoint:
    """A PV setpoint through gateway.safety.enforce (the only way to mint one).

    `revert_cap_w`: the kernel derives a device's safe reversion cap from the limits that still
    hold without the gateway (standing limits). A standing export limit of exactly that value,
    with the site importing heavily (so the limit does not bind the cap itself) and no margin,
    gives a single inverter that reversion cap.
    """
    limits = () if revert_cap_w is None else (Limit("contract", revert_cap_w, standing=True),)
    result = enforce(
        [PlannedSetpoint(device_id=device_id, max_active_power_w=cap_w, connect=connect)],
        {device_id: DeviceState(device_id=device_id, kind=DeviceKind.PV, max_w=max_w)},
        SiteConditions(pcc_w=None if revert_cap_w is None else 1e6, export_limits=limits),
        revert_after_s=revert_after_s,
        policy=KernelPolicy(export_margin_w=0.0),
    )
    setpoint = result.setpoints[0]
    assert setpoint.revert_cap_w == revert_cap_w, setpoint
    return setpoint


def battery_setpoint(
    device_id: str = "bat1",
    active_w: float | None = -2000.0,
    *,
    max_w: float = 5000.0,
    revert_after_s: int = 60,
) -> SafeSetpoint:
    result = enforce(
        [PlannedSetpoint(device_id=device_id, active_power_w=active_w)],
        {
            device_id: DeviceState(
                device_id=device_id,
                kind=DeviceKind.BATTERY,
                max_w=max_w,
                max_charge_w=max_w,
                max_discharge_w=max_w,
                # Mid-window SoC and full BMS limits: the kernel blocks discharge at an unknown
                # SoC, and these tests are about the driver, not the SoC guard.
                soc_pct=50.0,
                bms_charge_max_w=max_w,
                bms_discharge_max_w=max_w,
            )
        },
        SiteConditions(pcc_w=None),
        revert_after_s=revert_after_s,
    )
    return result.setpoints[0]

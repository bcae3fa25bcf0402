"""SafeSetpoints for driver tests, minted by the real safety kernel (gateway.safety.enforce)."""

from __future__ import annotations

from drivers.contract import DeviceKind
from gateway.safety import DeviceState, PlannedSetpoint, SafeSetpoint, SiteConditions, enforce


def pv_setpoint(
    device_id: str = "pv1",
    cap_w: float | None = 5000.0,
    *,
    max_w: float = 10000.0,
    connect: bool | None = None,
    revert_after_s: int = 60,
) -> SafeSetpoint:
    """A PV setpoint through gateway.safety.enforce (the only way to mint one)."""
    result = enforce(
        [PlannedSetpoint(device_id=device_id, max_active_power_w=cap_w, connect=connect)],
        {device_id: DeviceState(device_id=device_id, kind=DeviceKind.PV, max_w=max_w)},
        SiteConditions(pcc_w=None),
        revert_after_s=revert_after_s,
    )
    return result.setpoints[0]


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
            )
        },
        SiteConditions(pcc_w=None),
        revert_after_s=revert_after_s,
    )
    return result.setpoints[0]

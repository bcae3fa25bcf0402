"""The site's flexibility now: how much more, or less, net generation it could deliver. Pure.

Owns the headroom arithmetic and the site totals the history records; plain functions over plain
data (`FlexDevice`, which the runtime fills from its snapshot and the setpoints in force).

* **up_w** (more net generation / less import): PV held at a generation cap could produce what
  the sky allows instead (estimated available - output), and batteries could discharge up to
  their discharge limit from where they are now (a charging battery first stops charging).
* **down_w** (less net generation / more import): PV output can be curtailed to 0, and batteries
  could charge up to their charge limit from where they are now.

What the estimate of available PV rests on, in order: the output per rated W of the PV
inverters that are producing without being held by a cap (the same sky, now); else the
forecaster's estimate for now (`Forecast.pv_available_w`, from the recent uncurtailed
clear-sky index); else nothing, and a capped inverter then counts no up-headroom (claiming
flexibility that is not there is worse than missing some). The SunSpec inverters report their
output, not what they could produce, hence the estimate.

Battery limits: nameplate, the BMS's dynamic limits when reported, the SoC floor and ceiling in
force, and optionally the energy needed to hold the power for `sustain_s`. A battery whose SoC
and BMS limits are both unknown offers only to stop what it is doing. Devices that are
unavailable, or cannot be commanded (no generation cap / connect control for PV, no active
power control for a battery), offer nothing.

Site limits: the connection's contractual export / import limits bound the total (more export
than the connection allows is not flexibility). Limits set by events are not applied: the
headend that dispatches the flexibility would change those.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from drivers.contract import Control, DeviceKind
from gateway.safety import DeviceState

__all__ = [
    "DeviceHeadroom",
    "FlexDevice",
    "Flexibility",
    "SiteLimits",
    "SiteTotals",
    "compute_flexibility",
    "is_pv_limited",
    "site_totals",
]

# A PV inverter producing within this much of its cap is held by it (tolerance for the
# inverter's own regulation and for the cap ramp).
_LIMITED_TOLERANCE_W = 20.0
_LIMITED_TOLERANCE_SHARE = 0.02


@dataclass(frozen=True, slots=True)
class FlexDevice:
    """One PV inverter or battery as the headroom arithmetic sees it (meters are left out).

    cap_w:       PV: the generation cap in force (the last enforced max_active_power_w; 0 while
                 commanded disconnected), None = uncapped.
    setpoint_w:  battery: the active power commanded now (+ discharge), None = not commanded.
    capacity_wh: battery: nameplate energy (the whole 0..100 % SoC range).
    """

    device_id: str
    kind: DeviceKind
    rating_w: float
    available: bool = True
    measured_w: float | None = None  # latest good AC output (+ generation / discharge)
    can_curtail: bool = True  # PV: honours a generation cap or a disconnect
    can_dispatch: bool = True  # battery: honours an active power command
    cap_w: float | None = None
    setpoint_w: float | None = None
    max_charge_w: float = 0.0
    max_discharge_w: float = 0.0
    soc_pct: float | None = None
    bms_charge_max_w: float | None = None
    bms_discharge_max_w: float | None = None
    capacity_wh: float = 0.0

    @classmethod
    def of(
        cls,
        state: DeviceState,
        *,
        cap_w: float | None = None,
        setpoint_w: float | None = None,
        capacity_wh: float = 0.0,
    ) -> FlexDevice:
        """From the safety kernel's view of the device plus what the kernel does not hold."""
        return cls(
            device_id=state.device_id,
            kind=state.kind,
            rating_w=state.max_w,
            available=state.available and state.fault is None,
            measured_w=state.measured_w,
            can_curtail=bool(state.controls & {Control.GENERATION_CAP, Control.CONNECT}),
            can_dispatch=Control.ACTIVE_POWER in state.controls,
            cap_w=cap_w,
            setpoint_w=setpoint_w,
            max_charge_w=state.max_charge_w,
            max_discharge_w=state.max_discharge_w,
            soc_pct=state.soc_pct,
            bms_charge_max_w=state.bms_charge_max_w,
            bms_discharge_max_w=state.bms_discharge_max_w,
            capacity_wh=capacity_wh,
        )


@dataclass(frozen=True, slots=True)
class SiteLimits:
    """Site-level inputs of the headroom.

    pcc_w:           PCC meter (+ import / - export); None = stale or no meter.
    soc_min_pct / soc_max_pct: the SoC band in force (site constraints), batteries stay inside.
    export_limit_w / import_limit_w: the connection's contractual limits (config), None = none.
    sustain_s:       if > 0, battery headroom is limited to what its energy can hold this long.
    """

    pcc_w: float | None = None
    soc_min_pct: float = 0.0
    soc_max_pct: float = 100.0
    export_limit_w: float | None = None
    import_limit_w: float | None = None
    sustain_s: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.soc_min_pct <= self.soc_max_pct <= 100.0:
            raise ValueError(
                f"SiteLimits: need 0 <= soc_min_pct ({self.soc_min_pct}) <= soc_max_pct "
                f"({self.soc_max_pct}) <= 100"
            )
        if self.sustain_s < 0:
            raise ValueError(f"SiteLimits: sustain_s must be >= 0, got {self.sustain_s}")


@dataclass(frozen=True, slots=True)
class SiteTotals:
    """What the site does now, summed; what the history records once per control cycle.

    pv_w / battery_w are NaN when a device of that kind has no fresh measurement (a partial sum
    would teach the forecaster a wrong day); load_w (= PCC + PV + battery) is NaN without a
    fresh PCC reading too. battery_energy_wh is the energy above the SoC floor and
    battery_capacity_wh the usable energy between floor and ceiling, over the batteries whose
    SoC is known.
    """

    pv_w: float
    load_w: float
    battery_w: float
    battery_energy_wh: float
    battery_capacity_wh: float
    pv_rating_w: float
    pv_limited: bool  # some PV is held at its cap: its output is not what the sky allows


@dataclass(frozen=True, slots=True)
class DeviceHeadroom:
    device_id: str
    up_w: float
    down_w: float
    basis: str  # how the numbers were reached, for logs and the console


@dataclass(frozen=True, slots=True)
class Flexibility:
    up_w: float
    down_w: float
    totals: SiteTotals
    devices: tuple[DeviceHeadroom, ...]
    bound_by: tuple[str, ...]  # site limits that reduced the sums ("contract export limit")


def is_pv_limited(device: FlexDevice) -> bool:
    """A PV inverter producing at (within tolerance of) the cap in force."""
    if device.kind is not DeviceKind.PV or device.cap_w is None or device.measured_w is None:
        return False
    tolerance = max(_LIMITED_TOLERANCE_W, _LIMITED_TOLERANCE_SHARE * max(device.rating_w, 0.0))
    return device.measured_w >= device.cap_w - tolerance


def _sum_known(values: Iterable[float | None]) -> float:
    total = 0.0
    for value in values:
        if value is None or not math.isfinite(value):
            return math.nan
        total += value
    return total


def _battery_band_wh(device: FlexDevice, limits: SiteLimits) -> tuple[float, float] | None:
    """(energy above the floor, usable capacity) in Wh, or None when the SoC is unknown."""
    if device.soc_pct is None or not math.isfinite(device.soc_pct) or device.capacity_wh <= 0:
        return None
    soc = min(max(device.soc_pct, 0.0), 100.0)
    above_floor = max(soc - limits.soc_min_pct, 0.0) / 100.0 * device.capacity_wh
    usable = (limits.soc_max_pct - limits.soc_min_pct) / 100.0 * device.capacity_wh
    return min(above_floor, usable), usable


def site_totals(devices: Sequence[FlexDevice], limits: SiteLimits) -> SiteTotals:
    """The site's PV, load, battery power and energy now (cheap: call it every control cycle)."""
    pv = [d for d in devices if d.kind is DeviceKind.PV]
    batteries = [d for d in devices if d.kind is DeviceKind.BATTERY]
    pv_w = _sum_known(d.measured_w for d in pv)
    battery_w = _sum_known(d.measured_w for d in batteries)
    pcc = limits.pcc_w
    load_w = pcc + pv_w + battery_w if pcc is not None and math.isfinite(pcc) else math.nan
    energy = capacity = 0.0
    for battery in batteries:
        band = _battery_band_wh(battery, limits)
        if band is not None:
            energy += band[0]
            capacity += band[1]
    return SiteTotals(
        pv_w=pv_w,
        load_w=load_w,
        battery_w=battery_w,
        battery_energy_wh=energy,
        battery_capacity_wh=capacity,
        pv_rating_w=sum(max(d.rating_w, 0.0) for d in pv),
        pv_limited=any(is_pv_limited(d) for d in pv),
    )


def _available_per_rated_w(
    pv: Sequence[FlexDevice], pv_available_w: float | None
) -> tuple[float | None, str]:
    """Available PV per rated W now, and where that figure comes from."""
    free = [
        d
        for d in pv
        if d.available
        and d.measured_w is not None
        and math.isfinite(d.measured_w)
        and d.rating_w > 0
        and not is_pv_limited(d)
    ]
    if free:
        return (
            sum(max(d.measured_w or 0.0, 0.0) for d in free) / sum(d.rating_w for d in free),
            "uncapped inverters now",
        )
    rating = sum(max(d.rating_w, 0.0) for d in pv)
    if pv_available_w is not None and math.isfinite(pv_available_w) and rating > 0:
        return max(pv_available_w, 0.0) / rating, "forecast estimate"
    return None, "no estimate of available PV"


def _pv_headroom(device: FlexDevice, per_rated_w: float | None, source: str) -> DeviceHeadroom:
    output = device.measured_w
    if not device.available or output is None or not math.isfinite(output):
        return DeviceHeadroom(device.device_id, 0.0, 0.0, "unavailable or not measured")
    output = max(output, 0.0)
    down = output if device.can_curtail else 0.0
    if not is_pv_limited(device):
        return DeviceHeadroom(device.device_id, 0.0, down, "producing what the sky allows")
    if per_rated_w is None:
        return DeviceHeadroom(device.device_id, 0.0, down, f"capped; {source}")
    available = min(per_rated_w * device.rating_w, device.rating_w)
    up = max(available - output, 0.0)
    return DeviceHeadroom(
        device.device_id, up, down, f"capped at {device.cap_w:.0f} W; available from {source}"
    )


def _battery_headroom(device: FlexDevice, limits: SiteLimits) -> DeviceHeadroom:
    if not device.available or not device.can_dispatch:
        return DeviceHeadroom(device.device_id, 0.0, 0.0, "unavailable or not dispatchable")
    power = device.measured_w
    if power is None or not math.isfinite(power):
        power = device.setpoint_w if device.setpoint_w is not None else 0.0
    rating = max(device.rating_w, 0.0)
    discharge = device.max_discharge_w if device.max_discharge_w > 0 else rating
    charge = device.max_charge_w if device.max_charge_w > 0 else rating
    notes: list[str] = []
    if device.bms_discharge_max_w is not None and math.isfinite(device.bms_discharge_max_w):
        discharge = min(discharge, max(device.bms_discharge_max_w, 0.0))
    if device.bms_charge_max_w is not None and math.isfinite(device.bms_charge_max_w):
        charge = min(charge, max(device.bms_charge_max_w, 0.0))
    band = _battery_band_wh(device, limits)
    if band is None:
        if device.bms_discharge_max_w is None:
            discharge = 0.0
        if device.bms_charge_max_w is None:
            charge = 0.0
        notes.append("SoC unknown")
    else:
        energy, usable = band
        if energy <= 0.0:
            discharge = 0.0
            notes.append("at the SoC floor")
        if energy >= usable:
            charge = 0.0
            notes.append("at the SoC ceiling")
        if limits.sustain_s > 0:
            discharge = min(discharge, energy * 3600.0 / limits.sustain_s)
            charge = min(charge, (usable - energy) * 3600.0 / limits.sustain_s)
    up = max(discharge - power, 0.0)
    down = max(power + charge, 0.0)
    return DeviceHeadroom(device.device_id, up, down, "; ".join(notes) or "within limits")


def compute_flexibility(
    devices: Sequence[FlexDevice],
    limits: SiteLimits,
    *,
    pv_available_w: float | None = None,
) -> Flexibility:
    """Up/down headroom now, per device and summed, bounded by the site's contractual limits.

    pv_available_w: the forecaster's estimate of the site's available PV now
    (`Forecast.pv_available_w`), used when no uncapped inverter shows what the sky allows.
    """
    totals = site_totals(devices, limits)
    pv = [d for d in devices if d.kind is DeviceKind.PV]
    per_rated_w, source = _available_per_rated_w(pv, pv_available_w)
    rows: list[DeviceHeadroom] = []
    for device in devices:
        if device.kind is DeviceKind.PV:
            rows.append(_pv_headroom(device, per_rated_w, source))
        elif device.kind is DeviceKind.BATTERY:
            rows.append(_battery_headroom(device, limits))
    up = sum(row.up_w for row in rows)
    down = sum(row.down_w for row in rows)
    bound_by: list[str] = []
    pcc = limits.pcc_w if limits.pcc_w is not None and math.isfinite(limits.pcc_w) else None
    if limits.export_limit_w is not None:
        if pcc is not None:
            # Export now is -pcc; the connection allows export_limit_w.
            room = limits.export_limit_w + pcc
        else:
            # No meter: assume no load, so every W generated is exported (a lower bound).
            generated = _sum_known(max(d.measured_w or 0.0, 0.0) for d in devices)
            room = limits.export_limit_w - generated
        if up > room:
            up = max(room, 0.0)
            bound_by.append("contract export limit")
    if limits.import_limit_w is not None:
        # Without a meter the load is unknown, and so is how much more import the site can take.
        room = limits.import_limit_w - pcc if pcc is not None else 0.0
        if down > room:
            down = max(room, 0.0)
            bound_by.append("contract import limit")
    return Flexibility(
        up_w=up, down_w=down, totals=totals, devices=tuple(rows), bound_by=tuple(bound_by)
    )

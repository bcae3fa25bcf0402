"""The safety/constraint kernel: the only producer of SafeSetpoint, the only type drivers accept.

Pure: plain functions over plain data, no I/O, no asyncio.

`SafeSetpoint` can only be minted inside this module (its constructor requires a private token and
`dataclasses.replace` refuses to copy it), so "no command reaches a device without passing the
constraint layer" is a property of the types, not of discipline.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import InitVar, dataclass, field

import numpy as np

from drivers.contract import ALL_CONTROLS, Control, DeviceKind
from gateway.allocate import split_proportional

__all__ = [
    "DeviceState",
    "Enforcement",
    "KernelPolicy",
    "KernelState",
    "Limit",
    "PlannedSetpoint",
    "SafeSetpoint",
    "SiteConditions",
    "UnsafeSetpointError",
    "enforce",
]

_MINT = object()


class UnsafeSetpointError(TypeError):
    """A SafeSetpoint was constructed outside gateway.safety; commands must come from enforce()."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SafeSetpoint:
    """A per-device command that has passed every constraint and interlock.

    max_active_power_w: generation cap in W (None = uncapped: the device's own default/maximum).
    active_power_w:     fixed active power in W, + discharge / - charge (None = not commanded).
    connect:            connect (True) / disconnect (False) / leave as is (None).
    revert_after_s:     device-side reversion timer armed with this write (dead-man safety).
    bound_by:           the limits that bound this setpoint, highest priority first ("why").
    revert_cap_w:       the generation cap the device should fall back to on its own if the
                        gateway stops refreshing it (written where the model has reversion
                        values, e.g. SunSpec 704); None = the device's own default.
    """

    device_id: str
    max_active_power_w: float | None
    active_power_w: float | None
    connect: bool | None
    revert_after_s: int
    bound_by: tuple[str, ...]
    revert_cap_w: float | None = None
    mint: InitVar[object]

    def __post_init__(self, mint: object) -> None:
        if mint is not _MINT:
            raise UnsafeSetpointError(
                "SafeSetpoint can only be produced by gateway.safety.enforce(); "
                "route the command through the safety kernel"
            )


@dataclass(frozen=True, slots=True)
class DeviceState:
    """What the kernel knows about one device right now (nameplate, availability, measurement)."""

    device_id: str
    kind: DeviceKind
    max_w: float  # nameplate generation / discharge, W
    max_charge_w: float = 0.0
    max_discharge_w: float = 0.0
    available: bool = True
    unavailable_reason: str = ""
    measured_w: float | None = None  # latest good AC output (+ generation / discharge), W
    controls: frozenset[Control] = ALL_CONTROLS  # what the device can be commanded to do
    soc_pct: float | None = None  # batteries: state of charge (None = unknown)
    bms_charge_max_w: float | None = None  # batteries: the BMS's dynamic limits now
    bms_discharge_max_w: float | None = None
    fault: str | None = None  # the device reports a fault or trip (why), None = healthy


@dataclass(frozen=True, slots=True)
class Limit:
    """One limit in force and where it comes from, e.g. Limit("event evt-7", 2000.0)."""

    source: str
    watts: float


@dataclass(frozen=True, slots=True)
class SiteConditions:
    """Site-level inputs: the PCC measurement and the connection-point limits in force.

    pcc_w is + import / - export; None means the PCC meter is stale or bad, which switches the
    export limit to open loop (assume only `assumed_min_load_w` of load on site).
    """

    pcc_w: float | None
    export_limits: tuple[Limit, ...] = ()
    import_limits: tuple[Limit, ...] = ()
    grid_hz: float | None = None  # PCC frequency, when known (frequency response detection)
    now_mono_ns: int = 0  # when these conditions were observed (ramps, averaging)


@dataclass(frozen=True, slots=True)
class KernelPolicy:
    """How the kernel behaves: site tuning from the gateway config. Plain, immutable."""

    export_margin_w: float = 50.0  # stay this far inside export/import limits
    assumed_min_load_w: float = 0.0  # load assumed when the PCC meter is stale (open loop)
    # Share of a loosening export budget taken per cycle: tightening is immediate, loosening
    # gradual, so a loop fed readings up to a poll period old does not overshoot the limit.
    export_relax_gain: float = 0.5


@dataclass(frozen=True, slots=True)
class KernelState:
    """What the kernel remembers between cycles; returned by enforce(), passed back next cycle."""

    pv_budget_w: float | None = None  # the PV budget the export limit allowed last cycle


@dataclass(frozen=True, slots=True)
class PlannedSetpoint:
    """What the planner would like a device to do, before any constraint is applied."""

    device_id: str
    max_active_power_w: float | None = None
    active_power_w: float | None = None
    connect: bool | None = None
    origin: tuple[str, ...] = ()  # what asked for it, for the decision record


@dataclass(frozen=True, slots=True)
class Enforcement:
    """The kernel's answer: commands that may go to devices, and devices left alone (and why)."""

    setpoints: tuple[SafeSetpoint, ...]
    skipped: tuple[tuple[str, str], ...] = ()  # (device_id, reason)
    notes: tuple[str, ...] = ()
    state: KernelState = KernelState()  # pass back as `state` next cycle


@dataclass(slots=True)
class _Draft:
    device: DeviceState
    cap_w: float | None
    active_w: float | None
    connect: bool | None
    bound_by: list[str] = field(default_factory=list)


def _w(watts: float) -> str:
    return f"{watts:.0f} W"


def _tightest(limits: Sequence[Limit]) -> Limit | None:
    finite = [limit for limit in limits if math.isfinite(limit.watts)]
    # Ties keep the first source listed (the higher-priority one), so "why" is stable.
    return min(finite, key=lambda limit: limit.watts) if finite else None


def _clamp_to_device(plan: PlannedSetpoint, device: DeviceState) -> _Draft:
    draft = _Draft(device, plan.max_active_power_w, plan.active_power_w, plan.connect)
    if draft.cap_w is not None:
        if not math.isfinite(draft.cap_w) or draft.cap_w < 0.0:
            draft.bound_by.append(f"range: generation cap {draft.cap_w!r} W refused, using 0 W")
            draft.cap_w = 0.0
        elif draft.cap_w > device.max_w:
            draft.bound_by.append(f"nameplate {device.device_id}: {_w(device.max_w)}")
            draft.cap_w = device.max_w
    if draft.active_w is not None:
        if device.kind is not DeviceKind.BATTERY:
            draft.bound_by.append("device kind: fixed power applies to batteries only, ignored")
            draft.active_w = None
        elif not math.isfinite(draft.active_w):
            draft.bound_by.append("range: fixed power is not a number, using 0 W")
            draft.active_w = 0.0
        else:
            discharge_max = device.max_discharge_w or device.max_w
            charge_max = device.max_charge_w or device.max_w
            if draft.active_w > discharge_max:
                draft.bound_by.append(
                    f"nameplate {device.device_id}: discharge {_w(discharge_max)}"
                )
                draft.active_w = discharge_max
            elif draft.active_w < -charge_max:
                draft.bound_by.append(f"nameplate {device.device_id}: charge {_w(charge_max)}")
                draft.active_w = -charge_max
        if draft.active_w is not None and draft.cap_w is not None and draft.active_w > draft.cap_w:
            draft.bound_by.append(f"generation cap {device.device_id}: {_w(draft.cap_w)}")
            draft.active_w = draft.cap_w
    return draft


def _apply_export_limit(
    limit: Limit,
    drafts: Mapping[str, _Draft],
    site: SiteConditions,
    policy: KernelPolicy,
    state: KernelState,
) -> tuple[str, float]:
    """Cap PV (then battery discharge) so that export at the PCC stays within `limit`.

    Closed loop: the PV the site can absorb is what PV makes now plus the headroom the meter shows
    (pcc_w + limit), corrected for planned battery changes. Open loop (meter stale): assume only
    `assumed_min_load_w` of load. The PV budget is water-filled across inverters by rating.
    """
    pv = [d for d in drafts.values() if d.device.kind is DeviceKind.PV]
    batteries = [d for d in drafts.values() if d.device.kind is DeviceKind.BATTERY]
    # What cannot be commanded is a given: PV without a cap control keeps making what it makes,
    # storage without a fixed-power control keeps doing what it does.
    capped_pv = [d for d in pv if Control.GENERATION_CAP in d.device.controls]
    fixed_pv_w = sum(d.device.measured_w or 0.0 for d in pv if d not in capped_pv)
    steerable = [d for d in batteries if Control.ACTIVE_POWER in d.device.controls]

    def battery_after(d: _Draft) -> float:
        # Not commanded (or not commandable) = keeps doing what it does now.
        if d.active_w is None or d not in steerable:
            return d.device.measured_w or 0.0
        return d.active_w

    battery_change_w = sum((d.device.measured_w or 0.0) - battery_after(d) for d in batteries)
    if site.pcc_w is not None:
        pv_now_w = sum(d.device.measured_w or 0.0 for d in capped_pv)
        budget_w = pv_now_w + site.pcc_w + limit.watts + battery_change_w - policy.export_margin_w
        previous_w = state.pv_budget_w
        if previous_w is not None and budget_w > previous_w:
            budget_w = previous_w + policy.export_relax_gain * (budget_w - previous_w)
        mode = f"closed loop, PCC {_w(site.pcc_w)}"
    else:
        discharge_w = sum(max(battery_after(d), 0.0) for d in batteries)
        budget_w = (
            limit.watts
            + policy.assumed_min_load_w
            - discharge_w
            - fixed_pv_w
            - policy.export_margin_w
        )
        mode = "open loop: PCC meter stale"
    why = f"export limit ({limit.source}): {_w(limit.watts)} at PCC, {mode}"

    if budget_w < 0.0:
        # Even with PV at zero the site would export too much: take it out of battery discharge.
        deficit_w = -budget_w
        for d in sorted(steerable, key=lambda d: d.device.device_id):
            discharging_w = max(battery_after(d), 0.0)
            if discharging_w <= 0.0 or deficit_w <= 0.0:
                continue
            cut_w = min(discharging_w, deficit_w)
            d.active_w = battery_after(d) - cut_w
            d.bound_by.append(why)
            deficit_w -= cut_w
        budget_w = 0.0

    if not capped_pv:
        return why, budget_w
    # Water-fill the budget by rating, each inverter within its own cap (already nameplate-bound).
    ratings = np.array([d.device.max_w for d in capped_pv], dtype=np.float64)
    own_caps = np.array(
        [d.device.max_w if d.cap_w is None else d.cap_w for d in capped_pv], dtype=np.float64
    )
    shares = split_proportional(budget_w, ratings, own_caps)
    for d, share_w in zip(capped_pv, shares.tolist(), strict=True):
        if share_w < (d.device.max_w if d.cap_w is None else d.cap_w):
            d.cap_w = share_w
            d.bound_by.append(why)
    return why, budget_w


def _fit_to_controls(draft: _Draft) -> str | None:
    """Express the draft with the controls the device has; return why not, if it cannot be.

    A command the device has no control for is never sent. A binding generation cap on a device
    without a cap control is applied through its fixed power (storage) or, failing that, the
    device is not commanded at all and the reason is reported.
    """
    device, controls = draft.device, draft.device.controls
    if draft.connect is not None and Control.CONNECT not in controls:
        draft.bound_by.append(f"device {device.device_id} has no connect control: not commanded")
        draft.connect = None
    if draft.cap_w is not None and Control.GENERATION_CAP not in controls:
        rating_w = device.max_discharge_w or device.max_w
        if draft.cap_w >= rating_w:
            draft.cap_w = None  # not binding: nothing to enforce
        elif Control.ACTIVE_POWER in controls and device.kind is DeviceKind.BATTERY:
            # Storage: hold at or below the cap (idle when nothing else was asked for).
            draft.active_w = min(draft.active_w if draft.active_w is not None else 0.0, draft.cap_w)
            draft.bound_by.append(
                f"device {device.device_id} has no generation-cap control: "
                f"cap {_w(draft.cap_w)} applied as fixed power"
            )
            draft.cap_w = None
        else:
            return (
                f"device {device.device_id} cannot be capped at {_w(draft.cap_w)}: "
                "it has no generation-cap control"
            )
    if draft.active_w is not None and Control.ACTIVE_POWER not in controls:
        draft.bound_by.append(f"device {device.device_id} has no fixed-power control: ignored")
        draft.active_w = None
    return None


def enforce(
    planned: Sequence[PlannedSetpoint],
    devices: Mapping[str, DeviceState],
    site: SiteConditions,
    *,
    revert_after_s: int,
    policy: KernelPolicy = KernelPolicy(),
    state: KernelState = KernelState(),
) -> Enforcement:
    """Clamp planned setpoints into the feasible set and mint SafeSetpoints that explain themselves.

    Order (highest first): device availability, nameplate, connection-point export limit (closed
    loop on the PCC meter, open loop when it is stale). Planned setpoints for unknown or
    unavailable devices are never commanded. Every setpoint lists the limits that bound it.
    """
    skipped: list[tuple[str, str]] = []
    drafts: dict[str, _Draft] = {}
    for plan in planned:
        device = devices.get(plan.device_id)
        if device is None:
            skipped.append((plan.device_id, "unknown device: not in this gateway's inventory"))
        elif not device.available:
            skipped.append((plan.device_id, device.unavailable_reason or "device unavailable"))
        else:
            drafts[plan.device_id] = _clamp_to_device(plan, device)

    notes: list[str] = []
    pv_budget_w: float | None = None
    export_limit = _tightest(site.export_limits)
    if export_limit is not None:
        why, pv_budget_w = _apply_export_limit(export_limit, drafts, site, policy, state)
        notes.append(why)

    for device_id, draft in list(drafts.items()):
        # A battery's generation cap bounds its fixed power whatever set it (plan or export limit).
        if draft.cap_w is not None and draft.active_w is not None and draft.active_w > draft.cap_w:
            draft.active_w = draft.cap_w
            draft.bound_by.append(f"generation cap {draft.device.device_id}: {_w(draft.cap_w)}")
        refusal = _fit_to_controls(draft)
        if refusal is not None:
            del drafts[device_id]
            skipped.append((device_id, refusal))

    setpoints = tuple(
        SafeSetpoint(
            device_id=device_id,
            max_active_power_w=draft.cap_w,
            active_power_w=draft.active_w,
            connect=draft.connect,
            revert_after_s=revert_after_s,
            bound_by=tuple(draft.bound_by),
            mint=_MINT,
        )
        for device_id, draft in sorted(drafts.items())
    )
    return Enforcement(
        setpoints=setpoints,
        skipped=tuple(skipped),
        notes=tuple(notes),
        state=KernelState(pv_budget_w=pv_budget_w),
    )

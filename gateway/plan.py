"""Planning: turn the controls in force into per-device planned setpoints. Pure.

The planner decides *what the operator asked for*, device by device; the safety kernel
(gateway.safety.enforce) then decides *what is allowed*. Site-scoped quantities (a site target, a
generation limit, a battery fixed power) are split across the available devices with
gateway.allocate.split_proportional, by rating, deterministically; every split is described in
`Plan.log` so that it can be logged and audited. Device-scoped event controls apply to that
device only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from drivers.contract import DeviceKind
from gateway.allocate import split_proportional
from gateway.intent import SiteConstraints
from gateway.safety import DeviceState, Limit, PlannedSetpoint
from gateway.schedule import ActiveControls, ScopeControls

__all__ = ["Plan", "plan"]


@dataclass(frozen=True, slots=True)
class Plan:
    planned: tuple[PlannedSetpoint, ...]
    export_limits: tuple[Limit, ...]
    import_limits: tuple[Limit, ...]
    log: tuple[str, ...]


@dataclass(slots=True)
class _Want:
    cap_w: float | None = None
    active_w: float | None = None
    connect: bool | None = None
    origin: tuple[str, ...] = ()

    def cap(self, watts: float, why: str) -> None:
        self.cap_w = watts if self.cap_w is None else min(self.cap_w, watts)
        self.origin += (why,)


def _split_log(what: str, total_w: float, ids: list[str], shares: np.ndarray) -> str:
    parts = ", ".join(f"{i}={s:.0f} W" for i, s in zip(ids, shares, strict=True))
    return f"split {what} {total_w:.0f} W by rating: {parts}"


def plan(
    active: ActiveControls,
    devices: Mapping[str, DeviceState],
    *,
    contract_export_limit_w: float | None = None,
    contract_import_limit_w: float | None = None,
    constraints: SiteConstraints | None = None,
) -> Plan:
    """Planned setpoints for every available PV and battery device, plus the site limits."""
    controllable = sorted(
        (d for d in devices.values() if d.available and d.kind is not DeviceKind.METER),
        key=lambda d: d.device_id,
    )
    wants = {d.device_id: _Want() for d in controllable}
    log: list[str] = []
    _apply_scope(active.site, controllable, wants, log)
    for device_id, scope in active.device.items():
        device = devices.get(device_id)
        if device is None or device_id not in wants:
            continue
        _apply_scope(scope, [device], wants, log)

    site = active.site.controls
    export_limits: list[Limit] = []
    import_limits: list[Limit] = []
    if site.export_limit_w is not None:
        export_limits.append(Limit(active.site.label("export_limit_w"), site.export_limit_w))
    if site.import_limit_w is not None:
        import_limits.append(Limit(active.site.label("import_limit_w"), site.import_limit_w))
    if constraints is not None:
        if constraints.export_limit_w is not None:
            export_limits.append(
                Limit(f"site constraints v{active.intent_version}", constraints.export_limit_w)
            )
        if constraints.import_limit_w is not None:
            import_limits.append(
                Limit(f"site constraints v{active.intent_version}", constraints.import_limit_w)
            )
    if contract_export_limit_w is not None:
        export_limits.append(Limit("site contract (config)", contract_export_limit_w))
    if contract_import_limit_w is not None:
        import_limits.append(Limit("site contract (config)", contract_import_limit_w))

    planned = tuple(
        PlannedSetpoint(
            device_id=device_id,
            max_active_power_w=want.cap_w,
            active_power_w=want.active_w,
            connect=want.connect,
            origin=want.origin,
        )
        for device_id, want in wants.items()
    )
    return Plan(planned, tuple(export_limits), tuple(import_limits), tuple(log))


def _apply_scope(
    scope_controls: ScopeControls,
    scope: list[DeviceState],
    wants: dict[str, _Want],
    log: list[str],
) -> None:
    """Apply one scope's controls (the site, or a single device) to the devices in it."""
    controls, label = scope_controls.controls, scope_controls.label
    generators = [d for d in scope if d.kind in (DeviceKind.PV, DeviceKind.BATTERY)]
    batteries = [d for d in scope if d.kind is DeviceKind.BATTERY]

    if controls.max_gen_pct is not None:
        pct = min(max(controls.max_gen_pct, 0.0), 100.0)
        for d in generators:
            wants[d.device_id].cap(
                d.max_w * pct / 100.0, f"{label('max_gen_pct')}: max_gen_pct {pct:g} %"
            )

    if controls.gen_limit_w is not None and generators:
        source = label("gen_limit_w")
        shares = _split(max(controls.gen_limit_w, 0.0), generators, log, source, "gen_limit_w")
        for d, share in zip(generators, shares, strict=True):
            wants[d.device_id].cap(float(share), f"{source}: gen_limit_w share")

    if controls.target_w is not None and generators:
        source = label("target_w")
        shares = _split(max(controls.target_w, 0.0), generators, log, source, "target_w")
        for d, share in zip(generators, shares, strict=True):
            want = wants[d.device_id]
            if d.kind is DeviceKind.BATTERY:
                want.active_w = float(share)
                want.origin += (f"{source}: target_w share",)
            else:
                want.cap(float(share), f"{source}: target_w share")

    if controls.fixed_w is not None and batteries:
        source = label("fixed_w")
        total = controls.fixed_w
        if total >= 0.0:
            shares = _split(total, batteries, log, source, "fixed_w (discharge)")
        else:
            ratings = np.array([d.max_charge_w or d.max_w for d in batteries])
            shares = -split_proportional(-total, ratings, ratings)
            ids = [d.device_id for d in batteries]
            log.append(f"{source}: " + _split_log("fixed_w (charge)", total, ids, shares))
        for d, share in zip(batteries, shares, strict=True):
            wants[d.device_id].active_w = float(share)
            wants[d.device_id].origin += (f"{source}: fixed_w share",)

    if controls.connect is not None:
        for d in scope:
            if d.device_id in wants:
                wants[d.device_id].connect = controls.connect


def _split(
    total_w: float, devices: list[DeviceState], log: list[str], source: str, what: str
) -> np.ndarray:
    ratings = np.array([d.max_discharge_w or d.max_w for d in devices], dtype=np.float64)
    shares = split_proportional(total_w, ratings, ratings)
    if len(devices) > 1:
        ids = [d.device_id for d in devices]
        log.append(f"{source}: " + _split_log(what, total_w, ids, shares))
    return shares

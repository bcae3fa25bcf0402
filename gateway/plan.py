"""Planning: turn the controls in force into per-device planned setpoints. Pure.

The planner decides *what the operator asked for*, device by device; the safety kernel
(gateway.safety.enforce) then decides *what is allowed*. Every available PV and battery device
gets a PlannedSetpoint (a faulted one too, so that the kernel can hold it safe), but only healthy
devices take a share of a site quantity: a device that drops out (unavailable, faulted) takes no
share and the others take over, every cycle.

Scopes: the site's controls apply to every device; a device's own scope (`active.device[id]`)
overrides them mode by mode for that device. Site-scoped totals (gen_limit_w, target_w, fixed_w,
load_limit_w) are split across the healthy devices that do not have their own value for that
mode, after taking away what the devices with their own value were given, so that the site total
still holds. Splits go by rating (gateway.allocate.split_proportional), none above what the
device can do now (nameplate, BMS limits), deterministically; each split is described in
`Plan.log`.

What each planned field means (limits apply at once, targets ramp; see gateway.safety):
  max_gen_pct, gen_limit_w  -> max_active_power_w (limit), cap_source
  target_w                  -> PV: target_cap_w; battery: active_power_w (target), target_source
  fixed_w                   -> battery active_power_w (target), target_source
  load_limit_w              -> battery max_charge_w (limit), charge_source
  connect, energize         -> connect (energize=False is a disconnect: the devices have no
                               separate energize control, and 2030.5 ANDs the two)
  ramp_time_s               -> ramp_time_s
  SiteConstraints.soc_*     -> battery soc_min_pct / soc_max_pct (tighten the kernel policy's)
  export/import limits      -> Plan.export_limits / import_limits, standing when they come from a
                               default, the fallback, the site constraints or the contract
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from drivers.contract import DeviceKind
from gateway.allocate import split_proportional
from gateway.intent import SiteConstraints
from gateway.safety import DeviceState, Limit, PlannedSetpoint
from gateway.schedule import ActiveControls, ControlSource, ScopeControls

__all__ = ["Plan", "plan"]

# Sources whose limits still apply while the gateway is down (reversion values honour them).
_STANDING_SOURCES = frozenset({ControlSource.DEFAULT, ControlSource.FALLBACK})


@dataclass(frozen=True, slots=True)
class Plan:
    planned: tuple[PlannedSetpoint, ...]
    export_limits: tuple[Limit, ...]
    import_limits: tuple[Limit, ...]
    log: tuple[str, ...]


@dataclass(slots=True)
class _Want:
    cap_w: float | None = None
    cap_source: str = ""
    target_cap_w: float | None = None
    active_w: float | None = None
    target_source: str = ""
    max_charge_w: float | None = None
    charge_source: str = ""
    connect: bool | None = None
    connect_source: str = ""
    ramp_time_s: float | None = None
    origin: tuple[str, ...] = ()

    def cap(self, watts: float, why: str) -> None:
        if self.cap_w is None or watts < self.cap_w:
            self.cap_w, self.cap_source = watts, why
        self.origin += (why,)

    def charge_limit(self, watts: float, why: str) -> None:
        if self.max_charge_w is None or watts < self.max_charge_w:
            self.max_charge_w, self.charge_source = watts, why
        self.origin += (why,)

    def target(self, device: DeviceState, watts: float, why: str) -> None:
        if device.kind is DeviceKind.BATTERY:
            self.active_w = watts
        else:
            self.target_cap_w = watts
        self.target_source = why
        self.origin += (why,)


def _split_log(what: str, total_w: float, ids: list[str], shares: np.ndarray) -> str:
    parts = ", ".join(f"{i}={s:.0f} W" for i, s in zip(ids, shares, strict=True))
    return f"split {what} {total_w:.0f} W by rating: {parts}"


def _standing(scope: ScopeControls, mode: str) -> bool:
    source = scope.sources.get(mode)
    return source is not None and source.source in _STANDING_SOURCES


def _discharge_rating(device: DeviceState) -> float:
    return device.max_discharge_w or device.max_w


def _charge_rating(device: DeviceState) -> float:
    return device.max_charge_w or device.max_w


def _generation_room(device: DeviceState) -> float:
    """What the device can generate now: its rating, within its BMS discharge limit."""
    room = _discharge_rating(device)
    if device.kind is DeviceKind.BATTERY and device.bms_discharge_max_w is not None:
        room = min(room, max(device.bms_discharge_max_w, 0.0))
    return room


def _charge_room(device: DeviceState) -> float:
    room = _charge_rating(device)
    if device.bms_charge_max_w is not None:
        room = min(room, max(device.bms_charge_max_w, 0.0))
    return room


def plan(
    active: ActiveControls,
    devices: Mapping[str, DeviceState],
    *,
    contract_export_limit_w: float | None = None,
    contract_import_limit_w: float | None = None,
    constraints: SiteConstraints | None = None,
) -> Plan:
    """Planned setpoints for every available PV and battery device, plus the site limits."""
    present = sorted(
        (d for d in devices.values() if d.available and d.kind is not DeviceKind.METER),
        key=lambda d: d.device_id,
    )
    wants = {d.device_id: _Want() for d in present}
    scopes = {d.device_id: active.device.get(d.device_id) for d in present}
    log: list[str] = []

    for d in present:
        _apply_device_modes(d, active.site, scopes[d.device_id], wants[d.device_id])
    healthy = [d for d in present if d.fault is None]
    _apply_gen_limit(active.site, present, healthy, scopes, wants, log)
    _apply_target(active.site, present, healthy, scopes, wants, log)
    _apply_fixed(active.site, present, healthy, scopes, wants, log)
    _apply_load_limit(active.site, present, healthy, scopes, wants, log)

    export_limits, import_limits = _pcc_limits(
        active, scopes, contract_export_limit_w, contract_import_limit_w, constraints
    )
    soc_source = f"site constraints v{active.intent_version}"
    soc_min = constraints.soc_min_pct if constraints is not None else None
    soc_max = constraints.soc_max_pct if constraints is not None else None
    planned = tuple(
        PlannedSetpoint(
            device_id=d.device_id,
            max_active_power_w=want.cap_w,
            active_power_w=want.active_w,
            connect=want.connect,
            origin=want.origin,
            target_cap_w=want.target_cap_w,
            max_charge_w=want.max_charge_w,
            ramp_time_s=want.ramp_time_s,
            soc_min_pct=soc_min if d.kind is DeviceKind.BATTERY else None,
            soc_max_pct=soc_max if d.kind is DeviceKind.BATTERY else None,
            cap_source=want.cap_source,
            target_source=want.target_source,
            charge_source=want.charge_source,
            connect_source=want.connect_source,
            soc_source=soc_source if d.kind is DeviceKind.BATTERY else "",
        )
        for d in present
        for want in (wants[d.device_id],)
    )
    return Plan(planned, tuple(export_limits), tuple(import_limits), tuple(log))


def _mode(
    site: ScopeControls, own: ScopeControls | None, mode: str
) -> tuple[object | None, ScopeControls]:
    """The value of `mode` for one device (its own scope overrides the site's) and its scope."""
    if own is not None and getattr(own.controls, mode) is not None:
        return getattr(own.controls, mode), own
    return getattr(site.controls, mode), site


def _apply_device_modes(
    device: DeviceState, site: ScopeControls, own: ScopeControls | None, want: _Want
) -> None:
    """The per-device modes: max_gen_pct, connect / energize, ramp_time_s."""
    pct, scope = _mode(site, own, "max_gen_pct")
    if isinstance(pct, float | int) and device.kind in (DeviceKind.PV, DeviceKind.BATTERY):
        pct = min(max(float(pct), 0.0), 100.0)
        want.cap(device.max_w * pct / 100.0, f"{scope.label('max_gen_pct')}: max_gen_pct {pct:g} %")
    connect, connect_scope = _mode(site, own, "connect")
    energize, energize_scope = _mode(site, own, "energize")
    if connect is False:
        want.connect, want.connect_source = False, connect_scope.label("connect")
    elif energize is False:
        want.connect = False
        want.connect_source = f"{energize_scope.label('energize')}: de-energize"
    elif connect is True:
        want.connect, want.connect_source = True, connect_scope.label("connect")
    ramp_time_s, _ = _mode(site, own, "ramp_time_s")
    if isinstance(ramp_time_s, float | int):
        want.ramp_time_s = float(ramp_time_s)


def _own_values(
    mode: str, scope_devices: Sequence[DeviceState], scopes: Mapping[str, ScopeControls | None]
) -> dict[str, tuple[float, str]]:
    """Devices in scope with their own value for `mode`: id -> (value, source label)."""
    own: dict[str, tuple[float, str]] = {}
    for d in scope_devices:
        scope = scopes.get(d.device_id)
        if scope is not None and (value := getattr(scope.controls, mode)) is not None:
            own[d.device_id] = (float(value), scope.label(mode))
    return own


def _among(healthy: Sequence[DeviceState], scope: Sequence[DeviceState]) -> list[DeviceState]:
    ids = {d.device_id for d in scope}
    return [d for d in healthy if d.device_id in ids]


def _site_share(
    mode: str,
    site: ScopeControls,
    own: Mapping[str, tuple[float, str]],
    healthy: Sequence[DeviceState],
) -> tuple[float | None, list[DeviceState], str]:
    """The site total for `mode` left after the devices with their own value, and who shares it."""
    total = getattr(site.controls, mode)
    if total is None:
        return None, [], ""
    rest = [d for d in healthy if d.device_id not in own]
    remainder = float(total) - sum(value for value, _ in own.values())
    return remainder, rest, site.label(mode)


def _apply_gen_limit(
    site: ScopeControls,
    present: Sequence[DeviceState],
    healthy: Sequence[DeviceState],
    scopes: Mapping[str, ScopeControls | None],
    wants: dict[str, _Want],
    log: list[str],
) -> None:
    generators = [d for d in present if d.kind in (DeviceKind.PV, DeviceKind.BATTERY)]
    own = _own_values("gen_limit_w", generators, scopes)
    for device_id, (value, source) in own.items():
        wants[device_id].cap(max(value, 0.0), f"{source}: gen_limit_w")
    remainder, rest, source = _site_share("gen_limit_w", site, own, _among(healthy, generators))
    if remainder is None or not rest:
        return
    shares = _split(
        max(remainder, 0.0), rest, _discharge_rating, _generation_room, log, source, "gen_limit_w"
    )
    for d, share in zip(rest, shares, strict=True):
        wants[d.device_id].cap(float(share), f"{source}: gen_limit_w share")


def _apply_target(
    site: ScopeControls,
    present: Sequence[DeviceState],
    healthy: Sequence[DeviceState],
    scopes: Mapping[str, ScopeControls | None],
    wants: dict[str, _Want],
    log: list[str],
) -> None:
    generators = [d for d in present if d.kind in (DeviceKind.PV, DeviceKind.BATTERY)]
    by_id = {d.device_id: d for d in generators}
    own = _own_values("target_w", generators, scopes)
    for device_id, (value, source) in own.items():
        wants[device_id].target(by_id[device_id], max(value, 0.0), f"{source}: target_w")
    remainder, rest, source = _site_share("target_w", site, own, _among(healthy, generators))
    if remainder is None or not rest:
        return
    shares = _split(
        max(remainder, 0.0), rest, _discharge_rating, _generation_room, log, source, "target_w"
    )
    for d, share in zip(rest, shares, strict=True):
        wants[d.device_id].target(d, float(share), f"{source}: target_w share")


def _apply_fixed(
    site: ScopeControls,
    present: Sequence[DeviceState],
    healthy: Sequence[DeviceState],
    scopes: Mapping[str, ScopeControls | None],
    wants: dict[str, _Want],
    log: list[str],
) -> None:
    batteries = [d for d in present if d.kind is DeviceKind.BATTERY]
    own = _own_values("fixed_w", batteries, scopes)
    for device_id, (value, source) in own.items():
        wants[device_id].active_w = value
        wants[device_id].target_source = f"{source}: fixed_w"
        wants[device_id].origin += (f"{source}: fixed_w",)
    remainder, rest, source = _site_share("fixed_w", site, own, _among(healthy, batteries))
    if remainder is None or not rest:
        return
    if remainder >= 0.0:
        shares = _split(
            remainder, rest, _discharge_rating, _generation_room, log, source, "fixed_w (discharge)"
        )
    else:
        shares = -_split(
            -remainder,
            rest,
            _charge_rating,
            _charge_room,
            log,
            source,
            "fixed_w (charge)",
            force_log=True,
        )
    for d, share in zip(rest, shares, strict=True):
        wants[d.device_id].active_w = float(share)
        wants[d.device_id].target_source = f"{source}: fixed_w share"
        wants[d.device_id].origin += (f"{source}: fixed_w share",)


def _apply_load_limit(
    site: ScopeControls,
    present: Sequence[DeviceState],
    healthy: Sequence[DeviceState],
    scopes: Mapping[str, ScopeControls | None],
    wants: dict[str, _Want],
    log: list[str],
) -> None:
    batteries = [d for d in present if d.kind is DeviceKind.BATTERY]
    own = _own_values("load_limit_w", batteries, scopes)
    for device_id, (value, source) in own.items():
        wants[device_id].charge_limit(max(value, 0.0), f"{source}: load_limit_w")
    remainder, rest, source = _site_share("load_limit_w", site, own, _among(healthy, batteries))
    if remainder is None or not rest:
        return
    shares = _split(
        max(remainder, 0.0), rest, _charge_rating, _charge_room, log, source, "load_limit_w"
    )
    for d, share in zip(rest, shares, strict=True):
        wants[d.device_id].charge_limit(float(share), f"{source}: load_limit_w share")


def _pcc_limits(
    active: ActiveControls,
    scopes: Mapping[str, ScopeControls | None],
    contract_export_limit_w: float | None,
    contract_import_limit_w: float | None,
    constraints: SiteConstraints | None,
) -> tuple[list[Limit], list[Limit]]:
    """The PCC limits in force, highest priority first: intent, site constraints, contract."""
    export_limits: list[Limit] = []
    import_limits: list[Limit] = []
    # A device scope's PCC limit is still a PCC limit: the site cannot honour it for one device.
    for scope in (active.site, *(s for _, s in sorted(scopes.items()) if s is not None)):
        if scope.controls.export_limit_w is not None:
            export_limits.append(
                Limit(
                    scope.label("export_limit_w"),
                    scope.controls.export_limit_w,
                    _standing(scope, "export_limit_w"),
                )
            )
        if scope.controls.import_limit_w is not None:
            import_limits.append(
                Limit(
                    scope.label("import_limit_w"),
                    scope.controls.import_limit_w,
                    _standing(scope, "import_limit_w"),
                )
            )
    constraints_source = f"site constraints v{active.intent_version}"
    if constraints is not None and constraints.export_limit_w is not None:
        export_limits.append(Limit(constraints_source, constraints.export_limit_w, True))
    if constraints is not None and constraints.import_limit_w is not None:
        import_limits.append(Limit(constraints_source, constraints.import_limit_w, True))
    if contract_export_limit_w is not None:
        export_limits.append(Limit("site contract (config)", contract_export_limit_w, True))
    if contract_import_limit_w is not None:
        import_limits.append(Limit("site contract (config)", contract_import_limit_w, True))
    return export_limits, import_limits


def _split(
    total_w: float,
    devices: Sequence[DeviceState],
    rating: Callable[[DeviceState], float],
    room: Callable[[DeviceState], float],
    log: list[str],
    source: str,
    what: str,
    *,
    force_log: bool = False,
) -> np.ndarray:
    """Split `total_w` by rating, each share within what the device can do now."""
    ratings = np.array([rating(d) for d in devices], dtype=np.float64)
    rooms = np.minimum(np.array([room(d) for d in devices], dtype=np.float64), ratings)
    shares = split_proportional(total_w, ratings, rooms)
    if len(devices) > 1 or force_log:
        ids = [d.device_id for d in devices]
        log.append(f"{source}: " + _split_log(what, total_w, ids, shares))
    return shares

"""The safety/constraint kernel: the only producer of SafeSetpoint, the only type drivers accept.

Pure: plain functions over plain data, no I/O, no asyncio. Time comes in as
`SiteConditions.now_mono_ns`; memory between cycles is `KernelState`, returned by `enforce` and
passed back by the caller.

`SafeSetpoint` can only be minted inside this module (its constructor requires a private token and
`dataclasses.replace` refuses to copy it), so "no command reaches a device without passing the
constraint layer" is a property of the types, not of discipline.

Composition (protocols.md §4.6), highest priority first; every bound that moves a setpoint is
named in its `bound_by`, in this order:

  0. device protection: nameplate; a device reporting a fault is commanded only towards safety
     (generation cap 0 W, battery idle, never reconnected: it may be disconnected or held, never
     ramped up); the BMS's dynamic charge/discharge limits; the SoC guard (gateway.soc_guard).
  1. local interlocks (`SiteConditions.interlocks`: static config interlocks and the limit side
     of local overrides).
  2. utility / intent limits: PCC export and import limits, generation and charge limits,
     max_gen_pct, connect / energize.
  3. site contract limits (config), which reach the kernel as PCC limits after the intent's.
  4. optimisation targets (target_w, fixed_w).
  5. the software ramp (gateway.ramp), applied to the result.

Limits intersect (the tightest wins; ties keep the higher-priority source); connect resolves to
the safe side (any disconnect wins; energize=False is a disconnect); setpoints are clamped into
the feasible set, then ramped. Reductions needed to meet a limit apply at once
(`KernelPolicy.ramp_down_immediate`); protection and interlocks always apply at once.

The PCC limits are met by a closed loop on the PCC meter (gateway.pcc), open loop when the meter
is stale, and the result is split across devices by gateway.allocate: surplus is soaked into
batteries the intent leaves free before PV is curtailed; an import limit is met by discharging
batteries (there are no controllable loads yet).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import InitVar, dataclass, field

import numpy as np

from drivers.contract import ALL_CONTROLS, Control, DeviceKind
from gateway.allocate import allocate_export, allocate_import, split_proportional
from gateway.intent import Controls
from gateway.pcc import (
    PccLoopState,
    frequency_response,
    next_lower_bound,
    next_upper_bound,
    observe,
)
from gateway.ramp import NO_RAMP, event_rate_w_per_s, policy_rate_w_per_s, ramp, step_w
from gateway.soc_guard import SocGuard, soc_guard_step

__all__ = [
    "DeviceMemory",
    "DeviceState",
    "Enforcement",
    "Interlock",
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
_EPS_W = 1e-6
_NS_PER_S = 1_000_000_000

# Ranks of the composition order (module docstring); bound_by is sorted by them.
_PROTECTION, _INTERLOCK, _UTILITY, _CONTRACT, _TARGET, _RAMP = range(6)


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
    """One limit in force and where it comes from, e.g. Limit("event evt-7", 2000.0).

    standing: the limit still applies while the gateway is down (a default or fallback control,
    the intent's site constraints, the site contract, a static interlock), so devices' reversion
    values must honour it (`SafeSetpoint.revert_cap_w`). An event's limit is not standing.
    """

    source: str
    watts: float
    standing: bool = False


@dataclass(frozen=True, slots=True)
class Interlock:
    """A local safety interlock, or the limit side of a local override (rank 1, after protection).

    Uses the limit modes of `controls`: max_gen_pct, gen_limit_w (the scope's total generation),
    load_limit_w (the scope's total charging), export_limit_w / import_limit_w (at the PCC, for
    any scope), connect=False / energize=False (disconnect; True never forces a connection).
    Targets (fixed_w, target_w) and ramp_time_s are not limits and are ignored here: the target
    side of an override goes through gateway.schedule.
    """

    source: str  # named in bound_by, e.g. "interlock fire-panel", "override o1 (console: ann)"
    controls: Controls
    device_id: str | None = None  # None = the whole site
    standing: bool = False  # holds without the gateway too (a static config interlock)


@dataclass(frozen=True, slots=True)
class SiteConditions:
    """Site-level inputs: the PCC measurement, the limits and interlocks in force, and time.

    pcc_w is + import / - export; None (or NaN) means the PCC meter is stale or bad, which
    switches the PCC limits to open loop (assume only `assumed_min_load_w` of load on site).
    pcc_mono_ns is when that reading was taken (monotonic; None = now_mono_ns): a reading seen
    again with the same time is not counted twice in the loop's average.
    """

    pcc_w: float | None
    export_limits: tuple[Limit, ...] = ()
    import_limits: tuple[Limit, ...] = ()
    grid_hz: float | None = None  # PCC frequency, when known (frequency response detection)
    now_mono_ns: int = 0  # when these conditions were observed (ramps, averaging)
    pcc_mono_ns: int | None = None
    interlocks: tuple[Interlock, ...] = ()
    # A device reports its output throttled by an autonomous grid-support function (SunSpec 701
    # ThrotSrc FREQ_WATT / VOLT_WATT ...): why, e.g. "pv3 ThrotSrc FREQ_WATT"; None = none. The
    # PCC loop holds as for a frequency excursion (protocols.md §3.4).
    grid_response: str | None = None


@dataclass(frozen=True, slots=True)
class KernelPolicy:
    """How the kernel behaves: site tuning from the gateway config. Plain, immutable."""

    export_margin_w: float = 50.0  # stay this far inside export/import limits
    assumed_min_load_w: float = 0.0  # load assumed when the PCC meter is stale (open loop)
    # Share of a loosening export budget taken per cycle: tightening is immediate, loosening
    # gradual, so a loop fed readings up to a poll period old does not overshoot the limit.
    export_relax_gain: float = 0.5
    # Loosening step per cycle at most this share of the steered devices' total rating (%).
    export_relax_max_step_pct: float = 20.0
    # No loosening or tightening of a PCC budget by less than this (W; capped at the margin, so
    # holding within it never crosses the limit itself).
    export_deadband_w: float = 25.0
    pcc_average_s: float = 2.0  # time-weighted averaging window of the PCC loop
    # A PV inverter producing at its cap is budgeted this much above it (% of its rating), so that
    # the loop learns whether it could make more (batteries soak it, or it is shared out).
    export_probe_pct: float = 1.0
    nominal_hz: float | None = None  # None: the nearer of 50 / 60 Hz to the measured frequency
    frequency_deadband_hz: float = 0.036  # IEEE 1547 droop deadband (protocols.md §3.3)
    # Software ramp for generation caps and battery setpoints, % of rating per second, both
    # directions (IEEE 2030.5 setGradW); None = no software ramp. An event's ramp_time_s wins.
    ramp_pct_per_s: float | None = None
    # Reductions needed to meet a PCC/utility limit apply at once (False: they ramp too).
    # Protection and interlocks always apply at once.
    ramp_down_immediate: bool = True
    soc_min_pct: float = 10.0  # battery SoC floor: discharge blocked at or below it
    soc_max_pct: float = 100.0  # battery SoC ceiling: charging blocked at or above it
    soc_hysteresis_pct: float = 5.0  # a block clears this far back inside the window


@dataclass(frozen=True, slots=True)
class DeviceMemory:
    """What the kernel remembers about one device between cycles."""

    mono_ns: int  # when it was last enforced
    cap_w: float | None = None  # the generation cap enforced (None = uncapped)
    active_w: float | None = None  # the fixed power enforced (None = not commanded)
    # Why the kernel commands a battery the intent leaves free: "soak" (export loop), "import"
    # (import loop), "guard" (SoC guard / fault hold); "" = not held.
    held: str = ""
    guard: SocGuard = field(default_factory=SocGuard)
    plan_key: tuple[float | None, ...] | None = None  # detects a new planned value (event ramp)
    cap_rate_w_per_s: float = NO_RAMP  # the event ramp in force for the cap
    active_rate_w_per_s: float = NO_RAMP  # and for the fixed power
    probe_w: float = 0.0  # PV: the export loop's probe above the cap last cycle
    previous_cap_w: float | None = None  # the cap enforced the cycle before (None = uncapped)
    measured_w: float | None = None  # its measured output when last enforced


@dataclass(frozen=True, slots=True)
class KernelState:
    """What the kernel remembers between cycles; returned by enforce(), passed back next cycle."""

    loop: PccLoopState = field(default_factory=PccLoopState)
    devices: Mapping[str, DeviceMemory] = field(default_factory=dict)

    @property
    def export_budget_w(self) -> float | None:
        """The total output the export limit allowed the steered devices last cycle."""
        return self.loop.export_budget_w


@dataclass(frozen=True, slots=True)
class PlannedSetpoint:
    """What the planner would like a device to do, before any constraint is applied.

    max_active_power_w is the generation cap from *limits* (max_gen_pct, gen_limit_w) and applies
    at once; target_cap_w is a PV inverter's share of a *target* (target_w) and is ramped.
    active_power_w is a battery's target (fixed_w / target_w share); max_charge_w its charge limit
    (load_limit_w share). The *_source fields name who asked, for bound_by.
    """

    device_id: str
    max_active_power_w: float | None = None
    active_power_w: float | None = None
    connect: bool | None = None
    origin: tuple[str, ...] = ()  # what asked for it, for the decision record
    target_cap_w: float | None = None
    max_charge_w: float | None = None
    ramp_time_s: float | None = None  # the event's ramp time (None: the policy's ramp)
    soc_min_pct: float | None = None  # the intent's SoC window (tightens the policy's)
    soc_max_pct: float | None = None
    cap_source: str = ""
    target_source: str = ""
    charge_source: str = ""
    connect_source: str = ""
    soc_source: str = ""


@dataclass(frozen=True, slots=True)
class Enforcement:
    """The kernel's answer: commands that may go to devices, and devices left alone (and why)."""

    setpoints: tuple[SafeSetpoint, ...]
    skipped: tuple[tuple[str, str], ...] = ()  # (device_id, reason)
    notes: tuple[str, ...] = ()  # site-level conditions, e.g. "PCC meter stale: open loop"
    state: KernelState = KernelState()  # pass back as `state` next cycle


@dataclass(slots=True, eq=False)
class _Draft:
    device: DeviceState
    plan: PlannedSetpoint
    memory: DeviceMemory | None
    elapsed_s: float
    rating_w: float
    natural_w: float  # the cap that means "uncapped" (nameplate, or inf when unknown)
    bounds: list[tuple[int, str]] = field(default_factory=list)
    # generation cap
    cap_asked: bool = False
    cap_desired_w: float = math.inf  # every bound and the target, before the ramp
    cap_hard_w: float = math.inf  # the bounds that apply at once
    cap_rate_w_per_s: float = NO_RAMP
    cap_ramped_w: float = math.inf  # after the ramp, before the PCC loop
    cap_w: float = math.inf  # the result (inf = uncapped)
    # battery fixed power
    steerable: bool = False
    lo_w: float = -math.inf  # every bound
    hi_w: float = math.inf
    lo_hard_w: float = -math.inf  # the bounds that apply at once
    hi_hard_w: float = math.inf
    target_w: float | None = None
    active_rate_w_per_s: float = NO_RAMP
    active_w: float | None = None
    held: str = ""
    guard: SocGuard = field(default_factory=SocGuard)
    guard_note: str = ""
    connect: bool | None = None
    probe_w: float = 0.0

    @property
    def device_id(self) -> str:
        return self.device.device_id

    def bound(self, rank: int, why: str) -> None:
        if why not in (text for _, text in self.bounds):
            self.bounds.append((rank, why))

    def last_cap_w(self) -> float | None:
        """The cap enforced last cycle (natural when it was uncapped); None without memory."""
        if self.memory is None:
            return None
        return self.natural_w if self.memory.cap_w is None else self.memory.cap_w

    def last_active_w(self) -> float | None:
        """The fixed power enforced last cycle, else what the battery did; None without memory."""
        if self.memory is None:
            return None
        if self.memory.active_w is not None:
            return self.memory.active_w
        return _measured(self.device)


def _w(watts: float) -> str:
    return f"{watts:.0f} W"


def _known(value: float | None) -> float | None:
    """`value` when it is a finite number, else None (unknown)."""
    return value if value is not None and math.isfinite(value) else None


def _measured(device: DeviceState) -> float:
    measured = _known(device.measured_w)
    return measured if measured is not None else 0.0


def _tightest(limits: Sequence[Limit]) -> Limit | None:
    finite = [limit for limit in limits if math.isfinite(limit.watts)]
    # Ties keep the first source listed (the higher-priority one), so "why" is stable.
    return min(finite, key=lambda limit: limit.watts) if finite else None


def _discharge_rating(device: DeviceState) -> float:
    return device.max_discharge_w or device.max_w


def _charge_rating(device: DeviceState) -> float:
    return device.max_charge_w or device.max_w


# -- per-device composition ---------------------------------------------------------------------


def _new_draft(
    plan: PlannedSetpoint, device: DeviceState, memory: DeviceMemory | None, now_ns: int
) -> _Draft:
    elapsed_s = (now_ns - memory.mono_ns) / _NS_PER_S if memory is not None else 0.0
    rating_w = device.max_w if device.max_w > 0.0 else max(_discharge_rating(device), 0.0)
    natural_w = device.max_w if device.max_w > 0.0 else math.inf
    draft = _Draft(device, plan, memory, elapsed_s, rating_w, natural_w)
    draft.steerable = device.kind is DeviceKind.BATTERY and Control.ACTIVE_POWER in device.controls
    return draft


@dataclass(slots=True)
class _DeviceBound:
    rank: int
    cap_w: float | None = None  # upper bound on generation (cap, and a battery's discharge)
    charge_w: float | None = None  # upper bound on charging (>= 0)
    why: str = ""


def _interlock_bounds(
    interlocks: Sequence[Interlock], drafts: Mapping[str, _Draft]
) -> dict[str, list[_DeviceBound]]:
    """Per device, the generation / charge bounds the interlocks put on it (rank 1)."""
    out: dict[str, list[_DeviceBound]] = {device_id: [] for device_id in drafts}
    generators = sorted(
        (d for d in drafts.values() if d.device.kind in (DeviceKind.PV, DeviceKind.BATTERY)),
        key=lambda d: d.device_id,
    )
    batteries = [d for d in generators if d.device.kind is DeviceKind.BATTERY]
    for interlock in interlocks:
        c, src = interlock.controls, f"interlock {interlock.source}"
        if interlock.device_id is not None:
            scope = [drafts[interlock.device_id]] if interlock.device_id in drafts else []
        else:
            scope = generators
        if c.max_gen_pct is not None:
            pct = min(max(c.max_gen_pct, 0.0), 100.0) if math.isfinite(c.max_gen_pct) else 0.0
            for d in scope:
                out[d.device_id].append(
                    _DeviceBound(
                        _INTERLOCK, cap_w=d.rating_w * pct / 100.0, why=f"{src}: {pct:g} %"
                    )
                )
        if c.gen_limit_w is not None and scope:
            total = max(c.gen_limit_w, 0.0) if math.isfinite(c.gen_limit_w) else 0.0
            ratings = np.array([_discharge_rating(d.device) for d in scope], dtype=np.float64)
            shares = split_proportional(total, ratings, ratings) if len(scope) > 1 else [total]
            for d, share in zip(scope, shares, strict=True):
                why = f"{src}: generation {_w(total)}"
                out[d.device_id].append(_DeviceBound(_INTERLOCK, cap_w=float(share), why=why))
        charge_scope = [d for d in scope if d.device.kind is DeviceKind.BATTERY]
        if interlock.device_id is None:
            charge_scope = batteries
        if c.load_limit_w is not None and charge_scope:
            total = max(c.load_limit_w, 0.0) if math.isfinite(c.load_limit_w) else 0.0
            ratings = np.array([_charge_rating(d.device) for d in charge_scope], dtype=np.float64)
            shares = split_proportional(total, ratings, ratings)
            for d, share in zip(charge_scope, shares, strict=True):
                why = f"{src}: charging {_w(total)}"
                out[d.device_id].append(_DeviceBound(_INTERLOCK, charge_w=float(share), why=why))
    return out


def _compose_connect(draft: _Draft, interlocks: Sequence[Interlock]) -> None:
    plan, device_id = draft.plan, draft.device_id
    draft.connect = plan.connect
    if plan.connect is False:
        draft.bound(_UTILITY, f"{plan.connect_source or 'plan'}: disconnect")
    for interlock in interlocks:
        if interlock.device_id not in (None, device_id):
            continue
        c = interlock.controls
        if c.connect is False or c.energize is False:
            draft.connect = False
            what = "disconnect" if c.connect is False else "de-energize"
            draft.bound(_INTERLOCK, f"interlock {interlock.source}: {what}")
    if draft.device.fault is not None and draft.connect is True:
        # A tripped device is never pushed back into service by the gateway (§3.2 rule 3).
        draft.connect = None
        draft.bound(
            _PROTECTION, f"protection {device_id}: fault ({draft.device.fault}): not reconnected"
        )


def _compose_cap(draft: _Draft, ilk: Sequence[_DeviceBound], policy: KernelPolicy) -> None:
    """The generation cap's desired value (every bound and the target) and its hard part."""
    device, plan = draft.device, draft.plan
    asked = plan.max_active_power_w
    target = plan.target_cap_w if device.kind is DeviceKind.PV else None
    if asked is not None and not (math.isfinite(asked) and asked >= 0.0):
        draft.bound(_PROTECTION, f"range: generation cap {asked!r} W refused, using 0 W")
        asked = 0.0
    if target is not None and not (math.isfinite(target) and target >= 0.0):
        draft.bound(_PROTECTION, f"range: target {target!r} W refused, using 0 W")
        target = 0.0
    draft.cap_asked = asked is not None or target is not None
    running = draft.natural_w
    if device.max_w > 0.0 and max(asked or 0.0, target or 0.0) > device.max_w:
        draft.bound(_PROTECTION, f"nameplate {device.device_id}: {_w(device.max_w)}")
    hard = running
    bounds: list[tuple[int, float, str, bool]] = []
    if device.fault is not None:
        bounds.append(
            (_PROTECTION, 0.0, f"protection {device.device_id}: fault ({device.fault}): 0 W", True)
        )
    bounds.extend((b.rank, b.cap_w, b.why, True) for b in ilk if b.cap_w is not None)
    if asked is not None:
        source = plan.cap_source or "plan: generation cap"
        bounds.append((_UTILITY, asked, source, policy.ramp_down_immediate))
    if target is not None:
        bounds.append((_TARGET, target, plan.target_source or "plan: target", False))
    for rank, watts, why, is_hard in bounds:
        if watts < running - _EPS_W:
            draft.bound(rank, why)
            running = watts
        if is_hard:
            hard = min(hard, watts)
    draft.cap_desired_w = running
    draft.cap_hard_w = hard


def _compose_battery(draft: _Draft, ilk: Sequence[_DeviceBound], policy: KernelPolicy) -> None:
    """A battery's fixed-power bounds [lo, hi] (all, and the hard part) and its target."""
    device, plan, device_id = draft.device, draft.plan, draft.device_id
    target = plan.active_power_w
    if target is not None and not math.isfinite(target):
        draft.bound(_PROTECTION, "range: fixed power is not a number, using 0 W")
        target = 0.0
    discharge_max, charge_max = _discharge_rating(device), _charge_rating(device)
    # (rank, lo, hi, why, hard): intersected in priority order; a lower-priority bound that
    # contradicts a higher one is clipped into it.
    bounds: list[tuple[int, float, float, str, bool]] = []
    if target is not None and target > discharge_max:
        bounds.append(
            (
                _PROTECTION,
                -math.inf,
                discharge_max,
                f"nameplate {device_id}: discharge {_w(discharge_max)}",
                True,
            )
        )
    elif target is not None and target < -charge_max:
        bounds.append(
            (
                _PROTECTION,
                -charge_max,
                math.inf,
                f"nameplate {device_id}: charge {_w(charge_max)}",
                True,
            )
        )
    bounds.append((_PROTECTION, -charge_max, discharge_max, "", True))
    if device.fault is not None:
        why = f"protection {device_id}: fault ({device.fault}): idle"
        bounds.append((_PROTECTION, 0.0, 0.0, why, True))
    if (bms_discharge := _known(device.bms_discharge_max_w)) is not None:
        limit = max(bms_discharge, 0.0)
        bounds.append(
            (
                _PROTECTION,
                -math.inf,
                limit,
                f"protection {device_id}: BMS discharge max {_w(limit)}",
                True,
            )
        )
    if (bms_charge := _known(device.bms_charge_max_w)) is not None:
        limit = max(bms_charge, 0.0)
        bounds.append(
            (
                _PROTECTION,
                -limit,
                math.inf,
                f"protection {device_id}: BMS charge max {_w(limit)}",
                True,
            )
        )
    guard_why = _soc_guard(draft, policy)
    if draft.guard.discharge_blocked:
        bounds.append((_PROTECTION, -math.inf, 0.0, guard_why[0], True))
    if draft.guard.charge_blocked:
        bounds.append((_PROTECTION, 0.0, math.inf, guard_why[1], True))
    for b in ilk:
        if b.cap_w is not None:
            bounds.append((b.rank, -math.inf, b.cap_w, b.why, True))
        if b.charge_w is not None:
            bounds.append((b.rank, -b.charge_w, math.inf, b.why, True))
    immediate = policy.ramp_down_immediate
    if plan.max_active_power_w is not None:
        cap = plan.max_active_power_w if math.isfinite(plan.max_active_power_w) else 0.0
        why = plan.cap_source or "plan: generation cap"
        bounds.append((_UTILITY, -math.inf, max(cap, 0.0), why, immediate))
    if plan.max_charge_w is not None:
        limit = max(plan.max_charge_w, 0.0) if math.isfinite(plan.max_charge_w) else 0.0
        why = plan.charge_source or "plan: charge limit"
        bounds.append((_UTILITY, -limit, math.inf, why, immediate))

    lo, hi, lo_hard, hi_hard = -math.inf, math.inf, -math.inf, math.inf
    running = target if target is not None else _measured(device)
    for rank, b_lo, b_hi, why, hard in bounds:
        # Clip into what higher-priority bounds allow, then intersect.
        clipped_lo, clipped_hi = min(max(b_lo, lo), hi), max(min(b_hi, hi), lo)
        lo, hi = max(lo, clipped_lo), min(hi, clipped_hi)
        if hard and b_lo > -math.inf:
            lo_hard = max(lo_hard, clipped_lo)
        if hard and b_hi < math.inf:
            hi_hard = min(hi_hard, clipped_hi)
        clipped = min(max(running, lo), hi)
        if why and abs(clipped - running) > _EPS_W:
            draft.bound(rank, why)
        running = clipped
    draft.lo_w, draft.hi_w, draft.lo_hard_w, draft.hi_hard_w = lo, hi, lo_hard, hi_hard
    draft.target_w = running if target is not None else None
    if target is not None and abs(running - target) <= _EPS_W:
        draft.bound(_TARGET, plan.target_source or "plan: fixed power")
    if draft.guard_note:
        draft.bound(_PROTECTION, draft.guard_note)


def _soc_guard(draft: _Draft, policy: KernelPolicy) -> tuple[str, str]:
    """Step the battery's SoC guard; return why discharge / charge is blocked."""
    device, plan = draft.device, draft.plan
    floor, floor_src = policy.soc_min_pct, "policy"
    ceiling, ceiling_src = policy.soc_max_pct, "policy"
    if plan.soc_min_pct is not None and plan.soc_min_pct > floor:
        floor, floor_src = plan.soc_min_pct, plan.soc_source or "intent"
    if plan.soc_max_pct is not None and plan.soc_max_pct < ceiling:
        ceiling, ceiling_src = plan.soc_max_pct, plan.soc_source or "intent"
    previous = draft.memory.guard if draft.memory is not None else SocGuard()
    draft.guard = soc_guard_step(
        previous,
        device.soc_pct,
        floor_pct=floor,
        ceiling_pct=ceiling,
        hysteresis_pct=policy.soc_hysteresis_pct,
    )
    soc = _known(device.soc_pct)
    hyst = max(policy.soc_hysteresis_pct, 0.0)
    soc_text = f"SoC {soc:g} %" if soc is not None else "SoC unknown"
    discharge = (
        f"SoC guard {device.device_id}: {soc_text}, floor {floor:g} % ({floor_src}): "
        f"discharge blocked until above {floor + hyst:g} %"
    )
    charge = (
        f"SoC guard {device.device_id}: {soc_text}, ceiling {ceiling:g} % ({ceiling_src}): "
        f"charging blocked until below {ceiling - hyst:g} %"
    )
    # A block is always explained, even while it does not move the setpoint.
    notes = []
    if draft.guard.discharge_blocked:
        notes.append(discharge)
    if draft.guard.charge_blocked:
        notes.append(charge)
    draft.guard_note = "; ".join(notes)
    return discharge, charge


def _ramp_rates(draft: _Draft, policy: KernelPolicy) -> None:
    """The ramp rates in force: the event's (over its ramp_time_s) or the policy's."""
    plan, memory = draft.plan, draft.memory
    key = (plan.max_active_power_w, plan.target_cap_w, plan.active_power_w, plan.ramp_time_s)
    policy_rate = policy_rate_w_per_s(policy.ramp_pct_per_s, draft.rating_w)
    if plan.ramp_time_s is None or not math.isfinite(plan.ramp_time_s):
        draft.cap_rate_w_per_s = draft.active_rate_w_per_s = policy_rate
    elif memory is not None and memory.plan_key == key:
        draft.cap_rate_w_per_s = memory.cap_rate_w_per_s
        draft.active_rate_w_per_s = memory.active_rate_w_per_s
    else:
        # A new planned value with a ramp time: move there over that time.
        last_cap, last_active = draft.last_cap_w(), draft.last_active_w()
        cap_change = (
            min(draft.cap_desired_w, draft.natural_w) - last_cap if last_cap is not None else 0.0
        )
        target = draft.target_w if draft.target_w is not None else 0.0
        active_change = target - last_active if last_active is not None else 0.0
        draft.cap_rate_w_per_s = event_rate_w_per_s(
            cap_change if math.isfinite(cap_change) else 0.0, plan.ramp_time_s, draft.rating_w
        )
        draft.active_rate_w_per_s = event_rate_w_per_s(
            active_change, plan.ramp_time_s, draft.rating_w
        )


def _ramped_cap(draft: _Draft) -> float:
    """The cap after the ramp and the bounds that apply at once (before the PCC loop)."""
    last = draft.last_cap_w()
    if last is not None and math.isinf(last):
        last = None  # uncapped and of unknown rating: nothing to ramp from
    ramped = ramp(last, draft.cap_desired_w, step_w(draft.cap_rate_w_per_s, draft.elapsed_s))
    return max(min(ramped, draft.cap_hard_w), 0.0)


def _cap_step_floor(draft: _Draft, policy: KernelPolicy, cap_w: float) -> float:
    """How low the PCC loop may take a cap this cycle."""
    if policy.ramp_down_immediate:
        return 0.0
    last = draft.last_cap_w()
    if last is None or math.isinf(last):
        return 0.0
    return min(max(last - step_w(draft.cap_rate_w_per_s, draft.elapsed_s), 0.0), cap_w)


def _ramped_active(draft: _Draft, desired: float) -> float:
    last = draft.last_active_w()
    ramped = ramp(last, desired, step_w(draft.active_rate_w_per_s, draft.elapsed_s))
    return min(max(ramped, draft.lo_hard_w), draft.hi_hard_w)


def _active_window(draft: _Draft) -> tuple[float, float]:
    """How far the PCC loops may move a battery this cycle: [lo, hi]."""
    lo, hi = draft.lo_w, draft.hi_w
    last = draft.last_active_w()
    step = step_w(draft.active_rate_w_per_s, draft.elapsed_s)
    if last is not None and math.isfinite(step):
        lo, hi = max(lo, min(last - step, hi)), min(hi, max(last + step, lo))
    return lo, hi


def _compose(
    draft: _Draft,
    interlocks: Sequence[Interlock],
    interlock_bounds: Sequence[_DeviceBound],
    policy: KernelPolicy,
) -> None:
    """One device's setpoint before the PCC loops: bounds by priority, target, then the ramp."""
    if draft.device.kind is not DeviceKind.BATTERY and draft.plan.active_power_w is not None:
        draft.bound(_PROTECTION, "device kind: fixed power applies to batteries only, ignored")
    _compose_connect(draft, interlocks)
    _compose_cap(draft, interlock_bounds, policy)
    if draft.device.kind is DeviceKind.BATTERY:
        _compose_battery(draft, interlock_bounds, policy)
    _ramp_rates(draft, policy)
    draft.cap_w = draft.cap_ramped_w = _ramped_cap(draft)
    if (
        draft.steerable
        and Control.GENERATION_CAP not in draft.device.controls
        and draft.target_w is None
        and draft.cap_w < _discharge_rating(draft.device)
    ):
        # Storage whose only lever is its fixed power: a binding cap holds it at or below the
        # cap, idle when nothing else was asked for (decided here, so that the PCC loops count it
        # where it will be).
        draft.target_w = min(max(0.0, draft.lo_w), draft.hi_w)
    if draft.target_w is not None:
        _finish_battery(draft, loop_touched=False)


# -- the PCC loops ------------------------------------------------------------------------------


@dataclass(slots=True)
class _Loop:
    notes: list[str]
    state: PccLoopState
    export_budget_w: float | None = None
    export_why: str = ""
    export_rank: int = _UTILITY
    import_floor_w: float | None = None
    import_why: str = ""
    import_rank: int = _UTILITY


def _run_loops(
    export_limit: Limit | None,
    export_rank: int,
    import_limit: Limit | None,
    import_rank: int,
    drafts: Mapping[str, _Draft],
    devices: Mapping[str, DeviceState],
    site: SiteConditions,
    policy: KernelPolicy,
    state: PccLoopState,
) -> _Loop:
    """This cycle's export budget and import floor for the steered devices (gateway.pcc)."""
    loop = _Loop(notes=[], state=PccLoopState())
    if export_limit is None and import_limit is None:
        return loop
    steered = [d for d in drafts.values() if _in_loop(d)]
    steered_ids = {d.device_id for d in steered}
    steered_now_w = sum(_measured(d.device) for d in steered)
    steered_rating_w = sum(d.rating_w for d in steered if math.isfinite(d.rating_w))
    relax_max_step_w = max(policy.export_relax_max_step_pct, 0.0) / 100.0 * steered_rating_w
    margin_w = max(policy.export_margin_w, 0.0)
    deadband_w = min(max(policy.export_deadband_w, 0.0), margin_w)
    gain = min(max(policy.export_relax_gain, 0.0), 1.0)
    pcc_w = _known(site.pcc_w)
    # The PCC reading measures load only net of every generator's output: while a steerable
    # device's output is unknown (a stale or failed reading) a sample would count its
    # generation as negative load, and the loop would learn a phantom (found in HIL: caps fell
    # to 0 W after a frozen gateway resumed). Such cycles hold the loop and take no sample.
    blind = sorted(
        device.device_id
        for device in devices.values()
        if device.device_id not in steered_ids
        and not device.available
        and _known(device.measured_w) is None
        and _steerable_kind(device)
    )
    held = False
    samples: tuple[tuple[int, float], ...] = state.samples if blind else ()
    latest_w = mean_w = 0.0
    if pcc_w is not None and blind:
        held = True
        loop.notes.append(f"PCC loop held: output of {', '.join(blind)} unknown")
        mode = "closed loop, held: a device's output unknown"
    elif pcc_w is not None:
        sample_ns = site.pcc_mono_ns if site.pcc_mono_ns is not None else site.now_mono_ns
        samples, net = observe(
            state.samples,
            sample_mono_ns=sample_ns,
            net_load_w=pcc_w + steered_now_w,
            now_mono_ns=site.now_mono_ns,
            window_s=policy.pcc_average_s,
        )
        latest_w, mean_w = net.latest_w, net.mean_w
        in_droop = frequency_response(
            site.grid_hz, nominal_hz=policy.nominal_hz, deadband_hz=policy.frequency_deadband_hz
        )
        held = in_droop or site.grid_response is not None
        # Notes are conditions, not readings: their text changes only when the condition does
        # (the runtime reports notes when they change).
        if in_droop:
            loop.notes.append(
                "frequency response: PCC loop held (grid frequency outside the "
                f"{policy.frequency_deadband_hz:g} Hz droop deadband)"
            )
        if site.grid_response is not None:
            loop.notes.append(f"grid support: PCC loop held ({site.grid_response})")
        mode = "closed loop" + (", held: grid support" if held else "")
    else:
        loop.notes.append(
            "PCC meter stale: open loop "
            f"(assumed load {_w(policy.assumed_min_load_w)} less uncontrolled generation)"
        )
        mode = "open loop: PCC meter stale"

    remembered_export_w: float | None = None
    remembered_import_w: float | None = None
    if export_limit is not None:
        previous = state.export_budget_w
        if pcc_w is None:
            open_loop_w = (
                export_limit.watts
                + policy.assumed_min_load_w
                - _uncontrolled_generation_w(devices, steered_ids)
                - margin_w
            )
            budget = next_upper_bound(
                previous,
                tight_w=open_loop_w,
                loose_w=open_loop_w,
                deadband_w=0.0,
                relax_gain=gain,
                relax_max_step_w=relax_max_step_w,
            )
        elif held and previous is not None:
            budget = previous
            if blind and pcc_w is not None:
                # Hold what was learned (for when the device is back), but apply no more than
                # the PCC shows room for now: a blind device may keep producing outside the loop
                # (its driver crashed, not the device), and handing its share to the others
                # would overshoot the limit. Tighten-only: nothing is learned from this.
                remembered_export_w = previous
                room_w = pcc_w + steered_now_w + export_limit.watts - margin_w
                budget = min(previous, room_w)
        elif blind:
            # Nothing learned yet and a device blind: the open-loop bound, as for a stale meter.
            budget = (
                export_limit.watts
                + policy.assumed_min_load_w
                - _uncontrolled_generation_w(devices, steered_ids)
                - margin_w
            )
        else:
            budget = next_upper_bound(
                previous,
                tight_w=min(latest_w, mean_w) + export_limit.watts - margin_w,
                loose_w=mean_w + export_limit.watts - margin_w,
                deadband_w=deadband_w,
                relax_gain=gain,
                relax_max_step_w=relax_max_step_w,
            )
        loop.export_budget_w = budget
        loop.export_rank = export_rank
        loop.export_why = (
            f"export limit ({export_limit.source}): {_w(export_limit.watts)} at PCC, {mode}"
        )
        loop.notes.append(loop.export_why)

    if import_limit is not None:
        previous = state.import_floor_w
        floor: float | None
        if pcc_w is None or (blind and previous is None):
            floor = previous  # nothing (trustworthy) to measure against: hold what was needed
        elif held and previous is not None:
            floor = previous
            if blind:
                # Hold what was learned, but never ask for less than the PCC shows is needed now:
                # the load may grow while a device is blind. Raise-only (the import limit's safe
                # side; the export budget still caps the total), nothing is learned from this.
                remembered_import_w = previous
                need_w = pcc_w + steered_now_w - import_limit.watts + margin_w
                floor = max(previous, need_w)
        else:
            floor = next_lower_bound(
                previous,
                tight_w=max(latest_w, mean_w) - import_limit.watts + margin_w,
                loose_w=mean_w - import_limit.watts + margin_w,
                deadband_w=deadband_w,
                relax_gain=gain,
                relax_max_step_w=relax_max_step_w,
            )
        loop.import_floor_w = floor
        loop.import_why = (
            f"import limit ({import_limit.source}): {_w(import_limit.watts)} at PCC, {mode}"
        )
        loop.notes.append(loop.import_why)
    loop.state = PccLoopState(
        samples=samples,
        export_budget_w=(
            remembered_export_w if remembered_export_w is not None else loop.export_budget_w
        ),
        import_floor_w=(
            remembered_import_w if remembered_import_w is not None else loop.import_floor_w
        ),
    )
    loop.import_rank = import_rank
    return loop


def _steerable_kind(device: DeviceState) -> bool:
    """A device the PCC loop would steer if it were available."""
    if device.kind is DeviceKind.PV:
        return Control.GENERATION_CAP in device.controls and device.max_w > 0.0
    return device.kind is DeviceKind.BATTERY and Control.ACTIVE_POWER in device.controls


def _in_loop(draft: _Draft) -> bool:
    """Steered by the PCC loop: PV with a generation cap (and a rating), steerable batteries."""
    device = draft.device
    if device.kind is DeviceKind.PV:
        return Control.GENERATION_CAP in device.controls and device.max_w > 0.0
    return draft.steerable


def _uncontrolled_generation_w(devices: Mapping[str, DeviceState], steered: set[str]) -> float:
    """Generation the loop cannot steer. Unknown PV output counts as its rating (conservative)."""
    total = 0.0
    for device_id, device in devices.items():
        if device_id in steered or device.kind is DeviceKind.METER:
            continue
        if (measured := _known(device.measured_w)) is not None:
            total += max(measured, 0.0)
        elif device.kind is DeviceKind.PV:
            total += max(device.max_w, 0.0)
    return total


def _pv_reference(
    draft: _Draft,
    floor_w: float,
    ceiling_w: float,
    policy: KernelPolicy,
    *,
    probe_bound_w: float | None = None,
) -> tuple[float, float]:
    """What a PV inverter is expected to make next cycle, for the export budget, and the probe.

    An inverter producing at its cap may be able to make more (the PCC cannot tell): it is
    budgeted a probe above its cap, which doubles while it keeps pressing (up to the loop's
    loosening step) so that a battery soaking the surplus takes it over quickly. One producing
    well below its cap (cloud) gives the slack back and its probe starts small again; in between,
    it keeps its cap (hysteresis, so that caps do not chase noise or the meter's delay).
    While batteries soak surplus, the probe grows no faster than the absorption they proved in
    the last cycle (`probe_bound_w`): a battery ramps at its own pace and PV must not outrun it
    (found in HIL, export-step: export stayed over the limit for ~1.8 s after a PV step up).
    """
    base_w = max(policy.export_probe_pct, 0.0) / 100.0 * draft.rating_w
    max_w = max(base_w, max(policy.export_relax_max_step_pct, 0.0) / 100.0 * draft.rating_w)
    tolerance_w = max(base_w / 2.0, 1.0)
    memory = draft.memory
    last_probe_w = memory.probe_w if memory is not None and memory.probe_w > 0.0 else base_w
    measured = _known(draft.device.measured_w)
    last = memory.cap_w if memory is not None else None
    probe_w = base_w
    if measured is None:
        reference = last if last is not None else ceiling_w
    elif last is None:
        reference = measured + base_w
    else:
        # The measurement may predate last cycle's write: judge it against the lower of the last
        # two caps, so that a cap just raised is not mistaken for one the inverter cannot fill.
        previous = memory.previous_cap_w if memory is not None else None
        judged = last if previous is None else min(last, previous)
        if measured >= judged - tolerance_w:
            probe_w = min(2.0 * last_probe_w, max_w)
            if probe_bound_w is not None:
                probe_w = min(probe_w, max(probe_bound_w, base_w))
            reference = last + probe_w
        elif judged - measured > 2.0 * base_w + tolerance_w:
            reference = measured + base_w
        else:
            probe_w = last_probe_w
            reference = last
    return min(max(reference, floor_w), ceiling_w), probe_w


def _absorption_gained_w(draft: _Draft) -> float:
    """How much more a battery absorbs now than when last enforced (measured, >= 0)."""
    memory = draft.memory
    now = _known(draft.device.measured_w)
    if memory is None or memory.measured_w is None or now is None:
        return 0.0
    return max(memory.measured_w - now, 0.0)


def _apply_export(
    loop: _Loop, drafts: Sequence[_Draft], policy: KernelPolicy, notes: list[str]
) -> dict[str, float]:
    """Split the export budget; return the expected PV output per inverter (for import)."""
    assert loop.export_budget_w is not None
    pv = [d for d in drafts if d.device.kind is DeviceKind.PV and _in_loop(d)]
    batteries = [d for d in drafts if _in_loop(d) and d.device.kind is DeviceKind.BATTERY]
    free = [d for d in batteries if d.target_w is None]
    commanded = [d for d in batteries if d.target_w is not None]
    # While batteries soak, PV probes grow by at most the absorption they gained last cycle,
    # shared by rating (see _pv_reference).
    soakers = [d for d in free if d.memory is not None and d.memory.held == "soak"]
    pv_rating_w = sum(d.rating_w for d in pv if math.isfinite(d.rating_w))
    gained_w = sum(_absorption_gained_w(d) for d in soakers)

    pv_floor, pv_ceiling, pv_ref = [], [], []
    for d in pv:
        ceiling = d.cap_w if d.connect is not False else 0.0
        floor = min(_cap_step_floor(d, policy, ceiling), ceiling)
        pv_floor.append(floor)
        pv_ceiling.append(ceiling)
        bound = gained_w * d.rating_w / pv_rating_w if soakers and pv_rating_w > 0.0 else None
        reference, d.probe_w = _pv_reference(d, floor, ceiling, policy, probe_bound_w=bound)
        pv_ref.append(reference)
    free_now, free_raw, free_floor, free_release = [], [], [], []
    for d in free:
        memory = d.memory
        # What it does now: what the kernel told it last cycle, else what it does on its own.
        last = d.last_active_w()
        raw = last if last is not None else _measured(d.device)
        lo, hi = _active_window(d)
        now = min(max(raw, d.lo_hard_w), d.hi_hard_w)
        free_raw.append(raw)
        free_now.append(now)
        free_floor.append(min(lo, now))
        # A battery soaking for the loop may come back towards idle (never past it), at its ramp:
        # giving surplus back is a loosening, not a reduction needed to meet the limit.
        soaking = memory is not None and memory.held == "soak"
        free_release.append(max(min(0.0, hi) - now, 0.0) if soaking else 0.0)
    cmd_now, cmd_floor = [], []
    for d in commanded:
        now = d.active_w if d.active_w is not None else 0.0
        floor = max(d.lo_hard_w, min(now, 0.0))
        if not policy.ramp_down_immediate:
            floor = max(floor, _active_window(d)[0])
        cmd_now.append(now)
        cmd_floor.append(min(floor, now))

    allocation = allocate_export(
        loop.export_budget_w,
        pv_reference_w=np.array(pv_ref, dtype=np.float64),
        pv_floor_w=np.array(pv_floor, dtype=np.float64),
        pv_ceiling_w=np.array(pv_ceiling, dtype=np.float64),
        free_now_w=np.array(free_now, dtype=np.float64),
        free_floor_w=np.array(free_floor, dtype=np.float64),
        free_release_w=np.array(free_release, dtype=np.float64),
        commanded_w=np.array(cmd_now, dtype=np.float64),
        commanded_floor_w=np.array(cmd_floor, dtype=np.float64),
    )
    expected: dict[str, float] = {}
    for d, cap, ceiling, ref in zip(
        pv, allocation.pv_caps_w.tolist(), pv_ceiling, pv_ref, strict=True
    ):
        if cap < ceiling - _EPS_W:
            d.bound(loop.export_rank, loop.export_why)
        d.cap_w = cap
        expected[d.device_id] = min(ref, cap)
    for d, value, now, raw in zip(
        free, allocation.free_w.tolist(), free_now, free_raw, strict=True
    ):
        was_soaking = d.memory is not None and d.memory.held == "soak"
        moved = abs(value - raw) > _EPS_W
        # Commanded when the loop moves it (a soak, a soak handed back, or brought inside its
        # bounds, where the budget counted it), and while it soaks for the loop.
        if moved or was_soaking:
            soaking = value < now - _EPS_W or (was_soaking and value < -_EPS_W)
            if soaking:
                d.bound(loop.export_rank, f"{loop.export_why}: soaking surplus")
            d.active_w = value
            d.held = "soak" if soaking else ("guard" if moved else "")
    for d, value, now in zip(commanded, allocation.commanded_w.tolist(), cmd_now, strict=True):
        if value < now - _EPS_W:
            d.bound(loop.export_rank, loop.export_why)
        d.active_w = value
    if allocation.shortfall_w > 0.0:
        notes.append(
            "export limit not met: generation the gateway cannot reduce further exceeds it"
        )
    return expected


def _apply_import(
    loop: _Loop,
    drafts: Sequence[_Draft],
    expected_pv: Mapping[str, float],
    policy: KernelPolicy,
    notes: list[str],
) -> None:
    """Raise battery output so that the steered devices make at least the import floor."""
    assert loop.import_floor_w is not None
    steered = [d for d in drafts if _in_loop(d)]
    batteries = [d for d in steered if d.device.kind is DeviceKind.BATTERY]
    pv_w = sum(
        expected_pv.get(d.device_id, _measured(d.device)) for d in steered if d not in batteries
    )
    natural = []
    for d in batteries:
        if d.active_w is not None and d.held != "import":
            value = d.active_w  # intent target, or soaking for the export loop
        elif d.memory is not None and d.memory.held == "import":
            value = 0.0  # what it would do if the kernel let go
        else:
            value = _measured(d.device)
        natural.append(min(max(value, d.lo_hard_w), d.hi_hard_w))
    wanted_w = loop.import_floor_w - pv_w - sum(natural)
    needed_w = wanted_w
    if loop.export_budget_w is not None:
        # Both limits: the export limit wins where margins make them cross, and it counts PV at
        # its caps (what it may make), not at what it is expected to make.
        pv_caps_w = sum(d.cap_w for d in steered if d not in batteries)
        needed_w = min(needed_w, loop.export_budget_w - pv_caps_w - sum(natural))
    if wanted_w <= _EPS_W:
        return
    ceilings = []
    for d, now in zip(batteries, natural, strict=True):
        hi = d.hi_hard_w if policy.ramp_down_immediate else _active_window(d)[1]
        ceilings.append(max(hi, now))
    allocation = allocate_import(
        needed_w,
        battery_now_w=np.array(natural, dtype=np.float64),
        battery_ceiling_w=np.array(ceilings, dtype=np.float64),
    )
    for d, value, now in zip(batteries, allocation.battery_w.tolist(), natural, strict=True):
        if value > now + _EPS_W:
            d.bound(loop.import_rank, f"{loop.import_why}: discharging")
            d.active_w = value
            if d.target_w is None:
                d.held = "import"
    shortfall_w = wanted_w - (float(allocation.battery_w.sum()) - sum(natural))
    if shortfall_w > _EPS_W:
        notes.append("import limit not met: no controllable load")
        for d in batteries:
            d.bound(loop.import_rank, f"{loop.import_why}: short by {_w(shortfall_w)}")


# -- finishing ----------------------------------------------------------------------------------


def _finish_battery(draft: _Draft, *, loop_touched: bool) -> None:
    """A battery's fixed power: its target ramped and bounded, or the kernel's hold/release."""
    if draft.device.kind is not DeviceKind.BATTERY:
        return
    if loop_touched and draft.active_w is not None:
        return
    if draft.target_w is not None:
        value = _ramped_active(draft, draft.target_w)
        if abs(value - draft.target_w) > _EPS_W:
            draft.bound(_RAMP, f"ramp {draft.device_id}: {draft.active_rate_w_per_s:.0f} W/s")
        draft.active_w = value
        return
    # Free battery, not moved by a loop this cycle.
    measured = _known(draft.device.measured_w)
    tolerance_w = max(0.01 * draft.rating_w, 10.0)
    was_held = (
        draft.memory is not None and draft.memory.held != "" and draft.memory.active_w is not None
    )
    # A battery the kernel holds inside its bounds stays held while a bound still limits it in
    # the direction it was held (what it would do if let go is unknown).
    device = draft.device
    held_w = draft.memory.active_w if draft.memory is not None else None
    blocked = (
        draft.guard.discharge_blocked
        or draft.guard.charge_blocked
        or device.fault is not None
        or (held_w is not None and held_w >= 0 and draft.hi_w < _discharge_rating(device) - 1)
        or (held_w is not None and held_w <= 0 and draft.lo_w > -_charge_rating(device) + 1)
    )
    outside = measured is not None and not (
        draft.lo_w - tolerance_w <= measured <= draft.hi_w + tolerance_w
    )
    if measured is not None and outside:
        # Doing what a bound forbids on its own: command it back inside (at once for protection
        # and interlocks, at the ramp for what may ramp).
        draft.active_w = _ramped_active(draft, min(max(measured, draft.lo_w), draft.hi_w))
        draft.held = "guard"
        return
    if was_held:
        assert draft.memory is not None
        assert draft.memory.active_w is not None
        if blocked and draft.memory.held == "guard":
            draft.active_w = min(max(draft.memory.active_w, draft.lo_w), draft.hi_w)
            draft.held = "guard"
            return
        # Let go: back towards idle at the ramp, then not commanded.
        value = _ramped_active(draft, min(max(0.0, draft.lo_w), draft.hi_w))
        if abs(value) > _EPS_W:
            draft.active_w, draft.held = value, draft.memory.held
            draft.bound(_RAMP, f"ramp {draft.device_id}: {draft.active_rate_w_per_s:.0f} W/s")


def _fit_to_controls(draft: _Draft, cap_w: float | None) -> tuple[float | None, str | None]:
    """Express the draft with the controls the device has; return why not, if it cannot be.

    A command the device has no control for is never sent. A binding generation cap on a device
    without a cap control is applied through its fixed power (storage) or, failing that, the
    device is not commanded at all and the reason is reported.
    """
    device, controls = draft.device, draft.device.controls
    if draft.connect is not None and Control.CONNECT not in controls:
        draft.bound(_PROTECTION, f"device {device.device_id} has no connect control: not commanded")
        draft.connect = None
    if cap_w is not None and Control.GENERATION_CAP not in controls:
        rating_w = device.max_discharge_w or device.max_w
        if cap_w >= rating_w:
            cap_w = None  # not binding: nothing to enforce
        elif Control.ACTIVE_POWER in controls and device.kind is DeviceKind.BATTERY:
            # Storage: hold at or below the cap (idle when nothing else was asked for).
            draft.active_w = min(draft.active_w if draft.active_w is not None else 0.0, cap_w)
            draft.bound(
                _PROTECTION,
                f"device {device.device_id} has no generation-cap control: "
                f"cap {_w(cap_w)} applied as fixed power",
            )
            cap_w = None
        else:
            return cap_w, (
                f"device {device.device_id} cannot be capped at {_w(cap_w)}: "
                "it has no generation-cap control"
            )
    if draft.active_w is not None and Control.ACTIVE_POWER not in controls:
        draft.bound(_PROTECTION, f"device {device.device_id} has no fixed-power control: ignored")
        draft.active_w = None
    return cap_w, None


def _revert_caps(
    standing: Limit | None,
    drafts: Sequence[_Draft],
    devices: Mapping[str, DeviceState],
    policy: KernelPolicy,
) -> dict[str, float]:
    """Per PV inverter, the cap to fall back to if the gateway dies under a standing limit.

    Open loop, by rating: the standing limit plus the assumed minimum load, minus generation the
    gateway does not cap and battery discharge, shared by the capped inverters' ratings.
    """
    if standing is None:
        return {}
    pv = [d for d in drafts if d.device.kind is DeviceKind.PV and _in_loop(d)]
    if not pv:
        return {}
    capped = {d.device_id for d in pv}
    discharge_w = 0.0
    for d in drafts:
        if d.device.kind is DeviceKind.BATTERY:
            value = d.active_w if d.active_w is not None else _measured(d.device)
            discharge_w += max(value, 0.0)
    steered_batteries = {d.device_id for d in drafts if d.device.kind is DeviceKind.BATTERY}
    total_w = (
        standing.watts
        + policy.assumed_min_load_w
        - _uncontrolled_generation_w(devices, capped | steered_batteries)
        - discharge_w
        - max(policy.export_margin_w, 0.0)
    )
    ratings = np.array([d.rating_w for d in pv], dtype=np.float64)
    shares = split_proportional(max(total_w, 0.0), ratings, ratings)
    return {d.device_id: float(s) for d, s in zip(pv, shares.tolist(), strict=True)}


def _mint(
    draft: _Draft, now_ns: int, revert_after_s: int, revert_cap_w: float | None
) -> tuple[SafeSetpoint | None, DeviceMemory, str | None]:
    """The device's SafeSetpoint (or why it cannot be commanded) and what to remember of it."""
    device = draft.device
    ramp_held = abs(draft.cap_ramped_w - draft.cap_desired_w) > _EPS_W
    if ramp_held and draft.cap_w >= draft.cap_ramped_w - _EPS_W:
        draft.bound(_RAMP, f"ramp {draft.device_id}: {draft.cap_rate_w_per_s:.0f} W/s")
    cap: float | None = draft.cap_w
    if math.isinf(draft.cap_w) or (not draft.cap_asked and draft.cap_w >= draft.natural_w - _EPS_W):
        cap = None  # uncapped: nothing asked for, nothing binds
    if cap is not None and draft.active_w is not None and draft.active_w > cap:
        draft.active_w = cap
        draft.bound(_UTILITY, f"generation cap {device.device_id}: {_w(cap)}")
    memory_cap = cap
    cap, refusal = _fit_to_controls(draft, cap)
    memory = DeviceMemory(
        mono_ns=now_ns,
        measured_w=_known(device.measured_w),
        cap_w=memory_cap,
        active_w=draft.active_w,
        held=draft.held if draft.active_w is not None else "",
        guard=draft.guard,
        plan_key=(
            draft.plan.max_active_power_w,
            draft.plan.target_cap_w,
            draft.plan.active_power_w,
            draft.plan.ramp_time_s,
        ),
        cap_rate_w_per_s=draft.cap_rate_w_per_s,
        active_rate_w_per_s=draft.active_rate_w_per_s,
        probe_w=draft.probe_w,
        previous_cap_w=draft.memory.cap_w if draft.memory is not None else None,
    )
    if refusal is not None:
        return None, memory, refusal
    draft.bounds.sort(key=lambda rank_why: rank_why[0])
    setpoint = SafeSetpoint(
        device_id=draft.device_id,
        max_active_power_w=cap,
        active_power_w=draft.active_w,
        connect=draft.connect,
        revert_after_s=revert_after_s,
        bound_by=tuple(why for _, why in draft.bounds),
        revert_cap_w=revert_cap_w,
        mint=_MINT,
    )
    return setpoint, memory, None


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

    Planned setpoints for unknown or unavailable devices are never commanded. Composition order,
    the PCC loops and the ramp: see the module docstring. Pass `Enforcement.state` back as
    `state` next cycle.
    """
    now_ns = site.now_mono_ns
    skipped: list[tuple[str, str]] = []
    drafts: dict[str, _Draft] = {}
    for plan in planned:
        device = devices.get(plan.device_id)
        if device is None:
            skipped.append((plan.device_id, "unknown device: not in this gateway's inventory"))
        elif not device.available:
            skipped.append((plan.device_id, device.unavailable_reason or "device unavailable"))
        elif plan.device_id not in drafts:
            drafts[plan.device_id] = _new_draft(
                plan, device, state.devices.get(plan.device_id), now_ns
            )

    notes: list[str] = []
    interlock_bounds = _interlock_bounds(site.interlocks, drafts)
    for draft in drafts.values():
        _compose(draft, site.interlocks, interlock_bounds[draft.device_id], policy)

    # PCC limits: interlocks' first (rank 1), then the intent's and the contract's.
    interlock_export = [
        Limit(f"interlock {i.source}", i.controls.export_limit_w, i.standing)
        for i in site.interlocks
        if i.controls.export_limit_w is not None
    ]
    interlock_import = [
        Limit(f"interlock {i.source}", i.controls.import_limit_w, i.standing)
        for i in site.interlocks
        if i.controls.import_limit_w is not None
    ]
    export_limits = (*interlock_export, *site.export_limits)
    import_limits = (*interlock_import, *site.import_limits)
    export_limit = _tightest(export_limits)
    import_limit = _tightest(import_limits)
    export_rank = _INTERLOCK if export_limit in interlock_export else _UTILITY
    import_rank = _INTERLOCK if import_limit in interlock_import else _UTILITY
    loop = _run_loops(
        export_limit,
        export_rank,
        import_limit,
        import_rank,
        drafts,
        devices,
        site,
        policy,
        state.loop,
    )
    notes.extend(loop.notes)
    ordered = [drafts[k] for k in sorted(drafts)]
    expected_pv: dict[str, float] = {}
    if loop.export_budget_w is not None:
        expected_pv = _apply_export(loop, ordered, policy, notes)
    if loop.import_floor_w is not None:
        _apply_import(loop, ordered, expected_pv, policy, notes)
    for draft in ordered:
        if draft.target_w is None:
            _finish_battery(draft, loop_touched=draft.active_w is not None)

    revert_caps = _revert_caps(
        _tightest([limit for limit in export_limits if limit.standing]), ordered, devices, policy
    )
    setpoints: list[SafeSetpoint] = []
    memories: dict[str, DeviceMemory] = {
        device_id: memory
        for device_id, memory in state.devices.items()
        if device_id in devices and device_id not in drafts
    }
    for draft in ordered:
        setpoint, memories[draft.device_id], refusal = _mint(
            draft, now_ns, revert_after_s, revert_caps.get(draft.device_id)
        )
        if setpoint is not None:
            setpoints.append(setpoint)
        if refusal is not None:
            skipped.append((draft.device_id, refusal))
    return Enforcement(
        setpoints=tuple(setpoints),
        skipped=tuple(skipped),
        notes=tuple(notes),
        state=KernelState(loop=loop.state, devices=memories),
    )

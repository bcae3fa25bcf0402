"""Schedule resolution: which controls are in force at a given instant. Pure, no I/O.

`resolve(intent, now)` answers with ActiveControls: for the whole site and for each device, the
controls in force and, per control mode, where the value comes from. The rules are IEEE 2030.5's
(protocols.md §1.3, §1.6, §1.8), resolved per control mode:

* **Sources, highest first:** a local override (for the modes it sets); an active event that
  owns the mode; the default of the program with the lowest primacy whose default sets the mode
  (tie: program_id); the site's base default (`Intent.default_control`); the static
  commissioning fallback from the gateway config, which applies only while no default of any
  kind was received. Any active event beats every default, whatever the programs' primacies
  (§1.3 rule 8, CSIP-AUS GEN-10).
* **Priority of events:** lower primacy wins (an event's primacy is its program's), then the
  newer creation time (§1.3 rule 6), then event_id, so the answer never depends on input order.
* **Supersession is per mode and permanent** (§1.3 rule 7; EPRI `block_supersede`, CSIP-AUS
  GEN-10): events are processed from the highest priority down; an event *owns* the modes it asks
  for minus those owned by any higher-priority event of the same scope whose effective window
  overlaps its own (`ownership`). An event left owning no mode is superseded: it does not come
  back when the superseding event ends, the default does. One whose modes are partly taken keeps
  the rest. Ownership is a property of the set of events, not of the instant, so a lower-priority
  event that is running stops as soon as an overlapping higher-priority one is known.
  (The gateway's memory of lost modes, `withdrawn`, keeps that permanent when the superseding
  event later leaves the document: see gateway.lifecycle.withdrawn_modes.)
* **Scopes:** site events compete with site events, events of a device with events of that
  device. The site scope holds site events, defaults and fallback; a device scope holds only the
  modes that device-scoped sources (its events, its overrides) set, and is read as replacing the
  site's value of those modes for that device (`ActiveControls.for_device`). A site override
  beats device events for the modes it sets. An event naming a device this gateway does not have
  is never applied (and never widened to the site); nor is an event naming a program the document
  does not define (`arrival_verdict` says so).
* **Statuses:** events the server marked cancelled, superseded or completed never own a mode.
  `events_allowed=False` (untrusted clock, offline too long): no event is in force; defaults,
  fallback and overrides still are.
* **Time:** windows are half-open [start, end). Randomization offsets are drawn once per event
  and gateway (`draw_randomization`) and passed in; the effective start is start + drawn start
  offset, the effective end effective start + duration + drawn duration offset (§1.3 rule 4),
  except that an event starting exactly when another of its scope ends (successive events)
  starts at that one's *effective* end, so randomization never opens a gap or an overlap between
  them (§1.3 rule 5; `effective_windows`).
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from gateway.intent import MODES, NS_PER_S, ControlEvent, Controls, EventStatus, Intent

__all__ = [
    "MODES",
    "TERMINAL_STATUSES",
    "ActiveControls",
    "ArrivalVerdict",
    "ControlSource",
    "ModeSource",
    "Override",
    "ScopeControls",
    "Window",
    "arrival_verdict",
    "competes",
    "draw_randomization",
    "effective_window",
    "effective_windows",
    "event_label",
    "next_boundary_wall_ns",
    "ownership",
    "priority_key",
    "resolve",
]

# Server-set statuses after which an event never owns a mode.
TERMINAL_STATUSES = frozenset(
    {
        EventStatus.CANCELLED,
        EventStatus.CANCELLED_RANDOMIZED,
        EventStatus.SUPERSEDED,
        EventStatus.COMPLETED,
    }
)

Window = tuple[int, int]  # [start, end) in wall ns
_Values = dict[str, Any]  # mode -> value (float or bool), as dataclasses.replace takes them
_NO_MODES: frozenset[str] = frozenset()


class ControlSource(enum.IntEnum):
    """Where the controls in force come from; values equal dergw.v1.ControlSource."""

    EVENT = 1
    DEFAULT = 2
    FALLBACK = 3
    OVERRIDE = 4


@dataclass(frozen=True, slots=True)
class ModeSource:
    """Where one control mode's value comes from."""

    source: ControlSource
    label: str  # human form, e.g. "event e7 (program utility)", "fallback (config)"
    event_id: str | None = None
    program_id: str | None = None


@dataclass(frozen=True, slots=True)
class ScopeControls:
    """The controls in force for one scope (the site, or one device), merged per mode."""

    controls: Controls = field(default_factory=Controls)
    sources: Mapping[str, ModeSource] = field(default_factory=dict)  # mode -> source

    @property
    def event_ids(self) -> frozenset[str]:
        return frozenset(s.event_id for s in self.sources.values() if s.event_id is not None)

    def label(self, mode: str) -> str:
        source = self.sources.get(mode)
        return source.label if source is not None else "unknown source"


@dataclass(frozen=True, slots=True)
class Override:
    """A time-boxed local override (e.g. from the site console); the runtime drops it at expiry."""

    override_id: str
    origin: str  # who asked, e.g. "console: tech alice"
    controls: Controls
    device_id: str | None = None  # None = the whole site


@dataclass(frozen=True, slots=True)
class ActiveControls:
    """Controls in force now, per scope, and where each mode comes from.

    `site` applies to every device; `device[d]` holds only the modes device-scoped sources set
    for d, and replaces the site's value of those modes for d (see `for_device`).
    """

    intent_version: int  # 0 = no intent held
    site: ScopeControls
    device: Mapping[str, ScopeControls] = field(default_factory=dict)
    events_allowed: bool = True  # False: scheduled events are not executed (see blocked_reason)
    blocked_reason: str = ""

    @property
    def active_event_ids(self) -> tuple[str, ...]:
        ids = set(self.site.event_ids)
        for scope in self.device.values():
            ids |= scope.event_ids
        return tuple(sorted(ids))

    @property
    def source(self) -> ControlSource:
        """The highest-ranking source of any mode in force (for summaries)."""
        sources = {s.source for s in self.site.sources.values()}
        for scope in self.device.values():
            sources |= {s.source for s in scope.sources.values()}
        for candidate in (ControlSource.OVERRIDE, ControlSource.EVENT, ControlSource.DEFAULT):
            if candidate in sources:
                return candidate
        return ControlSource.FALLBACK

    def for_device(self, device_id: str) -> ScopeControls:
        """The controls in force for one device: the site's, with its own scope's modes replacing
        the site's values of those modes."""
        scope = self.device.get(device_id)
        if scope is None or not scope.sources:
            return self.site
        values = {mode: getattr(self.site.controls, mode) for mode in self.site.sources}
        values |= {mode: getattr(scope.controls, mode) for mode in scope.sources}
        return _scope(values, {**self.site.sources, **scope.sources})


class ArrivalVerdict(enum.Enum):
    ACCEPTED = "accepted"
    REJECTED_LATE = "rejected_late"  # already ended when received
    REJECTED_INVALID = "rejected_invalid"  # unknown device or program


def priority_key(event: ControlEvent) -> tuple[int, int, str]:
    """Sort key, highest priority first: lower primacy, then newer creation, then event_id."""
    return (event.primacy, -event.created_wall_ns, event.event_id)


def event_label(event: ControlEvent) -> str:
    """Human form of an event as a source, e.g. 'event e7 (program utility)'."""
    if event.program_id is None:
        return f"event {event.event_id}"
    return f"event {event.event_id} (program {event.program_id})"


def competes(
    event: ControlEvent, devices: Collection[str] | None, program_ids: Collection[str]
) -> bool:
    """May the event own modes at all? Not if the server ended it, or it names a device this
    gateway does not have (`devices` None = do not check) or a program the document lacks."""
    if event.status in TERMINAL_STATUSES:
        return False
    if event.device_id is not None and devices is not None and event.device_id not in devices:
        return False
    return event.program_id is None or event.program_id in program_ids


def _own_window(event: ControlEvent, offsets: tuple[int, int]) -> Window:
    start_offset_s, duration_offset_s = offsets
    start = event.start_wall_ns + start_offset_s * NS_PER_S
    return start, start + max(0, event.duration_s + duration_offset_s) * NS_PER_S


def effective_windows(
    events: Iterable[ControlEvent], offsets: Mapping[str, tuple[int, int]] | None = None
) -> dict[str, Window]:
    """Effective [start, end) of every event, in wall ns (§1.3 rules 4 and 5).

    Rule 4: start + drawn start offset; end = effective start + duration + drawn duration offset
    (never before the start). Rule 5: an event whose nominal start equals the nominal end of
    another live (not server-ended) event of the same scope starts at that event's effective end
    (the latest, if several end there): successive events stay gapless and never overlap.
    """
    offsets = offsets or {}
    windows: dict[str, Window] = {}
    ending_at: dict[tuple[str | None, int], list[str]] = {}  # (scope, nominal end) -> ids
    # Nominal start order computes every predecessor before its successor (durations > 0).
    for event in sorted(events, key=lambda e: (e.start_wall_ns, e.event_id)):
        start, end = _own_window(event, offsets.get(event.event_id, (0, 0)))
        live = event.status not in TERMINAL_STATUSES
        if live and (before := ending_at.get((event.device_id, event.start_wall_ns))):
            length = end - start
            start = max(windows[p][1] for p in before)
            end = start + length
        windows[event.event_id] = (start, end)
        if live:
            ending_at.setdefault((event.device_id, event.nominal_end_wall_ns), []).append(
                event.event_id
            )
    return windows


def effective_window(
    event: ControlEvent,
    offsets: tuple[int, int] = (0, 0),
    *,
    others: Iterable[ControlEvent] = (),
    others_offsets: Mapping[str, tuple[int, int]] | None = None,
) -> Window:
    """[start, end) of one event in wall ns, with its drawn randomization `offsets` applied.

    Alone (no `others`): rule 4 only. With the other events held (and their drawn offsets), a
    successive event starts where its predecessor effectively ends (rule 5); for many events at
    once use `effective_windows`.
    """
    if not others:
        return _own_window(event, offsets)
    pool = [e for e in others if e.event_id != event.event_id]
    drawn = {**(others_offsets or {}), event.event_id: offsets}
    return effective_windows([*pool, event], drawn)[event.event_id]


def draw_randomization(gateway_id: str, event: ControlEvent) -> tuple[int, int]:
    """The event's (start, duration) randomization offsets in s, drawn once, per gateway.

    Uniform within [0, bound] (with the bound's sign), from a hash of the gateway and event
    ids: reproducible for a gateway (a restart draws the same), spread across a fleet.
    """

    def draw(bound_s: int, salt: str) -> int:
        if bound_s == 0:
            return 0
        digest = hashlib.blake2b(
            f"{gateway_id}\x00{event.event_id}\x00{salt}".encode(), digest_size=8
        ).digest()
        fraction = int.from_bytes(digest, "big") / 2**64
        return round(fraction * bound_s)

    return draw(event.randomize_start_s, "start"), draw(event.randomize_duration_s, "duration")


def arrival_verdict(
    event: ControlEvent,
    now_wall_ns: int,
    devices: Collection[str],
    *,
    programs: Collection[str] | None = None,
) -> tuple[ArrivalVerdict, str]:
    """Judge an event as it arrives: (verdict, reason).

    Invalid: it names a device this gateway does not have, or a program that is not among
    `programs` (the document's program ids; None = not checked). An event with no program is
    valid with its own primacy. Late: its nominal end has passed (§1.3 rule 3: the duration
    randomization is not used here).
    """
    if event.device_id is not None and event.device_id not in devices:
        return (
            ArrivalVerdict.REJECTED_INVALID,
            f"event {event.event_id} names unknown device {event.device_id!r}; "
            f"this gateway has: {', '.join(sorted(devices)) or 'no devices'}",
        )
    if programs is not None and event.program_id is not None and event.program_id not in programs:
        return (
            ArrivalVerdict.REJECTED_INVALID,
            f"event {event.event_id} names unknown program {event.program_id!r}; "
            f"the document defines: {', '.join(sorted(programs)) or 'no programs'}",
        )
    if event.nominal_end_wall_ns <= now_wall_ns:
        return (ArrivalVerdict.REJECTED_LATE, f"event {event.event_id} had already ended")
    return (ArrivalVerdict.ACCEPTED, "")


def ownership(
    intent: Intent | None,
    offsets: Mapping[str, tuple[int, int]] | None = None,
    devices: Collection[str] | None = None,
    *,
    withdrawn: Mapping[str, frozenset[str]] | None = None,
) -> dict[str, frozenset[str]]:
    """The modes each event of `intent` owns (empty = superseded, or it does not compete).

    From the highest priority down, an event owns the modes it asks for, minus those
    `withdrawn` from it for good, minus those owned by a higher-priority event of the same scope
    (site, or one device) whose effective window overlaps its own (successive events, end ==
    start, do not overlap; an empty window overlaps nothing). So at any instant at most one
    active event owns a mode of a scope. `devices` None = device ids are not checked.
    """
    if intent is None:
        return {}
    withdrawn = withdrawn or {}
    windows = effective_windows(intent.events, offsets)
    program_ids = intent.program_ids
    owned: dict[str, frozenset[str]] = {}
    held: dict[str | None, list[tuple[int, int, frozenset[str]]]] = {}
    for event in sorted(intent.events, key=priority_key):
        if not competes(event, devices, program_ids):
            owned[event.event_id] = _NO_MODES
            continue
        modes = event.controls.modes() - withdrawn.get(event.event_id, _NO_MODES)
        start, end = windows[event.event_id]
        scope = held.setdefault(event.device_id, [])
        if start < end:
            for other_start, other_end, other_modes in scope:
                if other_start < end and start < other_end:
                    modes -= other_modes
            if modes:
                scope.append((start, end, modes))
        owned[event.event_id] = modes
    return owned


def next_boundary_wall_ns(
    intent: Intent | None, now_wall_ns: int, offsets: Mapping[str, tuple[int, int]]
) -> int | None:
    """The next instant after `now` at which a live event starts or ends (None if none)."""
    if intent is None:
        return None
    live = [e for e in intent.events if e.status not in TERMINAL_STATUSES]
    edges = [
        edge
        for window in effective_windows(live, offsets).values()
        for edge in window
        if edge > now_wall_ns
    ]
    return min(edges) if edges else None


def _defaults(intent: Intent | None, fallback: Controls) -> tuple[Controls, dict[str, ModeSource]]:
    """The site's defaults per mode (§1.6, §1.8): program defaults, base default, fallback."""
    changes: _Values = {}
    sources: dict[str, ModeSource] = {}
    received_any = False
    if intent is not None:
        version = intent.version
        layers = [
            (
                program.default_control,
                ModeSource(
                    ControlSource.DEFAULT,
                    f"default of program {program.program_id} v{version}",
                    program_id=program.program_id,
                ),
            )
            for program in sorted(intent.programs, key=lambda p: (p.primacy, p.program_id))
        ]
        layers.append(
            (
                intent.default_control,
                ModeSource(ControlSource.DEFAULT, f"default control v{version}"),
            )
        )
        for controls, source in layers:
            for mode in controls.modes() - sources.keys():
                changes[mode], sources[mode] = getattr(controls, mode), source
        received_any = bool(sources)
    if not received_any:
        # The static fallback applies only while no default of any kind was received.
        source = ModeSource(ControlSource.FALLBACK, "fallback (config)")
        for mode in fallback.modes():
            changes[mode], sources[mode] = getattr(fallback, mode), source
    return replace(Controls(), **changes), sources


def _scope(values: _Values, sources: Mapping[str, ModeSource]) -> ScopeControls:
    """The ScopeControls of the modes in `sources`, listed in MODES order (stable reports)."""
    modes = [mode for mode in MODES if mode in sources]
    return ScopeControls(
        replace(Controls(), **{mode: values[mode] for mode in modes}),
        {mode: sources[mode] for mode in modes},
    )


def _set(
    values: _Values, sources: dict[str, ModeSource], controls: Controls, source: ModeSource
) -> None:
    for mode in controls.modes():
        values[mode], sources[mode] = getattr(controls, mode), source


def resolve(
    intent: Intent | None,
    now_wall_ns: int,
    *,
    fallback: Controls,
    devices: Collection[str],
    offsets: Mapping[str, tuple[int, int]] | None = None,
    overrides: Sequence[Override] = (),
    events_allowed: bool = True,
    blocked_reason: str = "",
    withdrawn: Mapping[str, frozenset[str]] | None = None,
    owned: Mapping[str, frozenset[str]] | None = None,
) -> ActiveControls:
    """The controls in force at `now_wall_ns` (see the module docstring for the rules).

    events_allowed=False (untrusted clock, offline too long): no event is executed; defaults,
    fallback and overrides still apply, and `blocked_reason` says why. `withdrawn`: modes each
    event lost for good (gateway.lifecycle.withdrawn_modes). `owned`: a cached
    `ownership(intent, offsets, devices, withdrawn=withdrawn)`, computed here when absent.
    """
    offsets = offsets or {}
    defaults, default_sources = _defaults(intent, fallback)
    site_values: _Values = {m: getattr(defaults, m) for m in default_sources}
    site_sources = dict(default_sources)
    device_values: dict[str, _Values] = {}
    device_sources: dict[str, dict[str, ModeSource]] = {}

    if intent is not None and events_allowed:
        if owned is None:
            owned = ownership(intent, offsets, devices, withdrawn=withdrawn)
        windows = effective_windows(intent.events, offsets)
        claimed: dict[str | None, set[str]] = {}  # modes an event already set, per scope
        for event in sorted(intent.events, key=priority_key):
            modes = owned.get(event.event_id, _NO_MODES)
            if not modes or (event.device_id is not None and event.device_id not in devices):
                continue
            start, end = windows[event.event_id]
            if not start <= now_wall_ns < end:
                continue
            scope_claimed = claimed.setdefault(event.device_id, set())
            if event.device_id is None:
                values, sources = site_values, site_sources
            else:
                values = device_values.setdefault(event.device_id, {})
                sources = device_sources.setdefault(event.device_id, {})
            source = ModeSource(
                ControlSource.EVENT, event_label(event), event.event_id, event.program_id
            )
            for mode in modes - scope_claimed:
                values[mode], sources[mode] = getattr(event.controls, mode), source
            scope_claimed |= modes

    site_override_modes: set[str] = set()
    for override in overrides:
        source = ModeSource(ControlSource.OVERRIDE, f"local override ({override.origin})")
        if override.device_id is None:
            _set(site_values, site_sources, override.controls, source)
            site_override_modes |= override.controls.modes()
        elif override.device_id in devices:
            device_id = override.device_id
            _set(
                device_values.setdefault(device_id, {}),
                device_sources.setdefault(device_id, {}),
                override.controls,
                source,
            )

    device: dict[str, ScopeControls] = {}
    for device_id in sorted(device_sources):
        sources = device_sources[device_id]
        # Overrides beat everything: a site override takes its modes from device events too
        # (a device's own override of the mode still applies to that device).
        for mode in site_override_modes & sources.keys():
            if sources[mode].source is ControlSource.EVENT:
                del sources[mode]
        if sources:
            device[device_id] = _scope(device_values[device_id], sources)
    return ActiveControls(
        intent_version=intent.version if intent is not None else 0,
        site=_scope(site_values, site_sources),
        device=device,
        events_allowed=events_allowed,
        blocked_reason=blocked_reason,
    )

"""Schedule resolution: which controls are in force at a given instant. Pure, no I/O.

`resolve(intent, now)` answers with ActiveControls: for the whole site and for each device, the
merged Controls in force and, per control mode, where its value comes from. Sources, highest
first: a local override; an active event (lower primacy wins, then newer creation time); the
intent's defaults; the static commissioning fallback from the gateway config. An event naming a
device this gateway does not have is never applied (and never widened to the site):
`arrival_verdict` says so, and `resolve` skips it.

Time windows are half-open [start, end), so successive events (end of A == start of B) leave no
gap and never overlap. Randomization offsets are drawn once per event (`draw_randomization`,
reproducible per gateway) and passed in.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, fields

from gateway.intent import NS_PER_S, ControlEvent, Controls, EventStatus, Intent

__all__ = [
    "ActiveControls",
    "ArrivalVerdict",
    "ControlSource",
    "ModeSource",
    "Override",
    "ScopeControls",
    "arrival_verdict",
    "draw_randomization",
    "effective_window",
    "next_boundary_wall_ns",
    "resolve",
]

TERMINAL_STATUSES = frozenset(
    {
        EventStatus.CANCELLED,
        EventStatus.CANCELLED_RANDOMIZED,
        EventStatus.SUPERSEDED,
        EventStatus.COMPLETED,
    }
)

MODES: tuple[str, ...] = tuple(f.name for f in fields(Controls))


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
    """Controls in force now, per scope, and where each mode comes from."""

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


class ArrivalVerdict(enum.Enum):
    ACCEPTED = "accepted"
    REJECTED_LATE = "rejected_late"  # already ended when received
    REJECTED_INVALID = "rejected_invalid"  # e.g. names a device this gateway does not have


def effective_window(event: ControlEvent, offsets: tuple[int, int] = (0, 0)) -> tuple[int, int]:
    """[start, end) in wall ns, with the event's drawn randomization offsets applied."""
    start_offset_s, duration_offset_s = offsets
    start = event.start_wall_ns + start_offset_s * NS_PER_S
    end = start + max(0, event.duration_s + duration_offset_s) * NS_PER_S
    return start, end


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
    event: ControlEvent, now_wall_ns: int, devices: Collection[str]
) -> tuple[ArrivalVerdict, str]:
    """Judge an event as it arrives: (verdict, reason)."""
    if event.device_id is not None and event.device_id not in devices:
        return (
            ArrivalVerdict.REJECTED_INVALID,
            f"event {event.event_id} names unknown device {event.device_id!r}; "
            f"this gateway has: {', '.join(sorted(devices)) or 'no devices'}",
        )
    # IEEE 2030.5: judged on the nominal end; duration randomization is not used here.
    if event.nominal_end_wall_ns <= now_wall_ns:
        return (ArrivalVerdict.REJECTED_LATE, f"event {event.event_id} had already ended")
    return (ArrivalVerdict.ACCEPTED, "")


def next_boundary_wall_ns(
    intent: Intent | None, now_wall_ns: int, offsets: Mapping[str, tuple[int, int]]
) -> int | None:
    """The next instant after `now` at which an event starts or ends (None if there is none)."""
    if intent is None:
        return None
    edges = [
        edge
        for event in intent.events
        for edge in effective_window(event, offsets.get(event.event_id, (0, 0)))
        if edge > now_wall_ns
    ]
    return min(edges) if edges else None


def _winner(events: list[ControlEvent]) -> ControlEvent:
    # Lower primacy wins; at equal primacy the newer creation time; event_id breaks exact ties
    # so the answer never depends on input order.
    return min(events, key=lambda e: (e.primacy, -e.created_wall_ns, e.event_id))


def _scope(base: ScopeControls, winner: ControlEvent | None) -> ScopeControls:
    """`base` with every mode the winning event asks for taken from the event."""
    if winner is None:
        return base
    event_source = ModeSource(ControlSource.EVENT, f"event {winner.event_id}", winner.event_id)
    values = {mode: getattr(base.controls, mode) for mode in MODES}
    sources = dict(base.sources)
    for mode in MODES:
        value = getattr(winner.controls, mode)
        if value is not None:
            values[mode] = value
            sources[mode] = event_source
    return ScopeControls(Controls(**values), sources)


def _with_overrides(
    scope: ScopeControls, overrides: Sequence[Override], device_id: str | None
) -> ScopeControls:
    for override in overrides:
        if override.device_id != device_id:
            continue
        source = ModeSource(ControlSource.OVERRIDE, f"local override ({override.origin})")
        values = {mode: getattr(scope.controls, mode) for mode in MODES}
        sources = dict(scope.sources)
        for mode in MODES:
            value = getattr(override.controls, mode)
            if value is not None:
                values[mode] = value
                sources[mode] = source
        scope = ScopeControls(Controls(**values), sources)
    return scope


def _base(intent: Intent | None, fallback: Controls) -> ScopeControls:
    """Defaults per mode: the intent's default control, else the config fallback."""
    values: dict[str, object] = {}
    sources: dict[str, ModeSource] = {}
    default = intent.default_control if intent is not None else Controls()
    default_source = ModeSource(
        ControlSource.DEFAULT, f"default control v{intent.version if intent else 0}"
    )
    fallback_source = ModeSource(ControlSource.FALLBACK, "fallback (config)")
    # The fallback applies only until a default control was ever received (any mode of it).
    use_fallback = default.is_empty()
    for mode in MODES:
        value = getattr(default, mode)
        if value is not None:
            values[mode], sources[mode] = value, default_source
        elif use_fallback and (value := getattr(fallback, mode)) is not None:
            values[mode], sources[mode] = value, fallback_source
    return ScopeControls(Controls(**values), sources)  # type: ignore[arg-type]


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
) -> ActiveControls:
    """The controls in force at `now_wall_ns` (see the module docstring for the rules).

    events_allowed=False (untrusted clock, offline too long): no event is executed; defaults,
    fallback and overrides still apply, and `blocked_reason` says why.
    """
    offsets = offsets or {}
    base = _base(intent, fallback)
    site_events: list[ControlEvent] = []
    device_events: dict[str, list[ControlEvent]] = {}
    if intent is not None and events_allowed:
        for event in intent.events:
            if event.status in TERMINAL_STATUSES:
                continue
            if event.device_id is not None and event.device_id not in devices:
                continue
            start, end = effective_window(event, offsets.get(event.event_id, (0, 0)))
            if not start <= now_wall_ns < end:
                continue
            if event.device_id is None:
                site_events.append(event)
            else:
                device_events.setdefault(event.device_id, []).append(event)

    site = _scope(base, _winner(site_events) if site_events else None)
    site = _with_overrides(site, overrides, None)
    device: dict[str, ScopeControls] = {}
    override_devices = {o.device_id for o in overrides if o.device_id is not None}
    for device_id in sorted(set(device_events) | (override_devices & set(devices))):
        events = device_events.get(device_id, [])
        scope = _scope(ScopeControls(), _winner(events) if events else None)
        device[device_id] = _with_overrides(scope, overrides, device_id)
    return ActiveControls(
        intent_version=intent.version if intent is not None else 0,
        site=site,
        device=device,
        events_allowed=events_allowed,
        blocked_reason=blocked_reason,
    )

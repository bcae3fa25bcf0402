"""Intent documents: validation, merge into the next version, cancellation (pure; no I/O).

A site's desired state is a sequence of versioned `IntentDocument`s (IEEE 2030.5 DERControl /
DefaultDERControl / DERProgram semantics). Each operator post composes the *next* version from
the previous one: events that have not ended yet are carried over (unless replaced), new events
are appended with `created_at = now`, and the default control, the programs and the constraints
are replaced when given, else carried over. The store calls these functions inside the
transaction that allocates the version, so two concurrent posts can never both build on the same
previous document.

Programs: every event belongs to one (`program_id`; absent = the program named "default", which
exists implicitly with primacy 1 unless the site defines it), and its primacy is its program's:
the document's events carry their program's current primacy. A program's default control applies
to the modes no event asks for (the lowest primacy first); the document's own `default_control`
is the site's base default under all programs. An event naming a program the site does not
define is refused, and so is a programs list that drops a program a live event still uses.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields, replace

from dergw.v1 import MAX_RANDOMIZE_S, ns_from_timestamp, pb, timestamp_from_ns
from headend_min.model import IntentBasis

__all__ = [
    "DEFAULT_PROGRAM_ID",
    "DEFAULT_PROGRAM_PRIMACY",
    "MAX_RANDOMIZE_S",
    "ConstraintValues",
    "ControlValues",
    "EventConflictError",
    "EventRequest",
    "IntentRejected",
    "IntentRequest",
    "IntentVersionError",
    "InvalidIntentError",
    "ProgramRequest",
    "UnknownDeviceError",
    "UnknownEventError",
    "UnknownProgramError",
    "cancel_event",
    "carried_events",
    "compose_intent",
    "event_end_ns",
    "for_device",
]

_NS = 1_000_000_000
_UINT32_MAX = 2**32 - 1
# The program of an event posted without program_id; it exists implicitly with this primacy
# (2030.5 primacy 1 = "contracted premises service provider") unless the site defines it.
DEFAULT_PROGRAM_ID = "default"
DEFAULT_PROGRAM_PRIMACY = 1


class IntentRejected(ValueError):
    """The post cannot become a version; the message tells the operator what to change."""


class IntentVersionError(RuntimeError):
    """A version was allocated that is not newer than the previous one (a store bug)."""


class InvalidIntentError(IntentRejected):
    """The request is inconsistent (nothing to post, an event that already ended, ...)."""


class UnknownDeviceError(IntentRejected):
    """An event names a device that is not in the site's registered inventory."""

    def __init__(self, site_id: str, device_id: str, known: Iterable[str]) -> None:
        known_list = ", ".join(sorted(known)) or "none registered"
        super().__init__(
            f"device {device_id!r} is not in the registered inventory of site {site_id!r} "
            f"(known devices: {known_list}); the intent was not stored or sent"
        )
        self.device_id = device_id


class UnknownEventError(IntentRejected):
    """The event to cancel is not in the site's latest document."""


class UnknownProgramError(IntentRejected):
    """An event names a program the site does not define (after this post)."""

    def __init__(self, what: str, program_id: str, known: Iterable[str], advice: str) -> None:
        known_list = ", ".join(repr(p) for p in sorted(known)) or "none"
        super().__init__(
            f"{what} program {program_id!r}, which the site does not define "
            f"(its programs: {known_list}); {advice}"
        )
        self.program_id = program_id


class EventConflictError(IntentRejected):
    """The event id is already taken, or the event cannot change state any more."""


@dataclass(frozen=True, slots=True)
class ControlValues:
    """Controls an event or the default control asks for; None = not asked for."""

    max_gen_pct: float | None = None
    fixed_w: float | None = None
    target_w: float | None = None
    export_limit_w: float | None = None
    import_limit_w: float | None = None
    gen_limit_w: float | None = None
    load_limit_w: float | None = None
    connect: bool | None = None
    energize: bool | None = None
    ramp_time_s: float | None = None

    def is_empty(self) -> bool:
        return all(getattr(self, f.name) is None for f in fields(self))

    def to_pb(self) -> pb.Controls:
        controls = pb.Controls()
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                setattr(controls, f.name, value)
        return controls


@dataclass(frozen=True, slots=True)
class ConstraintValues:
    export_limit_w: float | None = None
    import_limit_w: float | None = None
    soc_min_pct: float | None = None
    soc_max_pct: float | None = None

    def to_pb(self) -> pb.SiteConstraints:
        constraints = pb.SiteConstraints()
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                setattr(constraints, f.name, value)
        return constraints


@dataclass(frozen=True, slots=True)
class EventRequest:
    controls: ControlValues
    duration_s: int
    event_id: str | None = None  # None = generated
    start_ns: int | None = None  # None = now
    program_id: str | None = None  # None = DEFAULT_PROGRAM_ID; the primacy is the program's
    device_id: str | None = None  # None = the whole site
    randomize_start_s: int = 0
    randomize_duration_s: int = 0


@dataclass(frozen=True, slots=True)
class ProgramRequest:
    program_id: str
    primacy: int  # lower wins
    default_control: ControlValues | None = None  # None = the program has no default control


@dataclass(frozen=True, slots=True)
class IntentRequest:
    events: tuple[EventRequest, ...] = ()
    default_control: ControlValues | None = None  # given = replaces the previous one
    constraints: ConstraintValues | None = None  # given = replaces the previous ones
    replace_events: bool = False  # drop carried-over events (of the scope) instead of keeping
    programs: tuple[ProgramRequest, ...] | None = None  # given = replaces the previous ones


def event_end_ns(event: pb.ControlEvent) -> int:
    """Latest instant the event can still be in force.

    Positive randomization can push the start and stretch the duration at the gateway, so the
    headend keeps an event until even its latest randomized end has passed.
    """
    slack_s = max(0, event.randomize_start_s) + max(0, event.randomize_duration_s)
    return ns_from_timestamp(event.start) + (event.duration_s + slack_s) * _NS


def carried_events(
    previous: pb.IntentDocument | None,
    now_ns: int,
    *,
    drop: Callable[[pb.ControlEvent], bool] | None = None,
) -> list[pb.ControlEvent]:
    """Events of `previous` that have not ended by `now_ns` (and are not dropped), in order."""
    if previous is None:
        return []
    kept: list[pb.ControlEvent] = []
    for event in previous.events:
        if event_end_ns(event) <= now_ns:
            continue
        if drop is not None and drop(event):
            continue
        copy = pb.ControlEvent()
        copy.CopyFrom(event)
        kept.append(copy)
    return kept


def for_device(request: IntentRequest, device_id: str) -> IntentRequest:
    """Scope a request posted to a device route: every event targets that device."""
    if (
        request.default_control is not None
        or request.constraints is not None
        or request.programs is not None
    ):
        raise InvalidIntentError(
            "default_control, programs and constraints apply to the whole site; "
            "post them to /api/v1/sites/{site_id}/intents instead of a device route"
        )
    events: list[EventRequest] = []
    for event in request.events:
        if event.device_id not in (None, device_id):
            raise InvalidIntentError(
                f"event {event.event_id or '(unnamed)'} names device {event.device_id!r} "
                f"but was posted to the route of device {device_id!r}; "
                "leave device_id out or make them match"
            )
        events.append(replace(event, device_id=device_id))
    return replace(request, events=tuple(events))


def _check_controls(controls: ControlValues, where: str) -> None:
    for f in fields(controls):
        value = getattr(controls, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidIntentError(f"{where}.{f.name} must be a finite number")


def _new_event(
    request: EventRequest,
    *,
    event_id: str,
    now_ns: int,
    position: int,
    programs: dict[str, pb.Program],
) -> pb.ControlEvent:
    where = f"events[{position}] ({event_id})"
    if not 0 < request.duration_s <= _UINT32_MAX:
        raise InvalidIntentError(f"{where}: duration_s must be 1..{_UINT32_MAX} seconds")
    program_id = request.program_id or DEFAULT_PROGRAM_ID
    program = programs.get(program_id)
    if program is None:
        raise UnknownProgramError(
            f"{where} names",
            program_id,
            programs,
            f"add it to programs, or leave program_id out for program {DEFAULT_PROGRAM_ID!r}",
        )
    for name in ("randomize_start_s", "randomize_duration_s"):
        if abs(getattr(request, name)) > MAX_RANDOMIZE_S:
            raise InvalidIntentError(
                f"{where}: {name} must be within -{MAX_RANDOMIZE_S}..{MAX_RANDOMIZE_S} s"
            )
    if request.controls.is_empty():
        raise InvalidIntentError(f"{where}: controls is empty; give at least one control")
    _check_controls(request.controls, f"{where}.controls")
    start_ns = now_ns if request.start_ns is None else request.start_ns
    if start_ns < 0:
        raise InvalidIntentError(f"{where}: start is before 1970")
    event = pb.ControlEvent(
        event_id=event_id,
        created_at=timestamp_from_ns(now_ns),
        start=timestamp_from_ns(start_ns),
        duration_s=request.duration_s,
        randomize_start_s=request.randomize_start_s,
        randomize_duration_s=request.randomize_duration_s,
        primacy=program.primacy,
        device_id=request.device_id or "",
        controls=request.controls.to_pb(),
        status=pb.EVENT_STATUS_SCHEDULED,
        program_id=program_id,
    )
    if event_end_ns(event) <= now_ns:
        raise InvalidIntentError(
            f"{where}: it would already have ended (start + duration_s is in the past); "
            "move start later or lengthen the event"
        )
    return event


def _document(
    basis: IntentBasis,
    events: Iterable[pb.ControlEvent],
    *,
    now_ns: int,
    default_control: pb.Controls | None,
    constraints: pb.SiteConstraints | None,
    programs: Iterable[pb.Program] = (),
) -> pb.IntentDocument:
    if basis.previous is not None and basis.next_version <= basis.previous.version:
        # The store allocates versions; this guards the one invariant gateways rely on.
        raise IntentVersionError(
            f"version {basis.next_version} is not newer than {basis.previous.version}"
        )
    document = pb.IntentDocument(
        site_id=basis.site_id,
        version=basis.next_version,
        issued_at=timestamp_from_ns(now_ns),
        events=list(events),
        programs=list(programs),
    )
    if default_control is not None:
        document.default_control.CopyFrom(default_control)
    if constraints is not None:
        document.constraints.CopyFrom(constraints)
    return document


def _carried_default(previous: pb.IntentDocument | None) -> pb.Controls | None:
    if previous is not None and previous.HasField("default_control"):
        return previous.default_control
    return None


def _carried_constraints(previous: pb.IntentDocument | None) -> pb.SiteConstraints | None:
    if previous is not None and previous.HasField("constraints"):
        return previous.constraints
    return None


def _program_set(
    previous: pb.IntentDocument | None, requested: tuple[ProgramRequest, ...] | None
) -> dict[str, pb.Program]:
    """The site's programs after this post (given = replace, else carried over), by id."""
    programs: dict[str, pb.Program] = {}
    if requested is None:
        for carried in previous.programs if previous is not None else ():
            copy = pb.Program()
            copy.CopyFrom(carried)
            programs[copy.program_id] = copy
        return programs
    for position, program in enumerate(requested):
        where = f"programs[{position}] ({program.program_id})"
        if not program.program_id:
            raise InvalidIntentError(f"programs[{position}]: program_id is empty")
        if program.program_id in programs:
            raise InvalidIntentError(f"program_id {program.program_id!r} appears twice in programs")
        if not 0 <= program.primacy <= _UINT32_MAX:
            raise InvalidIntentError(f"{where}: primacy must be 0..{_UINT32_MAX} (lower wins)")
        message = pb.Program(program_id=program.program_id, primacy=program.primacy)
        if program.default_control is not None:
            _check_controls(program.default_control, f"{where}.default_control")
            message.default_control.CopyFrom(program.default_control.to_pb())
        programs[program.program_id] = message
    return programs


def _with_implicit_default(
    programs: dict[str, pb.Program],
    events: Iterable[EventRequest],
    carried: Iterable[pb.ControlEvent],
) -> None:
    """Add the implicit "default" program when an event uses it and the site does not define it."""
    uses_default = any(not e.program_id for e in events) or any(
        e.program_id == DEFAULT_PROGRAM_ID for e in carried
    )
    if uses_default and DEFAULT_PROGRAM_ID not in programs:
        programs[DEFAULT_PROGRAM_ID] = pb.Program(
            program_id=DEFAULT_PROGRAM_ID, primacy=DEFAULT_PROGRAM_PRIMACY
        )


def _follow_programs(kept: list[pb.ControlEvent], programs: dict[str, pb.Program]) -> None:
    """Carried events keep their program, and take its current primacy."""
    orphans: dict[str, list[str]] = {}
    for event in kept:
        if not event.program_id:
            continue  # composed before programs existed: its own primacy stands
        program = programs.get(event.program_id)
        if program is None:
            orphans.setdefault(event.program_id, []).append(event.event_id)
        else:
            event.primacy = program.primacy
    if orphans:
        program_id, event_ids = sorted(orphans.items())[0]
        raise UnknownProgramError(
            f"events not ended yet ({', '.join(repr(e) for e in event_ids)}) belong to",
            program_id,
            programs,
            "keep the program in programs, or cancel or replace those events first",
        )


def compose_intent(
    basis: IntentBasis,
    request: IntentRequest,
    *,
    now_ns: int,
    new_event_id: Callable[[], str],
    scope_device_id: str | None = None,
) -> pb.IntentDocument:
    """The site's next document: carried-over events + the new ones; see the module docstring.

    `scope_device_id` is set by the device route: `replace_events` then drops only that
    device's carried-over events.
    """
    if (
        not request.events
        and request.default_control is None
        and request.constraints is None
        and request.programs is None
    ):
        raise InvalidIntentError(
            "nothing to post: give at least one of events, default_control, programs, constraints"
        )
    programs = _program_set(basis.previous, request.programs)
    drop = _drop_rule(request, scope_device_id)
    kept = carried_events(basis.previous, now_ns, drop=drop)
    _with_implicit_default(programs, request.events, kept)
    _follow_programs(kept, programs)
    new_events: list[pb.ControlEvent] = []
    new_ids: set[str] = set()
    for position, event_request in enumerate(request.events):
        device_id = event_request.device_id
        if device_id and device_id not in basis.device_ids:
            raise UnknownDeviceError(basis.site_id, device_id, basis.device_ids)
        event_id = event_request.event_id or new_event_id()
        if event_id in new_ids:
            raise InvalidIntentError(f"event_id {event_id!r} appears twice in this request")
        new_ids.add(event_id)
        new_events.append(
            _new_event(
                event_request,
                event_id=event_id,
                now_ns=now_ns,
                position=position,
                programs=programs,
            )
        )
    if request.default_control is not None:
        _check_controls(request.default_control, "default_control")
    constraints = request.constraints
    if constraints is not None:
        for f in fields(constraints):
            value = getattr(constraints, f.name)
            if value is not None and not math.isfinite(value):
                raise InvalidIntentError(f"constraints.{f.name} must be a finite number")
        if (
            constraints.soc_min_pct is not None
            and constraints.soc_max_pct is not None
            and constraints.soc_min_pct > constraints.soc_max_pct
        ):
            raise InvalidIntentError(
                f"constraints.soc_min_pct ({constraints.soc_min_pct}) is above "
                f"soc_max_pct ({constraints.soc_max_pct})"
            )

    for event in kept:
        if event.event_id in new_ids:
            raise EventConflictError(
                f"event_id {event.event_id!r} is already used by an event of version "
                f"{basis.next_version - 1} that has not ended; choose another id, cancel it, "
                "or post with replace_events"
            )
    return _document(
        basis,
        [*kept, *new_events],
        now_ns=now_ns,
        default_control=(
            request.default_control.to_pb()
            if request.default_control is not None
            else _carried_default(basis.previous)
        ),
        constraints=(
            constraints.to_pb() if constraints is not None else _carried_constraints(basis.previous)
        ),
        programs=programs.values(),
    )


def _drop_rule(
    request: IntentRequest, scope_device_id: str | None
) -> Callable[[pb.ControlEvent], bool] | None:
    """Which carried-over events `replace_events` drops: all, or the device route's only."""
    if not request.replace_events:
        return None
    if scope_device_id is None:
        return lambda _event: True
    return lambda event: event.device_id == scope_device_id


def cancel_event(basis: IntentBasis, event_id: str, *, now_ns: int) -> pb.IntentDocument:
    """The site's next document with `event_id` marked CANCELLED (everything else carried)."""
    previous = basis.previous
    target = None
    if previous is not None:
        target = next((e for e in previous.events if e.event_id == event_id), None)
    if previous is None or target is None:
        raise UnknownEventError(
            f"site {basis.site_id!r} has no event {event_id!r} in its latest intent version"
            + (f" ({previous.version})" if previous is not None else " (none posted yet)")
        )
    if event_end_ns(target) <= now_ns:
        raise EventConflictError(f"event {event_id!r} has already ended; nothing to cancel")
    if target.status in (pb.EVENT_STATUS_CANCELLED, pb.EVENT_STATUS_CANCELLED_RANDOMIZED):
        raise EventConflictError(
            f"event {event_id!r} is already cancelled (version {previous.version})"
        )
    kept = carried_events(previous, now_ns)
    for event in kept:
        if event.event_id == event_id:
            event.status = pb.EVENT_STATUS_CANCELLED
    return _document(
        basis,
        kept,
        now_ns=now_ns,
        default_control=_carried_default(previous),
        constraints=_carried_constraints(previous),
        programs=previous.programs,
    )

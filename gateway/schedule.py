"""Schedule resolution: which controls are in force at a given instant. Pure, no I/O.

`resolve(intent, now)` answers with ActiveControls: an active event beats any default; among
events of the same scope the lower primacy wins, then the newer creation time; with no active
event the intent's default control applies, and with no default ever received the static
commissioning fallback from the gateway config. Events are scoped to the whole site or to one
device; an event naming a device this gateway does not have is never applied (and never widened
to the site): `arrival_verdict` says so, and `resolve` skips it.

Time windows are half-open [start, end), so successive events (end of A == start of B) leave no
gap and never overlap. Randomization offsets are drawn once per event elsewhere and passed in.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from gateway.intent import NS_PER_S, ControlEvent, Controls, EventStatus, Intent

__all__ = [
    "ActiveControls",
    "ArrivalVerdict",
    "ControlSource",
    "arrival_verdict",
    "effective_window",
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


class ControlSource(enum.IntEnum):
    """Where the controls in force come from; values equal dergw.v1.ControlSource."""

    EVENT = 1
    DEFAULT = 2
    FALLBACK = 3
    OVERRIDE = 4


@dataclass(frozen=True, slots=True)
class ActiveControls:
    """Controls in force now, per scope, and where they come from."""

    source: ControlSource
    intent_version: int  # 0 = no intent held
    site: Controls
    site_event_id: str | None = None
    device: Mapping[str, Controls] = field(default_factory=dict)
    device_event_ids: Mapping[str, str] = field(default_factory=dict)

    @property
    def active_event_ids(self) -> tuple[str, ...]:
        ids = set(self.device_event_ids.values())
        if self.site_event_id is not None:
            ids.add(self.site_event_id)
        return tuple(sorted(ids))


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


def _winner(events: list[ControlEvent]) -> ControlEvent:
    # Lower primacy wins; at equal primacy the newer creation time; event_id breaks exact ties
    # so the answer never depends on input order.
    return min(events, key=lambda e: (e.primacy, -e.created_wall_ns, e.event_id))


def resolve(
    intent: Intent | None,
    now_wall_ns: int,
    *,
    fallback: Controls,
    devices: Collection[str],
    offsets: Mapping[str, tuple[int, int]] | None = None,
) -> ActiveControls:
    """The controls in force at `now_wall_ns` (see the module docstring for the rules)."""
    offsets = offsets or {}
    if intent is not None and not intent.default_control.is_empty():
        base, base_source = intent.default_control, ControlSource.DEFAULT
    else:
        base, base_source = fallback, ControlSource.FALLBACK
    version = intent.version if intent is not None else 0
    if intent is None:
        return ActiveControls(source=base_source, intent_version=0, site=base)

    site_events: list[ControlEvent] = []
    device_events: dict[str, list[ControlEvent]] = {}
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

    site_winner = _winner(site_events) if site_events else None
    device_winners = {device_id: _winner(evs) for device_id, evs in device_events.items()}
    any_event = site_winner is not None or bool(device_winners)
    return ActiveControls(
        source=ControlSource.EVENT if any_event else base_source,
        intent_version=version,
        site=site_winner.controls if site_winner is not None else base,
        site_event_id=site_winner.event_id if site_winner is not None else None,
        device={device_id: e.controls for device_id, e in sorted(device_winners.items())},
        device_event_ids={device_id: e.event_id for device_id, e in sorted(device_winners.items())},
    )

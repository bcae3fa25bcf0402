"""Event lifecycle: which responses an event earns, and when. Pure, no I/O.

Responses follow IEEE 2030.5 (protocols.md §1.4): received, started, completed, cancelled,
superseded, rejected. One rule the reference system got wrong is kept: "started" and "completed"
are only claimed once the controls were *written and read back* on every device in the event's
scope (a site event: every controllable device; a device event: that device). A failed or
unverified write earns "failed" with the reason, and the event keeps being retried.

* On arrival (`on_arrival`): RECEIVED; REJECTED_LATE when its nominal end has passed (§1.3
  rule 3); REJECTED_INVALID when it names a device this gateway does not have, or a program the
  document does not define; CANCELLED when the server marked it cancelled (with or without
  randomization: the gateway cancels at once, and the next control takes over at once);
  SUPERSEDED when the server marked it superseded, or when it owns no mode any more
  (gateway.schedule.ownership) - also right after RECEIVED for an event that arrives superseded.
  A server status COMPLETED ends the event: one that never ran here earns COMPLETED at once, one
  that ran earns it once the next controls are verified.
* After every control cycle (`after_cycle`): STARTED once in force and verified (FAILED, once,
  before that); SUPERSEDED when it loses its last mode - a started event that is superseded
  earns SUPERSEDED, never COMPLETED; COMPLETED once its effective window has passed and the
  controls that followed were verified (or at once, with the reason, if it was never in force).

Supersession is permanent (§1.3 rule 7): `withdrawn_modes` is the gateway's memory of the modes
each event lost, so that an event does not win a mode back when the event that took it leaves a
later document. The caller persists `last_response` per event (and should persist the withdrawn
modes), so a restart neither repeats a response nor re-runs an event that already ended; no
response is ever repeated.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from gateway.intent import MODES, ControlEvent, EventStatus, Intent
from gateway.schedule import (
    ActiveControls,
    ArrivalVerdict,
    Window,
    arrival_verdict,
    competes,
    effective_windows,
    event_label,
    ownership,
    priority_key,
)

__all__ = [
    "FINAL_RESPONSES",
    "RETIRING_RESPONSES",
    "DeviceOutcome",
    "Response",
    "ResponseStatus",
    "after_cycle",
    "on_arrival",
    "withdrawn_modes",
]


class ResponseStatus(enum.IntEnum):
    """Values equal dergw.v1.ResponseStatus (IEEE 2030.5 response codes where they exist)."""

    NONE = 0
    RECEIVED = 1
    STARTED = 2
    COMPLETED = 3
    CANCELLED = 6
    SUPERSEDED = 7
    FAILED = 100
    REJECTED_INVALID = 253
    REJECTED_LATE = 254


FINAL_RESPONSES = frozenset(
    {
        ResponseStatus.COMPLETED,
        ResponseStatus.CANCELLED,
        ResponseStatus.SUPERSEDED,
        ResponseStatus.REJECTED_INVALID,
        ResponseStatus.REJECTED_LATE,
    }
)
# After these an event never owns a mode again (COMPLETED is not one: an event that ran keeps
# the modes it owned, so that an event it superseded does not win them back when it ends).
RETIRING_RESPONSES = FINAL_RESPONSES - {ResponseStatus.COMPLETED}

_ALL_MODES = frozenset(MODES)
_SERVER_CANCELLED = (EventStatus.CANCELLED, EventStatus.CANCELLED_RANDOMIZED)
_RAN = (ResponseStatus.STARTED, ResponseStatus.FAILED)


@dataclass(frozen=True, slots=True)
class Response:
    event_id: str
    status: ResponseStatus
    reason: str = ""


@dataclass(frozen=True, slots=True)
class DeviceOutcome:
    """This cycle's verdict on one device for the controls now in force."""

    ok: bool  # written and read back for the current controls
    reason: str = ""  # why not, when not ok


def withdrawn_modes(
    intent: Intent | None,
    last_response: Mapping[str, ResponseStatus],
    offsets: Mapping[str, tuple[int, int]] | None = None,
    devices: Collection[str] | None = None,
    previous: Mapping[str, frozenset[str]] | None = None,
) -> dict[str, frozenset[str]]:
    """The modes each event of `intent` has lost for good: `previous`, plus every mode of an
    event whose last response retires it (rejected, cancelled, superseded), plus the modes it
    asks for but does not own now. Only events of `intent` are kept, only non-empty entries.

    Call it after each new intent version's arrival responses (and at start-up, with the
    persisted responses), keep the result, and pass it to `resolve`, `on_arrival` and
    `after_cycle` as `withdrawn`. Feeding the result back in changes nothing (a fixpoint).
    """
    withdrawn, _owned = _settle(intent, last_response, offsets, devices, previous)
    return {event_id: modes for event_id, modes in withdrawn.items() if modes}


def _settle(
    intent: Intent | None,
    last_response: Mapping[str, ResponseStatus],
    offsets: Mapping[str, tuple[int, int]] | None,
    devices: Collection[str] | None,
    previous: Mapping[str, frozenset[str]] | None,
) -> tuple[dict[str, frozenset[str]], dict[str, frozenset[str]]]:
    """(withdrawn, owned) for `intent`, given the responses so far."""
    if intent is None:
        return {}, {}
    ids = {event.event_id for event in intent.events}
    withdrawn = {k: v for k, v in (previous or {}).items() if k in ids}
    for event in intent.events:
        if last_response.get(event.event_id, ResponseStatus.NONE) in RETIRING_RESPONSES:
            withdrawn[event.event_id] = _ALL_MODES
    owned = ownership(intent, offsets, devices, withdrawn=withdrawn)
    for event in intent.events:
        lost = event.controls.modes() - owned[event.event_id]
        if lost:
            withdrawn[event.event_id] = withdrawn.get(event.event_id, frozenset()) | lost
    return withdrawn, owned


@dataclass(frozen=True, slots=True)
class _Judged:
    """What one call decides from: the intent's ownership and windows, events by priority."""

    intent: Intent
    owned: Mapping[str, frozenset[str]]
    windows: Mapping[str, Window]
    ranked: tuple[ControlEvent, ...]
    devices: Collection[str] | None


def _judge(
    intent: Intent,
    last_response: Mapping[str, ResponseStatus],
    offsets: Mapping[str, tuple[int, int]] | None,
    devices: Collection[str] | None,
    withdrawn: Mapping[str, frozenset[str]] | None,
) -> _Judged:
    _withdrawn, owned = _settle(intent, last_response, offsets, devices, withdrawn)
    return _Judged(
        intent,
        owned,
        effective_windows(intent.events, offsets),
        tuple(sorted(intent.events, key=priority_key)),
        devices,
    )


def _superseded(event: ControlEvent, judged: _Judged) -> str | None:
    """Why `event` is superseded (it competes and owns no mode), else None."""
    owned, windows = judged.owned, judged.windows
    if owned.get(event.event_id) or not competes(event, judged.devices, judged.intent.program_ids):
        return None
    start, end = windows[event.event_id]
    wanted = event.controls.modes()
    rank = priority_key(event)
    by = [
        event_label(other)
        for other in judged.ranked
        if priority_key(other) < rank
        and other.device_id == event.device_id
        and owned.get(other.event_id, frozenset()) & wanted
        and windows[other.event_id][0] < end
        and start < windows[other.event_id][1]
    ]
    if by:
        return f"superseded by {', '.join(by)}"
    return "superseded: its modes were taken by higher-priority events"


def on_arrival(
    intent: Intent,
    last_response: Mapping[str, ResponseStatus],
    now_wall_ns: int,
    devices: Collection[str],
    *,
    offsets: Mapping[str, tuple[int, int]] | None = None,
    withdrawn: Mapping[str, frozenset[str]] | None = None,
) -> list[Response]:
    """Responses owed when a new intent version arrives (see the module docstring).

    `devices`: every device this gateway has. `offsets`: the drawn randomization per event;
    `withdrawn`: the gateway's memory (`withdrawn_modes`) before this version.
    """
    responses: list[Response] = []
    decided = dict(last_response)  # the last response per event, including the ones owed now

    def respond(event_id: str, status: ResponseStatus, reason: str = "") -> None:
        responses.append(Response(event_id, status, reason))
        decided[event_id] = status

    program_ids = intent.program_ids
    for event in intent.events:
        event_id = event.event_id
        last = last_response.get(event_id, ResponseStatus.NONE)
        if last in FINAL_RESPONSES:
            continue
        if event.status in _SERVER_CANCELLED:
            respond(event_id, ResponseStatus.CANCELLED, "cancelled by the server")
        elif event.status is EventStatus.SUPERSEDED:
            respond(event_id, ResponseStatus.SUPERSEDED, "superseded (status set by the server)")
        elif event.status is EventStatus.COMPLETED:
            if last not in _RAN:  # one that ran completes once the next controls are verified
                respond(
                    event_id, ResponseStatus.COMPLETED, "marked completed by the server; never ran"
                )
        elif last is ResponseStatus.NONE:
            verdict, reason = arrival_verdict(event, now_wall_ns, devices, programs=program_ids)
            if verdict is ArrivalVerdict.REJECTED_LATE:
                respond(event_id, ResponseStatus.REJECTED_LATE, reason)
            elif verdict is ArrivalVerdict.REJECTED_INVALID:
                respond(event_id, ResponseStatus.REJECTED_INVALID, reason)
            else:
                respond(event_id, ResponseStatus.RECEIVED)

    judged = _judge(intent, decided, offsets, devices, withdrawn)
    for event in intent.events:
        last = decided.get(event.event_id, ResponseStatus.NONE)
        if last in FINAL_RESPONSES or last is ResponseStatus.NONE:
            continue
        if last in _RAN and judged.windows[event.event_id][1] <= now_wall_ns:
            continue  # it ran to its end: it completes, it is not superseded after the fact
        why = _superseded(event, judged)
        if why is not None:
            respond(event.event_id, ResponseStatus.SUPERSEDED, why)
    return responses


def _scope_verdict(
    event: ControlEvent, outcomes: Mapping[str, DeviceOutcome], controllable: Collection[str]
) -> tuple[bool, str]:
    scope = sorted(controllable) if event.device_id is None else [event.device_id]
    failures = [
        f"{device_id}: {outcome.reason}"
        for device_id in scope
        if not (outcome := outcomes.get(device_id, DeviceOutcome(False, "not written"))).ok
    ]
    return (not failures, "; ".join(failures))


def after_cycle(
    intent: Intent | None,
    active: ActiveControls,
    last_response: Mapping[str, ResponseStatus],
    outcomes: Mapping[str, DeviceOutcome],
    controllable: Collection[str],
    now_wall_ns: int,
    offsets: Mapping[str, tuple[int, int]],
    *,
    devices: Collection[str] | None = None,
    withdrawn: Mapping[str, frozenset[str]] | None = None,
) -> list[Response]:
    """Responses earned by what this control cycle wrote and verified.

    `active` is this cycle's `resolve` answer (an event is in force when it sets a mode there);
    `outcomes` the per-device verdicts for those controls; `devices` every device this gateway
    has (None = not checked; events for unknown devices were rejected on arrival anyway).
    """
    if intent is None:
        return []
    judged = _judge(intent, last_response, offsets, devices, withdrawn)
    in_force = set(active.active_event_ids)
    responses: list[Response] = []
    for event in intent.events:
        event_id = event.event_id
        last = last_response.get(event_id, ResponseStatus.NONE)
        if last in FINAL_RESPONSES or last is ResponseStatus.NONE:
            continue
        if event.status in _SERVER_CANCELLED:
            responses.append(
                Response(event_id, ResponseStatus.CANCELLED, "cancelled by the server")
            )
            continue
        if event.status is EventStatus.SUPERSEDED:
            responses.append(
                Response(
                    event_id, ResponseStatus.SUPERSEDED, "superseded (status set by the server)"
                )
            )
            continue
        if event_id in in_force:
            if last in (ResponseStatus.RECEIVED, ResponseStatus.FAILED):
                ok, reason = _scope_verdict(event, outcomes, controllable)
                if ok:
                    responses.append(Response(event_id, ResponseStatus.STARTED))
                elif last is not ResponseStatus.FAILED:
                    responses.append(Response(event_id, ResponseStatus.FAILED, reason))
            continue
        ended = judged.windows[event_id][1] <= now_wall_ns or event.status is EventStatus.COMPLETED
        if not (ended and last in _RAN):
            why = _superseded(event, judged)
            if why is not None:
                responses.append(Response(event_id, ResponseStatus.SUPERSEDED, why))
                continue
        if not ended:
            continue
        if last is ResponseStatus.RECEIVED:
            responses.append(
                Response(
                    event_id,
                    ResponseStatus.COMPLETED,
                    "never in force: its window passed while events were blocked, "
                    "overridden or not executed",
                )
            )
            continue
        # Ended after running: completed once the following controls are written and verified.
        ok, _reason = _scope_verdict(event, outcomes, controllable)
        if ok:
            responses.append(Response(event_id, ResponseStatus.COMPLETED))
    return responses

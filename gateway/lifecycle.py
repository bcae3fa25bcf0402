"""Event lifecycle: which responses an event earns, and when. Pure, no I/O.

Responses follow IEEE 2030.5 (received, started, completed, cancelled, superseded, rejected) with
one rule the reference system got wrong: "started" and "completed" are only claimed once the
controls were *written and read back* on every device in the event's scope. A failed or
unverified write earns "failed" with the reason, and the event keeps being retried.

The caller persists `last_response` per event, so a restart neither repeats a response nor
re-runs an event that already ended.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from gateway.intent import ControlEvent, EventStatus, Intent
from gateway.schedule import ActiveControls, ArrivalVerdict, arrival_verdict, effective_window

__all__ = ["DeviceOutcome", "Response", "ResponseStatus", "after_cycle", "on_arrival"]


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


def on_arrival(
    intent: Intent,
    last_response: Mapping[str, ResponseStatus],
    now_wall_ns: int,
    devices: Collection[str],
) -> list[Response]:
    """Responses owed when a new intent version arrives."""
    responses: list[Response] = []
    for event in intent.events:
        last = last_response.get(event.event_id, ResponseStatus.NONE)
        if last in FINAL_RESPONSES:
            continue
        if event.status in (EventStatus.CANCELLED, EventStatus.CANCELLED_RANDOMIZED):
            responses.append(Response(event.event_id, ResponseStatus.CANCELLED, "cancelled"))
            continue
        if event.status is EventStatus.SUPERSEDED:
            responses.append(Response(event.event_id, ResponseStatus.SUPERSEDED, "superseded"))
            continue
        if event.status is EventStatus.COMPLETED or last is not ResponseStatus.NONE:
            continue
        verdict, reason = arrival_verdict(event, now_wall_ns, devices)
        if verdict is ArrivalVerdict.REJECTED_LATE:
            responses.append(Response(event.event_id, ResponseStatus.REJECTED_LATE, reason))
        elif verdict is ArrivalVerdict.REJECTED_INVALID:
            responses.append(Response(event.event_id, ResponseStatus.REJECTED_INVALID, reason))
        else:
            responses.append(Response(event.event_id, ResponseStatus.RECEIVED))
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
) -> list[Response]:
    """Responses earned by what this control cycle wrote and verified."""
    if intent is None:
        return []
    in_force = set(active.active_event_ids)
    responses: list[Response] = []
    for event in intent.events:
        last = last_response.get(event.event_id, ResponseStatus.NONE)
        if last in FINAL_RESPONSES or last is ResponseStatus.NONE:
            continue
        if event.event_id in in_force:
            if last in (ResponseStatus.RECEIVED, ResponseStatus.FAILED):
                ok, reason = _scope_verdict(event, outcomes, controllable)
                if ok:
                    responses.append(Response(event.event_id, ResponseStatus.STARTED))
                elif last is not ResponseStatus.FAILED:
                    responses.append(Response(event.event_id, ResponseStatus.FAILED, reason))
            continue
        _, end = effective_window(event, offsets.get(event.event_id, (0, 0)))
        if now_wall_ns < end:
            continue
        if last is ResponseStatus.RECEIVED:
            # Its window passed while a higher-priority event was in force.
            responses.append(
                Response(
                    event.event_id,
                    ResponseStatus.COMPLETED,
                    "never in force: a higher-priority event covered its window",
                )
            )
            continue
        # Ended after running: completed once the following controls are written and verified.
        ok, _reason = _scope_verdict(event, outcomes, controllable)
        if ok:
            responses.append(Response(event.event_id, ResponseStatus.COMPLETED))
    return responses

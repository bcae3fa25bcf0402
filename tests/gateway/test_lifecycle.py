"""Event lifecycle: started/completed only after read-back; failed with a reason otherwise."""

from __future__ import annotations

from gateway.intent import NS_PER_S, ControlEvent, Controls, EventStatus, Intent, SiteConstraints
from gateway.lifecycle import (
    DeviceOutcome,
    Response,
    ResponseStatus,
    after_cycle,
    on_arrival,
)
from gateway.schedule import resolve

T0 = 1_800_000_000 * NS_PER_S
DEVICES = {"pv1", "bat1", "meter"}
CONTROLLABLE = ("bat1", "pv1")
OK = {"pv1": DeviceOutcome(True), "bat1": DeviceOutcome(True)}


def _event(event_id: str, start_s: int, duration_s: int, **kw: object) -> ControlEvent:
    return ControlEvent(
        event_id=event_id,
        created_wall_ns=T0,
        start_wall_ns=T0 + start_s * NS_PER_S,
        duration_s=duration_s,
        primacy=1,
        controls=Controls(export_limit_w=0.0),
        **kw,  # type: ignore[arg-type]
    )


def _intent(*events: ControlEvent) -> Intent:
    return Intent("s", 1, T0, events, Controls(max_gen_pct=100.0), SiteConstraints())


def _cycle(intent: Intent, t_s: int, last: dict[str, ResponseStatus], outcomes=OK):
    now = T0 + t_s * NS_PER_S
    active = resolve(intent, now, fallback=Controls(), devices=DEVICES)
    return after_cycle(intent, active, last, outcomes, CONTROLLABLE, now, {})


def test_arrival_responses() -> None:
    intent = _intent(
        _event("ok", 10, 10),
        _event("late", -20, 10),
        _event("ghost", 10, 10, device_id="pv9"),
        _event("cancelled", 10, 10, status=EventStatus.CANCELLED),
    )
    responses = on_arrival(intent, {}, T0, DEVICES)
    assert [(r.event_id, r.status) for r in responses] == [
        ("ok", ResponseStatus.RECEIVED),
        ("late", ResponseStatus.REJECTED_LATE),
        ("ghost", ResponseStatus.REJECTED_INVALID),
        ("cancelled", ResponseStatus.CANCELLED),
    ]
    # A re-delivered document earns nothing new.
    last = {r.event_id: r.status for r in responses}
    assert on_arrival(intent, last, T0, DEVICES) == []


def test_started_only_after_every_device_in_scope_read_back() -> None:
    intent = _intent(_event("e", 0, 10))
    last = {"e": ResponseStatus.RECEIVED}
    failing = {"pv1": DeviceOutcome(True), "bat1": DeviceOutcome(False, "read-back mismatch")}
    assert _cycle(intent, 1, last, failing) == [
        Response("e", ResponseStatus.FAILED, "bat1: read-back mismatch")
    ]
    last["e"] = ResponseStatus.FAILED
    assert _cycle(intent, 2, last, failing) == []  # failed is not repeated
    assert _cycle(intent, 3, last) == [Response("e", ResponseStatus.STARTED)]


def test_device_event_scope_is_that_device() -> None:
    intent = _intent(_event("d", 0, 10, device_id="pv1"))
    outcomes = {"pv1": DeviceOutcome(True), "bat1": DeviceOutcome(False, "unavailable")}
    assert _cycle(intent, 1, {"d": ResponseStatus.RECEIVED}, outcomes) == [
        Response("d", ResponseStatus.STARTED)
    ]


def test_completed_after_the_next_control_is_verified() -> None:
    intent = _intent(_event("e", 0, 10))
    last = {"e": ResponseStatus.STARTED}
    assert _cycle(intent, 5, last) == []
    not_yet = {"pv1": DeviceOutcome(False, "not written yet"), "bat1": DeviceOutcome(True)}
    assert _cycle(intent, 10, last, not_yet) == []
    assert _cycle(intent, 11, last) == [Response("e", ResponseStatus.COMPLETED)]
    assert _cycle(intent, 12, {"e": ResponseStatus.COMPLETED}) == []

"""Schedule resolution: rules by example, and hypothesis against a brute-force reference."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.intent import NS_PER_S, ControlEvent, Controls, EventStatus, Intent, SiteConstraints
from gateway.schedule import (
    ActiveControls,
    ArrivalVerdict,
    ControlSource,
    arrival_verdict,
    effective_window,
    resolve,
)

T0 = 1_800_000_000 * NS_PER_S
DEVICES = frozenset({"pv1", "pv2", "bat1"})
FALLBACK = Controls(export_limit_w=5000.0)
DEFAULT = Controls(max_gen_pct=100.0)


def _event(
    event_id: str,
    start_s: int,
    duration_s: int,
    *,
    primacy: int = 1,
    created_s: int = 0,
    device_id: str | None = None,
    status: EventStatus = EventStatus.SCHEDULED,
    export_w: float = 1000.0,
) -> ControlEvent:
    return ControlEvent(
        event_id=event_id,
        created_wall_ns=T0 + created_s * NS_PER_S,
        start_wall_ns=T0 + start_s * NS_PER_S,
        duration_s=duration_s,
        primacy=primacy,
        controls=Controls(export_limit_w=export_w),
        device_id=device_id,
        status=status,
    )


def _intent(*events: ControlEvent, default: Controls = DEFAULT) -> Intent:
    return Intent("site", 3, T0, tuple(events), default, SiteConstraints())


def _site_event(active: ActiveControls) -> str | None:
    (event_id,) = active.site.event_ids or {None}
    return event_id


def _at(intent: Intent | None, t_s: float):
    return resolve(intent, T0 + int(t_s * NS_PER_S), fallback=FALLBACK, devices=DEVICES)


def test_no_intent_uses_the_static_fallback() -> None:
    active = _at(None, 0)
    assert active.source is ControlSource.FALLBACK
    assert active.site.controls == FALLBACK
    assert active.intent_version == 0


def test_intent_without_default_uses_the_fallback() -> None:
    active = _at(_intent(default=Controls()), 0)
    assert active.source is ControlSource.FALLBACK


def test_default_applies_outside_events_and_event_inside() -> None:
    intent = _intent(_event("e1", 10, 20))
    assert _at(intent, 9.999).source is ControlSource.DEFAULT
    inside = _at(intent, 10)
    assert inside.source is ControlSource.EVENT
    assert _site_event(inside) == "e1"
    assert inside.site.controls.export_limit_w == 1000.0
    assert _site_event(_at(intent, 29.999)) == "e1"
    after = _at(intent, 30)
    assert after.source is ControlSource.DEFAULT
    assert after.site.controls == DEFAULT


def test_successive_events_leave_no_gap() -> None:
    intent = _intent(_event("a", 0, 10, export_w=1.0), _event("b", 10, 10, export_w=2.0))
    for t in (0, 5, 9.999999, 10, 15, 19.999):
        assert _at(intent, t).source is ControlSource.EVENT, t
    assert _site_event(_at(intent, 9.999999)) == "a"
    assert _site_event(_at(intent, 10)) == "b"


def test_lower_primacy_wins_then_newer_creation() -> None:
    intent = _intent(
        _event("low", 0, 100, primacy=2, created_s=50),
        _event("high_old", 0, 100, primacy=1, created_s=1),
        _event("high_new", 0, 100, primacy=1, created_s=2),
    )
    assert _site_event(_at(intent, 5)) == "high_new"


def test_cancelled_and_superseded_events_never_apply() -> None:
    for status in (
        EventStatus.CANCELLED,
        EventStatus.CANCELLED_RANDOMIZED,
        EventStatus.SUPERSEDED,
        EventStatus.COMPLETED,
    ):
        assert _at(_intent(_event("e", 0, 100, status=status)), 5).source is ControlSource.DEFAULT


def test_device_event_applies_to_that_device_only() -> None:
    intent = _intent(_event("d", 0, 100, device_id="pv2"))
    active = _at(intent, 1)
    assert active.site.controls == DEFAULT
    assert _site_event(active) is None
    assert {d: set(sc.event_ids) for d, sc in active.device.items()} == {"pv2": {"d"}}
    assert active.source is ControlSource.EVENT


def test_unknown_device_event_is_never_widened_to_the_site() -> None:
    intent = _intent(_event("ghost", 0, 100, device_id="pv99"))
    active = _at(intent, 1)
    assert active.source is ControlSource.DEFAULT
    assert active.site.controls == DEFAULT
    assert dict(active.device) == {}
    verdict, reason = arrival_verdict(intent.events[0], T0, DEVICES)
    assert verdict is ArrivalVerdict.REJECTED_INVALID
    assert "pv99" in reason


def test_event_already_ended_on_arrival_is_rejected_late() -> None:
    event = _event("old", 0, 10)
    assert arrival_verdict(event, T0 + 10 * NS_PER_S, DEVICES)[0] is ArrivalVerdict.REJECTED_LATE
    assert arrival_verdict(event, T0 + 9 * NS_PER_S, DEVICES)[0] is ArrivalVerdict.ACCEPTED


def test_randomization_offsets_shift_the_window() -> None:
    event = _event("r", 100, 10)
    assert effective_window(event, (5, -3)) == (T0 + 105 * NS_PER_S, T0 + 112 * NS_PER_S)
    active = resolve(
        _intent(event),
        T0 + 103 * NS_PER_S,
        fallback=FALLBACK,
        devices=DEVICES,
        offsets={"r": (5, 0)},
    )
    assert active.source is ControlSource.DEFAULT


events_strategy = st.lists(
    st.builds(
        _event,
        event_id=st.sampled_from([f"e{i}" for i in range(8)]),
        start_s=st.integers(0, 60),
        duration_s=st.integers(1, 40),
        primacy=st.integers(0, 3),
        created_s=st.integers(0, 5),
        device_id=st.sampled_from([None, None, "pv1", "bat1", "nope"]),
        status=st.sampled_from([EventStatus.SCHEDULED, EventStatus.ACTIVE, EventStatus.CANCELLED]),
    ),
    max_size=8,
    unique_by=lambda e: e.event_id,
)


def _reference(intent: Intent, t_ns: int, scope: str | None) -> str | None:
    """Brute force: rank every event, take the first that applies to `scope` at `t_ns`."""
    ranked = sorted(intent.events, key=lambda e: (e.primacy, -e.created_wall_ns, e.event_id))
    for event in ranked:
        if event.status in (EventStatus.CANCELLED, EventStatus.SUPERSEDED):
            continue
        if event.device_id != scope:
            continue
        if event.start_wall_ns <= t_ns < event.start_wall_ns + event.duration_s * NS_PER_S:
            return event.event_id
    return None


@settings(max_examples=300, deadline=None)
@given(events_strategy, st.integers(-5, 110))
def test_resolve_matches_brute_force(events: list[ControlEvent], t_s: int) -> None:
    intent = _intent(*events)
    t_ns = T0 + t_s * NS_PER_S
    active = resolve(intent, t_ns, fallback=FALLBACK, devices=DEVICES)
    assert _site_event(active) == _reference(intent, t_ns, None)
    for device in DEVICES:
        scope = active.device.get(device)
        assert (next(iter(scope.event_ids), None) if scope else None) == _reference(
            intent, t_ns, device
        )
    assert "nope" not in active.device
    expected = ControlSource.EVENT if active.active_event_ids else ControlSource.DEFAULT
    assert active.source is expected

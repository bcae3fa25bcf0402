"""Event lifecycle: responses by named example, and a simulated timeline that never repeats one.

Started/completed only after read-back; failed with a reason otherwise; superseded for good
(protocols.md §1.3 rule 7, §1.4).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.intent import (
    MODES,
    NS_PER_S,
    ControlEvent,
    Controls,
    EventStatus,
    Intent,
    Program,
    SiteConstraints,
    modes_from_mask,
    modes_to_mask,
)
from gateway.lifecycle import (
    FINAL_RESPONSES,
    DeviceOutcome,
    Response,
    ResponseStatus,
    after_cycle,
    on_arrival,
    withdrawn_modes,
)
from gateway.schedule import ownership, resolve

T0 = 1_800_000_000 * NS_PER_S
DEVICES = {"pv1", "bat1", "meter"}
CONTROLLABLE = ("bat1", "pv1")
OK = {"pv1": DeviceOutcome(True), "bat1": DeviceOutcome(True)}
R = ResponseStatus


def _event(event_id: str, start_s: int, duration_s: int, **kw: Any) -> ControlEvent:
    fields: dict[str, Any] = {
        "created_wall_ns": T0,
        "primacy": 1,
        "controls": Controls(export_limit_w=0.0),
    }
    fields.update(kw)
    return ControlEvent(
        event_id=event_id,
        start_wall_ns=T0 + start_s * NS_PER_S,
        duration_s=duration_s,
        **fields,
    )


def _intent(*events: ControlEvent, programs: tuple[Program, ...] = (), version: int = 1) -> Intent:
    return Intent(
        "s", version, T0, events, Controls(max_gen_pct=100.0), SiteConstraints(), programs
    )


class Gateway:
    """The runtime's part, in miniature: arrival, then cycles; persists the last response and
    the withdrawn modes, exactly as gateway.runtime.control should."""

    def __init__(self) -> None:
        self.last: dict[str, ResponseStatus] = {}
        self.withdrawn: dict[str, frozenset[str]] = {}
        self.offsets: dict[str, tuple[int, int]] = {}
        self.intent: Intent | None = None
        self.log: list[tuple[str, ResponseStatus]] = []

    def _take(self, responses: list[Response]) -> list[tuple[str, ResponseStatus]]:
        for response in responses:
            self.last[response.event_id] = response.status
            self.log.append((response.event_id, response.status))
        return [(r.event_id, r.status) for r in responses]

    def arrive(self, intent: Intent, t_s: float) -> list[tuple[str, ResponseStatus]]:
        self.intent = intent
        now = T0 + round(t_s * NS_PER_S)
        taken = self._take(
            on_arrival(
                intent, self.last, now, DEVICES, offsets=self.offsets, withdrawn=self.withdrawn
            )
        )
        self.withdrawn = withdrawn_modes(intent, self.last, self.offsets, DEVICES, self.withdrawn)
        return taken

    def cycle(
        self,
        t_s: float,
        outcomes: dict[str, DeviceOutcome] = OK,
        *,
        events_allowed: bool = True,
    ) -> list[tuple[str, ResponseStatus]]:
        now = T0 + round(t_s * NS_PER_S)
        active = resolve(
            self.intent,
            now,
            fallback=Controls(),
            devices=DEVICES,
            offsets=self.offsets,
            withdrawn=self.withdrawn,
            events_allowed=events_allowed,
        )
        self.active = active
        return self._take(
            after_cycle(
                self.intent,
                active,
                self.last,
                outcomes,
                CONTROLLABLE,
                now,
                self.offsets,
                devices=DEVICES,
                withdrawn=self.withdrawn,
            )
        )


def _cycle(
    intent: Intent,
    t_s: int,
    last: dict[str, ResponseStatus],
    outcomes: dict[str, DeviceOutcome] = OK,
) -> list[Response]:
    now = T0 + t_s * NS_PER_S
    active = resolve(intent, now, fallback=Controls(), devices=DEVICES)
    return after_cycle(intent, active, last, outcomes, CONTROLLABLE, now, {})


# -- arrival ---------------------------------------------------------------------------------


def test_arrival_responses() -> None:
    intent = _intent(
        _event("ok", 10, 10),
        _event("late", -20, 10),
        _event("ghost", 10, 10, device_id="pv9"),
        _event("cancelled", 10, 10, status=EventStatus.CANCELLED),
    )
    responses = on_arrival(intent, {}, T0, DEVICES)
    assert [(r.event_id, r.status) for r in responses] == [
        ("ok", R.RECEIVED),
        ("late", R.REJECTED_LATE),
        ("ghost", R.REJECTED_INVALID),
        ("cancelled", R.CANCELLED),
    ]
    # A re-delivered document earns nothing new.
    last = {r.event_id: r.status for r in responses}
    assert on_arrival(intent, last, T0, DEVICES) == []


def test_event_of_an_unknown_program_is_rejected_invalid() -> None:
    intent = _intent(
        _event("ours", 10, 10, program_id="utility"),
        _event("stray", 10, 10, program_id="nope"),
        _event("plain", 20, 10),
        programs=(Program("utility", 1),),
    )
    responses = on_arrival(intent, {}, T0, DEVICES)
    assert [(r.event_id, r.status) for r in responses] == [
        ("ours", R.RECEIVED),
        ("stray", R.REJECTED_INVALID),
        ("plain", R.RECEIVED),
    ]
    assert "'nope'" in responses[1].reason


def test_event_arriving_superseded_is_received_then_superseded() -> None:
    gateway = Gateway()
    high = _event("high", 0, 100, primacy=0)
    low = _event("low", 50, 10, primacy=5)
    assert gateway.arrive(_intent(high, low), 1) == [
        ("high", R.RECEIVED),
        ("low", R.RECEIVED),
        ("low", R.SUPERSEDED),
    ]
    assert "superseded by event high" in on_arrival(_intent(high, low), {}, T0, DEVICES)[-1].reason


def test_server_statuses_on_arrival() -> None:
    gateway = Gateway()
    events = (
        _event("a", 10, 10),
        _event("b", 10, 10, device_id="pv1"),
        _event("c", 10, 10, device_id="bat1"),
    )
    gateway.arrive(_intent(*events), 0)
    v2 = _intent(
        replace(events[0], status=EventStatus.SUPERSEDED),
        replace(events[1], status=EventStatus.CANCELLED_RANDOMIZED),
        replace(events[2], status=EventStatus.COMPLETED),
        version=2,
    )
    assert gateway.arrive(v2, 1) == [("a", R.SUPERSEDED), ("b", R.CANCELLED), ("c", R.COMPLETED)]
    assert gateway.cycle(15) == []  # final responses are never repeated


# -- started / failed / completed ---------------------------------------------------------


def test_started_only_after_every_device_in_scope_read_back() -> None:
    intent = _intent(_event("e", 0, 10))
    last = {"e": R.RECEIVED}
    failing = {"pv1": DeviceOutcome(True), "bat1": DeviceOutcome(False, "read-back mismatch")}
    assert _cycle(intent, 1, last, failing) == [Response("e", R.FAILED, "bat1: read-back mismatch")]
    last["e"] = R.FAILED
    assert _cycle(intent, 2, last, failing) == []  # failed is not repeated
    assert _cycle(intent, 3, last) == [Response("e", R.STARTED)]


def test_device_event_scope_is_that_device() -> None:
    intent = _intent(_event("d", 0, 10, device_id="pv1"))
    outcomes = {"pv1": DeviceOutcome(True), "bat1": DeviceOutcome(False, "unavailable")}
    assert _cycle(intent, 1, {"d": R.RECEIVED}, outcomes) == [Response("d", R.STARTED)]


def test_completed_after_the_next_control_is_verified() -> None:
    intent = _intent(_event("e", 0, 10))
    last = {"e": R.STARTED}
    assert _cycle(intent, 5, last) == []
    not_yet = {"pv1": DeviceOutcome(False, "not written yet"), "bat1": DeviceOutcome(True)}
    assert _cycle(intent, 10, last, not_yet) == []
    assert _cycle(intent, 11, last) == [Response("e", R.COMPLETED)]
    assert _cycle(intent, 12, {"e": R.COMPLETED}) == []


def test_never_in_force_completes_with_the_reason() -> None:
    gateway = Gateway()
    gateway.arrive(_intent(_event("e", 0, 10)), 0)
    assert gateway.cycle(5, events_allowed=False) == []
    responses = after_cycle(
        gateway.intent,
        gateway.active,
        gateway.last,
        OK,
        CONTROLLABLE,
        T0 + 11 * NS_PER_S,
        {},
    )
    assert [(r.status, "never in force" in r.reason) for r in responses] == [(R.COMPLETED, True)]


# -- supersession, cancellation -----------------------------------------------------------


def test_gen10_superseded_event_gets_superseded_and_never_resumes() -> None:
    """CSIP-AUS GEN-10: the primacy-2 event runs over the primacy-1 default, is superseded by a
    later primacy-1 event (response 7), and the primacy-1 default follows, not the old event."""
    programs = (
        Program("utility", 1, Controls(export_limit_w=3000.0)),
        Program("aggregator", 2),
    )
    p2 = _event(
        "p2", 0, 600, primacy=2, program_id="aggregator", controls=Controls(export_limit_w=2e4)
    )
    gateway = Gateway()
    assert gateway.arrive(_intent(p2, programs=programs), 0) == [("p2", R.RECEIVED)]
    assert gateway.cycle(1) == [("p2", R.STARTED)]
    p1 = _event("p1", 100, 60, primacy=1, program_id="utility", created_wall_ns=T0 + 100)
    v2 = _intent(p2, p1, programs=programs, version=2)
    assert gateway.arrive(v2, 100) == [("p1", R.RECEIVED), ("p2", R.SUPERSEDED)]
    assert gateway.cycle(100) == [("p1", R.STARTED)]
    assert gateway.cycle(161) == [("p1", R.COMPLETED)]
    assert gateway.active.site.label("export_limit_w") == "default of program utility v2"
    assert gateway.cycle(300) == []
    assert gateway.log.count(("p2", R.COMPLETED)) == 0


def test_started_event_superseded_later_gets_superseded_not_completed() -> None:
    gateway = Gateway()
    low = _event("low", 0, 100, primacy=2)
    gateway.arrive(_intent(low), 0)
    assert gateway.cycle(1) == [("low", R.STARTED)]
    high = _event("high", 50, 10, primacy=1)
    # Without the arrival step (e.g. a cycle that runs first) after_cycle says it too, once.
    gateway.intent = _intent(low, high, version=2)
    gateway.last["high"] = R.RECEIVED
    assert gateway.cycle(20) == [("low", R.SUPERSEDED)]
    assert gateway.cycle(120) == [("high", R.COMPLETED)]


def test_partly_superseded_event_stays_in_force_and_completes() -> None:
    gateway = Gateway()
    wide = _event("wide", 0, 100, primacy=2, controls=Controls(export_limit_w=5.0, connect=True))
    gateway.arrive(_intent(wide), 0)
    assert gateway.cycle(1) == [("wide", R.STARTED)]
    narrow = _event("narrow", 40, 20, primacy=1)
    assert gateway.arrive(_intent(wide, narrow, version=2), 30) == [("narrow", R.RECEIVED)]
    assert gateway.withdrawn == {"wide": {"export_limit_w"}}
    assert gateway.cycle(45) == [("narrow", R.STARTED)]
    assert gateway.cycle(61) == [("narrow", R.COMPLETED)]
    assert gateway.active.site.controls.export_limit_w is None  # the default sets none
    assert gateway.active.site.label("connect") == "event wide"
    # The headend drops the ended "narrow" from the next version: "wide" does not win its
    # export limit back (the withdrawn memory keeps supersession permanent).
    assert gateway.arrive(_intent(wide, version=3), 70) == []
    gateway.cycle(71)
    assert gateway.active.site.controls.export_limit_w is None
    assert gateway.cycle(101) == [("wide", R.COMPLETED)]


def test_without_memory_a_dropped_superseder_would_hand_modes_back() -> None:
    """Why `withdrawn` exists: the static rules alone forget a superseder that left the document."""
    wide = _event("wide", 0, 100, primacy=2, controls=Controls(export_limit_w=5.0, connect=True))
    narrow = _event("narrow", 40, 20, primacy=1)
    both = _intent(wide, narrow)
    memory = withdrawn_modes(both, {}, {}, DEVICES)
    assert memory == {"wide": {"export_limit_w"}}
    alone = _intent(wide, version=2)
    assert ownership(alone, {}, DEVICES)["wide"] == {"export_limit_w", "connect"}
    assert ownership(alone, {}, DEVICES, withdrawn=memory)["wide"] == {"connect"}


def test_cancellation_mid_event() -> None:
    gateway = Gateway()
    event = _event("e", 0, 100)
    gateway.arrive(_intent(event), 0)
    assert gateway.cycle(1) == [("e", R.STARTED)]
    cancelled = _intent(replace(event, status=EventStatus.CANCELLED), version=2)
    assert gateway.arrive(cancelled, 50) == [("e", R.CANCELLED)]
    assert gateway.cycle(50) == []
    assert gateway.active.active_event_ids == ()  # the next control, at once
    assert gateway.cycle(101) == []  # cancelled is final: no completed


def test_cancelled_before_start_is_received_then_cancelled() -> None:
    gateway = Gateway()
    event = _event("e", 100, 10)
    assert gateway.arrive(_intent(event), 0) == [("e", R.RECEIVED)]
    cancelled = _intent(replace(event, status=EventStatus.CANCELLED), version=2)
    assert gateway.arrive(cancelled, 10) == [("e", R.CANCELLED)]


def test_a_late_event_supersedes_nothing() -> None:
    """An event rejected late is ignored (§1.3 rule 3): it takes no mode from a running one."""
    gateway = Gateway()
    running = _event("running", 0, 300, primacy=5)
    gateway.arrive(_intent(running), 0)
    assert gateway.cycle(1) == [("running", R.STARTED)]
    late = _event("late", 50, 10, primacy=0)
    assert gateway.arrive(_intent(running, late, version=2), 100) == [("late", R.REJECTED_LATE)]
    assert gateway.cycle(101) == []
    assert gateway.active.active_event_ids == ("running",)


def test_superseded_event_stays_out_when_its_superseder_is_cancelled() -> None:
    gateway = Gateway()
    low = _event("low", 0, 300, primacy=5)
    high = _event("high", 100, 10, primacy=0)
    gateway.arrive(_intent(low, high), 0)
    assert gateway.last == {"low": R.SUPERSEDED, "high": R.RECEIVED}
    cancelled = _intent(low, replace(high, status=EventStatus.CANCELLED), version=2)
    assert gateway.arrive(cancelled, 50) == [("high", R.CANCELLED)]
    assert gateway.cycle(60) == []
    assert gateway.active.active_event_ids == ()


def test_ran_to_its_end_then_overlapped_completes_rather_than_superseded() -> None:
    gateway = Gateway()
    first = _event("first", 0, 10, primacy=5)
    gateway.arrive(_intent(first), 0)
    assert gateway.cycle(1) == [("first", R.STARTED)]
    # It ended at 10; before its completion was verified, an overlapping higher one arrives.
    gateway.cycle(10, {"pv1": DeviceOutcome(False, "not written yet")})
    later = _event("later", 5, 20, primacy=0)
    assert gateway.arrive(_intent(first, later, version=2), 10.5) == [("later", R.RECEIVED)]
    assert gateway.cycle(11) == [("first", R.COMPLETED), ("later", R.STARTED)]


def test_all23_five_back_to_back_events_each_start_and_complete_in_order() -> None:
    gateway = Gateway()
    events = [_event(f"c{i}", 60 * i, 60, controls=Controls(export_limit_w=i)) for i in range(5)]
    gateway.arrive(_intent(*events), -1)
    for t in range(0, 301, 10):
        gateway.cycle(t)
    expected = [(f"c{i}", R.RECEIVED) for i in range(5)] + [("c0", R.STARTED)]
    for i in range(1, 5):  # one cycle: the one that ended completes, the next one starts
        expected += [(f"c{i - 1}", R.COMPLETED), (f"c{i}", R.STARTED)]
    expected.append(("c4", R.COMPLETED))
    assert gateway.log == expected


def test_successive_events_with_randomization_are_not_superseded() -> None:
    gateway = Gateway()
    a = _event("a", 0, 60, randomize_duration_s=30)
    b = _event("b", 60, 60, randomize_start_s=30)
    gateway.offsets = {"a": (0, 25), "b": (20, 0)}
    assert gateway.arrive(_intent(a, b), 0) == [("a", R.RECEIVED), ("b", R.RECEIVED)]
    assert gateway.cycle(1) == [("a", R.STARTED)]
    assert gateway.cycle(84) == []
    assert gateway.cycle(85) == [("a", R.COMPLETED), ("b", R.STARTED)]


def test_withdrawn_modes_is_a_fixpoint_and_forgets_events_that_left() -> None:
    wide = _event("wide", 0, 100, primacy=2, controls=Controls(export_limit_w=5.0, connect=True))
    narrow = _event("narrow", 40, 20, primacy=1)
    intent = _intent(wide, narrow)
    memory = withdrawn_modes(intent, {"gone": R.RECEIVED}, {}, DEVICES, {"gone": frozenset({"x"})})
    assert memory == {"wide": {"export_limit_w"}}
    assert withdrawn_modes(intent, {}, {}, DEVICES, memory) == memory
    rejected = withdrawn_modes(intent, {"narrow": R.REJECTED_LATE}, {}, DEVICES)
    assert set(rejected) == {"narrow"}  # a rejected event takes nothing from anyone


# --------------------------------------------------------------------------------------------
# A random timeline: documents arrive, cycles run; responses are never repeated and always
# follow the lifecycle's order.

_event_specs = st.tuples(
    st.integers(0, 5),  # event index (ids reused across versions = the same event)
    st.integers(0, 60),  # start s
    st.integers(1, 40),  # duration s
    st.integers(0, 2),  # primacy
    st.sampled_from((None, None, "pv1", "meter", "pv9")),
    st.frozensets(st.sampled_from(("export_limit_w", "connect", "max_gen_pct")), min_size=1),
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.lists(_event_specs, max_size=4), min_size=1, max_size=4),
    st.lists(st.sampled_from((None, "cancel", "supersede", "complete")), min_size=4, max_size=4),
    st.lists(st.booleans(), min_size=30, max_size=30),
)
def test_timeline_never_repeats_a_response_and_keeps_the_order(
    versions: list[list[tuple[Any, ...]]],
    server_statuses: list[str | None],
    outcome_ok: list[bool],
) -> None:
    gateway = Gateway()
    known: dict[str, ControlEvent] = {}
    t = 0
    for number, specs in enumerate(versions, start=1):
        for index, start_s, duration_s, primacy, device_id, modes in specs:
            event_id = f"e{index}"
            if event_id not in known:  # events are immutable: a reused id is the same event
                values: dict[str, Any] = {m: (True if m == "connect" else 1.0) for m in modes}
                known[event_id] = _event(
                    event_id,
                    start_s,
                    duration_s,
                    primacy=primacy,
                    device_id=device_id,
                    created_wall_ns=T0 + number,
                    controls=replace(Controls(), **values),
                )
        status = server_statuses[number - 1]
        events = list(known.values())
        if status is not None and events:
            target = events[number % len(events)]
            new_status = {
                "cancel": EventStatus.CANCELLED,
                "supersede": EventStatus.SUPERSEDED,
                "complete": EventStatus.COMPLETED,
            }[status]
            known[target.event_id] = replace(target, status=new_status)
            events = list(known.values())
        gateway.arrive(_intent(*events, version=number), t)
        for step in range(8):
            t += 3
            ok = outcome_ok[(number * 8 + step) % len(outcome_ok)]
            outcomes = OK if ok else {"pv1": DeviceOutcome(False, "x"), "bat1": DeviceOutcome(True)}
            gateway.cycle(t, outcomes)
    for t_end in (t + 100, t + 200):
        gateway.cycle(t_end)

    assert len(gateway.log) == len(set(gateway.log)), gateway.log
    per_event: dict[str, list[ResponseStatus]] = {}
    for event_id, status in gateway.log:
        per_event.setdefault(event_id, []).append(status)
    for event_id, statuses in per_event.items():
        finals = [s for s in statuses if s in FINAL_RESPONSES]
        assert len(finals) <= 1, (event_id, statuses)
        assert not finals or statuses[-1] == finals[0], (event_id, statuses)  # final is last
        if R.STARTED in statuses:
            assert statuses[0] is R.RECEIVED, (event_id, statuses)
        if statuses[0] not in (R.RECEIVED,):
            assert len(statuses) == 1, (event_id, statuses)  # rejected/cancelled on arrival
    # Every event that arrived got a final response once everything has ended.
    assert set(per_event) == set(known)
    assert all(s[-1] in FINAL_RESPONSES or s[-1] is R.FAILED for s in per_event.values()), per_event


def test_withdrawn_modes_persist_as_a_bit_mask() -> None:
    memory = frozenset({"export_limit_w", "connect"})
    mask = modes_to_mask(memory)
    assert mask == (1 << MODES.index("export_limit_w")) | (1 << MODES.index("connect"))
    assert modes_from_mask(mask) == memory
    assert modes_from_mask(modes_to_mask(MODES)) == set(MODES)
    assert modes_from_mask(0) == set()

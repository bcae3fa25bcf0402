"""Pure intent logic: validation, merge, cancellation; properties with hypothesis."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dergw.v1 import ns_from_timestamp, pb
from headend_min.intents import (
    ConstraintValues,
    ControlValues,
    EventConflictError,
    EventRequest,
    IntentRequest,
    InvalidIntentError,
    ProgramRequest,
    UnknownDeviceError,
    UnknownEventError,
    UnknownProgramError,
    cancel_event,
    carried_events,
    compose_intent,
    event_end_ns,
    for_device,
)
from headend_min.model import IntentBasis

NOW = 1_700_000_000 * 10**9
S = 10**9
DEVICES = frozenset({"pv-1", "bat-1"})


class _Ids:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> str:
        self.count += 1
        return f"gen-{self.count}"


def basis(previous: pb.IntentDocument | None = None) -> IntentBasis:
    next_version = (previous.version if previous is not None else 0) + 1
    return IntentBasis("site-1", previous, next_version, DEVICES)


def event(event_id: str | None = None, **kwargs: object) -> EventRequest:
    fields: dict[str, object] = {"controls": ControlValues(max_gen_pct=50.0), "duration_s": 600}
    fields.update(kwargs)
    return EventRequest(event_id=event_id, **fields)  # type: ignore[arg-type]


def post(
    previous: pb.IntentDocument | None, request: IntentRequest, now_ns: int = NOW
) -> pb.IntentDocument:
    return compose_intent(basis(previous), request, now_ns=now_ns, new_event_id=_Ids())


def test_first_version_fills_defaults() -> None:
    document = post(None, IntentRequest(events=(event(),)))
    assert document.version == 1
    assert document.site_id == "site-1"
    assert ns_from_timestamp(document.issued_at) == NOW
    (only,) = document.events
    assert only.event_id == "gen-1"
    assert ns_from_timestamp(only.start) == NOW
    assert ns_from_timestamp(only.created_at) == NOW
    assert only.primacy == 1
    assert only.program_id == "default"  # the implicit program, primacy 1
    assert [(p.program_id, p.primacy) for p in document.programs] == [("default", 1)]
    assert not document.programs[0].HasField("default_control")
    assert only.device_id == ""
    assert only.status == pb.EVENT_STATUS_SCHEDULED
    assert only.controls.HasField("max_gen_pct")
    assert not only.controls.HasField("fixed_w")
    assert not document.HasField("default_control")
    assert not document.HasField("constraints")


def test_merge_carries_live_events_and_settings() -> None:
    v1 = post(
        None,
        IntentRequest(
            events=(event("a", duration_s=100), event("b", duration_s=1000)),
            default_control=ControlValues(max_gen_pct=100.0),
            constraints=ConstraintValues(export_limit_w=3000.0),
        ),
    )
    v2 = post(v1, IntentRequest(events=(event("c"),)), now_ns=NOW + 200 * S)
    assert [e.event_id for e in v2.events] == ["b", "c"]  # "a" ended at +100 s
    assert v2.events[0] == v1.events[1]  # carried unchanged, created_at included
    assert v2.default_control.max_gen_pct == 100.0
    assert v2.constraints.export_limit_w == 3000.0

    v3 = post(v2, IntentRequest(default_control=ControlValues()), now_ns=NOW + 300 * S)
    assert v3.HasField("default_control")
    assert not v3.default_control.HasField("max_gen_pct")  # `{}` cleared it
    assert [e.event_id for e in v3.events] == ["b", "c"]


def test_replace_events_is_scoped_on_the_device_route() -> None:
    v1 = post(None, IntentRequest(events=(event("site"), event("pv", device_id="pv-1"))))
    request = for_device(IntentRequest(events=(event("pv2"),), replace_events=True), "pv-1")
    v2 = compose_intent(basis(v1), request, now_ns=NOW, new_event_id=_Ids(), scope_device_id="pv-1")
    assert [(e.event_id, e.device_id) for e in v2.events] == [("site", ""), ("pv2", "pv-1")]
    v3 = post(v2, IntentRequest(events=(event("all"),), replace_events=True))
    assert [e.event_id for e in v3.events] == ["all"]


@pytest.mark.parametrize(
    ("request_", "error", "message"),
    [
        (IntentRequest(), InvalidIntentError, "nothing to post"),
        (IntentRequest(events=(event(device_id="pv-9"),)), UnknownDeviceError, "pv-9"),
        (IntentRequest(events=(event(controls=ControlValues()),)), InvalidIntentError, "empty"),
        (IntentRequest(events=(event(duration_s=0),)), InvalidIntentError, "duration_s"),
        (
            IntentRequest(events=(event(start_ns=NOW - 700 * S),)),
            InvalidIntentError,
            "already have ended",
        ),
        (IntentRequest(events=(event("x"), event("x"))), InvalidIntentError, "twice"),
        (
            IntentRequest(constraints=ConstraintValues(soc_min_pct=90.0, soc_max_pct=10.0)),
            InvalidIntentError,
            "soc_min_pct",
        ),
        (
            IntentRequest(events=(event(randomize_duration_s=-3601),)),
            InvalidIntentError,
            "randomize_duration_s",
        ),
        (
            IntentRequest(events=(event(controls=ControlValues(fixed_w=float("inf"))),)),
            InvalidIntentError,
            "finite",
        ),
    ],
)
def test_invalid_requests(request_: IntentRequest, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        post(None, request_)


UTILITY = ProgramRequest("utility", 1, ControlValues(export_limit_w=3000.0))
AGGREGATOR = ProgramRequest("aggregator", 2)


def test_programs_give_events_their_primacy() -> None:
    v1 = post(
        None,
        IntentRequest(
            programs=(UTILITY, AGGREGATOR),
            events=(event("a", program_id="aggregator"), event("u", program_id="utility")),
        ),
    )
    assert [(p.program_id, p.primacy) for p in v1.programs] == [("utility", 1), ("aggregator", 2)]
    assert v1.programs[0].default_control.export_limit_w == 3000.0
    assert not v1.programs[1].HasField("default_control")
    assert [(e.event_id, e.program_id, e.primacy) for e in v1.events] == [
        ("a", "aggregator", 2),
        ("u", "utility", 1),
    ]


def test_programs_are_carried_over_and_replaced_with_their_events_reranked() -> None:
    v1 = post(None, IntentRequest(programs=(UTILITY, AGGREGATOR)))
    assert [e.event_id for e in v1.events] == []
    v2 = post(v1, IntentRequest(events=(event("a", program_id="aggregator"),)))
    assert [p.program_id for p in v2.programs] == ["utility", "aggregator"]  # carried over
    # A program's primacy belongs to the program: its live events follow it.
    v3 = post(
        v2,
        IntentRequest(programs=(UTILITY, ProgramRequest("aggregator", 0))),
        now_ns=NOW + 10 * S,
    )
    assert [(e.event_id, e.primacy) for e in v3.events] == [("a", 0)]
    assert [(p.program_id, p.primacy) for p in v3.programs] == [("utility", 1), ("aggregator", 0)]


def test_the_default_program_is_implicit_unless_defined() -> None:
    v1 = post(None, IntentRequest(programs=(ProgramRequest("default", 4),), events=(event("e"),)))
    assert [(p.program_id, p.primacy) for p in v1.programs] == [("default", 4)]
    assert v1.events[0].primacy == 4
    # Replacing the programs without it keeps it for the live event that uses it.
    v2 = post(v1, IntentRequest(programs=(UTILITY,)), now_ns=NOW + 10 * S)
    assert [(p.program_id, p.primacy) for p in v2.programs] == [("utility", 1), ("default", 1)]
    assert v2.events[0].primacy == 1
    # Programs alone do not conjure it up.
    assert [p.program_id for p in post(None, IntentRequest(programs=(UTILITY,))).programs] == [
        "utility"
    ]


@pytest.mark.parametrize(
    ("request_", "error", "message"),
    [
        (
            IntentRequest(events=(event("x", program_id="ghost"),)),
            UnknownProgramError,
            "names program 'ghost'",
        ),
        (
            IntentRequest(programs=(UTILITY, UTILITY)),
            InvalidIntentError,
            "'utility' appears twice",
        ),
        (
            IntentRequest(programs=(ProgramRequest("p", -1),)),
            InvalidIntentError,
            "primacy",
        ),
        (
            IntentRequest(programs=(ProgramRequest("p", 1, ControlValues(fixed_w=float("nan"))),)),
            InvalidIntentError,
            "programs[0] (p).default_control.fixed_w",
        ),
    ],
)
def test_invalid_programs(request_: IntentRequest, error: type[Exception], message: str) -> None:
    with pytest.raises(error) as raised:
        post(None, request_)
    assert message in str(raised.value)


def test_dropping_a_program_a_live_event_uses_is_refused_naming_both() -> None:
    v1 = post(
        None,
        IntentRequest(
            programs=(UTILITY, AGGREGATOR), events=(event("a", program_id="aggregator"),)
        ),
    )
    with pytest.raises(UnknownProgramError, match=r"\('a'\) belong to program 'aggregator'"):
        post(v1, IntentRequest(programs=(UTILITY,)), now_ns=NOW + 10 * S)
    # Once the event has ended, or with replace_events, the program can go.
    later = post(v1, IntentRequest(programs=(UTILITY,)), now_ns=NOW + 601 * S)
    assert [p.program_id for p in later.programs] == ["utility"]
    replaced = post(v1, IntentRequest(programs=(UTILITY,), replace_events=True))
    assert [p.program_id for p in replaced.programs] == ["utility"]


def test_events_composed_before_programs_keep_their_own_primacy() -> None:
    legacy = post(None, IntentRequest(events=(event("old"),)))
    del legacy.programs[:]
    legacy.events[0].program_id = ""
    legacy.events[0].primacy = 7
    v2 = post(legacy, IntentRequest(programs=(UTILITY,)))
    assert [(e.event_id, e.program_id, e.primacy) for e in v2.events] == [("old", "", 7)]


def test_event_id_of_a_live_event_conflicts() -> None:
    v1 = post(None, IntentRequest(events=(event("a"),)))
    with pytest.raises(EventConflictError, match="'a'"):
        post(v1, IntentRequest(events=(event("a"),)))
    # Once "a" has ended its id is free again.
    v2 = post(v1, IntentRequest(events=(event("a"),)), now_ns=NOW + 601 * S)
    assert [e.event_id for e in v2.events] == ["a"]


def test_for_device_rules() -> None:
    scoped = for_device(IntentRequest(events=(event(),)), "bat-1")
    assert scoped.events[0].device_id == "bat-1"
    with pytest.raises(InvalidIntentError, match="pv-1"):
        for_device(IntentRequest(events=(event(device_id="pv-1"),)), "bat-1")
    with pytest.raises(InvalidIntentError, match="whole site"):
        for_device(IntentRequest(constraints=ConstraintValues()), "bat-1")
    with pytest.raises(InvalidIntentError, match="programs"):
        for_device(IntentRequest(programs=(UTILITY,)), "bat-1")


def test_cancel_event() -> None:
    v1 = post(
        None,
        IntentRequest(
            events=(event("a"), event("b", program_id="utility")),
            default_control=ControlValues(connect=True),
            programs=(UTILITY,),
        ),
    )
    v2 = cancel_event(basis(v1), "a", now_ns=NOW + 10 * S)
    assert v2.programs == v1.programs  # carried, with the implicit "default"
    assert v2.version == 2
    assert [(e.event_id, e.status) for e in v2.events] == [
        ("a", pb.EVENT_STATUS_CANCELLED),
        ("b", pb.EVENT_STATUS_SCHEDULED),
    ]
    assert v2.default_control.connect is True
    with pytest.raises(EventConflictError, match="already cancelled"):
        cancel_event(basis(v2), "a", now_ns=NOW + 20 * S)
    with pytest.raises(UnknownEventError, match="'z'"):
        cancel_event(basis(v2), "z", now_ns=NOW)
    with pytest.raises(UnknownEventError, match="none posted"):
        cancel_event(basis(None), "a", now_ns=NOW)
    with pytest.raises(EventConflictError, match="ended"):
        cancel_event(basis(v2), "b", now_ns=NOW + 601 * S)


def test_randomization_extends_the_carry_over() -> None:
    v1 = post(None, IntentRequest(events=(event("r", duration_s=100, randomize_start_s=60),)))
    assert event_end_ns(v1.events[0]) == NOW + 160 * S
    assert [e.event_id for e in carried_events(v1, NOW + 150 * S)] == ["r"]
    assert carried_events(v1, NOW + 160 * S) == []


# --------------------------------------------------------------------------------------------
# Properties.

# One event drawn relative to the clock at the time of its post: (duration_s, start offset s
# or None = now, device_id or None = site, randomize_start_s, in program "utility" if defined).
_EventSpec = tuple[int, int | None, str | None, int, bool]
_event_specs = st.tuples(
    st.integers(1, 3600),
    st.none() | st.integers(-3600, 3600),
    st.none() | st.sampled_from(sorted(DEVICES)),
    st.integers(-60, 60),
    st.booleans(),
)
_steps = st.lists(
    st.tuples(
        st.integers(0, 1800),  # seconds the clock moves before the post
        st.lists(_event_specs, max_size=3),
        st.booleans(),  # replace_events
        st.booleans(),  # also post a default control
        st.none() | st.integers(0, 3),  # also post programs: "utility" at this primacy
    ),
    min_size=1,
    max_size=12,
)


def _request(spec: _EventSpec, now_ns: int, *, utility: bool) -> EventRequest:
    duration_s, offset_s, device_id, randomize_start_s, in_utility = spec
    return EventRequest(
        controls=ControlValues(max_gen_pct=50.0),
        duration_s=duration_s,
        start_ns=None if offset_s is None else now_ns + offset_s * S,
        device_id=device_id,
        randomize_start_s=randomize_start_s,
        program_id="utility" if in_utility and utility else None,
    )


@settings(max_examples=150, deadline=None)
@given(steps=_steps)
def test_merge_never_drops_a_live_event_and_versions_increase(
    steps: list[tuple[int, list[_EventSpec], bool, bool, int | None]],
) -> None:
    previous: pb.IntentDocument | None = None
    now_ns = NOW
    ids = _Ids()
    utility = False  # has "utility" been defined (it is never dropped once defined)
    for advance_s, specs, replace_events, with_default, utility_primacy in steps:
        now_ns += advance_s * S
        defines_utility = utility or utility_primacy is not None
        request = IntentRequest(
            events=tuple(_request(spec, now_ns, utility=defines_utility) for spec in specs),
            default_control=ControlValues(max_gen_pct=90.0) if with_default else None,
            replace_events=replace_events,
            programs=(
                None
                if utility_primacy is None
                else (ProgramRequest("utility", utility_primacy, ControlValues(connect=True)),)
            ),
        )
        already_over = any(
            (offset_s or 0) + duration_s + max(0, randomize_s) <= 0
            for duration_s, offset_s, _, randomize_s, _ in specs
        )
        nothing = not specs and not with_default and utility_primacy is None
        if nothing or already_over:
            with pytest.raises(InvalidIntentError):
                compose_intent(basis(previous), request, now_ns=now_ns, new_event_id=ids)
            continue
        document = compose_intent(basis(previous), request, now_ns=now_ns, new_event_id=ids)
        utility = defines_utility

        old_version = previous.version if previous is not None else 0
        assert document.version == old_version + 1
        ids_in_document = [e.event_id for e in document.events]
        assert len(ids_in_document) == len(set(ids_in_document))
        primacy_of = {p.program_id: p.primacy for p in document.programs}
        if previous is not None and not replace_events:
            for old in previous.events:
                if event_end_ns(old) > now_ns:
                    # Carried over, unchanged but for its program's current primacy.
                    expected = pb.ControlEvent()
                    expected.CopyFrom(old)
                    expected.primacy = primacy_of[old.program_id]
                    assert expected in document.events
        assert all(event_end_ns(kept) > now_ns for kept in document.events)
        if specs:  # the new events come last, stamped now
            new_events = document.events[-len(specs) :]
            assert [e.duration_s for e in new_events] == [spec[0] for spec in specs]
            assert all(ns_from_timestamp(e.created_at) == now_ns for e in new_events)
        if previous is not None and previous.HasField("default_control"):
            assert document.HasField("default_control")
        assert len(primacy_of) == len(document.programs)
        assert all(primacy_of[e.program_id] == e.primacy for e in document.events)
        previous = document

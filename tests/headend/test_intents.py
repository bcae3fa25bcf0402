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
    UnknownDeviceError,
    UnknownEventError,
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


def test_cancel_event() -> None:
    v1 = post(
        None,
        IntentRequest(events=(event("a"), event("b")), default_control=ControlValues(connect=True)),
    )
    v2 = cancel_event(basis(v1), "a", now_ns=NOW + 10 * S)
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

# One event drawn relative to the clock at the time of its post:
# (duration_s, start offset s or None = now, device_id or None = site, randomize_start_s).
_EventSpec = tuple[int, int | None, str | None, int]
_event_specs = st.tuples(
    st.integers(1, 3600),
    st.none() | st.integers(-3600, 3600),
    st.none() | st.sampled_from(sorted(DEVICES)),
    st.integers(-60, 60),
)
_steps = st.lists(
    st.tuples(
        st.integers(0, 1800),  # seconds the clock moves before the post
        st.lists(_event_specs, max_size=3),
        st.booleans(),  # replace_events
        st.booleans(),  # also post a default control
    ),
    min_size=1,
    max_size=12,
)


def _request(spec: _EventSpec, now_ns: int) -> EventRequest:
    duration_s, offset_s, device_id, randomize_start_s = spec
    return EventRequest(
        controls=ControlValues(max_gen_pct=50.0),
        duration_s=duration_s,
        start_ns=None if offset_s is None else now_ns + offset_s * S,
        device_id=device_id,
        randomize_start_s=randomize_start_s,
    )


@settings(max_examples=150, deadline=None)
@given(steps=_steps)
def test_merge_never_drops_a_live_event_and_versions_increase(
    steps: list[tuple[int, list[_EventSpec], bool, bool]],
) -> None:
    previous: pb.IntentDocument | None = None
    now_ns = NOW
    ids = _Ids()
    for advance_s, specs, replace_events, with_default in steps:
        now_ns += advance_s * S
        request = IntentRequest(
            events=tuple(_request(spec, now_ns) for spec in specs),
            default_control=ControlValues(max_gen_pct=90.0) if with_default else None,
            replace_events=replace_events,
        )
        already_over = any(
            (offset_s or 0) + duration_s + max(0, randomize_s) <= 0
            for duration_s, offset_s, _, randomize_s in specs
        )
        if (not specs and not with_default) or already_over:
            with pytest.raises(InvalidIntentError):
                compose_intent(basis(previous), request, now_ns=now_ns, new_event_id=ids)
            continue
        document = compose_intent(basis(previous), request, now_ns=now_ns, new_event_id=ids)

        old_version = previous.version if previous is not None else 0
        assert document.version == old_version + 1
        ids_in_document = [e.event_id for e in document.events]
        assert len(ids_in_document) == len(set(ids_in_document))
        if previous is not None and not replace_events:
            for old in previous.events:
                if event_end_ns(old) > now_ns:
                    assert old in document.events  # carried over, unchanged
        assert all(event_end_ns(kept) > now_ns for kept in document.events)
        if specs:  # the new events come last, stamped now
            new_events = document.events[-len(specs) :]
            assert [e.duration_s for e in new_events] == [spec[0] for spec in specs]
            assert all(ns_from_timestamp(e.created_at) == now_ns for e in new_events)
        if previous is not None and previous.HasField("default_control"):
            assert document.HasField("default_control")
        previous = document

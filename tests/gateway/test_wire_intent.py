"""gateway.wire.intent_from_pb: programs and program_id, validated on the way in."""

from __future__ import annotations

import pytest

from dergw.v1 import pb, timestamp_from_ns
from gateway.intent import Controls, Program
from gateway.wire import IntentError, intent_from_pb

NOW_NS = 1_800_000_000 * 1_000_000_000


def _event(event_id: str, *, program_id: str = "", primacy: int = 7) -> pb.ControlEvent:
    event = pb.ControlEvent(
        event_id=event_id,
        created_at=timestamp_from_ns(NOW_NS),
        start=timestamp_from_ns(NOW_NS),
        duration_s=60,
        primacy=primacy,
        program_id=program_id,
    )
    event.controls.export_limit_w = 0.0
    return event


def _document(*events: pb.ControlEvent, programs: list[pb.Program]) -> pb.IntentDocument:
    return pb.IntentDocument(
        site_id="site", version=3, issued_at=timestamp_from_ns(NOW_NS), events=events,
        programs=programs,
    )  # fmt: skip


def test_programs_and_program_ids_are_converted_and_primacy_is_the_programs() -> None:
    utility = pb.Program(program_id="utility", primacy=1)
    utility.default_control.export_limit_w = 3000.0
    document = _document(
        _event("e1", program_id="utility", primacy=9),
        _event("e2"),
        programs=[utility, pb.Program(program_id="aggregator", primacy=2)],
    )
    intent = intent_from_pb(document)
    assert intent.programs == (
        Program("utility", 1, Controls(export_limit_w=3000.0)),
        Program("aggregator", 2, Controls()),
    )
    first, second = intent.events
    assert (first.program_id, first.primacy) == ("utility", 1)  # the program's, not 9
    assert (second.program_id, second.primacy) == (None, 7)  # no program: its own


def test_documents_without_programs_still_convert() -> None:
    intent = intent_from_pb(_document(_event("e1"), programs=[]))
    assert intent.programs == ()
    assert intent.events[0].program_id is None


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (
            _document(_event("e1", program_id="ghost"), programs=[pb.Program(program_id="u")]),
            "events[0].program_id: unknown program 'ghost' (programs defined: 'u')",
        ),
        (
            _document(_event("e1", program_id="ghost"), programs=[]),
            "unknown program 'ghost' (programs defined: none)",
        ),
        (
            _document(programs=[pb.Program(program_id="u"), pb.Program(program_id="u")]),
            "programs[1].program_id: duplicate id 'u'",
        ),
        (_document(programs=[pb.Program(program_id="")]), "programs[0].program_id: must be"),
        (
            _document(
                programs=[pb.Program(program_id="u", default_control=pb.Controls(fixed_w=2e9))]
            ),
            "programs[0].default_control.fixed_w",
        ),
    ],
)
def test_invalid_programs_are_refused_naming_the_field(
    document: pb.IntentDocument, message: str
) -> None:
    with pytest.raises(IntentError) as error:
        intent_from_pb(document)
    assert message in str(error.value)

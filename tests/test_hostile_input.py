"""Hostile bytes against the protobuf decoders on both ends (issue 6, hostile input).

Whatever arrives on a stream or a topic, the only outcomes are: it does not parse (DecodeError,
the message is dropped and counted by the transport), or it parses and the validating decoder
accepts it or refuses it with its own error type (ProtocolViolation at the headend, IntentError
at the gateway). Nothing else may escape: an unexpected exception would end a session or a
paho callback. Seeds are realistic messages; hypothesis mutates, truncates and extends them.
"""

from __future__ import annotations

import contextlib

from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dergw.v1 import pb, timestamp_from_ns
from gateway.wire import IntentError, intent_from_pb
from headend_min.ingest import ProtocolViolation, plan_telemetry, registration_from_pb
from tests.headend.fake_gateway import device, sample_record, site

NOW_NS = 1_800_000_000 * 1_000_000_000
EXAMPLES = settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)


def _register() -> bytes:
    return pb.Register(
        gateway_id="gw-1",
        software_version="1.0",
        site=site("site-a", export_limit_w=5000.0),
        devices=[device("pv1"), device("bat1", pb.DEVICE_KIND_BATTERY)],
        intent_version=3,
        oldest_unacked_seq=10,
        next_seq=20,
        boot_id="boot",
    ).SerializeToString()


def _batch() -> bytes:
    records = []
    for seq in range(1, 4):
        record = sample_record(
            "pv1", {"W": (1000.0 * seq, "W"), "Hz": (50.0, "Hz")}, time_ns=NOW_NS
        )
        record.seq = seq
        records.append(record)
    return pb.TelemetryBatch(records=records, last_seq=3).SerializeToString()


def _intent() -> bytes:
    event = pb.ControlEvent(
        event_id="e1",
        created_at=timestamp_from_ns(NOW_NS),
        start=timestamp_from_ns(NOW_NS),
        duration_s=600,
        primacy=1,
    )
    event.controls.export_limit_w = 2000.0
    event.controls.max_gen_pct = 50.0
    document = pb.IntentDocument(
        site_id="site-a", version=4, issued_at=timestamp_from_ns(NOW_NS), events=[event]
    )
    document.default_control.max_gen_pct = 100.0
    return document.SerializeToString()


def mutated(seed: bytes) -> st.SearchStrategy[bytes]:
    """The seed with bytes overwritten, cut short or extended, or plain random bytes."""
    overwrite = st.lists(
        st.tuples(st.integers(0, max(len(seed) - 1, 0)), st.integers(0, 255)), max_size=8
    ).map(lambda edits: _apply(seed, edits))
    truncated = st.integers(0, len(seed)).map(lambda n: seed[:n])
    extended = st.binary(max_size=64).map(lambda tail: seed + tail)
    return st.one_of(overwrite, truncated, extended, st.binary(max_size=256))


def _apply(seed: bytes, edits: list[tuple[int, int]]) -> bytes:
    data = bytearray(seed)
    for index, value in edits:
        data[index] = value
    return bytes(data)


@EXAMPLES
@given(mutated(_register()))
def test_a_hostile_register_is_refused_cleanly(data: bytes) -> None:
    try:
        message = pb.Register.FromString(data)
    except DecodeError:
        return
    try:
        registration = registration_from_pb(message)
    except ProtocolViolation:
        return
    assert registration.gateway_id == message.gateway_id


@EXAMPLES
@given(mutated(_batch()))
def test_a_hostile_telemetry_batch_is_refused_cleanly(data: bytes) -> None:
    try:
        batch = pb.TelemetryBatch.FromString(data)
    except DecodeError:
        return
    try:
        plan_telemetry(batch, "gw-1")
    except ProtocolViolation:
        return


@EXAMPLES
@given(mutated(_intent()))
def test_a_hostile_intent_document_is_refused_cleanly(data: bytes) -> None:
    try:
        document = pb.IntentDocument.FromString(data)
    except DecodeError:
        return
    try:
        intent = intent_from_pb(document)
    except IntentError:
        return
    for event in intent.events:  # whatever was accepted is within the shared bounds
        assert event.duration_s >= 0
        assert event.nominal_end_wall_ns >= event.start_wall_ns


@EXAMPLES
@given(mutated(pb.DownMessage(ack=pb.Ack(up_to_seq=7)).SerializeToString()))
def test_down_and_up_messages_only_ever_fail_to_parse(data: bytes) -> None:
    # What both MQTT consumers do first with a payload (after the size bound).
    for message_type in (pb.DownMessage, pb.UpMessage):
        with contextlib.suppress(DecodeError):
            message_type.FromString(data)

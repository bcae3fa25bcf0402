"""Pure decoding of up messages: registration and telemetry batch planning."""

from __future__ import annotations

import math
from typing import cast

import pytest

from dergw.v1 import MAX_RECORDS_PER_BATCH, pb
from headend_min.ingest import (
    ProtocolViolation,
    merge_latest_points,
    pack_latest_reads,
    plan_telemetry,
    registration_from_pb,
    sample_points,
    unpack_latest_points,
    wire_enum_label,
)
from headend_min.model import LatestPointRow
from tests.headend.fake_gateway import (
    FakeGateway,
    device,
    event_response_record,
    intent_status_record,
    reported_state_record,
    sample_record,
    site,
)


def _gateway() -> FakeGateway:
    return FakeGateway("unused:0", gateway_id="gw-1", site=site("site-1"), devices=[device("pv-1")])


def test_registration_is_decoded() -> None:
    message = _gateway().register_message().register
    message.site.export_limit_w = 4000.0
    registration = registration_from_pb(message)
    assert registration.gateway_id == "gw-1"
    assert registration.site.export_limit_w == 4000.0
    assert registration.site.import_limit_w is None  # absent stays absent, not 0
    (pv,) = registration.devices
    assert pv.kind == "PV"
    assert pv.nameplate.max_w == 5000.0
    assert [p.name for p in pv.points] == ["W", "WMaxLimPct"]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: setattr(r, "gateway_id", ""), "gateway_id is empty"),
        (lambda r: r.ClearField("site"), "site is missing"),
        (lambda r: r.devices.append(r.devices[0]), "twice"),
        (lambda r: setattr(r.site, "export_limit_w", -1.0), "export_limit_w"),
        (lambda r: setattr(r.site, "import_limit_w", math.nan), "import_limit_w"),
    ],
)
def test_invalid_registration(mutate: object, message: str) -> None:
    register = _gateway().register_message().register
    mutate(register)  # type: ignore[operator]
    with pytest.raises(ProtocolViolation, match=message):
        registration_from_pb(register)


def test_plan_splits_records_and_collapses_latest() -> None:
    gateway = _gateway()
    batch = gateway.batch(
        [
            sample_record("pv-1", {"W": (1.0, "W"), "Hz": (50.0, "Hz")}, time_ns=100),
            event_response_record(3, "ev", pb.RESPONSE_STATUS_STARTED),
            sample_record("pv-1", {"W": (2.0, "W")}, time_ns=200),
            intent_status_record(3, pb.INTENT_STATE_APPLIED),
            reported_state_record(3),
            pb.Record(decision=pb.Decision(summary="capped")),
            sample_record(
                "bat-1", {"W": (math.nan, "W")}, quality=pb.QUALITY_BAD_COMM, error="t/o"
            ),
        ]
    )
    rows = plan_telemetry(batch, "gw-1")
    assert (rows.first_seq, rows.last_seq) == (1, 7)
    assert [s.seq for s in rows.samples] == [1, 3, 7]
    latest = {(p.device_id, p.point): (p.value, p.seq, p.time_ns) for p in rows.latest_points}
    assert latest == {
        ("pv-1", "W"): (2.0, 3, 200),
        ("pv-1", "Hz"): (50.0, 1, 100),
        ("bat-1", "W"): (None, 7, latest[("bat-1", "W")][2]),
    }
    status = {s.device_id: (s.ok, s.error) for s in rows.sample_status}
    assert status == {"pv-1": (1, ""), "bat-1": (0, "t/o")}
    assert [r.seq for r in rows.event_responses] == [2]
    assert [r.seq for r in rows.intent_statuses] == [4]
    assert [r.seq for r in rows.reported_states] == [5]
    assert [(r.seq, r.summary) for r in rows.decisions] == [(6, "capped")]
    assert rows.unknown == []


def test_record_without_known_body_is_kept_raw() -> None:
    batch = _gateway().batch([pb.Record()])
    rows = plan_telemetry(batch, "gw-1")
    assert [r.seq for r in rows.unknown] == [1]
    assert pb.Record.FromString(rows.unknown[0].payload).seq == 1


def test_empty_batch_is_a_no_op() -> None:
    rows = plan_telemetry(pb.TelemetryBatch(gateway_id="gw-1"), "gw-1")
    assert rows.samples == []


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: setattr(b, "gateway_id", "gw-2"), "gw-2"),
        (lambda b: setattr(b, "last_seq", 5), "carries 2 records"),
        (lambda b: setattr(b.records[1], "seq", 9), "expected 2"),
        (lambda b: b.records[0].sample.values.append(1.0), "2 values"),
        (lambda b: b.records[0].sample.units.append("x"), "2 units"),
        (lambda b: setattr(b.records[0].sample, "device_id", ""), "device_id is empty"),
    ],
)
def test_batch_violations(mutate: object, message: str) -> None:
    batch = _gateway().batch([sample_record("pv-1", {"W": (1.0, "W")})] * 2)
    mutate(batch)  # type: ignore[operator]
    with pytest.raises(ProtocolViolation, match=message):
        plan_telemetry(batch, "gw-1")


def test_batch_size_is_bounded() -> None:
    batch = _gateway().batch([pb.Record()] * (MAX_RECORDS_PER_BATCH + 1))
    with pytest.raises(ProtocolViolation, match="at most"):
        plan_telemetry(batch, "gw-1")


def test_sample_points_and_enum_labels() -> None:
    sample = sample_record("pv-1", {"W": (1.0, "W"), "Hz": (math.inf, "Hz")}).sample
    assert list(sample_points(sample, None)) == [
        (0, "W", "W", 1.0, pb.QUALITY_GOOD),
        (1, "Hz", "Hz", None, pb.QUALITY_GOOD),
    ]
    assert list(sample_points(sample, "Hz")) == [(1, "Hz", "Hz", None, pb.QUALITY_GOOD)]
    assert list(sample_points(sample, "VA")) == []
    assert wire_enum_label(pb.ResponseStatus.DESCRIPTOR, 253, "RESPONSE_STATUS_") == (
        "REJECTED_INVALID"
    )
    assert wire_enum_label(pb.ResponseStatus.DESCRIPTOR, 999, "RESPONSE_STATUS_") == "UNKNOWN_999"


def _point(device_id: str, point: str, value: float, seq: int) -> LatestPointRow:
    return LatestPointRow("gw-1", device_id, point, value, "W", pb.QUALITY_GOOD, seq * 10, seq)


def _unpacked(packed: list[tuple[str, str, str, int, str]]) -> list[tuple[str, str, float, int]]:
    rows = [(gateway_id, device_id, points) for gateway_id, device_id, _, _, points in packed]
    return [(p.device_id, p.point, cast(float, p.value), p.seq) for p in unpack_latest_points(rows)]


def test_latest_points_merge_per_point_newest_seq_wins() -> None:
    stored = {
        (g, d): (names, max_seq, points)
        for g, d, names, max_seq, points in merge_latest_points(
            [_point("pv-1", "W", 1.0, 5), _point("pv-1", "Hz", 50.0, 5)], {}
        )
    }
    # Two batches of one group, the same device twice with another device between them; the
    # second is older for W and a replay for nothing else.
    rows = [
        _point("pv-1", "W", 2.0, 7),
        _point("bat-1", "W", 3.0, 7),
        _point("pv-1", "W", 9.0, 6),
        _point("pv-1", "VAR", 4.0, 6),
    ]
    merged = merge_latest_points(rows, stored)
    assert _unpacked(merged) == [
        ("bat-1", "W", 3.0, 7),
        ("pv-1", "Hz", 50.0, 5),
        ("pv-1", "VAR", 4.0, 6),
        ("pv-1", "W", 2.0, 7),
    ]
    assert [(d, max_seq) for _, d, _, max_seq, _ in merged] == [("bat-1", 7), ("pv-1", 7)]
    # Only bat-1 is one read; pv-1 has two, so it must be merged with what is stored.
    reads, others = pack_latest_reads(rows)
    assert [(d, seq) for _, d, _, seq, _ in reads] == [("bat-1", 7)]
    assert others == {("gw-1", "pv-1")}
    # A full read of the stored points, all newer, replaces the pack as it is.
    newer = [_point("pv-1", "W", 5.0, 8), _point("pv-1", "Hz", 49.9, 8)]
    (read,), _ = pack_latest_reads(newer)
    assert merge_latest_points(newer, stored) == [read]
    assert read[2] == stored[("gw-1", "pv-1")][0]  # same names: a conditional upsert takes it

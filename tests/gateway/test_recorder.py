"""The recorder: batched commits, and storage trouble that never stops control nor loses count."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from dergw.v1 import ns_from_timestamp, pb, timestamp_from_ns
from gateway.clock import ManualClock
from gateway.outbox import Outbox, OutboxStorageError, RecordKind
from gateway.runtime import recorder as recorder_module
from gateway.runtime.recorder import Recorder

SAMPLE = int(RecordKind.SAMPLE)
DECISION = int(RecordKind.DECISION)
GAP = int(RecordKind.GAP)
T0 = 1_700_000_000 * 10**9
S = 10**9


def sample(device: str, t_ns: int, points: int = 3) -> bytes:
    return pb.DeviceSample(
        device_id=device,
        time=timestamp_from_ns(t_ns),
        names=[f"p{i}" for i in range(points)],
        units=["W"] * points,
        values=[1.0] * points,
        quality=[pb.QUALITY_GOOD] * points,
    ).SerializeToString()


def decision(t_ns: int) -> bytes:
    return pb.Decision(time=timestamp_from_ns(t_ns), summary="d").SerializeToString()


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    with Outbox(tmp_path / "outbox.sqlite3", clock=ManualClock()) as ob:
        yield ob


def read_only(outbox: Outbox, on: bool) -> None:
    """Simulate a read-only file system: SQLite then refuses writes with SQLITE_READONLY."""
    conn = outbox._conn
    assert conn is not None
    conn.execute(f"PRAGMA query_only={int(on)}")


class FailingOutbox:
    """Stands in for the outbox: raises the queued errors, then appends to a list."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.batches: list[list[tuple[int, bytes]]] = []

    def append(self, items: Sequence[tuple[int, bytes]]) -> range:
        if self.errors:
            raise self.errors.pop(0)
        self.batches.append(list(items))
        start = 1 + sum(len(b) for b in self.batches[:-1])
        return range(start, start + len(items))


async def test_flush_commits_in_order_and_wakes_the_uplink(outbox: Outbox) -> None:
    recorder = Recorder(outbox, commit_interval_s=0.1)
    await recorder.flush()  # nothing pending: nothing written, no wake-up
    assert not recorder.committed.is_set()
    recorder.record(SAMPLE, b"a")
    recorder.record(DECISION, b"b")
    await recorder.flush()
    assert recorder.committed.is_set()
    assert recorder.last_committed_seq == 2
    assert [(r.seq, r.kind, r.payload) for r in outbox.read_after(0, 10)] == [
        (1, SAMPLE, b"a"),
        (2, DECISION, b"b"),
    ]


async def test_storage_trouble_keeps_records_and_names_the_condition(
    outbox: Outbox, caplog: pytest.LogCaptureFixture
) -> None:
    recorder = Recorder(outbox, commit_interval_s=0.1)
    read_only(outbox, True)
    recorder.record(SAMPLE, b"1")
    with caplog.at_level(logging.WARNING, logger="gateway.runtime.recorder"):
        for i in range(2, 6):
            await recorder.flush()  # never raises: control goes on
            recorder.record(SAMPLE, b"%d" % i)
        assert recorder.storage_condition == "read-only file system"
        assert recorder.pending_records == 5
        assert not recorder.committed.is_set()
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1  # once per condition change, not per retry
        assert "read-only file system" in errors[0].getMessage()
        read_only(outbox, False)
        await recorder.flush()
    assert recorder.storage_condition is None
    assert recorder.pending_records == 0
    assert recorder.committed.is_set()
    assert [r.payload for r in outbox.read_after(0, 10)] == [b"1", b"2", b"3", b"4", b"5"]
    assert recorder.dropped_records == 0
    assert any("stores telemetry again" in r.getMessage() for r in caplog.records)


async def test_each_condition_change_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    fake = FailingOutbox(
        OutboxStorageError("full", condition="disk full"),
        OutboxStorageError("full", condition="disk full"),
        OutboxStorageError("io", condition="I/O error"),
    )
    recorder = Recorder(fake, commit_interval_s=0.1)  # type: ignore[arg-type]
    recorder.record(SAMPLE, b"x")
    conditions = []
    with caplog.at_level(logging.ERROR, logger="gateway.runtime.recorder"):
        for _ in range(4):
            await recorder.flush()
            conditions.append(recorder.storage_condition)
    assert conditions == ["disk full", "disk full", "I/O error", None]
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 2
    assert fake.batches == [[(SAMPLE, b"x")]]


async def test_records_dropped_in_memory_are_reported_by_a_gap_first(
    outbox: Outbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(recorder_module, "MAX_PENDING_RECORDS", 10)
    recorder = Recorder(outbox, commit_interval_s=0.1)
    read_only(outbox, True)
    recorder.record(DECISION, decision(T0))
    await recorder.flush()  # the condition is known from here on
    for i in range(1, 25):
        recorder.record(SAMPLE, sample(f"pv{i % 2}", T0 + i * S))
        if i % 7 == 0:
            await recorder.flush()
    assert recorder.pending_records == 10
    assert recorder.dropped_records == 15
    read_only(outbox, False)
    await recorder.flush()
    rows = outbox.read_after(0, 100)
    assert [r.kind for r in rows] == [GAP] + [SAMPLE] * 10
    gap = pb.Gap.FromString(rows[0].payload)
    assert gap.what == "not stored: read-only file system"
    assert (gap.records, gap.points) == (15, 14 * 3)  # a decision and 14 samples of 3 points
    assert ns_from_timestamp(gap.first_time) == T0
    assert ns_from_timestamp(gap.last_time) == T0 + 14 * S
    assert list(gap.device_ids) == ["pv0", "pv1"]
    assert "1 decision, 14 sample" in gap.reason
    # The records kept are the newest, in order.
    times = [ns_from_timestamp(pb.DeviceSample.FromString(r.payload).time) for r in rows[1:]]
    assert times == [T0 + i * S for i in range(15, 25)]
    await recorder.flush()  # reported once
    assert outbox.stats().rows == 11


async def test_a_refused_batch_is_dropped_not_retried_forever() -> None:
    fake = FailingOutbox(ValueError("outbox: record kind 99 is not ..."))
    recorder = Recorder(fake, commit_interval_s=0.1)  # type: ignore[arg-type]
    recorder.record(SAMPLE, b"x")
    with pytest.raises(ValueError, match="kind 99"):
        await recorder.flush()
    assert recorder.dropped_records == 1
    assert recorder.pending_records == 0


async def test_run_keeps_going_through_storage_trouble(outbox: Outbox) -> None:
    recorder = Recorder(outbox, commit_interval_s=0.01)
    read_only(outbox, True)
    task = asyncio.create_task(recorder.run())
    for i in range(5):
        recorder.record(SAMPLE, b"%d" % i)
        await asyncio.sleep(0.02)
    assert not task.done()
    assert recorder.storage_condition == "read-only file system"
    read_only(outbox, False)
    await asyncio.wait_for(recorder.committed.wait(), timeout=5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [r.payload for r in outbox.read_after(0, 10)] == [b"0", b"1", b"2", b"3", b"4"]

"""The outbox's schema 2: Gap rows (seq..through_seq), acks by range, the quota and its shedding
policy, storage trouble (disk full, read-only file system, I/O error), and a model-based test
that no sequence of appends, acks, shedding and reopens loses or double-counts a record."""

from __future__ import annotations

import itertools
import os
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from pydantic import ValidationError

from dergw.v1 import ns_from_timestamp, pb, timestamp_from_ns
from gateway.clock import ManualClock
from gateway.config import OutboxConfig
from gateway.outbox import (
    MIN_QUOTA_BYTES,
    ROW_OVERHEAD_BYTES,
    AckBeyondHeadError,
    Outbox,
    OutboxRow,
    OutboxStorageError,
    RecordKind,
    storage_condition,
)
from tests.support import REQUIRE_SERVICES, require_binary

SAMPLE = int(RecordKind.SAMPLE)
GAP = int(RecordKind.GAP)
T0 = 1_700_000_000 * 10**9
S = 10**9
QUOTA = MIN_QUOTA_BYTES  # 64 KiB: small enough to fill in a test


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "outbox.sqlite3"


def sample(
    device: str,
    t_ns: int,
    values: list[float] | None = None,
    *,
    points: int = 20,
    quality: list[int] | None = None,
    boot_id: str = "boot-a",
    synced: bool = True,
) -> bytes:
    values = values if values is not None else [float(i) for i in range(points)]
    return pb.DeviceSample(
        device_id=device,
        time=timestamp_from_ns(t_ns),
        monotonic_ns=t_ns - T0 + 5 * S,
        names=[f"point_{i}" for i in range(len(values))],
        units=["W"] * len(values),
        values=values,
        quality=quality if quality is not None else [pb.QUALITY_GOOD] * len(values),
        boot_id=boot_id,
        clock_synced=synced,
    ).SerializeToString()


def record(kind: RecordKind, t_ns: int, text: str = "") -> tuple[int, bytes]:
    k = int(kind)
    ts = timestamp_from_ns(t_ns)
    if kind is RecordKind.DECISION:
        return k, pb.Decision(time=ts, summary=text).SerializeToString()
    if kind is RecordKind.REPORTED_STATE:
        return k, pb.ReportedState(time=ts, notes=[text]).SerializeToString()
    if kind is RecordKind.EVENT_RESPONSE:
        return k, pb.EventResponse(time=ts, event_id="e1", reason=text).SerializeToString()
    if kind is RecordKind.INTENT_STATUS:
        return k, pb.IntentStatus(time=ts, version=1, reason=text).SerializeToString()
    if kind is RecordKind.FLEXIBILITY:
        return k, pb.Flexibility(time=ts, up_w=1.0).SerializeToString()
    if kind is RecordKind.CLOCK_SYNC:
        return k, pb.ClockSync(time=ts, boot_id="boot-a", wall_minus_mono_ns=7).SerializeToString()
    raise AssertionError(kind)


def all_rows(ob: Outbox) -> list[OutboxRow]:
    return ob.read_after(0, 10**9)


def assert_gap_free(ob: Outbox, acked: Callable[[int], bool] = lambda seq: False) -> None:
    """Held rows never overlap and cover every seq from the oldest to the last assigned, except
    seqs the headend acknowledged (`acked`); the stats match the rows."""
    rows = all_rows(ob)
    stats = ob.stats()
    if rows:
        assert rows[0].seq == stats.oldest_seq
        for before, after in itertools.pairwise(rows):
            assert after.seq > before.through_seq, (before.seq, after.seq)
            for hole in range(before.through_seq + 1, after.seq):
                assert acked(hole), f"seq {hole} neither held nor acknowledged"
        assert rows[-1].through_seq < stats.next_seq
    assert stats.rows == len(rows)
    assert stats.held_bytes == sum(len(r.payload) + ROW_OVERHEAD_BYTES for r in rows)
    assert stats.gap_rows == sum(r.kind == GAP for r in rows)


def gaps(ob: Outbox) -> list[tuple[OutboxRow, pb.Gap]]:
    """The Gap rows held, oldest first (read directly: cheaper than every row)."""
    conn = ob._conn
    assert conn is not None
    return [
        (OutboxRow(seq, GAP, payload, created, through), pb.Gap.FromString(payload))
        for seq, payload, created, through in conn.execute(
            "SELECT seq, payload, created_wall_ns, through_seq FROM outbox WHERE kind = ? "
            "ORDER BY seq",
            (GAP,),
        )
    ]


def put_gap(path: Path, first: int, last: int, gap: pb.Gap) -> None:
    """Replace rows first..last of a closed outbox file by one Gap row (test set-up)."""
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("DELETE FROM outbox WHERE seq >= ? AND seq <= ?", (first, last))
        conn.execute(
            "INSERT INTO outbox (seq, kind, created_wall_ns, payload, through_seq) "
            "VALUES (?, ?, 0, ?, ?)",
            (first, GAP, gap.SerializeToString(), last),
        )


# -- schema 2 -----------------------------------------------------------------------------------


def test_migrates_a_version_1_file_in_place(path: Path, clock: ManualClock) -> None:
    # The version-1 layout exactly as dergw wrote it (no through_seq, no shed_records).
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute(
            "CREATE TABLE [outbox] ([seq] INTEGER PRIMARY KEY, [kind] INTEGER NOT NULL, "
            "[created_wall_ns] INTEGER NOT NULL, [payload] BLOB NOT NULL)"
        )
        conn.execute(
            "CREATE TABLE [outbox_meta] ([key] TEXT PRIMARY KEY, [value] INTEGER NOT NULL)"
        )
        conn.execute("INSERT INTO outbox_meta VALUES ('next_seq', 8), ('durable_syncs', 3)")
        conn.executemany(
            "INSERT INTO outbox VALUES (?, 2, 42, ?)", [(s, b"v1-%d" % s) for s in (5, 6, 7)]
        )
        conn.execute("PRAGMA user_version=1")
    with Outbox(path, clock=clock) as ob:
        assert [(r.seq, r.through_seq, r.payload) for r in all_rows(ob)] == [
            (5, 5, b"v1-5"),
            (6, 6, b"v1-6"),
            (7, 7, b"v1-7"),
        ]
        assert ob.append([(SAMPLE, b"new")]) == range(8, 9)
        stats = ob.stats()
        assert (stats.rows, stats.oldest_seq, stats.shed_records, stats.gap_rows) == (4, 5, 0, 0)
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
        meta = dict(conn.execute("SELECT key, value FROM outbox_meta"))
        assert meta["shed_records"] == 0
        assert meta["durable_syncs"] >= 3


def test_row_through_seq_defaults_to_seq() -> None:
    assert OutboxRow(4, SAMPLE, b"", 0).through_seq == 4
    assert OutboxRow(4, GAP, b"", 0, 9).through_seq == 9


def test_read_after_below_seq_bounds_the_backlog_lane(path: Path, clock: ManualClock) -> None:
    with Outbox(path, clock=clock) as ob:
        ob.append([(SAMPLE, b"%d" % i) for i in range(10)])
        assert [r.seq for r in ob.read_after(0, 100, below_seq=4)] == [1, 2, 3]
        assert [r.seq for r in ob.read_after(2, 100, below_seq=6)] == [3, 4, 5]
        assert [r.seq for r in ob.read_after(2, 2, below_seq=6)] == [3, 4]
        assert ob.read_after(5, 100, below_seq=6) == []
        assert [r.seq for r in ob.read_after(8, 100)] == [9, 10]


def test_a_gap_straddling_the_cursor_is_still_read(path: Path, clock: ManualClock) -> None:
    with Outbox(path, clock=clock) as ob:
        ob.append([(SAMPLE, b"%d" % i) for i in range(10)])
    put_gap(path, 3, 7, pb.Gap(what="sample", records=5))
    with Outbox(path, clock=clock) as ob:
        assert [(r.seq, r.through_seq) for r in all_rows(ob)] == [
            (1, 1),
            (2, 2),
            (3, 7),
            (8, 8),
            (9, 9),
            (10, 10),
        ]
        # The uplink had sent up to 5 before the rows were shed: the Gap must still go out.
        assert [r.seq for r in ob.read_after(5, 10)] == [3, 8, 9, 10]
        assert [r.seq for r in ob.read_after(5, 1)] == [3]
        assert [r.seq for r in ob.read_after(7, 10)] == [8, 9, 10]
        assert [r.seq for r in ob.read_after(5, 10, below_seq=3)] == []
        assert [r.seq for r in ob.read_after(5, 10, below_seq=9)] == [3, 8]
        assert ob.stats().gap_rows == 1


# -- ack by ranges --------------------------------------------------------------------------------


def test_ack_ranges_delete_rows_wholly_inside(path: Path, clock: ManualClock) -> None:
    with Outbox(path, clock=clock) as ob:
        ob.append([(SAMPLE, b"%d" % i) for i in range(20)])
        assert ob.ack(3, [(10, 12), (15, 15)]) == 7
        assert [r.seq for r in all_rows(ob)] == [4, 5, 6, 7, 8, 9, 13, 14, 16, 17, 18, 19, 20]
        assert ob.ack(3, [(10, 12)]) == 0  # repeated
        assert ob.ack(9) == 6  # the watermark catches up past the ranges
        assert ob.stats().oldest_seq == 13
        assert ob.stats().payload_bytes == sum(len(r.payload) for r in all_rows(ob))


def test_ack_beyond_head_in_a_range_deletes_nothing(path: Path, clock: ManualClock) -> None:
    with Outbox(path, clock=clock) as ob:
        ob.append([(SAMPLE, b"x")] * 5)
        with pytest.raises(AckBeyondHeadError, match="up to seq 6"):
            ob.ack(2, [(4, 6)])
        assert ob.stats().rows == 5
        with pytest.raises(ValueError, match="first <= last"):
            ob.ack(0, [(4, 3)])
        with pytest.raises(ValueError, match="first <= last"):
            ob.ack(0, [(-1, 3)])
        assert ob.stats().rows == 5


def test_ack_trims_a_gap_it_covers_only_in_part(path: Path, clock: ManualClock) -> None:
    with Outbox(path, clock=clock) as ob:
        ob.append([(SAMPLE, b"%d" % i) for i in range(30)])
    gap = pb.Gap(what="sample", records=11, reason="quota")
    put_gap(path, 5, 15, gap)
    put_gap(path, 20, 25, gap)
    with Outbox(path, clock=clock) as ob:
        # The watermark reaches into the first Gap: it keeps its payload, starts after the ack.
        assert ob.ack(7) == 4
        # A range covering the second Gap's tail trims its through_seq; one strictly inside the
        # first Gap changes nothing.
        assert ob.ack(0, [(23, 26), (9, 10)]) == 1
        spans = [(r.seq, r.through_seq) for r, _ in gaps(ob)]
        assert spans == [(8, 15), (20, 22)]
        assert all(g == gap for _, g in gaps(ob))  # over-reporting the loss is the safe side
        # A range covering a Gap's head moves its seq.
        assert ob.ack(0, [(18, 20)]) == 2
        assert [(r.seq, r.through_seq) for r, _ in gaps(ob)] == [(8, 15), (21, 22)]
        assert_gap_free(ob, acked=lambda seq: seq in (16, 17, 18, 19, 20, 23, 24, 25, 26))
        assert ob.ack(22) > 0
        assert ob.stats().gap_rows == 0
        assert_gap_free(ob, acked=lambda seq: seq in (23, 24, 25, 26))


# -- quota ----------------------------------------------------------------------------------------


def test_quota_below_the_minimum_is_refused(path: Path, clock: ManualClock) -> None:
    with pytest.raises(ValueError, match="at least 65536"):
        Outbox(path, clock=clock, quota_bytes=MIN_QUOTA_BYTES - 1)


def test_nothing_is_shed_below_the_quota(path: Path, clock: ManualClock) -> None:
    with Outbox(path, clock=clock, quota_bytes=QUOTA) as ob:
        items = [(SAMPLE, sample("pv1", T0 + i * S)) for i in range(60)]
        ob.append(items)
        stats = ob.stats()
        assert stats.quota_bytes == QUOTA
        assert stats.held_bytes == sum(len(p) + ROW_OVERHEAD_BYTES for _, p in items) < QUOTA
        assert (stats.shed_records, stats.gap_rows, stats.rows) == (0, 0, 60)
        assert [r.payload for r in all_rows(ob)] == [p for _, p in items]


def test_thinning_raw_samples_to_aggregates(path: Path, clock: ManualClock) -> None:
    """The oldest run of raw samples becomes one aggregate per device plus one Gap row."""
    bad = pb.QUALITY_BAD_COMM
    with Outbox(path, clock=clock, quota_bytes=QUOTA) as ob:
        # The oldest run: pv1 reads 0..9 (point 1 fails on odd reads, point 2 always fails),
        # interleaved with bat1 reads; then a decision ends the run.
        run: list[tuple[int, bytes]] = []
        for i in range(10):
            quality = [pb.QUALITY_GOOD, bad if i % 2 else pb.QUALITY_GOOD, bad]
            values = [float(i), 100.0 + i if i % 2 == 0 else float("nan"), float("nan")]
            run.append((SAMPLE, sample("pv1", T0 + i * S, values, quality=quality)))
            run.append((SAMPLE, sample("bat1", T0 + i * S, [50.0, 1.0, 2.0])))
        run_bytes = sum(len(p) for _, p in run)
        ob.append([*run, record(RecordKind.DECISION, T0 + 10 * S, "keep me")])
        # Fill with newer raw samples until the quota forces shedding.
        t = T0 + 11 * S
        while ob.stats().shed_records == 0:
            ob.append([(SAMPLE, sample("pv1", t, points=40))])
            t += S
        rows = all_rows(ob)
        assert [r.seq for r in rows[:3]] == [1, 2, 3]
        pv, bat = (pb.DeviceSample.FromString(r.payload) for r in rows[:2])
        assert (pv.device_id, bat.device_id) == ("pv1", "bat1")
        assert (pv.aggregated_reads, bat.aggregated_reads) == (10, 10)
        assert ns_from_timestamp(pv.window_start) == T0
        assert ns_from_timestamp(pv.time) == T0 + 9 * S
        assert list(pv.values[:2]) == [4.5, 104.0]  # means of the GOOD reads only
        assert list(pv.min_values[:2]) == [0.0, 100.0]
        assert list(pv.max_values[:2]) == [9.0, 108.0]
        assert list(pv.quality) == [pb.QUALITY_GOOD, pb.QUALITY_GOOD, bad]
        assert pv.values[2] != pv.values[2]  # NaN: never read well
        assert (pv.boot_id, pv.clock_synced) == ("boot-a", True)
        assert list(pv.names) == ["point_0", "point_1", "point_2"]
        assert list(bat.values) == [50.0, 1.0, 2.0]
        gap_row = rows[2]
        assert (gap_row.kind, gap_row.seq, gap_row.through_seq) == (GAP, 3, 20)
        gap = pb.Gap.FromString(gap_row.payload)
        assert gap.what == "sample thinned to aggregates"
        assert (gap.records, gap.points, gap.bytes) == (20, 60, run_bytes)
        assert ns_from_timestamp(gap.first_time) == T0
        assert ns_from_timestamp(gap.last_time) == T0 + 9 * S
        assert list(gap.device_ids) == ["bat1", "pv1"]
        assert gap.reason == f"outbox quota {QUOTA} bytes reached"
        assert pb.Decision.FromString(rows[3].payload).summary == "keep me"
        assert_gap_free(ob)
        stats = ob.stats()
        assert stats.held_bytes <= QUOTA
        assert stats.shed_records == sum(g.records for _, g in gaps(ob))


def test_aggregates_keep_boots_and_clock_states_apart(path: Path, clock: ManualClock) -> None:
    with Outbox(path, clock=clock, quota_bytes=QUOTA) as ob:
        items = [(SAMPLE, sample("pv1", T0 + i * S, [1.0], synced=False)) for i in range(5)]
        items += [(SAMPLE, sample("pv1", T0 + i * S, [2.0], boot_id="boot-b")) for i in range(5)]
        ob.append(items)
        t = T0 + 100 * S
        while ob.stats().shed_records == 0:
            # Newer runs thin well too, so step 1 is all the quota needs.
            ob.append(
                [record(RecordKind.DECISION, t)] + [(SAMPLE, sample("pv1", t, points=30))] * 5
            )
            t += S
        first, second, gap = all_rows(ob)[:3]
        a, b = pb.DeviceSample.FromString(first.payload), pb.DeviceSample.FromString(second.payload)
        assert (a.boot_id, a.clock_synced, a.aggregated_reads, list(a.values)) == (
            "boot-a",
            False,
            5,
            [1.0],
        )
        assert (b.boot_id, b.clock_synced, b.aggregated_reads, list(b.values)) == (
            "boot-b",
            True,
            5,
            [2.0],
        )
        assert (gap.kind, gap.seq, gap.through_seq) == (GAP, 3, 10)


def _fill(ob: Outbox, t: int, rounds: int) -> int:
    """A gateway's mix: 4 devices per second, a reported state every 5 s, a decision every
    20 s, an event response every 50 s."""
    for _ in range(rounds):
        items = [(SAMPLE, sample(f"dev{d}", t)) for d in range(4)]
        second = (t - T0) // S
        if second % 5 == 0:
            items.append(record(RecordKind.REPORTED_STATE, t))
        if second % 20 == 0:
            items.append(record(RecordKind.DECISION, t))
        if second % 50 == 0:
            items.append(record(RecordKind.EVENT_RESPONSE, t))
        ob.append(items)
        assert ob.stats().held_bytes <= QUOTA
        t += S
    return t


def _kinds(ob: Outbox) -> dict[str, int]:
    found: dict[str, int] = {}
    for row in all_rows(ob):
        name = RecordKind(row.kind).name
        if row.kind == SAMPLE and pb.DeviceSample.FromString(row.payload).aggregated_reads:
            name = "AGGREGATE"
        found[name] = found.get(name, 0) + 1
    return found


def _aggregated(row: OutboxRow) -> bool:
    return row.kind == SAMPLE and pb.DeviceSample.FromString(row.payload).aggregated_reads > 0


def test_shedding_policy_order(path: Path, clock: ManualClock) -> None:
    """Each step starts only when the one before has nothing left among the older rows."""
    step_2 = {"sample", "sample aggregates", "reported_state", "flexibility"}
    with Outbox(path, clock=clock, quota_bytes=QUOTA) as ob:
        t = T0
        seen: set[str] = set()
        began: list[str] = []
        for _ in range(5000):
            before = ob.stats()
            start = before.next_seq
            t = _fill(ob, t, 1)
            if ob.stats().shed_records == before.shed_records:
                continue  # nothing shed by this append
            whats = {part for _, g in gaps(ob) for part in g.what.split(", ")}
            new, seen = whats - seen, seen | whats
            if not new:
                continue
            older = [r for r in all_rows(ob) if r.seq < start]
            if "sample thinned to aggregates" in new:
                began.append("thin")
            if new & step_2 and "drop 2" not in began:
                began.append("drop 2")
                assert not any(r.kind == SAMPLE and not _aggregated(r) for r in older)
            if "decision" in new:
                began.append("drop 3")
                assert not any(r.kind == SAMPLE for r in older)
                assert not any(r.kind == int(RecordKind.REPORTED_STATE) for r in older)
                break
            assert "event_response" not in new
        # (Event responses go only after every decision: test_event_responses_are_shed_last.)
        assert began == ["thin", "drop 2", "drop 3"]
        assert _kinds(ob)["EVENT_RESPONSE"] == ((t - T0) // S - 1) // 50 + 1
        stats = ob.stats()
        assert stats.held_bytes <= QUOTA
        assert_gap_free(ob)
        # Every record ever appended is held as itself or counted in exactly one Gap.
        held = sum(1 for r in all_rows(ob) if r.kind != GAP and not _aggregated(r))
        assert held + stats.shed_records == stats.next_seq - 1
        assert stats.shed_records == sum(g.records for _, g in gaps(ob))


def test_event_responses_are_shed_last(path: Path, clock: ManualClock) -> None:
    with Outbox(path, clock=clock, quota_bytes=QUOTA) as ob:
        ob.append([record(RecordKind.EVENT_RESPONSE, T0, "oldest response")])
        ob.append([record(RecordKind.DECISION, T0 + S, "x" * 400) for _ in range(40)])
        ob.append([record(RecordKind.EVENT_RESPONSE, T0 + 2 * S, "y" * 400) for _ in range(40)])
        ob.append([record(RecordKind.DECISION, T0 + 3 * S, "z" * 400) for _ in range(60)])
        kinds = _kinds(ob)
        # The decisions (all of them, oldest first) went before any event response did.
        assert kinds["EVENT_RESPONSE"] == 41
        assert kinds["DECISION"] < 100
        rows = all_rows(ob)
        assert pb.EventResponse.FromString(rows[0].payload).reason == "oldest response"
        assert ob.stats().held_bytes <= QUOTA
        assert_gap_free(ob)


def test_shedding_runs_in_chunks_not_per_append(path: Path, clock: ManualClock) -> None:
    with Outbox(path, clock=clock, quota_bytes=QUOTA) as ob:
        t = T0
        sheds = 0
        shed_before = 0
        for _ in range(400):
            ob.append([(SAMPLE, sample("pv1", t)), (SAMPLE, sample("pv2", t))])
            t += S
            stats = ob.stats()
            if stats.shed_records != shed_before:
                sheds += 1
                shed_before = stats.shed_records
                # After shedding there is room for 5 % of the quota before the next round.
                assert stats.held_bytes <= QUOTA * 0.95 + 2 * (len(sample("pv1", t)) + 64)
        assert 0 < sheds < 400 / 5


def test_a_batch_larger_than_the_quota_is_shed_itself(path: Path, clock: ManualClock) -> None:
    with Outbox(path, clock=clock, quota_bytes=QUOTA) as ob:
        ob.append([record(RecordKind.EVENT_RESPONSE, T0, "held")])
        batch = [(SAMPLE, sample(f"dev{i % 3}", T0 + i * S)) for i in range(600)]
        batch += [record(RecordKind.INTENT_STATUS, T0 + 700 * S, "i" * 3000) for _ in range(30)]
        got = ob.append(batch)  # never raises for the quota
        assert got == range(2, 2 + len(batch))
        stats = ob.stats()
        assert stats.held_bytes <= QUOTA
        assert stats.next_seq == 2 + len(batch)
        assert_gap_free(ob)
        assert stats.shed_records == sum(g.records for _, g in gaps(ob))
        assert stats.shed_records > 500


def test_gaps_merge_and_everything_fits_when_all_is_shed(path: Path, clock: ManualClock) -> None:
    with Outbox(path, clock=clock, quota_bytes=QUOTA) as ob:
        for i in range(40):
            ob.append([record(RecordKind.CLOCK_SYNC, T0 + i * S)] * 50)
            assert ob.stats().held_bytes <= QUOTA
        assert ob.stats().gap_rows < 40
        assert_gap_free(ob)


def test_shed_counts_survive_reopen(path: Path, clock: ManualClock) -> None:
    with Outbox(path, clock=clock, quota_bytes=QUOTA) as ob:
        _fill(ob, T0, 200)
        before = ob.stats()
        assert before.shed_records > 0
    with Outbox(path, clock=clock, quota_bytes=QUOTA) as ob:
        after = ob.stats()
        assert (after.shed_records, after.gap_rows, after.held_bytes) == (
            before.shed_records,
            before.gap_rows,
            before.held_bytes,
        )
        _fill(ob, T0 + 1000 * S, 100)  # shedding resumes after a restart
        assert ob.stats().shed_records > before.shed_records
        assert_gap_free(ob)
    with Outbox(path, clock=clock) as ob:  # the quota removed: nothing more is shed
        stats = ob.stats()
        _fill(ob, T0 + 2000 * S, 0)
        assert ob.stats().quota_bytes is None
        assert ob.stats().shed_records == stats.shed_records


# -- storage trouble ------------------------------------------------------------------------------


def test_disk_full_simulated_with_max_page_count(path: Path, clock: ManualClock) -> None:
    """Simulated: PRAGMA max_page_count makes SQLite answer SQLITE_FULL exactly as a full disk
    does. (A real full file system: test_real_disk_full_and_read_only_file_system.)"""
    with Outbox(path, clock=clock) as ob:
        ob.append([(SAMPLE, b"before")])
        conn = ob._conn
        assert conn is not None
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count={pages}")
        before = ob.stats()
        with pytest.raises(OutboxStorageError, match="disk full") as caught:
            ob.append([(SAMPLE, b"x" * 2000)] * 50)
        assert caught.value.condition == "disk full"
        assert "quota_bytes" in str(caught.value)  # says what to do
        assert ob.stats() == before  # nothing half-written
        conn.execute("PRAGMA max_page_count=1073741823")
        assert ob.append([(SAMPLE, b"after")]) == range(2, 3)  # no seq was burnt
        assert [r.payload for r in all_rows(ob)] == [b"before", b"after"]


def test_read_only_simulated_with_query_only(path: Path, clock: ManualClock) -> None:
    """Simulated: PRAGMA query_only makes SQLite refuse writes with SQLITE_READONLY, the code a
    read-only file or file system gives. (A real read-only mount: the test below.)"""
    with Outbox(path, clock=clock) as ob:
        ob.append([(SAMPLE, b"a")])
        conn = ob._conn
        assert conn is not None
        conn.execute("PRAGMA query_only=1")
        with pytest.raises(OutboxStorageError) as caught:
            ob.append([(SAMPLE, b"b")])
        assert caught.value.condition == "read-only file system"
        assert "dmesg" in str(caught.value)
        with pytest.raises(OutboxStorageError):
            ob.ack(1)
        conn.execute("PRAGMA query_only=0")
        assert ob.append([(SAMPLE, b"b")]) == range(2, 3)
        assert ob.ack(2) == 2


def test_io_errors_are_named(tmp_path: Path) -> None:
    # SQLite reports a failed write() as SQLITE_IOERR_WRITE (extended code 778); the outbox then
    # asks the file system whether it is read-only or full, and otherwise names an I/O error.
    exc = sqlite3.OperationalError("disk I/O error")
    exc.sqlite_errorcode = 778  # type: ignore[attr-defined]
    assert storage_condition(exc, tmp_path / "outbox.sqlite3") == "I/O error"
    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorcode = 13  # type: ignore[attr-defined]
    assert storage_condition(full, tmp_path / "x") == "disk full"
    assert storage_condition(OSError(30, "Read-only file system"), tmp_path / "x") == (
        "read-only file system"
    )
    other = sqlite3.OperationalError("no such table: x")
    other.sqlite_errorcode = 1  # type: ignore[attr-defined]
    assert storage_condition(other, tmp_path / "x") is None


_REAL_STORAGE_CHILD = textwrap.dedent(
    """
    import os, subprocess, sys
    from pathlib import Path
    from gateway.clock import SystemClock
    from gateway.outbox import Outbox, OutboxStorageError

    mount = Path(sys.argv[1])
    path = mount / "outbox.sqlite3"
    filler = mount / "filler"
    ob = Outbox(path, clock=SystemClock())
    payload = os.urandom(1500)
    appended = 0
    try:
        while True:
            ob.append([(2, payload)] * 20)
            appended += 20
    except OutboxStorageError as exc:
        assert exc.condition == "disk full", exc
        print("full", appended, flush=True)
    stats = ob.stats()
    assert stats.rows == appended and stats.next_seq == appended + 1, stats
    rows = ob.read_after(0, 50)  # shipping still works: the fsync falls back to the files
    assert len(rows) == 50
    # Free space (here: what else filled the disk), then the outbox accepts again.
    filler.unlink()
    got = ob.append([(2, b"after")])
    assert got.start == appended + 1, got
    ob.ack(got.start)
    ob.close()
    print("recovered", flush=True)
    subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
    try:
        Outbox(path, clock=SystemClock())
    except OutboxStorageError as exc:
        assert exc.condition == "read-only file system", exc
        print("read-only", flush=True)
    """
)


def test_real_disk_full_and_read_only_file_system(tmp_path: Path) -> None:
    """Real: a 2 MiB tmpfs in a private mount namespace (`unshare`), filled to the last block,
    then remounted read-only. Skips where mount namespaces are not available."""
    unshare = require_binary("unshare", "a private tmpfs to fill and remount read-only")
    mount = tmp_path / "mnt"
    mount.mkdir()
    script = tmp_path / "child.py"
    script.write_text(_REAL_STORAGE_CHILD)
    # The filler takes most of the space so that the outbox runs out quickly.
    shell = (
        f"mount -t tmpfs -o size=2m tmpfs {mount} && "
        f"head -c 1200000 /dev/zero > {mount}/filler && "
        f"exec {sys.executable} {script} {mount}"
    )
    args = [unshare, "-m", "sh", "-c", shell]
    if os.geteuid() != 0:
        args = [unshare, "-rm", "sh", "-c", shell]
    probe = subprocess.run(
        [*args[:-1], "mount -t tmpfs tmpfs " + str(mount)], capture_output=True, check=False
    )
    if probe.returncode != 0:
        message = f"cannot mount a private tmpfs here: {probe.stderr.decode().strip()}"
        if REQUIRE_SERVICES:
            pytest.fail(f"{message}; DERGW_REQUIRE_SERVICES=1 makes this a failure")
        pytest.skip(message)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env, check=False)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split()
    assert lines[0] == "full"
    assert int(lines[1]) > 0
    assert lines[2:] == ["recovered", "read-only"]


# -- model-based: appends, acks, shedding and reopens never lose or double-count a record ---------


class QuotaMachine(RuleBasedStateMachine):
    """Outbox with a quota vs. a model of every record appended.

    Each appended record is, at every moment, exactly one of: acked (deleted by an ack covering
    its seq while it was held as itself), held as itself, or shed. Shedding happens only inside
    an append that would exceed the quota, and each shed record is counted by exactly one Gap:
    the sum of Gap.records over held Gap rows grows by exactly the number of records shed.
    """

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.TemporaryDirectory()
        self.path = Path(self.dir.name) / "outbox.sqlite3"
        self.clock = ManualClock()
        self.ob = Outbox(self.path, clock=self.clock, quota_bytes=QUOTA)
        self.held: dict[int, tuple[int, bytes]] = {}  # originals held as themselves
        self.next_seq = 1
        self.t = T0
        self.shed_total = 0
        self.acked: list[tuple[int, int]] = []  # every span the headend acknowledged

    def _rows(self) -> dict[int, OutboxRow]:
        return {r.seq: r for r in all_rows(self.ob)}

    def _gap_sum(self) -> int:
        return sum(g.records for _, g in gaps(self.ob))

    @rule(
        spec=st.lists(
            st.tuples(
                st.sampled_from(
                    [
                        RecordKind.SAMPLE,
                        RecordKind.SAMPLE,
                        RecordKind.SAMPLE,
                        RecordKind.REPORTED_STATE,
                        RecordKind.DECISION,
                        RecordKind.EVENT_RESPONSE,
                        RecordKind.CLOCK_SYNC,
                    ]
                ),
                st.integers(0, 2),
                st.integers(0, 3),
            ),
            min_size=1,
            max_size=60,
        )
    )
    def append(self, spec: list[tuple[RecordKind, int, int]]) -> None:
        self._append(spec)

    @rule(
        samples=st.integers(20, 250),
        devices=st.integers(1, 3),
        every=st.sampled_from([0, 5, 40]),
        kind=st.sampled_from([RecordKind.REPORTED_STATE, RecordKind.DECISION]),
    )
    def flood(self, samples: int, devices: int, every: int, kind: RecordKind) -> None:
        """A long outage's worth: runs of samples, a record of `kind` every `every` samples."""
        spec: list[tuple[RecordKind, int, int]] = []
        for i in range(samples):
            spec.append((RecordKind.SAMPLE, i % devices, i % 4))
            if every and i % every == every - 1:
                spec.append((kind, 0, 1))
        self._append(spec)

    def _append(self, spec: list[tuple[RecordKind, int, int]]) -> None:
        items: list[tuple[int, bytes]] = []
        for kind, device, variant in spec:
            self.t += S
            if kind is RecordKind.SAMPLE:
                quality = [pb.QUALITY_GOOD] * 19 + [
                    pb.QUALITY_BAD_COMM if variant == 0 else pb.QUALITY_GOOD
                ]
                values = [float(self.t // S % 1000 + i) for i in range(20)]
                items.append((SAMPLE, sample(f"dev{device}", self.t, values, quality=quality)))
            else:
                items.append(record(kind, self.t, "r" * (100 * variant)))
        gap_sum = self._gap_sum()
        got = self.ob.append(items)
        assert got == range(self.next_seq, self.next_seq + len(items))
        for seq, item in zip(got, items, strict=True):
            self.held[seq] = item
        self.next_seq += len(items)
        rows = self._rows()
        vanished = []
        for seq, (_, payload) in list(self.held.items()):
            row = rows.get(seq)
            if row is None or row.through_seq != seq or row.payload != payload:
                vanished.append(seq)
                del self.held[seq]
                covering = [r for r in rows.values() if r.seq <= seq <= r.through_seq]
                assert len(covering) == 1, f"seq {seq} not covered exactly once"
                cover = covering[0]
                assert cover.kind == GAP or (
                    cover.kind == SAMPLE
                    and pb.DeviceSample.FromString(cover.payload).aggregated_reads > 0
                ), f"seq {seq} replaced by something that does not account for it"
        assert self._gap_sum() - gap_sum == len(vanished)
        if vanished:
            event("an append shed records")
        if len(vanished) >= len(items):
            event("an append shed at least as many records as it brought")
        self.shed_total += len(vanished)
        assert self.ob.stats().held_bytes <= QUOTA

    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        top = self.next_seq - 1
        up_to = data.draw(st.integers(0, top))
        ranges = data.draw(
            st.lists(
                st.tuples(st.integers(0, top), st.integers(0, 10)).map(
                    lambda r: (r[0], min(top, r[0] + r[1]))
                ),
                max_size=3,
            )
        )
        self.ob.ack(up_to, ranges)
        self.acked += [(0, up_to), *ranges]
        for seq in list(self.held):
            if seq <= up_to or any(lo <= seq <= hi for lo, hi in ranges):
                del self.held[seq]

    @rule()
    def reopen(self) -> None:
        self.ob.close()
        self.ob = Outbox(self.path, clock=self.clock, quota_bytes=QUOTA)

    @invariant()
    def consistent(self) -> None:
        rows = self._rows()
        # Nothing un-shed and un-acked is ever missing, nor changed.
        for seq, (kind, payload) in self.held.items():
            row = rows.get(seq)
            assert row is not None, f"seq {seq} lost"
            assert (row.kind, row.payload, row.through_seq) == (kind, payload, seq)
        assert_gap_free(self.ob, lambda seq: any(lo <= seq <= hi for lo, hi in self.acked))
        stats = self.ob.stats()
        assert stats.next_seq == self.next_seq
        assert stats.shed_records == self.shed_total
        assert stats.held_bytes <= QUOTA

    def teardown(self) -> None:
        self.ob.close()
        self.dir.cleanup()


TestQuotaModel = QuotaMachine.TestCase
TestQuotaModel.settings = settings(
    max_examples=40,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def test_config_refuses_a_quota_below_the_minimum() -> None:
    assert OutboxConfig(quota_bytes=MIN_QUOTA_BYTES).quota_bytes == MIN_QUOTA_BYTES
    with pytest.raises(ValidationError, match="at least 65536 bytes"):
        OutboxConfig(quota_bytes=MIN_QUOTA_BYTES - 1)

"""SqliteStore on a real file: migrations, dedupe, ordering guards, transactions, presence,
and group commit (many gateways' batches in one transaction, each caller its own answer).

The group-commit scenarios take any `Store`; test_pg_store runs them against PostgreSQL too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import pytest

from dergw.v1 import pb
from headend_min.ingest import plan_telemetry, registration_from_pb
from headend_min.intents import InvalidIntentError
from headend_min.model import CommitResult, HistoryQuery, IntentBasis, StreamRef, TelemetryRows
from headend_min.seqranges import SeqRanges, absorb
from headend_min.sqlite_schema import MIGRATIONS
from headend_min.sqlite_store import SqliteStore
from headend_min.store import SchemaTooNewError, Store, StoreError, UnknownSiteError
from tests.headend.fake_gateway import FakeGateway, device, sample_record, site

NOW = 1_700_000_000 * 10**9


def _fake() -> FakeGateway:
    return FakeGateway("unused:0", gateway_id="gw-1", site=site("site-1"), devices=[device("pv-1")])


async def _registered(path: Path) -> tuple[SqliteStore, FakeGateway, StreamRef]:
    store = await SqliteStore.open(path)
    fake = _fake()
    stream = StreamRef("gw-1", "stream-a")
    await store.register_gateway(
        registration_from_pb(fake.register_message().register), stream, NOW
    )
    return store, fake, stream


async def test_schema_is_migrated_once(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "h.sqlite3"
    store = await SqliteStore.open(path)
    assert await store.schema_version() == MIGRATIONS[-1].version
    await store.close()
    store = await SqliteStore.open(path)  # reopening applies nothing twice
    await store.close()
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT version FROM schema_migrations").fetchall()
        assert rows == [(m.version,) for m in MIGRATIONS]
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        db.execute("INSERT INTO schema_migrations VALUES (99, 'from the future', 0)")
    with pytest.raises(SchemaTooNewError, match="99"):
        await SqliteStore.open(path)


async def test_commit_dedupes_and_never_rolls_latest_back(tmp_path: Path) -> None:
    store, fake, _ = await _registered(tmp_path / "h.sqlite3")
    try:
        early = fake.batch([sample_record("pv-1", {"W": (float(i), "W")}) for i in range(1, 4)])
        late = fake.batch([sample_record("pv-1", {"W": (9.0, "W")})])
        # The live lane runs ahead: seq 4 is committed, but the watermark waits for 1..3.
        assert await store.commit_telemetry(plan_telemetry(late, "gw-1"), NOW) == CommitResult(
            0, ((4, 4),)
        )
        # The earlier batch arrives after (e.g. resent after a reconnect): stored, but it must
        # not replace the newer latest value; and a replay of it changes nothing.
        for _ in range(2):
            assert await store.commit_telemetry(plan_telemetry(early, "gw-1"), NOW) == CommitResult(
                4, ()
            )
        latest = await store.latest_points(site_id="site-1", device_id="pv-1")
        assert [(p.point, p.value, p.seq) for p in latest] == [("W", 9.0, 4)]
        page = await store.point_history(HistoryQuery("site-1", "pv-1", "W", None, None, 100))
        assert sorted(p.seq for p in page.points) == [1, 2, 3, 4]
        assert page.next_cursor is None
    finally:
        await store.close()


async def test_failed_composer_leaves_nothing(tmp_path: Path) -> None:
    store, _, _ = await _registered(tmp_path / "h.sqlite3")
    try:

        def refuse(basis: IntentBasis) -> pb.IntentDocument:
            assert basis.device_ids == frozenset({"pv-1"})
            raise InvalidIntentError("no")

        with pytest.raises(InvalidIntentError):
            await store.append_intent("site-1", refuse, NOW)

        def first(basis: IntentBasis) -> pb.IntentDocument:
            assert basis.previous is None
            return pb.IntentDocument(site_id="site-1", version=basis.next_version)

        stored = await store.append_intent("site-1", first, NOW)
        assert stored.version == 1  # the refused attempt consumed no version
        assert stored.issued_at_ns == NOW
        with pytest.raises(UnknownSiteError):
            await store.append_intent("site-x", first, NOW)
    finally:
        await store.close()


async def test_presence_follows_the_current_stream(tmp_path: Path) -> None:
    store, fake, old = await _registered(tmp_path / "h.sqlite3")
    try:
        new = StreamRef("gw-1", "stream-b")
        registration = registration_from_pb(fake.register_message().register)
        await store.register_gateway(registration, new, NOW + 1)
        await store.touch_streams([old], NOW + 5)  # the replaced stream refreshes nothing
        gateway = await store.get_gateway("gw-1")
        assert gateway is not None
        assert gateway.last_seen_ns == NOW + 1
        await store.close_stream(old, NOW + 6)  # ...and closing it leaves the new one open
        gateway = await store.get_gateway("gw-1")
        assert gateway is not None
        assert gateway.stream_open
        await store.touch_streams([new], NOW + 7)
        await store.close_stream(new, NOW + 8)
        gateway = await store.get_gateway("gw-1")
        assert gateway is not None
        assert (gateway.stream_open, gateway.last_seen_ns) == (False, NOW + 8)
    finally:
        await store.close()


async def test_reregistration_replaces_inventory(tmp_path: Path) -> None:
    store, fake, stream = await _registered(tmp_path / "h.sqlite3")
    try:
        fake.devices = [device("pv-2"), device("bat-1", pb.DEVICE_KIND_BATTERY)]
        registration = registration_from_pb(fake.register_message().register)
        await store.register_gateway(registration, stream, NOW)
        devices = await store.list_devices("site-1")
        assert [d.device.device_id for d in devices] == ["bat-1", "pv-2"]
    finally:
        await store.close()


async def test_closed_store_refuses_work(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "h.sqlite3")
    await store.close()
    await store.close()  # idempotent

    with pytest.raises(StoreError, match="closed"):
        await store.list_sites()


# -- group commit (scenarios shared with test_pg_store) -----------------------------------------


async def register_fleet(store: Store, count: int) -> list[FakeGateway]:
    """`count` registered gateways (gw-000...), four to a site, one device pv-1 each."""
    fakes = [
        FakeGateway(
            "unused:0",
            gateway_id=f"gw-{i:03d}",
            site=site(f"site-{i // 4}"),
            devices=[device("pv-1")],
        )
        for i in range(count)
    ]
    for fake in fakes:
        await store.register_gateway(
            registration_from_pb(fake.register_message().register),
            StreamRef(fake.gateway_id, "s"),
            NOW,
        )
    return fakes


def _one_sample(fake: FakeGateway, value: float) -> TelemetryRows:
    return plan_telemetry(
        fake.batch([sample_record("pv-1", {"W": (value, "W")}, time_ns=NOW)]), fake.gateway_id
    )


async def many_gateways_commit_at_once(store: Store) -> None:
    """Every batch of 40 gateways in flight at once: each caller gets its own gateway's answer,
    as of its own batch, and everything is stored."""
    fakes = await register_fleet(store, 40)
    rounds = 5
    planned = [[_one_sample(fake, float(k)) for fake in fakes] for k in range(rounds)]
    results = await asyncio.gather(
        *(store.commit_telemetry(rows, NOW + k) for k in range(rounds) for rows in planned[k])
    )
    assert results == [CommitResult(k + 1, ()) for k in range(rounds) for _ in fakes]
    gateways = await store.list_gateways()
    assert {(g.gateway_id, g.committed_seq) for g in gateways} == {
        (fake.gateway_id, rounds) for fake in fakes
    }
    assert {g.last_seen_ns for g in gateways} == {NOW + rounds - 1}
    latest = await store.latest_points(site_id="site-3", device_id="pv-1")
    assert [(p.value, p.seq) for p in latest] == [(float(rounds - 1), rounds)] * 4
    page = await store.point_history(HistoryQuery("site-0", "pv-1", "W", None, None, 100))
    assert len(page.points) == 4 * rounds


async def one_gateways_commits_stay_ordered(store: Store) -> None:
    """Batches of one gateway in flight together (out of seq order, as two lanes send them) get
    the answers committing them one after another in call order gives."""
    (fake,) = await register_fleet(store, 1)
    batches = [_one_sample(fake, float(i)) for i in range(12)]
    order = [3, 0, 1, 7, 2, 11, 4, 5, 6, 10, 9, 8]
    results = await asyncio.gather(*(store.commit_telemetry(batches[i], NOW) for i in order))
    expected: list[CommitResult] = []
    watermark, ranges = 0, cast(SeqRanges, ())
    for i in order:
        watermark, ranges = absorb(watermark, ranges, [(i + 1, i + 1)])
        expected.append(CommitResult(watermark, ranges))
    assert results == expected
    assert expected[-1] == CommitResult(12, ())
    latest = await store.latest_points(site_id="site-0", device_id="pv-1")
    assert [(p.value, p.seq) for p in latest] == [(11.0, 12)]


async def a_resend_in_the_same_group_is_stored_once(store: Store) -> None:
    """A batch and its resend (e.g. over a second stream) in flight together: both answered,
    its records stored once."""
    fakes = await register_fleet(store, 3)
    first = [_one_sample(fake, 1.0) for fake in fakes]
    second = _one_sample(fakes[1], 2.0)
    batches = [first[0], first[1], first[2], second, first[1], second, first[1]]
    results = await asyncio.gather(*(store.commit_telemetry(rows, NOW) for rows in batches))
    assert [r.committed_seq for r in results] == [1, 1, 1, 2, 2, 2, 2]
    page = await store.point_history(HistoryQuery("site-0", "pv-1", "W", None, None, 100))
    assert sorted((p.gateway_id, p.seq) for p in page.points) == [
        ("gw-000", 1),
        ("gw-001", 1),
        ("gw-001", 2),
        ("gw-002", 1),
    ]


async def partial_reads_keep_the_other_points(store: Store) -> None:
    """Latest values are packed per device but merged per point: a read of some points (a DNP3
    event poll) keeps the others, and a late or replayed older batch rolls no point back, also
    when the batches go in one group."""
    (fake,) = await register_fleet(store, 1)

    def read(points: dict[str, float]) -> TelemetryRows:
        record = sample_record("pv-1", {name: (value, "u") for name, value in points.items()})
        return plan_telemetry(fake.batch([record]), fake.gateway_id)

    async def latest() -> list[tuple[str, float | None, int]]:
        points = await store.latest_points(site_id="site-0", device_id="pv-1")
        return [(p.point, p.value, p.seq) for p in points]

    full = read({"W": 1.0, "VAR": 2.0, "Hz": 50.0})  # seq 1
    await store.commit_telemetry(full, NOW)
    await store.commit_telemetry(read({"W": 5.0}), NOW)  # seq 2: only W
    assert await latest() == [("Hz", 50.0, 1), ("VAR", 2.0, 1), ("W", 5.0, 2)]
    # A replay of seq 1 changes nothing.
    await store.commit_telemetry(full, NOW)
    assert await latest() == [("Hz", 50.0, 1), ("VAR", 2.0, 1), ("W", 5.0, 2)]
    # One group: the newer batch is handed in before the older one, and each touches a
    # different subset of the points (a non-finite value is kept as None).
    older = read({"W": 6.0, "VAR": 7.0})  # seq 3
    newer = read({"W": 8.0, "Hz": float("nan")})  # seq 4
    await asyncio.gather(store.commit_telemetry(newer, NOW), store.commit_telemetry(older, NOW))
    assert await latest() == [("Hz", None, 4), ("VAR", 7.0, 3), ("W", 8.0, 4)]
    only_w = await store.latest_points(site_id=None, point="W")
    assert [(p.gateway_id, p.device_id, p.value, p.unit) for p in only_w] == [
        ("gw-000", "pv-1", 8.0, "u")
    ]


def refused_batch(fake: FakeGateway) -> TelemetryRows:
    """A batch the database refuses (a sample status without an error text breaks NOT NULL)."""
    rows = _one_sample(fake, 1.0)
    no_error = rows.sample_status[0]._replace(error=cast(str, None))  # what the type forbids
    return dataclasses.replace(rows, sample_status=[no_error])


async def a_refused_batch_fails_alone(store: Store) -> list[CommitResult | BaseException]:
    """One batch in a group breaks a constraint: its caller gets StoreError, every other batch
    of the group commits and is answered."""
    fakes = await register_fleet(store, 4)
    # The first call runs alone (the store is idle); the rest queue up behind it as one group.
    batches = [_one_sample(fakes[0], 1.0), _one_sample(fakes[1], 1.0), refused_batch(fakes[2])]
    batches += [_one_sample(fakes[3], 1.0), _one_sample(fakes[0], 2.0)]
    outcomes = await asyncio.gather(
        *(store.commit_telemetry(rows, NOW) for rows in batches), return_exceptions=True
    )
    assert isinstance(outcomes[2], StoreError), outcomes[2]
    assert [outcomes[i] for i in (0, 1, 3, 4)] == [
        CommitResult(1, ()),
        CommitResult(1, ()),
        CommitResult(1, ()),
        CommitResult(2, ()),
    ]
    committed = {g.gateway_id: g.committed_seq for g in await store.list_gateways()}
    assert committed == {"gw-000": 2, "gw-001": 1, "gw-002": 0, "gw-003": 1}
    # The refused gateway is not wedged: its resend (now valid) commits.
    fakes[2].next_seq = 1
    assert await store.commit_telemetry(_one_sample(fakes[2], 1.0), NOW) == CommitResult(1, ())
    return outcomes


async def acked_batches(store: Store, count: int) -> list[FakeGateway]:
    """Commit `count` gateways' first three batches at once; all acked (returned)."""
    fakes = await register_fleet(store, count)
    planned = [_one_sample(fake, float(k)) for k in range(3) for fake in fakes]
    results = await asyncio.gather(*(store.commit_telemetry(rows, NOW) for rows in planned))
    assert [r.committed_seq for r in results[-count:]] == [3] * count
    return fakes


async def check_acked_batches(store: Store, fakes: Sequence[FakeGateway]) -> None:
    committed = {g.gateway_id: g.committed_seq for g in await store.list_gateways()}
    assert committed == {fake.gateway_id: 3 for fake in fakes}
    page = await store.point_history(HistoryQuery("site-0", "pv-1", "W", None, None, 100))
    assert sorted((p.gateway_id, p.seq) for p in page.points) == sorted(
        (fake.gateway_id, seq) for fake in fakes[:4] for seq in (1, 2, 3)
    )


async def test_many_gateways_commit_at_once(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "h.sqlite3")
    try:
        await many_gateways_commit_at_once(store)
    finally:
        await store.close()


async def test_one_gateways_concurrent_commits_stay_ordered(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "h.sqlite3")
    try:
        await one_gateways_commits_stay_ordered(store)
    finally:
        await store.close()


async def test_a_resend_in_the_same_group_is_stored_once(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "h.sqlite3")
    try:
        await a_resend_in_the_same_group_is_stored_once(store)
    finally:
        await store.close()


async def test_partial_reads_keep_the_other_points(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "h.sqlite3")
    try:
        await partial_reads_keep_the_other_points(store)
    finally:
        await store.close()


# Latest values as schema version 5 kept them, one row per point: (gateway_id, device_id, point,
# value, unit, quality, time_ns, seq). test_pg_store migrates the same rows.
LATEST_V5 = [
    ("gw-1", "pv-1", "W", 1234.5, "W", pb.QUALITY_GOOD, NOW + 1, 7),
    ("gw-1", "pv-1", "Hz", 100.0, "Hz", pb.QUALITY_GOOD, NOW + 2, 6),
    ("gw-1", "pv-1", "VAR", None, "var", pb.QUALITY_BAD_COMM, NOW + 1, 7),
    ("gw-1", "bat-1", "W", 1e-7, "W", pb.QUALITY_GOOD, NOW, 5),
    ("gw-2", "pv-1", "W", -3.25, "W", pb.QUALITY_GOOD, NOW, 1),
]


def expected_after_migration() -> list[tuple[object, ...]]:
    """LATEST_V5 as `latest_points` returns it: ordered by device, point, gateway."""
    return sorted(LATEST_V5, key=lambda row: (row[1], row[2], row[0]))


async def test_migration_packs_the_latest_points(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite3"
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
            "applied_at_ns INTEGER NOT NULL)"
        )
        for migration in MIGRATIONS[:5]:
            for statement in migration.statements:
                db.execute(statement)
            db.execute(
                "INSERT INTO schema_migrations VALUES (?, ?, 0)",
                (migration.version, migration.name),
            )
        for gateway_id in ("gw-1", "gw-2"):
            db.execute(
                "INSERT INTO gateways (gateway_id, site_id, software_version, boot_id, "
                "registered_at_ns) VALUES (?, 'site-1', '1', 'boot', 0)",
                (gateway_id,),
            )
        db.executemany("INSERT INTO latest_points VALUES (?, ?, ?, ?, ?, ?, ?, ?)", LATEST_V5)
    db.close()
    store = await SqliteStore.open(path)
    try:
        assert await store.schema_version() == 6
        points = await store.latest_points(site_id="site-1")
        assert [dataclasses.astuple(p) for p in points] == expected_after_migration()
        assert all(isinstance(p.value, float | None) for p in points)
    finally:
        await store.close()
    with sqlite3.connect(path) as db:
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master")}
    db.close()
    assert "latest_points" not in tables


async def test_a_refused_batch_fails_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = await SqliteStore.open(tmp_path / "h.sqlite3")
    try:
        with caplog.at_level(logging.WARNING, logger="headend_min.sqlite_store"):
            outcomes = await a_refused_batch_fails_alone(store)
        assert "NOT NULL" in str(outcomes[2])
        # The refused batch really shared a group with good ones, which were then replayed.
        assert "a group of 4 telemetry batches failed" in caplog.text
    finally:
        await store.close()


async def test_acked_batches_survive_reopening(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "h.sqlite3")
    try:
        fakes = await acked_batches(store, 30)
    finally:
        await store.close()
    reopened = await SqliteStore.open(tmp_path / "h.sqlite3")
    try:
        await check_acked_batches(reopened, fakes)
    finally:
        await reopened.close()


async def test_other_calls_keep_their_place_among_commits(tmp_path: Path) -> None:
    store, fake, _ = await _registered(tmp_path / "h.sqlite3")
    try:
        batches = [plan_telemetry(fake.batch([sample_record("pv-1", {"W": (1.0, "W")})]), "gw-1")]
        batches.append(
            plan_telemetry(fake.batch([sample_record("pv-1", {"W": (2.0, "W")})]), "gw-1")
        )
        first, seen_first, second, seen_second = await asyncio.gather(
            store.commit_telemetry(batches[0], NOW),
            store.get_gateway("gw-1"),
            store.commit_telemetry(batches[1], NOW),
            store.get_gateway("gw-1"),
        )
        assert (first, second) == (CommitResult(1, ()), CommitResult(2, ()))
        assert seen_first is not None
        assert seen_second is not None
        assert (seen_first.committed_seq, seen_second.committed_seq) == (1, 2)
    finally:
        await store.close()


async def test_a_cancelled_caller_does_not_stall_the_queue(tmp_path: Path) -> None:
    store, fake, _ = await _registered(tmp_path / "h.sqlite3")
    try:
        rows = [
            plan_telemetry(fake.batch([sample_record("pv-1", {"W": (float(i), "W")})]), "gw-1")
            for i in range(3)
        ]
        running = asyncio.ensure_future(store.commit_telemetry(rows[0], NOW))
        queued = asyncio.ensure_future(store.commit_telemetry(rows[1], NOW))
        await asyncio.sleep(0)  # both are queued, the first one is on the worker
        queued.cancel()
        # The cancelled batch never commits (so never acks); the next ones are not held up.
        assert await running == CommitResult(1, ())
        assert await store.commit_telemetry(rows[2], NOW) == CommitResult(1, ((3, 3),))
        with pytest.raises(asyncio.CancelledError):
            await queued
    finally:
        await store.close()


async def test_closing_fails_what_is_still_queued(tmp_path: Path) -> None:
    store, fake, _ = await _registered(tmp_path / "h.sqlite3")
    rows = [
        plan_telemetry(fake.batch([sample_record("pv-1", {"W": (float(i), "W")})]), "gw-1")
        for i in range(2)
    ]
    before = asyncio.ensure_future(store.commit_telemetry(rows[0], NOW))
    await asyncio.sleep(0)
    closing = asyncio.ensure_future(store.close())
    await asyncio.sleep(0)
    with pytest.raises(StoreError, match="closed"):
        await store.commit_telemetry(rows[1], NOW)
    await closing
    # Queued before close: committed and answered.
    assert await before == CommitResult(1, ())

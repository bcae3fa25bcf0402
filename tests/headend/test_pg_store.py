"""PgStore on a real PostgreSQL database: the SqliteStore contract, and what only PG has.

The SqliteStore tests open their store from a tmp_path, so they cannot take another store as a
fixture; the contract tests here mirror them one by one, and `test_same_answers_as_sqlite` runs
one scenario (out-of-order lanes, replays, gaps, clock syncs, intents) against both stores and
compares every read; the group-commit scenarios of test_sqlite_store run here too. Then:
migrations racing, commits racing across instances, COPY vs. the ON CONFLICT path, an outage
and its recovery, and the LISTEN/NOTIFY notifier.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import pytest

from dergw.v1 import pb, timestamp_from_ns
from headend_min import pg_store
from headend_min.ingest import plan_telemetry, registration_from_pb
from headend_min.intents import InvalidIntentError
from headend_min.model import (
    HistoryCursor,
    HistoryPage,
    HistoryQuery,
    IntentAckInfo,
    IntentBasis,
    SampleRow,
    SampleStatusRow,
    StreamRef,
)
from headend_min.pg_notify import PgNotifier, parse_payload
from headend_min.pg_schema import MIGRATIONS, migrate
from headend_min.pg_store import PgStore, describe_url
from headend_min.sqlite_schema import MIGRATIONS as SQLITE_MIGRATIONS
from headend_min.sqlite_store import SqliteStore
from headend_min.store import (
    IntentComposer,
    SchemaTooNewError,
    Store,
    StoreError,
    UnknownSiteError,
)
from tests.headend.fake_gateway import (
    FakeGateway,
    device,
    event_response_record,
    intent_status_record,
    reported_state_record,
    sample_record,
    site,
)
from tests.headend.pg_support import PgDatabase, pg_db
from tests.headend.test_sqlite_store import (
    LATEST_V5,
    a_refused_batch_fails_alone,
    a_resend_in_the_same_group_is_stored_once,
    acked_batches,
    check_acked_batches,
    expected_after_migration,
    many_gateways_commit_at_once,
    one_gateways_commits_stay_ordered,
    partial_reads_keep_the_other_points,
    register_fleet,
)

__all__ = ["pg_db"]  # the fixture, re-exported for pytest

NOW = 1_700_000_000 * 10**9


def _fake(gateway_id: str = "gw-1", site_id: str = "site-1") -> FakeGateway:
    return FakeGateway(
        "unused:0", gateway_id=gateway_id, site=site(site_id), devices=[device("pv-1")]
    )


async def _registered(url: str) -> tuple[PgStore, FakeGateway, StreamRef]:
    store = await PgStore.open(url)
    fake = _fake()
    stream = StreamRef("gw-1", "stream-a")
    await store.register_gateway(
        registration_from_pb(fake.register_message().register), stream, NOW
    )
    return store, fake, stream


@pytest.fixture
async def store(pg_db: PgDatabase) -> AsyncIterator[PgStore]:
    opened = await PgStore.open(pg_db.url)
    yield opened
    await opened.close()


def _first_version(basis: IntentBasis) -> pb.IntentDocument:
    return pb.IntentDocument(site_id=basis.site_id, version=basis.next_version)


# -- the SqliteStore contract (mirrors test_sqlite_store.py) ------------------------------------


async def test_schema_is_migrated_once(pg_db: PgDatabase) -> None:
    store = await PgStore.open(pg_db.url)
    assert await store.schema_version() == MIGRATIONS[-1].version
    await store.close()
    store = await PgStore.open(pg_db.url)  # reopening applies nothing twice
    await store.close()
    with pg_db.connect() as db:
        rows = db.execute("SELECT version FROM schema_migrations ORDER BY version").fetchall()
        assert rows == [(m.version,) for m in MIGRATIONS]
        db.execute("INSERT INTO schema_migrations VALUES (99, 'from the future', 0)")
    with pytest.raises(SchemaTooNewError, match="99"):
        await PgStore.open(pg_db.url)


def test_schema_versions_match_sqlite() -> None:
    # Version N means the same tables on both stores (and /healthz reports the same number).
    assert [(m.version, m.name) for m in MIGRATIONS] == [
        (m.version, m.name) for m in SQLITE_MIGRATIONS
    ]


async def test_commit_dedupes_and_never_rolls_latest_back(pg_db: PgDatabase) -> None:
    store, fake, _ = await _registered(pg_db.url)
    try:
        early = fake.batch([sample_record("pv-1", {"W": (float(i), "W")}) for i in range(1, 4)])
        late = fake.batch([sample_record("pv-1", {"W": (9.0, "W")})])
        # The live lane's batch first: committed as a range above the watermark.
        result = await store.commit_telemetry(plan_telemetry(late, "gw-1"), NOW)
        assert (result.committed_seq, result.committed_ranges) == (0, ((4, 4),))
        # The earlier batch arrives after (e.g. the backlog lane, or a resend after a
        # reconnect): stored, the watermark closes up, and a replay changes nothing.
        for _ in range(2):
            result = await store.commit_telemetry(plan_telemetry(early, "gw-1"), NOW)
            assert (result.committed_seq, result.committed_ranges) == (4, ())
        latest = await store.latest_points(site_id="site-1", device_id="pv-1")
        assert [(p.point, p.value, p.seq) for p in latest] == [("W", 9.0, 4)]
        page = await store.point_history(HistoryQuery("site-1", "pv-1", "W", None, None, 100))
        assert sorted(p.seq for p in page.points) == [1, 2, 3, 4]
        assert page.next_cursor is None
        with pg_db.connect() as db:
            assert db.execute("SELECT count(*) FROM samples").fetchone() == (4,)
    finally:
        await store.close()


async def test_failed_composer_leaves_nothing(pg_db: PgDatabase) -> None:
    store, _, _ = await _registered(pg_db.url)
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


async def test_presence_follows_the_current_stream(pg_db: PgDatabase) -> None:
    store, fake, old = await _registered(pg_db.url)
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


async def test_reregistration_replaces_inventory(pg_db: PgDatabase) -> None:
    store, fake, stream = await _registered(pg_db.url)
    try:
        fake.devices = [device("pv-2"), device("bat-1", pb.DEVICE_KIND_BATTERY)]
        registration = registration_from_pb(fake.register_message().register)
        await store.register_gateway(registration, stream, NOW)
        devices = await store.list_devices("site-1")
        assert [d.device.device_id for d in devices] == ["bat-1", "pv-2"]
    finally:
        await store.close()


async def test_closed_store_refuses_work(pg_db: PgDatabase) -> None:
    store = await PgStore.open(pg_db.url)
    await store.close()
    await store.close()  # idempotent
    with pytest.raises(StoreError, match="closed"):
        await store.list_sites()


# -- the same answers as SqliteStore -----------------------------------------------------------


def _device_sample(
    device_id: str, watts: float, *, time_ns: int, boot_id: str = "", synced: bool = True
) -> pb.Record:
    record = sample_record(device_id, {"W": (watts, "W"), "V": (230.0 + watts / 1000, "V")})
    record.sample.time.CopyFrom(timestamp_from_ns(time_ns))
    record.sample.monotonic_ns = time_ns - NOW + 5 * 10**9
    record.sample.boot_id = boot_id
    record.sample.clock_synced = synced
    return record


def _numbered(gateway_id: str, first_seq: int, records: list[pb.Record]) -> pb.TelemetryBatch:
    """A batch at an explicit position (lanes send out of order); through_seq respected."""
    numbered: list[pb.Record] = []
    seq = first_seq
    for record in records:
        copy = pb.Record()
        copy.CopyFrom(record)
        copy.seq = seq
        numbered.append(copy)
        seq = (copy.through_seq or seq) + 1
    return pb.TelemetryBatch(
        gateway_id=gateway_id, first_seq=first_seq, last_seq=seq - 1, records=numbered
    )


def _gap_record(first: int, through: int) -> pb.Record:
    count = through - first + 1
    return pb.Record(
        through_seq=through,
        gap=pb.Gap(
            what="samples",
            records=count,
            points=2 * count,
            bytes=100 * count,
            first_time=timestamp_from_ns(NOW),
            last_time=timestamp_from_ns(NOW + 10**9),
            reason="quota",
            device_ids=["pv-1", "bat-1"],
        ),
    )


def _clock_sync(boot_id: str, offset_ns: int) -> pb.Record:
    return pb.Record(
        clock_sync=pb.ClockSync(
            boot_id=boot_id, wall_minus_mono_ns=offset_ns, time=timestamp_from_ns(NOW)
        )
    )


def _at(record: pb.Record, time_ns: int) -> pb.Record:
    """`record` stamped at `time_ns` (the helpers stamp now; the comparison needs fixed times)."""
    body = getattr(record, record.WhichOneof("body") or "")
    body.time.CopyFrom(timestamp_from_ns(time_ns))
    return record


async def _scenario(store: Store, *, at_once: bool = False) -> dict[str, object]:
    """Drive `store` through one fleet's day and return every read the API can make
    (`at_once`: every telemetry batch in flight together, so they commit as a group)."""
    devices_1 = [device("pv-1"), device("bat-1", pb.DEVICE_KIND_BATTERY)]
    gw1 = FakeGateway("unused:0", gateway_id="gw-1", site=site("site-1"), devices=devices_1)
    gw2 = FakeGateway("unused:0", gateway_id="gw-2", site=site("site-1"), devices=[device("pv-9")])
    gw3 = FakeGateway("unused:0", gateway_id="gw-3", site=site("site-2"), devices=[device("m-1")])
    outcomes: list[object] = []
    for fake in (gw1, gw2, gw3):
        fake.boot_id = f"boot-{fake.gateway_id}"
        registration = registration_from_pb(fake.register_message().register)
        stream = StreamRef(fake.gateway_id, f"s-{fake.gateway_id}")
        outcomes.append(await store.register_gateway(registration, stream, NOW))

    def at(index: int) -> int:
        return NOW + index * 10**9

    batches = [
        # gw-1's live lane runs ahead (seqs 11..13), then its backlog (1..10) in two batches,
        # then a replay of part of the backlog.
        _numbered(
            "gw-1",
            11,
            [
                _device_sample("pv-1", 1100.0, time_ns=at(11)),
                event_response_record(1, "ev-1", pb.RESPONSE_STATUS_STARTED, time_ns=at(11)),
                _at(reported_state_record(1, active_event_id="ev-1"), at(12)),
            ],
        ),
        _numbered(
            "gw-1",
            1,
            [
                _device_sample("pv-1", 100.0 * i, time_ns=at(i), boot_id="b1", synced=False)
                for i in range(1, 5)
            ]
            + [_gap_record(5, 10)],  # seqs 5..10 shed
        ),
        _numbered("gw-1", 1, [_device_sample("pv-1", 1.0, time_ns=at(1))]),  # a replay
        _numbered(
            "gw-1",
            14,
            [
                _clock_sync("b1", NOW - 3 * 10**9),
                _at(
                    intent_status_record(1, pb.INTENT_STATE_APPLIED, active_event_id="ev-1"),
                    at(15),
                ),
                _device_sample("bat-1", -500.0, time_ns=at(14)),
            ],
        ),
        _numbered(
            "gw-2",
            1,
            [_device_sample("pv-9", 50.0 * i, time_ns=at(i)) for i in range(1, 30)],
        ),
        _numbered(
            "gw-3", 5, [_device_sample("m-1", 7.0, time_ns=at(5))]
        ),  # a range above the watermark that stays open
        _numbered("gw-2", 1, [_device_sample("pv-9", 0.0, time_ns=at(1))]),
    ]
    planned = [plan_telemetry(b, b.gateway_id) for b in batches]
    if at_once:
        outcomes.extend(
            await asyncio.gather(*(store.commit_telemetry(rows, NOW) for rows in planned))
        )
    else:
        outcomes.extend([await store.commit_telemetry(rows, NOW) for rows in planned])

    def compose(note: str) -> IntentComposer:
        def composer(basis: IntentBasis) -> pb.IntentDocument:
            document = pb.IntentDocument(site_id=basis.site_id, version=basis.next_version)
            document.issued_at.CopyFrom(timestamp_from_ns(NOW + basis.next_version))
            document.events.add(event_id=f"{note}-{basis.next_version}")
            return document

        return composer

    outcomes.extend([await store.append_intent("site-1", compose(n), NOW) for n in "abc"])
    await store.record_intent_delivery("gw-1", "site-1", 2, NOW + 1)
    await store.record_intent_delivery("gw-1", "site-1", 2, NOW + 2)  # keeps the first time
    await store.record_intent_ack(
        "gw-1", IntentAckInfo("site-1", 2, pb.INTENT_ACK_STATUS_PERSISTED, ""), NOW + 3
    )
    await store.record_intent_ack(
        "gw-2", IntentAckInfo("site-1", 3, pb.INTENT_ACK_STATUS_REJECTED, "bad"), NOW + 4
    )
    # gw-3 re-registers with an emptied outbox: everything below next_seq counts as settled.
    gw3.next_seq = 9
    outcomes.append(
        await store.register_gateway(
            registration_from_pb(gw3.register_message().register), StreamRef("gw-3", "s2"), NOW
        )
    )

    history = await store.point_history(HistoryQuery("site-1", "pv-9", None, None, None, 7))
    pages = [history]
    while pages[-1].next_cursor is not None and len(pages) < 20:
        cursor = pages[-1].next_cursor
        assert isinstance(cursor, HistoryCursor)
        pages.append(
            await store.point_history(
                HistoryQuery("site-1", "pv-9", None, None, None, 7, after=cursor)
            )
        )
    return {
        "outcomes": outcomes,
        "schema_version": await store.schema_version(),
        "gateways": await store.list_gateways(),
        "gateways_site_2": await store.list_gateways("site-2"),
        "gateway": await store.get_gateway("gw-1"),
        "no_gateway": await store.get_gateway("nope"),
        "sites": await store.list_sites(),
        "site": await store.get_site("site-1"),
        "devices": await store.list_devices(),
        "devices_site_1": await store.list_devices("site-1"),
        "latest_points": await store.latest_points(site_id=None),
        "latest_w": await store.latest_points(site_id="site-1", point="W"),
        "latest_pv1": await store.latest_points(site_id="site-1", device_id="pv-1"),
        "sample_status": sorted(
            await store.sample_status(), key=lambda s: (s.gateway_id, s.device_id)
        ),
        "history_pages": pages,
        "history_pv1": await store.point_history(
            HistoryQuery("site-1", "pv-1", "W", NOW, NOW + 20 * 10**9, 100)
        ),
        "events": await store.event_responses(site_id=None, event_id=None, limit=10),
        "events_ev1": await store.event_responses(site_id="site-1", event_id="ev-1", limit=10),
        "reported": await store.latest_reported_states("site-1"),
        "flexibility": await store.latest_flexibility(),
        "gaps": await store.gaps(),
        "gaps_gw1": await store.gaps(site_id="site-1", gateway_id="gw-1", limit=5),
        "intent": await store.get_intent("site-1"),
        "intent_v1": await store.get_intent("site-1", 1),
        "intents": await store.list_intents("site-1", 2),
        "latest_versions": await store.latest_intent_versions(),
        "deliveries": sorted(
            await store.intent_deliveries("site-1", [1, 2, 3]),
            key=lambda d: (d.gateway_id, d.version),
        ),
        "statuses": sorted(
            await store.latest_intent_statuses("site-1", [1, 2, 3]),
            key=lambda s: (s.gateway_id, s.version),
        ),
    }


async def test_same_answers_as_sqlite(store: PgStore, tmp_path: Path) -> None:
    sqlite = await SqliteStore.open(tmp_path / "h.sqlite3")
    try:
        expected = await _scenario(sqlite)
    finally:
        await sqlite.close()
    got = await _scenario(store)
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key] == expected[key], key
    # Unsynced samples were corrected by their boot's ClockSync (true time = mono + offset).
    gateway = got["gateway"]
    assert dataclasses.is_dataclass(gateway)
    history = got["history_pv1"]
    assert isinstance(history, HistoryPage)
    times = {p.seq: p.time_ns for p in history.points}
    assert times[1] == NOW - 3 * 10**9 + (NOW + 10**9 - NOW + 5 * 10**9)


async def test_many_gateways_commit_at_once(store: PgStore) -> None:
    await many_gateways_commit_at_once(store)


async def test_one_gateways_concurrent_commits_stay_ordered(store: PgStore) -> None:
    await one_gateways_commits_stay_ordered(store)


async def test_a_resend_in_the_same_group_is_stored_once(
    store: PgStore, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="headend_min.pg_store"):
        await a_resend_in_the_same_group_is_stored_once(store)
    assert "without COPY" not in caplog.text  # the group's own duplicates never reach COPY


async def test_partial_reads_keep_the_other_points(store: PgStore) -> None:
    await partial_reads_keep_the_other_points(store)


async def test_migration_packs_the_latest_points(pg_db: PgDatabase) -> None:
    async with await psycopg.AsyncConnection.connect(pg_db.url, autocommit=True) as conn:
        await migrate(conn, MIGRATIONS[:5])
        for gateway_id in ("gw-1", "gw-2"):
            await conn.execute(
                "INSERT INTO gateways (gateway_id, site_id, software_version, boot_id, "
                "registered_at_ns) VALUES (%s, 'site-1', '1', 'boot', 0)",
                (gateway_id,),
            )
        async with conn.cursor() as cursor:
            await cursor.executemany(
                "INSERT INTO latest_points VALUES (%s, %s, %s, %s, %s, %s, %s, %s)", LATEST_V5
            )
    store = await PgStore.open(pg_db.url)
    try:
        assert await store.schema_version() == 6
        points = await store.latest_points(site_id="site-1")
        assert [dataclasses.astuple(p) for p in points] == expected_after_migration()
        assert all(isinstance(p.value, float | None) for p in points)
    finally:
        await store.close()
    with pg_db.connect() as db:
        row = db.execute(
            "SELECT to_regclass('latest_points') IS NULL, "
            "(SELECT reloptions FROM pg_class WHERE relname = 'latest_values')"
        ).fetchone()
    assert row == (True, ["fillfactor=50"])


async def test_a_refused_batch_fails_alone(
    store: PgStore, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="headend_min.pg_store"):
        outcomes = await a_refused_batch_fails_alone(store)
    assert "not-null" in str(outcomes[2])
    assert "telemetry batches failed" in caplog.text  # the group was retried in halves


async def test_acked_batches_survive_reopening(pg_db: PgDatabase) -> None:
    store = await PgStore.open(pg_db.url)
    try:
        fakes = await acked_batches(store, 30)
    finally:
        await store.close()
    reopened = await PgStore.open(pg_db.url)
    try:
        await check_acked_batches(reopened, fakes)
    finally:
        await reopened.close()


async def test_grouped_answers_match_one_by_one(store: PgStore, tmp_path: Path) -> None:
    # The scenario's batches all in flight at once (one or two groups) answer and store exactly
    # what SQLite answers and stores committing them one after another.
    sqlite = await SqliteStore.open(tmp_path / "h.sqlite3")
    try:
        expected = await _scenario(sqlite)
    finally:
        await sqlite.close()
    got = await _scenario(store, at_once=True)
    for key in expected:
        assert got[key] == expected[key], key


# -- what only PostgreSQL has -------------------------------------------------------------------


async def test_instances_starting_together_migrate_once(pg_db: PgDatabase) -> None:
    stores = await asyncio.gather(*(PgStore.open(pg_db.url) for _ in range(4)))
    try:
        for opened in stores:
            assert await opened.schema_version() == MIGRATIONS[-1].version
        with pg_db.connect() as db:
            rows = db.execute("SELECT version FROM schema_migrations ORDER BY version").fetchall()
            assert rows == [(m.version,) for m in MIGRATIONS]
    finally:
        for opened in stores:
            await opened.close()


async def test_two_instances_allocate_distinct_versions(pg_db: PgDatabase) -> None:
    first, fake, _ = await _registered(pg_db.url)
    second = await PgStore.open(pg_db.url)
    try:
        results = await asyncio.gather(
            *(
                instance.append_intent("site-1", _first_version, NOW)
                for _ in range(10)
                for instance in (first, second)
            )
        )
        assert sorted(r.version for r in results) == list(range(1, 21))
        # ...and commits of one gateway through both instances keep one consistent watermark.
        batches = [fake.batch([sample_record("pv-1", {"W": (float(i), "W")})]) for i in range(30)]
        await asyncio.gather(
            *(
                (first, second)[i % 2].commit_telemetry(plan_telemetry(b, "gw-1"), NOW)
                for i, b in enumerate(reversed(batches))
            )
        )
        gateway = await second.get_gateway("gw-1")
        assert gateway is not None
        assert gateway.committed_seq == 30
        with pg_db.connect() as db:
            assert db.execute("SELECT count(*) FROM committed_ranges").fetchone() == (0,)
    finally:
        await first.close()
        await second.close()


async def test_two_instances_group_commit_the_same_gateways(pg_db: PgDatabase) -> None:
    # Each instance's groups hold many gateways' row locks at once, taken in gateway_id order:
    # groups of two instances over the same gateways, handed in opposite orders, never deadlock.
    first = await PgStore.open(pg_db.url)
    second = await PgStore.open(pg_db.url)
    try:
        fakes = await register_fleet(first, 20)
        rounds = [
            [
                plan_telemetry(
                    fake.batch([sample_record("pv-1", {"W": (float(k), "W")})]), fake.gateway_id
                )
                for fake in fakes
            ]
            for k in range(6)
        ]
        calls = []
        for k, batches in enumerate(rounds):
            instance, ordered = (first, batches) if k % 2 else (second, batches[::-1])
            calls += [instance.commit_telemetry(rows, NOW) for rows in ordered]
        await asyncio.gather(*calls)
        gateways = await second.list_gateways()
        assert {g.committed_seq for g in gateways} == {6}
        with pg_db.connect() as db:
            assert db.execute("SELECT count(*) FROM committed_ranges").fetchone() == (0,)
            assert db.execute("SELECT count(*) FROM samples").fetchone() == (120,)
    finally:
        await first.close()
        await second.close()


async def test_a_stray_duplicate_falls_back_from_copy(store: PgStore, pg_db: PgDatabase) -> None:
    fake = _fake()
    await store.register_gateway(
        registration_from_pb(fake.register_message().register), StreamRef("gw-1", "s"), NOW
    )
    batch = fake.batch([sample_record("pv-1", {"W": (float(i), "W")}) for i in range(5)])
    # A row the committed ranges do not know about (e.g. restored from a backup): COPY hits
    # it, and the batch must still commit instead of failing forever on every resend.
    with pg_db.connect() as db:
        db.execute(
            "INSERT INTO samples (gateway_id, seq, device_id, time_ns, payload) "
            "VALUES ('gw-1', 3, 'pv-1', 0, '\\x00')"
        )
    result = await store.commit_telemetry(plan_telemetry(batch, "gw-1"), NOW)
    assert result.committed_seq == 5
    with pg_db.connect() as db:
        assert db.execute("SELECT count(*) FROM samples").fetchone() == (5,)


async def test_outage_fails_fast_and_recovers(pg_db: PgDatabase) -> None:
    store = await PgStore.open(pg_db.url, timeout_s=2.0)
    try:
        await _outage_and_recovery(store, pg_db)
    finally:
        await store.close()


async def _outage_and_recovery(store: PgStore, pg_db: PgDatabase) -> None:
    fake = _fake()
    registration = registration_from_pb(fake.register_message().register)
    await store.register_gateway(registration, StreamRef("gw-1", "s"), NOW)
    assert pg_db.go_down() >= 1  # the pool's connections are killed
    try:
        batch = fake.batch([sample_record("pv-1", {"W": (1.0, "W")})])
        started = time.monotonic()
        with pytest.raises(StoreError, match="PostgreSQL"):
            await store.commit_telemetry(plan_telemetry(batch, "gw-1"), NOW)
        assert time.monotonic() - started < 10  # bounded by the pool timeout, no hang
        # A whole group fails at once (not batch by batch), each caller with its own error.
        grouped = await asyncio.gather(
            *(store.commit_telemetry(plan_telemetry(batch, "gw-1"), NOW) for _ in range(5)),
            return_exceptions=True,
        )
        assert all(isinstance(error, StoreError) for error in grouped), grouped
        assert len({id(error) for error in grouped}) == 5
        assert time.monotonic() - started < 20
    finally:
        pg_db.come_back()
    deadline = time.monotonic() + 30
    while True:
        try:
            result = await store.commit_telemetry(plan_telemetry(batch, "gw-1"), NOW)
            break
        except StoreError:
            assert time.monotonic() < deadline, "the store did not recover after the outage"
            await asyncio.sleep(0.2)
    recovered_s = 30 - (deadline - time.monotonic())
    print(f"store usable again {recovered_s:.2f} s after the database came back")
    assert result.committed_seq == 1


def test_bulk_column_lists_follow_the_row_types() -> None:
    # COPY writes SampleRow tuples positionally, and so do the JSON upserts: a
    # field added to a row type must be added to the PostgreSQL column lists (and schema) too.
    def columns(text: str) -> tuple[str, ...]:
        return tuple(column.strip() for column in text.split(","))

    assert columns(pg_store._SAMPLE_COLUMNS) == SampleRow._fields
    assert len(pg_store._SAMPLE_COPY_TYPES) == len(SampleRow._fields)
    assert columns(pg_store._STATUS_COLUMNS) == SampleStatusRow._fields
    assert len(pg_store._STATUS_TYPES) == len(SampleStatusRow._fields)


def test_messages_never_show_the_password() -> None:
    assert describe_url("postgresql://u:secret@db.example:6432/dergw") == (
        "PostgreSQL db.example:6432/dergw"
    )
    assert parse_payload("site:with:colons:12") == ("site:with:colons", 12)
    assert parse_payload("site-1:x") is None
    assert parse_payload(":3") is None


async def test_open_fails_clearly_without_a_database(pg_db: PgDatabase) -> None:
    with pytest.raises(StoreError, match="cannot connect"):
        await PgStore.open(pg_db.url + "_missing")


# -- LISTEN/NOTIFY -----------------------------------------------------------------------------


async def _next(subscription: AsyncIterator[int], timeout_s: float = 5.0) -> int:
    return await asyncio.wait_for(anext(subscription), timeout_s)


async def test_an_intent_in_one_instance_wakes_the_other(pg_db: PgDatabase) -> None:
    store_a, _, _ = await _registered(pg_db.url)
    store_b = await PgStore.open(pg_db.url)
    notifier_a, notifier_b = PgNotifier(store_a), PgNotifier(store_b)
    try:
        await notifier_a.start()
        await notifier_b.start()
        async with notifier_a.subscribe("site-1") as subscription:
            versions = aiter(subscription)
            # The store's own NOTIFY (inside the intent transaction) is enough...
            started = time.monotonic()
            await store_b.append_intent("site-1", _first_version, NOW)
            assert await _next(versions) == 1
            print(f"cross-instance wake-up {1000 * (time.monotonic() - started):.1f} ms")
            # ...and publish() on the other instance reaches it as well.
            await notifier_b.publish("site-1", 7)
            assert await _next(versions) == 7
    finally:
        await notifier_a.close()
        await notifier_b.close()
        await store_a.close()
        await store_b.close()


async def test_listener_reconnects_and_reoffers_what_it_missed(pg_db: PgDatabase) -> None:
    store_a, _, _ = await _registered(pg_db.url)
    store_b = await PgStore.open(pg_db.url)
    notifier = PgNotifier(store_a, reconnect_delay_s=1.0, check_interval_s=0.5)
    try:
        await notifier.start()
        async with notifier.subscribe("site-1") as subscription:
            versions = aiter(subscription)
            with pg_db.connect() as db:
                killed = db.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = %s AND query LIKE 'LISTEN%%'",
                    (pg_db.name,),
                ).fetchone()
            assert killed == (1,)
            deadline = time.monotonic() + 5
            while notifier.listening:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            # Posted while nobody listens: PostgreSQL drops this NOTIFY...
            await store_b.append_intent("site-1", _first_version, NOW)
            # ...and the reconnected listener offers the version from the store instead.
            assert await _next(versions, timeout_s=10) == 1
            assert notifier.connects == 2
    finally:
        await notifier.close()
        await store_a.close()
        await store_b.close()

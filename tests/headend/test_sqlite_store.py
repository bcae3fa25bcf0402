"""SqliteStore on a real file: migrations, dedupe, ordering guards, transactions, presence."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from dergw.v1 import pb
from headend_min.ingest import plan_telemetry, registration_from_pb
from headend_min.intents import InvalidIntentError
from headend_min.model import CommitResult, HistoryQuery, IntentBasis, StreamRef
from headend_min.sqlite_schema import MIGRATIONS
from headend_min.sqlite_store import SqliteStore
from headend_min.store import SchemaTooNewError, StoreError, UnknownSiteError
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

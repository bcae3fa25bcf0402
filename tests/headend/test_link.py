"""The gRPC link against a real grpc.aio server on a free port."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest

from dergw.v1 import pb
from headend_min.model import CommitResult, StoredIntent, TelemetryRows
from headend_min.sqlite_store import SqliteStore
from tests.headend.fake_gateway import (
    FakeGateway,
    device,
    event_response_record,
    sample_record,
    site,
)
from tests.headend.harness import HeadendRunner, RunningHeadend
from tests.support import async_wait_until


async def test_register_is_acked_and_stored(headend: RunningHeadend) -> None:
    gateway = headend.gateway("gw-1", "site-1")
    ack = await gateway.connect()
    assert ack.committed_seq == 0
    assert ack.intent_version == 0
    assert abs(ack.server_time.seconds - headend.clock.wall_ns() // 10**9) <= 1

    listed = (await headend.http.get("/gateways")).json()
    assert [(g["gateway_id"], g["site_id"], g["online"]) for g in listed] == [
        ("gw-1", "site-1", True)
    ]
    devices = (await headend.http.get("/sites/site-1/devices")).json()
    assert {d["device_id"]: d["kind"] for d in devices} == {
        "pv-1": "PV",
        "bat-1": "BATTERY",
        "meter-1": "METER",
    }


async def test_first_message_must_be_register(headend: RunningHeadend) -> None:
    gateway = headend.gateway()
    batch = pb.TelemetryBatch(gateway_id="gw-1", first_seq=1, last_seq=0)
    await gateway.open(pb.UpMessage(telemetry=batch))
    code, details = await gateway.wait_closed()
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "first message" in details
    assert "register" in details


async def test_invalid_register_is_refused(headend: RunningHeadend) -> None:
    gateway = FakeGateway(headend.grpc_target, gateway_id="", site=site("site-1"))
    headend.gateways.append(gateway)
    await gateway.open()
    code, details = await gateway.wait_closed()
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "gateway_id is empty" in details


async def test_same_batch_twice_is_stored_once_and_acked_twice(headend: RunningHeadend) -> None:
    gateway = headend.gateway()
    await gateway.connect()
    batch = gateway.batch(
        [
            sample_record("pv-1", {"W": (1000.0, "W")}),
            event_response_record(1, "ev-1", pb.RESPONSE_STATUS_RECEIVED),
            sample_record("pv-1", {"W": (1100.0, "W")}),
        ]
    )
    await gateway.send_batch(batch)
    assert await gateway.wait_ack(3) == 3
    await gateway.send_batch(batch)
    assert await gateway.wait_ack(3) == 3

    history = (
        await headend.http.get(
            "/telemetry/history", params={"site_id": "site-1", "device_id": "pv-1"}
        )
    ).json()
    assert [item["value"] for item in history["items"]] == [1000.0, 1100.0]
    events = (await headend.http.get("/events", params={"site_id": "site-1"})).json()
    assert len(events) == 1
    gateways = (await headend.http.get("/gateways")).json()
    assert gateways[0]["committed_seq"] == 3


async def test_reconnect_learns_committed_seq(headend: RunningHeadend) -> None:
    gateway = headend.gateway()
    await gateway.connect()
    batch = await gateway.send_records([sample_record("pv-1", {"W": (1.0, "W")})] * 5)
    await gateway.wait_ack(batch.last_seq)
    await gateway.close()

    # A re-flashed gateway whose outbox restarted from 1 learns where to continue.
    reflashed = headend.gateway()
    ack = await reflashed.connect()
    assert ack.committed_seq == 5
    assert reflashed.next_seq == 6


class _GatedStore:
    """Wraps a store; commit_telemetry waits until the test opens the gate."""

    def __init__(self, inner: SqliteStore) -> None:
        self.inner = inner
        self.gate = asyncio.Event()
        self.commit_started = asyncio.Event()
        self.commits_done = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    async def commit_telemetry(self, rows: TelemetryRows, now_ns: int) -> CommitResult:
        self.commit_started.set()
        await self.gate.wait()
        committed = await self.inner.commit_telemetry(rows, now_ns)
        self.commits_done += 1
        return committed


async def test_ack_only_after_commit(runner: HeadendRunner) -> None:
    assert isinstance(runner.db_path, Path)  # the runner fixture is on SQLite
    inner = await SqliteStore.open(runner.db_path)
    gated = _GatedStore(inner)
    try:
        running = await runner.start(store=gated)  # type: ignore[arg-type]
        gateway = running.gateway()
        await gateway.connect()
        batch = await gateway.send_records([sample_record("pv-1", {"W": (5.0, "W")})])
        await asyncio.wait_for(gated.commit_started.wait(), 5)
        # The commit is held: no ack may arrive, however long we wait for one.
        with pytest.raises(TimeoutError):
            await gateway.wait_ack(batch.last_seq, timeout_s=0.3)
        gated.gate.set()
        assert await gateway.wait_ack(batch.last_seq) == batch.last_seq
        # The ack proves the commit: the data is already readable.
        assert gated.commits_done == 1
        latest = await inner.latest_points(site_id="site-1", device_id="pv-1")
        assert [(p.point, p.value) for p in latest] == [("W", 5.0)]
        await runner.stop()
    finally:
        await inner.close()


async def test_batch_for_another_gateway_is_refused(headend: RunningHeadend) -> None:
    gateway = headend.gateway("gw-1")
    await gateway.connect()
    batch = gateway.batch([sample_record("pv-1", {"W": (1.0, "W")})])
    batch.gateway_id = "gw-other"
    await gateway.send_batch(batch)
    code, details = await gateway.wait_closed()
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "gw-other" in details
    assert "gw-1" in details


async def test_non_consecutive_seqs_are_refused(headend: RunningHeadend) -> None:
    gateway = headend.gateway()
    await gateway.connect()
    batch = gateway.batch([sample_record("pv-1", {"W": (1.0, "W")})] * 3)
    batch.records[2].seq = 7
    await gateway.send_batch(batch)
    code, details = await gateway.wait_closed()
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "consecutive" in details
    listed = (await headend.http.get("/gateways")).json()
    assert listed[0]["committed_seq"] == 0  # nothing of the refused batch was stored


async def test_posted_intent_reaches_connected_gateway_within_1s(
    headend: RunningHeadend,
) -> None:
    gateway = headend.gateway()
    await gateway.connect()
    other_site = headend.gateway("gw-2", "site-2")
    await other_site.connect()
    started = time.monotonic()
    response = await headend.http.post(
        "/sites/site-1/intents",
        json={"events": [{"duration_s": 600, "controls": {"max_gen_pct": 40}}]},
    )
    assert response.status_code == 201, response.text
    document = await gateway.next_intent(timeout_s=1.0)
    elapsed = time.monotonic() - started
    assert elapsed < 1.0
    assert document.version == 1
    assert document.site_id == "site-1"
    assert document.events[0].controls.max_gen_pct == 40
    assert other_site.intents.empty()

    await gateway.ack_intent(1)

    async def acked() -> bool:
        status = (await headend.http.get("/sites/site-1/intents/1")).json()
        return bool(status["gateways"][0]["state"] == "persisted")

    await async_wait_until(acked, timeout_s=2.0, what="the ack to show in the intent status")
    assert (await headend.http.get("/gateways/gw-1")).json()["intent_version"] == 1


async def test_reconnect_with_older_version_gets_latest_document(
    headend: RunningHeadend,
) -> None:
    first = headend.gateway()
    await first.connect()
    await first.close()
    for pct in (80, 60, 40):
        response = await headend.http.post(
            "/sites/site-1/intents", json={"default_control": {"max_gen_pct": pct}}
        )
        assert response.status_code == 201

    gateway = headend.gateway(intent_version=1)
    ack = await gateway.connect()
    assert ack.intent_version == 3
    document = await gateway.next_intent(timeout_s=1.0)
    assert document.version == 3
    assert document.default_control.max_gen_pct == 40

    # A gateway already holding the latest version is sent nothing.
    current = headend.gateway("gw-1", intent_version=3)
    await current.connect()
    with pytest.raises(TimeoutError):
        await current.next_intent(timeout_s=0.2)


async def test_newer_stream_replaces_older_one(headend: RunningHeadend) -> None:
    old = headend.gateway()
    await old.connect()
    new = headend.gateway()
    await new.connect()
    code, details = await old.wait_closed()
    assert code == grpc.StatusCode.ABORTED
    assert "newer stream" in details
    # The replaced stream closing must not mark the gateway offline.
    listed = (await headend.http.get("/gateways")).json()
    assert listed[0]["online"] is True
    batch = await new.send_records([sample_record("pv-1", {"W": (2.0, "W")})])
    await new.wait_ack(batch.last_seq)


async def test_disconnect_marks_gateway_offline(headend: RunningHeadend) -> None:
    gateway = headend.gateway()
    await gateway.connect()
    await gateway.close()

    async def offline() -> bool:
        listed = (await headend.http.get("/gateways")).json()
        return listed[0]["online"] is False

    await async_wait_until(offline, timeout_s=2.0, what="the gateway to read as offline")


async def test_shutdown_ends_streams_with_unavailable(runner: HeadendRunner) -> None:
    running = await runner.start()
    gateway = running.gateway()
    await gateway.connect()
    stop = asyncio.create_task(running.headend.stop())
    code, _ = await gateway.wait_closed()
    assert code == grpc.StatusCode.UNAVAILABLE
    await stop
    runner.running = None
    await gateway.close()


async def test_headend_restart_keeps_gateways_and_intents(runner: HeadendRunner) -> None:
    running = await runner.start()
    gateway = running.gateway()
    await gateway.connect()
    batch = await gateway.send_records([sample_record("pv-1", {"W": (1.0, "W")})] * 4)
    await gateway.wait_ack(batch.last_seq)
    posted = await running.http.post(
        "/sites/site-1/intents",
        json={"events": [{"event_id": "ev-a", "duration_s": 3600, "controls": {"fixed_w": -500}}]},
    )
    assert posted.status_code == 201
    await gateway.next_intent()
    await gateway.ack_intent(1)
    await async_wait_until(
        lambda: _gateway_intent_version(running, "gw-1"), timeout_s=2.0, what="the ack"
    )
    before_gateways = (await running.http.get("/gateways")).json()
    before_intents = (await running.http.get("/sites/site-1/intents")).json()

    restarted = await runner.restart()
    after_gateways = (await restarted.http.get("/gateways")).json()
    after_intents = (await restarted.http.get("/sites/site-1/intents")).json()
    assert [g["gateway_id"] for g in after_gateways] == ["gw-1"]
    assert after_gateways[0]["online"] is False  # its stream ended with the old process
    assert after_gateways[0]["committed_seq"] == before_gateways[0]["committed_seq"] == 4
    assert after_gateways[0]["intent_version"] == 1
    assert [v["document"] for v in after_intents] == [v["document"] for v in before_intents]

    # And the gateway carries on where it left off.
    again = restarted.gateway(intent_version=1)
    ack = await again.connect()
    assert (ack.committed_seq, ack.intent_version) == (4, 1)


async def _gateway_intent_version(running: RunningHeadend, gateway_id: str) -> bool:
    response = await running.http.get(f"/gateways/{gateway_id}")
    return bool(response.json()["intent_version"] >= 1)


async def test_every_disconnect_is_recorded(headend: RunningHeadend) -> None:
    # Regression: gRPC can cancel the RPC task a second time while it records the close.
    for attempt in range(10):
        gateway = headend.gateway(f"gw-{attempt}")
        await gateway.connect()
        batch = await gateway.send_records([sample_record("pv-1", {"W": (1.0, "W")})])
        await gateway.wait_ack(batch.last_seq)
        await gateway.close()

        async def closed(gateway_id: str = gateway.gateway_id) -> bool:
            record = await headend.headend.store.get_gateway(gateway_id)
            return record is not None and not record.stream_open

        await async_wait_until(closed, timeout_s=2.0, what=f"{gateway.gateway_id} to close")
    await async_wait_until(
        lambda: headend.headend.link.open_streams == 0, timeout_s=2.0, what="no open streams"
    )


async def test_reregister_on_an_open_stream_updates_the_inventory(headend: RunningHeadend) -> None:
    # A gateway that discovers a device after connecting re-registers on the same stream.
    gateway = headend.gateway("gw-1", "site-1")
    await gateway.connect()
    gateway.devices.append(device("pv-2", pb.DEVICE_KIND_PV, max_w=4000.0))
    await gateway.send(gateway.register_message())

    async def has_new_device() -> bool:
        devices = (await headend.http.get("/sites/site-1/devices")).json()
        return "pv-2" in {d["device_id"] for d in devices}

    await async_wait_until(has_new_device, timeout_s=5, what="pv-2 in the inventory")
    assert not gateway.closed.is_set()
    # ...and the stream keeps working.
    await gateway.send_records([sample_record("pv-2", {"W": (10.0, "W")})])
    assert await gateway.wait_ack(1) == 1


async def test_reregister_cannot_change_identity_on_a_stream(headend: RunningHeadend) -> None:
    gateway = headend.gateway("gw-1", "site-1")
    await gateway.connect()
    gateway.gateway_id = "gw-2"
    await gateway.send(gateway.register_message())
    code, details = await gateway.wait_closed()
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "must keep its gateway id and site" in details


class _CountingStore:
    """Wraps a store; counts the intent reads."""

    def __init__(self, inner: SqliteStore) -> None:
        self.inner = inner
        self.intent_reads = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    async def get_intent(self, site_id: str, version: int | None = None) -> StoredIntent | None:
        self.intent_reads += 1
        return await self.inner.get_intent(site_id, version)


async def test_one_post_to_a_busy_site_is_read_once_for_all_its_streams(
    runner: HeadendRunner,
) -> None:
    assert isinstance(runner.db_path, Path)  # the runner fixture is on SQLite
    inner = await SqliteStore.open(runner.db_path)
    counting = _CountingStore(inner)
    try:
        running = await runner.start(store=counting)  # type: ignore[arg-type]
        gateways = [running.gateway(f"gw-{n}", "site-1") for n in range(20)]
        await asyncio.gather(*(gateway.connect() for gateway in gateways))
        response = await running.http.post(
            "/sites/site-1/intents", json={"default_control": {"export_limit_w": 3000}}
        )
        assert response.status_code == 201, response.text
        documents = await asyncio.gather(*(gateway.next_intent() for gateway in gateways))
        assert {document.version for document in documents} == {1}
        # The API's own read (composing v2 reads v1) aside, the 20 streams shared a few reads.
        assert counting.intent_reads <= 3, counting.intent_reads
        # A second post is read afresh: no stream is ever sent a cached older version.
        response = await running.http.post(
            "/sites/site-1/intents", json={"default_control": {"export_limit_w": 2000}}
        )
        assert response.status_code == 201, response.text
        documents = await asyncio.gather(*(gateway.next_intent() for gateway in gateways))
        assert {document.version for document in documents} == {2}
        await runner.stop()
    finally:
        await inner.close()

"""The HTTP API against the real uvicorn server, with fake gateways on the real gRPC link."""

from __future__ import annotations

import math

import pytest

from dergw.v1 import pb
from headend_min.sqlite_schema import MIGRATIONS
from tests.headend.fake_gateway import (
    device,
    event_response_record,
    intent_status_record,
    reported_state_record,
    sample_record,
)
from tests.headend.harness import RunningHeadend
from tests.support import async_wait_until

_EVENT = {"duration_s": 600, "controls": {"max_gen_pct": 50}}


async def test_openapi_and_docs_are_served(headend: RunningHeadend) -> None:
    base = f"http://{headend.headend.http_endpoint}"
    schema = (await headend.http.get(f"{base}/openapi.json")).json()
    assert "/api/v1/sites/{site_id}/intents" in schema["paths"]
    assert "/api/v1/telemetry/history" in schema["paths"]
    docs = await headend.http.get(f"{base}/docs")
    assert docs.status_code == 200
    health = (await headend.http.get("/healthz")).json()
    assert health["status"] == "ok"
    assert health["schema_version"] == MIGRATIONS[-1].version
    assert health["server_time"].endswith("Z")


async def test_unknown_site_is_404_with_a_hint(headend: RunningHeadend) -> None:
    response = await headend.http.post("/sites/nope/intents", json={"events": [_EVENT]})
    assert response.status_code == 404
    assert "nope" in response.json()["detail"]
    assert "/api/v1/sites" in response.json()["detail"]
    assert (await headend.http.get("/sites/nope")).status_code == 404
    assert (await headend.http.get("/sites/nope/intents")).status_code == 404
    for path in ("/sites/nope/devices", "/events", "/gateways", "/telemetry/latest"):
        response = await headend.http.get(path, params={"site_id": "nope"})
        assert response.status_code == 404, path
    history = await headend.http.get(
        "/telemetry/history", params={"site_id": "nope", "device_id": "pv-1"}
    )
    assert history.status_code == 404


async def test_event_for_unknown_device_is_422_and_never_sent(headend: RunningHeadend) -> None:
    gateway = headend.gateway()
    await gateway.connect()
    response = await headend.http.post(
        "/sites/site-1/intents",
        json={"events": [{**_EVENT, "device_id": "pv-9"}, _EVENT]},
    )
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert "pv-9" in detail
    assert "pv-1" in detail  # the known devices, so the operator can fix the typo
    assert (await headend.http.get("/sites/site-1/intents")).json() == []
    with pytest.raises(TimeoutError):
        await gateway.next_intent(timeout_s=0.2)

    # The device route checks its path device the same way.
    response = await headend.http.post(
        "/sites/site-1/devices/pv-9/intents", json={"events": [_EVENT]}
    )
    assert response.status_code == 422
    assert "pv-9" in response.json()["detail"]


async def test_request_validation_names_the_problem(headend: RunningHeadend) -> None:
    await headend.gateway().connect()
    cases = [
        ({}, "nothing to post"),
        ({"events": [{"duration_s": 60, "controls": {}}]}, "controls is empty"),
        ({"events": [{"duration_s": 0, "controls": {"fixed_w": 1}}]}, "duration_s"),
        ({"events": [{"duration_s": 60, "controls": {"max_gen_pct": 150}}]}, "max_gen_pct"),
        ({"events": [{"duration_s": 60, "controls": {"max_gen_percent": 5}}]}, "max_gen_percent"),
        ({"events": [{"duration_s": 60, "controls": {"export_limit_w": -1}}]}, "export_limit_w"),
        ({"constraints": {"soc_min_pct": 80, "soc_max_pct": 20}}, "soc_min_pct"),
        (
            {
                "events": [
                    {
                        "duration_s": 60,
                        "start": "2000-01-01T00:00:00Z",
                        "controls": {"connect": False},
                    }
                ]
            },
            "already have ended",
        ),
        ({"events": [{**_EVENT, "event_id": "x"}, {**_EVENT, "event_id": "x"}]}, "twice"),
        ({"events": [{**_EVENT, "randomize_start_s": 3601}]}, "randomize_start_s"),
        ({"events": [{"duration_s": 60, "controls": {"fixed_w": 2e9}}]}, "fixed_w"),
        ({"events": [{"duration_s": 60, "controls": {"fixed_w": "NaN"}}]}, "fixed_w"),
    ]
    for body, expected in cases:
        response = await headend.http.post("/sites/site-1/intents", json=body)
        assert response.status_code == 422, (body, response.text)
        assert expected in response.text, (body, response.text)
    assert (await headend.http.get("/sites/site-1/intents")).json() == []


async def test_versions_merge_carry_and_replace(headend: RunningHeadend) -> None:
    await headend.gateway().connect()
    http = headend.http
    v1 = (
        await http.post(
            "/sites/site-1/intents",
            json={
                "events": [{**_EVENT, "event_id": "ev-1"}],
                "default_control": {"max_gen_pct": 100},
                "constraints": {"export_limit_w": 5000},
            },
        )
    ).json()
    assert v1["version"] == 1
    event = v1["document"]["events"][0]
    assert event["status"] == "SCHEDULED"
    assert event["device_id"] is None
    assert event["created_at"] == event["start"]  # start absent = now
    assert event["controls"] == {**dict.fromkeys(event["controls"]), "max_gen_pct": 50.0}

    v2 = (
        await http.post(
            "/sites/site-1/devices/bat-1/intents",
            json={
                "events": [{"event_id": "ev-2", "duration_s": 900, "controls": {"fixed_w": -2000}}]
            },
        )
    ).json()
    assert v2["version"] == 2
    assert [e["event_id"] for e in v2["document"]["events"]] == ["ev-1", "ev-2"]
    assert v2["document"]["events"][1]["device_id"] == "bat-1"
    assert v2["document"]["default_control"]["max_gen_pct"] == 100  # carried over
    assert v2["document"]["constraints"]["export_limit_w"] == 5000

    # An event that ends drops out of the next version.
    headend.clock.advance(601)
    v3 = (await http.post("/sites/site-1/intents", json={"constraints": {}})).json()
    assert [e["event_id"] for e in v3["document"]["events"]] == ["ev-2"]
    assert v3["document"]["constraints"] == dict.fromkeys(v3["document"]["constraints"])

    # Reusing the id of a live event is a conflict; replace_events makes room.
    conflict = await http.post(
        "/sites/site-1/intents", json={"events": [{**_EVENT, "event_id": "ev-2"}]}
    )
    assert conflict.status_code == 409
    v4 = (
        await http.post(
            "/sites/site-1/intents",
            json={"events": [{**_EVENT, "event_id": "ev-2"}], "replace_events": True},
        )
    ).json()
    assert v4["version"] == 4
    assert [(e["event_id"], e["device_id"]) for e in v4["document"]["events"]] == [("ev-2", None)]

    # The device route may not carry site-wide settings, nor name another device.
    response = await http.post(
        "/sites/site-1/devices/pv-1/intents", json={"default_control": {"max_gen_pct": 1}}
    )
    assert response.status_code == 422
    response = await http.post(
        "/sites/site-1/devices/pv-1/intents", json={"events": [{**_EVENT, "device_id": "bat-1"}]}
    )
    assert response.status_code == 422
    assert "bat-1" in response.json()["detail"]


async def test_programs_give_events_their_primacy(headend: RunningHeadend) -> None:
    gateway = headend.gateway()
    await gateway.connect()
    http = headend.http
    unknown = await http.post(
        "/sites/site-1/intents", json={"events": [{**_EVENT, "program_id": "utility"}]}
    )
    assert unknown.status_code == 422
    assert "'utility'" in unknown.json()["detail"]
    assert "'default'" in unknown.json()["detail"]  # the advice names the implicit program

    programs = [
        {"program_id": "utility", "primacy": 1, "default_control": {"export_limit_w": 3000}},
        {"program_id": "aggregator", "primacy": 2},
    ]
    v1 = await http.post(
        "/sites/site-1/intents",
        json={
            "programs": programs,
            "events": [
                {**_EVENT, "event_id": "agg", "program_id": "aggregator"},
                {**_EVENT, "event_id": "plain"},
            ],
        },
    )
    assert v1.status_code == 201, v1.text
    document = v1.json()["document"]
    assert [(p["program_id"], p["primacy"]) for p in document["programs"]] == [
        ("utility", 1),
        ("aggregator", 2),
        ("default", 1),
    ]
    assert document["programs"][0]["default_control"]["export_limit_w"] == 3000
    assert document["programs"][1]["default_control"] is None
    assert [(e["event_id"], e["program_id"], e["primacy"]) for e in document["events"]] == [
        ("agg", "aggregator", 2),
        ("plain", "default", 1),
    ]
    sent = await gateway.next_intent()
    assert [(p.program_id, p.primacy) for p in sent.programs] == [
        ("utility", 1),
        ("aggregator", 2),
        ("default", 1),
    ]
    assert [e.program_id for e in sent.events] == ["aggregator", "default"]

    # Cancel keeps the programs; GET shows them and each event's program.
    cancelled = await http.post("/sites/site-1/events/agg/cancel")
    assert cancelled.status_code == 201, cancelled.text
    listed = (await http.get("/sites/site-1/intents/2")).json()["document"]
    assert listed["programs"] == document["programs"]
    assert [(e["event_id"], e["program_id"], e["status"]) for e in listed["events"]] == [
        ("agg", "aggregator", "CANCELLED"),
        ("plain", "default", "SCHEDULED"),
    ]
    # A post that would drop a program a live event uses is refused, naming both.
    dropped = await http.post("/sites/site-1/intents", json={"programs": programs[:1]})
    assert dropped.status_code == 422
    assert "'aggregator'" in dropped.json()["detail"]
    assert "'agg'" in dropped.json()["detail"]
    # The device route takes no programs.
    device_route = await http.post(
        "/sites/site-1/devices/pv-1/intents", json={"events": [_EVENT], "programs": programs}
    )
    assert device_route.status_code == 422
    assert "programs" in device_route.json()["detail"]


async def test_cancel_event(headend: RunningHeadend) -> None:
    gateway = headend.gateway()
    await gateway.connect()
    http = headend.http
    await http.post("/sites/site-1/intents", json={"events": [{**_EVENT, "event_id": "ev-1"}]})
    assert (await gateway.next_intent()).version == 1
    cancelled = await http.post("/sites/site-1/events/ev-1/cancel")
    assert cancelled.status_code == 201, cancelled.text
    assert cancelled.json()["version"] == 2
    assert cancelled.json()["document"]["events"][0]["status"] == "CANCELLED"
    document = await gateway.next_intent()
    assert document.version == 2
    assert document.events[0].status == pb.EVENT_STATUS_CANCELLED

    assert (await http.post("/sites/site-1/events/ev-1/cancel")).status_code == 409
    missing = await http.post("/sites/site-1/events/ev-x/cancel")
    assert missing.status_code == 404
    assert "ev-x" in missing.json()["detail"]


async def test_intent_status_per_gateway(headend: RunningHeadend) -> None:
    gateway = headend.gateway()
    await gateway.connect()
    idle = headend.gateway("gw-2", "site-1", [device("pv-2")])
    await idle.connect()
    await idle.close()
    http = headend.http
    await http.post("/sites/site-1/intents", json={"events": [{**_EVENT, "event_id": "ev-1"}]})
    await gateway.next_intent()

    async def states(version: int) -> dict[str, str]:
        body = (await http.get(f"/sites/site-1/intents/{version}")).json()
        return {g["gateway_id"]: g["state"] for g in body["gateways"]}

    assert await states(1) == {"gw-1": "delivered", "gw-2": "posted"}
    await gateway.ack_intent(1)
    batch = await gateway.send_records(
        [
            intent_status_record(1, pb.INTENT_STATE_APPLIED, active_event_id="ev-1"),
            reported_state_record(1, active_event_id="ev-1", source=pb.CONTROL_SOURCE_EVENT),
            event_response_record(1, "ev-1", pb.RESPONSE_STATUS_STARTED),
        ]
    )
    await gateway.wait_ack(batch.last_seq)
    body = (await http.get("/sites/site-1/intents/1")).json()
    status = {g["gateway_id"]: g for g in body["gateways"]}["gw-1"]
    assert status["state"] == "applied"
    assert status["ack"] == "PERSISTED"
    assert status["status"] == "APPLIED"
    assert status["active_event_id"] == "ev-1"
    assert status["delivered_at"] is not None

    await http.post("/sites/site-1/intents", json={"default_control": {"max_gen_pct": 90}})
    await gateway.next_intent()
    await gateway.ack_intent(2, pb.INTENT_ACK_STATUS_REJECTED, "signature missing")
    batch = await gateway.send_records([sample_record("pv-1", {"W": (1.0, "W")})])
    await gateway.wait_ack(batch.last_seq)  # the ack before it is processed by now
    listing = (await http.get("/sites/site-1/intents")).json()
    assert [v["version"] for v in listing] == [2, 1]
    v2 = {g["gateway_id"]: g for g in listing[0]["gateways"]}["gw-1"]
    assert (v2["state"], v2["ack"], v2["ack_reason"]) == (
        "rejected",
        "REJECTED",
        "signature missing",
    )

    await http.post("/sites/site-1/intents", json={"default_control": {"max_gen_pct": 80}})
    await gateway.next_intent()
    await gateway.ack_intent(3)
    batch = await gateway.send_records([sample_record("pv-1", {"W": (1.0, "W")})])
    await gateway.wait_ack(batch.last_seq)
    assert (await states(1))["gw-1"] == "superseded"
    assert (await states(3))["gw-1"] == "persisted"
    missing = await http.get("/sites/site-1/intents/9")
    assert missing.status_code == 404
    assert "latest is 3" in missing.json()["detail"]

    events = (await http.get("/events", params={"site_id": "site-1"})).json()
    assert [(e["event_id"], e["status"], e["gateway_id"]) for e in events] == [
        ("ev-1", "STARTED", "gw-1")
    ]
    site = (await http.get("/sites/site-1")).json()
    assert site["intent_version"] == 3
    assert [
        (r["gateway_id"], r["active_event_id"], r["source"]) for r in site["reported_state"]
    ] == [("gw-1", "ev-1", "EVENT")]


async def test_latest_telemetry(headend: RunningHeadend) -> None:
    gateway = headend.gateway()
    await gateway.connect()
    batch = await gateway.send_records(
        [
            sample_record("pv-1", {"W": (1000.0, "W"), "Hz": (50.0, "Hz")}, time_ns=10**18),
            sample_record("pv-1", {"W": (1200.0, "W")}, time_ns=10**18 + 10**9),
            sample_record(
                "bat-1", {"W": (math.nan, "W")}, quality=pb.QUALITY_BAD_COMM, error="timeout"
            ),
        ]
    )
    await gateway.wait_ack(batch.last_seq)
    points = (
        await headend.http.get(
            "/telemetry/latest", params={"site_id": "site-1", "device_id": "pv-1"}
        )
    ).json()
    assert [(p["point"], p["value"], p["unit"], p["quality"]) for p in points] == [
        ("Hz", 50.0, "Hz", "GOOD"),
        ("W", 1200.0, "W", "GOOD"),
    ]
    assert points[1]["time"] == "2001-09-09T01:46:41Z"
    every = (await headend.http.get("/telemetry/latest", params={"site_id": "site-1"})).json()
    assert ("bat-1", "W", None, "BAD_COMM") in {
        (p["device_id"], p["point"], p["value"], p["quality"]) for p in every
    }
    missing = await headend.http.get(
        "/telemetry/latest", params={"site_id": "site-1", "device_id": "pv-7"}
    )
    assert missing.status_code == 404
    assert "pv-7" in missing.json()["detail"]


async def test_history_paging_and_time_range(headend: RunningHeadend) -> None:
    gateway = headend.gateway()
    await gateway.connect()
    base_ns = 1_700_000_000 * 10**9
    records = [
        sample_record(
            "pv-1", {"W": (float(i), "W"), "Hz": (50.0, "Hz")}, time_ns=base_ns + i * 10**9
        )
        for i in range(25)
    ]
    batch = await gateway.send_records(records)
    await gateway.wait_ack(batch.last_seq)

    seen: list[float] = []
    cursor: str | None = None
    pages = 0
    while True:
        params = {"site_id": "site-1", "device_id": "pv-1", "point": "W", "limit": "10"}
        if cursor is not None:
            params["cursor"] = cursor
        page = (await headend.http.get("/telemetry/history", params=params)).json()
        pages += 1
        seen += [item["value"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 3
    assert seen == [float(i) for i in range(25)]

    # Without a point filter every point is an item; paging can split a sample.
    page = (
        await headend.http.get(
            "/telemetry/history", params={"site_id": "site-1", "device_id": "pv-1", "limit": "3"}
        )
    ).json()
    assert [(i["point"], i["value"]) for i in page["items"]] == [
        ("W", 0.0),
        ("Hz", 50.0),
        ("W", 1.0),
    ]
    page = (
        await headend.http.get(
            "/telemetry/history",
            params={
                "site_id": "site-1",
                "device_id": "pv-1",
                "limit": "3",
                "cursor": page["next_cursor"],
            },
        )
    ).json()
    assert [(i["point"], i["value"]) for i in page["items"]] == [
        ("Hz", 50.0),
        ("W", 2.0),
        ("Hz", 50.0),
    ]

    ranged = (
        await headend.http.get(
            "/telemetry/history",
            params={
                "site_id": "site-1",
                "device_id": "pv-1",
                "point": "W",
                "start": "2023-11-14T22:13:25Z",  # base + 5 s
                "end": "2023-11-14T22:13:28",  # no offset = UTC; exclusive
            },
        )
    ).json()
    assert [i["value"] for i in ranged["items"]] == [5.0, 6.0, 7.0]
    assert ranged["items"][0]["time"] == "2023-11-14T22:13:25Z"

    bad = await headend.http.get(
        "/telemetry/history", params={"site_id": "site-1", "device_id": "pv-1", "cursor": "garbage"}
    )
    assert bad.status_code == 400
    assert "cursor" in bad.json()["detail"]
    backwards = await headend.http.get(
        "/telemetry/history",
        params={
            "site_id": "site-1",
            "device_id": "pv-1",
            "start": "2024-01-02",
            "end": "2024-01-01",
        },
    )
    assert backwards.status_code == 422


async def test_feeder_aggregation(headend: RunningHeadend) -> None:
    a = headend.gateway("gw-a", "site-a", feeder="fdr-1")
    b = headend.gateway(
        "gw-b",
        "site-b",
        [device("pv-b", max_w=4000.0), device("bat-b", pb.DEVICE_KIND_BATTERY, max_w=2000.0)],
        feeder="fdr-1",
    )
    c = headend.gateway("gw-c", "site-c", [device("pv-c", max_w=7000.0)], feeder="fdr-2")
    for gateway in (a, b, c):
        await gateway.connect()
    batch = await a.send_records(
        [
            sample_record("pv-1", {"W": (1500.0, "W")}),
            sample_record("bat-1", {"W": (-500.0, "W")}),
            sample_record("meter-1", {"W": (900.0, "W")}),  # a meter is not output
        ]
    )
    await a.wait_ack(batch.last_seq)
    batch = await b.send_records(
        [
            sample_record("pv-b", {"W": (2500.0, "W")}),
            sample_record(
                "bat-b", {"W": (math.nan, "W")}, quality=pb.QUALITY_BAD_COMM, error="timeout"
            ),
        ]
    )
    await b.wait_ack(batch.last_seq)
    batch = await c.send_records([sample_record("pv-c", {"W": (6000.0, "W")})])
    await c.wait_ack(batch.last_seq)
    await c.close()  # offline: its output no longer counts, its capacity does

    async def feeders() -> dict[str, dict[str, object]]:
        body = (await headend.http.get("/grid/feeders")).json()
        return {f["feeder"]: f for f in body}

    async def c_offline() -> bool:
        return (await feeders())["fdr-2"]["gateways_online"] == 0

    await async_wait_until(c_offline, timeout_s=2.0, what="gw-c to read as offline")
    result = await feeders()
    nothing_reported = result["fdr-1"].pop("flexibility")
    assert nothing_reported["gateways_reporting"] == 0
    assert nothing_reported["up_w"] == 0.0
    assert result["fdr-1"] == {
        "substation": "sub-1",
        "feeder": "fdr-1",
        "site_ids": ["site-a", "site-b"],
        "gateways_total": 2,
        "gateways_online": 2,
        "devices_total": 5,
        "devices_online": 4,  # bat-b's latest read failed
        "current_output_w": 1500.0 - 500.0 + 2500.0,
        "enrolled_capacity_w": 5000.0 + 3000.0 + 4000.0 + 2000.0,
    }
    assert result["fdr-2"]["current_output_w"] == 0.0
    assert result["fdr-2"]["enrolled_capacity_w"] == 7000.0
    assert result["fdr-2"]["devices_online"] == 0


async def test_presence_goes_stale_without_refresh(headend: RunningHeadend) -> None:
    gateway = headend.gateway()
    await gateway.connect()
    assert (await headend.http.get("/gateways/gw-1")).json()["online"] is True
    # No refresh for longer than 2 x keepalive (20 s): the row reads offline, as it would after
    # a headend crash that left stream_open set.
    headend.clock.advance(41)
    body = (await headend.http.get("/gateways/gw-1")).json()
    assert body["online"] is False
    assert body["connected_since"] is None
    batch = await gateway.send_records([sample_record("pv-1", {"W": (1.0, "W")})])
    await gateway.wait_ack(batch.last_seq)  # any message refreshes last_seen
    assert (await headend.http.get("/gateways/gw-1")).json()["online"] is True
    assert (await headend.http.get("/gateways/gw-x")).status_code == 404


async def test_sites_listing_and_detail(headend: RunningHeadend) -> None:
    await headend.gateway("gw-1", "site-1").connect()
    await headend.gateway("gw-2", "site-1", [device("pv-2")]).connect()
    lone = headend.gateway("gw-3", "site-2", [device("pv-3")], feeder="fdr-2")
    await lone.connect()
    await lone.close()
    await headend.http.post("/sites/site-2/intents", json={"default_control": {"connect": True}})

    async def settled() -> bool:
        sites = (await headend.http.get("/sites")).json()
        return bool(sites[1]["gateways_online"] == 0)

    await async_wait_until(settled, timeout_s=2.0, what="gw-3 to read as offline")
    sites = (await headend.http.get("/sites")).json()
    summary = {
        s["site_id"]: (
            s["gateway_ids"],
            s["gateways_online"],
            s["device_count"],
            s["intent_version"],
        )
        for s in sites
    }
    assert summary == {
        "site-1": (["gw-1", "gw-2"], 2, 4, 0),
        "site-2": (["gw-3"], 0, 1, 1),
    }
    detail = (await headend.http.get("/sites/site-2")).json()
    assert (detail["substation"], detail["feeder"]) == ("sub-1", "fdr-2")
    assert [d["device_id"] for d in detail["devices"]] == ["pv-3"]
    assert detail["devices"][0]["nameplate"]["max_w"] == 5000.0
    assert [g["gateway_id"] for g in detail["gateways"]] == ["gw-3"]
    assert detail["reported_state"] == []

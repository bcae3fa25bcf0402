"""Flexibility reports at the headend: ingest, storage, aggregation, and the HTTP views."""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import pytest

from dergw.v1 import pb, timestamp_from_ns
from drivers.contract import DeviceKind
from gateway.flexibility import FlexDevice, SiteLimits, compute_flexibility
from gateway.flexibility_wire import flexibility_payload
from gateway.forecast import MINUTE_NS, HistoryArrays, forecast
from headend_min.fleet import (
    FLEXIBILITY_MAX_AGE_NS,
    flexibility_counts,
    forecast_at,
    summarize_feeders,
    summarize_flexibility,
)
from headend_min.ingest import flexibility_record, plan_telemetry, registration_from_pb
from headend_min.model import (
    FlexibilityRecord,
    ForecastPointRecord,
    GatewayRecord,
    SiteInfo,
    StreamRef,
)
from headend_min.sqlite_store import SqliteStore
from tests.headend.fake_gateway import FakeGateway, device, sample_record, site
from tests.headend.harness import RunningHeadend
from tests.support import async_wait_until

NOW = 1_700_000_000 * 10**9
S = 1_000_000_000


def flex_record(
    *,
    time_ns: int,
    up_w: float = 1000.0,
    down_w: float = 2000.0,
    pv_w: float = 3000.0,
    load_w: float = 800.0,
    points: Sequence[tuple[int, float, float, float]] = (),
) -> pb.Record:
    return pb.Record(
        flexibility=pb.Flexibility(
            time=timestamp_from_ns(time_ns),
            up_w=up_w,
            down_w=down_w,
            pv_w=pv_w,
            load_w=load_w,
            battery_w=-500.0,
            battery_energy_wh=4000.0,
            battery_capacity_wh=9000.0,
            forecast=[
                pb.ForecastPoint(offset_s=offset, pv_w=pv, load_w=load, battery_energy_wh=energy)
                for offset, pv, load, energy in points
            ],
        )
    )


def record(
    gateway_id: str,
    *,
    time_ns: int = NOW,
    up_w: float | None = 1000.0,
    load_w: float | None = 800.0,
    points: Sequence[tuple[int, float | None]] = ((900, 100.0), (14_400, 400.0)),
) -> FlexibilityRecord:
    return FlexibilityRecord(
        gateway_id=gateway_id,
        seq=1,
        time_ns=time_ns,
        up_w=up_w,
        down_w=2000.0,
        pv_w=3000.0,
        load_w=load_w,
        battery_w=-500.0,
        battery_energy_wh=4000.0,
        battery_capacity_wh=9000.0,
        forecast=tuple(ForecastPointRecord(o, pv, 700.0, 5000.0) for o, pv in points),
    )


def gateway(gateway_id: str, site_id: str, *, online: bool = True) -> GatewayRecord:
    return GatewayRecord(gateway_id, site_id, "1", "b", NOW, online, NOW, NOW, 0, 0, 0, 1)


# -- ingest --------------------------------------------------------------------------------------


def test_plan_keeps_the_report_and_nan_reads_as_unknown() -> None:
    fake = FakeGateway("unused:0", gateway_id="gw-1", site=site("site-1"), devices=[])
    report = flex_record(
        time_ns=NOW,
        load_w=math.nan,
        points=[(600, 20.0, 700.0, 1.0), (300, math.nan, 710.0, 2.0)],
    )
    rows = plan_telemetry(fake.batch([report]), "gw-1")
    assert [(r.seq, r.time_ns, r.up_w, r.down_w) for r in rows.flexibility] == [
        (1, NOW, 1000.0, 2000.0)
    ]
    assert rows.unknown == []
    decoded = flexibility_record("gw-1", 1, rows.flexibility[0].payload)
    assert decoded.load_w is None
    assert decoded.battery_capacity_wh == 9000.0
    assert [(p.offset_s, p.pv_w) for p in decoded.forecast] == [(300, None), (600, 20.0)]
    nan_up = plan_telemetry(fake.batch([flex_record(time_ns=NOW, up_w=math.nan)]), "gw-1")
    assert nan_up.flexibility[0].up_w is None


# -- aggregation (pure) --------------------------------------------------------------------------


def test_forecast_at_interpolates_within_the_forecast() -> None:
    report = record("g", points=((300, 100.0), (600, 200.0), (900, None)))
    assert forecast_at(report, 300) == ForecastPointRecord(300, 100.0, 700.0, 5000.0)
    middle = forecast_at(report, 400)
    assert middle is not None
    assert middle.pv_w == pytest.approx(100.0 + 100.0 / 3)
    unknown = forecast_at(report, 700)
    assert unknown is not None
    assert unknown.pv_w is None  # one neighbour unknown: unknown
    assert unknown.load_w == 700.0
    assert forecast_at(report, 299) is None
    assert forecast_at(report, 901) is None
    assert forecast_at(record("g", points=()), 300) is None
    assert forecast_at(record("g", points=((900, 1.0),)), 900) is not None


def test_summary_counts_fresh_reports_and_shifts_horizons_to_now() -> None:
    points = ((300, 0.0), (900, 100.0), (1200, 200.0), (14_400, 400.0), (14_700, 500.0))
    fresh = record("g1", points=points)
    older = record("g2", time_ns=NOW - 300 * S, up_w=None, load_w=None, points=points)
    summary = summarize_flexibility([fresh, older], now_ns=NOW)
    assert summary.gateways_reporting == 2
    assert summary.up_w == 1000.0  # g2's unknown up is left out, not counted as 0 or NaN
    assert summary.down_w == 4000.0
    assert summary.load_w == 800.0
    assert summary.battery_capacity_wh == 18_000.0
    assert summary.oldest_report_ns == NOW - 300 * S
    at_15, at_4h = summary.forecast
    assert (at_15.horizon_s, at_15.gateways) == (900, 2)
    # g2 reported 5 minutes ago: its +20 min point is +15 min from now.
    assert at_15.pv_w == 100.0 + 200.0
    assert (at_4h.horizon_s, at_4h.pv_w) == (14_400, 400.0 + 500.0)
    assert summarize_flexibility([], now_ns=NOW).forecast[0].gateways == 0
    assert flexibility_counts(fresh, online=True, now_ns=NOW, max_age_ns=FLEXIBILITY_MAX_AGE_NS)
    assert not flexibility_counts(fresh, online=False, now_ns=NOW, max_age_ns=10**12)
    stale = record("g3", time_ns=NOW - FLEXIBILITY_MAX_AGE_NS - 1)
    assert not flexibility_counts(stale, online=True, now_ns=NOW, max_age_ns=FLEXIBILITY_MAX_AGE_NS)


def test_feeders_sum_the_online_gateways_reports() -> None:
    sites = [
        SiteInfo("s1", "", "sub", "f1", None, None),
        SiteInfo("s2", "", "sub", "f1", None, None),
        SiteInfo("s3", "", "sub", "f2", None, None),
    ]
    gateways = [
        gateway("g1", "s1"),
        gateway("g2", "s2"),
        gateway("g3", "s2", online=False),
        gateway("g4", "s3"),
    ]
    reports = [
        record("g1"),
        record("g2", up_w=500.0),
        record("g3", up_w=9999.0),  # offline: not counted
        record("g4", time_ns=NOW - 3600 * S),  # an hour old: not counted
        record("g-unknown"),
    ]
    f1, f2 = summarize_feeders(
        sites, gateways, [], [], [], now_ns=NOW, stale_after_ns=40 * S, flexibility=reports
    )
    assert f1.flexibility.gateways_reporting == 2
    assert f1.flexibility.up_w == 1500.0
    horizons = [(f.horizon_s, f.pv_w) for f in f1.flexibility.forecast]
    assert horizons == [(900, 200.0), (14_400, 800.0)]
    assert f2.flexibility.gateways_reporting == 0
    assert f2.flexibility.up_w == 0.0


# -- storage -------------------------------------------------------------------------------------


async def test_store_keeps_every_report_and_the_newest_per_gateway(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "h.sqlite3")
    fake = FakeGateway("unused:0", gateway_id="gw-1", site=site("site-1"), devices=[])
    try:
        await store.register_gateway(
            registration_from_pb(fake.register_message().register), StreamRef("gw-1", "s"), NOW
        )
        early = fake.batch([flex_record(time_ns=NOW, up_w=float(i)) for i in range(1, 4)])
        late = fake.batch([flex_record(time_ns=NOW + 60 * S, up_w=9.0)])
        await store.commit_telemetry(plan_telemetry(late, "gw-1"), NOW)
        for _ in range(2):  # resent after a reconnect, then replayed: no rollback, no duplicate
            await store.commit_telemetry(plan_telemetry(early, "gw-1"), NOW)
        (latest,) = await store.latest_flexibility("site-1")
        assert (latest.seq, latest.up_w, latest.time_ns) == (4, 9.0, NOW + 60 * S)
        assert await store.latest_flexibility("other-site") == []
        assert len(await store.latest_flexibility()) == 1
    finally:
        await store.close()
    with sqlite3.connect(tmp_path / "h.sqlite3") as db:
        assert db.execute("SELECT COUNT(*) FROM flexibility").fetchone()[0] == 4


# -- HTTP, with the gateway's own encoder on the real link ----------------------------------------


def gateway_report(wall_ns: int, *, battery_w: float, soc: float) -> pb.Record:
    """What a gateway sends: computed and encoded by gateway.flexibility / gateway.forecast."""
    devices = [
        FlexDevice("pv-1", DeviceKind.PV, 5000.0, measured_w=2000.0, cap_w=2000.0),
        FlexDevice(
            "bat-1",
            DeviceKind.BATTERY,
            3000.0,
            measured_w=battery_w,
            max_charge_w=3000.0,
            max_discharge_w=3000.0,
            soc_pct=soc,
            capacity_wh=10_000.0,
        ),
    ]
    limits = SiteLimits(pcc_w=-500.0, soc_min_pct=10.0, soc_max_pct=90.0)
    flexibility = compute_flexibility(devices, limits, pv_available_w=4000.0)
    prediction = forecast(
        HistoryArrays.empty(wall_ns // MINUTE_NS),
        wall_ns,
        None,
        pv_rating_w=5000.0,
        battery_energy_wh=flexibility.totals.battery_energy_wh,
        battery_capacity_wh=flexibility.totals.battery_capacity_wh,
        battery_w_now=battery_w,
    )
    payload = flexibility_payload(wall_ns, flexibility, prediction)
    return pb.Record(flexibility=pb.Flexibility.FromString(payload))


async def test_site_and_feeder_views(headend: RunningHeadend) -> None:
    assert (await headend.http.get("/sites/nope/flexibility")).status_code == 404
    a = headend.gateway("gw-a", "site-a", [device("pv-1")], feeder="fdr-1")
    b = headend.gateway("gw-b", "site-b", [device("pv-1")], feeder="fdr-1")
    c = headend.gateway("gw-c", "site-c", [device("pv-1")], feeder="fdr-2")
    for fake in (a, b, c):
        await fake.connect()
    empty = (await headend.http.get("/sites/site-a/flexibility")).json()
    assert empty["gateways"] == []
    assert empty["totals"]["gateways_reporting"] == 0
    # The headend's clock, not time.time_ns(): the aging check below advances that clock by
    # just over the max age, so the report must be stamped on the same time line.
    now = headend.clock.wall_ns()
    # gw-a: PV capped at 2 kW of 4 kW available, battery idle at 50 % (4 kWh above the floor).
    for fake, battery_w in ((a, 0.0), (b, -1000.0), (c, 0.0)):
        batch = await fake.send_records([gateway_report(now, battery_w=battery_w, soc=50.0)])
        await fake.wait_ack(batch.last_seq)

    body = (await headend.http.get("/sites/site-a/flexibility")).json()
    (report,) = body["gateways"]
    assert report["gateway_id"] == "gw-a"
    assert (report["online"], report["counted"]) == (True, True)
    assert report["up_w"] == 2000.0 + 3000.0
    assert report["down_w"] == 2000.0 + 3000.0
    assert report["load_w"] == -500.0 + 2000.0
    assert (report["battery_energy_wh"], report["battery_capacity_wh"]) == (4000.0, 8000.0)
    assert len(report["forecast"]) == 48
    assert report["forecast"][2]["offset_s"] == 900
    assert report["forecast"][0]["pv_w"] is None  # no history: no basis, shown as null
    assert report["forecast"][-1]["battery_energy_wh"] == 4000.0
    assert report["time"].endswith("Z")
    assert body["totals"]["up_w"] == 5000.0

    async def fdr_2_offline() -> bool:
        feeders = (await headend.http.get("/grid/feeders")).json()
        return {f["feeder"]: f for f in feeders}["fdr-2"]["gateways_online"] == 0

    await c.close()
    await async_wait_until(fdr_2_offline, timeout_s=2.0, what="gw-c to read as offline")
    feeders = {f["feeder"]: f for f in (await headend.http.get("/grid/feeders")).json()}
    fdr_1 = feeders["fdr-1"]["flexibility"]
    assert fdr_1["gateways_reporting"] == 2
    # gw-b charges at 1 kW: 1 kW more up (it stops) and 1 kW less down.
    assert fdr_1["up_w"] == 5000.0 + 6000.0
    assert fdr_1["down_w"] == 5000.0 + 4000.0
    assert fdr_1["battery_energy_wh"] == 8000.0
    assert [(p["horizon_s"], p["gateways"]) for p in fdr_1["forecast"]] == [(900, 2), (14_400, 2)]
    # gw-b's battery keeps charging at 1 kW (no history says otherwise): +250 Wh by +15 min.
    assert fdr_1["forecast"][0]["battery_energy_wh"] == pytest.approx(4000.0 + 4250.0, abs=20.0)
    assert feeders["fdr-2"]["flexibility"]["gateways_reporting"] == 0  # offline

    # Reports age out of the totals, but the site view still shows the newest one.
    headend.clock.advance(FLEXIBILITY_MAX_AGE_NS / S + 1)
    for fake in (a, b):  # keep them online: any message refreshes presence
        batch = await fake.send_records([sample_record("pv-1", {"W": (1.0, "W")})])
        await fake.wait_ack(batch.last_seq)
    aged = (await headend.http.get("/sites/site-a/flexibility")).json()
    assert aged["gateways"][0]["counted"] is False
    assert aged["totals"]["up_w"] == 0.0

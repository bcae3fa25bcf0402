"""Pure fleet views: presence, feeder aggregation, per-gateway intent progress."""

from __future__ import annotations

from dergw.v1 import pb
from headend_min.fleet import enrolled_capacity_w, intent_progress, is_online, summarize_feeders
from headend_min.model import (
    DeviceInfo,
    DeviceRecord,
    GatewayRecord,
    IntentDeliveryRecord,
    IntentStatusRecord,
    LatestPoint,
    Nameplate,
    ReportedStateRecord,
    SampleStatus,
    SiteInfo,
)

NOW = 1_700_000_000 * 10**9
STALE = 40 * 10**9


def gateway(
    gateway_id: str,
    site_id: str,
    *,
    stream_open: bool = True,
    last_seen_ns: int | None = NOW,
    intent_version: int = 0,
) -> GatewayRecord:
    return GatewayRecord(
        gateway_id=gateway_id,
        site_id=site_id,
        software_version="1",
        boot_id="b",
        registered_at_ns=NOW,
        stream_open=stream_open,
        connected_since_ns=NOW,
        last_seen_ns=last_seen_ns,
        intent_version=intent_version,
        committed_seq=0,
        oldest_unacked_seq=0,
        next_seq=1,
    )


def dev(gateway_id: str, device_id: str, kind: str, max_w: float, **plate: float) -> DeviceRecord:
    return DeviceRecord(
        gateway_id,
        DeviceInfo(device_id, kind, "", "", "", "", "", "", Nameplate(max_w=max_w, **plate), ()),
    )


def watts(gateway_id: str, device_id: str, value: float | None, quality: int = 1) -> LatestPoint:
    return LatestPoint(gateway_id, device_id, "W", value, "W", quality, NOW, 1)


def test_presence() -> None:
    assert is_online(gateway("g", "s"), now_ns=NOW, stale_after_ns=STALE)
    assert is_online(gateway("g", "s", last_seen_ns=NOW - STALE), now_ns=NOW, stale_after_ns=STALE)
    # A stream left "open" by a crashed headend goes stale.
    stale = gateway("g", "s", last_seen_ns=NOW - STALE - 1)
    assert not is_online(stale, now_ns=NOW, stale_after_ns=STALE)
    assert not is_online(gateway("g", "s", stream_open=False), now_ns=NOW, stale_after_ns=STALE)
    assert not is_online(gateway("g", "s", last_seen_ns=None), now_ns=NOW, stale_after_ns=STALE)


def test_enrolled_capacity() -> None:
    assert enrolled_capacity_w(dev("g", "pv", "PV", 5000.0).device) == 5000.0
    assert enrolled_capacity_w(dev("g", "m", "METER", 9999.0).device) == 0.0
    battery = dev("g", "b", "BATTERY", 0.0, max_discharge_w=2500.0).device
    assert enrolled_capacity_w(battery) == 2500.0


def test_feeder_summary() -> None:
    sites = [
        SiteInfo("s1", "", "subA", "f1", None, None),
        SiteInfo("s2", "", "subA", "f1", None, None),
        SiteInfo("s3", "", "subB", "f9", None, None),
    ]
    gateways = [
        gateway("g1", "s1"),
        gateway("g2", "s2", last_seen_ns=NOW - STALE - 1),  # stale: offline
        gateway("g3", "s3"),
    ]
    devices = [
        dev("g1", "pv", "PV", 4000.0),
        dev("g1", "bat", "BATTERY", 2000.0),
        dev("g1", "meter", "METER", 0.0),
        dev("g1", "pv-bad", "PV", 1000.0),
        dev("g2", "pv", "PV", 3000.0),
    ]
    status = [
        SampleStatus("g1", "pv", NOW, 1, True, ""),
        SampleStatus("g1", "bat", NOW, 2, True, ""),
        SampleStatus("g1", "meter", NOW, 3, True, ""),
        SampleStatus("g1", "pv-bad", NOW, 4, False, "timeout"),
        SampleStatus("g2", "pv", NOW, 1, True, ""),
    ]
    points = [
        watts("g1", "pv", 3000.0),
        watts("g1", "bat", -1000.0),
        watts("g1", "meter", 5000.0),
        watts("g1", "pv-bad", 800.0),  # stale value of a device whose last read failed
        watts("g2", "pv", 2500.0),  # gateway offline
    ]
    (f1, f9) = summarize_feeders(
        sites, gateways, devices, status, points, now_ns=NOW, stale_after_ns=STALE
    )
    assert (f1.substation, f1.feeder, f1.site_ids) == ("subA", "f1", ("s1", "s2"))
    assert (f1.gateways_total, f1.gateways_online) == (2, 1)
    assert (f1.devices_total, f1.devices_online) == (5, 3)
    assert f1.current_output_w == 2000.0
    assert f1.enrolled_capacity_w == 10000.0
    assert (f9.gateways_total, f9.devices_total, f9.current_output_w) == (1, 0, 0.0)


def test_intent_progress_precedence() -> None:
    gw = gateway("g", "s", intent_version=1)
    posted = intent_progress(2, gw, None, None, None)
    assert posted.state == "posted"
    delivery = IntentDeliveryRecord("g", 2, NOW, None, "", None)
    assert intent_progress(2, gw, delivery, None, None).state == "delivered"
    acked = IntentDeliveryRecord("g", 2, NOW, pb.INTENT_ACK_STATUS_STALE, "", NOW)
    assert intent_progress(2, gw, acked, None, None).state == "stale"
    failed = IntentStatusRecord("g", 9, 2, pb.INTENT_STATE_FAILED, "write failed", NOW, "")
    progress = intent_progress(2, gw, acked, failed, None)
    assert (progress.state, progress.status_reason) == ("failed", "write failed")
    assert progress.active_event_id == ""
    reported = ReportedStateRecord("g", 10, pb.ReportedState(intent_version=2, active_event_id="e"))
    assert intent_progress(2, gw, acked, failed, reported).active_event_id == "e"
    assert intent_progress(1, gw, None, None, None).state == "persisted"  # held at registration
    newer = gateway("g", "s", intent_version=3)
    superseded = intent_progress(2, newer, acked, failed, None)
    assert (superseded.state, superseded.superseded) == ("superseded", True)

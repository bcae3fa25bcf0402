"""Fleet views computed from stored rows (pure; no I/O): presence, intent progress, feeders,
flexibility.

Nothing here is cached: every view is recomputed from what the store returns, which is what keeps
the headend stateless (any instance, or a restarted one, shows the same answers).
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from dergw.v1 import pb
from headend_min.model import (
    DeviceInfo,
    DeviceRecord,
    FlexibilityRecord,
    ForecastPointRecord,
    GatewayRecord,
    IntentDeliveryRecord,
    IntentStatusRecord,
    LatestPoint,
    ReportedStateRecord,
    SampleStatus,
    SiteInfo,
)

__all__ = [
    "FLEXIBILITY_HORIZONS_S",
    "FLEXIBILITY_MAX_AGE_NS",
    "GENERATION_KINDS",
    "OUTPUT_POINT",
    "FeederSummary",
    "FlexibilitySummary",
    "ForecastSum",
    "GatewayIntentProgress",
    "enrolled_capacity_w",
    "flexibility_counts",
    "forecast_at",
    "intent_progress",
    "is_online",
    "summarize_feeders",
    "summarize_flexibility",
]

# Device kinds whose output and capacity count towards a feeder's controllable generation.
GENERATION_KINDS = frozenset({"PV", "BATTERY"})
# The SunSpec name of total AC active power (W); the gateway reports it under this name.
OUTPUT_POINT = "W"
# Forecast horizons the aggregate views sum, counted from now: +15 min and +4 h.
FLEXIBILITY_HORIZONS_S = (900, 4 * 3600)
# A flexibility report older than this no longer counts (gateways report once a minute).
FLEXIBILITY_MAX_AGE_NS = 300 * 1_000_000_000


def is_online(gateway: GatewayRecord, *, now_ns: int, stale_after_ns: int) -> bool:
    """Online = a stream is open *and* it refreshed last_seen recently.

    The second half makes presence survive a headend crash: rows of streams that died with their
    process still say stream_open, but stop being refreshed and so read as offline.
    """
    return (
        gateway.stream_open
        and gateway.last_seen_ns is not None
        and now_ns - gateway.last_seen_ns <= stale_after_ns
    )


def enrolled_capacity_w(device: DeviceInfo) -> float:
    """Nameplate capacity a generation device brings (W); 0 for other kinds."""
    if device.kind not in GENERATION_KINDS:
        return 0.0
    plate = device.nameplate
    if device.kind == "BATTERY" and plate.max_w <= 0:
        # Some batteries publish only their discharge rating.
        return max(plate.max_discharge_w, 0.0)
    return max(plate.max_w, 0.0)


@dataclass(frozen=True, slots=True)
class ForecastSum:
    """Forecasts of the counted gateways at one horizon from now, summed."""

    horizon_s: int
    pv_w: float
    load_w: float
    battery_energy_wh: float
    gateways: int  # how many counted reports reach this horizon


@dataclass(frozen=True, slots=True)
class FlexibilitySummary:
    """Flexibility of a set of gateways, summed over the fresh reports of the online ones.

    A value a gateway reported as unknown (NaN) is left out of its sum.
    """

    gateways_reporting: int
    up_w: float
    down_w: float
    pv_w: float
    load_w: float
    battery_w: float
    battery_energy_wh: float
    battery_capacity_wh: float
    forecast: tuple[ForecastSum, ...]
    oldest_report_ns: int | None  # the time of the oldest report counted


def forecast_at(record: FlexibilityRecord, offset_s: float) -> ForecastPointRecord | None:
    """The report's forecast `offset_s` after its time: a point, or linear between two.

    None when the offset lies outside the forecast. A value unknown at either neighbour is
    unknown in between.
    """
    points = record.forecast
    if not points or not points[0].offset_s <= offset_s <= points[-1].offset_s:
        return None
    for before, after in itertools.pairwise(points):
        if before.offset_s <= offset_s <= after.offset_s:
            span = after.offset_s - before.offset_s
            share = (offset_s - before.offset_s) / span if span > 0 else 0.0

            def between(a: float | None, b: float | None, share: float = share) -> float | None:
                return None if a is None or b is None else a + (b - a) * share

            return ForecastPointRecord(
                round(offset_s),
                between(before.pv_w, after.pv_w),
                between(before.load_w, after.load_w),
                between(before.battery_energy_wh, after.battery_energy_wh),
            )
    return points[0]  # a single point, exactly at offset_s


def _known(values: Iterable[float | None]) -> float:
    return sum(value for value in values if value is not None)


def flexibility_counts(
    record: FlexibilityRecord, *, online: bool, now_ns: int, max_age_ns: int
) -> bool:
    """A report counts when its gateway is online and it is recent (either way: clocks skew)."""
    return online and abs(now_ns - record.time_ns) <= max_age_ns


def summarize_flexibility(
    records: Iterable[FlexibilityRecord],
    *,
    now_ns: int,
    horizons_s: Iterable[int] = FLEXIBILITY_HORIZONS_S,
) -> FlexibilitySummary:
    """Sum reports already filtered by `flexibility_counts`; horizons are counted from now."""
    counted = list(records)
    forecast: list[ForecastSum] = []
    for horizon in horizons_s:
        points = [
            point
            for record in counted
            if (point := forecast_at(record, horizon + (now_ns - record.time_ns) / 1e9)) is not None
        ]
        forecast.append(
            ForecastSum(
                horizon_s=horizon,
                pv_w=_known(p.pv_w for p in points),
                load_w=_known(p.load_w for p in points),
                battery_energy_wh=_known(p.battery_energy_wh for p in points),
                gateways=len(points),
            )
        )
    return FlexibilitySummary(
        gateways_reporting=len(counted),
        up_w=_known(r.up_w for r in counted),
        down_w=_known(r.down_w for r in counted),
        pv_w=_known(r.pv_w for r in counted),
        load_w=_known(r.load_w for r in counted),
        battery_w=_known(r.battery_w for r in counted),
        battery_energy_wh=_known(r.battery_energy_wh for r in counted),
        battery_capacity_wh=_known(r.battery_capacity_wh for r in counted),
        forecast=tuple(forecast),
        oldest_report_ns=min((r.time_ns for r in counted), default=None),
    )


@dataclass(frozen=True, slots=True)
class FeederSummary:
    substation: str
    feeder: str
    site_ids: tuple[str, ...]
    gateways_total: int
    gateways_online: int
    devices_total: int
    devices_online: int
    current_output_w: float
    enrolled_capacity_w: float
    flexibility: FlexibilitySummary


def summarize_feeders(
    sites: Iterable[SiteInfo],
    gateways: Iterable[GatewayRecord],
    devices: Iterable[DeviceRecord],
    sample_status: Iterable[SampleStatus],
    output_points: Iterable[LatestPoint],
    *,
    now_ns: int,
    stale_after_ns: int,
    flexibility: Iterable[FlexibilityRecord] = (),
    flexibility_max_age_ns: int = FLEXIBILITY_MAX_AGE_NS,
) -> list[FeederSummary]:
    """Aggregate by (substation, feeder).

    A device is online when its gateway is online and its newest read succeeded with at least one
    GOOD point. Current output sums the latest GOOD `W` of online PV and battery devices;
    enrolled capacity sums the nameplate of every PV and battery device, online or not.
    Flexibility sums the newest report of each online gateway, if it is recent
    (`flexibility_max_age_ns`), with the forecasts at FLEXIBILITY_HORIZONS_S from now.
    """
    feeder_of_site = {site.site_id: (site.substation, site.feeder) for site in sites}
    site_ids: dict[tuple[str, str], set[str]] = defaultdict(set)
    for site_id, key in feeder_of_site.items():
        site_ids[key].add(site_id)

    online_gateways: set[str] = set()
    feeder_of_gateway: dict[str, tuple[str, str]] = {}
    gateways_total: dict[tuple[str, str], int] = defaultdict(int)
    gateways_online: dict[tuple[str, str], int] = defaultdict(int)
    for gateway in gateways:
        gateway_feeder = feeder_of_site.get(gateway.site_id)
        if gateway_feeder is None:
            continue
        feeder_of_gateway[gateway.gateway_id] = gateway_feeder
        gateways_total[gateway_feeder] += 1
        if is_online(gateway, now_ns=now_ns, stale_after_ns=stale_after_ns):
            online_gateways.add(gateway.gateway_id)
            gateways_online[gateway_feeder] += 1

    read_ok = {(s.gateway_id, s.device_id) for s in sample_status if s.ok}
    output_w = {
        (p.gateway_id, p.device_id): p.value
        for p in output_points
        if p.point == OUTPUT_POINT and p.quality == pb.QUALITY_GOOD and p.value is not None
    }
    devices_total: dict[tuple[str, str], int] = defaultdict(int)
    devices_online: dict[tuple[str, str], int] = defaultdict(int)
    current_output: dict[tuple[str, str], float] = defaultdict(float)
    capacity: dict[tuple[str, str], float] = defaultdict(float)
    for record in devices:
        device_feeder = feeder_of_gateway.get(record.gateway_id)
        if device_feeder is None:
            continue
        device_key = (record.gateway_id, record.device.device_id)
        devices_total[device_feeder] += 1
        capacity[device_feeder] += enrolled_capacity_w(record.device)
        if record.gateway_id in online_gateways and device_key in read_ok:
            devices_online[device_feeder] += 1
            if record.device.kind in GENERATION_KINDS:
                current_output[device_feeder] += output_w.get(device_key, 0.0)

    reports: dict[tuple[str, str], list[FlexibilityRecord]] = defaultdict(list)
    for report in flexibility:
        report_feeder = feeder_of_gateway.get(report.gateway_id)
        online = report.gateway_id in online_gateways
        if report_feeder is not None and flexibility_counts(
            report, online=online, now_ns=now_ns, max_age_ns=flexibility_max_age_ns
        ):
            reports[report_feeder].append(report)

    return [
        FeederSummary(
            substation=key[0],
            feeder=key[1],
            site_ids=tuple(sorted(site_ids[key])),
            gateways_total=gateways_total[key],
            gateways_online=gateways_online[key],
            devices_total=devices_total[key],
            devices_online=devices_online[key],
            current_output_w=current_output[key],
            enrolled_capacity_w=capacity[key],
            flexibility=summarize_flexibility(reports.get(key, ()), now_ns=now_ns),
        )
        for key in sorted(site_ids)
    ]


@dataclass(frozen=True, slots=True)
class GatewayIntentProgress:
    """Where one intent version stands at one gateway."""

    gateway_id: str
    version: int
    # posted < delivered < persisted | stale | rejected < applied | failed; or superseded.
    state: str
    delivered_at_ns: int | None
    ack_status: int | None
    ack_reason: str
    acked_at_ns: int | None
    status_state: int | None  # IntentState from the newest IntentStatus for this version
    status_reason: str
    status_time_ns: int | None
    active_event_id: str | None  # None = not reported for this version; "" = default control
    superseded: bool


_ACK_STATES: dict[int, str] = {
    pb.INTENT_ACK_STATUS_PERSISTED: "persisted",
    pb.INTENT_ACK_STATUS_STALE: "stale",
    pb.INTENT_ACK_STATUS_REJECTED: "rejected",
}
_STATUS_STATES: dict[int, str] = {
    pb.INTENT_STATE_APPLIED: "applied",
    pb.INTENT_STATE_FAILED: "failed",
}


def intent_progress(
    version: int,
    gateway: GatewayRecord,
    delivery: IntentDeliveryRecord | None,
    status: IntentStatusRecord | None,
    reported: ReportedStateRecord | None,
) -> GatewayIntentProgress:
    # The gateway holds a newer version (acked PERSISTED, or reported at registration).
    superseded = gateway.intent_version > version
    ack_status = delivery.ack_status if delivery is not None else None
    if superseded:
        state = "superseded"
    elif status is not None and status.state in _STATUS_STATES:
        state = _STATUS_STATES[status.state]
    elif ack_status in _ACK_STATES:
        state = _ACK_STATES[ack_status]
    elif gateway.intent_version == version:
        state = "persisted"  # reported as held at registration
    elif delivery is not None and delivery.delivered_at_ns is not None:
        state = "delivered"
    else:
        state = "posted"

    active_event_id: str | None = None
    if reported is not None and reported.state.intent_version == version:
        active_event_id = reported.state.active_event_id
    elif status is not None:
        active_event_id = status.active_event_id
    return GatewayIntentProgress(
        gateway_id=gateway.gateway_id,
        version=version,
        state=state,
        delivered_at_ns=delivery.delivered_at_ns if delivery is not None else None,
        ack_status=ack_status,
        ack_reason=delivery.ack_reason if delivery is not None else "",
        acked_at_ns=delivery.acked_at_ns if delivery is not None else None,
        status_state=status.state if status is not None else None,
        status_reason=status.reason if status is not None else "",
        status_time_ns=status.time_ns if status is not None else None,
        active_event_id=active_event_id,
        superseded=superseded,
    )

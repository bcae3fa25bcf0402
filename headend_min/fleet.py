"""Fleet views computed from stored rows (pure; no I/O): presence, intent progress, feeders.

Nothing here is cached: every view is recomputed from what the store returns, which is what keeps
the headend stateless (any instance, or a restarted one, shows the same answers).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from dergw.v1 import pb
from headend_min.model import (
    DeviceInfo,
    DeviceRecord,
    GatewayRecord,
    IntentDeliveryRecord,
    IntentStatusRecord,
    LatestPoint,
    ReportedStateRecord,
    SampleStatus,
    SiteInfo,
)

__all__ = [
    "GENERATION_KINDS",
    "OUTPUT_POINT",
    "FeederSummary",
    "GatewayIntentProgress",
    "enrolled_capacity_w",
    "intent_progress",
    "is_online",
    "summarize_feeders",
]

# Device kinds whose output and capacity count towards a feeder's controllable generation.
GENERATION_KINDS = frozenset({"PV", "BATTERY"})
# The SunSpec name of total AC active power (W); the gateway reports it under this name.
OUTPUT_POINT = "W"


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


def summarize_feeders(
    sites: Iterable[SiteInfo],
    gateways: Iterable[GatewayRecord],
    devices: Iterable[DeviceRecord],
    sample_status: Iterable[SampleStatus],
    output_points: Iterable[LatestPoint],
    *,
    now_ns: int,
    stale_after_ns: int,
) -> list[FeederSummary]:
    """Aggregate by (substation, feeder).

    A device is online when its gateway is online and its newest read succeeded with at least one
    GOOD point. Current output sums the latest GOOD `W` of online PV and battery devices;
    enrolled capacity sums the nameplate of every PV and battery device, online or not.
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

"""Plain data the headend works with: inventory, presence, telemetry rows, intents.

Wire messages (`dergw.v1.pb`) stop at `ingest` and `link`; the store and the HTTP API speak these
dataclasses. Intent documents stay protobuf messages throughout: the stored document *is* the
one sent to gateways, byte for byte.

Telemetry rows are NamedTuples on purpose: they go straight into `executemany` with no per-row
conversion on the ingest hot path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from dergw.v1 import pb

__all__ = [
    "INTENT_DELIVERY_COLUMNS",
    "ApiToken",
    "ClockSyncRow",
    "CommitResult",
    "DecisionRow",
    "DeviceInfo",
    "DeviceRecord",
    "EventResponseRecord",
    "EventResponseRow",
    "FlexibilityRecord",
    "FlexibilityRow",
    "ForecastPointRecord",
    "GapRecord",
    "GapRow",
    "GatewayRecord",
    "HistoryCursor",
    "HistoryPage",
    "HistoryPoint",
    "HistoryQuery",
    "IntentAckInfo",
    "IntentBasis",
    "IntentDeliveryRecord",
    "IntentStatusRecord",
    "IntentStatusRow",
    "LatestPoint",
    "LatestPointRow",
    "Nameplate",
    "PointInfo",
    "RegisterOutcome",
    "Registration",
    "ReportedStateRecord",
    "ReportedStateRow",
    "SampleRow",
    "SampleStatus",
    "SampleStatusRow",
    "SiteInfo",
    "SiteRecord",
    "StoredIntent",
    "StreamRef",
    "TelemetryRows",
    "UnknownRecordRow",
]

# --------------------------------------------------------------------------------------------
# Inventory (from Register).


@dataclass(frozen=True, slots=True)
class SiteInfo:
    site_id: str
    name: str
    substation: str
    feeder: str
    export_limit_w: float | None
    import_limit_w: float | None


@dataclass(frozen=True, slots=True)
class Nameplate:
    max_w: float = 0.0
    max_va: float = 0.0
    max_var: float = 0.0
    max_charge_w: float = 0.0
    max_discharge_w: float = 0.0
    energy_wh: float = 0.0


@dataclass(frozen=True, slots=True)
class PointInfo:
    name: str
    unit: str
    writable: bool


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    device_id: str
    kind: str  # "PV", "BATTERY", "METER", "UNSPECIFIED" (the DeviceKind name without prefix)
    protocol: str
    address: str
    manufacturer: str
    model: str
    serial_number: str
    role: str
    nameplate: Nameplate
    points: tuple[PointInfo, ...]


@dataclass(frozen=True, slots=True)
class Registration:
    gateway_id: str
    software_version: str
    boot_id: str
    site: SiteInfo
    devices: tuple[DeviceInfo, ...]
    intent_version: int  # the version the gateway holds
    oldest_unacked_seq: int
    next_seq: int


@dataclass(frozen=True, slots=True)
class StreamRef:
    """One open gRPC stream of one gateway (stream_id is random per stream)."""

    gateway_id: str
    stream_id: str


@dataclass(frozen=True, slots=True)
class RegisterOutcome:
    committed_seq: int
    site_intent_version: int
    # Committed ranges above committed_seq (see seqranges): the gateway deletes them too.
    committed_ranges: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True, slots=True)
class CommitResult:
    """What is committed for a gateway after a batch: the watermark and the ranges above it."""

    committed_seq: int
    committed_ranges: tuple[tuple[int, int], ...] = ()


# --------------------------------------------------------------------------------------------
# Records read back from the store.


@dataclass(frozen=True, slots=True)
class SiteRecord:
    site: SiteInfo
    updated_at_ns: int


@dataclass(frozen=True, slots=True)
class GatewayRecord:
    gateway_id: str
    site_id: str
    software_version: str
    boot_id: str
    registered_at_ns: int
    stream_open: bool
    connected_since_ns: int | None
    last_seen_ns: int | None
    intent_version: int  # held by the gateway (Register, raised by PERSISTED acks)
    committed_seq: int
    oldest_unacked_seq: int
    next_seq: int


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    gateway_id: str
    device: DeviceInfo


@dataclass(frozen=True, slots=True)
class LatestPoint:
    gateway_id: str
    device_id: str
    point: str
    value: float | None  # None where the quality is not GOOD (NaN on the wire)
    unit: str
    quality: int
    time_ns: int
    seq: int


@dataclass(frozen=True, slots=True)
class SampleStatus:
    """Outcome of the newest read of one device."""

    gateway_id: str
    device_id: str
    time_ns: int
    seq: int
    ok: bool
    error: str


@dataclass(frozen=True, slots=True)
class StoredIntent:
    site_id: str
    version: int
    issued_at_ns: int
    document: pb.IntentDocument
    # Who posted it ("NAME (token ID)"); None for versions stored before operator tokens.
    posted_by: str | None = None


@dataclass(frozen=True, slots=True)
class IntentBasis:
    """What a new intent version is composed from, read inside the allocating transaction."""

    site_id: str
    previous: pb.IntentDocument | None  # the site's latest document (None = first version)
    next_version: int
    device_ids: frozenset[str]  # the site's registered inventory, across its gateways


@dataclass(frozen=True, slots=True)
class IntentAckInfo:
    site_id: str
    version: int
    status: int  # IntentAckStatus
    reason: str


@dataclass(frozen=True, slots=True)
class IntentDeliveryRecord:
    gateway_id: str
    version: int
    delivered_at_ns: int | None
    ack_status: int | None
    ack_reason: str
    acked_at_ns: int | None


# The intent_deliveries columns an IntentDeliveryRecord is built from, in field order (both stores).
INTENT_DELIVERY_COLUMNS = (
    "gateway_id, version, delivered_at_ns, ack_status, ack_reason, acked_at_ns"
)


@dataclass(frozen=True, slots=True)
class IntentStatusRecord:
    gateway_id: str
    seq: int
    version: int
    state: int  # IntentState
    reason: str
    time_ns: int
    active_event_id: str


@dataclass(frozen=True, slots=True)
class EventResponseRecord:
    gateway_id: str
    site_id: str
    seq: int
    intent_version: int
    event_id: str
    status: int  # ResponseStatus
    reason: str
    time_ns: int
    # The event's window as that gateway executes it (after its randomization), when reported.
    effective_start_ns: int | None = None
    effective_end_ns: int | None = None


@dataclass(frozen=True, slots=True)
class ReportedStateRecord:
    gateway_id: str
    seq: int
    state: pb.ReportedState


@dataclass(frozen=True, slots=True)
class ForecastPointRecord:
    offset_s: int  # after FlexibilityRecord.time_ns
    pv_w: float | None  # None = the gateway had no basis to forecast (NaN on the wire)
    load_w: float | None
    battery_energy_wh: float | None


@dataclass(frozen=True, slots=True)
class FlexibilityRecord:
    """A gateway's site flexibility report (dergw.v1.Flexibility); None where it sent NaN."""

    gateway_id: str
    seq: int
    time_ns: int
    up_w: float | None
    down_w: float | None
    pv_w: float | None
    load_w: float | None
    battery_w: float | None
    battery_energy_wh: float | None
    battery_capacity_wh: float | None
    forecast: tuple[ForecastPointRecord, ...]  # by offset, ascending


@dataclass(frozen=True, slots=True)
class HistoryCursor:
    """Position of the last point returned; the next page starts strictly after it."""

    time_ns: int
    gateway_id: str
    seq: int
    index: int  # position of the point within its sample


@dataclass(frozen=True, slots=True)
class HistoryQuery:
    site_id: str
    device_id: str
    point: str | None  # None = every point of each sample
    start_ns: int | None  # inclusive
    end_ns: int | None  # exclusive
    limit: int
    after: HistoryCursor | None = None


@dataclass(frozen=True, slots=True)
class HistoryPoint:
    gateway_id: str
    seq: int
    time_ns: int
    point: str
    value: float | None
    unit: str
    quality: int
    index: int


@dataclass(frozen=True, slots=True)
class HistoryPage:
    points: list[HistoryPoint]
    next_cursor: HistoryCursor | None


# --------------------------------------------------------------------------------------------
# Telemetry rows: one committed batch, already split per table (see ingest.plan_telemetry).


class SampleRow(NamedTuple):
    gateway_id: str
    seq: int
    device_id: str
    time_ns: int
    payload: bytes  # the DeviceSample, serialized: points stay packed per read
    boot_id: str = ""
    monotonic_ns: int = 0
    clock_synced: int = 1  # 0: time_ns is approximate until a ClockSync of boot_id corrects it


class GapRow(NamedTuple):
    """What the gateway's outbox shed to stay within its quota (seq..through_seq)."""

    gateway_id: str
    seq: int
    through_seq: int
    what: str
    records: int
    points: int
    bytes: int
    first_time_ns: int | None
    last_time_ns: int | None
    reason: str
    device_ids: str  # comma-separated


class ClockSyncRow(NamedTuple):
    gateway_id: str
    seq: int
    boot_id: str
    wall_minus_mono_ns: int
    time_ns: int


class LatestPointRow(NamedTuple):
    gateway_id: str
    device_id: str
    point: str
    value: float | None
    unit: str
    quality: int
    time_ns: int
    seq: int


class SampleStatusRow(NamedTuple):
    gateway_id: str
    device_id: str
    time_ns: int
    seq: int
    ok: int
    error: str


class EventResponseRow(NamedTuple):
    gateway_id: str
    seq: int
    intent_version: int
    event_id: str
    status: int
    reason: str
    time_ns: int
    effective_start_ns: int | None
    effective_end_ns: int | None


class IntentStatusRow(NamedTuple):
    gateway_id: str
    seq: int
    version: int
    state: int
    reason: str
    time_ns: int
    active_event_id: str


class ReportedStateRow(NamedTuple):
    gateway_id: str
    seq: int
    time_ns: int
    intent_version: int
    active_event_id: str
    source: int
    payload: bytes


class DecisionRow(NamedTuple):
    gateway_id: str
    seq: int
    time_ns: int
    summary: str
    payload: bytes


class FlexibilityRow(NamedTuple):
    gateway_id: str
    seq: int
    time_ns: int
    up_w: float | None
    down_w: float | None
    payload: bytes  # the Flexibility message, serialized (forecast points stay packed)


class UnknownRecordRow(NamedTuple):
    """A record kind this headend does not know yet (additive v1 change): kept, not lost."""

    gateway_id: str
    seq: int
    payload: bytes


@dataclass(slots=True)
class TelemetryRows:
    gateway_id: str
    first_seq: int
    last_seq: int
    samples: list[SampleRow] = field(default_factory=list)
    latest_points: list[LatestPointRow] = field(default_factory=list)
    sample_status: list[SampleStatusRow] = field(default_factory=list)
    event_responses: list[EventResponseRow] = field(default_factory=list)
    intent_statuses: list[IntentStatusRow] = field(default_factory=list)
    reported_states: list[ReportedStateRow] = field(default_factory=list)
    decisions: list[DecisionRow] = field(default_factory=list)
    flexibility: list[FlexibilityRow] = field(default_factory=list)
    gaps: list[GapRow] = field(default_factory=list)
    clock_syncs: list[ClockSyncRow] = field(default_factory=list)
    unknown: list[UnknownRecordRow] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class GapRecord:
    """A Gap as the API shows it."""

    gateway_id: str
    first_seq: int
    last_seq: int
    what: str
    records: int
    points: int
    bytes: int
    first_time_ns: int | None
    last_time_ns: int | None
    reason: str
    device_ids: tuple[str, ...]
    received_at_ns: int


@dataclass(frozen=True, slots=True)
class ApiToken:
    """An operator API token as stored: the SHA-256 of its secret, never the secret."""

    token_id: str
    name: str
    secret_sha256: str  # hex
    role: str  # "viewer" | "operator" | "admin" (headend_min.auth.Role)
    site_id: str | None  # the one site it may see and command; None = every site
    created_at_ns: int
    created_by: str
    revoked_at_ns: int | None = None
    revoked_by: str | None = None
    last_used_at_ns: int | None = None

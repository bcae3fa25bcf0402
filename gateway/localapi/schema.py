"""Wire models of the local API (pydantic v2): requests, responses and every method's shapes.

Protocol: a Unix stream socket carrying newline-delimited JSON, one request per line and one
response line each: `{"id": 1, "method": "snapshot", "params": {}}` answers
`{"id": 1, "result": {...}}` or `{"id": 1, "error": {"code": "...", "message": "..."}}`.
A request line is at most `MAX_LINE_BYTES`; a malformed line gets an error and the connection
stays usable. Times are ages in seconds (monotonic) or wall-clock epoch ns, as named.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "MAX_LINE_BYTES",
    "METHODS",
    "ActiveEvent",
    "ControlStatus",
    "DeviceStatus",
    "ErrorBody",
    "ErrorCode",
    "EventLine",
    "Header",
    "OutboxStatus",
    "OverrideClearParams",
    "OverrideClearResult",
    "OverrideControls",
    "OverrideSetParams",
    "OverrideSetResult",
    "OverrideStatus",
    "PointValue",
    "ReadPointParams",
    "ReadPointResult",
    "Request",
    "RescanParams",
    "RescanResult",
    "Response",
    "SetpointStatus",
    "Snapshot",
    "TestWriteParams",
    "TestWriteResult",
    "UplinkStatus",
    "ValidateConfigParams",
    "ValidateConfigResult",
]

# A request line (JSON text plus newline) longer than this is refused before it is decoded.
MAX_LINE_BYTES = 64 * 1024
# A test write is a short override: it reverts on its own.
MAX_TEST_WRITE_S = 300.0

ErrorCode = Literal["bad_request", "not_found", "refused", "forbidden", "internal"]

METHODS = (
    "snapshot",
    "override.set",
    "override.clear",
    "rescan",
    "read_point",
    "validate_config",
    "metrics",
)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=True)


# -- envelope ---------------------------------------------------------------------------------


class Request(_Model):
    id: int | str | None = None
    method: str
    params: dict[str, Any] = Field(default_factory=dict)


class ErrorBody(_Model):
    code: ErrorCode
    message: str


class Response(_Model):
    id: int | str | None = None
    result: Any = None
    error: ErrorBody | None = None


# -- snapshot ---------------------------------------------------------------------------------


class Header(_Model):
    gateway_id: str
    site_id: str
    site_name: str
    version: str
    uptime_s: float
    clock_synced: bool
    boot_id: str  # this process's boot id (new at every start)
    wall_ns: int  # when the snapshot was taken
    audit_head_seq: int = 0  # newest committed audit record (0: empty log)
    audit_head_hash: str = ""  # its hash, hex


class UplinkStatus(_Model):
    transport: str  # "grpc" | "mqtt"
    target: str
    tls: bool
    connected: bool
    state: str  # human text: "connected", "reconnecting in 3.2 s: ...", "not enrolled", ...
    last_ack_age_s: float | None  # None: no ack yet
    reconnects: int
    sessions: int
    last_error: str
    tls_failure: str | None  # "expired", "unknown_ca", "revoked", "no_certificate", ...
    cert_days_left: float | None
    intent_rejections: dict[str, int]  # by rejection name, e.g. {"BAD_SIGNATURE": 1}
    offline_for_s: float | None  # None while connected


class OutboxStatus(_Model):
    backlog_records: int  # rows held (not yet acknowledged by the headend)
    oldest_unsent_age_s: float | None  # None: empty
    bytes: int  # what the quota counts
    quota_bytes: int | None  # None: no quota
    shed_records_total: int
    storage_condition: str  # "" when fine


class PointValue(_Model):
    name: str
    value: float | None  # None when not GOOD (NaN is not sent)
    unit: str
    quality: str  # "GOOD" | "NOT_IMPLEMENTED" | "BAD_COMM" | "OUT_OF_RANGE"


class DeviceStatus(_Model):
    id: str
    kind: str  # "pv" | "battery" | "meter" | ...
    role: str | None
    driver: str
    protocol: str
    address: str  # "" until discovered
    manufacturer: str
    model: str
    link_state: str  # drivers.contract.LinkState: "connected" | "disconnected" | "failed"
    available: bool  # usable for control now
    unavailable_reason: str
    last_good_poll_age_s: float | None
    consecutive_errors: int
    total_errors: int
    last_error: str
    max_w: float
    points: list[PointValue]


class ActiveEvent(_Model):
    event_id: str
    source: str  # what asks, e.g. "event e1" / "override 3f.. (local:alice)"
    modes: list[str]  # the control modes it sets
    expires_in_s: float | None  # None: unknown / open-ended


class SetpointStatus(_Model):
    device_id: str
    max_active_power_w: float | None
    active_power_w: float | None
    connect: bool | None
    bound_by: list[str]  # why: the limits that bound it, highest priority first


class OverrideStatus(_Model):
    override_id: str
    origin: str
    device_id: str | None  # None: the whole site
    controls: dict[str, float | bool]
    expires_in_s: float
    reason: str = ""  # as given to override.set ("" if set another way)


class ControlStatus(_Model):
    intent_version: int
    source: str  # "intent" | "fallback" | "override" ... (schedule's view)
    events_allowed: bool
    blocked_reason: str
    site_controls: str  # e.g. "export_limit_w=2000"
    sources: dict[str, str]  # control mode -> who asks for it (site scope)
    active_events: list[ActiveEvent]
    setpoints: list[SetpointStatus]  # the last enforcement (what the kernel sent)
    overrides: list[OverrideStatus]
    notes: list[str]  # conditions in force (interlocks, clock, offline, storage ...)
    interlocks: list[str]  # configured standing interlocks
    cycles: int


class EventLine(_Model):
    wall_ns: int
    time: str  # ISO 8601 UTC
    level: str  # "INFO" | "WARNING" | "ERROR" | "CRITICAL"
    text: str


class Snapshot(_Model):
    header: Header
    uplink: UplinkStatus
    outbox: OutboxStatus
    devices: list[DeviceStatus]
    control: ControlStatus
    events: list[EventLine]  # newest last, at most ~50


# -- methods ----------------------------------------------------------------------------------


class OverrideControls(_Model):
    """The controls an override may set (gateway.intent.Controls); None = not set."""

    max_gen_pct: float | None = None
    fixed_w: float | None = None
    target_w: float | None = None
    export_limit_w: float | None = None
    import_limit_w: float | None = None
    gen_limit_w: float | None = None
    load_limit_w: float | None = None
    connect: bool | None = None
    energize: bool | None = None
    ramp_time_s: float | None = None


class OverrideSetParams(_Model):
    device_id: str | None = None
    controls: OverrideControls
    duration_s: float
    reason: str = ""
    confirm: bool = False  # must be true: an override changes what the site does


class OverrideSetResult(_Model):
    override_id: str
    origin: str  # "local:<username>"
    expires_in_s: float
    controls: str  # as applied, e.g. "export_limit_w=0"
    # The kernel's next enforcement after the override (empty if no cycle ran within ~2 s).
    enforced: list[SetpointStatus]
    notes: list[str]


class OverrideClearParams(_Model):
    override_id: str


class OverrideClearResult(_Model):
    override_id: str
    cleared: bool


class TestWriteParams(_Model):
    """A commissioning write to one device: a short device override (through the safety
    kernel and the audit log like any override), reported with the driver's read-back."""

    device_id: str
    controls: OverrideControls
    duration_s: float = Field(default=30.0, gt=0.0, le=MAX_TEST_WRITE_S)
    reason: str = "test write"
    confirm: bool = False


class TestWriteResult(_Model):
    override_id: str
    device_id: str
    expires_in_s: float
    written: bool  # the control loop wrote the device within the wait (else: nothing changed)
    ok: bool  # the driver verified the write by read-back
    reason: str  # why not ok, or why nothing was written
    readback: dict[str, float]
    enforced: SetpointStatus | None  # what the kernel made of it for this device


class RescanParams(_Model):
    device_id: str


class RescanResult(_Model):
    device_id: str
    scheduled: bool  # discovery re-runs before the next read


class ReadPointParams(_Model):
    device_id: str
    point: str


class ReadPointResult(_Model):
    device_id: str
    point: PointValue
    age_s: float | None  # of the reading it comes from
    wall_ns: int | None


class ValidateConfigParams(_Model):
    path: str


class ValidateConfigResult(_Model):
    ok: bool
    errors: list[str]
    diff: str  # unified diff of the running config file -> `path` ("" if identical/unreadable)

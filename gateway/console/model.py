"""The console's view of a gateway: plain frozen data, already reduced to what a technician sees.

Ages and expiries are seconds computed by the gateway (on its monotonic clock), never "now" in the
console, so the same snapshot always renders the same screen.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ConsoleSnapshot",
    "ControlView",
    "DeviceView",
    "EventView",
    "HeaderView",
    "LimitView",
    "OutboxView",
    "OverrideView",
    "PointRead",
    "PointValue",
    "TestWriteView",
    "UplinkView",
    "ValidationView",
]


@dataclass(frozen=True, slots=True)
class HeaderView:
    gateway_id: str
    site: str
    version: str
    uptime_s: float
    clock_synced: bool


@dataclass(frozen=True, slots=True)
class UplinkView:
    transport: str  # "grpc" | "mqtt"
    state: str  # "connected" | "connecting" | "down" ...
    last_ack_age_s: float | None
    reconnects: int
    cert_days_left: float | None
    tls_failure: str | None = None  # last TLS failure class: expired / unknown CA / revoked


@dataclass(frozen=True, slots=True)
class OutboxView:
    backlog: int
    oldest_unsent_age_s: float | None
    size_bytes: int
    quota_bytes: int | None  # None: no quota
    shed: int
    condition: str = ""  # storage condition, "" when fine


@dataclass(frozen=True, slots=True)
class PointValue:
    name: str
    value: float | str | None
    unit: str = ""
    quality: str = "GOOD"


@dataclass(frozen=True, slots=True)
class DeviceView:
    device_id: str
    kind: str
    protocol: str
    address: str
    last_good_age_s: float | None
    errors: int
    state: str  # "ok" | "stale" | "fault"
    last_error: str = ""
    values: tuple[PointValue, ...] = ()


@dataclass(frozen=True, slots=True)
class LimitView:
    name: str
    value: float | None
    unit: str
    bound_by: str  # what set the effective value: intent, site limit, interlock, override ...


@dataclass(frozen=True, slots=True)
class OverrideView:
    override_id: str
    device_id: str | None
    controls: str  # as applied, e.g. "export_limit_w=0"
    expires_in_s: float | None
    reason: str
    by: str = ""


@dataclass(frozen=True, slots=True)
class ControlView:
    active_event: str | None
    source: str  # headend / local schedule / fallback / override
    version: int | None
    expires_in_s: float | None
    limits: tuple[LimitView, ...] = ()
    overrides: tuple[OverrideView, ...] = ()
    notes: tuple[str, ...] = ()  # conditions in force: interlocks, clock, offline ...


@dataclass(frozen=True, slots=True)
class EventView:
    time: str  # as the gateway stamped it (UTC)
    level: str  # "INFO" | "WARNING" | "ERROR" | "CRITICAL"
    text: str


@dataclass(frozen=True, slots=True)
class ConsoleSnapshot:
    header: HeaderView
    uplink: UplinkView
    outbox: OutboxView
    devices: tuple[DeviceView, ...]
    control: ControlView
    events: tuple[EventView, ...] = ()
    audit_head: str | None = None  # the audit log's head hash, when the gateway reports it

    def device(self, device_id: str) -> DeviceView | None:
        return next((d for d in self.devices if d.device_id == device_id), None)


@dataclass(frozen=True, slots=True)
class PointRead:
    device_id: str
    point: str
    value: float | str | None
    unit: str = ""
    quality: str = "GOOD"
    age_s: float | None = None


@dataclass(frozen=True, slots=True)
class TestWriteView:
    """A commissioning write: a short device override, and what the device read back."""

    device_id: str
    override_id: str
    written: bool  # the control loop wrote the device (else nothing changed)
    ok: bool  # verified by read-back
    reason: str = ""
    readback: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True, slots=True)
class ValidationView:
    ok: bool
    errors: tuple[str, ...] = ()
    diff: str = ""

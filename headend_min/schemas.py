"""Pydantic models of the HTTP API (requests and responses) and their conversions.

Requests reject unknown fields and non-finite numbers, so a typo such as `max_gen_percent`
fails with a 422 naming the field instead of being silently ignored. Single-field ranges live
here (they also document the OpenAPI schema); rules that need context - the site's inventory,
the previous version, the clock - live in `intents`.

All timestamps are ISO-8601 UTC (`...Z`) on output; on input a time without an offset is UTC.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from dergw.v1 import MAX_ABS_WATTS, MAX_ID_LENGTH, MAX_RANDOMIZE_S, ns_from_timestamp, pb
from headend_min.clock import datetime_from_ns, ns_from_datetime
from headend_min.fleet import FeederSummary, FlexibilitySummary, GatewayIntentProgress
from headend_min.ingest import wire_enum_label
from headend_min.intents import (
    DEFAULT_PROGRAM_ID,
    DEFAULT_PROGRAM_PRIMACY,
    ConstraintValues,
    ControlValues,
    EventRequest,
    IntentRequest,
    ProgramRequest,
)
from headend_min.model import (
    ApiToken,
    DeviceRecord,
    EventResponseRecord,
    FlexibilityRecord,
    GapRecord,
    GatewayRecord,
    HistoryPoint,
    IntentDeliveryRecord,
    LatestPoint,
    ReportedStateRecord,
    SiteRecord,
    StoredIntent,
)

_UINT32_MAX = 2**32 - 1
# Bounds the gateway also enforces when it validates a document (it rejects the whole version
# otherwise); checking them here turns a rejected version into a 422 for the operator.
_MAX_W = MAX_ABS_WATTS
_MAX_RANDOMIZE_S = MAX_RANDOMIZE_S
_ID_PATTERN = r"^[A-Za-z0-9._:~-]+$"


def _time(wall_ns: int | None) -> datetime | None:
    return datetime_from_ns(wall_ns) if wall_ns else None


def _quality(number: int) -> str:
    return wire_enum_label(pb.Quality.DESCRIPTOR, number, "QUALITY_")


# ---------------------------------------------------------------------------------------------
# Requests.


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ControlsIn(_Request):
    """Controls an event or the default control asks for; leave a field out to not ask."""

    max_gen_pct: float | None = Field(
        None, ge=0, le=100, description="generation cap, % of each device's max W"
    )
    fixed_w: float | None = Field(
        None, ge=-_MAX_W, le=_MAX_W, description="fixed active power, W (+ discharge)"
    )
    target_w: float | None = Field(
        None, ge=-_MAX_W, le=_MAX_W, description="target active power of the scope, W"
    )
    export_limit_w: float | None = Field(
        None, ge=0, le=_MAX_W, description="max export at the PCC, W"
    )
    import_limit_w: float | None = Field(
        None, ge=0, le=_MAX_W, description="max import at the PCC, W"
    )
    gen_limit_w: float | None = Field(
        None, ge=0, le=_MAX_W, description="max generation of the scope, W"
    )
    load_limit_w: float | None = Field(
        None, ge=0, le=_MAX_W, description="max charge/load of the scope, W"
    )
    connect: bool | None = None
    energize: bool | None = None
    ramp_time_s: float | None = Field(None, ge=0, description="time to reach the new setting")

    def to_values(self) -> ControlValues:
        return ControlValues(**self.model_dump())


class ConstraintsIn(_Request):
    export_limit_w: float | None = Field(None, ge=0, le=_MAX_W)
    import_limit_w: float | None = Field(None, ge=0, le=_MAX_W)
    soc_min_pct: float | None = Field(None, ge=0, le=100)
    soc_max_pct: float | None = Field(None, ge=0, le=100)

    def to_values(self) -> ConstraintValues:
        return ConstraintValues(**self.model_dump())


class EventIn(_Request):
    event_id: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_ID_LENGTH,
        pattern=_ID_PATTERN,
        description="unique per site; generated when absent",
    )
    start: datetime | None = Field(None, description="ISO-8601; absent = now; no offset = UTC")
    duration_s: int = Field(gt=0, le=_UINT32_MAX)
    program_id: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_ID_LENGTH,
        pattern=_ID_PATTERN,
        description=(
            "the program the event belongs to; its primacy is the program's (lower wins). "
            f"Absent = program {DEFAULT_PROGRAM_ID!r} (primacy {DEFAULT_PROGRAM_PRIMACY} "
            "unless `programs` defines it)"
        ),
    )
    device_id: str | None = Field(
        None, min_length=1, max_length=MAX_ID_LENGTH, description="absent = the whole site"
    )
    randomize_start_s: int = Field(0, ge=-_MAX_RANDOMIZE_S, le=_MAX_RANDOMIZE_S)
    randomize_duration_s: int = Field(0, ge=-_MAX_RANDOMIZE_S, le=_MAX_RANDOMIZE_S)
    controls: ControlsIn

    def to_request(self) -> EventRequest:
        return EventRequest(
            controls=self.controls.to_values(),
            duration_s=self.duration_s,
            event_id=self.event_id,
            start_ns=ns_from_datetime(self.start) if self.start is not None else None,
            program_id=self.program_id,
            device_id=self.device_id,
            randomize_start_s=self.randomize_start_s,
            randomize_duration_s=self.randomize_duration_s,
        )


class ProgramIn(_Request):
    """An IEEE 2030.5-style program: a primacy and the default control of its events' modes."""

    program_id: str = Field(min_length=1, max_length=MAX_ID_LENGTH, pattern=_ID_PATTERN)
    primacy: int = Field(ge=0, le=_UINT32_MAX, description="lower wins, for events and defaults")
    default_control: ControlsIn | None = Field(
        None, description="used for a mode no event asks for (lowest primacy first)"
    )

    def to_request(self) -> ProgramRequest:
        return ProgramRequest(
            program_id=self.program_id,
            primacy=self.primacy,
            default_control=(
                self.default_control.to_values() if self.default_control is not None else None
            ),
        )


class IntentPostIn(_Request):
    """Body of an intent post; at least one of events, default_control, programs, constraints."""

    events: list[EventIn] = Field(default_factory=list, max_length=100)
    default_control: ControlsIn | None = Field(
        None, description="replaces the previous default control; `{}` clears it"
    )
    constraints: ConstraintsIn | None = Field(
        None, description="replace the previous constraints; `{}` clears them"
    )
    replace_events: bool = Field(
        False, description="drop the not-yet-ended events of the previous version (of the scope)"
    )
    programs: list[ProgramIn] | None = Field(
        None,
        max_length=100,
        description="replaces the previous programs (absent = carried over); "
        "the default control above applies under all of them",
    )

    def to_request(self) -> IntentRequest:
        return IntentRequest(
            events=tuple(event.to_request() for event in self.events),
            default_control=(
                self.default_control.to_values() if self.default_control is not None else None
            ),
            constraints=self.constraints.to_values() if self.constraints is not None else None,
            replace_events=self.replace_events,
            programs=(
                tuple(program.to_request() for program in self.programs)
                if self.programs is not None
                else None
            ),
        )


# ---------------------------------------------------------------------------------------------
# Responses.


class HealthOut(BaseModel):
    status: Literal["ok"]
    server_time: datetime
    schema_version: int


class GatewayOut(BaseModel):
    gateway_id: str
    site_id: str
    online: bool = Field(description="a stream is open and refreshed within 2 x keepalive")
    last_seen: datetime | None
    connected_since: datetime | None
    software_version: str
    boot_id: str
    intent_version: int = Field(description="the intent version the gateway holds (acked)")
    committed_seq: int = Field(description="highest record seq committed at the headend")

    @classmethod
    def of(cls, gateway: GatewayRecord, *, online: bool) -> GatewayOut:
        return cls(
            gateway_id=gateway.gateway_id,
            site_id=gateway.site_id,
            online=online,
            last_seen=_time(gateway.last_seen_ns),
            connected_since=_time(gateway.connected_since_ns) if online else None,
            software_version=gateway.software_version,
            boot_id=gateway.boot_id,
            intent_version=gateway.intent_version,
            committed_seq=gateway.committed_seq,
        )


class NameplateOut(BaseModel):
    max_w: float
    max_va: float
    max_var: float
    max_charge_w: float
    max_discharge_w: float
    energy_wh: float


class PointInfoOut(BaseModel):
    name: str
    unit: str
    writable: bool


class DeviceOut(BaseModel):
    device_id: str
    gateway_id: str
    kind: str
    protocol: str
    address: str
    manufacturer: str
    model: str
    serial_number: str
    role: str
    nameplate: NameplateOut
    points: list[PointInfoOut]

    @classmethod
    def of(cls, record: DeviceRecord) -> DeviceOut:
        device = record.device
        plate = device.nameplate
        return cls(
            device_id=device.device_id,
            gateway_id=record.gateway_id,
            kind=device.kind,
            protocol=device.protocol,
            address=device.address,
            manufacturer=device.manufacturer,
            model=device.model,
            serial_number=device.serial_number,
            role=device.role,
            nameplate=NameplateOut(
                max_w=plate.max_w,
                max_va=plate.max_va,
                max_var=plate.max_var,
                max_charge_w=plate.max_charge_w,
                max_discharge_w=plate.max_discharge_w,
                energy_wh=plate.energy_wh,
            ),
            points=[
                PointInfoOut(name=p.name, unit=p.unit, writable=p.writable) for p in device.points
            ],
        )


class SiteOut(BaseModel):
    site_id: str
    name: str
    substation: str
    feeder: str
    export_limit_w: float | None
    import_limit_w: float | None
    updated_at: datetime | None
    gateway_ids: list[str]
    gateways_online: int
    device_count: int
    intent_version: int = Field(description="the latest version posted for the site (0 = none)")

    @classmethod
    def of(
        cls,
        record: SiteRecord,
        *,
        gateway_ids: list[str],
        gateways_online: int,
        device_count: int,
        intent_version: int,
    ) -> SiteOut:
        site = record.site
        return cls(
            site_id=site.site_id,
            name=site.name,
            substation=site.substation,
            feeder=site.feeder,
            export_limit_w=site.export_limit_w,
            import_limit_w=site.import_limit_w,
            updated_at=_time(record.updated_at_ns),
            gateway_ids=gateway_ids,
            gateways_online=gateways_online,
            device_count=device_count,
            intent_version=intent_version,
        )


class SetpointOut(BaseModel):
    device_id: str
    max_active_power_w: float | None
    active_power_w: float | None
    connect: bool | None
    bound_by: list[str]

    @classmethod
    def of(cls, setpoint: pb.DeviceSetpoint) -> SetpointOut:
        return cls(
            device_id=setpoint.device_id,
            max_active_power_w=(
                setpoint.max_active_power_w if setpoint.HasField("max_active_power_w") else None
            ),
            active_power_w=setpoint.active_power_w if setpoint.HasField("active_power_w") else None,
            connect=setpoint.connect if setpoint.HasField("connect") else None,
            bound_by=list(setpoint.bound_by),
        )


class AvailabilityOut(BaseModel):
    device_id: str
    available: bool
    reason: str


class ActiveModeOut(BaseModel):
    """One control mode in force and where it comes from."""

    device_id: str | None = Field(description="null = the whole site")
    mode: str = Field(description="e.g. export_limit_w, max_gen_pct, connect")
    value: float | None = Field(description="booleans as 0 / 1")
    source: str = Field(description="EVENT | DEFAULT | FALLBACK | OVERRIDE")
    event_id: str | None
    program_id: str | None
    label: str = Field(description="human form, e.g. 'event e7 (program utility)'")


class ReportedStateOut(BaseModel):
    """What the gateway enforces, as measured at the edge (never written by the headend)."""

    gateway_id: str
    seq: int
    time: datetime | None
    intent_version: int
    active_event_id: str | None = Field(description="null = default control or fallback")
    active_event_ids: list[str] = Field(description="every event in force, site and device")
    source: str
    active_modes: list[ActiveModeOut] = Field(description="the active control, mode by mode")
    setpoints: list[SetpointOut] = Field(description="each setpoint and the limits that bound it")
    devices: list[AvailabilityOut]
    clock_trusted: bool = Field(description="false: scheduled events are not started")
    notes: list[str] = Field(description="conditions in force, e.g. PCC meter stale")
    audit_head_seq: int = Field(
        0, description="the gateway's audit log head as reported (0 = none): its anchor"
    )
    audit_head_hash: str = Field(
        "", description="hex SHA-256 of that record; `dergw audit verify --anchor SEQ:HASH`"
    )

    @classmethod
    def of(cls, record: ReportedStateRecord) -> ReportedStateOut:
        state = record.state
        return cls(
            gateway_id=record.gateway_id,
            seq=record.seq,
            time=_time(ns_from_timestamp(state.time)),
            intent_version=state.intent_version,
            active_event_id=state.active_event_id or None,
            active_event_ids=list(state.active_event_ids),
            source=wire_enum_label(pb.ControlSource.DESCRIPTOR, state.source, "CONTROL_SOURCE_"),
            active_modes=[
                ActiveModeOut(
                    device_id=m.device_id or None,
                    mode=m.mode,
                    value=None if math.isnan(m.value) else m.value,
                    source=wire_enum_label(
                        pb.ControlSource.DESCRIPTOR, m.source, "CONTROL_SOURCE_"
                    ),
                    event_id=m.event_id or None,
                    program_id=m.program_id or None,
                    label=m.label,
                )
                for m in state.active_modes
            ],
            setpoints=[SetpointOut.of(s) for s in state.setpoints],
            devices=[
                AvailabilityOut(device_id=d.device_id, available=d.available, reason=d.reason)
                for d in state.devices
            ],
            clock_trusted=state.clock_trusted,
            notes=list(state.notes),
            audit_head_seq=state.audit_head.seq,
            audit_head_hash=state.audit_head.hash.hex(),
        )


class SiteDetailOut(SiteOut):
    gateways: list[GatewayOut]
    devices: list[DeviceOut]
    reported_state: list[ReportedStateOut] = Field(
        description="the newest reported state of each gateway of the site"
    )


class LatestPointOut(BaseModel):
    gateway_id: str
    device_id: str
    point: str
    value: float | None = Field(description="null when the quality is not GOOD")
    unit: str
    quality: str
    time: datetime | None
    seq: int

    @classmethod
    def of(cls, point: LatestPoint) -> LatestPointOut:
        return cls(
            gateway_id=point.gateway_id,
            device_id=point.device_id,
            point=point.point,
            value=point.value,
            unit=point.unit,
            quality=_quality(point.quality),
            time=_time(point.time_ns),
            seq=point.seq,
        )


class HistoryPointOut(BaseModel):
    time: datetime | None
    point: str
    value: float | None
    unit: str
    quality: str
    gateway_id: str
    seq: int

    @classmethod
    def of(cls, point: HistoryPoint) -> HistoryPointOut:
        return cls(
            time=_time(point.time_ns),
            point=point.point,
            value=point.value,
            unit=point.unit,
            quality=_quality(point.quality),
            gateway_id=point.gateway_id,
            seq=point.seq,
        )


class HistoryPageOut(BaseModel):
    site_id: str
    device_id: str
    point: str | None
    items: list[HistoryPointOut] = Field(description="oldest first")
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null = done")


class ControlsOut(BaseModel):
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

    @classmethod
    def of(cls, controls: pb.Controls) -> ControlsOut:
        return cls(
            **{
                name: getattr(controls, name)
                for name in cls.model_fields
                if controls.HasField(name)  # type: ignore[arg-type]
            }
        )


class ConstraintsOut(BaseModel):
    export_limit_w: float | None = None
    import_limit_w: float | None = None
    soc_min_pct: float | None = None
    soc_max_pct: float | None = None

    @classmethod
    def of(cls, constraints: pb.SiteConstraints) -> ConstraintsOut:
        return cls(
            **{
                name: getattr(constraints, name)
                for name in cls.model_fields
                if constraints.HasField(name)  # type: ignore[arg-type]
            }
        )


class EventOut(BaseModel):
    event_id: str
    created_at: datetime | None
    start: datetime | None
    end: datetime | None = Field(description="start + duration_s (before randomization)")
    duration_s: int
    randomize_start_s: int
    randomize_duration_s: int
    primacy: int = Field(description="its program's primacy (lower wins)")
    program_id: str | None = Field(description="null = composed before programs existed")
    device_id: str | None = Field(description="null = the whole site")
    controls: ControlsOut
    status: str

    @classmethod
    def of(cls, event: pb.ControlEvent) -> EventOut:
        start_ns = ns_from_timestamp(event.start)
        return cls(
            event_id=event.event_id,
            created_at=_time(ns_from_timestamp(event.created_at)),
            start=_time(start_ns),
            end=_time(start_ns + event.duration_s * 1_000_000_000),
            duration_s=event.duration_s,
            randomize_start_s=event.randomize_start_s,
            randomize_duration_s=event.randomize_duration_s,
            primacy=event.primacy,
            program_id=event.program_id or None,
            device_id=event.device_id or None,
            controls=ControlsOut.of(event.controls),
            status=wire_enum_label(pb.EventStatus.DESCRIPTOR, event.status, "EVENT_STATUS_"),
        )


class ProgramOut(BaseModel):
    program_id: str
    primacy: int = Field(description="lower wins")
    default_control: ControlsOut | None

    @classmethod
    def of(cls, program: pb.Program) -> ProgramOut:
        return cls(
            program_id=program.program_id,
            primacy=program.primacy,
            default_control=(
                ControlsOut.of(program.default_control)
                if program.HasField("default_control")
                else None
            ),
        )


class IntentDocumentOut(BaseModel):
    site_id: str
    version: int
    issued_at: datetime | None
    events: list[EventOut]
    default_control: ControlsOut | None = Field(description="the base default, under programs")
    constraints: ConstraintsOut | None
    programs: list[ProgramOut]

    @classmethod
    def of(cls, document: pb.IntentDocument) -> IntentDocumentOut:
        return cls(
            site_id=document.site_id,
            version=document.version,
            issued_at=_time(ns_from_timestamp(document.issued_at)),
            events=[EventOut.of(event) for event in document.events],
            default_control=(
                ControlsOut.of(document.default_control)
                if document.HasField("default_control")
                else None
            ),
            constraints=(
                ConstraintsOut.of(document.constraints)
                if document.HasField("constraints")
                else None
            ),
            programs=[ProgramOut.of(program) for program in document.programs],
        )


class IntentCreatedOut(BaseModel):
    site_id: str
    version: int
    document: IntentDocumentOut
    posted_by: str | None = Field(
        description="the API token that posted it, 'NAME (token ID)'; null before tokens"
    )

    @classmethod
    def of(cls, stored: StoredIntent) -> IntentCreatedOut:
        return cls(
            site_id=stored.site_id,
            version=stored.version,
            document=IntentDocumentOut.of(stored.document),
            posted_by=stored.posted_by,
        )


class GatewayIntentStatusOut(BaseModel):
    gateway_id: str
    online: bool
    state: str = Field(
        description="posted | delivered | persisted | stale | rejected | applied | failed | "
        "superseded"
    )
    delivered_at: datetime | None = Field(description="first sent on a stream")
    ack: str | None = Field(description="PERSISTED | STALE | REJECTED")
    ack_reason: str
    acked_at: datetime | None
    status: str | None = Field(description="APPLIED | FAILED, from the gateway's IntentStatus")
    status_reason: str
    status_time: datetime | None
    active_event_id: str | None = Field(
        description="the event in force for this version, as reported; '' = default control"
    )
    superseded: bool

    @classmethod
    def of(cls, progress: GatewayIntentProgress, *, online: bool) -> GatewayIntentStatusOut:
        return cls(
            gateway_id=progress.gateway_id,
            online=online,
            state=progress.state,
            delivered_at=_time(progress.delivered_at_ns),
            ack=(
                wire_enum_label(
                    pb.IntentAckStatus.DESCRIPTOR, progress.ack_status, "INTENT_ACK_STATUS_"
                )
                if progress.ack_status is not None
                else None
            ),
            ack_reason=progress.ack_reason,
            acked_at=_time(progress.acked_at_ns),
            status=(
                wire_enum_label(pb.IntentState.DESCRIPTOR, progress.status_state, "INTENT_STATE_")
                if progress.status_state is not None
                else None
            ),
            status_reason=progress.status_reason,
            status_time=_time(progress.status_time_ns),
            active_event_id=progress.active_event_id,
            superseded=progress.superseded,
        )


class GatewayIntentAckOut(BaseModel):
    """A gateway's answer to an intent version it received, newest first. Versions this
    headend never issued appear too: a gateway refusing one means someone else sent it."""

    site_id: str
    version: int
    ack: str = Field(description="PERSISTED | STALE | REJECTED")
    reason: str = Field(
        description="for a refused signature check, prefixed with the check that failed, e.g. "
        "'BAD_SIGNATURE: ...'"
    )
    acked_at: datetime | None

    @classmethod
    def of(cls, site_id: str, record: IntentDeliveryRecord) -> GatewayIntentAckOut:
        return cls(
            site_id=site_id,
            version=record.version,
            ack=wire_enum_label(
                pb.IntentAckStatus.DESCRIPTOR, record.ack_status or 0, "INTENT_ACK_STATUS_"
            ),
            reason=record.ack_reason,
            acked_at=_time(record.acked_at_ns),
        )


class IntentVersionOut(BaseModel):
    site_id: str
    version: int
    issued_at: datetime | None
    document: IntentDocumentOut
    gateways: list[GatewayIntentStatusOut]
    posted_by: str | None = Field(
        description="the API token that posted it, 'NAME (token ID)'; null before tokens"
    )


class GapOut(BaseModel):
    """What a gateway's outbox shed to stay within its disk quota (or could not store)."""

    gateway_id: str
    first_seq: int
    last_seq: int
    what: str = Field(description='e.g. "sample thinned to aggregates", "decision"')
    records: int = Field(description="records shed")
    points: int = Field(description="measurement points among them")
    bytes: int
    first_time: datetime | None
    last_time: datetime | None
    reason: str
    device_ids: list[str]
    received_at: datetime | None

    @classmethod
    def of(cls, record: GapRecord) -> GapOut:
        return cls(
            gateway_id=record.gateway_id,
            first_seq=record.first_seq,
            last_seq=record.last_seq,
            what=record.what,
            records=record.records,
            points=record.points,
            bytes=record.bytes,
            first_time=_time(record.first_time_ns),
            last_time=_time(record.last_time_ns),
            reason=record.reason,
            device_ids=list(record.device_ids),
            received_at=_time(record.received_at_ns),
        )


class EventResponseOut(BaseModel):
    gateway_id: str
    site_id: str
    seq: int
    intent_version: int
    event_id: str
    status: str
    status_code: int
    reason: str
    time: datetime | None
    effective_start: datetime | None = Field(
        None, description="when this gateway executes the event (after its randomization)"
    )
    effective_end: datetime | None = None

    @classmethod
    def of(cls, record: EventResponseRecord) -> EventResponseOut:
        return cls(
            gateway_id=record.gateway_id,
            site_id=record.site_id,
            seq=record.seq,
            intent_version=record.intent_version,
            event_id=record.event_id,
            status=wire_enum_label(pb.ResponseStatus.DESCRIPTOR, record.status, "RESPONSE_STATUS_"),
            status_code=record.status,
            reason=record.reason,
            time=_time(record.time_ns),
            effective_start=_time(record.effective_start_ns),
            effective_end=_time(record.effective_end_ns),
        )


class ForecastPointOut(BaseModel):
    offset_s: int = Field(description="seconds after the report's time")
    time: datetime | None
    pv_w: float | None = Field(description="available PV; null = no basis to forecast")
    load_w: float | None
    battery_energy_wh: float | None = Field(description="stored energy above the SoC floor")


class FlexibilityOut(BaseModel):
    """One gateway's newest flexibility report (what its site can do now, and next)."""

    gateway_id: str
    seq: int
    time: datetime | None
    online: bool
    counted: bool = Field(description="online and recent: included in the totals")
    up_w: float | None = Field(description="more net generation available now (W)")
    down_w: float | None = Field(description="less net generation available now (W)")
    pv_w: float | None
    load_w: float | None = Field(description="PCC + PV + battery; null without a fresh meter")
    battery_w: float | None = Field(description="+ discharge / - charge")
    battery_energy_wh: float | None = Field(description="stored energy above the SoC floor")
    battery_capacity_wh: float | None = Field(description="usable, SoC floor to ceiling")
    forecast: list[ForecastPointOut]

    @classmethod
    def of(cls, record: FlexibilityRecord, *, online: bool, counted: bool) -> FlexibilityOut:
        return cls(
            gateway_id=record.gateway_id,
            seq=record.seq,
            time=_time(record.time_ns),
            online=online,
            counted=counted,
            up_w=record.up_w,
            down_w=record.down_w,
            pv_w=record.pv_w,
            load_w=record.load_w,
            battery_w=record.battery_w,
            battery_energy_wh=record.battery_energy_wh,
            battery_capacity_wh=record.battery_capacity_wh,
            forecast=[
                ForecastPointOut(
                    offset_s=point.offset_s,
                    time=_time(record.time_ns + point.offset_s * 1_000_000_000),
                    pv_w=point.pv_w,
                    load_w=point.load_w,
                    battery_energy_wh=point.battery_energy_wh,
                )
                for point in record.forecast
            ],
        )


class ForecastSumOut(BaseModel):
    horizon_s: int = Field(description="seconds from now")
    pv_w: float
    load_w: float
    battery_energy_wh: float
    gateways: int = Field(description="how many counted reports reach this horizon")


class FlexibilitySummaryOut(BaseModel):
    """Flexibility summed over the recent reports of online gateways (unknown values left out)."""

    gateways_reporting: int
    up_w: float = Field(description="more net generation available now (W)")
    down_w: float = Field(description="less net generation available now (W)")
    pv_w: float
    load_w: float
    battery_w: float
    battery_energy_wh: float
    battery_capacity_wh: float
    forecast: list[ForecastSumOut] = Field(description="sums at +15 min and +4 h from now")
    oldest_report: datetime | None

    @classmethod
    def of(cls, summary: FlexibilitySummary) -> FlexibilitySummaryOut:
        return cls(
            gateways_reporting=summary.gateways_reporting,
            up_w=summary.up_w,
            down_w=summary.down_w,
            pv_w=summary.pv_w,
            load_w=summary.load_w,
            battery_w=summary.battery_w,
            battery_energy_wh=summary.battery_energy_wh,
            battery_capacity_wh=summary.battery_capacity_wh,
            forecast=[
                ForecastSumOut(
                    horizon_s=point.horizon_s,
                    pv_w=point.pv_w,
                    load_w=point.load_w,
                    battery_energy_wh=point.battery_energy_wh,
                    gateways=point.gateways,
                )
                for point in summary.forecast
            ],
            oldest_report=_time(summary.oldest_report_ns),
        )


class SiteFlexibilityOut(BaseModel):
    site_id: str
    totals: FlexibilitySummaryOut
    gateways: list[FlexibilityOut] = Field(description="the newest report of each gateway")


class FeederOut(BaseModel):
    substation: str
    feeder: str
    site_ids: list[str]
    gateways_total: int
    gateways_online: int
    devices_total: int
    devices_online: int
    current_output_w: float = Field(description="sum of the latest GOOD W of online PV+battery")
    enrolled_capacity_w: float = Field(description="sum of nameplate max W of PV+battery")
    flexibility: FlexibilitySummaryOut

    @classmethod
    def of(cls, summary: FeederSummary) -> FeederOut:
        return cls(
            substation=summary.substation,
            feeder=summary.feeder,
            site_ids=list(summary.site_ids),
            gateways_total=summary.gateways_total,
            gateways_online=summary.gateways_online,
            devices_total=summary.devices_total,
            devices_online=summary.devices_online,
            current_output_w=summary.current_output_w,
            enrolled_capacity_w=summary.enrolled_capacity_w,
            flexibility=FlexibilitySummaryOut.of(summary.flexibility),
        )


# ---------------------------------------------------------------------------------------------
# Operator API tokens (headend_min.auth).


class TokenCreateIn(_Request):
    name: str = Field(min_length=1, max_length=64, description="who or what uses it")
    role: Literal["viewer", "operator", "admin"]
    site_id: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_ID_LENGTH,
        pattern=_ID_PATTERN,
        description="the one site a viewer or operator token may see and command; "
        "absent = every site (admin tokens are always fleet-wide)",
    )


class TokenOut(BaseModel):
    """An API token without its secret (the headend keeps only the secret's SHA-256)."""

    token_id: str
    name: str
    role: str
    site_id: str | None = Field(description="null = every site")
    created_at: datetime | None
    created_by: str
    revoked: bool
    revoked_at: datetime | None
    revoked_by: str | None
    last_used_at: datetime | None = Field(description="to within a minute")

    @classmethod
    def of(cls, token: ApiToken) -> TokenOut:
        return cls(
            token_id=token.token_id,
            name=token.name,
            role=token.role,
            site_id=token.site_id,
            created_at=_time(token.created_at_ns),
            created_by=token.created_by,
            revoked=token.revoked_at_ns is not None,
            revoked_at=_time(token.revoked_at_ns),
            revoked_by=token.revoked_by,
            last_used_at=_time(token.last_used_at_ns),
        )


class TokenCreatedOut(TokenOut):
    token: str = Field(description="the token to send as `Authorization: Bearer ...`; shown once")


class ErrorOut(BaseModel):
    """The body of every error: `detail` says what to fix (for a request that fails validation,
    a list naming each offending field)."""

    detail: str | list[dict[str, Any]]

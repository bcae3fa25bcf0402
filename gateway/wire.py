"""The gateway's edge to the wire contract: dergw.v1 messages <-> gateway domain data.

Everything that turns protobuf into domain objects validates on the way in (bad input gets a
clear error and changes nothing); everything that goes out is built here, so the rest of the
gateway never touches generated code.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from dergw.v1 import (
    MAX_ABS_WATTS,
    MAX_ID_LENGTH,
    MAX_RANDOMIZE_S,
    ns_from_timestamp,
    pb,
    timestamp_from_ns,
)
from drivers.contract import DeviceInfo, DeviceKind, PointSchema, Reading
from gateway.intent import ControlEvent, Controls, EventStatus, Intent, Program, SiteConstraints
from gateway.safety import SafeSetpoint
from gateway.schedule import ActiveControls, ScopeControls

__all__ = [
    "IntentError",
    "clock_sync_payload",
    "decision_payload",
    "device_to_pb",
    "event_response_payload",
    "intent_from_pb",
    "intent_status_payload",
    "reported_state_payload",
    "sample_payload",
    "setpoint_to_pb",
]

_KIND_TO_PB = {
    DeviceKind.PV: pb.DEVICE_KIND_PV,
    DeviceKind.BATTERY: pb.DEVICE_KIND_BATTERY,
    DeviceKind.METER: pb.DEVICE_KIND_METER,
}


class IntentError(ValueError):
    """An intent document failed validation; the message names the field and the reason."""


def _opt(message: pb.Controls | pb.SiteConstraints, name: str) -> float | None:
    return getattr(message, name) if message.HasField(name) else None  # type: ignore[arg-type]


def _watts(where: str, value: float | None, *, signed: bool = False) -> float | None:
    if value is None:
        return None
    if not math.isfinite(value):
        raise IntentError(f"{where}: not a number")
    if not signed and value < 0.0:
        raise IntentError(f"{where}: must be >= 0 W, got {value:g}")
    if abs(value) > MAX_ABS_WATTS:
        raise IntentError(f"{where}: {value:g} W is out of range (|W| <= {MAX_ABS_WATTS:g})")
    return value


def _controls_from_pb(where: str, message: pb.Controls) -> Controls:
    max_gen_pct = _opt(message, "max_gen_pct")
    if max_gen_pct is not None and not (0.0 <= max_gen_pct <= 100.0):
        raise IntentError(f"{where}.max_gen_pct: must be within 0..100 %, got {max_gen_pct:g}")
    ramp_time_s = _opt(message, "ramp_time_s")
    if ramp_time_s is not None and not (math.isfinite(ramp_time_s) and ramp_time_s >= 0.0):
        raise IntentError(f"{where}.ramp_time_s: must be >= 0 s")
    return Controls(
        max_gen_pct=max_gen_pct,
        fixed_w=_watts(f"{where}.fixed_w", _opt(message, "fixed_w"), signed=True),
        target_w=_watts(f"{where}.target_w", _opt(message, "target_w"), signed=True),
        export_limit_w=_watts(f"{where}.export_limit_w", _opt(message, "export_limit_w")),
        import_limit_w=_watts(f"{where}.import_limit_w", _opt(message, "import_limit_w")),
        gen_limit_w=_watts(f"{where}.gen_limit_w", _opt(message, "gen_limit_w")),
        load_limit_w=_watts(f"{where}.load_limit_w", _opt(message, "load_limit_w")),
        connect=message.connect if message.HasField("connect") else None,
        energize=message.energize if message.HasField("energize") else None,
        ramp_time_s=ramp_time_s,
    )


def _programs_from_pb(doc: pb.IntentDocument) -> dict[str, Program]:
    programs: dict[str, Program] = {}
    for i, program in enumerate(doc.programs):
        where = f"programs[{i}]"
        if not program.program_id or len(program.program_id) > MAX_ID_LENGTH:
            raise IntentError(f"{where}.program_id: must be 1..{MAX_ID_LENGTH} characters")
        if program.program_id in programs:
            raise IntentError(f"{where}.program_id: duplicate id {program.program_id!r}")
        programs[program.program_id] = Program(
            program_id=program.program_id,
            primacy=program.primacy,
            default_control=_controls_from_pb(f"{where}.default_control", program.default_control),
        )
    return programs


def _program_of(where: str, program_id: str, programs: Mapping[str, Program]) -> Program | None:
    if not program_id:
        return None
    program = programs.get(program_id)
    if program is None:
        defined = ", ".join(repr(p) for p in sorted(programs)) or "none"
        raise IntentError(
            f"{where}.program_id: unknown program {program_id!r} (programs defined: {defined})"
        )
    return program


def intent_from_pb(doc: pb.IntentDocument) -> Intent:
    """Validate and convert an IntentDocument. Raises IntentError naming the offending field.

    Programs: ids must be unique; an event naming a program must name one of the document's,
    and its primacy is that program's (IEEE 2030.5 primacy belongs to the DERProgram; the
    event's own `primacy` field is then ignored). An event with no program keeps its primacy.
    """
    if not 0 < doc.version < 2**63:
        raise IntentError("version: must be within 1..2**63-1")
    if not doc.site_id:
        raise IntentError("site_id: missing")
    programs = _programs_from_pb(doc)
    events: list[ControlEvent] = []
    seen: set[str] = set()
    for i, event in enumerate(doc.events):
        where = f"events[{i}]"
        if not event.event_id or len(event.event_id) > MAX_ID_LENGTH:
            raise IntentError(f"{where}.event_id: must be 1..{MAX_ID_LENGTH} characters")
        if event.event_id in seen:
            raise IntentError(f"{where}.event_id: duplicate id {event.event_id!r}")
        seen.add(event.event_id)
        if event.duration_s == 0:
            raise IntentError(f"{where}.duration_s: must be > 0")
        if max(abs(event.randomize_start_s), abs(event.randomize_duration_s)) > MAX_RANDOMIZE_S:
            raise IntentError(f"{where}: randomization must be within ±{MAX_RANDOMIZE_S} s")
        if len(event.device_id) > MAX_ID_LENGTH:
            raise IntentError(f"{where}.device_id: longer than {MAX_ID_LENGTH} characters")
        try:
            status = EventStatus(event.status)
        except ValueError:
            raise IntentError(f"{where}.status: unknown status {event.status}") from None
        program = _program_of(where, event.program_id, programs)
        events.append(
            ControlEvent(
                event_id=event.event_id,
                created_wall_ns=ns_from_timestamp(event.created_at),
                start_wall_ns=ns_from_timestamp(event.start),
                duration_s=event.duration_s,
                primacy=program.primacy if program is not None else event.primacy,
                controls=_controls_from_pb(f"{where}.controls", event.controls),
                device_id=event.device_id or None,
                randomize_start_s=event.randomize_start_s,
                randomize_duration_s=event.randomize_duration_s,
                status=status,
                program_id=program.program_id if program is not None else None,
            )
        )
    constraints = doc.constraints
    return Intent(
        site_id=doc.site_id,
        version=doc.version,
        issued_wall_ns=ns_from_timestamp(doc.issued_at),
        events=tuple(events),
        default_control=_controls_from_pb("default_control", doc.default_control),
        constraints=SiteConstraints(
            export_limit_w=_watts(
                "constraints.export_limit_w", _opt(constraints, "export_limit_w")
            ),
            import_limit_w=_watts(
                "constraints.import_limit_w", _opt(constraints, "import_limit_w")
            ),
            soc_min_pct=_opt(constraints, "soc_min_pct"),
            soc_max_pct=_opt(constraints, "soc_max_pct"),
        ),
        programs=tuple(programs.values()),
    )


def sample_payload(reading: Reading, *, boot_id: str, clock_synced: bool) -> bytes:
    """A device reading as a serialized DeviceSample (one outbox row).

    Time integrity (reference/appliance.md §3.5): `time` (wall) and `monotonic_ns` come from the
    reading, `boot_id` is the kernel's boot id (gateway.bootid) and `clock_synced` whether the
    wall clock was trusted when the read began (gateway.timesync.SampleClock). An untrusted
    sample's true time is monotonic_ns + the offset of its boot's ClockSync record.

    The hot path of telemetry (every read of every device): the points never become Python
    objects. Serialized protobuf messages concatenate into their merge, so the row is the
    scalar fields, then the schema's names and units (serialized once per schema), then the
    values and qualities as packed fields written straight from the numpy arrays.
    """
    head = pb.DeviceSample(
        device_id=reading.device_id,
        time=timestamp_from_ns(reading.wall_ns),
        monotonic_ns=reading.mono_ns,
        error=reading.error or "",
        boot_id=boot_id,
        clock_synced=clock_synced,
    ).SerializeToString()
    quality = reading.quality
    if len(quality) and int(quality.max()) > _MAX_ONE_BYTE_VARINT:
        # Not a Quality value; let protobuf encode whatever it is.
        points = pb.DeviceSample(values=reading.values.tolist(), quality=quality.tolist())
        return head + _schema_fields(reading.schema) + points.SerializeToString()
    return b"".join(
        (
            head,
            _schema_fields(reading.schema),
            _packed(_VALUES_TAG, reading.values.astype("<f8", copy=False).tobytes()),
            _packed(_QUALITY_TAG, quality.astype(np.uint8, copy=False).tobytes()),
        )
    )


# DeviceSample's packed repeated fields: `values` (6, double) and `quality` (7, enum: varints;
# every Quality value is below 128, so one byte each).
_VALUES_TAG = bytes([6 << 3 | 2])
_QUALITY_TAG = bytes([7 << 3 | 2])
_MAX_ONE_BYTE_VARINT = 127
# Serialized names + units per PointSchema (one object per device, so few): id -> (schema, bytes).
_SCHEMA_FIELDS: dict[int, tuple[PointSchema, bytes]] = {}
_SCHEMA_CACHE_LIMIT = 4096


def _schema_fields(schema: PointSchema) -> bytes:
    cached = _SCHEMA_FIELDS.get(id(schema))
    if cached is None or cached[0] is not schema:
        if len(_SCHEMA_FIELDS) >= _SCHEMA_CACHE_LIMIT:
            _SCHEMA_FIELDS.clear()
        encoded = pb.DeviceSample(names=schema.names, units=schema.units).SerializeToString()
        cached = _SCHEMA_FIELDS[id(schema)] = (schema, encoded)
    return cached[1]


def _packed(tag: bytes, data: bytes) -> bytes:
    """One packed repeated field: tag, varint length, the encoded elements (none: nothing)."""
    if not data:
        return b""
    length = len(data)
    varint = bytearray()
    while length > 0x7F:
        varint.append(length & 0x7F | 0x80)
        length >>= 7
    varint.append(length)
    return tag + bytes(varint) + data


def clock_sync_payload(boot_id: str, wall_minus_mono_ns: int, wall_ns: int) -> bytes:
    """A serialized ClockSync: from now on (and backwards, for this boot's untrusted samples)
    true wall time = monotonic + `wall_minus_mono_ns`."""
    return pb.ClockSync(
        boot_id=boot_id,
        wall_minus_mono_ns=wall_minus_mono_ns,
        time=timestamp_from_ns(wall_ns),
    ).SerializeToString()


def device_to_pb(info: DeviceInfo, role: str | None) -> pb.Device:
    plate = info.nameplate
    return pb.Device(
        device_id=info.device_id,
        kind=_KIND_TO_PB[info.kind],
        protocol=info.protocol,
        address=info.address,
        manufacturer=info.manufacturer,
        model=info.model,
        serial_number=info.serial_number,
        nameplate=pb.Nameplate(
            max_w=plate.max_w,
            max_va=plate.max_va,
            max_var=plate.max_var,
            max_charge_w=plate.max_charge_w,
            max_discharge_w=plate.max_discharge_w,
            energy_wh=plate.energy_wh,
        ),
        points=[
            pb.PointInfo(name=name, unit=unit, writable=name in info.schema.writable)
            for name, unit in zip(info.schema.names, info.schema.units, strict=True)
        ],
        role=role or "",
    )


def placeholder_device_pb(
    device_id: str, kind: DeviceKind, protocol: str, role: str | None
) -> pb.Device:
    """Inventory entry for a configured device that has not been discovered yet."""
    return pb.Device(
        device_id=device_id, kind=_KIND_TO_PB[kind], protocol=protocol, role=role or ""
    )


def setpoint_to_pb(setpoint: SafeSetpoint) -> pb.DeviceSetpoint:
    message = pb.DeviceSetpoint(device_id=setpoint.device_id, bound_by=setpoint.bound_by)
    if setpoint.max_active_power_w is not None:
        message.max_active_power_w = setpoint.max_active_power_w
    if setpoint.active_power_w is not None:
        message.active_power_w = setpoint.active_power_w
    if setpoint.connect is not None:
        message.connect = setpoint.connect
    return message


def event_response_payload(
    intent_version: int,
    event_id: str,
    status: int,
    reason: str,
    wall_ns: int,
    *,
    effective_window: tuple[int, int] | None = None,
) -> bytes:
    response = pb.EventResponse(
        intent_version=intent_version,
        event_id=event_id,
        status=status,  # type: ignore[arg-type]
        reason=reason,
        time=timestamp_from_ns(wall_ns),
    )
    if effective_window is not None:
        start_ns, end_ns = effective_window
        response.effective_start.CopyFrom(timestamp_from_ns(start_ns))
        response.effective_end.CopyFrom(timestamp_from_ns(end_ns))
    return response.SerializeToString()


def intent_status_payload(
    version: int, applied: bool, reason: str, active_event_id: str | None, wall_ns: int
) -> bytes:
    return pb.IntentStatus(
        version=version,
        state=pb.INTENT_STATE_APPLIED if applied else pb.INTENT_STATE_FAILED,
        reason=reason,
        time=timestamp_from_ns(wall_ns),
        active_event_id=active_event_id or "",
    ).SerializeToString()


def reported_state_payload(
    *,
    wall_ns: int,
    active: ActiveControls,
    setpoints: Iterable[SafeSetpoint],
    availability: Sequence[tuple[str, bool, str]],
    notes: Sequence[str] = (),
    clock_trusted: bool = True,
    audit_head: tuple[int, bytes] | None = None,
) -> bytes:
    """What the gateway enforces now, and why: every mode in force with its source.

    `audit_head`: the audit log's committed head (seq, hash), anchored by the headend."""
    event_ids = active.active_event_ids
    site_events = sorted(active.site.event_ids)
    modes = [_active_mode(None, scope_mode, active.site) for scope_mode in active.site.sources] + [
        _active_mode(device_id, scope_mode, scope)
        for device_id, scope in active.device.items()
        for scope_mode in scope.sources
    ]
    state = pb.ReportedState(
        time=timestamp_from_ns(wall_ns),
        intent_version=active.intent_version,
        active_event_id=(site_events or list(event_ids) or [""])[0],
        active_event_ids=event_ids,
        source=int(active.source),  # type: ignore[arg-type]
        setpoints=[setpoint_to_pb(s) for s in setpoints],
        devices=[
            pb.DeviceAvailability(device_id=d, available=ok, reason=why)
            for d, ok, why in availability
        ],
        active_modes=modes,
        clock_trusted=clock_trusted,
        notes=list(notes),
    )
    if audit_head is not None:
        state.audit_head.seq, state.audit_head.hash = audit_head
    return state.SerializeToString()


def _active_mode(device_id: str | None, mode: str, scope: ScopeControls) -> pb.ActiveMode:
    value = getattr(scope.controls, mode)
    source = scope.sources[mode]
    return pb.ActiveMode(
        device_id=device_id or "",
        mode=mode,
        value=float(value) if value is not None else math.nan,
        source=int(source.source),  # type: ignore[arg-type]
        event_id=source.event_id or "",
        program_id=source.program_id or "",
        label=source.label,
    )


def decision_payload(wall_ns: int, summary: str, setpoints: Iterable[SafeSetpoint]) -> bytes:
    return pb.Decision(
        time=timestamp_from_ns(wall_ns),
        summary=summary,
        setpoints=[setpoint_to_pb(s) for s in setpoints],
    ).SerializeToString()

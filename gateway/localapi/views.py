"""What the local API shows: the snapshot and the Prometheus metrics, built from in-memory state.

Everything here reads what the gateway already keeps (uplink health, outbox stats, the site
snapshot, drivers' health, the control loop's last cycle); nothing does device or network I/O,
so a request never waits on a device and never holds up the control loop.
"""

from __future__ import annotations

import collections
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from drivers.contract import Quality, Reading
from drivers.registry import DRIVERS
from gateway.localapi.schema import (
    ActiveEvent,
    ControlStatus,
    DeviceStatus,
    EventLine,
    Header,
    OutboxStatus,
    OverrideStatus,
    PointValue,
    SetpointStatus,
    Snapshot,
    UplinkStatus,
)
from gateway.outbox import OutboxStats
from gateway.safety import SafeSetpoint

if TYPE_CHECKING:
    from gateway.runtime.app import Gateway

__all__ = ["RecentEvents", "build_snapshot", "point_value", "render_metrics", "setpoint_status"]

NS_PER_S = 1_000_000_000
RECENT_EVENTS = 50


class RecentEvents(logging.Handler):
    """The last RECENT_EVENTS log records (INFO and up) of the gateway and its drivers."""

    def __init__(self, maxlen: int = RECENT_EVENTS) -> None:
        super().__init__(logging.INFO)
        self.lines: collections.deque[EventLine] = collections.deque(maxlen=maxlen)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:  # a bad format string must never break logging
            text = str(record.msg)
        wall_ns = round(record.created * NS_PER_S)
        when = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="seconds")
        self.lines.append(EventLine(wall_ns=wall_ns, time=when, level=record.levelname, text=text))


def _age_s(now_mono_ns: int, then_mono_ns: int | None) -> float | None:
    return None if then_mono_ns is None else max(0.0, (now_mono_ns - then_mono_ns) / NS_PER_S)


def point_value(reading: Reading, index: int) -> PointValue:
    quality = Quality(int(reading.quality[index]))
    value = float(reading.values[index])
    return PointValue(
        name=reading.schema.names[index],
        value=value if quality is Quality.GOOD and math.isfinite(value) else None,
        unit=reading.schema.units[index],
        quality=quality.name,
    )


def setpoint_status(setpoint: SafeSetpoint) -> SetpointStatus:
    return SetpointStatus(
        device_id=setpoint.device_id,
        max_active_power_w=setpoint.max_active_power_w,
        active_power_w=setpoint.active_power_w,
        connect=setpoint.connect,
        bound_by=list(setpoint.bound_by),
    )


def _controls_dict(controls: object) -> dict[str, float | bool]:
    return {
        f.name: value
        for f in fields(controls)  # type: ignore[arg-type]
        if (value := getattr(controls, f.name)) is not None
    }


def _uplink_state(gw: Gateway) -> str:
    health = gw.uplink.health
    if health.connected:
        return "connected"
    if health.tls_failure:
        return f"refused ({health.tls_failure}): {health.last_error}"
    if health.sessions == 0 and not health.last_error:
        return "connecting"
    return f"reconnecting in {health.next_retry_s:.1f} s: {health.last_error}"


def build_snapshot(
    gw: Gateway,
    *,
    stats: OutboxStats,
    started_mono_ns: int,
    recent: Iterable[EventLine],
    reasons: Mapping[str, str],
) -> Snapshot:
    """`stats`: the outbox's, fetched off the event loop (it waits for a commit in progress)."""
    now_mono = gw.clock.mono_ns()
    now_wall = gw.clock.wall_ns()
    config = gw.config
    health = gw.uplink.health
    header = Header(
        gateway_id=config.gateway.id,
        site_id=config.site.id,
        site_name=config.site.name,
        version=_version(),
        uptime_s=(now_mono - started_mono_ns) / NS_PER_S,
        clock_synced=gw.sample_clock.synced(),
        boot_id=gw.boot_id,
        wall_ns=now_wall,
        audit_head_seq=(head := gw.audit.head()).seq,
        audit_head_hash=head.hash.hex(),
    )
    uplink = UplinkStatus(
        transport=health.transport or config.uplink.transport,
        target=health.target or config.uplink.target,
        tls=config.uplink.tls,
        connected=health.connected,
        state=_uplink_state(gw),
        last_ack_age_s=_age_s(now_mono, health.last_ack_mono_ns),
        reconnects=health.reconnects,
        sessions=health.sessions,
        last_error=health.last_error,
        tls_failure=health.tls_failure,
        cert_days_left=health.cert_days_left,
        intent_rejections=dict(health.intent_rejections),
        offline_for_s=gw.uplink.offline_for_s(),
    )
    outbox = OutboxStatus(
        backlog_records=stats.rows,
        oldest_unsent_age_s=(
            None
            if stats.oldest_created_wall_ns is None
            else max(0.0, (now_wall - stats.oldest_created_wall_ns) / NS_PER_S)
        ),
        bytes=stats.held_bytes,
        quota_bytes=stats.quota_bytes,
        shed_records_total=stats.shed_records,
        storage_condition=gw.recorder.storage_condition or "",
    )
    return Snapshot(
        header=header,
        uplink=uplink,
        outbox=outbox,
        devices=_devices(gw, now_mono),
        control=_control(gw, now_mono, now_wall, reasons),
        events=list(recent),
    )


def _devices(gw: Gateway, now_mono: int) -> list[DeviceStatus]:
    devices = []
    for device in gw.config.devices:
        slot = gw.snapshot.slots[device.id]
        health = gw.drivers[device.id].health()
        available, reason = gw.snapshot.availability(device.id, now_mono)
        info = slot.info
        reading = slot.last_good
        devices.append(
            DeviceStatus(
                id=device.id,
                kind=device.kind.value,
                role=device.role,
                driver=device.driver,
                protocol=info.protocol if info is not None else DRIVERS[device.driver].protocol,
                address=info.address if info is not None else "",
                manufacturer=info.manufacturer if info is not None else "",
                model=info.model if info is not None else "",
                link_state=str(health.state),
                available=available,
                unavailable_reason=reason,
                last_good_poll_age_s=slot.age_s(now_mono),
                consecutive_errors=health.consecutive_failures,
                total_errors=health.total_failures,
                last_error=slot.last_error or health.last_error or "",
                max_w=info.nameplate.max_w if info is not None else 0.0,
                points=(
                    [point_value(reading, i) for i in range(len(reading.schema))]
                    if reading is not None
                    else []
                ),
            )
        )
    return devices


def _control(
    gw: Gateway, now_mono: int, now_wall: int, reasons: Mapping[str, str]
) -> ControlStatus:
    control = gw.control
    active = control.active
    windows = control.event_windows()
    events = []
    if active is not None:
        scopes = [active.site, *active.device.values()]
        for event_id in active.active_event_ids:
            modes = sorted(
                mode
                for scope in scopes
                for mode, source in scope.sources.items()
                if source.event_id == event_id
            )
            label = next(
                (
                    source.label
                    for scope in scopes
                    for source in scope.sources.values()
                    if source.event_id == event_id
                ),
                f"event {event_id}",
            )
            window = windows.get(event_id)
            events.append(
                ActiveEvent(
                    event_id=event_id,
                    source=label,
                    modes=modes,
                    expires_in_s=(
                        None if window is None else max(0.0, (window[1] - now_wall) / NS_PER_S)
                    ),
                )
            )
    overrides = [
        OverrideStatus(
            override_id=t.override.override_id,
            origin=t.override.origin,
            device_id=t.override.device_id,
            controls=_controls_dict(t.override.controls),
            expires_in_s=max(0.0, (t.expires_mono_ns - now_mono) / NS_PER_S),
            reason=reasons.get(t.override.override_id, ""),
        )
        for t in control.timed_overrides()
    ]
    return ControlStatus(
        intent_version=active.intent_version if active is not None else 0,
        source=active.source.name.lower() if active is not None else "starting",
        events_allowed=active.events_allowed if active is not None else True,
        blocked_reason=active.blocked_reason if active is not None else "",
        site_controls=active.site.controls.describe() if active is not None else "",
        sources=(
            {mode: s.label for mode, s in active.site.sources.items()} if active is not None else {}
        ),
        active_events=events,
        setpoints=[setpoint_status(sp) for sp in control.last_setpoints],
        overrides=overrides,
        notes=list(control.notes),
        interlocks=[
            f"{i.source}" + (f" on {i.device_id}" if i.device_id else "") + f": "
            f"{i.controls.describe()}"
            for i in control.interlocks
        ],
        cycles=control.cycles,
    )


def _version() -> str:
    from gateway.runtime.app import SOFTWARE_VERSION

    return SOFTWARE_VERSION


# -- metrics ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Metric:
    name: str
    kind: str  # "counter" | "gauge"
    help: str
    samples: tuple[tuple[Mapping[str, str], float], ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _format_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


def _exposition(metrics: Iterable[_Metric]) -> str:
    lines: list[str] = []
    for metric in metrics:
        lines.append(f"# HELP {metric.name} {metric.help}")
        lines.append(f"# TYPE {metric.name} {metric.kind}")
        for labels, value in metric.samples:
            label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
            name = f"{metric.name}{{{label_text}}}" if label_text else metric.name
            lines.append(f"{name} {_format_value(value)}")
    return "\n".join(lines) + "\n"


def render_metrics(gw: Gateway, *, stats: OutboxStats, started_mono_ns: int) -> str:
    """The gateway's state in the Prometheus text exposition format (version 0.0.4)."""
    now_mono = gw.clock.mono_ns()
    now_wall = gw.clock.wall_ns()
    health = gw.uplink.health
    none: Mapping[str, str] = {}

    def one(name: str, kind: str, help_text: str, value: float) -> _Metric:
        return _Metric(name, kind, help_text, ((none, value),))

    device_up = []
    device_errors = []
    device_age = []
    for device in gw.config.devices:
        labels = {"device": device.id}
        available, _ = gw.snapshot.availability(device.id, now_mono)
        device_up.append((labels, 1.0 if available else 0.0))
        device_errors.append((labels, float(gw.drivers[device.id].health().total_failures)))
        age = gw.snapshot.slots[device.id].age_s(now_mono)
        if age is not None:
            device_age.append((labels, age))
    oldest_age = (
        0.0
        if stats.oldest_created_wall_ns is None
        else max(0.0, (now_wall - stats.oldest_created_wall_ns) / NS_PER_S)
    )
    last_ack_age = _age_s(now_mono, health.last_ack_mono_ns)
    metrics = [
        one("dergw_up", "gauge", "1 while the gateway process runs.", 1.0),
        one(
            "dergw_uptime_seconds",
            "gauge",
            "Seconds since the gateway started.",
            (now_mono - started_mono_ns) / NS_PER_S,
        ),
        one(
            "dergw_clock_synced",
            "gauge",
            "1 when the wall clock is trusted for sample timestamps.",
            1.0 if gw.sample_clock.synced() else 0.0,
        ),
        one(
            "dergw_control_cycles_total",
            "counter",
            "Control cycles completed.",
            float(gw.control.cycles),
        ),
        one(
            "dergw_intent_version",
            "gauge",
            "Version of the intent in force (0: none).",
            float(gw.control.active.intent_version if gw.control.active else 0),
        ),
        one(
            "dergw_overrides_active",
            "gauge",
            "Local overrides in force.",
            float(len(gw.control.timed_overrides())),
        ),
        one(
            "dergw_control_notes",
            "gauge",
            "Conditions in force (interlocks, clock, offline, storage) as of the last cycle.",
            float(len(gw.control.notes)),
        ),
        _Metric(
            "dergw_device_up",
            "gauge",
            "1 when the device has a fresh good reading (usable for control).",
            tuple(device_up),
        ),
        _Metric(
            "dergw_device_errors_total",
            "counter",
            "Failed device operations (reads, writes, connects).",
            tuple(device_errors),
        ),
        _Metric(
            "dergw_device_last_good_age_seconds",
            "gauge",
            "Age of the device's last good reading.",
            tuple(device_age),
        ),
        one(
            "dergw_outbox_backlog_records",
            "gauge",
            "Records held in the outbox (not yet acknowledged by the headend).",
            float(stats.rows),
        ),
        one(
            "dergw_outbox_bytes",
            "gauge",
            "Bytes the outbox quota counts.",
            float(stats.held_bytes),
        ),
        one(
            "dergw_outbox_oldest_age_seconds",
            "gauge",
            "Age of the oldest record held (0: empty).",
            oldest_age,
        ),
        one(
            "dergw_outbox_shed_records_total",
            "counter",
            "Records shed by the outbox quota.",
            float(stats.shed_records),
        ),
        one(
            "dergw_uplink_connected",
            "gauge",
            "1 while a session with the headend is up.",
            1.0 if health.connected else 0.0,
        ),
        one(
            "dergw_uplink_reconnects_total",
            "counter",
            "Uplink reconnection attempts.",
            float(health.reconnects),
        ),
        one(
            "dergw_uplink_intents_received_total",
            "counter",
            "Intents received from the headend.",
            float(health.intents_received),
        ),
        _Metric(
            "dergw_intent_rejections_total",
            "counter",
            "Intents refused at verification, by reason.",
            tuple(({"reason": r}, float(n)) for r, n in sorted(health.intent_rejections.items())),
        ),
        one(
            "dergw_audit_head_seq",
            "gauge",
            "Sequence number of the newest committed audit record.",
            float(gw.audit.head().seq),
        ),
    ]
    if last_ack_age is not None:
        metrics.append(
            one(
                "dergw_uplink_last_ack_age_seconds",
                "gauge",
                "Seconds since the headend last acknowledged records.",
                last_ack_age,
            )
        )
    if health.cert_days_left is not None:
        metrics.append(
            one(
                "dergw_uplink_cert_days_left",
                "gauge",
                "Days until the gateway's client certificate expires.",
                health.cert_days_left,
            )
        )
    metrics.append(
        one(
            "dergw_metrics_generated_timestamp_seconds",
            "gauge",
            "Wall-clock time these metrics were generated.",
            now_wall / NS_PER_S,
        )
    )
    return _exposition(metrics)

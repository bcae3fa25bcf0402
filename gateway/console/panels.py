"""What each panel shows: pure functions from the view model to Rich text (no Textual, no I/O)."""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from gateway.console.fmt import fmt_age, fmt_bytes, fmt_duration, fmt_value
from gateway.console.model import (
    ConsoleSnapshot,
    ControlView,
    DeviceView,
    EventView,
    HeaderView,
    OutboxView,
    PointRead,
    TestWriteView,
    UplinkView,
    ValidationView,
)

__all__ = [
    "STATE_STYLE",
    "control_panel",
    "device_detail",
    "events_panel",
    "header_line",
    "overview_panel",
    "point_read_text",
    "validation_text",
]

STATE_STYLE = {"ok": "bold green", "stale": "bold yellow", "fault": "bold red"}
LEVEL_STYLE = {"WARNING": "yellow", "ERROR": "bold red", "CRITICAL": "bold white on red"}


def header_line(header: HeaderView | None, *, writes: bool, stale: bool) -> Text:
    text = Text()
    text.append(
        "WRITES ON" if writes else "read-only", style="bold black on yellow" if writes else ""
    )
    text.append("  ")
    if header is None:
        text.append("waiting for the gateway…", style="bold")
    else:
        text.append(f"{header.gateway_id}", style="bold")
        text.append(f" @ {header.site}  v{header.version}  up {fmt_duration(header.uptime_s)}  ")
        if header.clock_synced:
            text.append("clock synced")
        else:
            text.append("CLOCK UNSYNCED", style="bold white on red")
    if stale:
        text.append("  NO DATA", style="bold white on red")
    return text


def _kv_table(title: str) -> Table:
    table = Table(title=title, title_justify="left", show_header=False, box=None, padding=(0, 1))
    table.add_column(style="bold")
    table.add_column()
    return table


def uplink_table(uplink: UplinkView) -> Table:
    table = _kv_table("Uplink")
    state_style = "green" if uplink.state == "connected" else "bold yellow"
    table.add_row("transport", uplink.transport)
    table.add_row("state", Text(uplink.state, style=state_style))
    table.add_row("last ack", fmt_age(uplink.last_ack_age_s))
    table.add_row("reconnects", str(uplink.reconnects))
    days = uplink.cert_days_left
    cert = "no certificate" if days is None else f"{days:.0f} days left"
    table.add_row("cert", Text(cert, style="bold red" if days is not None and days < 14 else ""))
    table.add_row(
        "TLS failure",
        Text(uplink.tls_failure, style="bold red") if uplink.tls_failure else Text("none"),
    )
    return table


def outbox_table(outbox: OutboxView) -> Table:
    table = _kv_table("Outbox (store and forward)")
    table.add_row("backlog", f"{outbox.backlog} records")
    table.add_row("oldest unsent", fmt_age(outbox.oldest_unsent_age_s))
    quota = "no quota" if outbox.quota_bytes is None else fmt_bytes(outbox.quota_bytes)
    used = (
        "" if not outbox.quota_bytes else f" ({100 * outbox.size_bytes / outbox.quota_bytes:.0f}%)"
    )
    table.add_row("size", f"{fmt_bytes(outbox.size_bytes)} of {quota}{used}")
    table.add_row("shed", Text(str(outbox.shed), style="bold red" if outbox.shed else ""))
    if outbox.condition:
        table.add_row("storage", Text(outbox.condition, style="bold red"))
    return table


def overview_panel(snap: ConsoleSnapshot) -> RenderableType:
    grid = Table.grid(padding=(0, 3))
    grid.add_row(uplink_table(snap.uplink), outbox_table(snap.outbox))
    counts = {state: sum(d.state == state for d in snap.devices) for state in STATE_STYLE}
    summary = Text("Devices: ")
    for state, count in counts.items():
        summary.append(f"{count} {state}  ", style=STATE_STYLE[state] if count else "")
    parts: list[RenderableType] = [grid, Text(""), summary]
    if snap.audit_head:
        parts.append(Text(f"Audit head: {snap.audit_head}"))
    return Group(*parts)


def device_detail(device: DeviceView) -> RenderableType:
    info = _kv_table(f"Device {device.device_id} ({device.kind})")
    info.add_row("address", f"{device.protocol} {device.address}")
    info.add_row("state", Text(device.state, style=STATE_STYLE.get(device.state, "")))
    info.add_row("last good", fmt_age(device.last_good_age_s))
    info.add_row("errors", str(device.errors))
    if device.last_error:
        info.add_row("last error", Text(device.last_error, style="yellow"))
    values = Table(title="Live values", title_justify="left", padding=(0, 1))
    values.add_column("point", style="bold")
    values.add_column("value", justify="right")
    values.add_column("quality")
    for point in device.values:
        quality = Text(point.quality, style="" if point.quality == "GOOD" else "bold yellow")
        values.add_row(point.name, fmt_value(point.value, point.unit), quality)
    return Group(info, Text(""), values)


def control_panel(control: ControlView) -> RenderableType:
    info = _kv_table("Control")
    info.add_row("active event", control.active_event or "none")
    info.add_row("source", Text(control.source, style="bold yellow" if control.overrides else ""))
    info.add_row("version", "—" if control.version is None else str(control.version))
    expiry = control.expires_in_s
    info.add_row("expires in", "—" if expiry is None else fmt_duration(expiry))
    limits = Table(title="Effective limits", title_justify="left", padding=(0, 1))
    limits.add_column("limit", style="bold")
    limits.add_column("value", justify="right")
    limits.add_column("bound by")
    for limit in control.limits:
        value = limit.unit if limit.value is None else fmt_value(limit.value, limit.unit)
        limits.add_row(limit.name, value, limit.bound_by)
    parts: list[RenderableType] = [info, limits]
    if control.overrides:
        overrides = Table(title="Overrides", title_justify="left", padding=(0, 1))
        for column in ("id", "scope", "controls", "expires", "by"):
            overrides.add_column(column)
        for o in control.overrides:
            expires = "—" if o.expires_in_s is None else fmt_duration(o.expires_in_s)
            overrides.add_row(o.override_id, o.device_id or "site", o.controls, expires, o.by)
        parts.append(overrides)
    parts.extend(Text(f"! {note}", style="bold yellow") for note in control.notes)
    return Group(*parts)


def events_panel(events: tuple[EventView, ...]) -> RenderableType:
    table = Table(title="Events and alarms (newest first)", title_justify="left", padding=(0, 1))
    table.add_column("time (UTC)")
    table.add_column("level")
    table.add_column("event")
    for event in reversed(events):
        style = LEVEL_STYLE.get(event.level, "")
        table.add_row(event.time, Text(event.level, style=style), event.text)
    return table


def point_read_text(read: PointRead) -> Text:
    text = Text(f"read {read.device_id}.{read.point} = ", style="bold")
    text.append(fmt_value(read.value, read.unit))
    if read.quality != "GOOD":
        text.append(f" [{read.quality}]", style="bold yellow")
    if read.age_s is not None:
        text.append(f" ({fmt_age(read.age_s)})")
    return text


def test_write_text(result: TestWriteView) -> Text:
    if not result.written:
        return Text(
            f"test write {result.device_id} ({result.override_id}): nothing written: "
            f"{result.reason}",
            style="bold yellow",
        )
    verdict = "verified" if result.ok else f"NOT verified: {result.reason}"
    text = Text(
        f"test write {result.device_id} ({result.override_id}): {verdict}\n",
        style="bold" if result.ok else "bold red",
    )
    for name, value in result.readback:
        text.append(f"  read back {name} = {value:g}\n")
    return text


def validation_text(path: str, result: ValidationView) -> Text:
    if not result.ok:
        text = Text(f"{path}: INVALID\n", style="bold red")
        for error in result.errors:
            text.append(f"  {error}\n")
        return text
    text = Text(f"{path}: valid", style="bold green")
    if not result.diff:
        text.append(" (same as the running config)")
        return text
    text.append(", changes against the running config:\n")
    for line in result.diff.splitlines():
        style = "green" if line.startswith("+") else "red" if line.startswith("-") else ""
        text.append(line + "\n", style=style)
    return text

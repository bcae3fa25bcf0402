"""SiteConsole: the Textual app. Panels in tabs, every action on a key shown in the footer.

Read-only unless started with `allow_writes`; even then each write (override, clear, re-scan)
goes through a form and an explicit confirm, and the gateway still decides (its safety kernel
may refuse, and the refusal is shown as it came).
"""

from __future__ import annotations

from typing import ClassVar

from rich.text import Text
from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import DataTable, Footer, Static, TabbedContent, TabPane
from textual.widgets.data_table import RowDoesNotExist

from gateway.console.dialogs import ConfirmScreen, Field, FormScreen
from gateway.console.fmt import fmt_age, parse_controls
from gateway.console.model import ConsoleSnapshot
from gateway.console.panels import (
    STATE_STYLE,
    control_panel,
    device_detail,
    events_panel,
    header_line,
    overview_panel,
    point_read_text,
    test_write_text,
    validation_text,
)
from gateway.console.source import DataSource, SourceError

__all__ = ["DeviceScreen", "SiteConsole"]

TABS = ("overview", "devices", "control", "events", "tools")


class DeviceScreen(Screen[None]):
    """One device: address, state, live values with units. Follows the app's refreshes."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("q", "app.pop_screen", "Back", show=False),
    ]

    def __init__(self, device_id: str) -> None:
        super().__init__()
        self.device_id = device_id

    def compose(self) -> ComposeResult:
        yield Static(id="device-header")
        with VerticalScroll():
            yield Static(id="device-detail")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.show()

    def show(self) -> None:
        app = self.app
        assert isinstance(app, SiteConsole)
        self.query_one("#device-header", Static).update(app.header_text())
        device = app.data.device(self.device_id) if app.data else None
        detail = self.query_one("#device-detail", Static)
        if device is None:
            detail.update(f"device {self.device_id} is no longer reported by the gateway")
        else:
            detail.update(device_detail(device))


class SiteConsole(App[None]):
    TITLE = "dergw console"
    ENABLE_COMMAND_PALETTE = False  # every action has its own key; keep the footer for them
    CSS = """
    #header { height: 1; background: $primary-background; }
    #device-header { height: 1; background: $primary-background; }
    #status { height: 1; background: $panel; }
    #status.error { background: $error; color: $text; text-style: bold; }
    TabbedContent { height: 1fr; }
    TabPane { height: 1fr; padding: 0; }
    DataTable { height: 1fr; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("1", "tab('overview')", "Overview", show=False),
        Binding("2", "tab('devices')", "Devices", show=False),
        Binding("3", "tab('control')", "Control", show=False),
        Binding("4", "tab('events')", "Events", show=False),
        Binding("5", "tab('tools')", "Tools", show=False),
        Binding("o", "override", "Override"),
        Binding("x", "clear_override", "Clear"),
        Binding("s", "rescan", "Rescan"),
        Binding("t", "test_write", "Test"),
        Binding("p", "read_point", "Read"),
        Binding("v", "validate", "Validate"),
        Binding("r", "refresh", "Refresh"),
        Binding("q", "quit", "Quit"),
    ]

    def __init__(
        self,
        source: DataSource,
        *,
        allow_writes: bool = False,
        refresh_s: float = 2.0,
        config_path: str = "",
    ) -> None:
        super().__init__()
        self.source = source
        self.allow_writes = allow_writes
        self.refresh_s = refresh_s
        self.config_path = config_path
        self.data: ConsoleSnapshot | None = None
        self.data_failed = False
        self.status = ""

    # -- layout ---------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Static(id="header")
        with TabbedContent(initial="overview"):
            with TabPane("1 Overview", id="overview"), VerticalScroll():
                yield Static(id="overview-body")
            with TabPane("2 Devices", id="devices"):
                yield DataTable(id="devices-table", cursor_type="row", zebra_stripes=True)
            with TabPane("3 Control", id="control"), VerticalScroll():
                yield Static(id="control-body")
            with TabPane("4 Events", id="events"), VerticalScroll():
                yield Static(id="events-body")
            with TabPane("5 Tools", id="tools"), VerticalScroll():
                yield Static(self._tools_help(), id="tools-body")
        yield Static(id="status")
        yield Footer(compact=True)

    def _tools_help(self) -> str:
        lines = [
            "Commissioning tools",
            "  p  read a point from a device",
            "  v  validate a config file (diff against the running one)",
            "  s  re-scan a device (rediscover it)",
            "  o  set a time-boxed override      x  clear an override",
        ]
        if not self.allow_writes:
            lines.append("Read-only: start with --allow-writes for s, o and x.")
        return "\n".join(lines)

    async def on_mount(self) -> None:
        table = self.query_one("#devices-table", DataTable)
        for column in ("device", "kind", "protocol / address", "last good", "err", "state"):
            table.add_column(column, key=column)
        await self.refresh_data()
        if self.refresh_s > 0:
            self.set_interval(self.refresh_s, self.refresh_data)

    # -- data -----------------------------------------------------------------------------------

    async def refresh_data(self) -> None:
        try:
            self.data = await self.source.snapshot()
            self.data_failed = False
        except SourceError as exc:
            self.data_failed = True
            self.set_status(f"no data from the gateway: {exc.message}", error=True)
        self.render_data()

    def header_text(self) -> Text:
        return header_line(
            self.data.header if self.data else None,
            writes=self.allow_writes,
            stale=self.data_failed,
        )

    def render_data(self) -> None:
        self.query_one("#header", Static).update(self.header_text())
        if isinstance(self.screen, DeviceScreen):
            self.screen.show()
        data = self.data
        if data is None:
            return
        self.query_one("#overview-body", Static).update(overview_panel(data))
        self.query_one("#control-body", Static).update(control_panel(data.control))
        self.query_one("#events-body", Static).update(events_panel(data.events))
        self._fill_devices(data)

    def _fill_devices(self, data: ConsoleSnapshot) -> None:
        table = self.query_one("#devices-table", DataTable)
        cursor = table.cursor_row
        table.clear()
        for d in data.devices:
            table.add_row(
                d.device_id,
                d.kind,
                f"{d.protocol} {d.address}",
                fmt_age(d.last_good_age_s),
                str(d.errors),
                Text(d.state, style=STATE_STYLE.get(d.state, "")),
                key=d.device_id,
            )
        if data.devices:
            table.move_cursor(row=min(cursor, len(data.devices) - 1))

    def set_status(self, text: str, *, error: bool = False) -> None:
        self.status = text
        widget = self.query_one("#status", Static)
        widget.update(text)
        widget.set_class(error, "error")
        if error:  # also as a toast: the status line is not on every screen
            self.notify(text, severity="error")

    def selected_device(self) -> str:
        table = self.query_one("#devices-table", DataTable)
        try:
            return str(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value or "")
        except RowDoesNotExist:
            return ""

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # While a form or a confirm is open, its keys are the only ones: a stray key must not
        # start another action underneath it (or cancel the one waiting for the answer).
        return action == "quit" or not isinstance(self.screen, ModalScreen)

    # -- navigation -----------------------------------------------------------------------------

    def action_tab(self, tab: str) -> None:
        if isinstance(self.screen, DeviceScreen):
            self.pop_screen()
        self.query_one(TabbedContent).active = tab
        # Focus the panel so up/down/page keys scroll it (and move the devices table's cursor).
        pane = self.query_one(f"#{tab}", TabPane)
        pane.query_one("DataTable, VerticalScroll").focus()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        if event.row_key.value:
            self.push_screen(DeviceScreen(event.row_key.value))

    async def action_refresh(self) -> None:
        await self.refresh_data()

    # -- writes ---------------------------------------------------------------------------------

    def _writes_refused(self, what: str) -> bool:
        if self.allow_writes:
            return False
        self.set_status(f"read-only: {what} needs `dergw console --allow-writes`", error=True)
        return True

    async def _confirm(self, question: str) -> bool:
        question += "\nThe gateway's audit log records it under your user name."
        answer: bool = await self.push_screen_wait(ConfirmScreen(question))
        return answer

    @work(exclusive=True, group="action")
    async def action_override(self) -> None:
        if self._writes_refused("an override"):
            return

        def check(values: dict[str, str]) -> str | None:
            try:
                parse_controls(values["controls"])
                if float(values["duration_s"]) <= 0:
                    return "duration must be more than 0 s"
            except ValueError as exc:
                return str(exc)
            return None if values["reason"] else "say why (the reason goes in the audit log)"

        form = FormScreen(
            "Override (time-boxed; the gateway's safety limits still apply)",
            [
                Field("device_id", "device (empty=site)"),
                Field("controls", "controls (name=value)", "export_limit_w="),
                Field("duration_s", "duration (s)", "900"),
                Field("reason", "reason (audited)"),
            ],
            check,
        )
        values = await self.push_screen_wait(form)
        if values is None:
            self.set_status("override cancelled")
            return
        controls = parse_controls(values["controls"])
        duration_s = float(values["duration_s"])
        scope = values["device_id"] or "the whole site"
        shown = ", ".join(f"{k}={v:g}" for k, v in controls.items())
        if not await self._confirm(f"Set {shown} on {scope} for {duration_s:g} s?"):
            self.set_status("override cancelled")
            return
        try:
            override_id = await self.source.set_override(
                device_id=values["device_id"] or None,
                controls=controls,
                duration_s=duration_s,
                reason=values["reason"],
            )
        except SourceError as exc:
            self.set_status(f"override {exc.code}: {exc.message}", error=True)
            return
        self.set_status(f"override {override_id} active for {duration_s:g} s")
        await self.refresh_data()
        self.action_tab("control")

    @work(exclusive=True, group="action")
    async def action_test_write(self) -> None:
        if self._writes_refused("a test write"):
            return

        def check(values: dict[str, str]) -> str | None:
            if not values["device_id"]:
                return "a test write goes to one device"
            try:
                parse_controls(values["controls"])
                if not 0 < float(values["duration_s"]) <= 300:
                    return "duration must be 1..300 s (it reverts on its own)"
            except ValueError as exc:
                return str(exc)
            return None

        device = self.screen.device_id if isinstance(self.screen, DeviceScreen) else ""
        values = await self.push_screen_wait(
            FormScreen(
                "Test write (a short device override, verified by read-back)",
                [
                    Field("device_id", "device id", device or self.selected_device()),
                    Field("controls", "controls (name=value)", "max_gen_pct="),
                    Field("duration_s", "duration (s)", "30"),
                ],
                check,
            )
        )
        if values is None:
            self.set_status("test write cancelled")
            return
        controls = parse_controls(values["controls"])
        duration_s = float(values["duration_s"])
        shown = ", ".join(f"{k}={v:g}" for k, v in controls.items())
        if not await self._confirm(f"Write {shown} to {values['device_id']} for {duration_s:g} s?"):
            self.set_status("test write cancelled")
            return
        try:
            result = await self.source.test_write(
                device_id=values["device_id"], controls=controls, duration_s=duration_s
            )
        except SourceError as exc:
            self.set_status(f"test write {exc.code}: {exc.message}", error=True)
            return
        self.set_status("")
        self._tools_result(test_write_text(result))
        await self.refresh_data()

    @work(exclusive=True, group="action")
    async def action_clear_override(self) -> None:
        if self._writes_refused("clearing an override"):
            return
        active = self.data.control.overrides if self.data else ()
        if not active:
            self.set_status("no override is active")
            return
        values = await self.push_screen_wait(
            FormScreen(
                "Clear an override", [Field("override_id", "override id", active[0].override_id)]
            )
        )
        if values is None or not await self._confirm(f"Clear override {values['override_id']}?"):
            self.set_status("clear cancelled")
            return
        try:
            await self.source.clear_override(values["override_id"])
        except SourceError as exc:
            self.set_status(f"clear {exc.code}: {exc.message}", error=True)
            return
        self.set_status(f"override {values['override_id']} cleared")
        await self.refresh_data()

    @work(exclusive=True, group="action")
    async def action_rescan(self) -> None:
        if self._writes_refused("a re-scan"):
            return
        values = await self.push_screen_wait(
            FormScreen(
                "Re-scan a device", [Field("device_id", "device id", self.selected_device())]
            )
        )
        if values is None or not await self._confirm(
            f"Re-scan {values['device_id']}? Its polling pauses while it is rediscovered."
        ):
            self.set_status("re-scan cancelled")
            return
        try:
            await self.source.rescan(values["device_id"])
        except SourceError as exc:
            self.set_status(f"re-scan {exc.code}: {exc.message}", error=True)
            return
        self.set_status(f"re-scan of {values['device_id']} scheduled")

    # -- reads ----------------------------------------------------------------------------------

    def _tools_result(self, renderable: Text) -> None:
        self.query_one("#tools-body", Static).update(renderable)
        self.action_tab("tools")

    @work(exclusive=True, group="action")
    async def action_read_point(self) -> None:
        device = self.screen.device_id if isinstance(self.screen, DeviceScreen) else ""
        values = await self.push_screen_wait(
            FormScreen(
                "Read a point",
                [
                    Field("device_id", "device id", device or self.selected_device()),
                    Field("point", "point name, e.g. P", "P"),
                ],
            )
        )
        if values is None:
            return
        try:
            read = await self.source.read_point(values["device_id"], values["point"])
        except SourceError as exc:
            self.set_status(f"read {exc.code}: {exc.message}", error=True)
            return
        self.set_status("")
        self._tools_result(point_read_text(read))

    @work(exclusive=True, group="action")
    async def action_validate(self) -> None:
        values = await self.push_screen_wait(
            FormScreen(
                "Validate a config file", [Field("path", "path to a TOML config", self.config_path)]
            )
        )
        if values is None:
            return
        try:
            result = await self.source.validate_config(values["path"])
        except SourceError as exc:
            self.set_status(f"validate {exc.code}: {exc.message}", error=True)
            return
        self.set_status("")
        self._tools_result(validation_text(values["path"], result))

    async def on_unmount(self) -> None:
        await self.source.close()

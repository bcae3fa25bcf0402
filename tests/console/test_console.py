"""`dergw console` driven headless: every panel by key, device detail, the override flow (refused
by the gateway, accepted then expired), read-only mode, commissioning tools, and SVG snapshots.

All on FixedSource: fixed data, no socket, no clock, so screens are deterministic.
"""

from __future__ import annotations

import io
from collections.abc import Callable

from rich.console import Console
from textual.pilot import Pilot
from textual.widgets import DataTable, Input, Static, TabbedContent

from gateway.console.app import DeviceScreen, SiteConsole
from gateway.console.dialogs import ConfirmScreen, FormScreen
from gateway.console.fixed import FixedSource
from gateway.console.model import ConsoleSnapshot
from gateway.console.source import SourceError

SIZE = (80, 24)


def text_of(app: SiteConsole, selector: str) -> str:
    """What a Static shows, as plain text (wide, so nothing wraps)."""
    out = io.StringIO()
    Console(file=out, width=200, color_system=None).print(
        app.screen.query_one(selector, Static).content
    )
    return out.getvalue()


def console_app(source: FixedSource | None = None, *, writes: bool = False) -> SiteConsole:
    # refresh_s=0: no timer; tests refresh with the `r` key, after moving the source's time.
    app = SiteConsole(source or FixedSource(), allow_writes=writes, refresh_s=0)
    app.animation_level = "none"
    return app


async def fill_form(pilot: Pilot[None], **values: str) -> None:
    screen = pilot.app.screen
    assert isinstance(screen, FormScreen), screen
    for name, value in values.items():
        screen.query_one(f"#f-{name}", Input).value = value
    await pilot.press("ctrl+s")
    await pilot.pause()


async def override(
    pilot: Pilot[None], controls: str, *, duration_s: str = "900", answer: str = "y"
) -> None:
    await pilot.press("o")
    await pilot.pause()
    await fill_form(pilot, controls=controls, duration_s=duration_s, reason="commissioning test")
    assert isinstance(pilot.app.screen, ConfirmScreen)
    await pilot.press(answer)
    await pilot.pause()


# -- navigation -----------------------------------------------------------------------------------


async def test_every_panel_has_a_key_and_shows_its_data() -> None:
    app = console_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        header = text_of(app, "#header")
        assert "gw-0042 @ riverside-farm" in header
        assert "v0.1.0 (slot A)" in header
        assert "up 3d4h" in header
        assert "clock synced" in header
        assert "read-only" in header
        expected: dict[str, tuple[str, Callable[[], str]]] = {
            "1": ("overview", lambda: text_of(app, "#overview-body")),
            "2": ("devices", lambda: ""),
            "3": ("control", lambda: text_of(app, "#control-body")),
            "4": ("events", lambda: text_of(app, "#events-body")),
            "5": ("tools", lambda: text_of(app, "#tools-body")),
        }
        for key, (tab, _) in expected.items():
            await pilot.press(key)
            await pilot.pause()
            assert app.query_one(TabbedContent).active == tab
            assert app.screen.virtual_size.height <= SIZE[1]  # fits 80x24, nothing scrolls
        overview = expected["1"][1]()
        for item in (
            "connected",
            "2.0s ago",
            "reconnects   3",
            "42 days left",
            "TLS failure  none",
        ):
            assert item in overview
        for item in ("128 records", "12s ago", "3.4 MB of 64.0 MB (5%)", "shed           0"):
            assert item in overview
        assert "2 ok  1 stale  0 fault" in overview
        control = expected["3"][1]()
        assert "dr-2026-11-22-evening" in control
        assert "30m00s" in control
        assert "export_limit_w │  8000 W │ intent v17" in control
        events = expected["4"][1]()
        assert events.index("meter1: timeout") < events.index("bess1: over-temperature")
        assert "Read-only: start with --allow-writes" in expected["5"][1]()


async def test_devices_table_and_device_detail() -> None:
    app = console_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("2")
        await pilot.pause()
        table = app.query_one("#devices-table", DataTable)
        assert table.row_count == 3
        assert [str(c) for c in table.get_row("meter1")] == [
            "meter1",
            "meter",
            "modbus-tcp 10.0.0.30:502/unit 3",
            "47s ago",
            "12",
            "stale",
        ]
        await pilot.press("down", "enter")
        await pilot.pause()
        assert isinstance(app.screen, DeviceScreen)
        assert app.screen.device_id == "bess1"
        detail = text_of(app, "#device-detail")
        assert "rtu /dev/ttyUSB0 @9600 8N1 id 7" in detail
        for value in ("-2500 W", "64 %", "52.10 V", "charging"):
            assert value in detail
        await pilot.press("escape")
        await pilot.pause()
        assert not isinstance(app.screen, DeviceScreen)
        # A number key leaves the detail for that panel too.
        await pilot.press("enter")
        await pilot.pause()
        assert isinstance(app.screen, DeviceScreen)
        await pilot.press("3")
        await pilot.pause()
        assert app.query_one(TabbedContent).active == "control"


async def test_refreshes_reach_the_screen_under_a_dialog_and_the_detail() -> None:
    source = FixedSource()
    app = console_app(source, writes=True)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("o")
        await pilot.pause()
        source.advance(3600)
        await app.refresh_data()  # as the refresh timer does, with the form open
        assert isinstance(app.screen, FormScreen)
        await pilot.press("escape", "2", "enter")
        await pilot.pause()
        source.advance(3600)
        await pilot.press("r")
        await pilot.pause()
        assert isinstance(app.screen, DeviceScreen)
        assert "up 3d6h" in text_of(app, "#device-header")


async def test_unreachable_gateway_is_shown_not_fatal() -> None:
    class DownSource(FixedSource):
        async def snapshot(self) -> ConsoleSnapshot:
            raise SourceError("unavailable", "cannot open /run/dergw/dergw.sock")

    app = console_app(DownSource())
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert "NO DATA" in text_of(app, "#header")
        assert "cannot open /run/dergw/dergw.sock" in app.status
        assert app.query_one("#status").has_class("error")


# -- writes ---------------------------------------------------------------------------------------


async def test_read_only_refuses_every_write_action() -> None:
    source = FixedSource()
    app = console_app(source)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        for key, what in (
            ("o", "an override"),
            ("x", "clearing"),
            ("s", "a re-scan"),
            ("t", "a test write"),
        ):
            await pilot.press(key)
            await pilot.pause()
            assert type(app.screen).__name__ == "Screen"  # no form, no confirm
            assert app.status.startswith(f"read-only: {what}")
            assert "--allow-writes" in app.status
        assert source.requests == ["snapshot"]


async def test_override_refused_by_the_safety_kernel_is_shown() -> None:
    source = FixedSource()
    app = console_app(source, writes=True)
    async with app.run_test(size=SIZE) as pilot:
        await override(pilot, "export_limit_w=20000")
        assert "override.set" in source.requests
        assert app.status == (
            "override refused: safety: export_limit_w=20000 exceeds the site limit 10000 W"
        )
        assert app.query_one("#status").has_class("error")
        control = text_of(app, "#control-body")
        assert "source        headend" in control
        assert "Overrides" not in control


async def test_override_accepted_shows_in_control_then_expires() -> None:
    source = FixedSource()
    app = console_app(source, writes=True)
    async with app.run_test(size=SIZE) as pilot:
        await override(pilot, "export_limit_w=5000")
        assert app.status == "override ov-1 active for 900 s"
        assert app.query_one(TabbedContent).active == "control"
        control = text_of(app, "#control-body")
        assert "source        override" in control
        assert "export_limit_w │  5000 W │ override ov-1" in control
        assert "ov-1 │ site  │ export_limit_w=5000 │ 15m00s  │ console" in control
        assert "override ov-1 set: commissioning test" in text_of(app, "#events-body")

        source.advance(600)
        await pilot.press("r")
        await pilot.pause()
        assert "5m00s" in text_of(app, "#control-body")

        source.advance(300)
        await pilot.press("r")
        await pilot.pause()
        control = text_of(app, "#control-body")
        assert "ov-1" not in control
        assert "export_limit_w │  8000 W │ intent v17" in control
        assert "override ov-1 expired" in text_of(app, "#events-body")


async def test_override_needs_the_confirm_and_a_valid_form() -> None:
    source = FixedSource()
    app = console_app(source, writes=True)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("o")
        await pilot.pause()
        await fill_form(pilot, controls="export_limit_w=lots", reason="x")
        assert isinstance(app.screen, FormScreen)  # still open, saying what to fix
        assert "'lots' is not a number" in str(app.screen.query_one("#form-error", Static).content)
        await fill_form(pilot, controls="export_limit_w=100", reason="")
        assert "say why" in str(app.screen.query_one("#form-error", Static).content)
        await fill_form(pilot, reason="test")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("o", "3", "r")  # other actions' keys do nothing while it asks
        await pilot.pause()
        assert isinstance(app.screen, ConfirmScreen)
        assert "Set export_limit_w=100 on the whole site for 900 s?" in str(
            app.screen.query_one("#confirm-question", Static).content
        )
        await pilot.press("n")
        await pilot.pause()
        assert app.status == "override cancelled"
        assert "override.set" not in source.requests


async def test_clear_override_and_rescan_with_confirm() -> None:
    source = FixedSource()
    app = console_app(source, writes=True)
    async with app.run_test(size=SIZE) as pilot:
        await override(pilot, "export_limit_w=5000")
        await pilot.press("x")
        await pilot.pause()
        await fill_form(pilot)  # the active override is the default
        await pilot.press("y")
        await pilot.pause()
        assert app.status == "override ov-1 cleared"
        assert "Overrides" not in text_of(app, "#control-body")

        await pilot.press("2", "down", "s")
        await pilot.pause()
        await fill_form(pilot)  # the selected device is the default
        assert "Re-scan bess1?" in str(app.screen.query_one("#confirm-question", Static).content)
        await pilot.press("y")
        await pilot.pause()
        assert app.status == "re-scan of bess1 scheduled"
        assert source.requests.count("rescan") == 1


# -- commissioning tools --------------------------------------------------------------------------


async def test_read_a_point_and_validate_a_config() -> None:
    app = console_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("p")
        await pilot.pause()
        await fill_form(pilot)  # defaults: the selected device, point P
        assert app.query_one(TabbedContent).active == "tools"
        assert "read pv1.P = 7420 W" in text_of(app, "#tools-body")

        await pilot.press("p")
        await pilot.pause()
        await fill_form(pilot, device_id="pv1", point="nope")
        assert app.status == "read not_found: pv1 has no point nope"

        await pilot.press("v")
        await pilot.pause()
        await fill_form(pilot, path="/etc/dergw/new.toml")
        tools = text_of(app, "#tools-body")
        assert "/etc/dergw/new.toml: valid, changes against the running config" in tools
        assert "+export_limit_w = 9000" in tools

        await pilot.press("v")
        await pilot.pause()
        await fill_form(pilot, path="bad.toml")
        tools = text_of(app, "#tools-body")
        assert "bad.toml: INVALID" in tools
        assert "export_limit_w: must be >= 0" in tools


async def test_test_write_is_confirmed_and_shows_the_read_back() -> None:
    source = FixedSource()
    app = console_app(source, writes=True)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("t")
        await pilot.pause()
        await fill_form(pilot, device_id="pv1", controls="max_gen_pct=40", duration_s="30")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("y")
        await pilot.pause()
        assert "test_write" in source.requests
        assert app.query_one(TabbedContent).active == "tools"
        tools = text_of(app, "#tools-body")
        assert "test write pv1 (ov-1): verified" in tools
        assert "read back WMaxLimPct = 40" in tools

        await pilot.press("t")
        await pilot.pause()
        await fill_form(pilot, device_id="pv1", controls="max_gen_pct=40", duration_s="900")
        assert isinstance(app.screen, FormScreen)  # refused by the form: reverts within 300 s
        await pilot.press("escape")
        await pilot.pause()


# -- snapshots ------------------------------------------------------------------------------------


def test_snapshot_main_screen(snap_compare: Callable[..., bool]) -> None:
    assert snap_compare(console_app(), terminal_size=SIZE)


def test_snapshot_device_detail(snap_compare: Callable[..., bool]) -> None:
    assert snap_compare(console_app(), press=["2", "down", "down", "enter"], terminal_size=SIZE)


def test_snapshot_override_confirm(snap_compare: Callable[..., bool]) -> None:
    async def fill(pilot: Pilot[None]) -> None:
        await pilot.press("o")
        await pilot.pause()
        await fill_form(pilot, controls="export_limit_w=5000", reason="inverter test")

    assert snap_compare(console_app(writes=True), run_before=fill, terminal_size=SIZE)

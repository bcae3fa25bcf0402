"""The console on a real gateway: LiveSource over the gateway's local API socket, driven by keys.

The gateway runs in-process with the in-memory test driver (tests.gateway.fakes) and an
unreachable headend, as in tests/gateway/test_localapi.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from textual.widgets import DataTable

from drivers import registry
from gateway.audit import AuditKind, read_records
from gateway.config import GatewayConfig
from gateway.console.app import SiteConsole
from gateway.console.live import LiveSource
from gateway.console.source import SourceError
from gateway.runtime.app import Gateway
from tests.console.test_console import SIZE, override, text_of
from tests.support import async_wait_until

SITE = {
    "gateway": {"id": "gw-con", "state_dir": ""},
    "site": {"id": "site-con", "name": "Console site", "export_limit_w": 3000},
    "uplink": {"transport": "grpc", "target": "127.0.0.1:1", "tls": False, "reconnect_max_s": 1},
    "control": {"period_s": 0.1, "revert_timeout_s": 2, "refresh_s": 1},
    "devices": [
        {"id": "pv1", "kind": "pv", "driver": "memory", "poll_period_s": 0.1},
        {"id": "meter1", "kind": "meter", "driver": "memory", "role": "pcc", "poll_period_s": 0.1},
    ],
}


@pytest.fixture
async def gateway(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> AsyncIterator[tuple[Gateway, Path]]:
    monkeypatch.setitem(
        registry.DRIVERS,
        "memory",
        registry.DriverSpec("tests.gateway.fakes", "MemoryParams", "MemoryDriver", "memory"),
    )
    caplog.set_level(logging.INFO, logger="gateway")
    raw = json.loads(json.dumps(SITE))
    raw["gateway"]["state_dir"] = str(tmp_path / "s")  # short: Unix socket paths are limited
    config_file = tmp_path / "gateway.toml"
    config_file.write_text("# the running config\n")
    app = Gateway(GatewayConfig.model_validate(raw), config_path=config_file)
    stop = asyncio.Event()
    task = asyncio.create_task(app.run(stop))
    socket_path = tmp_path / "s" / "dergw.sock"
    try:
        await async_wait_until(socket_path.is_socket, timeout_s=10, what="the API socket")
        await async_wait_until(
            lambda: all(s.last_good is not None for s in app.snapshot.slots.values()),
            timeout_s=10,
            what="devices read",
        )
        yield app, socket_path
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def test_console_on_a_real_gateway(gateway: tuple[Gateway, Path], tmp_path: Path) -> None:
    gw, socket_path = gateway
    app = SiteConsole(LiveSource(str(socket_path)), allow_writes=True, refresh_s=0)
    app.animation_level = "none"
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert "gw-con @ Console site" in text_of(app, "#header")
        table = app.query_one("#devices-table", DataTable)
        assert {str(key.value) for key in table.rows} == {"pv1", "meter1"}
        assert str(table.get_row("pv1")[-1]) == "ok"

        # Refused by the gateway (a negative export limit): shown as it came, nothing changes.
        await override(pilot, "export_limit_w=-1", duration_s="60")
        await async_wait_until(lambda: app.status.startswith("override refused"), timeout_s=5)
        assert "export_limit_w" in app.status
        assert gw.control.timed_overrides() == ()

        # Accepted: shown in the control panel, audited under this user, then expires.
        await override(pilot, "max_gen_pct=10", duration_s="1")
        await async_wait_until(lambda: " active for 1 s" in app.status, timeout_s=5)
        override_id = app.status.split()[1]
        assert override_id in text_of(app, "#control-body")
        (record,) = [
            r
            for r in read_records(tmp_path / "s" / "audit.db")
            if r.kind == AuditKind.OVERRIDE_SET and r.subject == override_id
        ]
        assert record.origin.startswith("local:")

        async def expired() -> bool:
            await app.refresh_data()
            return override_id not in text_of(app, "#control-body")

        await async_wait_until(expired, timeout_s=5, what="the override to expire")


async def test_live_source_errors_say_what_to_do(tmp_path: Path) -> None:
    source = LiveSource(str(tmp_path / "no.sock"))
    with pytest.raises(SourceError) as caught:
        await source.snapshot()
    assert caught.value.code == "unavailable"
    assert "is the gateway running" in caught.value.message
    with pytest.raises(SourceError) as caught:
        await source.set_override(device_id=None, controls={"warp": 9.0}, duration_s=60, reason="t")
    assert caught.value.code == "bad_request"
    assert "warp" in caught.value.message
    assert "export_limit_w" in caught.value.message  # lists what is allowed

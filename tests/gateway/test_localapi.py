"""The gateway's local API over a real Unix socket, served by a real Gateway in-process.

Devices are the in-memory test driver (tests.gateway.fakes); the uplink points at a closed port
(the API must work with the headend unreachable).
"""

from __future__ import annotations

import asyncio
import getpass
import grp
import json
import logging
import os
import re
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from drivers import registry
from gateway.audit import AuditKind, read_records
from gateway.config import GatewayConfig
from gateway.localapi.client import LocalApiClient, LocalApiError
from gateway.localapi.schema import MAX_LINE_BYTES, Snapshot
from gateway.metrics_cli import main as metrics_main
from gateway.runtime.app import Gateway
from tests.support import async_wait_until

SITE = {
    "gateway": {"id": "gw-api", "state_dir": ""},
    "site": {"id": "site-api", "name": "API site", "export_limit_w": 3000},
    "uplink": {"transport": "grpc", "target": "127.0.0.1:1", "tls": False, "reconnect_max_s": 1},
    "control": {"period_s": 0.1, "revert_timeout_s": 2, "refresh_s": 1},
    "devices": [
        {"id": "pv1", "kind": "pv", "driver": "memory", "poll_period_s": 0.1},
        {"id": "meter1", "kind": "meter", "driver": "memory", "role": "pcc", "poll_period_s": 0.1},
    ],
}
USER = getpass.getuser()


@pytest.fixture
def memory_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(
        registry.DRIVERS,
        "memory",
        registry.DriverSpec("tests.gateway.fakes", "MemoryParams", "MemoryDriver", "memory"),
    )


def _config(tmp_path: Path) -> GatewayConfig:
    # Unix socket paths are limited to ~107 bytes: keep the state dir short-named.
    raw = json.loads(json.dumps(SITE))
    raw["gateway"]["state_dir"] = str(tmp_path / "s")
    return GatewayConfig.model_validate(raw)


class Running:
    def __init__(self, app: Gateway, socket_path: Path) -> None:
        self.app = app
        self.socket_path = socket_path


@pytest.fixture
async def gateway(
    memory_driver: None, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> AsyncIterator[Running]:
    caplog.set_level(logging.INFO, logger="gateway")  # as `[gateway] log_level` would
    config = _config(tmp_path)
    config_file = tmp_path / "gateway.toml"
    config_file.write_text("# the running config\n[site]\nname = 'API site'\n")
    app = Gateway(config, config_path=config_file)
    stop = asyncio.Event()
    task = asyncio.create_task(app.run(stop))
    socket_path = tmp_path / "s" / "dergw.sock"
    try:
        await async_wait_until(socket_path.is_socket, timeout_s=10, what="the API socket")
        await async_wait_until(
            lambda: (
                all(s.last_good is not None for s in app.snapshot.slots.values())
                and app.control.cycles > 2
            ),
            timeout_s=10,
            what="devices read and control cycles",
        )
        yield Running(app, socket_path)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    assert not socket_path.exists()  # removed at shutdown


@pytest.fixture
async def api(gateway: Running) -> AsyncIterator[LocalApiClient]:
    client = await LocalApiClient.connect(str(gateway.socket_path))
    async with client:
        yield client


async def _raw(gateway: Running) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_unix_connection(str(gateway.socket_path), limit=1 << 20)


async def test_snapshot_fields_are_present_and_sane(api: LocalApiClient) -> None:
    snap = await api.snapshot()
    assert snap.header.gateway_id == "gw-api"
    assert snap.header.site_id == "site-api"
    assert snap.header.site_name == "API site"
    assert snap.header.uptime_s > 0
    assert snap.header.boot_id
    assert snap.uplink.transport == "grpc"
    assert not snap.uplink.connected
    assert snap.uplink.tls is False
    assert snap.outbox.backlog_records > 0  # samples recorded, never sent
    assert snap.outbox.bytes > 0
    assert {d.id for d in snap.devices} == {"pv1", "meter1"}
    pv = next(d for d in snap.devices if d.id == "pv1")
    assert pv.kind == "pv"
    assert pv.protocol == "memory"
    assert pv.available
    assert pv.link_state == "connected"
    assert pv.last_good_poll_age_s is not None
    assert pv.last_good_poll_age_s < 5
    assert pv.points
    assert all(p.quality for p in pv.points)
    assert any(p.name == "W" and p.unit == "W" for p in pv.points)
    assert snap.control.cycles > 0
    assert snap.control.source == "fallback"
    assert {sp.device_id for sp in snap.control.setpoints} == {"pv1"}
    assert any("gateway gw-api ready" in e.text for e in snap.events)
    # The client's model is the wire shape: a round trip changes nothing.
    assert Snapshot.model_validate_json(snap.model_dump_json()) == snap


async def test_override_needs_confirm(api: LocalApiClient, gateway: Running) -> None:
    with pytest.raises(LocalApiError) as caught:
        await api.override_set({"export_limit_w": 0}, duration_s=60, reason="test")
    assert caught.value.code == "refused"
    assert "confirm" in caught.value.message
    assert gateway.app.control.timed_overrides() == ()


@pytest.mark.parametrize(
    ("params", "code", "words"),
    [
        ({"duration_s": -5}, "refused", "duration_s"),
        ({"device_id": "nope"}, "refused", "unknown device"),
        ({"controls": {"export_limit_w": -1}}, "refused", "export_limit_w"),
        ({"controls": {}}, "refused", "at least one control"),
        ({"controls": {"warp": 9}}, "bad_request", "warp"),
        ({"reason": " "}, "refused", "reason"),
    ],
)
async def test_invalid_override_is_refused_and_changes_nothing(
    api: LocalApiClient, gateway: Running, params: dict[str, object], code: str, words: str
) -> None:
    request: dict[str, object] = {
        "controls": {"export_limit_w": 0},
        "duration_s": 60,
        "reason": "test",
        "confirm": True,
        **params,
    }
    with pytest.raises(LocalApiError) as caught:
        await api.call("override.set", request)
    assert caught.value.code == code
    assert words in caught.value.message
    assert gateway.app.control.timed_overrides() == ()


async def test_override_applies_is_audited_and_expires(
    api: LocalApiClient, gateway: Running, tmp_path: Path
) -> None:
    result = await api.override_set(
        {"max_gen_pct": 10}, duration_s=1.0, reason="commissioning", confirm=True
    )
    assert result.origin == f"local:{USER}"
    assert 0 < result.expires_in_s <= 1.0
    assert result.controls == "max_gen_pct=10"
    # What the kernel enforces: pv1 capped at 10 % of 10 kW, bound by the override.
    (pv,) = result.enforced
    assert pv.max_active_power_w == pytest.approx(1000)
    assert any(result.override_id in why for why in pv.bound_by)

    snap = await api.snapshot()
    (override,) = snap.control.overrides
    assert override.override_id == result.override_id
    assert override.origin == f"local:{USER}"
    assert override.controls == {"max_gen_pct": 10}
    assert override.reason == "commissioning"
    assert snap.header.audit_head_seq > 0
    assert any(result.override_id in e.text and e.level == "WARNING" for e in snap.events)

    (record,) = [
        r
        for r in read_records(tmp_path / "s" / "audit.db")
        if r.kind == AuditKind.OVERRIDE_SET and r.subject == result.override_id
    ]
    assert record.origin == f"local:{USER}"
    assert "max_gen_pct=10" in record.detail
    assert '"reason":"commissioning"' in record.detail.replace(" ", "")

    await async_wait_until(
        lambda: gateway.app.control.timed_overrides() == (), timeout_s=5, what="expiry"
    )
    assert (await api.snapshot()).control.overrides == []


async def test_override_clear(api: LocalApiClient, gateway: Running) -> None:
    result = await api.override_set(
        {"export_limit_w": 0}, duration_s=600, reason="test", confirm=True, device_id="pv1"
    )
    cleared = await api.override_clear(result.override_id)
    assert cleared.cleared
    assert gateway.app.control.timed_overrides() == ()
    with pytest.raises(LocalApiError) as caught:
        await api.override_clear(result.override_id)
    assert caught.value.code == "not_found"


async def test_malformed_lines_get_errors_and_the_connection_stays_usable(
    gateway: Running,
) -> None:
    reader, writer = await _raw(gateway)
    try:
        for bad, code in (
            (b"{not json\n", "bad_request"),
            (b"[1, 2]\n", "bad_request"),
            (b'{"id": 7, "method": 3}\n', "bad_request"),
            (b'{"id": 8, "method": "reboot"}\n', "not_found"),
            (b"\xff\xfe\n", "bad_request"),
        ):
            writer.write(bad)
            reply = json.loads(await reader.readline())
            assert reply["error"]["code"] == code, bad
        writer.write(b'{"id": 9, "method": "read_point", "params": {"device_id": "pv1"}}\n')
        reply = json.loads(await reader.readline())
        assert reply["id"] == 9
        assert reply["error"]["code"] == "bad_request"
        writer.write(b'{"id": 10, "method": "snapshot"}\n')
        reply = json.loads(await reader.readline())
        assert reply["id"] == 10
        assert reply["result"]["header"]["gateway_id"] == "gw-api"
    finally:
        writer.close()


async def test_oversize_line_is_refused_before_decoding(gateway: Running) -> None:
    reader, writer = await _raw(gateway)
    try:
        # Not even JSON: it is never decoded, only counted and discarded through its newline.
        writer.write(b"x" * (3 * MAX_LINE_BYTES) + b"\n")
        reply = json.loads(await reader.readline())
        assert reply["error"]["code"] == "bad_request"
        assert "bytes" in reply["error"]["message"]
        writer.write(b'{"id": 2, "method": "snapshot"}\n')
        reply = json.loads(await reader.readline())
        assert reply["id"] == 2
        assert "result" in reply
    finally:
        writer.close()


async def test_socket_mode_is_0660(gateway: Running) -> None:
    mode = stat.S_IMODE(os.stat(gateway.socket_path).st_mode)
    assert mode == 0o660


async def test_read_point_and_rescan(api: LocalApiClient, gateway: Running) -> None:
    reading = await api.read_point("pv1", "W")
    assert reading.point.name == "W"
    assert reading.point.quality == "GOOD"
    assert reading.age_s is not None
    with pytest.raises(LocalApiError) as caught:
        await api.read_point("pv1", "Nope")
    assert caught.value.code == "not_found"
    with pytest.raises(LocalApiError) as caught:
        await api.rescan("ghost")
    assert caught.value.code == "not_found"
    assert (await api.rescan("meter1")).scheduled

    async def rediscovered() -> bool:
        snap = await api.snapshot()
        return any("meter1: rescan requested" in e.text for e in snap.events) and any(
            "meter1: discovered" in e.text for e in snap.events[-10:]
        )

    await async_wait_until(rediscovered, timeout_s=5, what="meter1 discovered again")


async def test_validate_config_reports_errors_and_the_diff(
    api: LocalApiClient, tmp_path: Path
) -> None:
    candidate = tmp_path / "new.toml"
    candidate.write_text("# the running config\n[site]\nname = 'Renamed'\n")
    result = await api.validate_config(str(candidate))
    assert not result.ok
    assert any("gateway: required key is missing" in e for e in result.errors)
    assert "-name = 'API site'" in result.diff
    assert "+name = 'Renamed'" in result.diff
    missing = await api.validate_config(str(tmp_path / "absent.toml"))
    assert not missing.ok
    assert "not found" in missing.errors[0]


_SAMPLE = re.compile(
    r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*",?)*\})? '
    r"(-?[0-9.e+-]+|NaN|[+-]Inf)$"
)


def _check_exposition(text: str) -> dict[str, float]:
    samples: dict[str, float] = {}
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith(("# HELP ", "# TYPE ")):
            continue
        assert _SAMPLE.match(line), line
        name, value = line.rsplit(" ", 1)
        samples[name] = float(value)
    return samples


async def test_metrics_text_parses(api: LocalApiClient, gateway: Running) -> None:
    samples = _check_exposition(await api.metrics())
    assert samples["dergw_control_cycles_total"] > 0
    assert samples['dergw_device_up{device="pv1"}'] == 1
    assert samples['dergw_device_errors_total{device="meter1"}'] == 0
    assert samples["dergw_outbox_backlog_records"] > 0
    assert samples["dergw_uplink_connected"] == 0
    assert samples["dergw_audit_head_seq"] >= 0
    assert "# TYPE dergw_intent_rejections_total counter" in await api.metrics()


async def test_metrics_cli_writes_the_textfile(gateway: Running, tmp_path: Path) -> None:
    out = tmp_path / "dergw.prom"
    code = await asyncio.to_thread(
        metrics_main, ["--socket", str(gateway.socket_path), "--textfile", str(out)]
    )
    assert code == 0
    samples = _check_exposition(out.read_text())
    assert "dergw_outbox_bytes" in samples
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    leftovers = await asyncio.to_thread(lambda: [p for p in tmp_path.iterdir() if ".tmp" in p.name])
    assert leftovers == []


def test_metrics_cli_without_a_gateway_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert metrics_main(["--socket", str(tmp_path / "none.sock")]) == 1
    assert "cannot reach the gateway" in capsys.readouterr().err


@pytest.mark.usefixtures("memory_driver")
async def test_configured_long_socket_path_and_group(tmp_path: Path) -> None:
    group = grp.getgrgid(os.getgid()).gr_name
    socket_path = tmp_path / ("d" * 110) / "api.sock"  # longer than sockaddr_un allows
    raw = json.loads(json.dumps(SITE))
    raw["gateway"]["state_dir"] = str(tmp_path / "s")
    raw["local_api"] = {"socket": str(socket_path), "group": group}
    app = Gateway(GatewayConfig.model_validate(raw))
    stop = asyncio.Event()
    task = asyncio.create_task(app.run(stop))
    try:
        await async_wait_until(socket_path.is_socket, timeout_s=10, what="the API socket")
        info = socket_path.stat()
        assert info.st_gid == os.getgid()
        assert stat.S_IMODE(info.st_mode) == 0o660
        async with await LocalApiClient.connect(str(socket_path)) as api:
            assert (await api.snapshot()).header.gateway_id == "gw-api"
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


@pytest.mark.usefixtures("memory_driver")
async def test_disabled_local_api_opens_no_socket(tmp_path: Path) -> None:
    raw = json.loads(json.dumps(SITE))
    raw["gateway"]["state_dir"] = str(tmp_path / "s")
    raw["local_api"] = {"enabled": False}
    app = Gateway(GatewayConfig.model_validate(raw))
    assert app.local_api is None


async def test_test_write_is_a_short_audited_override_reported_with_its_read_back(
    api: LocalApiClient, gateway: Running, tmp_path: Path
) -> None:
    with pytest.raises(LocalApiError) as caught:
        await api.test_write("pv1", {"max_gen_pct": 20})  # no confirm
    assert caught.value.code == "refused"
    with pytest.raises(LocalApiError) as caught:
        await api.test_write("nope", {"max_gen_pct": 20}, confirm=True)
    assert caught.value.code == "not_found"

    result = await api.test_write("pv1", {"max_gen_pct": 20}, duration_s=2.0, confirm=True)
    assert result.written, result.reason
    assert result.ok, result.reason
    assert result.enforced is not None
    assert result.enforced.max_active_power_w == pytest.approx(2000)
    assert 0 < result.expires_in_s <= 2.0
    last = gateway.app.control.last_write("pv1")
    assert last is not None
    assert dict(last.readback) == result.readback
    assert any(
        r.kind == AuditKind.OVERRIDE_SET and r.subject == result.override_id
        for r in read_records(tmp_path / "s" / "audit.db")
    )
    await async_wait_until(
        lambda: gateway.app.control.timed_overrides() == (), timeout_s=5, what="the revert"
    )

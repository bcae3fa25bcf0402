"""`dergw hil ...`: the real command in a subprocess, and the delegation to the scenario runner."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import sys
import time
import types
from pathlib import Path

import pytest
from pymodbus.client import AsyncModbusTcpClient

from hil.cli import demo_main, main, write_manifest
from tests.support import async_wait_until, free_tcp_port

from .test_site import SITES

DERGW = shutil.which("dergw", path=str(Path(sys.executable).parent))


@pytest.mark.hil
async def test_dergw_hil_run_serves_until_sigterm(tmp_path: Path) -> None:
    assert DERGW, f"the dergw console script is missing next to {sys.executable}; pip install -e ."
    port = free_tcp_port()
    manifest = tmp_path / "out" / "site.json"
    proc = await asyncio.create_subprocess_exec(
        DERGW,
        "hil",
        "run",
        "--site",
        str(SITES / "demo.toml"),
        "--port",
        str(port),
        "--manifest",
        str(manifest),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await async_wait_until(manifest.exists, timeout_s=20, what="the manifest file")
        doc = json.loads(manifest.read_text())
        assert doc["site"] == "demo"
        assert [(d["id"], d["kind"], d["unit_id"], d["role"]) for d in doc["devices"]] == [
            ("pv1", "pv", 1, None),
            ("bat1", "battery", 2, None),
            ("meter1", "meter", 3, "pcc"),
        ]
        assert {(d["host"], d["port"]) for d in doc["devices"]} == {("127.0.0.1", port)}
        client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=2, retries=0)
        assert await client.connect()
        try:
            response = await client.read_holding_registers(40000, count=4, device_id=1)
        finally:
            client.close()
        assert response.registers == [0x5375, 0x6E53, 1, 66]  # SunS, model 1, L = 66
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), timeout=5) == 0
        assert time.monotonic() - started < 2
        assert not list(manifest.parent.glob("*.tmp"))
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        stdout, stderr = await proc.communicate()
    assert b"pv1: modbus-tcp 127.0.0.1:" in stdout, stderr.decode()


def test_run_with_a_bad_site_file_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\n[[devices]]\nid = "a"\nkind = "pv"\nunit_id = 1\n')
    assert main(["run", "--site", str(bad)]) == 2
    assert "rating_w" in capsys.readouterr().err
    assert main(["run", "--site", str(tmp_path / "absent.toml")]) == 2


def test_scenario_and_demo_delegate_to_the_runner(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, list[str]]] = []
    runner = types.ModuleType("hil.scenarios.runner")
    runner.main = lambda argv: calls.append(("main", argv)) or 3  # type: ignore[attr-defined]
    runner.demo_main = lambda argv: calls.append(("demo", argv)) or 4  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "hil.scenarios.runner", runner)
    assert main(["scenario", "export-limit", "--check"]) == 3
    assert demo_main(["--fast"]) == 4
    assert calls == [("main", ["export-limit", "--check"]), ("demo", ["--fast"])]


def test_write_manifest_replaces_atomically(tmp_path: Path) -> None:
    target = tmp_path / "m.json"
    write_manifest(target, {"site": "a", "devices": []})
    write_manifest(target, {"site": "b", "devices": []})
    assert json.loads(target.read_text())["site"] == "b"
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]

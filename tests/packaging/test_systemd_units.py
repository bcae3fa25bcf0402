"""The systemd units: `systemd-analyze verify` prints nothing (it exits 0 on unknown keys, so any
output fails), and the gateway unit's offline security exposure stays at or below 2.5."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support import require_binary

ROOT = Path(__file__).resolve().parents[2]
UNITS = ("dergw-gateway.service", "dergw-enroll.service", "dergw-headend.service")
# What the units execute: verify checks that each exists and is executable in --root.
EXECUTABLES = (
    "usr/bin/dergw",
    "usr/lib/dergw/libexec/enroll-first-boot",
    "usr/bin/install",
    "bin/rm",
)


def _root(tmp_path: Path, units: dict[str, str]) -> Path:
    """A throwaway --root: the host's own units (targets), ours, and stand-in executables."""
    root = tmp_path / "root"
    (root / "usr/lib/systemd").mkdir(parents=True)
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    for name, text in units.items():
        (root / "etc/systemd/system" / name).write_text(text)
    for exe in EXECUTABLES:
        path = root / exe
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/bin/sh\n")
        path.chmod(0o755)
    return root


def _verify(root: Path, unit: str) -> str:
    analyze = require_binary("systemd-analyze", "checks the systemd units")
    result = subprocess.run(
        [analyze, "verify", "--man=no", f"--root={root}", unit],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return (result.stdout + result.stderr).strip() + ("" if result.returncode == 0 else " (rc!=0)")


@pytest.mark.parametrize("unit", UNITS)
def test_unit_verifies_without_any_output(tmp_path: Path, unit: str) -> None:
    root = _root(tmp_path, {u: (ROOT / "systemd" / u).read_text() for u in UNITS})
    assert _verify(root, unit) == ""


def test_the_verify_gate_catches_an_unknown_key(tmp_path: Path) -> None:
    text = (ROOT / "systemd/dergw-gateway.service").read_text()
    text = text.replace("[Service]\n", "[Service]\nRestartSteps=5\n")
    root = _root(tmp_path, {"dergw-gateway.service": text})
    assert "RestartSteps" in _verify(root, "dergw-gateway.service")


def _exposure(unit: Path) -> float:
    analyze = require_binary("systemd-analyze", "scores the gateway unit's hardening")
    result = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    return float(match.group(1))


def test_gateway_unit_exposure_at_most_2_5() -> None:
    assert _exposure(ROOT / "systemd/dergw-gateway.service") <= 2.5


def test_gateway_unit_is_offline_first_and_notifies() -> None:
    text = (ROOT / "systemd/dergw-gateway.service").read_text()
    directives = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    for target in ("network-online.target", "time-sync.target"):
        assert target not in directives
    for line in (
        "Type=notify",
        "WatchdogSec=30s",
        "Restart=on-failure",
        "CapabilityBoundingSet=\n",
        "DevicePolicy=closed",
        "ProtectSystem=strict",
        "SystemCallFilter=@system-service",
        "User=dergw",
    ):
        assert line in text


def test_sysusers_puts_dergw_in_dialout() -> None:
    lines = (ROOT / "systemd/sysusers.d/dergw.conf").read_text().splitlines()
    assert "m dergw dialout" in lines
    assert any(line.startswith("u dergw ") for line in lines)

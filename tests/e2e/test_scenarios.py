"""`dergw hil scenario` as a commissioning engineer runs it: a real command with a verdict."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.hil  # real processes and sockets on loopback

DERGW = [sys.executable, "-m", "gateway.cli"]


def test_scenario_list_names_export_limit() -> None:
    result = subprocess.run(
        [*DERGW, "hil", "scenario", "--list"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("export-limit")


def test_unknown_scenario_is_a_usage_error() -> None:
    result = subprocess.run(
        [*DERGW, "hil", "scenario", "nope", "--check"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "unknown scenario 'nope'" in result.stderr


def test_export_limit_scenario_passes_its_check(tmp_path: Path) -> None:
    result = subprocess.run(
        [*DERGW, "hil", "scenario", "export-limit", "--check", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "scenario export-limit PASSED" in result.stdout
    assert "[FAIL]" not in result.stdout

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


def test_the_demo_runs_secure_by_default_and_passes_its_check(tmp_path: Path) -> None:
    # `dergw demo` is the export-limit scenario run as installed: the headend's own CA, mTLS
    # gRPC, HTTPS API, the gateway enrolled with a one-time token, signed intents.
    result = subprocess.run(
        [*DERGW, "demo", "--check", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "mTLS, gateway enrolled" in result.stdout
    assert "headend https://" in result.stdout
    assert "scenario export-limit PASSED" in result.stdout
    assert "[FAIL]" not in result.stdout

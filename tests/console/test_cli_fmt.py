"""`dergw console` options, and the pure formatting the panels use (unit + property tests)."""

from __future__ import annotations

import importlib.util
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import cli
from gateway.console import cli as console_cli
from gateway.console.fmt import fmt_age, fmt_bytes, fmt_duration, fmt_value, parse_controls

REPO = Path(__file__).resolve().parents[2]


def test_console_is_a_dergw_command() -> None:
    assert cli.COMMANDS["console"][:2] == ("gateway.console.cli", "main")


def test_socket_comes_from_the_config(tmp_path: Path) -> None:
    config = (REPO / "config.example.toml").read_text()
    (tmp_path / "gw.toml").write_text(config)
    expected = tmp_path / "var" / "gw-example-01" / "dergw.sock"
    assert console_cli.socket_from_config(str(tmp_path / "gw.toml")) == str(expected)


def test_bad_options_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert console_cli.main(["--refresh", "0"]) == 2
    assert "--refresh must be more than 0" in capsys.readouterr().err
    assert console_cli.main(["--config", str(tmp_path / "missing.toml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_missing_textual_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "textual" else real(name, *a)
    )
    assert console_cli.main([]) == 3
    assert "pip install 'dergw[console]'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (12.9, "12s"), (247, "4m07s"), (7500, "2h05m"), (3 * 86400 + 4 * 3600, "3d4h")],
)
def test_fmt_duration(seconds: float, text: str) -> None:
    assert fmt_duration(seconds) == text


def test_small_formatters() -> None:
    assert fmt_duration(-5) == "0s"
    assert fmt_age(None) == "never"
    assert fmt_age(2.04) == "2.0s ago"
    assert fmt_age(47) == "47s ago"
    assert fmt_bytes(999) == "999 B"
    assert fmt_bytes(3_400_000) == "3.4 MB"
    assert fmt_bytes(5 * 10**12) == "5000.0 GB"
    assert fmt_value(None, "W") == "—"
    assert fmt_value("MPPT", "") == "MPPT"
    assert fmt_value(7420.0, "W") == "7420 W"
    assert fmt_value(50.01, "Hz") == "50.01 Hz"
    assert fmt_value(0.99, "") == "0.99"


@given(st.floats(min_value=0, max_value=10 * 365 * 86400))
def test_fmt_duration_is_short_and_two_units_at_most(seconds: float) -> None:
    text = fmt_duration(seconds)
    assert re.fullmatch(r"\d+s|\d+m\d\ds|\d+h\d\dm|\d+d\d{1,2}h", text)
    assert len(text) <= 8


def test_parse_controls() -> None:
    assert parse_controls("export_limit_w=5000, max_gen_pct = 10,") == {
        "export_limit_w": 5000.0,
        "max_gen_pct": 10.0,
    }
    for bad, words in [
        ("", "no controls given"),
        ("export_limit_w", "write name=value"),
        ("=5", "write name=value"),
        ("export_limit_w=lots", "'lots' is not a number"),
    ]:
        with pytest.raises(ValueError, match=words):
            parse_controls(bad)


@given(
    st.dictionaries(
        st.from_regex(r"[a-z][a-z_]{0,15}", fullmatch=True),
        st.floats(allow_nan=False, allow_infinity=False),
        min_size=1,
        max_size=5,
    )
)
def test_parse_controls_round_trips(controls: dict[str, float]) -> None:
    text = ", ".join(f"{name}={value!r}" for name, value in controls.items())
    parsed = parse_controls(text)
    assert parsed.keys() == controls.keys()
    assert all(math.isclose(parsed[k], v) or parsed[k] == v for k, v in controls.items())


def test_the_gateway_process_never_loads_textual() -> None:
    code = (
        "import sys, gateway.runtime.app, gateway.cli, gateway.console.cli; "
        "sys.exit('textual' in sys.modules or 'rich' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0

"""`dergw enroll` refusals that need no headend: usage, config and connection errors.

The successful path runs against a real HTTPS headend in tests/headend/test_enroll_e2e.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway import cli
from tests.support import free_tcp_port

CONFIG = """
[gateway]
id = "gw-1"
state_dir = "state"

[site]
id = "site-a"
name = "Test site"

[uplink]
transport = "grpc"
target = "127.0.0.1:50051"
"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(CONFIG)
    return path


def test_enroll_is_a_dergw_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    assert "enroll" in capsys.readouterr().out


def test_empty_token_file_is_a_usage_error(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("\n")
    code = cli.main(
        [
            "enroll",
            "--headend",
            "https://127.0.0.1:1",
            "--token-file",
            str(token_file),
            "--config",
            str(config),
        ]
    )
    assert code == 2
    assert "empty" in capsys.readouterr().err
    assert token_file.exists()


def test_bad_config_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(
        [
            "enroll",
            "--headend",
            "https://127.0.0.1:1",
            "--token",
            "t",
            "--config",
            str(tmp_path / "absent.toml"),
        ]
    )
    assert code == 2
    assert "config file not found" in capsys.readouterr().err


def test_plain_http_is_refused(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(
        ["enroll", "--headend", "http://127.0.0.1:1", "--token", "t", "--config", str(config)]
    )
    assert code == 1
    assert "https://" in capsys.readouterr().err
    assert not (config.parent / "state" / "identity" / "current").exists()


def test_unreachable_headend_leaves_no_identity(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"https://127.0.0.1:{free_tcp_port()}"
    code = cli.main(
        ["enroll", "--headend", url, "--token", "t", "--config", str(config), "--timeout", "5"]
    )
    assert code == 1
    assert "cannot reach the headend" in capsys.readouterr().err
    identity_dir = config.parent / "state" / "identity"
    assert list(identity_dir.iterdir()) == []  # the unused key was removed

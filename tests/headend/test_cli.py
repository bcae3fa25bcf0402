"""`dergw headend run` as a real process: ready line, /healthz, clean exit on SIGTERM."""

from __future__ import annotations

import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from headend_min.cli import main

_READY = re.compile(r"^headend ready grpc=(\S+):(\d+) http=(\S+):(\d+)$")


def _dergw_command() -> list[str]:
    script = Path(sys.executable).with_name("dergw")
    return [str(script)] if script.exists() else [sys.executable, "-m", "gateway.cli"]


def _read_line(process: subprocess.Popen[str], timeout_s: float) -> str:
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout_s)
    if not ready:
        pytest.fail(f"no output within {timeout_s} s")
    return process.stdout.readline()


def test_run_serves_and_exits_cleanly_on_sigterm(tmp_path: Path) -> None:
    db = tmp_path / "db" / "headend.sqlite3"
    arguments = ["--grpc", "127.0.0.1:0", "--http", "127.0.0.1:0", "--db", f"sqlite:///{db}"]
    log = (tmp_path / "headend.log").open("w")
    process = subprocess.Popen(
        [*_dergw_command(), "headend", "run", *arguments],
        stdout=subprocess.PIPE,
        stderr=log,  # a file, not a pipe nobody drains
        text=True,
    )
    try:
        line = _read_line(process, timeout_s=15.0).strip()
        match = _READY.match(line)
        assert match, (
            f"unexpected first line {line!r}; log: {(tmp_path / 'headend.log').read_text()}"
        )
        grpc_port, http_port = int(match.group(2)), int(match.group(4))
        assert grpc_port > 0
        assert http_port > 0
        response = httpx.get(f"http://127.0.0.1:{http_port}/api/v1/healthz", timeout=5.0)
        assert response.status_code == 200
        assert response.json()["status"] == "ok"
        assert db.exists()

        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
        assert time.monotonic() - started < 5
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()
        log.close()


def test_bad_arguments_are_explained(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--grpc", "nonsense"]) == 2
    assert "HOST:PORT" in capsys.readouterr().err
    assert main(["run", "--db", "mysql://db/headend"]) == 2
    assert "postgresql://" in capsys.readouterr().err

"""`dergw bench`: the runner end to end (real child processes), and how it reports a benchmark
that crashes or overruns its time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from io import StringIO
from pathlib import Path

import pytest

from bench import cli
from bench.registry import BENCHMARKS
from gateway import cli as dergw_cli

DERGW = [sys.executable, "-m", "gateway.cli"]


def test_bench_is_a_dergw_command() -> None:
    assert dergw_cli.COMMANDS["bench"][:2] == ("bench.cli", "main")


def test_runs_benchmarks_and_writes_json(tmp_path: Path) -> None:
    report = tmp_path / "bench.json"
    result = subprocess.run(
        [*DERGW, "bench", "outbox", "control-decision", "--quick", "--json", str(report)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    # The table, its summary and the machine go to stdout; progress to stderr.
    assert "≥ 500,000 points/s" in result.stdout
    assert "p99 ≤ 5.00 ms" in result.stdout
    assert "figures from 2 benchmarks" in result.stdout
    assert "machine: " in result.stdout
    assert "== outbox: ok" in result.stderr
    document = json.loads(report.read_text())
    assert set(document) >= {"machine", "started", "elapsed_s", "benchmarks", "figures"}
    assert document["machine"]["cores"] == os.cpu_count()
    assert [b["status"] for b in document["benchmarks"]] == ["ok", "ok"]
    by_name = {(f["bench"], f["name"]): f for f in document["figures"]}
    append = by_name[("outbox", "append, batched")]
    assert append["budget"] == {"op": ">=", "limit": 500_000, "checked": "value"}
    assert append["value"] > 0
    assert append["verdict"] in {"ok", "OVER"}
    decision = next(f for (bench, _), f in by_name.items() if bench == "control-decision")
    assert decision["budget"] == {"op": "<=", "limit": 5, "checked": "p99"}
    assert decision["unit"] == "ms"
    assert 0 < decision["p50"] <= decision["p99"]


def test_json_to_stdout_keeps_the_table_on_stderr() -> None:
    result = subprocess.run(
        [*DERGW, "bench", "outbox", "--quick", "--json", "-"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert {f["bench"] for f in document["figures"]} == {"outbox"}
    assert "≥ 500,000 points/s" in result.stderr


def test_unknown_name_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["outbox", "no-such-bench"]) == 2
    err = capsys.readouterr().err
    assert "'no-such-bench'" in err
    assert all(name in err for name in BENCHMARKS)


def test_list_names_every_benchmark(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(BENCHMARKS)
    assert [line.split()[1] == "default" for line in lines] == [
        entry.default for entry in BENCHMARKS.values()
    ]


def test_default_set_and_all() -> None:
    defaults = cli._selected([], include_all=False)
    assert defaults == [name for name, entry in BENCHMARKS.items() if entry.default]
    assert cli._selected([], include_all=True) == list(BENCHMARKS)
    assert cli._selected(["outbox", "outbox", "driver-rtu"], include_all=False) == [
        "outbox",
        "driver-rtu",
    ]


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_crashing_benchmark_is_a_row_not_an_abort(tmp_path: Path) -> None:
    echo = StringIO()
    outcome = cli.run_child(
        "boom",
        _python("import sys; print('opening the pod bay doors'); sys.exit(4)"),
        tmp_path / "boom.json",
        timeout_s=30,
        echo=echo,
    )
    assert outcome.status == "crashed"
    assert outcome.exit_code == 4
    assert "[boom] opening the pod bay doors" in echo.getvalue()
    (row,) = outcome.rows()
    assert row.bench == "boom"
    assert row.name == "CRASHED (exit code 4)"
    assert "opening the pod bay doors" in row.note
    # The JSON report stays strict JSON (the row's value is not a number).
    document = cli.report_document(cli.machine(), datetime.now(UTC), 1.0, [outcome])
    text = json.dumps(document, allow_nan=False)
    assert json.loads(text)["benchmarks"][0]["status"] == "crashed"


def test_a_benchmark_that_exits_without_figures_crashed(tmp_path: Path) -> None:
    outcome = cli.run_child(
        "silent", _python("pass"), tmp_path / "none.json", timeout_s=30, echo=StringIO()
    )
    assert outcome.status == "crashed"
    assert outcome.exit_code == 0
    assert "no figures" in outcome.detail


def test_an_overrunning_benchmark_is_killed_with_everything_it_started(tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    code = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen(['sleep', '600'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "print('started', flush=True)\n"
        "time.sleep(600)\n"
    )
    started = time.monotonic()
    outcome = cli.run_child(
        "slow", _python(code), tmp_path / "slow.json", timeout_s=2, echo=StringIO()
    )
    assert outcome.status == "timed out"
    assert time.monotonic() - started < 2 + cli.TERMINATE_GRACE_S + 3
    assert outcome.rows()[0].name == "TIMED OUT"
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"the benchmark's child {grandchild} outlived the timeout")


def test_the_figures_a_child_writes_are_read_back(tmp_path: Path) -> None:
    json_out = tmp_path / "fig.json"
    code = (
        "import json, sys\n"
        "from bench.core import Budget, Figure\n"
        "figure = Figure('fake', 'rate', 600000.0, 'points/s', budget=Budget('>=', 500000))\n"
        f"open({str(json_out)!r}, 'w').write(json.dumps({{'figures': [figure.to_json()]}}))\n"
    )
    outcome = cli.run_child("fake", _python(code), json_out, timeout_s=30, echo=StringIO())
    assert outcome.status == "ok"
    (figure,) = outcome.rows()
    assert figure.verdict == "ok"
    assert cli.summary([outcome], 1.0).startswith("1 figures from 1 benchmarks, 1 within budget")

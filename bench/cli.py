"""`dergw bench`: run benchmarks from `bench.registry`, each in a fresh child process, and print
one table of figures with the ARCHITECTURE.md budget and verdict beside each.

    dergw bench                       the default set (the budgeted benchmarks), in registry order
    dergw bench outbox backlog-drain  those benchmarks only
    dergw bench --all                 the default set and the unbudgeted ones
    dergw bench --quick               shrunken sizes and durations (a smoke run; figures are rough)
    dergw bench --json FILE|-         also write machine, start time and figures as JSON
    dergw bench --list                the benchmarks, whether in the default set, and what they do

A benchmark runs as `python -m bench.cli --one NAME --json-out FILE` in its own process group
(it may start headends, gateways, brokers): the runner streams its output, kills the whole group
when it overruns `--timeout` or on Ctrl-C, and reports a crash or a timeout as a row of the table
instead of giving up on the rest. Benchmarks run one after another, never together, so that one's
load does not pollute another's figures.

Exit code: 0; 1 with `--fail-over-budget` when a figure is over its budget; 2 for a usage error
(an unknown benchmark name); 3 when a benchmark crashed or timed out; 130 when interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TextIO

from bench.core import BenchOptions, Figure, render_table
from bench.registry import BENCHMARKS

DEFAULT_TIMEOUT_S = 240.0
# After SIGTERM to a benchmark's process group, how long its processes get to clean up.
TERMINATE_GRACE_S = 5.0

EXIT_OK = 0
EXIT_OVER_BUDGET = 1
EXIT_USAGE = 2
EXIT_CRASHED = 3
EXIT_INTERRUPTED = 130

Status = Literal["ok", "crashed", "timed out", "interrupted"]


@dataclass
class Outcome:
    """How one benchmark's child process ended, and the figures it reported."""

    name: str
    status: Status
    elapsed_s: float
    exit_code: int | None = None
    figures: list[Figure] = field(default_factory=list)
    detail: str = ""

    def rows(self) -> list[Figure]:
        """The figures, or one row saying why there are none."""
        if self.status == "ok":
            return self.figures
        what = {
            "crashed": f"CRASHED (exit code {self.exit_code})",
            "timed out": "TIMED OUT",
            "interrupted": "INTERRUPTED",
        }[self.status]
        return [
            *self.figures,
            Figure(
                bench=self.name,
                name=what,
                value=math.nan,
                unit="",
                note=f"{self.detail} (its output is above)".strip(),
                extra={"status": self.status, "exit_code": self.exit_code},
            ),
        ]


def machine() -> dict[str, Any]:
    """What the figures were measured on; the load average tells whether the machine was quiet."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    try:
        load: list[float] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = []
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "system": f"{platform.system()} {platform.release()}",
        "load_average": load,
    }


def describe_machine(info: dict[str, Any]) -> str:
    load = " ".join(f"{x:.2f}" for x in info["load_average"]) or "unknown"
    return (
        f"machine: {info['cpu']}, {info['cores']} cores, Python {info['python']}, "
        f"{info['system']}, load average at start {load}"
    )


def _pump(stream: TextIO, prefix: str, echo: TextIO, tail: list[str]) -> None:
    """Copy a child's output line by line to `echo`, keeping the last lines for the crash row."""
    for line in stream:
        text = line.rstrip("\n")
        tail.append(text)
        del tail[:-5]
        echo.write(f"{prefix}{text}\n")
        echo.flush()


def _signal_group(process: subprocess.Popen[str], signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signum)


def _end_group(process: subprocess.Popen[str]) -> None:
    """SIGTERM the child's whole process group, then SIGKILL what is left of it."""
    _signal_group(process, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=TERMINATE_GRACE_S)
    # Grandchildren may outlive the child itself: the group is killed either way.
    _signal_group(process, signal.SIGKILL)
    process.wait()


def run_child(
    name: str,
    command: Sequence[str],
    json_out: Path,
    *,
    timeout_s: float,
    echo: TextIO,
) -> Outcome:
    """Run one benchmark's `command` in a new process group; read its figures from `json_out`.

    Never raises for what the child does (a crash, a timeout, garbage output): that becomes the
    Outcome's status. KeyboardInterrupt ends the child's group and is re-raised.
    """
    started = time.monotonic()
    json_out.unlink(missing_ok=True)
    process = subprocess.Popen(
        list(command),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        bufsize=1,
        start_new_session=True,  # its own process group: a timeout kills everything it started
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stdout is not None
    tail: list[str] = []
    pump = threading.Thread(
        target=_pump, args=(process.stdout, f"[{name}] ", echo, tail), daemon=True
    )
    pump.start()
    try:
        exit_code = process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _end_group(process)
        pump.join(timeout=1.0)
        return Outcome(
            name,
            "timed out",
            time.monotonic() - started,
            detail=f"no result after {timeout_s:.0f} s (--timeout); its processes were killed",
        )
    except KeyboardInterrupt:
        _end_group(process)
        pump.join(timeout=1.0)
        raise
    # The child is gone; anything it left behind in its group goes too.
    _signal_group(process, signal.SIGKILL)
    pump.join(timeout=1.0)
    elapsed = time.monotonic() - started
    last_line = tail[-1] if tail else "no output"
    if exit_code != 0:
        return Outcome(name, "crashed", elapsed, exit_code, detail=last_line)
    try:
        document = json.loads(json_out.read_text())
        figures = [Figure.from_json(f) for f in document["figures"]]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return Outcome(
            name, "crashed", elapsed, exit_code, detail=f"no figures in {json_out}: {error}"
        )
    return Outcome(name, "ok", elapsed, exit_code, figures)


def child_command(name: str, json_out: Path, *, quick: bool, workdir: Path) -> list[str]:
    command = [sys.executable, "-m", "bench.cli", "--one", name, "--json-out", str(json_out)]
    command += ["--workdir", str(workdir)]
    return [*command, "--quick"] if quick else command


def run_one(name: str, json_out: Path, options: BenchOptions) -> int:
    """In the child: run benchmark `name` and write its figures to `json_out`."""
    module = importlib.import_module(BENCHMARKS[name].module)
    figures = asyncio.run(module.run(options))
    if not isinstance(figures, list) or not all(isinstance(f, Figure) for f in figures):
        raise TypeError(f"{BENCHMARKS[name].module}.run must return a list of Figure")
    json_out.write_text(json.dumps({"figures": [f.to_json() for f in figures]}))
    return EXIT_OK


def _json_safe(value: Any) -> Any:
    """NaN and infinities (a figure that could not be measured) as null: strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def report_document(
    info: dict[str, Any], started: datetime, elapsed_s: float, outcomes: Sequence[Outcome]
) -> dict[str, Any]:
    document: dict[str, Any] = _json_safe(
        {
            "machine": info,
            "started": started.isoformat(timespec="seconds"),
            "elapsed_s": round(elapsed_s, 1),
            "benchmarks": [
                {
                    "name": o.name,
                    "status": o.status,
                    "exit_code": o.exit_code,
                    "elapsed_s": round(o.elapsed_s, 1),
                    "detail": o.detail,
                }
                for o in outcomes
            ],
            "figures": [f.to_json() for o in outcomes for f in o.rows()],
        }
    )
    return document


def summary(outcomes: Sequence[Outcome], elapsed_s: float) -> str:
    figures = [f for o in outcomes for f in o.figures]
    within = sum(f.verdict == "ok" for f in figures)
    over = sum(f.verdict == "OVER" for f in figures)
    failed = [f"{o.name} {o.status}" for o in outcomes if o.status != "ok"]
    text = (
        f"{len(figures)} figures from {len(outcomes)} benchmarks, {within} within budget, "
        f"{over} over budget, in {elapsed_s:.0f} s"
    )
    return f"{text}; did not finish: {', '.join(failed)}" if failed else text


def _list_text() -> str:
    width = max(len(name) for name in BENCHMARKS)
    lines = [
        f"{name:<{width}}  {'default' if entry.default else '--all  '}  {entry.description}"
        for name, entry in BENCHMARKS.items()
    ]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dergw bench",
        description="Run benchmarks (each in its own process) and print figures beside budgets.",
    )
    parser.add_argument("names", nargs="*", metavar="NAME", help="benchmarks to run (--list)")
    parser.add_argument("--all", action="store_true", help="also the benchmarks not in defaults")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--json", metavar="FILE", help="also write results as JSON ('-': stdout)")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument("--workdir", type=Path, help="where benchmark files go (a disk, not tmpfs)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help=f"seconds each benchmark may take (default {DEFAULT_TIMEOUT_S:.0f})",
    )
    parser.add_argument(
        "--fail-over-budget", action="store_true", help="exit 1 when a figure is over its budget"
    )
    # The child side of the runner; not for people.
    parser.add_argument("--one", metavar="NAME", help=argparse.SUPPRESS)
    parser.add_argument("--json-out", type=Path, help=argparse.SUPPRESS)
    return parser


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _selected(names: Sequence[str], include_all: bool) -> list[str]:
    if names:
        return list(dict.fromkeys(names))
    return [name for name, entry in BENCHMARKS.items() if include_all or entry.default]


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.list:
        print(_list_text())
        return EXIT_OK
    unknown = [n for n in [*args.names, *([args.one] if args.one else [])] if n not in BENCHMARKS]
    if unknown:
        print(
            f"dergw bench: unknown benchmark {', '.join(map(repr, unknown))}; "
            f"known: {', '.join(BENCHMARKS)}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if args.one:
        if args.json_out is None:
            print("dergw bench: --one needs --json-out FILE", file=sys.stderr)
            return EXIT_USAGE
        workdir = str(args.workdir) if args.workdir else None
        return run_one(args.one, args.json_out, BenchOptions(quick=args.quick, workdir=workdir))
    return _run_all(args)


def _run_all(args: argparse.Namespace) -> int:
    names = _selected(args.names, args.all)
    info = machine()
    started = datetime.now(UTC)
    clock_start = time.monotonic()
    # The table goes where the JSON does not.
    out = sys.stderr if args.json == "-" else sys.stdout
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    # One scratch directory per run, removed at the end: a killed benchmark leaves nothing behind.
    scratch = Path(tempfile.mkdtemp(prefix="dergw-bench-", dir=args.workdir))
    outcomes: list[Outcome] = []
    interrupted = False
    # `kill` of the runner ends the running benchmark's process group as Ctrl-C does.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        for name in names:
            print(f"== {name}: {BENCHMARKS[name].description}", file=sys.stderr, flush=True)
            workdir = scratch / name
            workdir.mkdir()
            json_out = scratch / f"{name}.json"
            command = child_command(name, json_out, quick=args.quick, workdir=workdir)
            began = time.monotonic()
            try:
                outcome = run_child(
                    name, command, json_out, timeout_s=args.timeout, echo=sys.stderr
                )
            except KeyboardInterrupt:
                detail = "stopped by Ctrl-C or SIGTERM; its processes were killed"
                outcomes.append(
                    Outcome(name, "interrupted", time.monotonic() - began, None, [], detail)
                )
                interrupted = True
                break
            outcomes.append(outcome)
            print(
                f"== {name}: {outcome.status} in {outcome.elapsed_s:.1f} s",
                file=sys.stderr,
                flush=True,
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    elapsed = time.monotonic() - clock_start
    print(render_table([f for o in outcomes for f in o.rows()]), file=out)
    print(summary(outcomes, elapsed), file=out)
    print(describe_machine(info), file=out, flush=True)
    if args.json:
        document = json.dumps(report_document(info, started, elapsed, outcomes), indent=2)
        if args.json == "-":
            print(document)
        else:
            Path(args.json).write_text(document + "\n")
    if interrupted:
        return EXIT_INTERRUPTED
    if any(o.status != "ok" for o in outcomes):
        return EXIT_CRASHED
    over = any(f.verdict == "OVER" for o in outcomes for f in o.figures)
    return EXIT_OVER_BUDGET if args.fail_over_budget and over else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

"""`dergw hil scenario` and `dergw demo`: run HIL scenarios end to end with a verdict.

Commissioning engineers qualify a site (or a build) with `dergw hil scenario NAME --check`: it
exits 0 only if the site did what the scenario asked, non-zero with the failed checks otherwise.
`dergw demo` is the export-limit scenario with a live timeline; `--check` gives it a verdict.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TextIO

from hil.scenarios.export_limit import ExportLimitParams, run_export_limit
from hil.scenarios.harness import Bench, BenchError, open_bench
from hil.scenarios.report import ScenarioResult
from hil.site import SiteFileError, load_site

__all__ = ["SCENARIOS", "Scenario", "demo_main", "main", "run_scenario"]


@dataclass(frozen=True)
class Scenario:
    name: str
    summary: str
    default_site: str  # file name under hil/sites/
    run: Callable[[Bench, TextIO], Awaitable[ScenarioResult]]


SCENARIOS: dict[str, Scenario] = {
    "export-limit": Scenario(
        "export-limit",
        "an export-limit event is followed at the PCC, then the default is written back",
        "demo.toml",
        lambda bench, out: run_export_limit(bench, out, ExportLimitParams()),
    ),
}


def _site_path(name: str) -> Path:
    return Path(str(resources.files("hil") / "sites" / name))


async def _run(
    scenario: Scenario,
    *,
    site_file: Path | None,
    workdir: Path,
    out: TextIO,
    keep_running: bool = False,
) -> ScenarioResult:
    spec = load_site(site_file or _site_path(scenario.default_site))
    started = time.monotonic()
    async with open_bench(spec, workdir) as bench:
        print(
            f"bench up in {time.monotonic() - started:.1f} s: headend {bench.api.base_url} "
            f"(gRPC {bench.grpc_target}), simulated site '{spec.name}' with "
            f"{len(spec.devices)} devices, logs in {workdir}",
            file=out,
            flush=True,
        )
        result = await scenario.run(bench, out)
        if keep_running:
            result.render(out)
            print(
                f"\nstill running: post intents to {bench.api.base_url}/api/v1/sites/"
                f"{bench.site_id}/intents (see README); Ctrl-C to stop",
                file=out,
                flush=True,
            )
            await asyncio.Event().wait()  # until SIGINT/SIGTERM cancels the run
        return result


async def run_scenario(
    name: str, *, workdir: Path, site_file: Path | None = None, out: TextIO | None = None
) -> ScenarioResult:
    """Run scenario `name` in this process's event loop (tests use this; the CLI wraps it)."""
    if name not in SCENARIOS:
        raise BenchError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}")
    return await _run(SCENARIOS[name], site_file=site_file, workdir=workdir, out=out or sys.stdout)


def _execute(
    scenario: Scenario,
    *,
    check: bool,
    site_file: Path | None,
    workdir: Path | None,
    keep_running: bool = False,
) -> int:
    out = sys.stdout
    if workdir is None:
        workdir = Path(tempfile.mkdtemp(prefix=f"dergw-{scenario.name}-"))

    async def main() -> ScenarioResult:
        # SIGTERM (a supervisor, `timeout`) and SIGINT end the run the same way: the bench's
        # cleanup stops the headend and gateway it started.
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, task.cancel)
        return await _run(
            scenario, site_file=site_file, workdir=workdir, out=out, keep_running=keep_running
        )

    try:
        result = asyncio.run(main())
    except (KeyboardInterrupt, asyncio.CancelledError):
        print(f"\nstopped; logs in {workdir}", file=sys.stderr)
        return 130
    except (BenchError, SiteFileError) as exc:
        print(f"scenario {scenario.name}: could not run: {exc}", file=sys.stderr)
        return 2
    result.render(out)
    if check and not result.passed:
        failed = [c.name for c in result.checks if not c.passed]
        print(f"check failed: {'; '.join(failed)} (logs in {workdir})", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str]) -> int:
    """`dergw hil scenario [--list] [NAME] [--check] [--site FILE] [--workdir DIR]`."""
    parser = argparse.ArgumentParser(prog="dergw hil scenario", description=__doc__)
    parser.add_argument("name", nargs="?", help="scenario to run (see --list)")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.add_argument("--check", action="store_true", help="exit non-zero unless it passes")
    parser.add_argument("--site", type=Path, help="site file (default: the scenario's own)")
    parser.add_argument(
        "--workdir", type=Path, help="where state and logs go (default: a temp dir)"
    )
    args = parser.parse_args(argv)
    if args.list or not args.name:
        for scenario in SCENARIOS.values():
            print(f"{scenario.name:<16} {scenario.summary}")
        return 0 if args.list else 2
    if args.name not in SCENARIOS:
        print(f"unknown scenario {args.name!r}; known: {', '.join(SCENARIOS)}", file=sys.stderr)
        return 2
    return _execute(
        SCENARIOS[args.name], check=args.check, site_file=args.site, workdir=args.workdir
    )


def demo_main(argv: list[str]) -> int:
    """`dergw demo [--check] [--keep-running] [--workdir DIR]`."""
    parser = argparse.ArgumentParser(
        prog="dergw demo",
        description="headend + simulated site + gateway on loopback, following an export limit",
    )
    parser.add_argument("--check", action="store_true", help="exit non-zero unless it passes")
    parser.add_argument(
        "--keep-running", action="store_true", help="keep everything up afterwards (Ctrl-C stops)"
    )
    parser.add_argument(
        "--workdir", type=Path, help="where state and logs go (default: a temp dir)"
    )
    args = parser.parse_args(argv)
    return _execute(
        SCENARIOS["export-limit"],
        check=args.check,
        site_file=None,
        workdir=args.workdir,
        keep_running=args.keep_running,
    )

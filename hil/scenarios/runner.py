"""`dergw hil scenario` and `dergw demo`: run HIL scenarios end to end with a verdict.

Commissioning engineers qualify a site (or a build) with `dergw hil scenario NAME --check`: it
exits 0 only if the site did what the scenario asked, non-zero with the failed checks otherwise.
`dergw demo` is the export-limit scenario with a live timeline; `--check` gives it a verdict.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TextIO

from hil.scenarios.chaos import (
    run_chaos_kill_gateway,
    run_chaos_kill_headend,
    run_mqtt_broker_restart,
)
from hil.scenarios.durability import run_offline_intent, run_quota_overflow, run_two_headends
from hil.scenarios.export_limit import ExportLimitParams, run_export_limit
from hil.scenarios.export_step import run_export_step
from hil.scenarios.forged_intent import run_forged_intent
from hil.scenarios.frozen_gateway import run_frozen_gateway
from hil.scenarios.harness import (
    DEFAULT_POSTGRES_URL,
    Bench,
    BenchError,
    fresh_postgres_database,
    open_bench,
)
from hil.scenarios.kill_gateway import run_kill_gateway
from hil.scenarios.meter_loss import run_meter_loss
from hil.scenarios.multi_protocol import run_dnp3_crash, run_multi_protocol
from hil.scenarios.offline_schedule import run_offline_schedule
from hil.scenarios.overlapping_programs import run_overlapping_programs
from hil.scenarios.randomized_start import run_randomized_start
from hil.scenarios.report import ScenarioResult
from hil.scenarios.revoked_gateway import run_revoked_gateway
from hil.scenarios.soc_floor import run_soc_floor
from hil.site import SiteFileError, load_site

__all__ = ["SCENARIOS", "Scenario", "demo_main", "main", "run_scenario"]


@dataclass(frozen=True)
class Scenario:
    name: str
    summary: str
    default_site: str  # file name under hil/sites/
    run: Callable[[Bench, TextIO], Awaitable[ScenarioResult]]
    # Uplink transports it can run on; the first is the default (`--transport`).
    transports: tuple[str, ...] = ("grpc",)
    # Needs a PostgreSQL headend database (`--db URL`).
    needs_postgres: bool = False
    # Runs the product as installed by default: mTLS, HTTPS, an enrolled gateway (`--tls`).
    tls: bool = False


SCENARIOS: dict[str, Scenario] = {
    "export-limit": Scenario(
        "export-limit",
        "an export-limit event is followed at the PCC, then the default is written back",
        "demo.toml",
        lambda bench, out: run_export_limit(bench, out, ExportLimitParams()),
    ),
    "export-step": Scenario(
        "export-step",
        "an export limit holds through a PV step up and a load step down (200 ms polling)",
        "demo.toml",
        run_export_step,
    ),
    "soc-floor": Scenario(
        "soc-floor",
        "a battery at its SoC floor refuses discharge, and resumes above the hysteresis band",
        "demo.toml",
        run_soc_floor,
    ),
    "overlapping-programs": Scenario(
        "overlapping-programs",
        "events of two programs overlap (CSIP-AUS GEN-10, per-mode supersession): resolved "
        "per mode, with superseded/started/completed at the headend",
        "demo.toml",
        run_overlapping_programs,
    ),
    "randomized-start": Scenario(
        "randomized-start",
        "1,000 events with randomizeStart spread their effective starts over the window, "
        "reproducibly per gateway",
        "demo.toml",
        run_randomized_start,
    ),
    "offline-schedule": Scenario(
        "offline-schedule",
        "headend down before five back-to-back events: each runs on time, then the default; "
        "responses forwarded on reconnection",
        "demo.toml",
        run_offline_schedule,
    ),
    "kill-gateway-mid-event": Scenario(
        "kill-gateway-mid-event",
        "kill -9 of the gateway mid-event: it resumes the same window (same randomization), "
        "nothing re-announced",
        "demo.toml",
        run_kill_gateway,
    ),
    "meter-loss": Scenario(
        "meter-loss",
        "the PCC meter goes silent under an export limit: the open-loop conservative cap "
        "within 2 control cycles, closed loop again when it returns",
        "demo.toml",
        run_meter_loss,
    ),
    "frozen-gateway": Scenario(
        "frozen-gateway",
        "the gateway is frozen (SIGSTOP): each inverter reverts on its own timer to its "
        "reversion values; SIGCONT resumes control",
        "demo.toml",
        run_frozen_gateway,
    ),
    "multi-protocol": Scenario(
        "multi-protocol",
        "the export-limit scenario on a mixed site: PV on Modbus TCP and on DNP3, the PCC "
        "meter on Modbus RTU, the battery on OPC UA",
        "multi.toml",
        run_multi_protocol,
    ),
    "dnp3-crash": Scenario(
        "dnp3-crash",
        "kill -9 of the DNP3 driver's master process mid-event: the limit holds on the other "
        "devices, the plant is reported unavailable, then comes back with its cap re-written",
        "multi.toml",
        run_dnp3_crash,
    ),
    "chaos-kill-gateway": Scenario(
        "chaos-kill-gateway",
        "50 random kill -9 of the gateway during telemetry and intent changes: 0 gaps, "
        "0 duplicates at the headend",
        "demo.toml",
        run_chaos_kill_gateway,
        transports=("grpc", "mqtt"),
    ),
    "chaos-kill-headend": Scenario(
        "chaos-kill-headend",
        "10 random kill -9 of the headend during telemetry and intent changes: 0 gaps, "
        "0 duplicates",
        "demo.toml",
        run_chaos_kill_headend,
        transports=("grpc", "mqtt"),
    ),
    "mqtt-broker-restart": Scenario(
        "mqtt-broker-restart",
        "the MQTT broker is killed (kill -9) and restarted under load: 0 gaps, 0 duplicates",
        "demo.toml",
        run_mqtt_broker_restart,
        transports=("mqtt",),
    ),
    "quota-overflow": Scenario(
        "quota-overflow",
        "a long outage fills the outbox quota: control keeps running, the outbox stays within "
        "it, gap records at the headend state exactly what was shed",
        "demo.toml",
        run_quota_overflow,
    ),
    "offline-intent": Scenario(
        "offline-intent",
        "an intent posted while the gateway is away is applied when it returns, once",
        "demo.toml",
        run_offline_intent,
        transports=("grpc", "mqtt"),
    ),
    "two-headends": Scenario(
        "two-headends",
        "two headends on one PostgreSQL database: an intent posted to B reaches the gateway "
        "streaming to A within 1 s",
        "demo.toml",
        run_two_headends,
        needs_postgres=True,
    ),
    "forged-intent": Scenario(
        "forged-intent",
        "forged, tampered, replayed, expired, misaddressed and unsigned intents published on "
        "the broker change nothing at the site and show as rejected at the headend",
        "demo.toml",
        run_forged_intent,
        transports=("mqtt",),
    ),
    "revoked-gateway": Scenario(
        "revoked-gateway",
        "an enrolled gateway is revoked mid-event: its stream is ended, it cannot reconnect or "
        "renew and backs off, the site keeps its cached cap",
        "demo.toml",
        run_revoked_gateway,
        transports=("grpc", "mqtt"),
        tls=True,
    ),
}


def _site_path(name: str) -> Path:
    return Path(str(resources.files("hil") / "sites" / name))


@dataclass(frozen=True)
class RunOptions:
    transport: str | None = None  # None = the scenario's default
    db_url: str | None = None  # PostgreSQL server/database URL (scenarios that need one)
    tls: bool | None = None  # None = the scenario's default


async def _run(
    scenario: Scenario,
    *,
    site_file: Path | None,
    workdir: Path,
    out: TextIO,
    keep_running: bool = False,
    options: RunOptions | None = None,
) -> ScenarioResult:
    options = options or RunOptions()
    transport = options.transport or scenario.transports[0]
    tls = scenario.tls if options.tls is None else options.tls
    if transport not in scenario.transports:
        raise BenchError(
            f"scenario {scenario.name} runs over {' or '.join(scenario.transports)}, "
            f"not {transport}"
        )
    spec = load_site(site_file or _site_path(scenario.default_site))
    started = time.monotonic()
    async with contextlib.AsyncExitStack() as stack:
        db_url = ""
        if scenario.needs_postgres or options.db_url:
            db_url = await stack.enter_async_context(
                fresh_postgres_database(options.db_url or DEFAULT_POSTGRES_URL)
            )
        bench = await stack.enter_async_context(
            open_bench(spec, workdir, transport=transport, db_url=db_url, tls=tls)
        )
        print(
            f"bench up in {time.monotonic() - started:.1f} s: headend {bench.api.base_url} "
            f"(gRPC {bench.grpc_target}"
            + (f", MQTT {bench.broker.address}" if bench.broker is not None else "")
            + (", PostgreSQL" if db_url else ", SQLite")
            + (", mTLS, gateway enrolled" if tls else ", plaintext (local development)")
            + f"), simulated site '{spec.name}' with {len(spec.devices)} devices, "
            f"gateway over {transport}, logs in {workdir}",
            file=out,
            flush=True,
        )
        result = await scenario.run(bench, out)
        if keep_running:
            result.render(out)
            print(
                f"\nstill running: post intents to {bench.api.base_url}/api/v1/sites/"
                f"{bench.site_id}/intents (see README); Ctrl-C to stop. The API needs a "
                f"token; the bench's admin token is in {bench.admin_token_file}:\n"
                f'  curl -H "Authorization: Bearer $(cat {bench.admin_token_file})" '
                + (f"--cacert {bench.tls_dir / 'ca.pem'} " if bench.tls else "")
                + f"{bench.api.base_url}/api/v1/sites/{bench.site_id}",
                file=out,
                flush=True,
            )
            await asyncio.Event().wait()  # until SIGINT/SIGTERM cancels the run
        return result


async def run_scenario(
    name: str,
    *,
    workdir: Path,
    site_file: Path | None = None,
    out: TextIO | None = None,
    transport: str | None = None,
    db_url: str | None = None,
    tls: bool | None = None,
) -> ScenarioResult:
    """Run scenario `name` in this process's event loop (tests use this; the CLI wraps it)."""
    if name not in SCENARIOS:
        raise BenchError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}")
    return await _run(
        SCENARIOS[name],
        site_file=site_file,
        workdir=workdir,
        out=out or sys.stdout,
        options=RunOptions(transport=transport, db_url=db_url, tls=tls),
    )


def _execute(
    scenario: Scenario,
    *,
    check: bool,
    site_file: Path | None,
    workdir: Path | None,
    keep_running: bool = False,
    options: RunOptions | None = None,
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
            scenario,
            site_file=site_file,
            workdir=workdir,
            out=out,
            keep_running=keep_running,
            options=options,
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
    parser.add_argument(
        "--transport",
        choices=("grpc", "mqtt"),
        help="the gateway's uplink (default: the scenario's first; mqtt starts a private "
        "mosquitto)",
    )
    parser.add_argument(
        "--db",
        metavar="URL",
        help="PostgreSQL server for the headend (postgresql://...); the run creates a fresh "
        f"database there and drops it afterwards (default for scenarios that need one: "
        f"{DEFAULT_POSTGRES_URL})",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="run as installed: headend with --tls-dir (mTLS gRPC, HTTPS API, TLS broker), the "
        "gateway enrolled with a one-time token (default for the security scenarios)",
    )
    args = parser.parse_args(argv)
    if args.list or not args.name:
        width = max(len(name) for name in SCENARIOS)
        for scenario in SCENARIOS.values():
            extra = []
            if len(scenario.transports) > 1 or scenario.transports != ("grpc",):
                extra.append(f"--transport {'|'.join(scenario.transports)}")
            if scenario.needs_postgres:
                extra.append("--db URL")
            suffix = f" [{', '.join(extra)}]" if extra else ""
            print(f"{scenario.name:<{width}}  {scenario.summary}{suffix}")
        return 0 if args.list else 2
    if args.name not in SCENARIOS:
        print(f"unknown scenario {args.name!r}; known: {', '.join(SCENARIOS)}", file=sys.stderr)
        return 2
    return _execute(
        SCENARIOS[args.name],
        check=args.check,
        site_file=args.site,
        workdir=args.workdir,
        options=RunOptions(
            transport=args.transport, db_url=args.db, tls=True if args.tls else None
        ),
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
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="local development only: plaintext gRPC/HTTP and no enrollment (by default the "
        "demo runs as installed: the headend's own CA, mTLS, HTTPS, the gateway enrolled)",
    )
    args = parser.parse_args(argv)
    return _execute(
        SCENARIOS["export-limit"],
        check=args.check,
        site_file=None,
        workdir=args.workdir,
        keep_running=args.keep_running,
        options=RunOptions(tls=not args.insecure),
    )

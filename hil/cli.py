"""`dergw hil ...` and `dergw demo`: the simulator's command line.

Owns argument parsing, running a simulated site until SIGINT/SIGTERM, and the manifest file that
tells other processes where each simulated device listens. Scenarios and the demo live in
`hil.scenarios.runner`, the fleet simulator in `hil.fleet`; both are imported only when asked for.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import logging
import os
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("hil.cli")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dergw hil", description="Simulated DER sites (SunSpec over Modbus TCP) and scenarios."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run a simulated site until Ctrl-C / SIGTERM")
    run.add_argument(
        "--site", required=True, type=Path, help="site file (TOML), e.g. hil/sites/demo.toml"
    )
    run.add_argument("--seed", type=int, help="override the site's random seed")
    run.add_argument("--host", help="override the listen address of the site file")
    run.add_argument(
        "--port", type=int, help="override the site's default port (0 = any free port)"
    )
    run.add_argument(
        "--manifest",
        type=Path,
        help="write {site, devices: [{id, kind, host, port, unit_id, role}]} here once listening",
    )
    run.add_argument("-v", "--verbose", action="store_true", help="log every refused write")
    sub.add_parser(
        "scenario",
        help="run a scripted HIL scenario (see `dergw hil scenario --help`)",
        add_help=False,
    )
    sub.add_parser(
        "fleet",
        help="simulated gateways on the real gRPC link, for headend load "
        "(see `dergw hil fleet --help`)",
        add_help=False,
    )
    return parser


def write_manifest(path: Path, document: dict[str, Any]) -> None:
    """Write JSON atomically: readers see either no file or the whole document."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(document, out, indent=2)
            out.write("\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


async def _run_site(args: argparse.Namespace) -> int:
    # Imported here so `dergw hil scenario` does not pay for numpy/pymodbus twice over.
    from hil.server import SimulatorError, SiteSimulator
    from hil.site import SiteFileError, load_site

    try:
        spec = load_site(args.site).with_overrides(seed=args.seed, host=args.host, port=args.port)
    except SiteFileError as exc:
        print(f"dergw hil run: {exc}", file=sys.stderr)
        return 2
    sim = SiteSimulator(spec)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await sim.start()
    except SimulatorError as exc:
        print(f"dergw hil run: {exc}", file=sys.stderr)
        return 1
    try:
        for device_id, ep in sim.endpoints.items():
            print(f"{device_id}: {ep.describe()}", flush=True)
        if args.manifest is not None:
            write_manifest(args.manifest, sim.manifest())
        print(f"site {spec.name!r} running (seed {sim.seed}); Ctrl-C to stop", flush=True)
        task = sim.physics_task
        assert task is not None
        stopper = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if task in done:
            failure = task.exception()
            log.error("physics stopped: %r", failure, exc_info=failure)
            return 1
        return 0
    finally:
        await sim.stop()


def _delegate(func_name: str, argv: list[str]) -> int:
    try:
        module = importlib.import_module("hil.scenarios.runner")
    except ModuleNotFoundError as exc:
        if exc.name != "hil.scenarios.runner":
            raise
        print(
            "dergw: the HIL scenario runner (hil/scenarios/runner.py) is missing", file=sys.stderr
        )
        return 2
    func: Callable[[list[str]], int] = getattr(module, func_name)
    return func(argv)


def main(argv: list[str]) -> int:
    """`dergw hil run|scenario|fleet ...`; returns the process exit code."""
    if argv and argv[0] == "scenario":
        return _delegate("main", argv[1:])
    if argv and argv[0] == "fleet":
        # Imported only when asked for: grpc is not needed to run a simulated site.
        from hil.fleet import fleet_main

        return fleet_main(argv[1:])
    args = _build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return asyncio.run(_run_site(args))


def demo_main(argv: list[str]) -> int:
    """`dergw demo`: headend + simulated site + gateway (implemented by the scenario runner)."""
    return _delegate("demo_main", argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

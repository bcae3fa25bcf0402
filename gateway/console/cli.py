"""`dergw console`: parse the options, find the gateway's socket, run the Textual app.

Textual is imported only here, and only when the console runs: it is the `console` extra, not a
dependency of the gateway process.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main", "socket_from_config"]

DEFAULT_SOCKET = "/run/dergw/dergw.sock"


def socket_from_config(config_path: str) -> str:
    """The local API socket a gateway config names (ConfigError if the config is invalid)."""
    from gateway.config import load_config

    config = load_config(config_path)
    return str(config.local_api.socket_path(Path(config.gateway.state_dir)))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dergw console",
        description="The site technician's console: a terminal UI on the gateway's local API.",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--socket", help=f"the gateway's local API socket (default {DEFAULT_SOCKET})"
    )
    where.add_argument("--config", help="the gateway's config file (the socket is read from it)")
    parser.add_argument(
        "--refresh", type=float, default=2.0, metavar="S", help="seconds between refreshes"
    )
    parser.add_argument(
        "--allow-writes",
        action="store_true",
        help="enable overrides, clearing them and re-scans (each still asks to confirm)",
    )
    return parser


def main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(list(argv))
    if args.refresh <= 0:
        print("dergw console: --refresh must be more than 0 seconds", file=sys.stderr)
        return 2
    if importlib.util.find_spec("textual") is None:
        print(
            "dergw console: Textual is not installed. Install the console extra: "
            "pip install 'dergw[console]' (the gateway itself does not need it).",
            file=sys.stderr,
        )
        return 3
    socket_path = args.socket or DEFAULT_SOCKET
    if args.config:
        from gateway.config import ConfigError

        try:
            socket_path = socket_from_config(args.config)
        except ConfigError as exc:
            print(f"dergw console: {exc}", file=sys.stderr)
            return 2

    from gateway.console.app import SiteConsole
    from gateway.console.live import LiveSource

    app = SiteConsole(
        LiveSource(socket_path),
        allow_writes=args.allow_writes,
        refresh_s=args.refresh,
        config_path=args.config or "",
    )
    app.run()
    return 0

"""`dergw headend run`: start the headend (gRPC link + HTTP API) in one process.
(`dergw headend token ...` manages operator API tokens: `token_cli`; `dergw headend
enroll-token create` and `dergw headend gateways list|revoke` manage gateway enrollment:
`gateway_admin_cli`.)

`--tls-dir DIR` switches TLS on (mTLS gRPC, HTTPS API with enrollment, MQTT over TLS; see
`app`); without it the headend is plaintext, the local development mode.

Prints `headend ready grpc=HOST:PORT http=HOST:PORT` (real ports, also for port 0; followed by
` mqtt=HOST:PORT` with `--mqtt`, then ` tls ca=PATH` with `--tls-dir`) on stdout once both
listen (and the MQTT subscription is in place); exits 0 on SIGTERM/SIGINT after a clean
shutdown.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from headend_min.app import Headend, HeadendStartError, serve
from headend_min.config import (
    DEFAULT_DB_URL,
    SIGNING_KEY_FILE,
    ConfigError,
    Endpoint,
    HeadendConfig,
    parse_db_url,
    parse_endpoint,
)
from headend_min.gateway_admin_cli import add_gateway_admin_commands, gateway_admin_main
from headend_min.store import StoreError
from headend_min.token_cli import add_token_commands, token_main

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dergw headend", description="The dergw cloud headend (stateless; state in the DB)."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser("run", help="serve the gateway link (gRPC) and the HTTP API")
    run.add_argument(
        "--grpc",
        default="127.0.0.1:50051",
        metavar="HOST:PORT",
        help="gateway link listen address (default %(default)s; port 0 = any free port)",
    )
    run.add_argument(
        "--http",
        default="127.0.0.1:8080",
        metavar="HOST:PORT",
        help="HTTP API listen address (default %(default)s; port 0 = any free port)",
    )
    run.add_argument(
        "--db",
        default=DEFAULT_DB_URL,
        metavar="URL",
        help="sqlite:///PATH, a plain file path, or postgresql://USER@HOST:PORT/DBNAME "
        "(shared by any number of headend instances) (default %(default)s)",
    )
    run.add_argument(
        "--mqtt",
        default=None,
        metavar="HOST:PORT",
        help="also serve gateways through this MQTT v5 broker (default: gRPC only)",
    )
    run.add_argument(
        "--signing-key",
        default=None,
        type=Path,
        metavar="FILE",
        help="Ed25519 key (PEM) intents are signed with; created (0600) if missing, with its "
        "public trust file FILE.pub.json for gateways next to it (default: "
        f"{SIGNING_KEY_FILE} next to a SQLite --db; required with PostgreSQL)",
    )
    run.add_argument(
        "--admin-token-file",
        default=None,
        type=Path,
        metavar="FILE",
        help="bootstrap admin API token: the token in FILE is accepted as admin; if FILE does "
        "not exist, a new admin token is created and written there (0600)",
    )
    run.add_argument(
        "--tls-dir",
        default=None,
        type=Path,
        metavar="DIR",
        help="switch TLS on: DIR holds the headend CA (ca.key, ca.pem; created on first use) "
        "and the certificates issued from it at start (server.pem/.key, "
        "headend-client.pem/.key). gRPC then requires gateway client certificates, the HTTP "
        "API is HTTPS and serves gateway enrollment (/api/v1/enroll, /api/v1/renew), MQTT "
        "uses TLS. Gateways trust DIR/ca.pem. Without --tls-dir everything is plaintext: "
        "local development only",
    )
    run.add_argument(
        "--tls-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a DNS name or IP address gateways reach this headend by, added to its TLS "
        "certificate (repeatable; the --grpc/--http hosts, localhost and 127.0.0.1 are always "
        "in it)",
    )
    run.add_argument(
        "--keepalive-s",
        type=float,
        default=20.0,
        metavar="SECONDS",
        help="gRPC keepalive; presence goes stale after twice this (default %(default)s)",
    )
    run.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level on stderr (default %(default)s)",
    )
    add_token_commands(commands)
    add_gateway_admin_commands(commands)
    return parser


def _config(args: argparse.Namespace) -> HeadendConfig:
    if args.keepalive_s <= 0:
        raise ConfigError("--keepalive-s must be > 0")
    config = HeadendConfig(
        grpc=parse_endpoint(args.grpc, flag="--grpc"),
        http=parse_endpoint(args.http, flag="--http"),
        db_path=parse_db_url(args.db),
        keepalive_s=args.keepalive_s,
        mqtt=_mqtt_endpoint(args.mqtt),
        signing_key=args.signing_key,
        admin_token_file=args.admin_token_file,
        tls_dir=args.tls_dir,
        tls_hosts=tuple(args.tls_host),
    )
    if config.tls_hosts and config.tls_dir is None:
        raise ConfigError("--tls-host needs --tls-dir (TLS is off without it)")
    config.signing_key_path()  # no default key with PostgreSQL: say so before starting
    return config


def _mqtt_endpoint(text: str | None) -> Endpoint | None:
    if text is None:
        return None
    endpoint = parse_endpoint(text, flag="--mqtt")
    if endpoint.port == 0:
        raise ConfigError(f"--mqtt {text!r}: give the broker's port (e.g. 1883)")
    return endpoint


def _announce(headend: Headend) -> None:
    line = f"headend ready grpc={headend.grpc_endpoint} http={headend.http_endpoint}"
    if headend.config.mqtt is not None:
        line += f" mqtt={headend.config.mqtt}"
    if headend.ca_pem_path is not None:
        line += f" tls ca={headend.ca_pem_path}"
    print(line, flush=True)


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.command == "token":
        return token_main(args)
    if args.command in ("enroll-token", "gateways"):
        return gateway_admin_main(args)
    try:
        config = _config(args)
    except ConfigError as exc:
        print(f"dergw headend: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=args.log_level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        asyncio.run(serve(config, on_ready=_announce))
    except (HeadendStartError, StoreError) as exc:
        print(f"dergw headend: {exc}", file=sys.stderr)
        return 1
    return 0

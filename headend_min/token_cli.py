"""`dergw headend token create|list|revoke`: operator API tokens, straight on the database.

For the first admin token and for recovery (every admin token lost or revoked); afterwards admins
can use the HTTP API (`/api/v1/tokens`). `create` prints the token alone on stdout (the only time
it is shown; scripts capture it) and what was created on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys
import time
from datetime import UTC, datetime

from headend_min.app import open_store
from headend_min.auth import Role, TokenGrantError, create_token
from headend_min.config import DEFAULT_DB_URL, ConfigError, parse_db_url
from headend_min.model import ApiToken
from headend_min.store import DuplicateTokenError, StoreError

__all__ = ["add_token_commands", "token_main"]


def add_token_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    token = commands.add_parser("token", help="create, list and revoke operator API tokens")
    actions = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    db_help = "the headend's database, as for `run` (default %(default)s)"

    create = actions.add_parser("create", help="create a token and print it (shown only once)")
    create.add_argument(
        "--role", required=True, choices=[role.label for role in Role], help="what it may do"
    )
    create.add_argument("--name", required=True, help="who or what uses it, e.g. ops-alice")
    create.add_argument(
        "--site",
        default=None,
        metavar="SITE_ID",
        help="scope a viewer or operator token to this one site (default: every site)",
    )
    create.add_argument("--db", default=DEFAULT_DB_URL, metavar="URL", help=db_help)

    listing = actions.add_parser("list", help="list tokens (never their secrets)")
    listing.add_argument("--db", default=DEFAULT_DB_URL, metavar="URL", help=db_help)

    revoke = actions.add_parser("revoke", help="refuse a token from now on")
    revoke.add_argument("token_id", metavar="ID", help="the token's id (see `token list`)")
    revoke.add_argument("--db", default=DEFAULT_DB_URL, metavar="URL", help=db_help)


def _operator() -> str:
    try:
        user = getpass.getuser()
    except (OSError, KeyError):
        user = "unknown user"
    return f"dergw headend token ({user})"


def _when(wall_ns: int | None) -> str:
    if wall_ns is None:
        return "-"
    return datetime.fromtimestamp(wall_ns / 1e9, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _describe(token: ApiToken) -> str:
    return (
        f"{token.token_id}  {token.name}  {token.role}  site={token.site_id or '*'}  "
        f"created={_when(token.created_at_ns)} by {token.created_by}  "
        f"last_used={_when(token.last_used_at_ns)}  "
        + (
            f"REVOKED {_when(token.revoked_at_ns)} by {token.revoked_by}"
            if token.revoked_at_ns is not None
            else "active"
        )
    )


async def _run(args: argparse.Namespace) -> int:
    store = await open_store(parse_db_url(args.db))
    try:
        if args.token_command == "create":
            text, record = await create_token(
                store,
                name=args.name,
                role=Role.parse(args.role),
                site_id=args.site,
                created_by=_operator(),
                now_ns=time.time_ns(),
            )
            print(f"created API token {_describe(record)}", file=sys.stderr)
            print(str(text), flush=True)
            return 0
        if args.token_command == "list":
            for token in await store.list_tokens():
                print(_describe(token))
            return 0
        revoked = await store.revoke_token(args.token_id, _operator(), time.time_ns())
        if revoked is None:
            print(
                f"dergw headend token: unknown token {args.token_id!r} "
                "(`dergw headend token list` shows the ids)",
                file=sys.stderr,
            )
            return 1
        print(f"revoked {_describe(revoked)}")
        return 0
    finally:
        await store.close()


def token_main(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_run(args))
    except (ConfigError, TokenGrantError, DuplicateTokenError, StoreError) as exc:
        print(f"dergw headend token: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError | TokenGrantError) else 1

"""`dergw headend enroll-token create` and `dergw headend gateways list|revoke`: gateway
enrollment administration, straight on the headend database (like `token_cli`).

    dergw headend enroll-token create --site S --gateway G [--ttl-s N] --db URL
        prints the one-time enrollment token alone on stdout (shown only here), what it is for
        on stderr
    dergw headend gateways list --db URL
        one line per issued certificate: gateway, site, serial, not_after, active/REVOKED
    dergw headend gateways revoke GATEWAY [--serial S] --db URL
        revokes one certificate or every certificate of the gateway; running headends refuse it
        at its next connect and renewal, and end its open stream within half a keepalive

The admin functions (`create_enrollment_token`, `list_gateway_certificates`, `revoke_gateway`)
take an `Enrollment` and are what tests and other tools call. None of them needs the CA: tokens,
the certificate records and revocations live in the database, the CA key only at the headend
(`--tls-dir`), which issues the certificates.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import NoReturn, cast

from headend_min.app import open_enrollment_store
from headend_min.clock import SystemClock
from headend_min.config import DEFAULT_DB_URL, ConfigError, PostgresUrl, parse_db_url
from headend_min.enrollment import (
    DEFAULT_TOKEN_TTL_S,
    Enrollment,
    EnrollmentError,
    EnrollmentStore,
    IssuedCertificate,
)
from headend_min.pki import CertificateAuthority
from headend_min.store import StoreError

__all__ = [
    "GatewayCertificateRow",
    "add_gateway_admin_commands",
    "admin_enrollment",
    "create_enrollment_token",
    "gateway_admin_main",
    "list_gateway_certificates",
    "revoke_gateway",
]

_PROG = "dergw headend"


class _NoCertificateAuthority:
    """Stands in for the CA in admin commands, which never issue certificates."""

    def __getattr__(self, name: str) -> NoReturn:
        raise RuntimeError("admin commands do not issue certificates; the headend does")


def admin_enrollment(store: EnrollmentStore) -> Enrollment:
    """An `Enrollment` for token creation, listing and revocation (it cannot issue)."""
    return Enrollment(store, cast(CertificateAuthority, _NoCertificateAuthority()), SystemClock())


async def create_enrollment_token(
    enrollment: Enrollment, *, site_id: str, gateway_id: str, ttl_s: int = DEFAULT_TOKEN_TTL_S
) -> str:
    """A one-time enrollment token for `gateway_id` at `site_id` (the secret; shown once)."""
    return await enrollment.create_token(site_id, gateway_id, ttl_s)


@dataclass(frozen=True)
class GatewayCertificateRow:
    gateway_id: str
    site_id: str
    serial: str
    not_after: datetime
    revoked: bool

    @classmethod
    def of(cls, certificate: IssuedCertificate) -> GatewayCertificateRow:
        return cls(
            gateway_id=certificate.gateway_id,
            site_id=certificate.site_id,
            serial=certificate.serial,
            not_after=datetime.fromtimestamp(certificate.not_after_ns / 1e9, UTC),
            revoked=certificate.revoked_at_ns is not None,
        )

    def line(self) -> str:
        state = "REVOKED" if self.revoked else "active"
        when = self.not_after.strftime("%Y-%m-%dT%H:%M:%SZ")
        return (
            f"{self.gateway_id}  site={self.site_id}  serial={self.serial}  "
            f"not_after={when}  {state}"
        )


async def list_gateway_certificates(
    enrollment: Enrollment, gateway_ids: list[str]
) -> list[GatewayCertificateRow]:
    """Every certificate issued to `gateway_ids`, by gateway then oldest first."""
    rows: list[GatewayCertificateRow] = []
    for gateway_id in sorted(set(gateway_ids)):
        rows += [GatewayCertificateRow.of(c) for c in await enrollment.certificates(gateway_id)]
    return rows


async def revoke_gateway(
    enrollment: Enrollment, gateway_id: str, serial: str | None = None
) -> list[str]:
    """Revoke one certificate or all of the gateway's; returns the serials newly revoked."""
    return await enrollment.revoke(gateway_id, serial)


def _sqlite_gateway_ids(path: Path) -> list[str]:
    # EnrollmentStore has no "every gateway" query; this read-only one lists the table of
    # enrollment_sqlite (the headend's only reader of it besides that module).
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return [
            str(row[0])
            for row in db.execute(
                "SELECT DISTINCT gateway_id FROM enrollment_certificates ORDER BY gateway_id"
            )
        ]
    finally:
        db.close()


async def _enrolled_gateway_ids(store: EnrollmentStore, location: Path | PostgresUrl) -> list[str]:
    gateway_ids = getattr(store, "gateway_ids", None)
    if gateway_ids is not None:
        return cast(list[str], await gateway_ids())
    if isinstance(location, PostgresUrl):
        raise StoreError("this enrollment store cannot list gateways")
    try:
        return await asyncio.to_thread(_sqlite_gateway_ids, location)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot list enrolled gateways in {location}: {exc}") from exc


def add_gateway_admin_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    db_help = "the headend's database, as for `run` (default %(default)s)"

    token = commands.add_parser(
        "enroll-token", help="create one-time gateway enrollment tokens (TLS mode)"
    )
    token_actions = token.add_subparsers(dest="enroll_token_command", required=True)
    create = token_actions.add_parser(
        "create",
        help="create a token for one gateway at one site and print it (shown only once)",
    )
    create.add_argument("--site", required=True, metavar="SITE_ID", help="the gateway's site")
    create.add_argument("--gateway", required=True, metavar="GATEWAY_ID", help="the gateway")
    create.add_argument(
        "--ttl-s",
        type=int,
        default=DEFAULT_TOKEN_TTL_S,
        metavar="SECONDS",
        help="how long the token can be used (default %(default)s = 24 h)",
    )
    create.add_argument("--db", default=DEFAULT_DB_URL, metavar="URL", help=db_help)

    gateways = commands.add_parser("gateways", help="list and revoke enrolled gateways")
    actions = gateways.add_subparsers(dest="gateways_command", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="issued gateway certificates and their state")
    listing.add_argument("--db", default=DEFAULT_DB_URL, metavar="URL", help=db_help)
    revoke = actions.add_parser(
        "revoke", help="refuse a gateway's certificate(s) at connect and renewal from now on"
    )
    revoke.add_argument("gateway_id", metavar="GATEWAY", help="the gateway id")
    revoke.add_argument(
        "--serial",
        default=None,
        metavar="SERIAL",
        help="revoke only this certificate (hex, see `gateways list`; default: all of them)",
    )
    revoke.add_argument("--db", default=DEFAULT_DB_URL, metavar="URL", help=db_help)


async def _run(args: argparse.Namespace) -> int:
    location = parse_db_url(args.db)
    store = await open_enrollment_store(location)
    try:
        enrollment = admin_enrollment(store)
        if args.command == "enroll-token":
            secret = await create_enrollment_token(
                enrollment, site_id=args.site, gateway_id=args.gateway, ttl_s=args.ttl_s
            )
            print(
                f"created an enrollment token for gateway {args.gateway} at site {args.site}, "
                f"valid {args.ttl_s} s, usable once",
                file=sys.stderr,
            )
            print(secret, flush=True)
            return 0
        if args.gateways_command == "list":
            ids = await _enrolled_gateway_ids(store, location)
            for row in await list_gateway_certificates(enrollment, ids):
                print(row.line())
            return 0
        serials = await revoke_gateway(enrollment, args.gateway_id, args.serial)
        if not serials:
            print(
                f"{_PROG}: nothing newly revoked for {args.gateway_id!r} (unknown gateway, or "
                "already revoked; `dergw headend gateways list` shows the certificates)",
                file=sys.stderr,
            )
            return 1
        for serial in serials:
            print(f"revoked {args.gateway_id} serial={serial}")
        return 0
    finally:
        await store.close()


def gateway_admin_main(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_run(args))
    except (ConfigError, EnrollmentError) as exc:
        print(f"{_PROG} {args.command}: {exc}", file=sys.stderr)
        return 2
    except StoreError as exc:
        print(f"{_PROG} {args.command}: {exc}", file=sys.stderr)
        return 1

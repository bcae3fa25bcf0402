"""Operator authentication of the HTTP API: API tokens, roles, site scope, and the FastAPI guard.

A token reads `dgw_<id>_<secret>`: the id (16 hex digits) finds the stored row, the secret
(43 url-safe characters, 256 bits) proves possession. Only the SHA-256 of the secret is stored
and compared in constant time (`hmac.compare_digest`); a plain hash is enough because the secret
is random, not a password (no dictionary to slow down). The secret is shown once, at creation.

Roles are ordered: viewer (read) < operator (also post and cancel intents) < admin (also manage
tokens). A viewer or operator token may be scoped to one site: it sees and commands that site
only; fleet-wide lists are filtered to it, and fleet-wide aggregates (`/grid/feeders`) are
refused. Admin tokens are always fleet-wide.

`require(role, site_param=...)` is the FastAPI dependency every route but `/healthz` uses: 401
(with `WWW-Authenticate: Bearer`) for a missing, malformed, unknown or revoked token, 403 when
the role is too low or the site is outside the token's scope. It returns the `Principal`, whose
`label` state-changing calls record (intents' `posted_by`, tokens' `created_by`/`revoked_by`).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import re
import secrets
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Annotated

from fastapi import HTTPException, Request, Security, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from headend_min.clock import Clock
from headend_min.model import ApiToken
from headend_min.store import Store

__all__ = [
    "TOKEN_PREFIX",
    "AccessDeniedError",
    "Authenticator",
    "BootstrapTokenError",
    "ForbiddenError",
    "MalformedTokenError",
    "Principal",
    "Role",
    "TokenGrantError",
    "TokenText",
    "UnauthenticatedError",
    "check_grant",
    "check_role",
    "check_site",
    "create_token",
    "ensure_admin_token_file",
    "hash_secret",
    "new_token_text",
    "parse_token",
    "principal_of",
    "require",
    "secret_matches",
]

_log = logging.getLogger(__name__)

TOKEN_PREFIX = "dgw"
_ID_RE = re.compile(r"[0-9a-f]{16}")
_SECRET_RE = re.compile(r"[A-Za-z0-9_-]{32,128}")
_NAME_MAX = 64
# last_used_at is a hint for operators ("is this token still in use?"), not an audit record:
# refreshing it at most once a minute keeps reads from turning into a write each.
_TOUCH_EVERY_NS = 60 * 10**9


class Role(IntEnum):
    VIEWER = 1
    OPERATOR = 2
    ADMIN = 3

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, text: str) -> Role:
        try:
            return cls[text.strip().upper()]
        except KeyError:
            raise TokenGrantError(
                f"unknown role {text!r}: use one of {', '.join(r.label for r in cls)}"
            ) from None


class MalformedTokenError(ValueError):
    """Text that is not a dergw API token."""


class TokenGrantError(ValueError):
    """A token that may not be created as asked (bad name, role or scope)."""


class BootstrapTokenError(RuntimeError):
    """The --admin-token-file holds a token the database does not accept."""


class AccessDeniedError(Exception):
    """A request the principal may not make; `status_code` is 401 or 403."""

    status_code = status.HTTP_403_FORBIDDEN


class UnauthenticatedError(AccessDeniedError):
    """No valid token: missing, malformed, unknown, wrong secret or revoked."""

    status_code = status.HTTP_401_UNAUTHORIZED


class ForbiddenError(AccessDeniedError):
    """A valid token whose role or site scope does not cover the request."""


@dataclass(frozen=True, slots=True)
class TokenText:
    token_id: str
    secret: str

    def __str__(self) -> str:
        return f"{TOKEN_PREFIX}_{self.token_id}_{self.secret}"

    def __repr__(self) -> str:  # never print the secret by accident
        return f"TokenText(token_id={self.token_id!r}, secret=***)"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who made a request: the token that authenticated it."""

    token_id: str
    name: str
    role: Role
    site_id: str | None  # None = every site

    @property
    def label(self) -> str:
        """What state-changing calls record as their author."""
        return f"{self.name} (token {self.token_id})"

    def sees(self, site_id: str) -> bool:
        return self.site_id is None or self.site_id == site_id


def new_token_text() -> TokenText:
    return TokenText(secrets.token_hex(8), secrets.token_urlsafe(32))


def parse_token(text: str) -> TokenText:
    prefix, _, rest = text.strip().partition("_")
    token_id, _, secret = rest.partition("_")
    if (
        prefix != TOKEN_PREFIX
        or _ID_RE.fullmatch(token_id) is None
        or _SECRET_RE.fullmatch(secret) is None
    ):
        raise MalformedTokenError(
            f"not a dergw API token (expected {TOKEN_PREFIX}_<16 hex digits>_<secret>); "
            "create one with `dergw headend token create`"
        )
    return TokenText(token_id, secret)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def secret_matches(secret: str, stored_sha256: str) -> bool:
    return hmac.compare_digest(hash_secret(secret).encode(), stored_sha256.encode())


def principal_of(record: ApiToken | None, token: TokenText) -> Principal:
    """The principal a presented token authenticates, or UnauthenticatedError."""
    if record is None or not secret_matches(token.secret, record.secret_sha256):
        # Unknown id and wrong secret read the same: no oracle for valid ids.
        raise UnauthenticatedError("unknown API token; ask an admin for a valid one")
    if record.revoked_at_ns is not None:
        raise UnauthenticatedError(
            f"API token {record.token_id} ({record.name}) was revoked; ask an admin for a new one"
        )
    return Principal(record.token_id, record.name, Role.parse(record.role), record.site_id)


def check_role(principal: Principal, needed: Role) -> None:
    if principal.role < needed:
        raise ForbiddenError(
            f"this needs the {needed.label} role; token {principal.token_id} "
            f"({principal.name}) is {principal.role.label}"
        )


def check_site(principal: Principal, site_id: str) -> None:
    if not principal.sees(site_id):
        raise ForbiddenError(
            f"token {principal.token_id} ({principal.name}) is scoped to site "
            f"{principal.site_id!r}, not {site_id!r}"
        )


def check_grant(name: str, role: Role, site_id: str | None) -> None:
    """Whether a token may be created with this name, role and scope."""
    if not name or len(name) > _NAME_MAX or not name.isprintable():
        raise TokenGrantError(
            f"token name {name!r}: give 1..{_NAME_MAX} printable characters, e.g. 'ops-alice'"
        )
    if role is Role.ADMIN and site_id is not None:
        raise TokenGrantError(
            "an admin token administers the whole fleet: give --site (site_id) only to viewer "
            "and operator tokens"
        )
    if site_id is not None and not site_id:
        raise TokenGrantError("site scope is empty: name a site, or leave it out for all sites")


async def create_token(
    store: Store,
    *,
    name: str,
    role: Role,
    site_id: str | None,
    created_by: str,
    now_ns: int,
    token: TokenText | None = None,
) -> tuple[TokenText, ApiToken]:
    """Mint (or store the given) token; returns its text, to show once, and the stored row."""
    check_grant(name, role, site_id)
    text = token or new_token_text()
    record = ApiToken(
        token_id=text.token_id,
        name=name,
        secret_sha256=hash_secret(text.secret),
        role=role.label,
        site_id=site_id,
        created_at_ns=now_ns,
        created_by=created_by,
    )
    await store.create_token(record)
    return text, record


def _read_token_file(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def _write_token_file(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # O_EXCL: never overwrite a token file another instance wrote meanwhile.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text + "\n")


async def ensure_admin_token_file(store: Store, path: Path, *, now_ns: int) -> TokenText:
    """The bootstrap admin token: the one in `path` (stored if the database lacks it), or a new
    one written to `path` (mode 0600) when the file does not exist."""
    try:
        content = await asyncio.to_thread(_read_token_file, path)
    except OSError as exc:
        raise BootstrapTokenError(f"--admin-token-file {path}: cannot read it ({exc})") from None
    if content is None:
        token, _ = await create_token(
            store,
            name="bootstrap-admin",
            role=Role.ADMIN,
            site_id=None,
            created_by=f"dergw headend --admin-token-file {path}",
            now_ns=now_ns,
        )
        try:
            await asyncio.to_thread(_write_token_file, path, str(token))
        except OSError as exc:
            raise BootstrapTokenError(
                f"--admin-token-file {path}: cannot write it ({exc})"
            ) from None
        return token
    try:
        token = parse_token(content)
    except MalformedTokenError as exc:
        raise BootstrapTokenError(f"--admin-token-file {path}: {exc}") from None
    record = await store.get_token(token.token_id)
    if record is None:
        await create_token(
            store,
            name="bootstrap-admin",
            role=Role.ADMIN,
            site_id=None,
            created_by=f"dergw headend --admin-token-file {path}",
            now_ns=now_ns,
            token=token,
        )
        return token
    if not secret_matches(token.secret, record.secret_sha256):
        raise BootstrapTokenError(
            f"--admin-token-file {path}: token {token.token_id} is stored with another secret; "
            "delete the file to mint a new admin token"
        )
    if record.revoked_at_ns is not None or record.role != Role.ADMIN.label:
        raise BootstrapTokenError(
            f"--admin-token-file {path}: token {token.token_id} is revoked or not an admin token; "
            "delete the file to mint a new admin token"
        )
    return token


class Authenticator:
    """Turns a presented bearer token into a Principal against the store."""

    def __init__(self, store: Store, clock: Clock) -> None:
        self._store = store
        self._clock = clock
        # Refused requests by status (401, 403), for tests and operators' debugging.
        self.refused: Counter[int] = Counter()

    async def authenticate(self, presented: str | None) -> Principal:
        if not presented:
            raise UnauthenticatedError(
                "this endpoint needs an API token: send `Authorization: Bearer dgw_...` "
                "(create one with `dergw headend token create`)"
            )
        try:
            token = parse_token(presented)
        except MalformedTokenError as exc:
            raise UnauthenticatedError(str(exc)) from None
        record = await self._store.get_token(token.token_id)
        principal = principal_of(record, token)
        assert record is not None  # principal_of refuses None
        now_ns = self._clock.wall_ns()
        last = record.last_used_at_ns
        if last is None or now_ns - last >= _TOUCH_EVERY_NS:
            await self._store.touch_token(record.token_id, now_ns)
        return principal


_bearer = HTTPBearer(
    auto_error=False,
    bearerFormat="dgw_<id>_<secret>",
    description="An API token (`dergw headend token create`); roles viewer < operator < admin.",
)


def _challenge(exc: AccessDeniedError) -> HTTPException:
    headers = None
    if isinstance(exc, UnauthenticatedError):
        headers = {"WWW-Authenticate": 'Bearer realm="dergw"'}
    return HTTPException(exc.status_code, detail=str(exc), headers=headers)


def require(role: Role, *, site_param: str | None = None) -> Callable[..., Awaitable[Principal]]:
    """A FastAPI dependency: the request's Principal, which must hold `role` and, when the
    route names a site in `site_param` (a path or query parameter), see that site."""

    async def dependency(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    ) -> Principal:
        authenticator: Authenticator = request.app.state.authenticator
        try:
            principal = await authenticator.authenticate(
                credentials.credentials if credentials is not None else None
            )
            check_role(principal, role)
            if site_param is not None:
                site_id = request.path_params.get(site_param)
                if site_id is None:
                    site_id = request.query_params.get(site_param)
                if site_id is not None:
                    check_site(principal, str(site_id))
        except AccessDeniedError as exc:
            authenticator.refused[exc.status_code] += 1
            _log.info(
                "refused %s %s (%d): %s", request.method, request.url.path, exc.status_code, exc
            )
            raise _challenge(exc) from None
        return principal

    return dependency

"""`enrollment.EnrollmentStore` on SQLite: its own tables in the headend's database file.

The three tables (`enrollment_tokens`, `enrollment_certificates`, `enrollment_revocations`) are
created here with CREATE TABLE IF NOT EXISTS, outside `sqlite_schema`'s migrations: enrollment
can be added to an existing headend database without a schema version bump, and the headend's
store never reads them. Like `sqlite_store`, one connection owned by one worker thread, WAL,
synchronous=FULL (an issued certificate and a burnt token must survive a power cut).

PostgreSQL: `enrollment_pg.PgEnrollmentStore`, the same three tables; there `mark_token_used`
is `UPDATE ... WHERE token_hash = ... AND used_at_ns IS NULL` (rowcount 1 = won), which keeps a
token one-time across several headends.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from headend_min.enrollment import EnrollmentToken, IssuedCertificate

__all__ = ["SqliteEnrollmentStore", "SqliteEnrollmentStoreError"]

_P = ParamSpec("_P")
_T = TypeVar("_T")

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS enrollment_tokens (
        token_hash TEXT PRIMARY KEY,
        site_id TEXT NOT NULL,
        gateway_id TEXT NOT NULL,
        created_at_ns INTEGER NOT NULL,
        expires_at_ns INTEGER NOT NULL,
        used_at_ns INTEGER
    )""",
    """CREATE TABLE IF NOT EXISTS enrollment_certificates (
        gateway_id TEXT NOT NULL,
        serial TEXT NOT NULL,
        site_id TEXT NOT NULL,
        public_key_sha256 TEXT NOT NULL,
        not_before_ns INTEGER NOT NULL,
        not_after_ns INTEGER NOT NULL,
        issued_at_ns INTEGER NOT NULL,
        PRIMARY KEY (gateway_id, serial)
    )""",
    # Not a column of the certificates: a serial may be revoked without being recorded here
    # (issued before a database restore), and it must stay refused.
    """CREATE TABLE IF NOT EXISTS enrollment_revocations (
        gateway_id TEXT NOT NULL,
        serial TEXT NOT NULL,
        revoked_at_ns INTEGER NOT NULL,
        PRIMARY KEY (gateway_id, serial)
    )""",
)

_CERT_COLUMNS = (
    "c.gateway_id, c.site_id, c.serial, c.public_key_sha256, c.not_before_ns, c.not_after_ns, "
    "c.issued_at_ns, r.revoked_at_ns"
)
_CERT_FROM = (
    "enrollment_certificates c LEFT JOIN enrollment_revocations r "
    "ON r.gateway_id = c.gateway_id AND r.serial = c.serial"
)


class SqliteEnrollmentStoreError(Exception):
    """The enrollment tables cannot be opened or used."""


class SqliteEnrollmentStore:
    """Construct with `await SqliteEnrollmentStore.open(path)` (the headend's --db file)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="enrollment-sqlite")
        self._db: sqlite3.Connection | None = None
        self._closed = False

    @classmethod
    async def open(cls, path: Path | str) -> SqliteEnrollmentStore:
        store = cls(Path(path))
        try:
            await store._call(store._open_sync)
        except BaseException:
            await store.close()
            raise
        return store

    @property
    def path(self) -> Path:
        return self._path

    async def close(self) -> None:
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        with contextlib.suppress(sqlite3.Error):
            await loop.run_in_executor(self._executor, self._close_sync)
        self._closed = True
        self._executor.shutdown(wait=True)

    async def _call(self, fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        if self._closed:
            raise SqliteEnrollmentStoreError("the enrollment store is closed")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                self._executor, functools.partial(fn, *args, **kwargs)
            )
        except sqlite3.Error as exc:
            raise SqliteEnrollmentStoreError(f"SQLite error on {self._path}: {exc}") from exc

    @property
    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise SqliteEnrollmentStoreError("the enrollment store is not open")
        return self._db

    def _open_sync(self) -> None:
        if str(self._path) != ":memory:":
            self._path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self._path, isolation_level=None)
        self._db = db
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA busy_timeout=5000")
        db.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA:
                db.execute(statement)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _close_sync(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    # -- EnrollmentStore ---------------------------------------------------------------------------

    async def put_token(self, token: EnrollmentToken) -> None:
        await self._call(
            self._execute,
            "INSERT INTO enrollment_tokens (token_hash, site_id, gateway_id, created_at_ns, "
            "expires_at_ns, used_at_ns) VALUES (?, ?, ?, ?, ?, ?)",
            (
                token.token_hash,
                token.site_id,
                token.gateway_id,
                token.created_at_ns,
                token.expires_at_ns,
                token.used_at_ns,
            ),
        )

    async def get_token(self, token_hash: str) -> EnrollmentToken | None:
        rows = await self._call(
            self._fetch,
            "SELECT token_hash, site_id, gateway_id, created_at_ns, expires_at_ns, used_at_ns "
            "FROM enrollment_tokens WHERE token_hash = ?",
            (token_hash,),
        )
        return EnrollmentToken(*rows[0]) if rows else None

    async def mark_token_used(self, token_hash: str, used_at_ns: int) -> bool:
        changed = await self._call(
            self._execute,
            "UPDATE enrollment_tokens SET used_at_ns = ? "
            "WHERE token_hash = ? AND used_at_ns IS NULL",
            (used_at_ns, token_hash),
        )
        return changed == 1

    async def record_certificate(self, certificate: IssuedCertificate) -> None:
        await self._call(
            self._execute,
            "INSERT INTO enrollment_certificates (gateway_id, serial, site_id, public_key_sha256, "
            "not_before_ns, not_after_ns, issued_at_ns) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                certificate.gateway_id,
                certificate.serial,
                certificate.site_id,
                certificate.public_key_sha256,
                certificate.not_before_ns,
                certificate.not_after_ns,
                certificate.issued_at_ns,
            ),
        )

    async def get_certificate(self, gateway_id: str, serial: str) -> IssuedCertificate | None:
        rows = await self._call(
            self._fetch,
            f"SELECT {_CERT_COLUMNS} FROM {_CERT_FROM} WHERE c.gateway_id = ? AND c.serial = ?",
            (gateway_id, serial),
        )
        return IssuedCertificate(*rows[0]) if rows else None

    async def list_certificates(self, gateway_id: str) -> list[IssuedCertificate]:
        rows = await self._call(
            self._fetch,
            f"SELECT {_CERT_COLUMNS} FROM {_CERT_FROM} WHERE c.gateway_id = ? "
            "ORDER BY c.issued_at_ns, c.serial",
            (gateway_id,),
        )
        return [IssuedCertificate(*row) for row in rows]

    async def is_revoked(self, gateway_id: str, serial: str) -> bool:
        rows = await self._call(
            self._fetch,
            "SELECT 1 FROM enrollment_revocations WHERE gateway_id = ? AND serial = ?",
            (gateway_id, serial),
        )
        return bool(rows)

    async def revoke(self, gateway_id: str, serial: str | None, at_ns: int) -> list[str]:
        return await self._call(self._revoke_sync, gateway_id, serial, at_ns)

    # -- worker-thread internals ------------------------------------------------------------------

    def _execute(self, sql: str, params: tuple[object, ...]) -> int:
        return self._conn.execute(sql, params).rowcount

    def _fetch(self, sql: str, params: tuple[object, ...]) -> list[tuple[Any, ...]]:
        return list(self._conn.execute(sql, params).fetchall())

    def _revoke_sync(self, gateway_id: str, serial: str | None, at_ns: int) -> list[str]:
        db = self._conn
        db.execute("BEGIN IMMEDIATE")
        try:
            if serial is None:
                serials = [
                    str(row[0])
                    for row in db.execute(
                        "SELECT serial FROM enrollment_certificates WHERE gateway_id = ? "
                        "ORDER BY issued_at_ns",
                        (gateway_id,),
                    )
                ]
            else:
                serials = [serial]
            newly = [
                s
                for s in serials
                if db.execute(
                    "INSERT OR IGNORE INTO enrollment_revocations (gateway_id, serial, "
                    "revoked_at_ns) VALUES (?, ?, ?)",
                    (gateway_id, s, at_ns),
                ).rowcount
                == 1
            ]
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return newly

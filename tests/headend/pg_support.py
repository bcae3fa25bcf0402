"""A fresh PostgreSQL database per test, and a switch to take it away and give it back.

The server is DERGW_TEST_PG_URL (default postgresql://postgres@127.0.0.1:5432/test, trust auth);
each test gets `CREATE DATABASE dergw_test_<random>` on it, dropped afterwards (WITH (FORCE), so
a headend that is still connected cannot keep it alive). Without a reachable server the tests
skip, unless DERGW_REQUIRE_SERVICES=1 (CI), where they fail.

    async def test_x(pg_db: PgDatabase) -> None:
        store = await PgStore.open(pg_db.url)
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.support import REQUIRE_SERVICES

try:
    import psycopg
    from psycopg import sql
except ImportError:  # pragma: no cover - the `postgres` extra is not installed
    psycopg = None

ADMIN_URL = os.environ.get("DERGW_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")

__all__ = ["ADMIN_URL", "PgDatabase", "pg_db", "require_postgres"]


def _unavailable(why: str) -> None:
    message = f"PostgreSQL is not available ({why}); set DERGW_TEST_PG_URL to a server to run this"
    if REQUIRE_SERVICES:
        pytest.fail(f"{message}; DERGW_REQUIRE_SERVICES=1 makes this a failure")
    pytest.skip(message)


def require_postgres() -> None:
    """Skip (or fail under DERGW_REQUIRE_SERVICES=1) unless psycopg and the server are there."""
    if psycopg is None:
        _unavailable("psycopg is not installed: pip install 'dergw[postgres]'")
    try:
        with psycopg.connect(ADMIN_URL, connect_timeout=3):
            pass
    except psycopg.OperationalError as exc:
        _unavailable(f"cannot connect to {ADMIN_URL}: {str(exc).strip()}")


class PgDatabase:
    """One throwaway database on the test server."""

    def __init__(self, name: str) -> None:
        self.name = name
        parts = urlsplit(ADMIN_URL)
        self.url = urlunsplit(parts._replace(path=f"/{name}"))

    def _admin(self) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=5)

    def create(self) -> None:
        with self._admin() as admin:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.name)))

    def drop(self) -> None:
        with self._admin() as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(self.name))
            )

    def go_down(self) -> int:
        """The database becomes unreachable, as in an outage: new connections are refused and
        every open one is killed (the same errors a crashed or failed-over server gives its
        clients). Other databases on the server are untouched. Returns the backends killed."""
        with self._admin() as admin:
            admin.execute(
                sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false").format(
                    sql.Identifier(self.name)
                )
            )
            cursor = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (self.name,),
            )
            row = cursor.fetchone()
            return int(row[0]) if row is not None else 0

    def come_back(self) -> None:
        with self._admin() as admin:
            admin.execute(
                sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS true").format(
                    sql.Identifier(self.name)
                )
            )

    def connect(self) -> psycopg.Connection[tuple[object, ...]]:
        """A plain autocommit connection to this database (for assertions)."""
        return psycopg.connect(self.url, autocommit=True, connect_timeout=5)


@pytest.fixture
def pg_db() -> Iterator[PgDatabase]:
    require_postgres()
    database = PgDatabase(f"dergw_test_{uuid.uuid4().hex[:12]}")
    database.create()
    try:
        yield database
    finally:
        database.drop()

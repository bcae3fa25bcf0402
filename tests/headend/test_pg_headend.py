"""The whole in-process headend (gRPC link + HTTP API) on PostgreSQL.

Re-runs the link, API and flexibility tests that go through the `headend`/`runner` fixtures,
with the fixture overridden here to start the headend on a fresh PostgreSQL database (PgStore +
PgNotifier) instead of a SQLite file. The few listed in _SQLITE_ONLY are left out.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from headend_min.config import PostgresUrl
from headend_min.pg_notify import PgNotifier
from headend_min.pg_store import PgStore
from tests.headend import test_api, test_auth, test_flexibility, test_link
from tests.headend.harness import HeadendRunner, RunningHeadend
from tests.headend.pg_support import PgDatabase, pg_db

__all__ = ["pg_db"]  # the fixture, re-exported for pytest

_SQLITE_ONLY = {
    # Open the SQLite file of the runner itself.
    "test_ack_only_after_commit",
    "test_one_post_to_a_busy_site_is_read_once_for_all_its_streams",
    # Races the delivery record (written after the intent is sent) against an HTTP read; a
    # PostgreSQL commit is slow enough under load to lose that race now and then.
    "test_intent_status_per_gateway",
    # Reads the SQLite file's bytes for the token secret.
    "test_the_secret_is_never_stored",
}


def _borrow(module: Any, prefix: str) -> dict[str, Callable[..., Any]]:
    return {
        f"test_pg_{prefix}_{name.removeprefix('test_')}": function
        for name, function in vars(module).items()
        if name.startswith("test_")
        and callable(function)
        and name not in _SQLITE_ONLY
        and {"headend", "runner"} & set(function.__code__.co_varnames)
    }


globals().update(_borrow(test_api, "api"))
globals().update(_borrow(test_link, "link"))
globals().update(_borrow(test_flexibility, "flexibility"))
globals().update(_borrow(test_auth, "auth"))


@pytest.fixture
async def runner(pg_db: PgDatabase, tmp_path: Path) -> AsyncIterator[HeadendRunner]:
    headend_runner = HeadendRunner(PostgresUrl(pg_db.url), signing_key=tmp_path / "signing.pem")
    yield headend_runner
    await headend_runner.stop()


@pytest.fixture
async def headend(runner: HeadendRunner) -> RunningHeadend:
    running = await runner.start()
    # The manual clock was set when the runner was made; creating and migrating the database
    # took a second or so since. Catch up to real time, as a SQLite start (milliseconds) does,
    # since some tests compare the clock with real-time stamps to a second's margin.
    running.clock.advance((time.time_ns() - running.clock.wall_ns()) / 1e9)
    return running


async def test_the_headend_runs_on_postgresql(headend: RunningHeadend) -> None:
    assert isinstance(headend.headend.store, PgStore)
    assert isinstance(headend.headend.notifier, PgNotifier)
    assert (await headend.http.get("/healthz")).json()["status"] == "ok"

"""`Notifier` across headend instances: PostgreSQL LISTEN/NOTIFY on channel `dergw_intent`.

Each instance keeps ONE listening connection and fans notifications out in-process to its
subscriptions (an `InProcessNotifier` does the fan-out and the coalescing). The payload is
`<site_id>:<version>`. Publishing is `pg_notify` through the store's pool; `PgStore.append_intent`
also notifies inside the intent's own transaction, so the wake-up is delivered at commit even if
this process dies before `publish` runs.

Notifications sent while the listening connection is down are lost by PostgreSQL, so after every
(re)connect the listener re-reads the latest version of each subscribed site from the store and
offers it - subscriptions drop versions they have already seen, so this costs nothing when
nothing was missed. A silent network death of the listening connection is caught by a liveness
query every `check_interval_s`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Any

import psycopg

from headend_min.notify import InProcessNotifier, IntentSubscription
from headend_min.pg_store import INTENT_CHANNEL, PgStore, describe_url
from headend_min.store import StoreError

__all__ = ["PgNotifier", "parse_payload"]

_log = logging.getLogger(__name__)


def parse_payload(payload: str) -> tuple[str, int] | None:
    """`'<site_id>:<version>'` -> (site_id, version); None for anything else."""
    site_id, sep, version_text = payload.rpartition(":")
    if not sep or not site_id:
        return None
    try:
        version = int(version_text)
    except ValueError:
        return None
    return (site_id, version) if version > 0 else None


class PgNotifier:
    """`Notifier` for headends sharing one PostgreSQL database; `await start()` before use."""

    def __init__(
        self,
        store: PgStore,
        *,
        reconnect_delay_s: float = 0.5,
        max_reconnect_delay_s: float = 2.0,
        check_interval_s: float = 10.0,
        connect_timeout_s: float = 5.0,
    ) -> None:
        self._store = store
        self._local = InProcessNotifier()
        self._subscribed: collections.Counter[str] = collections.Counter()
        self._reconnect_delay_s = reconnect_delay_s
        self._max_reconnect_delay_s = max_reconnect_delay_s
        self._check_interval_s = check_interval_s
        self._connect_timeout_s = connect_timeout_s
        self._task: asyncio.Task[None] | None = None
        self._listening = asyncio.Event()
        self._closed = False
        #: How many times the listening connection was (re)established; for tests and metrics.
        self.connects = 0

    async def start(self, *, timeout_s: float = 10.0) -> None:
        """Start listening; returns once LISTEN is in place (or raises StoreError)."""
        if self._task is None:
            self._task = asyncio.create_task(self._listen_forever(), name="pg-notify-listen")
        try:
            await asyncio.wait_for(self._listening.wait(), timeout_s)
        except TimeoutError:
            raise StoreError(
                f"cannot LISTEN on {describe_url(self._store.url)} within {timeout_s:g} s"
            ) from None

    @property
    def listening(self) -> bool:
        return self._listening.is_set()

    # -- Notifier -------------------------------------------------------------------------------

    async def publish(self, site_id: str, version: int) -> None:
        # Local subscribers at once; other instances through the database. The store already
        # notified inside the intent's transaction, so a failure here loses nothing.
        await self._local.publish(site_id, version)
        try:
            await self._store.notify_intent(site_id, version)
        except StoreError:
            _log.warning(
                "could not NOTIFY v%d of site %s (sent at commit anyway)", version, site_id
            )

    @contextlib.asynccontextmanager
    async def _subscription(self, site_id: str) -> AsyncIterator[IntentSubscription]:
        self._subscribed[site_id] += 1
        try:
            async with self._local.subscribe(site_id) as subscription:
                yield subscription
        finally:
            self._subscribed[site_id] -= 1
            if self._subscribed[site_id] <= 0:
                del self._subscribed[site_id]

    def subscribe(self, site_id: str) -> AbstractAsyncContextManager[IntentSubscription]:
        return self._subscription(site_id)

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._listening.clear()
        await self._local.close()

    # -- the listening connection ---------------------------------------------------------------

    async def _listen_forever(self) -> None:
        delay = self._reconnect_delay_s
        where = describe_url(self._store.url)
        while not self._closed:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self._store.url,
                    autocommit=True,
                    connect_timeout=max(1, round(self._connect_timeout_s)),
                )
            except psycopg.Error as exc:
                _log.warning(
                    "LISTEN connection to %s failed: %s; retry in %.1f s", where, exc, delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._max_reconnect_delay_s)
                continue
            try:
                async with conn:
                    await conn.execute(f"LISTEN {INTENT_CHANNEL}")
                    self.connects += 1
                    self._listening.set()
                    delay = self._reconnect_delay_s
                    if self.connects > 1:
                        _log.info("LISTEN connection to %s re-established", where)
                    # Whatever was notified while nobody listened (or before the first LISTEN,
                    # for subscriptions made early) is offered now from the store.
                    await self._reoffer_latest()
                    await self._receive(conn)
            except (psycopg.Error, StoreError) as exc:
                _log.warning("LISTEN connection to %s lost: %s; reconnecting", where, exc)
            finally:
                self._listening.clear()
            if not self._closed:
                await asyncio.sleep(delay)

    async def _receive(self, conn: psycopg.AsyncConnection[Any]) -> None:
        while not self._closed:
            async for notify in conn.notifies(timeout=self._check_interval_s):
                parsed = parse_payload(notify.payload)
                if parsed is None:
                    _log.warning("ignoring malformed %s payload %r", INTENT_CHANNEL, notify.payload)
                    continue
                await self._local.publish(*parsed)
            # Quiet for a while: prove the connection is alive (a dead peer raises here).
            await conn.execute("SELECT 1")

    async def _reoffer_latest(self) -> None:
        sites = list(self._subscribed)
        if not sites:
            return
        for site_id, version in (await self._store.latest_intent_versions_of(sites)).items():
            await self._local.publish(site_id, version)

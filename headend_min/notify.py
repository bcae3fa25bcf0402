"""Wake-ups for new intent versions: `Notifier` and its in-process implementation.

When an operator stores a new version, every stream of that site must send it promptly. The
notifier only carries (site_id, version); the stream reads the document from the store, so the
notification can be lost or coalesced without losing intent, and a PostgreSQL LISTEN/NOTIFY
implementation (8 kB payload limit, cross-instance) can replace `InProcessNotifier` unchanged.

Subscriptions coalesce: a slow subscriber sees the newest version, never an unbounded queue.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Protocol

__all__ = ["InProcessNotifier", "IntentSubscription", "Notifier"]


class IntentSubscription(Protocol):
    """New intent versions of one site, newest only; ends when the notifier closes."""

    def __aiter__(self) -> AsyncIterator[int]: ...


class Notifier(Protocol):
    async def publish(self, site_id: str, version: int) -> None:
        """Tell every subscriber of `site_id` (in any headend instance) about `version`."""
        ...

    def subscribe(self, site_id: str) -> AbstractAsyncContextManager[IntentSubscription]:
        """Subscribe before reading the latest version from the store, so none is missed."""
        ...

    async def close(self) -> None:
        """End every subscription."""
        ...


class _Subscription:
    def __init__(self) -> None:
        self._newest = 0
        self._pending = False
        self._closed = False
        self._wakeup = asyncio.Event()

    def offer(self, version: int) -> None:
        if version > self._newest:
            self._newest = version
            self._pending = True
            self._wakeup.set()

    def close(self) -> None:
        self._closed = True
        self._wakeup.set()

    def __aiter__(self) -> AsyncIterator[int]:
        return self._versions()

    async def _versions(self) -> AsyncIterator[int]:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            if self._pending:
                self._pending = False
                yield self._newest
            if self._closed:
                return


class InProcessNotifier:
    """`Notifier` for a single headend process (SQLite deployments)."""

    def __init__(self) -> None:
        self._subscribers: defaultdict[str, set[_Subscription]] = defaultdict(set)
        self._closed = False

    async def publish(self, site_id: str, version: int) -> None:
        for subscription in tuple(self._subscribers.get(site_id, ())):
            subscription.offer(version)

    @contextlib.asynccontextmanager
    async def _subscription(self, site_id: str) -> AsyncIterator[IntentSubscription]:
        subscription = _Subscription()
        if self._closed:
            subscription.close()
        subscribers = self._subscribers[site_id]
        subscribers.add(subscription)
        try:
            yield subscription
        finally:
            subscribers.discard(subscription)
            if not subscribers:
                self._subscribers.pop(site_id, None)

    def subscribe(self, site_id: str) -> AbstractAsyncContextManager[IntentSubscription]:
        return self._subscription(site_id)

    def subscriber_count(self, site_id: str) -> int:
        return len(self._subscribers.get(site_id, ()))

    async def close(self) -> None:
        self._closed = True
        for subscribers in self._subscribers.values():
            for subscription in subscribers:
                subscription.close()

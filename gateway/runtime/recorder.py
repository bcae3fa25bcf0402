"""The recorder: everything bound upstream passes through here into the outbox, in batches.

Producers (pollers, the control loop) call `record()`, which only appends to an in-memory list;
`run()` commits the list to the outbox once per commit interval in a single transaction (on a
worker thread, so the event loop never waits on SQLite), then wakes the uplink. A record counts as
sent only after the headend acknowledged it; until then it lives in the outbox.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3

from gateway.outbox import Outbox

__all__ = ["Recorder"]

log = logging.getLogger(__name__)

# Records held in memory while the outbox cannot take them (e.g. disk trouble); beyond this the
# oldest are dropped and counted rather than letting memory grow without bound.
MAX_PENDING_RECORDS = 200_000


class Recorder:
    def __init__(self, outbox: Outbox, *, commit_interval_s: float) -> None:
        self._outbox = outbox
        self._commit_interval_s = commit_interval_s
        self._pending: list[tuple[int, bytes]] = []
        self.committed = asyncio.Event()  # set after each commit; the uplink clears it
        self.dropped_records = 0
        self.last_committed_seq = 0

    def record(self, kind: int, payload: bytes) -> None:
        self._pending.append((kind, payload))
        if len(self._pending) > MAX_PENDING_RECORDS:
            excess = len(self._pending) - MAX_PENDING_RECORDS
            del self._pending[:excess]
            self.dropped_records += excess

    async def flush(self) -> None:
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        try:
            seqs = await asyncio.to_thread(self._outbox.append, batch)
        except (sqlite3.OperationalError, OSError):
            # Storage trouble (disk full, I/O error, read-only): put the batch back in front, so
            # order is kept and nothing is lost while it lasts (bounded by MAX_PENDING_RECORDS).
            self._pending[:0] = batch
            raise
        except Exception:
            # A batch the outbox refuses (a bug upstream) would block all telemetry if retried.
            self.dropped_records += len(batch)
            raise
        if len(seqs):
            self.last_committed_seq = seqs[-1]
        self.committed.set()

    async def run(self) -> None:
        try:
            while True:
                await asyncio.sleep(self._commit_interval_s)
                try:
                    await self.flush()
                except Exception as exc:
                    log.error("outbox commit failed, will retry: %s", exc)
        finally:
            # Shutdown: commit what is pending so a clean stop loses nothing.
            try:
                await asyncio.shield(self.flush())
            except Exception as exc:
                log.error("final outbox commit failed: %s", exc)

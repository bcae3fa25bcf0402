"""The recorder: everything bound upstream passes through here into the outbox, in batches.

Producers (pollers, the control loop) call `record()`, which only appends to an in-memory queue;
`run()` commits the queue to the outbox once per commit interval in a single transaction (on a
worker thread, so the event loop never waits on SQLite), then wakes the uplink. A record counts as
sent only after the headend acknowledged it; until then it lives in the outbox.

Storage trouble never stops control. When the outbox refuses a commit (disk full, read-only file
system, I/O error: OutboxStorageError), the batch stays queued in memory, in order, and is retried
every commit interval; `storage_condition` names the trouble meanwhile (for health and the
ReportedState notes), logged once per change. The queue is bounded by MAX_PENDING_RECORDS: beyond
it the oldest records are dropped, and counted (kinds, points, time range, devices). When the
outbox accepts again, a Gap record ("not stored: <condition>") for what was dropped is committed
first, in the same transaction as the queued records, so the loss reaches the headend.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections import deque

from gateway.outbox import GapAccount, Outbox, OutboxStorageError, RecordKind

__all__ = ["MAX_PENDING_RECORDS", "Recorder"]

log = logging.getLogger(__name__)

# Records held in memory while the outbox cannot take them (e.g. disk trouble); beyond this the
# oldest are dropped and counted rather than letting memory grow without bound.
MAX_PENDING_RECORDS = 200_000

# What the dropped records are booked under when no storage condition is known (the outbox
# refused commits for another reason).
_UNKNOWN = "outbox not accepting records"


class Recorder:
    def __init__(self, outbox: Outbox, *, commit_interval_s: float) -> None:
        self._outbox = outbox
        self._commit_interval_s = commit_interval_s
        self._pending: deque[tuple[int, bytes]] = deque()
        self.committed = asyncio.Event()  # set after each commit; the uplink clears it
        self.dropped_records = 0  # over the process's life: dropped in memory or refused
        self.last_committed_seq = 0
        # Commit rounds finished (committed, nothing to do, or refused with an answer): a
        # blocked SQLite write stops this counter, and the systemd watchdog with it.
        self.rounds = 0
        # The storage trouble in force ("disk full", "read-only file system", "I/O error"), or
        # None while the outbox accepts commits.
        self.storage_condition: str | None = None
        # Records dropped from memory, per condition, not yet reported by a committed Gap.
        self._lost: dict[str, GapAccount] = {}

    @property
    def pending_records(self) -> int:
        return len(self._pending)

    def record(self, kind: int, payload: bytes) -> None:
        self._pending.append((kind, payload))
        if len(self._pending) > MAX_PENDING_RECORDS:
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        condition = self.storage_condition or _UNKNOWN
        account = self._lost.get(condition)
        if account is None:
            account = self._lost[condition] = GapAccount(parts=[f"not stored: {condition}"])
        while len(self._pending) > MAX_PENDING_RECORDS:
            kind, payload = self._pending.popleft()
            account.add_record(kind, payload, what=f"not stored: {condition}")
            self.dropped_records += 1

    def _gap_items(self) -> list[tuple[int, bytes]]:
        items = []
        for condition, account in self._lost.items():
            kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(account.kinds.items()))
            account.reasons = [
                f"the outbox could not store records ({condition}) and more than "
                f"{MAX_PENDING_RECORDS} were waiting in memory: the oldest were dropped ({kinds})"
            ]
            items.append((int(RecordKind.GAP), account.payload()))
        return items

    async def flush(self) -> None:
        """Commit what is queued (after a Gap for anything dropped meanwhile), then wake the
        uplink. Storage trouble keeps the queue and sets `storage_condition`; it does not raise."""
        if not self._pending and not self._lost:
            return
        batch = list(self._pending)
        self._pending.clear()
        gaps = self._gap_items()
        try:
            seqs = await asyncio.to_thread(self._outbox.append, gaps + batch)
        except OutboxStorageError as exc:
            self._requeue(batch)
            if exc.condition != self.storage_condition:
                log.error("telemetry is not being stored (control continues): %s", exc)
                self.storage_condition = exc.condition
            return
        except (sqlite3.Error, OSError):
            # Storage trouble the outbox could not name: keep the batch too, and let run() log.
            self._requeue(batch)
            raise
        except Exception:
            # A batch the outbox refuses (a bug upstream) would block all telemetry if retried.
            self.dropped_records += len(batch)
            raise
        self._lost.clear()
        if self.storage_condition is not None:
            log.warning(
                "the outbox stores telemetry again (was: %s)%s",
                self.storage_condition,
                f"; {len(gaps)} Gap record(s) report what was dropped meanwhile" if gaps else "",
            )
            self.storage_condition = None
        if len(seqs):
            self.last_committed_seq = seqs[-1]
        self.committed.set()

    def _requeue(self, batch: list[tuple[int, bytes]]) -> None:
        # Put the batch back in front of what was recorded meanwhile: order is kept.
        self._pending.extendleft(reversed(batch))
        if len(self._pending) > MAX_PENDING_RECORDS:
            self._drop_oldest()

    async def run(self) -> None:
        try:
            while True:
                await asyncio.sleep(self._commit_interval_s)
                try:
                    await self.flush()
                except Exception as exc:
                    log.error("outbox commit failed, will retry: %s", exc)
                self.rounds += 1
        finally:
            # Shutdown: commit what is pending so a clean stop loses nothing.
            try:
                await asyncio.shield(self.flush())
            except Exception as exc:
                log.error("final outbox commit failed: %s", exc)

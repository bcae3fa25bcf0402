"""SQLite implementation of `store.Store`.

One connection, owned by one dedicated worker thread: every statement runs there, so the event
loop never blocks on disk and SQLite never sees two threads. WAL mode with synchronous=FULL,
because the link acks a telemetry batch as soon as `commit_telemetry` returns and an ack must
survive a power cut. Samples are stored packed: one row per device read, not per point; so are the
latest values, one row per device (`ingest.merge_latest_points`: newest seq wins per point).

Telemetry is group-committed: a commit costs an fsync, so one per batch would cap a headend at a
few hundred batches/s, far below thousands of gateways at one batch a second each. Store calls
queue on the event loop in arrival order and the worker takes them one job at a time; a job is
either one ordinary call or every telemetry commit waiting at the head of the queue (up to
`GROUP_MAX_BATCHES` / `GROUP_MAX_RECORDS`), written with one `executemany` per table and made
durable by ONE commit. While a group commits, the next one accumulates, so groups grow with the
load and an idle headend still commits a lone batch at once. Every caller gets its own
CommitResult (the watermark and ranges as of its batch, in queue order) only after the commit,
so an ack still means durable. If anything in a group fails, the group is rolled back and
replayed with a SAVEPOINT per batch: the failing batch gets its error and the others commit.

The schema is versioned in `schema_migrations` (see `sqlite_schema`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import sqlite3
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, ParamSpec, TypeVar

from dergw.v1 import ns_from_timestamp, pb
from headend_min.ingest import (
    LatestPack,
    flexibility_record,
    merge_latest_points,
    sample_points,
    unpack_latest_points,
)
from headend_min.model import (
    INTENT_DELIVERY_COLUMNS,
    ApiToken,
    CommitResult,
    DeviceInfo,
    DeviceRecord,
    EventResponseRecord,
    FlexibilityRecord,
    GapRecord,
    GatewayRecord,
    HistoryCursor,
    HistoryPage,
    HistoryPoint,
    HistoryQuery,
    IntentAckInfo,
    IntentBasis,
    IntentDeliveryRecord,
    IntentStatusRecord,
    LatestPoint,
    Nameplate,
    PointInfo,
    RegisterOutcome,
    Registration,
    ReportedStateRecord,
    SampleStatus,
    SiteInfo,
    SiteRecord,
    StoredIntent,
    StreamRef,
    TelemetryRows,
)
from headend_min.seqranges import SeqRanges, absorb
from headend_min.sqlite_schema import MIGRATIONS
from headend_min.store import (
    DuplicateTokenError,
    IntentComposer,
    PendingCommit,
    SchemaTooNewError,
    StoreError,
    UnknownSiteError,
    commit_row_count,
    own_error,
)

__all__ = ["GROUP_MAX_BATCHES", "GROUP_MAX_RECORDS", "SqliteStore"]

_log = logging.getLogger(__name__)
_P = ParamSpec("_P")
_T = TypeVar("_T")

# Bounds of one group commit: enough to absorb thousands of gateways per fsync, small enough that
# a group's statements take well under a second (the ack latency the fleet budget allows).
GROUP_MAX_BATCHES = 2000
GROUP_MAX_RECORDS = 20_000


@dataclass(slots=True)
class _Call:
    """An ordinary store call waiting for the worker."""

    run: Callable[[], Any]
    future: asyncio.Future[Any]


_GATEWAY_COLUMNS = (
    "gateway_id, site_id, software_version, boot_id, registered_at_ns, stream_open, "
    "connected_since_ns, last_seen_ns, intent_version, committed_seq, oldest_unacked_seq, next_seq"
)
_SITE_COLUMNS = "site_id, name, substation, feeder, export_limit_w, import_limit_w, updated_at_ns"
_DEVICE_COLUMNS = (
    "gateway_id, device_id, kind, protocol, address, manufacturer, model, serial_number, role, "
    "max_w, max_va, max_var, max_charge_w, max_discharge_w, energy_wh, points_json"
)


def _placeholders(count: int) -> str:
    return ", ".join("?" * count)


def _gateway(row: Sequence[Any]) -> GatewayRecord:
    return GatewayRecord(
        gateway_id=row[0],
        site_id=row[1],
        software_version=row[2],
        boot_id=row[3],
        registered_at_ns=row[4],
        stream_open=bool(row[5]),
        connected_since_ns=row[6],
        last_seen_ns=row[7],
        intent_version=row[8],
        committed_seq=row[9],
        oldest_unacked_seq=row[10],
        next_seq=row[11],
    )


def _site(row: Sequence[Any]) -> SiteRecord:
    return SiteRecord(
        site=SiteInfo(
            site_id=row[0],
            name=row[1],
            substation=row[2],
            feeder=row[3],
            export_limit_w=row[4],
            import_limit_w=row[5],
        ),
        updated_at_ns=row[6],
    )


def _device(row: Sequence[Any]) -> DeviceRecord:
    points = tuple(
        PointInfo(name, unit, bool(writable)) for name, unit, writable in json.loads(row[15])
    )
    return DeviceRecord(
        gateway_id=row[0],
        device=DeviceInfo(
            device_id=row[1],
            kind=row[2],
            protocol=row[3],
            address=row[4],
            manufacturer=row[5],
            model=row[6],
            serial_number=row[7],
            role=row[8],
            nameplate=Nameplate(
                max_w=row[9],
                max_va=row[10],
                max_var=row[11],
                max_charge_w=row[12],
                max_discharge_w=row[13],
                energy_wh=row[14],
            ),
            points=points,
        ),
    )


def _device_row(gateway_id: str, device: DeviceInfo) -> tuple[object, ...]:
    plate = device.nameplate
    return (
        gateway_id,
        device.device_id,
        device.kind,
        device.protocol,
        device.address,
        device.manufacturer,
        device.model,
        device.serial_number,
        device.role,
        plate.max_w,
        plate.max_va,
        plate.max_var,
        plate.max_charge_w,
        plate.max_discharge_w,
        plate.energy_wh,
        json.dumps([[p.name, p.unit, p.writable] for p in device.points]),
    )


_INTENT_COLUMNS = "site_id, version, issued_at_ns, document, posted_by"
_TOKEN_COLUMNS = (
    "token_id, name, secret_sha256, role, site_id, created_at_ns, created_by, revoked_at_ns, "
    "revoked_by, last_used_at_ns"
)


def _intent(row: Sequence[Any]) -> StoredIntent:
    return StoredIntent(
        site_id=row[0],
        version=row[1],
        issued_at_ns=row[2],
        document=pb.IntentDocument.FromString(row[3]),
        posted_by=row[4],
    )


def _token(row: Sequence[Any]) -> ApiToken:
    return ApiToken(*row)


class SqliteStore:
    """`Store` on one SQLite file; construct with `await SqliteStore.open(path)`."""

    def __init__(self, path: Path, *, synchronous: Literal["FULL", "NORMAL"] = "FULL") -> None:
        self._path = path
        self._synchronous = synchronous
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="headend-sqlite")
        self._db: sqlite3.Connection | None = None
        self._closed = False
        # Calls in arrival order; the worker runs one job (a call, or a group of commits) at a
        # time, so the order is also the order the database sees them in.
        self._queue: deque[_Call | PendingCommit] = deque()
        self._worker_busy = False

    @classmethod
    async def open(
        cls, path: Path | str, *, synchronous: Literal["FULL", "NORMAL"] = "FULL"
    ) -> SqliteStore:
        """Open (creating and migrating as needed).

        `synchronous="FULL"` (default) makes every commit survive a power cut, which an ack
        promises; "NORMAL" survives a process crash only, and commits several times faster.
        """
        store = cls(Path(path), synchronous=synchronous)
        try:
            await store._call(store._open_sync)
        except BaseException:
            await store.close()
            raise
        return store

    @property
    def path(self) -> Path:
        return self._path

    async def _call(self, fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        if self._closed:
            raise StoreError("the store is closed")
        future: asyncio.Future[_T] = asyncio.get_running_loop().create_future()
        self._queue.append(_Call(functools.partial(fn, *args, **kwargs), future))
        self._dispatch()
        return await future

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True  # refuses new calls; the ones queued before still run, then this
        closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append(_Call(self._close_sync, closed))
        self._dispatch()
        with contextlib.suppress(StoreError):
            await closed
        self._fail_queued("the store is closed")
        self._executor.shutdown(wait=True)

    # -- the job queue (event loop side) --------------------------------------------------------

    def _dispatch(self) -> None:
        """Hand the next job to the worker unless it is busy (called on the event loop)."""
        if self._worker_busy:
            return
        while self._queue:
            head = self._queue[0]
            if isinstance(head, PendingCommit):
                group = self._take_group()
                if not group:
                    continue
                work: Callable[[], Any] = functools.partial(self._commit_group_sync, group)
                loop = group[0].future.get_loop()
                on_done = functools.partial(self._group_done, group)
            else:
                self._queue.popleft()
                if head.future.done():  # the caller was cancelled before the call started
                    continue
                work = head.run
                loop = head.future.get_loop()
                on_done = functools.partial(self._call_done, head)
            try:
                job = loop.run_in_executor(self._executor, work)
            except RuntimeError:  # the executor is shut down: the store was closed
                self._fail_queued("the store is closed")
                return
            self._worker_busy = True
            job.add_done_callback(on_done)
            return

    def _take_group(self) -> list[PendingCommit]:
        group: list[PendingCommit] = []
        rows = 0
        while self._queue and len(group) < GROUP_MAX_BATCHES and rows < GROUP_MAX_RECORDS:
            head = self._queue[0]
            if not isinstance(head, PendingCommit):
                break
            self._queue.popleft()
            if head.future.done():  # cancelled before it started: never committed, never acked
                continue
            group.append(head)
            rows += commit_row_count(head.rows)
        return group

    def _error(self, exc: BaseException) -> BaseException:
        if isinstance(exc, sqlite3.Error):
            error = StoreError(f"SQLite error on {self._path}: {exc}")
            error.__cause__ = exc
            return error
        return exc

    def _call_done(self, call: _Call, job: asyncio.Future[Any]) -> None:
        self._worker_busy = False
        if not call.future.done():
            if job.cancelled():
                call.future.set_exception(StoreError("the store is closed"))
            elif (exc := job.exception()) is not None:
                call.future.set_exception(self._error(exc))
            else:
                call.future.set_result(job.result())
        self._dispatch()

    def _group_done(
        self, group: list[PendingCommit], job: asyncio.Future[list[CommitResult | BaseException]]
    ) -> None:
        self._worker_busy = False
        outcomes: list[CommitResult | BaseException]
        if job.cancelled():
            outcomes = [StoreError("the store is closed")] * len(group)
        elif (exc := job.exception()) is not None:
            outcomes = [exc] * len(group)
        else:
            outcomes = job.result()
        delivered: set[int] = set()
        for commit, outcome in zip(group, outcomes, strict=True):
            if commit.future.done():
                continue
            if isinstance(outcome, BaseException):
                commit.future.set_exception(own_error(self._error(outcome), delivered))
            else:
                commit.future.set_result(outcome)
        self._dispatch()

    def _fail_queued(self, message: str) -> None:
        while self._queue:
            job = self._queue.popleft()
            if not job.future.done():
                job.future.set_exception(StoreError(message))

    # -- worker-thread internals ----------------------------------------------------------------

    @property
    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError("the store is not open")
        return self._db

    def _open_sync(self) -> None:
        if str(self._path) != ":memory:":
            self._path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self._path, isolation_level=None)
        self._db = db
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal" and str(self._path) != ":memory:":
            raise StoreError(f"{self._path}: cannot switch to WAL mode (got {mode!r})")
        db.execute(f"PRAGMA synchronous={self._synchronous}")
        db.execute("PRAGMA busy_timeout=5000")
        db.execute("PRAGMA temp_store=MEMORY")
        self._migrate_sync()

    def _close_sync(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        db = self._conn
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _migrate_sync(self) -> None:
        db = self._conn
        db.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                version INTEGER PRIMARY KEY,
                name TEXT NOT NULL,
                applied_at_ns INTEGER NOT NULL
            )"""
        )
        current = int(
            db.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()[0]
        )
        known = MIGRATIONS[-1].version
        if current > known:
            raise SchemaTooNewError(
                f"{self._path} has schema version {current}, this headend knows up to {known}; "
                "run a newer headend or point --db at another file"
            )
        for migration in MIGRATIONS:
            if migration.version <= current:
                continue
            with self._transaction() as tx:
                for statement in migration.statements:
                    tx.execute(statement)
                tx.execute(
                    "INSERT INTO schema_migrations (version, name, applied_at_ns) "
                    "VALUES (?, ?, CAST(strftime('%s', 'now') AS INTEGER) * 1000000000)",
                    (migration.version, migration.name),
                )
            _log.info(
                "migrated %s to schema version %d (%s)",
                self._path,
                migration.version,
                migration.name,
            )

    def _schema_version_sync(self) -> int:
        return int(
            self._conn.execute(
                "SELECT COALESCE(MAX(version), 0) FROM schema_migrations"
            ).fetchone()[0]
        )

    def _register_sync(
        self, registration: Registration, stream: StreamRef, now_ns: int
    ) -> RegisterOutcome:
        site = registration.site
        with self._transaction() as tx:
            tx.execute(
                f"INSERT INTO sites ({_SITE_COLUMNS}) VALUES ({_placeholders(7)}) "
                "ON CONFLICT (site_id) DO UPDATE SET name = excluded.name, "
                "substation = excluded.substation, feeder = excluded.feeder, "
                "export_limit_w = excluded.export_limit_w, "
                "import_limit_w = excluded.import_limit_w, updated_at_ns = excluded.updated_at_ns",
                (
                    site.site_id,
                    site.name,
                    site.substation,
                    site.feeder,
                    site.export_limit_w,
                    site.import_limit_w,
                    now_ns,
                ),
            )
            tx.execute(
                "INSERT INTO gateways (gateway_id, site_id, software_version, boot_id, "
                "registered_at_ns, stream_id, stream_open, connected_since_ns, last_seen_ns, "
                "intent_version, oldest_unacked_seq, next_seq) "
                "VALUES (?, ?, ?, ?, ?, ?, 1, ?, ?, ?, ?, ?) "
                "ON CONFLICT (gateway_id) DO UPDATE SET site_id = excluded.site_id, "
                "software_version = excluded.software_version, boot_id = excluded.boot_id, "
                "registered_at_ns = excluded.registered_at_ns, stream_id = excluded.stream_id, "
                "stream_open = 1, connected_since_ns = excluded.connected_since_ns, "
                "last_seen_ns = excluded.last_seen_ns, intent_version = excluded.intent_version, "
                "oldest_unacked_seq = excluded.oldest_unacked_seq, next_seq = excluded.next_seq",
                (
                    registration.gateway_id,
                    site.site_id,
                    registration.software_version,
                    registration.boot_id,
                    now_ns,
                    stream.stream_id,
                    now_ns,
                    now_ns,
                    registration.intent_version,
                    registration.oldest_unacked_seq,
                    registration.next_seq,
                ),
            )
            # The inventory is whatever the gateway reports now: devices it no longer lists go.
            tx.execute("DELETE FROM devices WHERE gateway_id = ?", (registration.gateway_id,))
            tx.executemany(
                f"INSERT INTO devices ({_DEVICE_COLUMNS}) VALUES ({_placeholders(16)})",
                [_device_row(registration.gateway_id, device) for device in registration.devices],
            )
            # Seqs below what the gateway still holds were acked (by this headend's database)
            # and deleted there: they count as committed, so a hole left by an ack that reached
            # the gateway just before a crash here never stalls the watermark.
            settled_below = registration.oldest_unacked_seq or registration.next_seq
            settled = [(1, settled_below - 1)] if settled_below > 1 else []
            committed = self._absorb_ranges(tx, registration.gateway_id, settled)
            site_version = tx.execute(
                "SELECT COALESCE(MAX(version), 0) FROM intents WHERE site_id = ?",
                (site.site_id,),
            ).fetchone()[0]
        return RegisterOutcome(
            committed_seq=committed.committed_seq,
            site_intent_version=int(site_version),
            committed_ranges=committed.committed_ranges,
        )

    @staticmethod
    def _absorb_ranges(
        tx: sqlite3.Connection, gateway_id: str, new: Sequence[tuple[int, int]]
    ) -> CommitResult:
        """Fold `new` into the gateway's watermark and ranges (inside the caller's transaction)."""
        watermark, ranges = SqliteStore._committed(tx, gateway_id)
        if not new:
            return CommitResult(watermark, ranges)
        new_watermark, new_ranges = absorb(watermark, ranges, new)
        if new_watermark != watermark:
            tx.execute(
                "UPDATE gateways SET committed_seq = ? WHERE gateway_id = ?",
                (new_watermark, gateway_id),
            )
        if new_ranges != ranges:
            tx.execute("DELETE FROM committed_ranges WHERE gateway_id = ?", (gateway_id,))
            tx.executemany(
                "INSERT INTO committed_ranges (gateway_id, first_seq, last_seq) VALUES (?, ?, ?)",
                [(gateway_id, first, last) for first, last in new_ranges],
            )
        return CommitResult(new_watermark, new_ranges)

    def _touch_sync(self, streams: Sequence[StreamRef], now_ns: int) -> None:
        with self._transaction() as tx:
            tx.executemany(
                "UPDATE gateways SET last_seen_ns = ? "
                "WHERE gateway_id = ? AND stream_id = ? AND stream_open = 1",
                [(now_ns, s.gateway_id, s.stream_id) for s in streams],
            )

    def _close_stream_sync(self, stream: StreamRef, now_ns: int) -> None:
        with self._transaction() as tx:
            tx.execute(
                "UPDATE gateways SET stream_open = 0, last_seen_ns = ? "
                "WHERE gateway_id = ? AND stream_id = ?",
                (now_ns, stream.gateway_id, stream.stream_id),
            )

    def _commit_group_sync(
        self, group: Sequence[PendingCommit]
    ) -> list[CommitResult | BaseException]:
        """Commit every batch of `group` in one transaction; one outcome per batch, in order.

        Fast path: the whole group at once. If that fails, nothing of it is kept and the group
        is replayed batch by batch under savepoints, so only the failing batch gets an error.
        """
        db = self._conn
        try:
            with self._transaction():
                return list(self._apply_commits(db, group))
        except Exception as exc:
            if len(group) == 1 or db.in_transaction:  # (still in one: its rollback failed)
                return [exc] * len(group)
            _log.warning(
                "a group of %d telemetry batches failed (%s); committing them one by one",
                len(group),
                exc,
            )
        outcomes: list[CommitResult | BaseException] = []
        try:
            with self._transaction():
                for commit in group:
                    db.execute("SAVEPOINT batch")
                    try:
                        outcomes += self._apply_commits(db, [commit])
                    except Exception as exc:
                        db.execute("ROLLBACK TO batch")
                        outcomes.append(exc)
                    db.execute("RELEASE batch")
        except Exception as exc:
            # The transaction itself failed (disk full, I/O error): nothing of it is stored.
            return [exc] * len(group)
        return outcomes

    def _apply_commits(
        self, tx: sqlite3.Connection, group: Sequence[PendingCommit]
    ) -> list[CommitResult]:
        """Write the batches of `group` (inside the caller's transaction); what is committed for
        each batch's gateway as of that batch, as if they were committed one after another."""
        samples = [row for c in group for row in c.rows.samples]
        latest = [row for c in group for row in c.rows.latest_points]
        status = [row for c in group for row in c.rows.sample_status]
        # Dedupe: every table is keyed by (gateway_id, seq); a replayed record is ignored.
        if samples:
            tx.executemany(
                "INSERT OR IGNORE INTO samples (gateway_id, seq, device_id, time_ns, payload, "
                "boot_id, monotonic_ns, clock_synced) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                samples,
            )
        if latest:
            # One packed row per device (read once, merged here, written once): per point the
            # newest seq wins, so a partial read keeps the other points and a replayed older
            # batch cannot roll a value back.
            tx.executemany(
                "INSERT INTO latest_values (gateway_id, device_id, names, max_seq, points) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (gateway_id, device_id) DO UPDATE SET "
                "names = excluded.names, max_seq = excluded.max_seq, points = excluded.points",
                merge_latest_points(latest, self._stored_latest(tx, group)),
            )
        if status:
            tx.executemany(
                "INSERT INTO sample_status (gateway_id, device_id, time_ns, seq, ok, error) "
                "VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (gateway_id, device_id) DO UPDATE SET "
                "time_ns = excluded.time_ns, seq = excluded.seq, ok = excluded.ok, "
                "error = excluded.error WHERE excluded.seq > sample_status.seq",
                status,
            )
        if any(c.rows.event_responses for c in group):
            tx.executemany(
                "INSERT OR IGNORE INTO event_responses (gateway_id, seq, intent_version, "
                "event_id, status, reason, time_ns, effective_start_ns, effective_end_ns) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [row for c in group for row in c.rows.event_responses],
            )
        if any(c.rows.intent_statuses for c in group):
            tx.executemany(
                "INSERT OR IGNORE INTO intent_statuses (gateway_id, seq, version, state, "
                "reason, time_ns, active_event_id) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [row for c in group for row in c.rows.intent_statuses],
            )
        if any(c.rows.reported_states for c in group):
            tx.executemany(
                "INSERT OR IGNORE INTO reported_states (gateway_id, seq, time_ns, "
                "intent_version, active_event_id, source, payload) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [row for c in group for row in c.rows.reported_states],
            )
        if any(c.rows.decisions for c in group):
            tx.executemany(
                "INSERT OR IGNORE INTO decisions (gateway_id, seq, time_ns, summary, payload) "
                "VALUES (?, ?, ?, ?, ?)",
                [row for c in group for row in c.rows.decisions],
            )
        if any(c.rows.flexibility for c in group):
            tx.executemany(
                "INSERT OR IGNORE INTO flexibility (gateway_id, seq, time_ns, up_w, down_w, "
                "payload) VALUES (?, ?, ?, ?, ?, ?)",
                [row for c in group for row in c.rows.flexibility],
            )
            # Newest seq wins, so a replayed older batch cannot roll the report back.
            tx.executemany(
                "INSERT INTO latest_flexibility (gateway_id, seq, time_ns, up_w, down_w, "
                "payload) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (gateway_id) DO UPDATE SET "
                "seq = excluded.seq, time_ns = excluded.time_ns, up_w = excluded.up_w, "
                "down_w = excluded.down_w, payload = excluded.payload "
                "WHERE excluded.seq > latest_flexibility.seq",
                [
                    max(c.rows.flexibility, key=lambda row: row.seq)
                    for c in group
                    if c.rows.flexibility
                ],
            )
        if any(c.rows.unknown for c in group):
            tx.executemany(
                "INSERT OR IGNORE INTO unknown_records (gateway_id, seq, payload) VALUES (?, ?, ?)",
                [row for c in group for row in c.rows.unknown],
            )
        if any(c.rows.gaps for c in group):
            tx.executemany(
                "INSERT OR IGNORE INTO gaps (gateway_id, seq, through_seq, what, records, "
                "points, bytes, first_time_ns, last_time_ns, reason, device_ids, "
                "received_at_ns) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(*gap, c.now_ns) for c in group for gap in c.rows.gaps],
            )
        if any(c.rows.clock_syncs for c in group):
            tx.executemany(
                "INSERT OR IGNORE INTO clock_syncs (gateway_id, seq, boot_id, "
                "wall_minus_mono_ns, time_ns) VALUES (?, ?, ?, ?, ?)",
                [row for c in group for row in c.rows.clock_syncs],
            )
        # Samples stamped before their boot's clock was synced get their true time (monotonic +
        # the offset measured at the boot's first sync), whichever of the two came first. Run
        # once per gateway, after every row of the group is in.
        unsynced = {
            c.rows.gateway_id: None
            for c in group
            if c.rows.clock_syncs or any(not sample.clock_synced for sample in c.rows.samples)
        }
        for gateway_id in unsynced:
            tx.execute(
                "UPDATE samples SET clock_synced = 1, time_ns = monotonic_ns + ("
                "SELECT c.wall_minus_mono_ns FROM clock_syncs c "
                "WHERE c.gateway_id = samples.gateway_id AND c.boot_id = samples.boot_id "
                "ORDER BY c.seq LIMIT 1) "
                "WHERE gateway_id = ? AND clock_synced = 0 AND boot_id IN ("
                "SELECT boot_id FROM clock_syncs WHERE gateway_id = ?)",
                (gateway_id, gateway_id),
            )
        tx.executemany(
            "UPDATE gateways SET last_seen_ns = ? WHERE gateway_id = ?",
            [(c.now_ns, c.rows.gateway_id) for c in group],
        )
        return self._absorb_group(tx, group)

    @staticmethod
    def _stored_latest(
        tx: sqlite3.Connection, group: Sequence[PendingCommit]
    ) -> dict[tuple[str, str], LatestPack]:
        """The packed latest points of every device of the group's gateways, in one query."""
        gateway_ids = json.dumps(sorted({c.rows.gateway_id for c in group if c.rows.latest_points}))
        rows = tx.execute(
            "SELECT gateway_id, device_id, names, max_seq, points FROM latest_values "
            "WHERE gateway_id IN (SELECT value FROM json_each(?))",
            (gateway_ids,),
        )
        return {(row[0], row[1]): row[2:] for row in rows}

    def _absorb_group(
        self, tx: sqlite3.Connection, group: Sequence[PendingCommit]
    ) -> list[CommitResult]:
        """Fold each batch's seqs into its gateway's watermark and ranges, in group order; write
        each gateway's final state once."""
        stored: dict[str, tuple[int, SeqRanges]] = {}
        current: dict[str, tuple[int, SeqRanges]] = {}
        results: list[CommitResult] = []
        for commit in group:
            rows = commit.rows
            state = current.get(rows.gateway_id)
            if state is None:
                state = stored[rows.gateway_id] = self._committed(tx, rows.gateway_id)
            if rows.last_seq >= rows.first_seq >= 1:
                state = absorb(*state, [(rows.first_seq, rows.last_seq)])
            current[rows.gateway_id] = state
            results.append(CommitResult(*state))
        watermarks = [
            (watermark, gateway_id)
            for gateway_id, (watermark, _) in current.items()
            if watermark != stored[gateway_id][0]
        ]
        if watermarks:
            tx.executemany("UPDATE gateways SET committed_seq = ? WHERE gateway_id = ?", watermarks)
        for gateway_id, (_, ranges) in current.items():
            if ranges != stored[gateway_id][1]:
                tx.execute("DELETE FROM committed_ranges WHERE gateway_id = ?", (gateway_id,))
                tx.executemany(
                    "INSERT INTO committed_ranges (gateway_id, first_seq, last_seq) "
                    "VALUES (?, ?, ?)",
                    [(gateway_id, first, last) for first, last in ranges],
                )
        return results

    @staticmethod
    def _committed(tx: sqlite3.Connection, gateway_id: str) -> tuple[int, SeqRanges]:
        """The gateway's watermark (0 for an unknown gateway) and the ranges above it."""
        row = tx.execute(
            "SELECT committed_seq FROM gateways WHERE gateway_id = ?", (gateway_id,)
        ).fetchone()
        ranges = tuple(
            (int(first), int(last))
            for first, last in tx.execute(
                "SELECT first_seq, last_seq FROM committed_ranges WHERE gateway_id = ? "
                "ORDER BY first_seq",
                (gateway_id,),
            )
        )
        return (0 if row is None else int(row[0])), ranges

    def _record_delivery_sync(
        self, gateway_id: str, site_id: str, version: int, now_ns: int
    ) -> None:
        with self._transaction() as tx:
            tx.execute(
                "INSERT INTO intent_deliveries (gateway_id, site_id, version, delivered_at_ns) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (gateway_id, site_id, version) DO UPDATE SET "
                "delivered_at_ns = COALESCE(intent_deliveries.delivered_at_ns, "
                "excluded.delivered_at_ns)",
                (gateway_id, site_id, version, now_ns),
            )

    def _record_ack_sync(self, gateway_id: str, ack: IntentAckInfo, now_ns: int) -> None:
        with self._transaction() as tx:
            tx.execute(
                "INSERT INTO intent_deliveries (gateway_id, site_id, version, ack_status, "
                "ack_reason, acked_at_ns) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (gateway_id, site_id, version) DO UPDATE SET "
                "ack_status = excluded.ack_status, ack_reason = excluded.ack_reason, "
                "acked_at_ns = excluded.acked_at_ns "
                # A re-delivered copy of a version the gateway already persisted is acked STALE
                # (MQTT: the broker's queued copy and the push after Register): that answer
                # must not hide the PERSISTED one.
                f"WHERE NOT (intent_deliveries.ack_status = {pb.INTENT_ACK_STATUS_PERSISTED} "
                f"AND excluded.ack_status = {pb.INTENT_ACK_STATUS_STALE})",
                (gateway_id, ack.site_id, ack.version, ack.status, ack.reason, now_ns),
            )
            if ack.status == pb.INTENT_ACK_STATUS_PERSISTED:
                tx.execute(
                    "UPDATE gateways SET intent_version = MAX(intent_version, ?), "
                    "last_seen_ns = ? WHERE gateway_id = ?",
                    (ack.version, now_ns, gateway_id),
                )
            else:
                tx.execute(
                    "UPDATE gateways SET last_seen_ns = ? WHERE gateway_id = ?",
                    (now_ns, gateway_id),
                )

    def _append_intent_sync(
        self, site_id: str, compose: IntentComposer, now_ns: int, posted_by: str | None
    ) -> StoredIntent:
        with self._transaction() as tx:
            if tx.execute("SELECT 1 FROM sites WHERE site_id = ?", (site_id,)).fetchone() is None:
                raise UnknownSiteError(site_id)
            row = tx.execute(
                "SELECT version, document FROM intents WHERE site_id = ? "
                "ORDER BY version DESC LIMIT 1",
                (site_id,),
            ).fetchone()
            previous = pb.IntentDocument.FromString(row[1]) if row is not None else None
            next_version = (int(row[0]) if row is not None else 0) + 1
            device_ids = frozenset(
                device_id
                for (device_id,) in tx.execute(
                    "SELECT d.device_id FROM devices d JOIN gateways g "
                    "ON g.gateway_id = d.gateway_id WHERE g.site_id = ?",
                    (site_id,),
                )
            )
            document = compose(IntentBasis(site_id, previous, next_version, device_ids))
            if document.version != next_version or document.site_id != site_id:
                raise StoreError(
                    f"composer returned {document.site_id!r} v{document.version}, "
                    f"expected {site_id!r} v{next_version}"
                )
            issued_at_ns = ns_from_timestamp(document.issued_at) or now_ns
            tx.execute(
                "INSERT INTO intents (site_id, version, issued_at_ns, document, posted_by) "
                "VALUES (?, ?, ?, ?, ?)",
                (site_id, next_version, issued_at_ns, document.SerializeToString(), posted_by),
            )
        return StoredIntent(site_id, next_version, issued_at_ns, document, posted_by)

    def _get_intent_sync(self, site_id: str, version: int | None) -> StoredIntent | None:
        if version is None:
            row = self._conn.execute(
                f"SELECT {_INTENT_COLUMNS} FROM intents "
                "WHERE site_id = ? ORDER BY version DESC LIMIT 1",
                (site_id,),
            ).fetchone()
        else:
            row = self._conn.execute(
                f"SELECT {_INTENT_COLUMNS} FROM intents WHERE site_id = ? AND version = ?",
                (site_id, version),
            ).fetchone()
        return _intent(row) if row is not None else None

    def _list_intents_sync(self, site_id: str, limit: int) -> list[StoredIntent]:
        rows = self._conn.execute(
            f"SELECT {_INTENT_COLUMNS} FROM intents "
            "WHERE site_id = ? ORDER BY version DESC LIMIT ?",
            (site_id, limit),
        ).fetchall()
        return [_intent(row) for row in rows]

    def _latest_intent_versions_sync(self) -> dict[str, int]:
        rows = self._conn.execute("SELECT site_id, MAX(version) FROM intents GROUP BY site_id")
        return {site_id: int(version) for site_id, version in rows}

    def _intent_deliveries_sync(
        self, site_id: str, versions: Sequence[int]
    ) -> list[IntentDeliveryRecord]:
        if not versions:
            return []
        rows = self._conn.execute(
            f"SELECT {INTENT_DELIVERY_COLUMNS} FROM intent_deliveries WHERE site_id = ? "
            f"AND version IN ({_placeholders(len(versions))})",
            (site_id, *versions),
        ).fetchall()
        return [IntentDeliveryRecord(*row) for row in rows]

    def _latest_intent_statuses_sync(
        self, site_id: str, versions: Sequence[int]
    ) -> list[IntentStatusRecord]:
        if not versions:
            return []
        rows = self._conn.execute(
            "SELECT s.gateway_id, s.seq, s.version, s.state, s.reason, s.time_ns, "
            "s.active_event_id FROM intent_statuses s "
            "JOIN gateways g ON g.gateway_id = s.gateway_id "
            f"WHERE g.site_id = ? AND s.version IN ({_placeholders(len(versions))}) "
            "AND s.seq = (SELECT MAX(x.seq) FROM intent_statuses x "
            "WHERE x.gateway_id = s.gateway_id AND x.version = s.version)",
            (site_id, *versions),
        ).fetchall()
        return [IntentStatusRecord(*row) for row in rows]

    def _list_gateways_sync(self, site_id: str | None) -> list[GatewayRecord]:
        if site_id is None:
            rows = self._conn.execute(
                f"SELECT {_GATEWAY_COLUMNS} FROM gateways ORDER BY gateway_id"
            ).fetchall()
        else:
            rows = self._conn.execute(
                f"SELECT {_GATEWAY_COLUMNS} FROM gateways WHERE site_id = ? ORDER BY gateway_id",
                (site_id,),
            ).fetchall()
        return [_gateway(row) for row in rows]

    def _get_gateway_sync(self, gateway_id: str) -> GatewayRecord | None:
        row = self._conn.execute(
            f"SELECT {_GATEWAY_COLUMNS} FROM gateways WHERE gateway_id = ?", (gateway_id,)
        ).fetchone()
        return _gateway(row) if row is not None else None

    def _list_sites_sync(self) -> list[SiteRecord]:
        rows = self._conn.execute(f"SELECT {_SITE_COLUMNS} FROM sites ORDER BY site_id").fetchall()
        return [_site(row) for row in rows]

    def _get_site_sync(self, site_id: str) -> SiteRecord | None:
        row = self._conn.execute(
            f"SELECT {_SITE_COLUMNS} FROM sites WHERE site_id = ?", (site_id,)
        ).fetchone()
        return _site(row) if row is not None else None

    def _list_devices_sync(self, site_id: str | None) -> list[DeviceRecord]:
        columns = ", ".join(f"d.{c.strip()}" for c in _DEVICE_COLUMNS.split(","))
        sql = f"SELECT {columns} FROM devices d JOIN gateways g ON g.gateway_id = d.gateway_id"
        params: tuple[object, ...] = ()
        if site_id is not None:
            sql += " WHERE g.site_id = ?"
            params = (site_id,)
        rows = self._conn.execute(sql + " ORDER BY d.device_id, d.gateway_id", params).fetchall()
        return [_device(row) for row in rows]

    def _latest_points_sync(
        self, site_id: str | None, device_id: str | None, point: str | None
    ) -> list[LatestPoint]:
        conditions: list[str] = []
        params: list[object] = []
        for column, value in (("g.site_id", site_id), ("l.device_id", device_id)):
            if value is not None:
                conditions.append(f"{column} = ?")
                params.append(value)
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        rows = self._conn.execute(
            "SELECT l.gateway_id, l.device_id, l.points FROM latest_values l "
            f"JOIN gateways g ON g.gateway_id = l.gateway_id {where}",
            params,
        ).fetchall()
        return unpack_latest_points(rows, point)

    def _sample_status_sync(self, site_id: str | None) -> list[SampleStatus]:
        sql = (
            "SELECT s.gateway_id, s.device_id, s.time_ns, s.seq, s.ok, s.error "
            "FROM sample_status s JOIN gateways g ON g.gateway_id = s.gateway_id"
        )
        params: tuple[object, ...] = ()
        if site_id is not None:
            sql += " WHERE g.site_id = ?"
            params = (site_id,)
        rows = self._conn.execute(sql, params).fetchall()
        return [SampleStatus(row[0], row[1], row[2], row[3], bool(row[4]), row[5]) for row in rows]

    def _point_history_sync(self, query: HistoryQuery) -> HistoryPage:
        gateway_ids = [
            gateway_id
            for (gateway_id,) in self._conn.execute(
                "SELECT gateway_id FROM gateways WHERE site_id = ?", (query.site_id,)
            )
        ]
        if not gateway_ids:
            return HistoryPage([], None)
        base = (
            "SELECT gateway_id, seq, time_ns, payload FROM samples "
            f"WHERE gateway_id IN ({_placeholders(len(gateway_ids))}) AND device_id = ?"
        )
        base_params: list[object] = [*gateway_ids, query.device_id]
        if query.start_ns is not None:
            base += " AND time_ns >= ?"
            base_params.append(query.start_ns)
        if query.end_ns is not None:
            base += " AND time_ns < ?"
            base_params.append(query.end_ns)
        # Fetch samples in chunks until one point more than the page holds is found (that extra
        # point proves there is a next page) or the range is exhausted.
        chunk = query.limit + 1
        cursor = query.after
        position: tuple[int, str, int] | None = None
        points: list[HistoryPoint] = []
        while len(points) <= query.limit:
            sql = base
            params = list(base_params)
            if position is not None:
                sql += " AND (time_ns, gateway_id, seq) > (?, ?, ?)"
                params.extend(position)
            elif cursor is not None:
                sql += " AND (time_ns, gateway_id, seq) >= (?, ?, ?)"
                params.extend((cursor.time_ns, cursor.gateway_id, cursor.seq))
            sql += " ORDER BY time_ns, gateway_id, seq LIMIT ?"
            params.append(chunk)
            rows = self._conn.execute(sql, params).fetchall()
            for gateway_id, seq, time_ns, payload in rows:
                on_cursor_row = cursor is not None and (time_ns, gateway_id, seq) == (
                    cursor.time_ns,
                    cursor.gateway_id,
                    cursor.seq,
                )
                sample = pb.DeviceSample.FromString(payload)
                for index, name, unit, value, quality in sample_points(sample, query.point):
                    if on_cursor_row and cursor is not None and index <= cursor.index:
                        continue
                    points.append(
                        HistoryPoint(gateway_id, seq, time_ns, name, value, unit, quality, index)
                    )
                if len(points) > query.limit:
                    break
            if len(rows) < chunk:
                break
            last = rows[-1]
            position = (last[2], last[0], last[1])
        if len(points) > query.limit:
            page = points[: query.limit]
            tail = page[-1]
            return HistoryPage(
                page, HistoryCursor(tail.time_ns, tail.gateway_id, tail.seq, tail.index)
            )
        return HistoryPage(points, None)

    def _event_responses_sync(
        self, site_id: str | None, event_id: str | None, limit: int
    ) -> list[EventResponseRecord]:
        conditions: list[str] = []
        params: list[object] = []
        if site_id is not None:
            conditions.append("g.site_id = ?")
            params.append(site_id)
        if event_id is not None:
            conditions.append("e.event_id = ?")
            params.append(event_id)
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        rows = self._conn.execute(
            "SELECT e.gateway_id, g.site_id, e.seq, e.intent_version, e.event_id, e.status, "
            "e.reason, e.time_ns, e.effective_start_ns, e.effective_end_ns "
            "FROM event_responses e "
            f"JOIN gateways g ON g.gateway_id = e.gateway_id {where} "
            "ORDER BY e.time_ns DESC, e.gateway_id, e.seq DESC LIMIT ?",
            (*params, limit),
        ).fetchall()
        return [EventResponseRecord(*row) for row in rows]

    def _latest_reported_states_sync(self, site_id: str) -> list[ReportedStateRecord]:
        rows = self._conn.execute(
            "SELECT r.gateway_id, r.seq, r.payload FROM reported_states r "
            "JOIN gateways g ON g.gateway_id = r.gateway_id WHERE g.site_id = ? "
            "AND r.seq = (SELECT MAX(x.seq) FROM reported_states x "
            "WHERE x.gateway_id = r.gateway_id) ORDER BY r.gateway_id",
            (site_id,),
        ).fetchall()
        return [
            ReportedStateRecord(gateway_id, seq, pb.ReportedState.FromString(payload))
            for gateway_id, seq, payload in rows
        ]

    def _latest_flexibility_sync(self, site_id: str | None) -> list[FlexibilityRecord]:
        sql = (
            "SELECT f.gateway_id, f.seq, f.payload FROM latest_flexibility f "
            "JOIN gateways g ON g.gateway_id = f.gateway_id"
        )
        params: tuple[object, ...] = ()
        if site_id is not None:
            sql += " WHERE g.site_id = ?"
            params = (site_id,)
        rows = self._conn.execute(sql + " ORDER BY f.gateway_id", params).fetchall()
        return [flexibility_record(gateway_id, seq, payload) for gateway_id, seq, payload in rows]

    # -- the Store protocol ---------------------------------------------------------------------

    async def schema_version(self) -> int:
        return await self._call(self._schema_version_sync)

    async def register_gateway(
        self, registration: Registration, stream: StreamRef, now_ns: int
    ) -> RegisterOutcome:
        return await self._call(self._register_sync, registration, stream, now_ns)

    async def touch_streams(self, streams: Sequence[StreamRef], now_ns: int) -> None:
        if streams:
            await self._call(self._touch_sync, list(streams), now_ns)

    async def close_stream(self, stream: StreamRef, now_ns: int) -> None:
        await self._call(self._close_stream_sync, stream, now_ns)

    async def commit_telemetry(self, rows: TelemetryRows, now_ns: int) -> CommitResult:
        if self._closed:
            raise StoreError("the store is closed")
        future: asyncio.Future[CommitResult] = asyncio.get_running_loop().create_future()
        self._queue.append(PendingCommit(rows, now_ns, future))
        self._dispatch()
        return await future

    async def gaps(
        self, *, site_id: str | None = None, gateway_id: str | None = None, limit: int = 100
    ) -> list[GapRecord]:
        return await self._call(self._gaps_sync, site_id, gateway_id, limit)

    def _gaps_sync(
        self, site_id: str | None, gateway_id: str | None, limit: int
    ) -> list[GapRecord]:
        where, params = [], []
        if gateway_id is not None:
            where.append("g.gateway_id = ?")
            params.append(gateway_id)
        if site_id is not None:
            where.append("w.site_id = ?")
            params.append(site_id)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = self._conn.execute(
            "SELECT g.gateway_id, g.seq, g.through_seq, g.what, g.records, g.points, g.bytes, "
            "g.first_time_ns, g.last_time_ns, g.reason, g.device_ids, g.received_at_ns "
            f"FROM gaps g JOIN gateways w ON w.gateway_id = g.gateway_id {clause} "
            "ORDER BY g.received_at_ns DESC, g.gateway_id, g.seq DESC LIMIT ?",
            (*params, limit),
        ).fetchall()
        return [
            GapRecord(
                gateway_id=row[0],
                first_seq=row[1],
                last_seq=row[2],
                what=row[3],
                records=row[4],
                points=row[5],
                bytes=row[6],
                first_time_ns=row[7],
                last_time_ns=row[8],
                reason=row[9],
                device_ids=tuple(filter(None, row[10].split(","))),
                received_at_ns=row[11],
            )
            for row in rows
        ]

    async def record_intent_delivery(
        self, gateway_id: str, site_id: str, version: int, now_ns: int
    ) -> None:
        await self._call(self._record_delivery_sync, gateway_id, site_id, version, now_ns)

    async def record_intent_ack(self, gateway_id: str, ack: IntentAckInfo, now_ns: int) -> None:
        await self._call(self._record_ack_sync, gateway_id, ack, now_ns)

    async def append_intent(
        self,
        site_id: str,
        compose: IntentComposer,
        now_ns: int,
        *,
        posted_by: str | None = None,
    ) -> StoredIntent:
        return await self._call(self._append_intent_sync, site_id, compose, now_ns, posted_by)

    async def get_intent(self, site_id: str, version: int | None = None) -> StoredIntent | None:
        return await self._call(self._get_intent_sync, site_id, version)

    async def list_intents(self, site_id: str, limit: int) -> list[StoredIntent]:
        return await self._call(self._list_intents_sync, site_id, limit)

    async def latest_intent_versions(self) -> dict[str, int]:
        return await self._call(self._latest_intent_versions_sync)

    async def intent_deliveries(
        self, site_id: str, versions: Sequence[int]
    ) -> list[IntentDeliveryRecord]:
        return await self._call(self._intent_deliveries_sync, site_id, list(versions))

    def _gateway_intent_acks_sync(
        self, gateway_id: str, limit: int
    ) -> list[tuple[str, IntentDeliveryRecord]]:
        rows = self._conn.execute(
            f"SELECT site_id, {INTENT_DELIVERY_COLUMNS} FROM intent_deliveries "
            "WHERE gateway_id = ? AND acked_at_ns IS NOT NULL "
            "ORDER BY acked_at_ns DESC, version DESC LIMIT ?",
            (gateway_id, limit),
        ).fetchall()
        return [(row[0], IntentDeliveryRecord(*row[1:])) for row in rows]

    async def gateway_intent_acks(
        self, gateway_id: str, limit: int
    ) -> list[tuple[str, IntentDeliveryRecord]]:
        return await self._call(self._gateway_intent_acks_sync, gateway_id, limit)

    async def latest_intent_statuses(
        self, site_id: str, versions: Sequence[int]
    ) -> list[IntentStatusRecord]:
        return await self._call(self._latest_intent_statuses_sync, site_id, list(versions))

    async def list_gateways(self, site_id: str | None = None) -> list[GatewayRecord]:
        return await self._call(self._list_gateways_sync, site_id)

    async def get_gateway(self, gateway_id: str) -> GatewayRecord | None:
        return await self._call(self._get_gateway_sync, gateway_id)

    async def list_sites(self) -> list[SiteRecord]:
        return await self._call(self._list_sites_sync)

    async def get_site(self, site_id: str) -> SiteRecord | None:
        return await self._call(self._get_site_sync, site_id)

    async def list_devices(self, site_id: str | None = None) -> list[DeviceRecord]:
        return await self._call(self._list_devices_sync, site_id)

    async def latest_points(
        self, *, site_id: str | None, device_id: str | None = None, point: str | None = None
    ) -> list[LatestPoint]:
        return await self._call(self._latest_points_sync, site_id, device_id, point)

    async def sample_status(self, site_id: str | None = None) -> list[SampleStatus]:
        return await self._call(self._sample_status_sync, site_id)

    async def point_history(self, query: HistoryQuery) -> HistoryPage:
        return await self._call(self._point_history_sync, query)

    async def event_responses(
        self, *, site_id: str | None, event_id: str | None, limit: int
    ) -> list[EventResponseRecord]:
        return await self._call(self._event_responses_sync, site_id, event_id, limit)

    async def latest_reported_states(self, site_id: str) -> list[ReportedStateRecord]:
        return await self._call(self._latest_reported_states_sync, site_id)

    async def latest_flexibility(self, site_id: str | None = None) -> list[FlexibilityRecord]:
        return await self._call(self._latest_flexibility_sync, site_id)

    # -- operator API tokens --------------------------------------------------------------------

    def _create_token_sync(self, token: ApiToken) -> None:
        try:
            with self._transaction() as tx:
                tx.execute(
                    f"INSERT INTO api_tokens ({_TOKEN_COLUMNS}) VALUES ({_placeholders(10)})",
                    (
                        token.token_id,
                        token.name,
                        token.secret_sha256,
                        token.role,
                        token.site_id,
                        token.created_at_ns,
                        token.created_by,
                        token.revoked_at_ns,
                        token.revoked_by,
                        token.last_used_at_ns,
                    ),
                )
        except sqlite3.IntegrityError:
            raise DuplicateTokenError(f"an API token with id {token.token_id!r} exists") from None

    def _get_token_sync(self, token_id: str) -> ApiToken | None:
        row = self._conn.execute(
            f"SELECT {_TOKEN_COLUMNS} FROM api_tokens WHERE token_id = ?", (token_id,)
        ).fetchone()
        return _token(row) if row is not None else None

    def _list_tokens_sync(self) -> list[ApiToken]:
        rows = self._conn.execute(
            f"SELECT {_TOKEN_COLUMNS} FROM api_tokens ORDER BY created_at_ns, token_id"
        ).fetchall()
        return [_token(row) for row in rows]

    def _revoke_token_sync(self, token_id: str, revoked_by: str, now_ns: int) -> ApiToken | None:
        with self._transaction() as tx:
            tx.execute(
                "UPDATE api_tokens SET revoked_at_ns = ?, revoked_by = ? "
                "WHERE token_id = ? AND revoked_at_ns IS NULL",
                (now_ns, revoked_by, token_id),
            )
        return self._get_token_sync(token_id)

    def _touch_token_sync(self, token_id: str, now_ns: int) -> None:
        with self._transaction() as tx:
            tx.execute(
                "UPDATE api_tokens SET last_used_at_ns = MAX(COALESCE(last_used_at_ns, 0), ?) "
                "WHERE token_id = ?",
                (now_ns, token_id),
            )

    async def create_token(self, token: ApiToken) -> None:
        await self._call(self._create_token_sync, token)

    async def get_token(self, token_id: str) -> ApiToken | None:
        return await self._call(self._get_token_sync, token_id)

    async def list_tokens(self) -> list[ApiToken]:
        return await self._call(self._list_tokens_sync)

    async def revoke_token(self, token_id: str, revoked_by: str, now_ns: int) -> ApiToken | None:
        return await self._call(self._revoke_token_sync, token_id, revoked_by, now_ns)

    async def touch_token(self, token_id: str, now_ns: int) -> None:
        await self._call(self._touch_token_sync, token_id, now_ns)

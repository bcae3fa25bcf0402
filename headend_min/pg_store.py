"""PostgreSQL implementation of `store.Store` (psycopg 3, async, with a connection pool).

Several headend instances may share one database: every piece of state lives here, and the
transactions that read-modify-write per-gateway or per-site state lock that row first (the
`gateways` row for telemetry commits and registers, `SELECT ... FOR UPDATE` of the `sites` row
for intent versions), so two instances serialize exactly where they must and nowhere else.

Telemetry is group-committed: batches that arrive while a commit is in flight queue up and go
together in ONE transaction on one pooled connection (up to `GROUP_MAX_BATCHES` /
`GROUP_MAX_RECORDS`), so thousands of gateways at a batch a second cost a few statements and one
commit per group, not ~5 round trips and a commit per batch. One group is in flight at a time, in
arrival order, so one gateway's batches commit in the order they were handed in, and each caller
gets its own CommitResult (as of its batch) only after the group's commit. The group first locks
its gateways' rows in gateway_id order (`SELECT ... ORDER BY gateway_id FOR UPDATE`): commits of
one gateway serialize across headend instances, and two instances' groups cannot deadlock.
Samples of the whole group go in by one binary COPY, several times faster than row inserts.
When a batch overlaps what is committed for its gateway (a resend after lost acks), the seqs
already stored are read first and only the others are copied - the same result as `ON CONFLICT
DO NOTHING`, exactly, since the row lock keeps any other writer of that gateway out. Should COPY
still meet a duplicate (a row no committed range accounts for), the group is retried on a
pipelined `INSERT ... ON CONFLICT DO NOTHING` path, so a replay can never wedge a gateway. If a
group fails for its data (a constraint), it is retried in halves down to the failing batch, so
only that batch gets the error; a connection or pool failure fails the whole group at once. The
latest values are one packed row per device (newest seq wins per point): a device read once with
the points it had replaces its row in one conditional upsert for the whole group, and only the
others are read, merged here and written back in one more query and upsert each; the sample
status upsert sends all its rows (collapsed per key, newest seq first) as one JSON
parameter (an array of arrays): one statement per table per group.
`synchronous_commit` is left at the server's setting (on), so a commit - and the ack that
follows it - survives a database crash.

Pool connections run in autocommit; reads are single statements, writes use explicit
transactions. A connection that broke while idle (database restart, failover) is detected when
taken from the pool and replaced, so an outage costs the operations that ran during it, nothing
after. The schema is versioned in `schema_migrations` (see `pg_schema`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from collections.abc import AsyncIterator, Sequence
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool

from dergw.v1 import ns_from_timestamp, pb
from headend_min.ingest import (
    flexibility_record,
    merge_latest_points,
    pack_latest_reads,
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
    LatestPointRow,
    Nameplate,
    PointInfo,
    RegisterOutcome,
    Registration,
    ReportedStateRecord,
    SampleRow,
    SampleStatus,
    SampleStatusRow,
    SiteInfo,
    SiteRecord,
    StoredIntent,
    StreamRef,
    TelemetryRows,
)
from headend_min.pg_schema import migrate
from headend_min.seqranges import SeqRanges, absorb
from headend_min.store import (
    DuplicateTokenError,
    IntentComposer,
    PendingCommit,
    StoreError,
    UnknownSiteError,
    commit_row_count,
    own_error,
)

__all__ = [
    "GROUP_MAX_BATCHES",
    "GROUP_MAX_RECORDS",
    "INTENT_CHANNEL",
    "PgStore",
    "PooledStore",
    "describe_url",
    "open_pool",
]

_log = logging.getLogger(__name__)

# LISTEN/NOTIFY channel of new intent versions; payload '<site_id>:<version>' (see pg_notify).
INTENT_CHANNEL = "dergw_intent"

_Conn = psycopg.AsyncConnection[tuple[Any, ...]]

_GATEWAY_COLUMNS = (
    "gateway_id, site_id, software_version, boot_id, registered_at_ns, stream_open, "
    "connected_since_ns, last_seen_ns, intent_version, committed_seq, oldest_unacked_seq, next_seq"
)
_SITE_COLUMNS = "site_id, name, substation, feeder, export_limit_w, import_limit_w, updated_at_ns"
_DEVICE_COLUMNS = (
    "gateway_id, device_id, kind, protocol, address, manufacturer, model, serial_number, role, "
    "max_w, max_va, max_var, max_charge_w, max_discharge_w, energy_wh, points_json"
)
_SAMPLE_COLUMNS = (
    "gateway_id, seq, device_id, time_ns, payload, boot_id, monotonic_ns, clock_synced"
)
_STATUS_COLUMNS = "gateway_id, device_id, time_ns, seq, ok, error"
_LATEST_COLUMNS = "gateway_id, device_id, names, max_seq, points"
_LATEST_TYPES = ("text", "text", "text", "int8", "text")
_STATUS_TYPES = ("text", "text", "int8", "int8", "int2", "text")
_SAMPLE_COPY_TYPES = ("text", "int8", "text", "int8", "bytea", "text", "int8", "int2")

# Bounds of one group commit: enough to absorb thousands of gateways per commit, small enough that
# a group's statements take well under a second (the ack latency the fleet budget allows).
GROUP_MAX_BATCHES = 2000
GROUP_MAX_RECORDS = 20_000


def describe_url(url: str) -> str:
    """`host:port/dbname` of a connection URL, for messages (never the password)."""
    try:
        params = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "PostgreSQL (unparsable URL)"
    host = str(params.get("host") or params.get("hostaddr") or "localhost")
    port = str(params.get("port") or 5432)
    return f"PostgreSQL {host}:{port}/{params.get('dbname') or params.get('user') or ''}"


def _placeholders(count: int) -> str:
    return ", ".join(["%s"] * count)


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


def _overlaps(first: int, last: int, watermark: int, ranges: Sequence[tuple[int, int]]) -> bool:
    """Whether any seq of first..last is already committed (or settled) for the gateway."""
    if first <= watermark:
        return True
    return any(first <= r_last and r_first <= last for r_first, r_last in ranges)


def _json_rows(rows: Sequence[Sequence[object]]) -> str:
    """Rows as one JSON array of arrays, read back by `_json_select`: one parameter for many
    rows, which PostgreSQL parses far faster than psycopg adapts per-column arrays (and which
    json.dumps writes ~4x faster than one object per row). Values are str, int, float (finite:
    NaN is None already) or None, all exact in JSON."""
    return json.dumps(rows)


def _json_select(types: Sequence[str]) -> str:
    """The SELECT list of `_json_rows` rows (`FROM json_array_elements(...) e`), in order."""
    return ", ".join(f"(e->>{index})::{name}" for index, name in enumerate(types))


def _device_key(row: SampleStatusRow) -> tuple[str, str]:
    return (row.gateway_id, row.device_id)


class _DuplicateOnCopyError(Exception):
    """COPY met a row already stored: the caller retries the group on the ON CONFLICT path."""


def _data_fault(exc: BaseException) -> bool:
    """Whether a failed group may be the fault of one batch's rows (retry them one by one), not
    of the connection, the pool or the server (fail them all at once, fast)."""
    cause = exc.__cause__ if isinstance(exc, StoreError) else exc
    if isinstance(cause, psycopg.Error):
        return not isinstance(cause, psycopg.OperationalError | psycopg.InterfaceError)
    return not isinstance(exc, StoreError)


def _newest_by_key(rows: Sequence[Any], key: Any) -> list[Any]:
    """One row per key - the newest seq, the first of equal seqs, as upserts applied one after
    another in this order keep - sorted by key, so two transactions cannot deadlock on them."""
    newest: dict[Any, Any] = {}
    for row in rows:
        k = key(row)
        kept = newest.get(k)
        if kept is None or row.seq > kept.seq:
            newest[k] = row
    return [newest[k] for k in sorted(newest)]


async def open_pool(
    url: str, *, name: str, min_size: int, max_size: int, timeout_s: float
) -> AsyncConnectionPool[_Conn]:
    """An open connection pool to `url` (StoreError when the database cannot be reached).

    `timeout_s` bounds how long an operation waits for a pool connection: while the database is
    unreachable, store calls fail with StoreError after that long instead of piling up.
    """
    pool: AsyncConnectionPool[_Conn] = AsyncConnectionPool(
        url,
        kwargs={"autocommit": True, "connect_timeout": max(1, round(timeout_s))},
        min_size=min_size,
        max_size=max_size,
        timeout=timeout_s,
        # A pooled connection that died while idle (database restart) is replaced before use
        # instead of failing the operation that drew it.
        check=AsyncConnectionPool.check_connection,
        # The pool retries a lost connection with exponential backoff until this timeout, then
        # gives the slot up and grows again on the next demand with a fresh attempt. A short
        # timeout keeps the backoff short, so once the database is back the next operation
        # connects within ~2 s, however long the outage was.
        reconnect_timeout=2.0,
        name=name,
        open=False,
    )
    try:
        await pool.open(wait=True, timeout=timeout_s + 5.0)
    except psycopg.Error as exc:
        await pool.close()
        raise StoreError(f"cannot open a connection pool to {describe_url(url)}: {exc}") from exc
    return pool


class PooledStore:
    """Connection plumbing of the headend's PostgreSQL stores: database errors become
    StoreError naming the database (never its password)."""

    def __init__(self, url: str, pool: AsyncConnectionPool[_Conn]) -> None:
        self._url = url
        self._pool = pool
        self._where = describe_url(url)
        self._closed = False

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._pool.close()

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[_Conn]:
        if self._closed:
            raise StoreError("the store is closed")
        try:
            async with self._pool.connection() as conn:
                yield conn
        except psycopg.Error as exc:
            raise StoreError(f"{self._where}: {exc}") from exc

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[_Conn]:
        async with self._connection() as conn, conn.transaction():
            yield conn

    async def _fetchall(self, query: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        async with self._connection() as conn:
            cursor = await conn.execute(query, params)
            return await cursor.fetchall()

    async def _fetchone(self, query: str, params: Sequence[object] = ()) -> tuple[Any, ...] | None:
        async with self._connection() as conn:
            cursor = await conn.execute(query, params)
            return await cursor.fetchone()

    async def _execute(self, query: str, params: Sequence[object] = ()) -> int:
        """Run one statement; the number of rows it affected."""
        async with self._connection() as conn:
            cursor = await conn.execute(query, params)
            return cursor.rowcount


class PgStore(PooledStore):
    """`Store` on PostgreSQL; construct with `await PgStore.open(url)`."""

    def __init__(self, url: str, pool: AsyncConnectionPool[_Conn]) -> None:
        super().__init__(url, pool)
        self._commits: deque[PendingCommit] = deque()  # telemetry batches waiting, in arrival order
        self._committer: asyncio.Task[None] | None = None  # commits them, a group at a time

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        min_size: int = 2,
        max_size: int = 10,
        timeout_s: float = 5.0,
    ) -> PgStore:
        """Connect, migrate (under an advisory lock) and open the pool.

        `timeout_s` bounds how long an operation waits for a pool connection: while the
        database is unreachable, store calls fail with StoreError after that long (the link then
        ends the gateway's session, the API answers 503) instead of piling up.
        """
        where = describe_url(url)
        try:
            conn = await psycopg.AsyncConnection.connect(
                url, autocommit=True, connect_timeout=max(1, round(timeout_s))
            )
        except psycopg.Error as exc:
            raise StoreError(f"cannot connect to {where}: {exc}") from exc
        try:
            async with conn:
                await migrate(conn)
        except psycopg.Error as exc:
            raise StoreError(f"cannot migrate {where}: {exc}") from exc
        pool = await open_pool(
            url, name="dergw-headend", min_size=min_size, max_size=max_size, timeout_s=timeout_s
        )
        return cls(url, pool)

    @property
    def url(self) -> str:
        return self._url

    async def notify_intent(self, site_id: str, version: int) -> None:
        """NOTIFY every instance's listener (pg_notify) that `site_id` has `version`."""
        async with self._connection() as conn:
            await conn.execute("SELECT pg_notify(%s, %s)", (INTENT_CHANNEL, f"{site_id}:{version}"))

    async def latest_intent_versions_of(self, site_ids: Sequence[str]) -> dict[str, int]:
        """site_id -> latest version, for the given sites that have one."""
        if not site_ids:
            return {}
        rows = await self._fetchall(
            "SELECT site_id, MAX(version) FROM intents WHERE site_id = ANY(%s) GROUP BY site_id",
            (list(site_ids),),
        )
        return {site_id: int(version) for site_id, version in rows}

    # -- the Store protocol: gateway link -------------------------------------------------------

    async def schema_version(self) -> int:
        row = await self._fetchone("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
        return int(row[0]) if row is not None else 0

    async def register_gateway(
        self, registration: Registration, stream: StreamRef, now_ns: int
    ) -> RegisterOutcome:
        site = registration.site
        gateway_id = registration.gateway_id
        async with self._transaction() as tx:
            await tx.execute(
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
            await tx.execute(
                "INSERT INTO gateways (gateway_id, site_id, software_version, boot_id, "
                "registered_at_ns, stream_id, stream_open, connected_since_ns, last_seen_ns, "
                "intent_version, oldest_unacked_seq, next_seq) "
                "VALUES (%s, %s, %s, %s, %s, %s, TRUE, %s, %s, %s, %s, %s) "
                "ON CONFLICT (gateway_id) DO UPDATE SET site_id = excluded.site_id, "
                "software_version = excluded.software_version, boot_id = excluded.boot_id, "
                "registered_at_ns = excluded.registered_at_ns, stream_id = excluded.stream_id, "
                "stream_open = TRUE, connected_since_ns = excluded.connected_since_ns, "
                "last_seen_ns = excluded.last_seen_ns, intent_version = excluded.intent_version, "
                "oldest_unacked_seq = excluded.oldest_unacked_seq, next_seq = excluded.next_seq",
                (
                    gateway_id,
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
            await tx.execute("DELETE FROM devices WHERE gateway_id = %s", (gateway_id,))
            if registration.devices:
                async with tx.cursor() as cursor:
                    await cursor.executemany(
                        f"INSERT INTO devices ({_DEVICE_COLUMNS}) VALUES ({_placeholders(16)})",
                        [_device_row(gateway_id, device) for device in registration.devices],
                    )
            # Seqs below what the gateway still holds were acked and deleted there: they count
            # as committed, so a hole left by an ack that reached the gateway just before a
            # crash here never stalls the watermark.
            settled_below = registration.oldest_unacked_seq or registration.next_seq
            settled = [(1, settled_below - 1)] if settled_below > 1 else []
            committed = await self._absorb_ranges(tx, gateway_id, settled, lock=True)
            cursor = await tx.execute(
                "SELECT COALESCE(MAX(version), 0) FROM intents WHERE site_id = %s",
                (site.site_id,),
            )
            row = await cursor.fetchone()
        return RegisterOutcome(
            committed_seq=committed.committed_seq,
            site_intent_version=int(row[0]) if row is not None else 0,
            committed_ranges=committed.committed_ranges,
        )

    @staticmethod
    async def _read_ranges(
        tx: _Conn, gateway_id: str, *, lock: bool
    ) -> tuple[int, tuple[tuple[int, int], ...]] | None:
        """The gateway's watermark and ranges; None for an unknown gateway.

        `lock` takes the gateway row FOR UPDATE: commits of one gateway (two streams, possibly
        on two instances) then serialize, and their read-modify-write of the ranges is safe.
        """
        cursor = await tx.execute(
            "SELECT committed_seq FROM gateways WHERE gateway_id = %s"
            + (" FOR UPDATE" if lock else ""),
            (gateway_id,),
        )
        row = await cursor.fetchone()
        if row is None:
            return None
        return int(row[0]), await PgStore._ranges(tx, gateway_id)

    @staticmethod
    async def _ranges(tx: _Conn, gateway_id: str) -> tuple[tuple[int, int], ...]:
        cursor = await tx.execute(
            "SELECT first_seq, last_seq FROM committed_ranges WHERE gateway_id = %s "
            "ORDER BY first_seq",
            (gateway_id,),
        )
        return tuple((int(first), int(last)) for first, last in await cursor.fetchall())

    async def _absorb_ranges(
        self,
        tx: _Conn,
        gateway_id: str,
        new: Sequence[tuple[int, int]],
        *,
        lock: bool,
        known: tuple[int, tuple[tuple[int, int], ...]] | None = None,
    ) -> CommitResult:
        """Fold `new` into the gateway's watermark and ranges (inside the caller's transaction)."""
        current = known if known is not None else await self._read_ranges(tx, gateway_id, lock=lock)
        watermark, ranges = current if current is not None else (0, ())
        if not new:
            return CommitResult(watermark, ranges)
        new_watermark, new_ranges = absorb(watermark, ranges, new)
        if new_watermark != watermark:
            await tx.execute(
                "UPDATE gateways SET committed_seq = %s WHERE gateway_id = %s",
                (new_watermark, gateway_id),
            )
        if new_ranges != ranges:
            await tx.execute("DELETE FROM committed_ranges WHERE gateway_id = %s", (gateway_id,))
            if new_ranges:
                async with tx.cursor() as cursor:
                    await cursor.executemany(
                        "INSERT INTO committed_ranges (gateway_id, first_seq, last_seq) "
                        "VALUES (%s, %s, %s)",
                        [(gateway_id, first, last) for first, last in new_ranges],
                    )
        return CommitResult(new_watermark, new_ranges)

    async def touch_streams(self, streams: Sequence[StreamRef], now_ns: int) -> None:
        if not streams:
            return
        async with self._transaction() as tx, tx.cursor() as cursor:
            await cursor.executemany(
                "UPDATE gateways SET last_seen_ns = %s "
                "WHERE gateway_id = %s AND stream_id = %s AND stream_open",
                # In gateway_id order, as group commits lock them: no deadlock between the two.
                sorted((now_ns, s.gateway_id, s.stream_id) for s in streams),
            )

    async def close_stream(self, stream: StreamRef, now_ns: int) -> None:
        async with self._transaction() as tx:
            await tx.execute(
                "UPDATE gateways SET stream_open = FALSE, last_seen_ns = %s "
                "WHERE gateway_id = %s AND stream_id = %s",
                (now_ns, stream.gateway_id, stream.stream_id),
            )

    async def commit_telemetry(self, rows: TelemetryRows, now_ns: int) -> CommitResult:
        if self._closed:
            raise StoreError("the store is closed")
        future: asyncio.Future[CommitResult] = asyncio.get_running_loop().create_future()
        self._commits.append(PendingCommit(rows, now_ns, future))
        if self._committer is None:
            self._committer = asyncio.create_task(self._commit_groups(), name="pg-group-commit")
        return await future

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True  # refuses new commits; the queued ones still commit, then the pool
        if self._committer is not None:
            await asyncio.wait([self._committer])
        await self._pool.close()

    async def _commit_groups(self) -> None:
        """Commit queued batches a group at a time until none is left (the one committer)."""
        try:
            while self._commits:
                group = self._take_group()
                if not group:
                    continue
                try:
                    outcomes = await self._commit_group(group)
                except BaseException as exc:  # cancelled (loop shutting down): answer, then go
                    for commit in group:
                        if not commit.future.done():
                            commit.future.set_exception(StoreError(f"commit interrupted: {exc!r}"))
                    raise
                delivered: set[int] = set()
                for commit, outcome in zip(group, outcomes, strict=True):
                    if commit.future.done():
                        continue
                    if isinstance(outcome, BaseException):
                        commit.future.set_exception(own_error(outcome, delivered))
                    else:
                        commit.future.set_result(outcome)
        finally:
            self._committer = None

    def _take_group(self) -> list[PendingCommit]:
        group: list[PendingCommit] = []
        rows = 0
        while self._commits and len(group) < GROUP_MAX_BATCHES and rows < GROUP_MAX_RECORDS:
            commit = self._commits.popleft()
            if commit.future.done():  # cancelled before it started: never committed, never acked
                continue
            group.append(commit)
            rows += commit_row_count(commit.rows)
        return group

    async def _commit_group(
        self, group: Sequence[PendingCommit]
    ) -> list[CommitResult | BaseException]:
        """Commit `group` in one transaction; one outcome per batch, in order."""
        try:
            try:
                return list(await self._write_group(group, allow_copy=True))
            except _DuplicateOnCopyError:
                _log.warning(
                    "a group of %d telemetry batches (gateways %s) met seqs stored without a "
                    "committed range; retrying without COPY",
                    len(group),
                    ", ".join(sorted({c.rows.gateway_id for c in group})[:5]),
                )
                return list(await self._write_group(group, allow_copy=False))
        except Exception as exc:
            if len(group) == 1 or not _data_fault(exc):
                return [exc] * len(group)
            _log.warning(
                "a group of %d telemetry batches failed (%s); committing it in halves",
                len(group),
                exc,
            )
        # Halves, in order, until the failing batch is alone: one bad batch among n costs about
        # 2 log2(n) transactions, not n.
        middle = len(group) // 2
        return [
            *await self._commit_group(group[:middle]),
            *await self._commit_group(group[middle:]),
        ]

    async def _write_group(
        self, group: Sequence[PendingCommit], *, allow_copy: bool
    ) -> list[CommitResult]:
        """Write the batches of `group` in one transaction; what is committed for each batch's
        gateway as of that batch, as if they were committed one after another."""
        gateway_ids = sorted({c.rows.gateway_id for c in group})
        async with self._transaction() as tx:
            stored = await self._lock_gateways(tx, gateway_ids)
            current = dict(stored)
            results: list[CommitResult] = []
            copied: list[SampleRow] = []
            copied_keys: set[tuple[str, int]] = set()
            inserted: list[SampleRow] = []
            for commit in group:
                rows = commit.rows
                gateway_id = rows.gateway_id
                watermark, ranges = current[gateway_id]
                has_range = rows.last_seq >= rows.first_seq >= 1
                if rows.samples:
                    if not allow_copy:
                        inserted += rows.samples
                    elif has_range and not _overlaps(
                        rows.first_seq, rows.last_seq, watermark, ranges
                    ):
                        copied += rows.samples
                        copied_keys.update((gateway_id, row.seq) for row in rows.samples)
                    else:
                        # A resend overlapping what is committed (or copied earlier in this
                        # group): COPY only the rows not stored yet (nothing else can insert
                        # them: the gateway row is locked).
                        for row in await self._unstored_samples(tx, rows):
                            if (gateway_id, row.seq) not in copied_keys:
                                copied.append(row)
                                copied_keys.add((gateway_id, row.seq))
                if has_range:
                    watermark, ranges = absorb(watermark, ranges, [(rows.first_seq, rows.last_seq)])
                    current[gateway_id] = (watermark, ranges)
                results.append(CommitResult(watermark, ranges))
            try:
                await self._copy_samples(tx, copied)
            except psycopg.errors.UniqueViolation as exc:
                raise _DuplicateOnCopyError from exc
            await self._insert_samples(tx, inserted)
            await self._insert_other_rows(tx, group)
            await self._store_committed(tx, group, stored, current)
        return results

    @staticmethod
    async def _lock_gateways(
        tx: _Conn, gateway_ids: Sequence[str]
    ) -> dict[str, tuple[int, SeqRanges]]:
        """Lock the gateways' rows, in gateway_id order; their watermarks and ranges (an unknown
        gateway: 0 and whatever ranges are stored for it)."""
        cursor = await tx.execute(
            "SELECT gateway_id, committed_seq FROM gateways WHERE gateway_id = ANY(%s) "
            "ORDER BY gateway_id FOR UPDATE",
            (list(gateway_ids),),
        )
        watermarks = {gateway_id: int(seq) for gateway_id, seq in await cursor.fetchall()}
        cursor = await tx.execute(
            "SELECT gateway_id, first_seq, last_seq FROM committed_ranges "
            "WHERE gateway_id = ANY(%s) ORDER BY gateway_id, first_seq",
            (list(gateway_ids),),
        )
        ranges: dict[str, list[tuple[int, int]]] = {}
        for gateway_id, first, last in await cursor.fetchall():
            ranges.setdefault(gateway_id, []).append((int(first), int(last)))
        return {
            gateway_id: (watermarks.get(gateway_id, 0), tuple(ranges.get(gateway_id, ())))
            for gateway_id in gateway_ids
        }

    @staticmethod
    async def _store_committed(
        tx: _Conn,
        group: Sequence[PendingCommit],
        stored: dict[str, tuple[int, SeqRanges]],
        current: dict[str, tuple[int, SeqRanges]],
    ) -> None:
        """Each gateway's last-seen time (its last batch's) and final watermark and ranges."""
        seen = {c.rows.gateway_id: c.now_ns for c in group}
        gateway_ids = sorted(seen)
        await tx.execute(
            "UPDATE gateways g SET last_seen_ns = v.seen, committed_seq = v.committed "
            "FROM unnest(%s::text[], %s::int8[], %s::int8[]) AS v(gateway_id, seen, committed) "
            "WHERE g.gateway_id = v.gateway_id",
            (
                gateway_ids,
                [seen[gateway_id] for gateway_id in gateway_ids],
                [current[gateway_id][0] for gateway_id in gateway_ids],
            ),
        )
        changed = [g for g in gateway_ids if current[g][1] != stored[g][1]]
        if not changed:
            return
        await tx.execute("DELETE FROM committed_ranges WHERE gateway_id = ANY(%s)", (changed,))
        ranges = [(g, first, last) for g in changed for first, last in current[g][1]]
        if ranges:
            await tx.execute(
                "INSERT INTO committed_ranges (gateway_id, first_seq, last_seq) "
                "SELECT * FROM unnest(%s::text[], %s::int8[], %s::int8[])",
                tuple(map(list, zip(*ranges, strict=True))),
            )

    @staticmethod
    async def _unstored_samples(tx: _Conn, rows: TelemetryRows) -> list[SampleRow]:
        seqs = [row.seq for row in rows.samples]
        cursor = await tx.execute(
            "SELECT seq FROM samples WHERE gateway_id = %s AND seq BETWEEN %s AND %s",
            (rows.gateway_id, min(seqs), max(seqs)),
        )
        stored = {seq for (seq,) in await cursor.fetchall()}
        return [row for row in rows.samples if row.seq not in stored]

    @staticmethod
    async def _copy_samples(tx: _Conn, samples: Sequence[SampleRow]) -> None:
        if not samples:
            return
        async with (
            tx.cursor() as cursor,
            cursor.copy(f"COPY samples ({_SAMPLE_COLUMNS}) FROM STDIN (FORMAT BINARY)") as copy,
        ):
            copy.set_types(list(_SAMPLE_COPY_TYPES))
            for row in samples:
                await copy.write_row(row)

    @staticmethod
    async def _insert_samples(tx: _Conn, samples: Sequence[SampleRow]) -> None:
        if not samples:
            return
        async with tx.cursor() as cursor:
            await cursor.executemany(
                f"INSERT INTO samples ({_SAMPLE_COLUMNS}) VALUES ({_placeholders(8)}) "
                "ON CONFLICT DO NOTHING",
                samples,
            )

    @staticmethod
    async def _write_latest(tx: _Conn, latest: Sequence[LatestPointRow]) -> None:
        """Fold the group's point rows into the packed latest rows of their devices.

        Per point the newest seq wins, so a partial read keeps the other points and a replayed
        older batch cannot roll a value back. A device the group read once replaces its pack in
        one conditional upsert when the stored pack has the same points, all older (the steady
        state: no read back); every other device's pack is read, merged here and written back.
        The group holds its gateways' row locks, so nobody writes these rows in between.
        """
        reads, others = pack_latest_reads(latest)
        if reads:
            cursor = await tx.execute(
                f"INSERT INTO latest_values ({_LATEST_COLUMNS}) "
                f"SELECT {_json_select(_LATEST_TYPES)} FROM json_array_elements(%s::json) e "
                "ON CONFLICT (gateway_id, device_id) DO UPDATE SET names = excluded.names, "
                "max_seq = excluded.max_seq, points = excluded.points "
                "WHERE latest_values.names = excluded.names "
                "AND latest_values.max_seq < excluded.max_seq "
                "RETURNING gateway_id, device_id",
                (_json_rows(reads),),
            )
            written = set(await cursor.fetchall())
            others.update(key for key in ((g, d) for g, d, *_ in reads) if key not in written)
        if not others:
            return
        rows = [row for row in latest if (row[0], row[1]) in others]
        cursor = await tx.execute(
            f"SELECT {_LATEST_COLUMNS} FROM latest_values WHERE gateway_id = ANY(%s)",
            (sorted({gateway_id for gateway_id, _ in others}),),
        )
        stored = {(row[0], row[1]): row[2:] for row in await cursor.fetchall()}
        await tx.execute(
            f"INSERT INTO latest_values ({_LATEST_COLUMNS}) "
            f"SELECT {_json_select(_LATEST_TYPES)} FROM json_array_elements(%s::json) e "
            "ON CONFLICT (gateway_id, device_id) DO UPDATE SET names = excluded.names, "
            "max_seq = excluded.max_seq, points = excluded.points",
            (_json_rows(merge_latest_points(rows, stored)),),
        )

    @staticmethod
    async def _insert_other_rows(tx: _Conn, group: Sequence[PendingCommit]) -> None:
        # Every table is keyed by (gateway_id, seq); a replayed record is ignored. The two
        # upserts that run on every batch take all the group's rows in one statement, one row
        # per key (one statement cannot update a row twice) in key order, so that two
        # transactions touching the same rows cannot deadlock.
        latest = [row for c in group for row in c.rows.latest_points]
        if latest:
            await PgStore._write_latest(tx, latest)
        status = _newest_by_key([row for c in group for row in c.rows.sample_status], _device_key)
        if status:
            await tx.execute(
                f"INSERT INTO sample_status ({_STATUS_COLUMNS}) "
                f"SELECT {_json_select(_STATUS_TYPES)} FROM json_array_elements(%s::json) e "
                "ON CONFLICT (gateway_id, device_id) DO UPDATE SET "
                "time_ns = excluded.time_ns, seq = excluded.seq, ok = excluded.ok, "
                "error = excluded.error WHERE excluded.seq > sample_status.seq",
                (_json_rows(status),),
            )
        async with tx.cursor() as cursor:
            for statement, rows in (
                (
                    "INSERT INTO event_responses (gateway_id, seq, intent_version, event_id, "
                    "status, reason, time_ns, effective_start_ns, effective_end_ns) "
                    f"VALUES ({_placeholders(9)}) ON CONFLICT DO NOTHING",
                    [row for c in group for row in c.rows.event_responses],
                ),
                (
                    "INSERT INTO intent_statuses (gateway_id, seq, version, state, reason, "
                    f"time_ns, active_event_id) VALUES ({_placeholders(7)}) "
                    "ON CONFLICT DO NOTHING",
                    [row for c in group for row in c.rows.intent_statuses],
                ),
                (
                    "INSERT INTO reported_states (gateway_id, seq, time_ns, intent_version, "
                    f"active_event_id, source, payload) VALUES ({_placeholders(7)}) "
                    "ON CONFLICT DO NOTHING",
                    [row for c in group for row in c.rows.reported_states],
                ),
                (
                    "INSERT INTO decisions (gateway_id, seq, time_ns, summary, payload) "
                    f"VALUES ({_placeholders(5)}) ON CONFLICT DO NOTHING",
                    [row for c in group for row in c.rows.decisions],
                ),
                (
                    "INSERT INTO flexibility (gateway_id, seq, time_ns, up_w, down_w, payload) "
                    f"VALUES ({_placeholders(6)}) ON CONFLICT DO NOTHING",
                    [row for c in group for row in c.rows.flexibility],
                ),
                (
                    # Newest seq wins, so a replayed older batch cannot roll the report back.
                    "INSERT INTO latest_flexibility (gateway_id, seq, time_ns, up_w, down_w, "
                    f"payload) VALUES ({_placeholders(6)}) ON CONFLICT (gateway_id) DO UPDATE "
                    "SET seq = excluded.seq, time_ns = excluded.time_ns, up_w = excluded.up_w, "
                    "down_w = excluded.down_w, payload = excluded.payload "
                    "WHERE excluded.seq > latest_flexibility.seq",
                    _newest_by_key(
                        [row for c in group for row in c.rows.flexibility],
                        lambda row: row.gateway_id,
                    ),
                ),
                (
                    "INSERT INTO unknown_records (gateway_id, seq, payload) VALUES (%s, %s, %s) "
                    "ON CONFLICT DO NOTHING",
                    [row for c in group for row in c.rows.unknown],
                ),
                (
                    "INSERT INTO gaps (gateway_id, seq, through_seq, what, records, points, "
                    "bytes, first_time_ns, last_time_ns, reason, device_ids, received_at_ns) "
                    f"VALUES ({_placeholders(12)}) ON CONFLICT DO NOTHING",
                    [(*gap, c.now_ns) for c in group for gap in c.rows.gaps],
                ),
                (
                    "INSERT INTO clock_syncs (gateway_id, seq, boot_id, wall_minus_mono_ns, "
                    "time_ns) VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                    [row for c in group for row in c.rows.clock_syncs],
                ),
            ):
                if rows:
                    await cursor.executemany(statement, rows)
            # Samples stamped before their boot's clock was synced get their true time
            # (monotonic + the offset measured at the boot's first sync), whichever of the two
            # came first. Once per gateway, after every row of the group is in.
            unsynced = sorted(
                {
                    c.rows.gateway_id
                    for c in group
                    if c.rows.clock_syncs
                    or any(not sample.clock_synced for sample in c.rows.samples)
                }
            )
            if unsynced:
                await cursor.executemany(
                    "UPDATE samples s SET clock_synced = 1, "
                    "time_ns = s.monotonic_ns + c.wall_minus_mono_ns FROM ("
                    "SELECT DISTINCT ON (boot_id) boot_id, wall_minus_mono_ns FROM clock_syncs "
                    "WHERE gateway_id = %s ORDER BY boot_id, seq) c "
                    "WHERE s.gateway_id = %s AND s.clock_synced = 0 AND c.boot_id = s.boot_id",
                    [(gateway_id, gateway_id) for gateway_id in unsynced],
                )

    async def record_intent_delivery(
        self, gateway_id: str, site_id: str, version: int, now_ns: int
    ) -> None:
        async with self._transaction() as tx:
            await tx.execute(
                "INSERT INTO intent_deliveries (gateway_id, site_id, version, delivered_at_ns) "
                "VALUES (%s, %s, %s, %s) ON CONFLICT (gateway_id, site_id, version) DO UPDATE SET "
                "delivered_at_ns = COALESCE(intent_deliveries.delivered_at_ns, "
                "excluded.delivered_at_ns)",
                (gateway_id, site_id, version, now_ns),
            )

    async def record_intent_ack(self, gateway_id: str, ack: IntentAckInfo, now_ns: int) -> None:
        async with self._transaction() as tx:
            await tx.execute(
                "INSERT INTO intent_deliveries (gateway_id, site_id, version, ack_status, "
                "ack_reason, acked_at_ns) VALUES (%s, %s, %s, %s, %s, %s) "
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
                await tx.execute(
                    "UPDATE gateways SET intent_version = GREATEST(intent_version, %s), "
                    "last_seen_ns = %s WHERE gateway_id = %s",
                    (ack.version, now_ns, gateway_id),
                )
            else:
                await tx.execute(
                    "UPDATE gateways SET last_seen_ns = %s WHERE gateway_id = %s",
                    (now_ns, gateway_id),
                )

    # -- the Store protocol: desired state ------------------------------------------------------

    async def append_intent(
        self,
        site_id: str,
        compose: IntentComposer,
        now_ns: int,
        *,
        posted_by: str | None = None,
    ) -> StoredIntent:
        async with self._transaction() as tx:
            # The site row lock serializes version allocation across headend instances.
            cursor = await tx.execute(
                "SELECT 1 FROM sites WHERE site_id = %s FOR UPDATE", (site_id,)
            )
            if await cursor.fetchone() is None:
                raise UnknownSiteError(site_id)
            cursor = await tx.execute(
                "SELECT version, document FROM intents WHERE site_id = %s "
                "ORDER BY version DESC LIMIT 1",
                (site_id,),
            )
            row = await cursor.fetchone()
            previous = pb.IntentDocument.FromString(row[1]) if row is not None else None
            next_version = (int(row[0]) if row is not None else 0) + 1
            cursor = await tx.execute(
                "SELECT d.device_id FROM devices d JOIN gateways g "
                "ON g.gateway_id = d.gateway_id WHERE g.site_id = %s",
                (site_id,),
            )
            device_ids = frozenset(device_id for (device_id,) in await cursor.fetchall())
            document = compose(IntentBasis(site_id, previous, next_version, device_ids))
            if document.version != next_version or document.site_id != site_id:
                raise StoreError(
                    f"composer returned {document.site_id!r} v{document.version}, "
                    f"expected {site_id!r} v{next_version}"
                )
            issued_at_ns = ns_from_timestamp(document.issued_at) or now_ns
            await tx.execute(
                "INSERT INTO intents (site_id, version, issued_at_ns, document, posted_by) "
                "VALUES (%s, %s, %s, %s, %s)",
                (site_id, next_version, issued_at_ns, document.SerializeToString(), posted_by),
            )
            # Delivered at commit, to every instance's listener (pg_notify): the wake-up cannot
            # be lost to a crash between this commit and the caller's Notifier.publish.
            await tx.execute(
                "SELECT pg_notify(%s, %s)", (INTENT_CHANNEL, f"{site_id}:{next_version}")
            )
        return StoredIntent(site_id, next_version, issued_at_ns, document, posted_by)

    async def get_intent(self, site_id: str, version: int | None = None) -> StoredIntent | None:
        if version is None:
            row = await self._fetchone(
                f"SELECT {_INTENT_COLUMNS} FROM intents "
                "WHERE site_id = %s ORDER BY version DESC LIMIT 1",
                (site_id,),
            )
        else:
            row = await self._fetchone(
                f"SELECT {_INTENT_COLUMNS} FROM intents WHERE site_id = %s AND version = %s",
                (site_id, version),
            )
        return _intent(row) if row is not None else None

    async def list_intents(self, site_id: str, limit: int) -> list[StoredIntent]:
        rows = await self._fetchall(
            f"SELECT {_INTENT_COLUMNS} FROM intents "
            "WHERE site_id = %s ORDER BY version DESC LIMIT %s",
            (site_id, limit),
        )
        return [_intent(row) for row in rows]

    async def latest_intent_versions(self) -> dict[str, int]:
        rows = await self._fetchall("SELECT site_id, MAX(version) FROM intents GROUP BY site_id")
        return {site_id: int(version) for site_id, version in rows}

    async def intent_deliveries(
        self, site_id: str, versions: Sequence[int]
    ) -> list[IntentDeliveryRecord]:
        if not versions:
            return []
        rows = await self._fetchall(
            f"SELECT {INTENT_DELIVERY_COLUMNS} FROM intent_deliveries "
            "WHERE site_id = %s AND version = ANY(%s)",
            (site_id, list(versions)),
        )
        return [IntentDeliveryRecord(*row) for row in rows]

    async def gateway_intent_acks(
        self, gateway_id: str, limit: int
    ) -> list[tuple[str, IntentDeliveryRecord]]:
        rows = await self._fetchall(
            f"SELECT site_id, {INTENT_DELIVERY_COLUMNS} FROM intent_deliveries "
            "WHERE gateway_id = %s AND acked_at_ns IS NOT NULL "
            "ORDER BY acked_at_ns DESC, version DESC LIMIT %s",
            (gateway_id, limit),
        )
        return [(row[0], IntentDeliveryRecord(*row[1:])) for row in rows]

    async def latest_intent_statuses(
        self, site_id: str, versions: Sequence[int]
    ) -> list[IntentStatusRecord]:
        if not versions:
            return []
        rows = await self._fetchall(
            "SELECT DISTINCT ON (s.gateway_id, s.version) s.gateway_id, s.seq, s.version, "
            "s.state, s.reason, s.time_ns, s.active_event_id FROM intent_statuses s "
            "JOIN gateways g ON g.gateway_id = s.gateway_id "
            "WHERE g.site_id = %s AND s.version = ANY(%s) "
            "ORDER BY s.gateway_id, s.version, s.seq DESC",
            (site_id, list(versions)),
        )
        return [IntentStatusRecord(*row) for row in rows]

    # -- the Store protocol: reads for the HTTP API ---------------------------------------------

    async def list_gateways(self, site_id: str | None = None) -> list[GatewayRecord]:
        if site_id is None:
            rows = await self._fetchall(
                f"SELECT {_GATEWAY_COLUMNS} FROM gateways ORDER BY gateway_id"
            )
        else:
            rows = await self._fetchall(
                f"SELECT {_GATEWAY_COLUMNS} FROM gateways WHERE site_id = %s ORDER BY gateway_id",
                (site_id,),
            )
        return [_gateway(row) for row in rows]

    async def get_gateway(self, gateway_id: str) -> GatewayRecord | None:
        row = await self._fetchone(
            f"SELECT {_GATEWAY_COLUMNS} FROM gateways WHERE gateway_id = %s", (gateway_id,)
        )
        return _gateway(row) if row is not None else None

    async def list_sites(self) -> list[SiteRecord]:
        rows = await self._fetchall(f"SELECT {_SITE_COLUMNS} FROM sites ORDER BY site_id")
        return [_site(row) for row in rows]

    async def get_site(self, site_id: str) -> SiteRecord | None:
        row = await self._fetchone(
            f"SELECT {_SITE_COLUMNS} FROM sites WHERE site_id = %s", (site_id,)
        )
        return _site(row) if row is not None else None

    async def list_devices(self, site_id: str | None = None) -> list[DeviceRecord]:
        columns = ", ".join(f"d.{c.strip()}" for c in _DEVICE_COLUMNS.split(","))
        query = f"SELECT {columns} FROM devices d JOIN gateways g ON g.gateway_id = d.gateway_id"
        params: tuple[object, ...] = ()
        if site_id is not None:
            query += " WHERE g.site_id = %s"
            params = (site_id,)
        rows = await self._fetchall(query + " ORDER BY d.device_id, d.gateway_id", params)
        return [_device(row) for row in rows]

    async def latest_points(
        self, *, site_id: str | None, device_id: str | None = None, point: str | None = None
    ) -> list[LatestPoint]:
        conditions: list[str] = []
        params: list[object] = []
        for column, value in (("g.site_id", site_id), ("l.device_id", device_id)):
            if value is not None:
                conditions.append(f"{column} = %s")
                params.append(value)
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        rows = await self._fetchall(
            "SELECT l.gateway_id, l.device_id, l.points FROM latest_values l "
            f"JOIN gateways g ON g.gateway_id = l.gateway_id {where}",
            params,
        )
        return unpack_latest_points(rows, point)

    async def sample_status(self, site_id: str | None = None) -> list[SampleStatus]:
        query = (
            "SELECT s.gateway_id, s.device_id, s.time_ns, s.seq, s.ok, s.error "
            "FROM sample_status s JOIN gateways g ON g.gateway_id = s.gateway_id"
        )
        params: tuple[object, ...] = ()
        if site_id is not None:
            query += " WHERE g.site_id = %s"
            params = (site_id,)
        rows = await self._fetchall(query, params)
        return [SampleStatus(row[0], row[1], row[2], row[3], bool(row[4]), row[5]) for row in rows]

    async def point_history(self, query: HistoryQuery) -> HistoryPage:
        gateway_ids = [
            gateway_id
            for (gateway_id,) in await self._fetchall(
                "SELECT gateway_id FROM gateways WHERE site_id = %s", (query.site_id,)
            )
        ]
        if not gateway_ids:
            return HistoryPage([], None)
        base = (
            "SELECT gateway_id, seq, time_ns, payload FROM samples "
            "WHERE gateway_id = ANY(%s) AND device_id = %s"
        )
        base_params: list[object] = [gateway_ids, query.device_id]
        if query.start_ns is not None:
            base += " AND time_ns >= %s"
            base_params.append(query.start_ns)
        if query.end_ns is not None:
            base += " AND time_ns < %s"
            base_params.append(query.end_ns)
        # Fetch samples in chunks until one point more than the page holds is found (that extra
        # point proves there is a next page) or the range is exhausted.
        chunk = query.limit + 1
        cursor = query.after
        position: tuple[int, str, int] | None = None
        points: list[HistoryPoint] = []
        while len(points) <= query.limit:
            statement = base
            params = list(base_params)
            if position is not None:
                statement += " AND (time_ns, gateway_id, seq) > (%s, %s, %s)"
                params.extend(position)
            elif cursor is not None:
                statement += " AND (time_ns, gateway_id, seq) >= (%s, %s, %s)"
                params.extend((cursor.time_ns, cursor.gateway_id, cursor.seq))
            statement += " ORDER BY time_ns, gateway_id, seq LIMIT %s"
            params.append(chunk)
            rows = await self._fetchall(statement, params)
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

    async def event_responses(
        self, *, site_id: str | None, event_id: str | None, limit: int
    ) -> list[EventResponseRecord]:
        conditions: list[str] = []
        params: list[object] = []
        if site_id is not None:
            conditions.append("g.site_id = %s")
            params.append(site_id)
        if event_id is not None:
            conditions.append("e.event_id = %s")
            params.append(event_id)
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        rows = await self._fetchall(
            "SELECT e.gateway_id, g.site_id, e.seq, e.intent_version, e.event_id, e.status, "
            "e.reason, e.time_ns, e.effective_start_ns, e.effective_end_ns "
            "FROM event_responses e "
            f"JOIN gateways g ON g.gateway_id = e.gateway_id {where} "
            "ORDER BY e.time_ns DESC, e.gateway_id, e.seq DESC LIMIT %s",
            (*params, limit),
        )
        return [EventResponseRecord(*row) for row in rows]

    async def latest_reported_states(self, site_id: str) -> list[ReportedStateRecord]:
        rows = await self._fetchall(
            "SELECT DISTINCT ON (r.gateway_id) r.gateway_id, r.seq, r.payload "
            "FROM reported_states r JOIN gateways g ON g.gateway_id = r.gateway_id "
            "WHERE g.site_id = %s ORDER BY r.gateway_id, r.seq DESC",
            (site_id,),
        )
        return [
            ReportedStateRecord(gateway_id, seq, pb.ReportedState.FromString(payload))
            for gateway_id, seq, payload in rows
        ]

    async def gaps(
        self, *, site_id: str | None = None, gateway_id: str | None = None, limit: int = 100
    ) -> list[GapRecord]:
        conditions: list[str] = []
        params: list[object] = []
        if gateway_id is not None:
            conditions.append("g.gateway_id = %s")
            params.append(gateway_id)
        if site_id is not None:
            conditions.append("w.site_id = %s")
            params.append(site_id)
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        rows = await self._fetchall(
            "SELECT g.gateway_id, g.seq, g.through_seq, g.what, g.records, g.points, g.bytes, "
            "g.first_time_ns, g.last_time_ns, g.reason, g.device_ids, g.received_at_ns "
            f"FROM gaps g JOIN gateways w ON w.gateway_id = g.gateway_id {where} "
            "ORDER BY g.received_at_ns DESC, g.gateway_id, g.seq DESC LIMIT %s",
            (*params, limit),
        )
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

    async def latest_flexibility(self, site_id: str | None = None) -> list[FlexibilityRecord]:
        query = (
            "SELECT f.gateway_id, f.seq, f.payload FROM latest_flexibility f "
            "JOIN gateways g ON g.gateway_id = f.gateway_id"
        )
        params: tuple[object, ...] = ()
        if site_id is not None:
            query += " WHERE g.site_id = %s"
            params = (site_id,)
        rows = await self._fetchall(query + " ORDER BY f.gateway_id", params)
        return [flexibility_record(gateway_id, seq, payload) for gateway_id, seq, payload in rows]

    # -- the Store protocol: operator API tokens -------------------------------------------------

    async def create_token(self, token: ApiToken) -> None:
        async with self._transaction() as tx:
            cursor = await tx.execute(
                f"INSERT INTO api_tokens ({_TOKEN_COLUMNS}) VALUES ({_placeholders(10)}) "
                "ON CONFLICT (token_id) DO NOTHING RETURNING token_id",
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
            inserted = await cursor.fetchone()
        if inserted is None:
            raise DuplicateTokenError(f"an API token with id {token.token_id!r} exists")

    async def get_token(self, token_id: str) -> ApiToken | None:
        row = await self._fetchone(
            f"SELECT {_TOKEN_COLUMNS} FROM api_tokens WHERE token_id = %s", (token_id,)
        )
        return _token(row) if row is not None else None

    async def list_tokens(self) -> list[ApiToken]:
        rows = await self._fetchall(
            f"SELECT {_TOKEN_COLUMNS} FROM api_tokens ORDER BY created_at_ns, token_id"
        )
        return [_token(row) for row in rows]

    async def revoke_token(self, token_id: str, revoked_by: str, now_ns: int) -> ApiToken | None:
        async with self._transaction() as tx:
            await tx.execute(
                "UPDATE api_tokens SET revoked_at_ns = %s, revoked_by = %s "
                "WHERE token_id = %s AND revoked_at_ns IS NULL",
                (now_ns, revoked_by, token_id),
            )
        return await self.get_token(token_id)

    async def touch_token(self, token_id: str, now_ns: int) -> None:
        async with self._transaction() as tx:
            await tx.execute(
                "UPDATE api_tokens "
                "SET last_used_at_ns = GREATEST(COALESCE(last_used_at_ns, 0), %s) "
                "WHERE token_id = %s",
                (now_ns, token_id),
            )

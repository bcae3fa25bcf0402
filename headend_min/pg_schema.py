"""The PostgreSQL schema of the headend, as an append-only list of versioned migrations.

Numbered like `sqlite_schema` (version N means the same tables on both stores), so `/healthz`
reports the same schema version whichever database a headend runs on. `migrate` applies every
migration newer than the database's `schema_migrations` version, each in its own transaction,
while holding a session advisory lock: two headend instances starting together on one database
take turns, and the second finds nothing left to do. Never edit a released migration: add the
next one.

Types: times are BIGINT ns since the epoch, payloads BYTEA (serialized protobuf), watts DOUBLE
PRECISION; 0/1 flags the ingest rows carry as ints are SMALLINT. Text columns use the "C"
collation, so ORDER BY and the history cursor's row comparisons sort ids bytewise, exactly like
SQLite, whatever the database's default collation.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import psycopg

from headend_min.store import SchemaTooNewError

__all__ = ["MIGRATIONS", "MIGRATION_LOCK_KEY", "Migration", "migrate"]

_log = logging.getLogger(__name__)

# pg_advisory_lock key of the migration runner ("dergw-mg" as a big-endian int64).
MIGRATION_LOCK_KEY = int.from_bytes(b"dergw-mg", "big", signed=True)


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "initial schema",
        (
            """CREATE TABLE sites (
                site_id TEXT COLLATE "C" PRIMARY KEY,
                name TEXT COLLATE "C" NOT NULL,
                substation TEXT COLLATE "C" NOT NULL,
                feeder TEXT COLLATE "C" NOT NULL,
                export_limit_w DOUBLE PRECISION,
                import_limit_w DOUBLE PRECISION,
                updated_at_ns BIGINT NOT NULL
            )""",
            """CREATE TABLE gateways (
                gateway_id TEXT COLLATE "C" PRIMARY KEY,
                site_id TEXT COLLATE "C" NOT NULL,
                software_version TEXT COLLATE "C" NOT NULL,
                boot_id TEXT COLLATE "C" NOT NULL,
                registered_at_ns BIGINT NOT NULL,
                stream_id TEXT COLLATE "C",
                stream_open BOOLEAN NOT NULL DEFAULT FALSE,
                connected_since_ns BIGINT,
                last_seen_ns BIGINT,
                intent_version BIGINT NOT NULL DEFAULT 0,
                committed_seq BIGINT NOT NULL DEFAULT 0,
                oldest_unacked_seq BIGINT NOT NULL DEFAULT 0,
                next_seq BIGINT NOT NULL DEFAULT 0
            )""",
            "CREATE INDEX gateways_by_site ON gateways (site_id)",
            """CREATE TABLE devices (
                gateway_id TEXT COLLATE "C" NOT NULL,
                device_id TEXT COLLATE "C" NOT NULL,
                kind TEXT COLLATE "C" NOT NULL,
                protocol TEXT COLLATE "C" NOT NULL,
                address TEXT COLLATE "C" NOT NULL,
                manufacturer TEXT COLLATE "C" NOT NULL,
                model TEXT COLLATE "C" NOT NULL,
                serial_number TEXT COLLATE "C" NOT NULL,
                role TEXT COLLATE "C" NOT NULL,
                max_w DOUBLE PRECISION NOT NULL,
                max_va DOUBLE PRECISION NOT NULL,
                max_var DOUBLE PRECISION NOT NULL,
                max_charge_w DOUBLE PRECISION NOT NULL,
                max_discharge_w DOUBLE PRECISION NOT NULL,
                energy_wh DOUBLE PRECISION NOT NULL,
                points_json TEXT COLLATE "C" NOT NULL,
                PRIMARY KEY (gateway_id, device_id)
            )""",
            # One row per device read; the points stay packed in the serialized DeviceSample.
            """CREATE TABLE samples (
                gateway_id TEXT COLLATE "C" NOT NULL,
                seq BIGINT NOT NULL,
                device_id TEXT COLLATE "C" NOT NULL,
                time_ns BIGINT NOT NULL,
                payload BYTEA NOT NULL,
                PRIMARY KEY (gateway_id, seq)
            )""",
            "CREATE INDEX samples_by_device_time ON samples (gateway_id, device_id, time_ns, seq)",
            """CREATE TABLE latest_points (
                gateway_id TEXT COLLATE "C" NOT NULL,
                device_id TEXT COLLATE "C" NOT NULL,
                point TEXT COLLATE "C" NOT NULL,
                value DOUBLE PRECISION,
                unit TEXT COLLATE "C" NOT NULL,
                quality INTEGER NOT NULL,
                time_ns BIGINT NOT NULL,
                seq BIGINT NOT NULL,
                PRIMARY KEY (gateway_id, device_id, point)
            )""",
            """CREATE TABLE sample_status (
                gateway_id TEXT COLLATE "C" NOT NULL,
                device_id TEXT COLLATE "C" NOT NULL,
                time_ns BIGINT NOT NULL,
                seq BIGINT NOT NULL,
                ok SMALLINT NOT NULL,
                error TEXT COLLATE "C" NOT NULL,
                PRIMARY KEY (gateway_id, device_id)
            )""",
            """CREATE TABLE event_responses (
                gateway_id TEXT COLLATE "C" NOT NULL,
                seq BIGINT NOT NULL,
                intent_version BIGINT NOT NULL,
                event_id TEXT COLLATE "C" NOT NULL,
                status INTEGER NOT NULL,
                reason TEXT COLLATE "C" NOT NULL,
                time_ns BIGINT NOT NULL,
                PRIMARY KEY (gateway_id, seq)
            )""",
            "CREATE INDEX event_responses_by_time ON event_responses (gateway_id, time_ns)",
            """CREATE TABLE intent_statuses (
                gateway_id TEXT COLLATE "C" NOT NULL,
                seq BIGINT NOT NULL,
                version BIGINT NOT NULL,
                state INTEGER NOT NULL,
                reason TEXT COLLATE "C" NOT NULL,
                time_ns BIGINT NOT NULL,
                active_event_id TEXT COLLATE "C" NOT NULL,
                PRIMARY KEY (gateway_id, seq)
            )""",
            "CREATE INDEX intent_statuses_by_version ON intent_statuses (gateway_id, version, seq)",
            """CREATE TABLE reported_states (
                gateway_id TEXT COLLATE "C" NOT NULL,
                seq BIGINT NOT NULL,
                time_ns BIGINT NOT NULL,
                intent_version BIGINT NOT NULL,
                active_event_id TEXT COLLATE "C" NOT NULL,
                source INTEGER NOT NULL,
                payload BYTEA NOT NULL,
                PRIMARY KEY (gateway_id, seq)
            )""",
            """CREATE TABLE decisions (
                gateway_id TEXT COLLATE "C" NOT NULL,
                seq BIGINT NOT NULL,
                time_ns BIGINT NOT NULL,
                summary TEXT COLLATE "C" NOT NULL,
                payload BYTEA NOT NULL,
                PRIMARY KEY (gateway_id, seq)
            )""",
            """CREATE TABLE unknown_records (
                gateway_id TEXT COLLATE "C" NOT NULL,
                seq BIGINT NOT NULL,
                payload BYTEA NOT NULL,
                PRIMARY KEY (gateway_id, seq)
            )""",
            """CREATE TABLE intents (
                site_id TEXT COLLATE "C" NOT NULL,
                version BIGINT NOT NULL,
                issued_at_ns BIGINT NOT NULL,
                document BYTEA NOT NULL,
                PRIMARY KEY (site_id, version)
            )""",
            """CREATE TABLE intent_deliveries (
                gateway_id TEXT COLLATE "C" NOT NULL,
                site_id TEXT COLLATE "C" NOT NULL,
                version BIGINT NOT NULL,
                delivered_at_ns BIGINT,
                ack_status INTEGER,
                ack_reason TEXT COLLATE "C" NOT NULL DEFAULT '',
                acked_at_ns BIGINT,
                PRIMARY KEY (gateway_id, site_id, version)
            )""",
            "CREATE INDEX intent_deliveries_by_site ON intent_deliveries (site_id, version)",
        ),
    ),
    Migration(
        2,
        "site flexibility reports",
        (
            """CREATE TABLE flexibility (
                gateway_id TEXT COLLATE "C" NOT NULL,
                seq BIGINT NOT NULL,
                time_ns BIGINT NOT NULL,
                up_w DOUBLE PRECISION,
                down_w DOUBLE PRECISION,
                payload BYTEA NOT NULL,
                PRIMARY KEY (gateway_id, seq)
            )""",
            """CREATE TABLE latest_flexibility (
                gateway_id TEXT COLLATE "C" PRIMARY KEY,
                seq BIGINT NOT NULL,
                time_ns BIGINT NOT NULL,
                up_w DOUBLE PRECISION,
                down_w DOUBLE PRECISION,
                payload BYTEA NOT NULL
            )""",
        ),
    ),
    Migration(
        3,
        "event responses carry the event's effective window at the gateway",
        (
            "ALTER TABLE event_responses ADD COLUMN effective_start_ns BIGINT",
            "ALTER TABLE event_responses ADD COLUMN effective_end_ns BIGINT",
        ),
    ),
    Migration(
        4,
        "two-lane acks, shed-data gaps, clock corrections of unsynced samples",
        (
            # Committed seqs above the contiguous watermark gateways.committed_seq (seqranges).
            """CREATE TABLE committed_ranges (
                gateway_id TEXT COLLATE "C" NOT NULL,
                first_seq BIGINT NOT NULL,
                last_seq BIGINT NOT NULL,
                PRIMARY KEY (gateway_id, first_seq)
            )""",
            """CREATE TABLE gaps (
                gateway_id TEXT COLLATE "C" NOT NULL,
                seq BIGINT NOT NULL,
                through_seq BIGINT NOT NULL,
                what TEXT COLLATE "C" NOT NULL,
                records BIGINT NOT NULL,
                points BIGINT NOT NULL,
                bytes BIGINT NOT NULL,
                first_time_ns BIGINT,
                last_time_ns BIGINT,
                reason TEXT COLLATE "C" NOT NULL,
                device_ids TEXT COLLATE "C" NOT NULL,
                received_at_ns BIGINT NOT NULL,
                PRIMARY KEY (gateway_id, seq)
            )""",
            "CREATE INDEX gaps_by_time ON gaps (received_at_ns)",
            """CREATE TABLE clock_syncs (
                gateway_id TEXT COLLATE "C" NOT NULL,
                boot_id TEXT COLLATE "C" NOT NULL,
                seq BIGINT NOT NULL,
                wall_minus_mono_ns BIGINT NOT NULL,
                time_ns BIGINT NOT NULL,
                PRIMARY KEY (gateway_id, seq)
            )""",
            "CREATE INDEX clock_syncs_by_boot ON clock_syncs (gateway_id, boot_id, seq)",
            "ALTER TABLE samples ADD COLUMN boot_id TEXT COLLATE \"C\" NOT NULL DEFAULT ''",
            "ALTER TABLE samples ADD COLUMN monotonic_ns BIGINT NOT NULL DEFAULT 0",
            "ALTER TABLE samples ADD COLUMN clock_synced SMALLINT NOT NULL DEFAULT 1",
            # Unsynced samples still waiting for their boot's ClockSync (rare: first minutes).
            "CREATE INDEX samples_unsynced ON samples (gateway_id, boot_id) WHERE clock_synced = 0",
        ),
    ),
    Migration(
        5,
        "operator API tokens; intents record who posted them",
        (
            # The secret itself is never stored: only its SHA-256 (headend_min.auth).
            """CREATE TABLE api_tokens (
                token_id TEXT COLLATE "C" PRIMARY KEY,
                name TEXT COLLATE "C" NOT NULL,
                secret_sha256 TEXT COLLATE "C" NOT NULL,
                role TEXT COLLATE "C" NOT NULL,
                site_id TEXT COLLATE "C",
                created_at_ns BIGINT NOT NULL,
                created_by TEXT COLLATE "C" NOT NULL,
                revoked_at_ns BIGINT,
                revoked_by TEXT COLLATE "C",
                last_used_at_ns BIGINT
            )""",
            'ALTER TABLE intents ADD COLUMN posted_by TEXT COLLATE "C"',
        ),
    ),
    Migration(
        6,
        "latest values packed: one row per device, not per point",
        (
            # The device's packed latest points (headend_min.ingest merge_latest_points): a
            # batch rewrites one row per device instead of upserting one per point. `names` and
            # `max_seq` let a read of the same points replace the row without decoding it.
            # Every batch rewrites its devices' rows: half-empty pages leave room for the new
            # versions on the same page, so the updates stay HOT (no index writes) and pruning
            # reclaims the old ones without waiting for vacuum.
            """CREATE TABLE latest_values (
                gateway_id TEXT COLLATE "C" NOT NULL,
                device_id TEXT COLLATE "C" NOT NULL,
                names TEXT NOT NULL,
                max_seq BIGINT NOT NULL,
                points TEXT NOT NULL,
                PRIMARY KEY (gateway_id, device_id)
            ) WITH (fillfactor = 50)""",
            "INSERT INTO latest_values (gateway_id, device_id, names, max_seq, points) "
            "SELECT gateway_id, device_id, json_agg(point)::text, MAX(seq), "
            "json_agg(json_build_array(point, value, unit, quality, time_ns, seq))::text "
            "FROM latest_points GROUP BY gateway_id, device_id",
            "DROP TABLE latest_points",
        ),
    ),
)


async def current_version(conn: psycopg.AsyncConnection[Any]) -> int:
    """The database's schema version (0 before the first migration)."""
    cursor = await conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL AS present")
    row = await cursor.fetchone()
    if row is None or not row[0]:
        return 0
    cursor = await conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
    row = await cursor.fetchone()
    return int(row[0]) if row is not None else 0


async def migrate(
    conn: psycopg.AsyncConnection[Any], migrations: tuple[Migration, ...] = MIGRATIONS
) -> int:
    """Bring the database to the newest migration; returns the version found before.

    `conn` must be in autocommit mode (each migration opens its own transaction). The advisory
    lock is session-level, so it is held across those transactions and released at the end
    (or when the connection dies, should this process crash mid-migration).
    """
    if not conn.autocommit:
        raise ValueError("migrate() needs a connection in autocommit mode")
    await conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
    try:
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                version INTEGER PRIMARY KEY,
                name TEXT COLLATE "C" NOT NULL,
                applied_at_ns BIGINT NOT NULL
            )"""
        )
        found = await current_version(conn)
        newest = migrations[-1].version if migrations else 0
        if found > newest:
            raise SchemaTooNewError(
                f"the PostgreSQL database is at schema version {found}, newer than this "
                f"headend's {newest}: run a newer headend (or restore a matching backup)"
            )
        for migration in migrations:
            if migration.version <= found:
                continue
            async with conn.transaction():
                for statement in migration.statements:
                    await conn.execute(statement)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, applied_at_ns) "
                    "VALUES (%s, %s, (EXTRACT(EPOCH FROM clock_timestamp()) * 1e9)::BIGINT)",
                    (migration.version, migration.name),
                )
            _log.info(
                "migrated PostgreSQL to schema version %d (%s)", migration.version, migration.name
            )
        return found
    finally:
        # A dead connection has released the lock with its session.
        with contextlib.suppress(psycopg.OperationalError):
            await conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))

"""The SQLite schema of the headend, as an append-only list of versioned migrations.

`SqliteStore` applies every migration newer than the database's `schema_migrations` version, each
in its own transaction. Never edit a released migration: add the next one.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MIGRATIONS", "Migration"]


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
                site_id TEXT PRIMARY KEY,
                name TEXT NOT NULL,
                substation TEXT NOT NULL,
                feeder TEXT NOT NULL,
                export_limit_w REAL,
                import_limit_w REAL,
                updated_at_ns INTEGER NOT NULL
            )""",
            """CREATE TABLE gateways (
                gateway_id TEXT PRIMARY KEY,
                site_id TEXT NOT NULL,
                software_version TEXT NOT NULL,
                boot_id TEXT NOT NULL,
                registered_at_ns INTEGER NOT NULL,
                stream_id TEXT,
                stream_open INTEGER NOT NULL DEFAULT 0,
                connected_since_ns INTEGER,
                last_seen_ns INTEGER,
                intent_version INTEGER NOT NULL DEFAULT 0,
                committed_seq INTEGER NOT NULL DEFAULT 0,
                oldest_unacked_seq INTEGER NOT NULL DEFAULT 0,
                next_seq INTEGER NOT NULL DEFAULT 0
            )""",
            "CREATE INDEX gateways_by_site ON gateways (site_id)",
            """CREATE TABLE devices (
                gateway_id TEXT NOT NULL,
                device_id TEXT NOT NULL,
                kind TEXT NOT NULL,
                protocol TEXT NOT NULL,
                address TEXT NOT NULL,
                manufacturer TEXT NOT NULL,
                model TEXT NOT NULL,
                serial_number TEXT NOT NULL,
                role TEXT NOT NULL,
                max_w REAL NOT NULL,
                max_va REAL NOT NULL,
                max_var REAL NOT NULL,
                max_charge_w REAL NOT NULL,
                max_discharge_w REAL NOT NULL,
                energy_wh REAL NOT NULL,
                points_json TEXT NOT NULL,
                PRIMARY KEY (gateway_id, device_id)
            ) WITHOUT ROWID""",
            # One row per device read; the points stay packed in the serialized DeviceSample.
            """CREATE TABLE samples (
                gateway_id TEXT NOT NULL,
                seq INTEGER NOT NULL,
                device_id TEXT NOT NULL,
                time_ns INTEGER NOT NULL,
                payload BLOB NOT NULL,
                PRIMARY KEY (gateway_id, seq)
            )""",
            "CREATE INDEX samples_by_device_time ON samples (gateway_id, device_id, time_ns, seq)",
            """CREATE TABLE latest_points (
                gateway_id TEXT NOT NULL,
                device_id TEXT NOT NULL,
                point TEXT NOT NULL,
                value REAL,
                unit TEXT NOT NULL,
                quality INTEGER NOT NULL,
                time_ns INTEGER NOT NULL,
                seq INTEGER NOT NULL,
                PRIMARY KEY (gateway_id, device_id, point)
            ) WITHOUT ROWID""",
            """CREATE TABLE sample_status (
                gateway_id TEXT NOT NULL,
                device_id TEXT NOT NULL,
                time_ns INTEGER NOT NULL,
                seq INTEGER NOT NULL,
                ok INTEGER NOT NULL,
                error TEXT NOT NULL,
                PRIMARY KEY (gateway_id, device_id)
            ) WITHOUT ROWID""",
            """CREATE TABLE event_responses (
                gateway_id TEXT NOT NULL,
                seq INTEGER NOT NULL,
                intent_version INTEGER NOT NULL,
                event_id TEXT NOT NULL,
                status INTEGER NOT NULL,
                reason TEXT NOT NULL,
                time_ns INTEGER NOT NULL,
                PRIMARY KEY (gateway_id, seq)
            )""",
            "CREATE INDEX event_responses_by_time ON event_responses (gateway_id, time_ns)",
            """CREATE TABLE intent_statuses (
                gateway_id TEXT NOT NULL,
                seq INTEGER NOT NULL,
                version INTEGER NOT NULL,
                state INTEGER NOT NULL,
                reason TEXT NOT NULL,
                time_ns INTEGER NOT NULL,
                active_event_id TEXT NOT NULL,
                PRIMARY KEY (gateway_id, seq)
            )""",
            "CREATE INDEX intent_statuses_by_version ON intent_statuses (gateway_id, version, seq)",
            """CREATE TABLE reported_states (
                gateway_id TEXT NOT NULL,
                seq INTEGER NOT NULL,
                time_ns INTEGER NOT NULL,
                intent_version INTEGER NOT NULL,
                active_event_id TEXT NOT NULL,
                source INTEGER NOT NULL,
                payload BLOB NOT NULL,
                PRIMARY KEY (gateway_id, seq)
            )""",
            """CREATE TABLE decisions (
                gateway_id TEXT NOT NULL,
                seq INTEGER NOT NULL,
                time_ns INTEGER NOT NULL,
                summary TEXT NOT NULL,
                payload BLOB NOT NULL,
                PRIMARY KEY (gateway_id, seq)
            )""",
            """CREATE TABLE unknown_records (
                gateway_id TEXT NOT NULL,
                seq INTEGER NOT NULL,
                payload BLOB NOT NULL,
                PRIMARY KEY (gateway_id, seq)
            )""",
            """CREATE TABLE intents (
                site_id TEXT NOT NULL,
                version INTEGER NOT NULL,
                issued_at_ns INTEGER NOT NULL,
                document BLOB NOT NULL,
                PRIMARY KEY (site_id, version)
            )""",
            """CREATE TABLE intent_deliveries (
                gateway_id TEXT NOT NULL,
                site_id TEXT NOT NULL,
                version INTEGER NOT NULL,
                delivered_at_ns INTEGER,
                ack_status INTEGER,
                ack_reason TEXT NOT NULL DEFAULT '',
                acked_at_ns INTEGER,
                PRIMARY KEY (gateway_id, site_id, version)
            )""",
            "CREATE INDEX intent_deliveries_by_site ON intent_deliveries (site_id, version)",
        ),
    ),
    Migration(
        2,
        "site flexibility reports",
        (
            # Every report, deduped like the other records (the forecast stays packed in the
            # serialized Flexibility)...
            """CREATE TABLE flexibility (
                gateway_id TEXT NOT NULL,
                seq INTEGER NOT NULL,
                time_ns INTEGER NOT NULL,
                up_w REAL,
                down_w REAL,
                payload BLOB NOT NULL,
                PRIMARY KEY (gateway_id, seq)
            )""",
            # ...and the newest per gateway, which the site and feeder views read.
            """CREATE TABLE latest_flexibility (
                gateway_id TEXT PRIMARY KEY,
                seq INTEGER NOT NULL,
                time_ns INTEGER NOT NULL,
                up_w REAL,
                down_w REAL,
                payload BLOB NOT NULL
            ) WITHOUT ROWID""",
        ),
    ),
    Migration(
        3,
        "event responses carry the event's effective window at the gateway",
        (
            "ALTER TABLE event_responses ADD COLUMN effective_start_ns INTEGER",
            "ALTER TABLE event_responses ADD COLUMN effective_end_ns INTEGER",
        ),
    ),
    Migration(
        4,
        "two-lane acks, shed-data gaps, clock corrections of unsynced samples",
        (
            # Committed seqs above the contiguous watermark gateways.committed_seq (seqranges).
            """CREATE TABLE committed_ranges (
                gateway_id TEXT NOT NULL,
                first_seq INTEGER NOT NULL,
                last_seq INTEGER NOT NULL,
                PRIMARY KEY (gateway_id, first_seq)
            ) WITHOUT ROWID""",
            """CREATE TABLE gaps (
                gateway_id TEXT NOT NULL,
                seq INTEGER NOT NULL,
                through_seq INTEGER NOT NULL,
                what TEXT NOT NULL,
                records INTEGER NOT NULL,
                points INTEGER NOT NULL,
                bytes INTEGER NOT NULL,
                first_time_ns INTEGER,
                last_time_ns INTEGER,
                reason TEXT NOT NULL,
                device_ids TEXT NOT NULL,
                received_at_ns INTEGER NOT NULL,
                PRIMARY KEY (gateway_id, seq)
            )""",
            """CREATE TABLE clock_syncs (
                gateway_id TEXT NOT NULL,
                boot_id TEXT NOT NULL,
                seq INTEGER NOT NULL,
                wall_minus_mono_ns INTEGER NOT NULL,
                time_ns INTEGER NOT NULL,
                PRIMARY KEY (gateway_id, seq)
            ) WITHOUT ROWID""",
            # Every gateway process reports its boot's offset once (the previous report may have
            # died with it); the earliest per boot corrects that boot's unsynced samples.
            "CREATE INDEX clock_syncs_by_boot ON clock_syncs (gateway_id, boot_id, seq)",
            "ALTER TABLE samples ADD COLUMN boot_id TEXT NOT NULL DEFAULT ''",
            "ALTER TABLE samples ADD COLUMN monotonic_ns INTEGER NOT NULL DEFAULT 0",
            "ALTER TABLE samples ADD COLUMN clock_synced INTEGER NOT NULL DEFAULT 1",
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
                token_id TEXT PRIMARY KEY,
                name TEXT NOT NULL,
                secret_sha256 TEXT NOT NULL,
                role TEXT NOT NULL,
                site_id TEXT,
                created_at_ns INTEGER NOT NULL,
                created_by TEXT NOT NULL,
                revoked_at_ns INTEGER,
                revoked_by TEXT,
                last_used_at_ns INTEGER
            )""",
            "ALTER TABLE intents ADD COLUMN posted_by TEXT",
        ),
    ),
    Migration(
        6,
        "latest values packed: one row per device, not per point",
        (
            # The device's packed latest points (headend_min.ingest merge_latest_points): a
            # batch rewrites one row per device instead of upserting one per point. `names` and
            # `max_seq` let a read of the same points replace the row without decoding it.
            # A rowid table: the rows (~50 bytes a point) are too wide for WITHOUT ROWID to pay.
            """CREATE TABLE latest_values (
                gateway_id TEXT NOT NULL,
                device_id TEXT NOT NULL,
                names TEXT NOT NULL,
                max_seq INTEGER NOT NULL,
                points TEXT NOT NULL,
                PRIMARY KEY (gateway_id, device_id)
            )""",
            "INSERT INTO latest_values (gateway_id, device_id, names, max_seq, points) "
            "SELECT gateway_id, device_id, json_group_array(point), MAX(seq), "
            "json_group_array(json_array(point, value, unit, quality, time_ns, seq)) "
            "FROM latest_points GROUP BY gateway_id, device_id",
            "DROP TABLE latest_points",
        ),
    ),
)

"""The durable store-and-forward outbox: every up record, in seq order, until the headend acks it.

Owns the outbox SQLite file and the gateway-scoped record sequence number (`seq`). Everything the
gateway reports (samples, event responses, reported state, decisions, intent status) is appended
here first; the uplink drains it oldest-first and deletes rows only once the headend acknowledged
them after its own commit. Invariants (tested):

* **Gap-free, never backwards.** `append` assigns consecutive seqs and persists `next_seq` in the
  same transaction as the rows, so a seq is never reused: not after every row was acked and
  deleted, not across restarts, not after `kill -9`.
* **Committed means kept.** `append` returns only after its transaction committed; a process crash
  (even `kill -9`) at any later moment loses nothing it returned.
* **Acked means deleted, nothing else.** Rows leave only through `ack` (and, later, a documented
  shedding policy when the disk quota is reached; see `_make_room`).

Durability choice: WAL journal with `synchronous=NORMAL`. In WAL mode NORMAL never corrupts the
database and never loses a committed transaction when the *process* dies; only an OS crash or a
power cut can roll back the last few commits (the WAL is fsynced at checkpoints rather than at
every commit). Telemetry tolerates losing its last second or so on a power cut, and skipping the
per-commit fsync is what lets batched appends run at hundreds of thousands of points/s without
wearing out an SD card (see shared/reference/appliance.md: 11 vs 1,012 fsyncs per 1,000 rows).

One thing NORMAL alone would get wrong: if a power cut rolled back rows that the headend had
already committed, the gateway would hand out those seqs again and the headend would discard the
new records as duplicates. So before `read_after` returns rows that may leave the box it makes
every commit so far durable (one fsync per shipped batch, not per append), and `fast_forward`
commits with `synchronous=FULL`. Hence: a seq the headend has seen is never reassigned.

Threading: the async runtime calls in through `asyncio.to_thread`, so every method takes one lock
and the connection is opened with `check_same_thread=False`. The file is opened with an exclusive
lock, so a second gateway process pointed at the same state directory fails fast instead of
interleaving seqs.

Plain synchronous SQLite I/O only: no asyncio, no gRPC.
"""

from __future__ import annotations

import enum
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import count
from pathlib import Path

import sqlite_utils

from gateway.clock import Clock
from gateway.statedb import StateFile, open_state_db

__all__ = [
    "AckBeyondHeadError",
    "Outbox",
    "OutboxClosedError",
    "OutboxError",
    "OutboxLockedError",
    "OutboxNotEmptyError",
    "OutboxRow",
    "OutboxSchemaError",
    "OutboxStats",
    "RecordKind",
]

_SCHEMA_VERSION = 1
_FIRST_SEQ = 1  # seq 0 means "none" on the wire (Register.oldest_unacked_seq, RegisterAck)
_MAX_SEQ = 2**63 - 1  # SQLite INTEGER is signed 64-bit; the wire's uint64 is wider


class RecordKind(enum.IntEnum):
    """What an outbox row holds: the field number of `dergw.v1.Record`'s `body` oneof."""

    SAMPLE = 2  # DeviceSample
    EVENT_RESPONSE = 3  # EventResponse
    REPORTED_STATE = 4  # ReportedState
    DECISION = 5  # Decision
    INTENT_STATUS = 6  # IntentStatus
    FLEXIBILITY = 7  # Flexibility


_KINDS = frozenset(int(kind) for kind in RecordKind)


class OutboxError(Exception):
    """Base class of the outbox's own errors."""


class OutboxClosedError(OutboxError):
    """The outbox was used after `close()`."""


class OutboxLockedError(OutboxError):
    """Another process holds the outbox file."""


class OutboxSchemaError(OutboxError):
    """The file is not an outbox this version of dergw can use, or its bookkeeping is broken."""


class AckBeyondHeadError(OutboxError):
    """The headend acknowledged a seq this outbox never assigned; nothing was deleted."""


class OutboxNotEmptyError(OutboxError):
    """`fast_forward` was asked while unacknowledged rows are held; nothing was changed."""


@dataclass(frozen=True, slots=True)
class OutboxRow:
    seq: int
    kind: int  # a RecordKind value
    payload: bytes  # the serialized body message (e.g. a DeviceSample)
    created_wall_ns: int  # when it was appended (gateway wall clock)


@dataclass(frozen=True, slots=True)
class OutboxStats:
    rows: int
    oldest_seq: int | None  # None when empty
    next_seq: int  # the seq the next appended row will get
    payload_bytes: int  # sum of payload sizes held (not the file size)
    oldest_created_wall_ns: int | None  # None when empty


class Outbox(StateFile):
    """The outbox file at `path` (created if absent). Use as a context manager or call `close()`."""

    closed_error = OutboxClosedError
    label = "outbox"

    def __init__(self, path: Path, *, clock: Clock) -> None:
        super().__init__(path)
        self._clock = clock
        self._conn = self._open()

    # -- lifecycle -------------------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        conn, db = open_state_db(
            self._path,
            synchronous="NORMAL",
            what="outbox",
            locked_error=OutboxLockedError,
            corrupt_error=OutboxSchemaError,
            corrupt_advice=(
                "move it aside and restart (a fresh outbox is created), after "
                "rescuing it if it holds unsent telemetry"
            ),
            pragmas=("journal_size_limit=67108864",),
        )
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                self._create_schema(db)
            elif version != _SCHEMA_VERSION:
                raise OutboxSchemaError(
                    f"outbox {self._path} has schema version {version}, this dergw knows "
                    f"{_SCHEMA_VERSION}; run the dergw version that wrote it until it has drained, "
                    "or move the file aside"
                )
            self._next_seq = self._load_next_seq(conn)
            rows, payload_bytes, max_seq = conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0), MAX(seq) FROM outbox"
            ).fetchone()
            if max_seq is not None and max_seq >= self._next_seq:
                raise OutboxSchemaError(
                    f"outbox {self._path} holds seq {max_seq} but its next_seq is "
                    f"{self._next_seq}: the file was changed outside dergw; move it aside "
                    "(seqs must never be reused)"
                )
            # Row count and bytes live in memory (recounted here) so that stats() is O(1) and
            # the hot path writes nothing but the rows and next_seq.
            self._rows: int = rows
            self._payload_bytes: int = payload_bytes
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            conn.close()
            raise
        # Everything committed before this process started is as durable as the OS made it;
        # treat it as not yet fsynced so the first read_after syncs before shipping.
        self._durable_next_seq = _FIRST_SEQ
        return conn

    @staticmethod
    def _create_schema(db: sqlite_utils.Database) -> None:
        db.table("outbox").create(
            {"seq": int, "kind": int, "created_wall_ns": int, "payload": bytes},
            pk="seq",
            not_null={"kind", "created_wall_ns", "payload"},
        )
        db.table("outbox_meta").create({"key": str, "value": int}, pk="key", not_null={"value"})
        db.table("outbox_meta").insert_all(
            [{"key": "next_seq", "value": _FIRST_SEQ}, {"key": "durable_syncs", "value": 0}]
        )
        db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")

    def _load_next_seq(self, conn: sqlite3.Connection) -> int:
        row = conn.execute("SELECT value FROM outbox_meta WHERE key = 'next_seq'").fetchone()
        if row is None:
            raise OutboxSchemaError(
                f"outbox {self._path} has no next_seq record: the file was changed outside "
                "dergw; move it aside"
            )
        return int(row[0])

    # -- writes ----------------------------------------------------------------------------------

    def append(self, items: Sequence[tuple[int, bytes]]) -> range:
        """Append `(kind, payload)` items as one transaction; return the seqs they were given.

        Committed when this returns. An empty batch returns an empty range and writes nothing.
        Raises ValueError (and appends nothing) if any kind is not a RecordKind.
        """
        for kind, payload in items:
            if kind not in _KINDS:
                raise ValueError(
                    f"outbox: record kind {kind!r} is not a dergw.v1.Record body field number "
                    f"({', '.join(f'{k.value}={k.name}' for k in RecordKind)})"
                )
            if not isinstance(payload, bytes):
                raise TypeError(f"outbox: payload must be bytes, not {type(payload).__name__}")
        with self._lock:
            conn = self._connection()
            first = self._next_seq
            if not items:
                return range(first, first)
            end = first + len(items)
            if end > _MAX_SEQ:
                raise OutboxError(f"outbox {self._path}: seq space exhausted at {first}")
            batch_bytes = sum(len(payload) for _, payload in items)
            self._make_room(batch_bytes)
            now = self._clock.wall_ns()
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(
                    "INSERT INTO outbox (seq, kind, created_wall_ns, payload) VALUES (?, ?, ?, ?)",
                    [
                        (seq, kind, now, payload)
                        for seq, (kind, payload) in zip(count(first), items, strict=False)
                    ],
                )
                conn.execute("UPDATE outbox_meta SET value = ? WHERE key = 'next_seq'", (end,))
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            self._next_seq = end
            self._rows += len(items)
            self._payload_bytes += batch_bytes
            return range(first, end)

    def _make_room(self, incoming_bytes: int) -> None:
        """Seam for the disk quota (`[outbox] quota_bytes`); not implemented yet.

        When it lands it runs here, under the lock and before the batch's transaction, and frees
        space by a documented shedding policy (e.g. thin the oldest raw samples to aggregates),
        counting exactly what it shed so that the loss is reported upstream. Shedding must keep
        the held seqs consecutive (rewrite rows in place rather than delete from the middle),
        because the uplink and the headend rely on gap-free seqs.
        """

    def ack(self, up_to_seq: int) -> int:
        """Delete every row with seq <= `up_to_seq` (the headend committed them); return how many.

        Acks at or below what was already acked are normal (repeated or late acks) and delete
        nothing. An ack beyond the last assigned seq raises AckBeyondHeadError and deletes nothing.
        """
        if up_to_seq < 0:
            raise ValueError(f"outbox: ack up_to_seq must be >= 0, got {up_to_seq}")
        with self._lock:
            conn = self._connection()
            if up_to_seq >= self._next_seq:
                raise AckBeyondHeadError(
                    f"outbox {self._path}: the headend acknowledged up to seq {up_to_seq} but this "
                    f"gateway has only assigned seqs below {self._next_seq}. Nothing was deleted. "
                    "The headend holds records this outbox never wrote: check that no other "
                    "gateway uses the same gateway id, and whether this outbox was restored from "
                    "an old copy (the uplink should re-register and fast_forward)"
                )
            if self._rows == 0:
                return 0
            conn.execute("BEGIN IMMEDIATE")
            try:
                (freed,) = conn.execute(
                    "SELECT COALESCE(SUM(LENGTH(payload)), 0) FROM outbox WHERE seq <= ?",
                    (up_to_seq,),
                ).fetchone()
                deleted = conn.execute("DELETE FROM outbox WHERE seq <= ?", (up_to_seq,)).rowcount
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            self._rows -= deleted
            self._payload_bytes -= freed
            return int(deleted)

    def fast_forward(self, min_next_seq: int) -> None:
        """Make the next assigned seq at least `min_next_seq` (never lowers it).

        For when the headend reports it already committed seqs beyond ours (a re-flashed gateway,
        an outbox restored from an old copy). Only allowed when the outbox is empty, because held
        rows would otherwise sit below seqs assigned after them; raises OutboxNotEmptyError.
        Committed with synchronous=FULL: losing it in a power cut would reassign seqs the
        headend already holds, and it would silently drop those records as duplicates.
        """
        if min_next_seq > _MAX_SEQ:
            raise ValueError(f"outbox: seq {min_next_seq} exceeds the storable maximum {_MAX_SEQ}")
        with self._lock:
            conn = self._connection()
            if min_next_seq <= self._next_seq:
                return
            if self._rows:
                raise OutboxNotEmptyError(
                    f"outbox {self._path}: cannot fast-forward next_seq from {self._next_seq} to "
                    f"{min_next_seq} while {self._rows} unacknowledged rows are held; ack or "
                    "drain them first"
                )
            self._durable_write_next_seq(conn, min_next_seq)
            self._next_seq = min_next_seq
            self._durable_next_seq = min_next_seq

    # -- reads -----------------------------------------------------------------------------------

    def read_after(self, after_seq: int, limit: int) -> list[OutboxRow]:
        """Up to `limit` rows with seq > `after_seq`, oldest first.

        Rows returned here may leave the box, so before returning a row that is not yet known to
        be on stable storage this makes every commit so far durable (one fsync; see the module
        docstring for why a power cut must never roll back a seq the headend has seen).
        """
        if limit < 1:
            raise ValueError(f"outbox: read limit must be >= 1, got {limit}")
        with self._lock:
            conn = self._connection()
            rows = [
                OutboxRow(seq, kind, payload, created)
                for seq, kind, created, payload in conn.execute(
                    "SELECT seq, kind, created_wall_ns, payload FROM outbox "
                    "WHERE seq > ? ORDER BY seq LIMIT ?",
                    (after_seq, limit),
                )
            ]
            if rows and rows[-1].seq >= self._durable_next_seq:
                self._durable_write_next_seq(conn, self._next_seq)
                self._durable_next_seq = self._next_seq
            return rows

    def _durable_write_next_seq(self, conn: sqlite3.Connection, next_seq: int) -> None:
        # A commit under synchronous=FULL fsyncs the WAL file, which also carries every earlier
        # NORMAL commit: one fsync makes all of them durable. The counter makes sure the commit
        # writes a page: SQLite skips pages whose content did not change, and then syncs nothing.
        conn.execute("PRAGMA synchronous=FULL")
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute("UPDATE outbox_meta SET value = ? WHERE key = 'next_seq'", (next_seq,))
                conn.execute("UPDATE outbox_meta SET value = value + 1 WHERE key = 'durable_syncs'")
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        finally:
            conn.execute("PRAGMA synchronous=NORMAL")

    def stats(self) -> OutboxStats:
        with self._lock:
            conn = self._connection()
            oldest = conn.execute(
                "SELECT seq, created_wall_ns FROM outbox ORDER BY seq LIMIT 1"
            ).fetchone()
            return OutboxStats(
                rows=self._rows,
                oldest_seq=None if oldest is None else int(oldest[0]),
                next_seq=self._next_seq,
                payload_bytes=self._payload_bytes,
                oldest_created_wall_ns=None if oldest is None else int(oldest[1]),
            )

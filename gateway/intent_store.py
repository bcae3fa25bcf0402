"""The persisted intent cache: the newest intent document for this site, and per-event state.

Owns its own small SQLite file (separate from the telemetry outbox). It holds:

* the intent documents received from the headend, applied strictly by version: `offer` stores a
  document only if its version is newer than the one held, and returns only after the commit, so
  the gateway acknowledges an intent (INTENT_ACK_STATUS_PERSISTED) only once it survives a power
  cut. The newest version is the one in force (`current()`); the previous `history_limit`
  versions are kept as a short local audit trail (`history()`); older ones are deleted in the
  same transaction. The headend is the system of record for every version ever issued, so an
  unbounded copy here would only wear out the SD card.
* per-event execution state for the scheduler (`EventState`): the randomization offsets drawn
  once and reused after restarts (drawing again would move an event's start every reboot), and
  the last response status queued for the event (so that RECEIVED/STARTED/... are sent once).

Durability: WAL journal with `synchronous=FULL`. These writes are rare (an intent per operator
action, a state change per event transition) and audit-critical: an acknowledged intent, and what
the gateway told the headend about its events, must survive a power cut, not only a process
crash. The file is opened with an exclusive lock: one gateway process per state directory.

The store treats documents as opaque bytes: verifying them (signature, schema, site, version
matching the document) is the caller's job, done before `offer`. Plain synchronous SQLite I/O
only: no asyncio, no gRPC. Thread-safe (one lock), like the outbox.
"""

from __future__ import annotations

import enum
import logging
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from gateway.clock import Clock
from gateway.statedb import StateFile, open_state_db

__all__ = [
    "EventState",
    "IntentSiteMismatchError",
    "IntentStore",
    "IntentStoreClosedError",
    "IntentStoreError",
    "IntentStoreLockedError",
    "IntentStoreSchemaError",
    "OfferResult",
    "StoredIntent",
]

_log = logging.getLogger(__name__)

_SCHEMA_VERSION = 2  # 2: event_states.withdrawn_mask
_MAX_VERSION = 2**63 - 1  # SQLite INTEGER is signed 64-bit; the wire's uint64 is wider
_DEFAULT_HISTORY = 8


class OfferResult(enum.IntEnum):
    """Outcome of `offer`. Values equal the wire enum dergw.v1.IntentAckStatus."""

    PERSISTED = 1  # newer than the held version; durably stored and now current
    STALE = 2  # not newer than the held version; nothing changed


class IntentStoreError(Exception):
    """Base class of the intent store's own errors."""


class IntentStoreClosedError(IntentStoreError):
    """The store was used after `close()`."""


class IntentStoreLockedError(IntentStoreError):
    """Another process holds the intent store file."""


class IntentStoreSchemaError(IntentStoreError):
    """The file is not an intent store this version of dergw can use."""


class IntentSiteMismatchError(IntentStoreError):
    """An intent for a different site than the one held was offered; nothing was changed."""


@dataclass(frozen=True, slots=True)
class StoredIntent:
    site_id: str
    version: int
    document: bytes  # as received (a serialized dergw.v1.IntentDocument)
    received_wall_ns: int  # when this gateway persisted it (gateway wall clock)


@dataclass(frozen=True, slots=True)
class EventState:
    """What the scheduler must remember about one control event across restarts."""

    drawn_start_offset_s: int  # randomize_start_s drawn once for this gateway
    drawn_duration_offset_s: int  # randomize_duration_s drawn once for this gateway
    last_response: int  # the dergw.v1.ResponseStatus last queued for the event; 0 = none yet
    updated_wall_ns: int
    # Control modes the event lost for good to a higher-priority one (gateway.intent
    # modes_to_mask): supersession is permanent, also across restarts.
    withdrawn_mask: int = 0

    def __post_init__(self) -> None:
        if self.last_response < 0:
            raise ValueError(f"EventState.last_response must be >= 0, got {self.last_response}")


class IntentStore(StateFile):
    """The intent store file at `path` (created if absent). Context manager or `close()`.

    `history_limit`: how many superseded versions to keep besides the current one.
    """

    closed_error = IntentStoreClosedError
    label = "intent store"

    def __init__(self, path: Path, *, clock: Clock, history_limit: int = _DEFAULT_HISTORY) -> None:
        if history_limit < 0:
            raise ValueError(f"intent store: history_limit must be >= 0, got {history_limit}")
        super().__init__(path)
        self._clock = clock
        self._history_limit = history_limit
        self._conn = self._open()

    def _open(self) -> sqlite3.Connection:
        conn = open_state_db(
            self._path,
            synchronous="FULL",
            what="intent store",
            locked_error=IntentStoreLockedError,
            corrupt_error=IntentStoreSchemaError,
            corrupt_advice=(
                "move it aside and restart: the gateway then runs its fallback "
                "until the headend resends the intent"
            ),
        )
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                conn.execute(
                    "CREATE TABLE intents (version INTEGER PRIMARY KEY, site_id TEXT NOT NULL, "
                    "document BLOB NOT NULL, received_wall_ns INTEGER NOT NULL)"
                )
                conn.execute(
                    "CREATE TABLE event_states (event_id TEXT PRIMARY KEY, "
                    "drawn_start_offset_s INTEGER NOT NULL, "
                    "drawn_duration_offset_s INTEGER NOT NULL, last_response INTEGER NOT NULL, "
                    "updated_wall_ns INTEGER NOT NULL, withdrawn_mask INTEGER)"
                )
                conn.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
            elif version == 1:
                # Upgrade in place: nothing held is lost (the column defaults to no withdrawal).
                conn.execute(
                    "ALTER TABLE event_states ADD COLUMN withdrawn_mask INTEGER NOT NULL DEFAULT 0"
                )
                conn.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
            elif version != _SCHEMA_VERSION:
                raise IntentStoreSchemaError(
                    f"intent store {self._path} has schema version {version}, this dergw knows "
                    f"{_SCHEMA_VERSION}; move the file aside (the headend resends the current "
                    "intent on the next connection)"
                )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            conn.close()
            raise
        return conn

    # -- intents ---------------------------------------------------------------------------------

    def offer(self, site_id: str, version: int, document: bytes) -> OfferResult:
        """Store `document` as the current intent if `version` is newer than the held one.

        Returns PERSISTED only after the commit (acknowledge the headend after this returns), or
        STALE when `version` is not newer (nothing changes). Raises IntentSiteMismatchError when
        the store already holds another site's intent, and ValueError for a version outside
        1..2**63-1.
        """
        if not 1 <= version <= _MAX_VERSION:
            raise ValueError(
                f"intent store: version must be in 1..{_MAX_VERSION}, got {version} "
                "(0 means 'no intent' on the wire)"
            )
        if not site_id:
            raise ValueError("intent store: site_id must not be empty")
        if not isinstance(document, bytes):
            raise TypeError(f"intent store: document must be bytes, not {type(document).__name__}")
        with self._lock:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                held = conn.execute(
                    "SELECT site_id, version, document FROM intents ORDER BY version DESC LIMIT 1"
                ).fetchone()
                if held is not None:
                    held_site, held_version, held_document = held
                    if held_site != site_id:
                        raise IntentSiteMismatchError(
                            f"intent store {self._path} holds intents for site {held_site!r} "
                            f"(version {held_version}) but an intent for site {site_id!r} was "
                            f"offered; nothing was changed. If this gateway now serves site "
                            f"{site_id!r}, stop it and delete {self._path} (the headend resends "
                            "the current intent); otherwise fix the headend's site assignment"
                        )
                    if version <= held_version:
                        conn.execute("ROLLBACK")
                        if version == held_version and document != held_document:
                            _log.warning(
                                "intent version %d for site %s re-offered with different content; "
                                "kept the one received first (versions must not be reused)",
                                version,
                                site_id,
                            )
                        return OfferResult.STALE
                conn.execute(
                    "INSERT INTO intents (version, site_id, document, received_wall_ns) "
                    "VALUES (?, ?, ?, ?)",
                    (version, site_id, document, self._clock.wall_ns()),
                )
                # Keep the current version plus history_limit superseded ones.
                conn.execute(
                    "DELETE FROM intents WHERE version NOT IN "
                    "(SELECT version FROM intents ORDER BY version DESC LIMIT ?)",
                    (self._history_limit + 1,),
                )
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return OfferResult.PERSISTED

    def current(self) -> StoredIntent | None:
        """The newest persisted intent, or None if none was ever received."""
        with self._lock:
            row = (
                self._connection()
                .execute(
                    "SELECT site_id, version, document, received_wall_ns FROM intents "
                    "ORDER BY version DESC LIMIT 1"
                )
                .fetchone()
            )
        return None if row is None else StoredIntent(*row)

    def history(self) -> list[StoredIntent]:
        """Every kept intent, newest (current) first."""
        with self._lock:
            rows = (
                self._connection()
                .execute(
                    "SELECT site_id, version, document, received_wall_ns FROM intents "
                    "ORDER BY version DESC"
                )
                .fetchall()
            )
        return [StoredIntent(*row) for row in rows]

    # -- per-event execution state ---------------------------------------------------------------

    def get_event_state(self, event_id: str) -> EventState | None:
        with self._lock:
            row = (
                self._connection()
                .execute(
                    "SELECT drawn_start_offset_s, drawn_duration_offset_s, last_response, "
                    "updated_wall_ns, withdrawn_mask FROM event_states WHERE event_id = ?",
                    (event_id,),
                )
                .fetchone()
            )
        return None if row is None else EventState(*row)

    def set_event_state(self, event_id: str, state: EventState) -> None:
        """Persist `state` for `event_id` (replacing any previous one); committed on return."""
        if not event_id:
            raise ValueError("intent store: event_id must not be empty")
        with self._lock:
            self._connection().execute(
                "INSERT INTO event_states (event_id, drawn_start_offset_s, "
                "drawn_duration_offset_s, last_response, updated_wall_ns, withdrawn_mask) "
                "VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (event_id) DO UPDATE SET "
                "drawn_start_offset_s = excluded.drawn_start_offset_s, "
                "drawn_duration_offset_s = excluded.drawn_duration_offset_s, "
                "last_response = excluded.last_response, "
                "updated_wall_ns = excluded.updated_wall_ns, "
                "withdrawn_mask = excluded.withdrawn_mask",
                (
                    event_id,
                    state.drawn_start_offset_s,
                    state.drawn_duration_offset_s,
                    state.last_response,
                    state.updated_wall_ns,
                    state.withdrawn_mask,
                ),
            )

    def all_event_states(self) -> dict[str, EventState]:
        with self._lock:
            rows = (
                self._connection()
                .execute(
                    "SELECT event_id, drawn_start_offset_s, drawn_duration_offset_s, "
                    "last_response, updated_wall_ns, withdrawn_mask FROM event_states "
                    "ORDER BY event_id"
                )
                .fetchall()
            )
        return {row[0]: EventState(*row[1:]) for row in rows}

    def prune_event_states(self, keep: Iterable[str]) -> int:
        """Delete the state of every event not in `keep` (one transaction); return how many."""
        keep_ids = set(keep)
        with self._lock:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                doomed = [
                    (event_id,)
                    for (event_id,) in conn.execute("SELECT event_id FROM event_states")
                    if event_id not in keep_ids
                ]
                conn.executemany("DELETE FROM event_states WHERE event_id = ?", doomed)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return len(doomed)

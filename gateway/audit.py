"""The gateway's tamper-evident audit log: who made the site do what, and why, in a hash chain.

Owns `<state_dir>/audit.db`. Every write issued to a device, every intent accepted or rejected and
every local override set, cleared or expired becomes one record: `seq` (gap-free from 1), wall
time, `kind`, `origin` (who asked: "control-loop", "intent v7", "local:<principal>", "headend"),
`subject` (a device id, "intent v7", an override id), `detail` (canonical JSON: the setpoint, the
limits that bound it, the verified result, a reason) and `prev`, the hash of the record before
(32 zero bytes for seq 1). Each record's `hash` is SHA-256 over `record_bytes()`, a length-prefixed
binary encoding of all of those fields, so editing any field of any record, deleting a record or
re-linking one shows up in `verify_chain`.

A hash chain alone cannot tell an honest log from one rewritten from an edited record onward
(every hash re-computed: the systemd FSS flaw CVE-2023-31439 was this kind of re-sealing). The
defence is the anchor: the committed head (seq, hash) goes upstream in every ReportedState, the
headend keeps it, and `verify_chain(records, anchor)` checks that the log still reaches that
exact head. Rewriting anything at or below an anchored seq, or cutting the log short of it, is
then detected; what was written after the newest anchor can only be checked for consistency.

Durability: WAL with `synchronous=FULL`, unlike the outbox's NORMAL. A record's head may be
anchored upstream as soon as it is committed; if a power cut then rolled the commit back (which
NORMAL allows in WAL mode), the log would no longer reach the anchored head and verification
would raise a false tamper alarm, and the record of a write a device really received would be
gone. Audit records are few (one per device write, not per sample), so one fsync per commit is
affordable.

Writing never blocks or breaks control. `append` (and the typed helpers `device_write`,
`intent`, `override_set`, ...) only queue in memory; `flush` commits the queue in one transaction
on a worker thread (`commit` is its async form, with a bounded wait). Storage trouble (disk full,
read-only file system, I/O error: classified with gateway.outbox.storage_condition) keeps the
queue, sets `storage_condition`, counts `failed_commits` and retries at the next commit; beyond
MAX_PENDING_RECORDS the oldest queued records are dropped and one `records_lost` record, committed
before the survivors, says how many and over which time span, so the chain stays intact and the
loss is itself on the record.

Order guarantee for device writes: the control loop appends the record of each write once the
driver returned its verified result and awaits `commit` before it records the decision or the
reported state that tells the headend about it. So a write the headend learns of is in the audit
log first, unless the storage is failing or stalled (then control goes on, reports the condition
in the ReportedState notes, and the record follows when the storage recovers).

The file is opened in WAL mode without an exclusive lock so that `dergw audit verify` can read a
running gateway's log (read-only); one gateway per state_dir is enforced by the outbox's
exclusive lock, and the seq primary key refuses interleaved writers. Triggers refuse UPDATE and
DELETE: a guard against mistakes, not attackers (the chain and the anchor are the defence).

Pure functions (`record_bytes`, `record_hash`, `verify_chain`) over plain records; I/O in
`AuditLog` (writer) and `read_records` / `verify_file` (read-only).
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import json
import logging
import sqlite3
import struct
import threading
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.clock import Clock
from gateway.outbox import storage_condition

if TYPE_CHECKING:
    from drivers.contract import WriteResult
    from gateway.safety import SafeSetpoint

__all__ = [
    "GENESIS_PREV",
    "HASH_SIZE",
    "MAX_PENDING_RECORDS",
    "AuditFileError",
    "AuditHead",
    "AuditKind",
    "AuditLog",
    "AuditProblem",
    "AuditRecord",
    "AuditVerdict",
    "canonical_json",
    "chain",
    "parse_anchor",
    "read_records",
    "record_bytes",
    "record_hash",
    "verify_chain",
    "verify_file",
]

log = logging.getLogger(__name__)

HASH_SIZE = 32
GENESIS_PREV = bytes(HASH_SIZE)  # the `prev` of seq 1
_DOMAIN = b"dergw.audit.v1\x00"  # versions the encoding; never valid UTF-8 text of a field
_SCHEMA_VERSION = 1
# Records queued in memory while the storage refuses commits; beyond this the oldest are dropped
# (and counted in a `records_lost` record) rather than letting memory grow without bound.
MAX_PENDING_RECORDS = 50_000
# How long `commit` waits for its transaction before control goes on without it.
COMMIT_WAIT_S = 1.0


class AuditKind(enum.StrEnum):
    """What an audit record is about."""

    DEVICE_WRITE = "device_write"
    INTENT_ACCEPTED = "intent_accepted"
    INTENT_REJECTED = "intent_rejected"
    OVERRIDE_SET = "override_set"
    OVERRIDE_CLEARED = "override_cleared"
    OVERRIDE_EXPIRED = "override_expired"
    RECORDS_LOST = "records_lost"  # queued records dropped while the storage refused commits


class AuditProblem(enum.StrEnum):
    """What `verify_chain` found wrong (the first problem, in seq order)."""

    EDITED = "edited record"  # the stored hash is not the hash of the stored fields
    BROKEN_LINK = "broken link"  # `prev` is not the hash of the record before
    GAP = "gap"  # a seq is missing (deleted record), out of order, or the log does not start at 1
    TRUNCATED = "truncated below anchored head"  # the log ends before the anchored seq
    HEAD_MISMATCH = "head mismatch"  # the record at the anchored seq is not the anchored one
    MALFORMED = "malformed record"  # a stored value of the wrong type


class AuditFileError(Exception):
    """The audit file cannot be read as an audit log (missing, not SQLite, wrong schema)."""


@dataclass(frozen=True, slots=True)
class AuditHead:
    """The newest record of a log: its seq and hash (seq 0, empty hash: an empty log)."""

    seq: int
    hash: bytes


@dataclass(frozen=True, slots=True)
class AuditRecord:
    seq: int
    wall_ns: int
    kind: str  # an AuditKind value (kept as text: a verifier must read unknown kinds too)
    origin: str
    subject: str
    detail: str  # canonical JSON text
    prev: bytes
    hash: bytes


@dataclass(frozen=True, slots=True)
class AuditVerdict:
    ok: bool
    records: int  # records checked
    head: AuditHead  # the log's newest record as stored (checked or not)
    first_bad_seq: int | None = None
    problem: AuditProblem | None = None
    detail: str = ""

    def describe(self) -> str:
        if self.ok:
            return (
                f"intact: {self.records} records, head seq {self.head.seq} {self.head.hash.hex()}"
            )
        return f"TAMPERED at seq {self.first_bad_seq}: {self.problem}: {self.detail}"


# -- the encoding (pure) -------------------------------------------------------------------------


def canonical_json(value: object) -> str:
    """The one JSON text of `value`: sorted keys, no spaces, UTF-8 (not \\u escapes), no NaN."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def _text(value: str) -> bytes:
    # surrogateescape: a verifier reads text columns as raw bytes and hashes exactly those, even
    # when an attacker stored bytes that are not UTF-8.
    return value.encode("utf-8", "surrogateescape")


def record_bytes(
    seq: int, wall_ns: int, kind: str, origin: str, subject: str, detail: str, prev: bytes
) -> bytes:
    """The bytes a record's hash covers:

        b"dergw.audit.v1\\0" || i64be(seq) || i64be(wall_ns)
        || for each of kind, origin, subject, detail: u32be(len(utf8)) || utf8
        || u32be(len(prev)) || prev

    Every variable field is length-prefixed, so no two different records share an encoding
    (moving bytes from one field to the next changes a length).
    """
    parts = [_DOMAIN, struct.pack(">qq", seq, wall_ns)]
    for field in (kind, origin, subject, detail):
        raw = _text(field)
        parts += (struct.pack(">I", len(raw)), raw)
    parts += (struct.pack(">I", len(prev)), prev)
    return b"".join(parts)


def record_hash(
    seq: int, wall_ns: int, kind: str, origin: str, subject: str, detail: str, prev: bytes
) -> bytes:
    """SHA-256 of `record_bytes(...)`."""
    return hashlib.sha256(record_bytes(seq, wall_ns, kind, origin, subject, detail, prev)).digest()


def _rehash(record: AuditRecord) -> bytes:
    return record_hash(
        record.seq,
        record.wall_ns,
        record.kind,
        record.origin,
        record.subject,
        record.detail,
        record.prev,
    )


def chain(head: AuditHead, events: Iterable[tuple[int, str, str, str, str]]) -> list[AuditRecord]:
    """The records that `events` (wall_ns, kind, origin, subject, detail) become after `head`."""
    seq, prev = head.seq, head.hash if head.seq else GENESIS_PREV
    records = []
    for wall_ns, kind, origin, subject, detail in events:
        seq += 1
        digest = record_hash(seq, wall_ns, kind, origin, subject, detail, prev)
        records.append(AuditRecord(seq, wall_ns, kind, origin, subject, detail, prev, digest))
        prev = digest
    return records


def verify_chain(records: Iterable[AuditRecord], anchor: AuditHead | None = None) -> AuditVerdict:
    """Check `records` (in stored order) form the chain from seq 1, and reach `anchor` if given.

    Reports the first problem in seq order. Per record, in this order: the seq is the next one
    (else GAP: deleted, moved or missing records), the stored hash is the hash of the stored
    fields (else EDITED: a field or the hash was changed), `prev` is the hash of the record before
    (else BROKEN_LINK: the record before was re-hashed after an edit, or records were spliced),
    and at the anchored seq the hash is the anchored hash (else HEAD_MISMATCH: the log was
    rewritten, consistently, up to there). Finally a log that ends below the anchored seq is
    TRUNCATED. An anchor of seq 0 (an empty log reported) constrains nothing.
    """
    expected, prev = 1, GENESIS_PREV
    last = AuditHead(0, b"")
    count = 0

    def bad(seq: int, problem: AuditProblem, detail: str) -> AuditVerdict:
        return AuditVerdict(False, count, last, seq, problem, detail)

    for record in records:
        last = AuditHead(record.seq, record.hash)
        if record.seq != expected:
            if record.seq > expected:
                missing = (
                    f"seq {expected}"
                    if record.seq == expected + 1
                    else f"seqs {expected}..{record.seq - 1}"
                )
                return bad(
                    expected, AuditProblem.GAP, f"{missing} missing (next stored: {record.seq})"
                )
            return bad(
                expected,
                AuditProblem.GAP,
                f"expected seq {expected}, found seq {record.seq} (out of order or duplicated)",
            )
        if record.hash != _rehash(record):
            return bad(
                record.seq,
                AuditProblem.EDITED,
                "the stored hash does not match the record's fields: the record was edited",
            )
        if record.prev != prev:
            return bad(
                record.seq,
                AuditProblem.BROKEN_LINK,
                f"prev does not match the hash of seq {record.seq - 1}: that record was rewritten "
                "(and re-hashed) or records were spliced",
            )
        if anchor is not None and anchor.seq == record.seq and anchor.hash != record.hash:
            return bad(
                record.seq,
                AuditProblem.HEAD_MISMATCH,
                f"the anchored head is {anchor.hash.hex()} but the log holds {record.hash.hex()}: "
                f"the log was rewritten at or before seq {record.seq} and re-hashed from there on",
            )
        prev = record.hash
        expected += 1
        count += 1
    if anchor is not None and anchor.seq >= expected:
        return bad(
            expected,
            AuditProblem.TRUNCATED,
            f"the log ends at seq {expected - 1} but seq {anchor.seq} was anchored upstream: "
            f"records {expected}..{anchor.seq} (at least) were removed",
        )
    return AuditVerdict(True, count, last)


def parse_anchor(text: str) -> AuditHead:
    """`SEQ:HEX` (as `dergw audit show` and the headend print it) to an AuditHead."""
    seq_text, sep, hex_text = text.partition(":")
    try:
        if not sep:
            raise ValueError("no ':'")
        seq = int(seq_text)
        digest = bytes.fromhex(hex_text)
    except ValueError as exc:
        raise ValueError(
            f"anchor {text!r} is not SEQ:HEX (e.g. 42:{'ab' * HASH_SIZE}): {exc}"
        ) from exc
    if seq < 0 or (seq > 0 and len(digest) != HASH_SIZE):
        raise ValueError(
            f"anchor {text!r}: seq must be >= 0 and the hash {HASH_SIZE} bytes "
            f"({2 * HASH_SIZE} hex digits)"
        )
    return AuditHead(seq, digest)


# -- the file ------------------------------------------------------------------------------------

_CREATE = (
    "CREATE TABLE audit (seq INTEGER PRIMARY KEY, wall_ns INTEGER NOT NULL, kind TEXT NOT NULL, "
    "origin TEXT NOT NULL, subject TEXT NOT NULL, detail TEXT NOT NULL, prev BLOB NOT NULL, "
    "hash BLOB NOT NULL)",
    "CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit "
    "BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END",
    "CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit "
    "BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END",
    f"PRAGMA user_version={_SCHEMA_VERSION}",
)
_COLUMNS = "seq, wall_ns, kind, origin, subject, detail, prev, hash"


def _open_read_only(path: Path) -> sqlite3.Connection:
    if not path.is_file():
        raise AuditFileError(
            f"no audit log at {path}: give the gateway's <state_dir>/audit.db (or --config)"
        )
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5.0)
        # Raw bytes for text: the verifier hashes exactly what is stored, UTF-8 or not.
        conn.text_factory = bytes
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        table = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'audit'").fetchone()
    except sqlite3.DatabaseError as exc:
        raise AuditFileError(f"{path} cannot be read as a SQLite database: {exc}") from exc
    if version != _SCHEMA_VERSION or table is None:
        conn.close()
        raise AuditFileError(
            f"{path} is not an audit log this dergw reads (schema version {version}, audit "
            f"table {'present' if table else 'missing'}; expected version {_SCHEMA_VERSION}): "
            "if it was the gateway's audit.db, it was replaced or its table dropped"
        )
    return conn


class _Malformed(Exception):
    def __init__(self, seq: int, detail: str) -> None:
        super().__init__(detail)
        self.seq = seq


def _as_text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    # An integer or real stored into a text column: hash its text form (a changed value fails).
    return str(value)


def _as_blob(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    return str(value).encode("utf-8", "surrogateescape")


def _record(row: tuple[object, ...], expected_seq: int) -> AuditRecord:
    seq, wall_ns, kind, origin, subject, detail, prev, digest = row
    if not isinstance(seq, int) or not isinstance(wall_ns, int):
        raise _Malformed(expected_seq, f"seq {seq!r} / wall_ns {wall_ns!r} stored as non-integers")
    return AuditRecord(
        seq,
        wall_ns,
        _as_text(kind),
        _as_text(origin),
        _as_text(subject),
        _as_text(detail),
        _as_blob(prev),
        _as_blob(digest),
    )


def read_records(path: Path, *, after_seq: int = 0) -> Iterator[AuditRecord]:
    """The records of the audit file at `path` (read-only; fine on a running gateway's log).

    Raises AuditFileError when the file is not an audit log, ValueError for a row whose seq or
    time is not an integer.
    """
    conn = _open_read_only(path)
    try:
        # One read transaction: a running gateway's later commits do not tear the snapshot.
        conn.execute("BEGIN")
        expected = after_seq + 1
        for row in conn.execute(
            f"SELECT {_COLUMNS} FROM audit WHERE seq > ? ORDER BY seq", (after_seq,)
        ):
            try:
                record = _record(row, expected)
            except _Malformed as exc:
                raise ValueError(f"seq {exc.seq}: {exc}") from None
            expected = record.seq + 1
            yield record
    finally:
        conn.close()


def verify_file(path: Path, anchor: AuditHead | None = None) -> AuditVerdict:
    """`verify_chain` over the audit file at `path`, a malformed row reported as MALFORMED."""
    conn = _open_read_only(path)
    try:
        conn.execute("BEGIN")
        rows = conn.execute(f"SELECT {_COLUMNS} FROM audit ORDER BY seq")
        malformed: list[_Malformed] = []

        def records() -> Iterator[AuditRecord]:
            expected = 1
            for row in rows:
                try:
                    record = _record(row, expected)
                except _Malformed as exc:
                    malformed.append(exc)
                    return
                expected = record.seq + 1
                yield record

        verdict = verify_chain(records(), anchor)
        if malformed and (verdict.ok or verdict.problem is AuditProblem.TRUNCATED):
            bad = malformed[0]
            return AuditVerdict(
                False, verdict.records, verdict.head, bad.seq, AuditProblem.MALFORMED, str(bad)
            )
        return verdict
    finally:
        conn.close()


# -- the writer ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Event:
    wall_ns: int
    kind: str
    origin: str
    subject: str
    detail: str


def _setpoint_detail(setpoint: SafeSetpoint) -> dict[str, object]:
    return {
        "max_active_power_w": setpoint.max_active_power_w,
        "active_power_w": setpoint.active_power_w,
        "connect": setpoint.connect,
        "revert_after_s": setpoint.revert_after_s,
        "revert_cap_w": setpoint.revert_cap_w,
    }


def _finite(value: float) -> float | None:
    return value if value == value and abs(value) != float("inf") else None


class AuditLog:
    """The audit file at `path` (created if absent), written by one gateway process.

    Thread-safe: `append` and the helpers run on the event loop, `flush` on a worker thread.
    Never raises for storage trouble (see the module docstring); `storage_condition`,
    `failed_commits` and `dropped_records` report it.
    """

    def __init__(self, path: Path, *, clock: Clock) -> None:
        self._path = Path(path)
        self._clock = clock
        self._queue_lock = threading.Lock()  # guards _pending / _dropped / _tickets
        self._db_lock = threading.Lock()  # one transaction at a time
        self._pending: deque[tuple[int, _Event]] = deque()
        self._tickets = 0  # events appended so far (a ticket per event)
        self._done_ticket = 0  # every ticket up to this one was committed or dropped
        # (ticket, event) dropped from the queue, not yet reported by a records_lost record.
        self._dropped: list[tuple[int, _Event]] = []
        self._conn: sqlite3.Connection | None = None
        self._head = AuditHead(0, b"")
        self._closed = False
        self._inflight: asyncio.Future[bool] | None = None
        self._stalled = False  # the last commit() gave up waiting on a transaction still running
        self.storage_condition: str | None = None  # "disk full", ... while commits fail
        self.failed_commits = 0
        self.dropped_records = 0
        self.committed_records = 0
        try:
            self._ensure_open()
        except (sqlite3.Error, OSError) as exc:
            self._storage_trouble(exc, "open")

    @property
    def path(self) -> Path:
        return self._path

    @property
    def pending(self) -> int:
        """Records queued, not yet committed."""
        return len(self._pending)

    def head(self) -> AuditHead:
        """The newest committed record (what may be anchored upstream)."""
        return self._head

    # -- appending (cheap, in memory) --------------------------------------------------------------

    def append(
        self, kind: AuditKind | str, origin: str, subject: str, detail: Mapping[str, object]
    ) -> None:
        """Queue one record; committed by the next `flush`/`commit`. Never does I/O."""
        event = _Event(self._clock.wall_ns(), str(kind), origin, subject, canonical_json(detail))
        with self._queue_lock:
            self._tickets += 1
            self._pending.append((self._tickets, event))
            while len(self._pending) > MAX_PENDING_RECORDS:
                ticket, old = self._pending.popleft()
                self._dropped.append((ticket, old))
                self._done_ticket = max(self._done_ticket, ticket)
                self.dropped_records += 1

    def device_write(
        self,
        setpoint: SafeSetpoint,
        result: WriteResult,
        *,
        origin: str = "control-loop",
        asked_by: Mapping[str, str] | None = None,
        intent_version: int = 0,
    ) -> None:
        """A write issued to a device: the setpoint, why it is bound (`bound_by`), who asked for
        each mode (`asked_by`: mode -> source label) and the driver's verified result."""
        self.append(
            AuditKind.DEVICE_WRITE,
            origin,
            setpoint.device_id,
            {
                "setpoint": _setpoint_detail(setpoint),
                "bound_by": list(setpoint.bound_by),
                "asked_by": dict(asked_by or {}),
                "intent_version": intent_version,
                "result": {
                    "verified": result.ok,
                    "reason": result.reason,
                    "readback": {k: _finite(v) for k, v in sorted(result.readback.items())},
                    "wall_ns": result.wall_ns,
                },
            },
        )

    def intent(self, version: int, accepted: bool, origin: str, reason: str = "") -> None:
        """An intent version accepted (persisted) or rejected, with who sent it (e.g. "headend")
        and why. Call `await commit()` before acknowledging to make it durable first."""
        self.append(
            AuditKind.INTENT_ACCEPTED if accepted else AuditKind.INTENT_REJECTED,
            origin,
            f"intent v{version}",
            {"version": version, "reason": reason},
        )

    def override_set(
        self,
        override_id: str,
        *,
        origin: str,
        scope: str,
        duration_s: float,
        controls: str,
        reason: str = "",
    ) -> None:
        self.append(
            AuditKind.OVERRIDE_SET,
            origin,
            override_id,
            {"scope": scope, "duration_s": duration_s, "controls": controls, "reason": reason},
        )

    def override_cleared(self, override_id: str, *, origin: str, reason: str) -> None:
        self.append(AuditKind.OVERRIDE_CLEARED, origin, override_id, {"reason": reason})

    def override_expired(self, override_id: str, *, set_by: str) -> None:
        self.append(AuditKind.OVERRIDE_EXPIRED, "control-loop", override_id, {"set_by": set_by})

    # -- committing ------------------------------------------------------------------------------

    def flush(self) -> bool:
        """Commit everything queued, in one transaction; True when the queue was committed.

        Storage trouble keeps the queue (and sets `storage_condition`); any other failure is
        logged and counted the same way. Never raises.
        """
        with self._db_lock:
            with self._queue_lock:
                batch = list(self._pending)
                dropped = list(self._dropped)
            if not batch and not dropped:
                return True
            lost = [event for _, event in dropped]
            events = ([_lost_event(lost, self.storage_condition)] if lost else []) + [
                event for _, event in batch
            ]
            try:
                conn = self._ensure_open()
                records = chain(
                    self._head, ((e.wall_ns, e.kind, e.origin, e.subject, e.detail) for e in events)
                )
                conn.execute("BEGIN IMMEDIATE")
                try:
                    conn.executemany(
                        f"INSERT INTO audit ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        [
                            (
                                r.seq,
                                r.wall_ns,
                                r.kind,
                                r.origin,
                                r.subject,
                                r.detail,
                                r.prev,
                                r.hash,
                            )
                            for r in records
                        ],
                    )
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            except Exception as exc:
                self._storage_trouble(exc, "commit")
                return False
            self._head = AuditHead(records[-1].seq, records[-1].hash)
            self.committed_records += len(records)
            last = batch[-1][0] if batch else 0
            with self._queue_lock:
                # `append` may have dropped queue entries meanwhile (queue full): those of this
                # batch were committed after all, so they are not lost.
                while self._pending and self._pending[0][0] <= last:
                    self._pending.popleft()
                reported = {ticket for ticket, _ in dropped}
                kept = [(t, e) for t, e in self._dropped if t not in reported and t > last]
                self.dropped_records -= len(self._dropped) - len(reported) - len(kept)
                self._dropped = kept
                self._done_ticket = max(self._done_ticket, last)
            if self.storage_condition is not None:
                log.warning("the audit log stores records again (was: %s)", self.storage_condition)
                self.storage_condition = None
            return True

    async def commit(self, timeout_s: float = COMMIT_WAIT_S) -> bool:
        """Commit what was appended so far (on a worker thread); True once it is committed.

        Waits at most `timeout_s`; while a transaction from an earlier call is still stuck (a
        stalled disk), returns False at once so control never waits on the audit log twice.
        """
        target = self._tickets
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self._done_ticket < target:
            running = self._inflight is not None and not self._inflight.done()
            if running and self._stalled:
                return False
            if not running:
                self._inflight = asyncio.ensure_future(asyncio.to_thread(self.flush))
            # Our own reference: another caller (the control loop and the local API both commit)
            # may start the next transaction in `_inflight` while we wait on this one.
            inflight = self._inflight
            assert inflight is not None
            done, _ = await asyncio.wait({inflight}, timeout=max(0.0, deadline - loop.time()))
            if not done:
                self._stalled = True
                log.warning(
                    "audit log commit takes longer than %.1f s (storage stalled?); control "
                    "continues, the records are committed when it completes",
                    timeout_s,
                )
                return False
            self._stalled = False
            if not inflight.result():
                return False
        return True

    def close(self) -> None:
        """Commit what is queued (best effort) and close the file. Idempotent."""
        if self._closed:
            return
        self.flush()
        with self._db_lock:
            self._closed = True
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------------

    def _ensure_open(self) -> sqlite3.Connection:
        if self._conn is not None:
            return self._conn
        if self._closed:
            raise sqlite3.ProgrammingError(f"audit log {self._path} is closed")
        # isolation_level=None: BEGIN/COMMIT are explicit, so "returned" means "committed".
        # timeout: the only other connections are read-only verifiers (brief WAL reads).
        conn = sqlite3.connect(
            self._path, check_same_thread=False, isolation_level=None, timeout=2.0
        )
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")  # why: see the module docstring
            conn.execute("BEGIN IMMEDIATE")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                for statement in _CREATE:
                    conn.execute(statement)
            elif version != _SCHEMA_VERSION:
                raise AuditFileError(
                    f"audit log {self._path} has schema version {version}, this dergw writes "
                    f"version {_SCHEMA_VERSION}; move the file aside (keep it: it is evidence)"
                )
            row = conn.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
            conn.execute("COMMIT")
        except BaseException:
            conn.close()
            raise
        # Continue the chain from the stored head; whether the stored log is intact is for
        # `dergw audit verify` to say (a full check here would cost start-up time).
        self._head = AuditHead(int(row[0]), bytes(row[1])) if row is not None else AuditHead(0, b"")
        self._conn = conn
        return conn

    def _storage_trouble(self, exc: BaseException, doing: str) -> None:
        self.failed_commits += 1
        condition = storage_condition(exc, self._path) or f"{type(exc).__name__}: {exc}"
        if condition != self.storage_condition:
            log.error(
                "audit log %s: cannot %s (%s): records wait in memory and control continues (%s)",
                self._path,
                doing,
                condition,
                exc,
            )
            self.storage_condition = condition
        if self._conn is not None:
            # Reopen next time: the connection may be unusable after an I/O error, and reopening
            # reloads the head in case the file changed under us.
            self._conn.close()
            self._conn = None


def _lost_event(dropped: list[_Event], condition: str | None) -> _Event:
    kinds: dict[str, int] = {}
    for event in dropped:
        kinds[event.kind] = kinds.get(event.kind, 0) + 1
    return _Event(
        dropped[-1].wall_ns,
        str(AuditKind.RECORDS_LOST),
        "audit-log",
        "audit",
        canonical_json(
            {
                "records": len(dropped),
                "kinds": kinds,
                "first_wall_ns": dropped[0].wall_ns,
                "last_wall_ns": dropped[-1].wall_ns,
                "reason": f"the storage refused commits ({condition or 'unknown'}) and more than "
                f"{MAX_PENDING_RECORDS} records were waiting in memory",
            }
        ),
    )

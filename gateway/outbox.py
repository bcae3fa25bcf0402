"""The durable store-and-forward outbox: every up record, in seq order, until the headend acks it.

Owns the outbox SQLite file and the gateway-scoped record sequence number (`seq`). Everything the
gateway reports (samples, event responses, reported state, decisions, intent status, clock syncs)
is appended here first; the uplink drains it and deletes rows only once the headend acknowledged
them after its own commit. Invariants (tested):

* **Gap-free, never backwards.** `append` assigns consecutive seqs and persists `next_seq` in the
  same transaction as the rows, so a seq is never reused: not after every row was acked and
  deleted, not across restarts, not after `kill -9`. A Gap row stands for the seqs
  `seq..through_seq`; every other row has `through_seq == seq`. Held rows never overlap, and
  every seq from the oldest held to the last assigned is held (Gap spans included) or was
  acknowledged (acks may cover ranges above the watermark: the live lane runs ahead).
* **Committed means kept.** `append` returns only after its transaction committed; a process crash
  (even `kill -9`) at any later moment loses nothing it returned.
* **Rows leave only by ack or by the documented quota policy.** `ack` deletes what the headend
  committed; when `quota_bytes` is set, `_make_room` sheds by the policy below and every record it
  sheds is counted in exactly one Gap row, which travels upstream like any other record.

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

Quota (`[outbox] quota_bytes`). The outbox accounts `held_bytes` = payload bytes +
ROW_OVERHEAD_BYTES per row (SQLite's own cost of a row; see the constant). Before a batch is
appended, `_make_room` sheds until the batch fits, down to 95 % of the quota so that shedding runs
once per 5 % of quota rather than on every append. Policy, oldest first within each step, each
step only when the previous one has nothing left to shed:

  1. raw samples are thinned to aggregates: a run of consecutive sample rows (at most 4096)
     becomes one aggregated DeviceSample per device, point schema, boot id and clock state (mean
     of the GOOD values, min, max, `aggregated_reads`, `window_start`..`time`) at the start of
     the run, and one Gap row ("sample thinned to aggregates") for the rest of the run's seqs; a
     run that would not shrink (one read per device) stays as it is until step 2;
  2. aggregated samples, flexibility and reported-state rows are dropped;
  3. decisions are dropped;
  4. event responses, intent statuses and clock syncs are dropped, last.

A dropped stretch of rows becomes one Gap row covering its seqs, merged with the Gap rows next to
it (counts summed, time range and device ids united, `what` lists the kinds). Gap rows are never
dropped. If the batch alone cannot fit after everything older was shed, the batch itself is shed
the same way: the quota never makes `append` fail. A Gap's `records`, `points` and `bytes` count
the records as they were appended (an aggregate the outbox made counts nothing more when it is
dropped: its reads were counted by the thinning Gap), so the sum over all Gap rows ever written is
exactly what was shed (`stats().shed_records`; Gap rows appended from outside, such as the
recorder's "not stored" ones, are not part of that count). The outbox does not know which rows
are in flight: a row sent but not yet acked may be shed too, and the headend then holds the record
and a Gap (or aggregate) that also counts it; that over-reports the loss, the safe side. The file on
disk is larger than `held_bytes` by the WAL (bounded by the auto-checkpoint and
`journal_size_limit`) and by free pages, which SQLite reuses; it does not grow beyond the quota's
high-water mark plus those.

Storage trouble (disk full, read-only file system, I/O error) raises OutboxStorageError, whose
`condition` names it and whose message says what to do; nothing is half-written (the transaction
rolls back) and the outbox stays usable once the condition clears.

Threading: the async runtime calls in through `asyncio.to_thread`, so every method takes one lock
and the connection is opened with `check_same_thread=False`. The file is opened with an exclusive
lock, so a second gateway process pointed at the same state directory fails fast instead of
interleaving seqs.

Plain synchronous SQLite I/O only: no asyncio, no gRPC.
"""

from __future__ import annotations

import enum
import errno
import math
import os
import sqlite3
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path
from typing import TypeVar

import numpy as np
from google.protobuf.message import Message

from dergw.v1 import ns_from_timestamp, pb, timestamp_from_ns
from gateway.clock import Clock
from gateway.statedb import StateFile, open_state_db

__all__ = [
    "MIN_QUOTA_BYTES",
    "ROW_OVERHEAD_BYTES",
    "AckBeyondHeadError",
    "GapAccount",
    "Outbox",
    "OutboxClosedError",
    "OutboxError",
    "OutboxLockedError",
    "OutboxNotEmptyError",
    "OutboxRow",
    "OutboxSchemaError",
    "OutboxStats",
    "OutboxStorageError",
    "RecordKind",
]

_SCHEMA_VERSION = 2
_FIRST_SEQ = 1  # seq 0 means "none" on the wire (Register.oldest_unacked_seq, RegisterAck)
_MAX_SEQ = 2**63 - 1  # SQLite INTEGER is signed 64-bit; the wire's uint64 is wider

# What one row costs SQLite beyond its payload, for the quota. Measured on this schema (WAL,
# 4 KiB pages, 20,000 rows, size of the table b-tree after a checkpoint): 25-28 B per row for
# 20-150 B payloads (cell and record headers: rowid, through_seq, kind, created_wall_ns, the
# payload length, the cell pointer), about 52 B for the 200-600 B of a typical DeviceSample (plus
# the space a 4 KiB page cannot fill), 84 B for 100-1000 B. 64 B is the figure for the rows the
# outbox mostly holds; larger rows are off by at most one page share per row.
ROW_OVERHEAD_BYTES = 64
# The smallest quota accepted: Gap rows are never shed, so the quota must leave room for them.
MIN_QUOTA_BYTES = 64 * 1024
# Shed down to (1 - this) x quota, so that shedding runs once per 5 % of quota, not per append.
SHED_CHUNK_FRACTION = 0.05
# Longest stretch of rows shed (thinned or dropped) as one unit; also bounds memory.
_MAX_STRETCH_ROWS = 4096
_SCAN_PAGE_ROWS = 1024

# SQLite primary result codes (extended codes carry them in the low byte).
_SQLITE_READONLY = 8
_SQLITE_IOERR = 10
_SQLITE_CORRUPT = 11
_SQLITE_FULL = 13
_SQLITE_CANTOPEN = 14

DISK_FULL = "disk full"
READ_ONLY = "read-only file system"
IO_ERROR = "I/O error"


class RecordKind(enum.IntEnum):
    """What an outbox row holds: the field number of `dergw.v1.Record`'s `body` oneof."""

    SAMPLE = 2  # DeviceSample
    EVENT_RESPONSE = 3  # EventResponse
    REPORTED_STATE = 4  # ReportedState
    DECISION = 5  # Decision
    INTENT_STATUS = 6  # IntentStatus
    FLEXIBILITY = 7  # Flexibility
    GAP = 8  # Gap: what the quota shed (the row stands for seq..through_seq)
    CLOCK_SYNC = 9  # ClockSync


_KINDS = frozenset(int(kind) for kind in RecordKind)
_GAP = int(RecordKind.GAP)
_SAMPLE = int(RecordKind.SAMPLE)

# Shedding step at which a kind may be dropped (step 1 thins raw samples; Gap: never).
_DROP_STEP = {
    int(RecordKind.SAMPLE): 2,
    int(RecordKind.FLEXIBILITY): 2,
    int(RecordKind.REPORTED_STATE): 2,
    int(RecordKind.DECISION): 3,
    int(RecordKind.EVENT_RESPONSE): 4,
    int(RecordKind.INTENT_STATUS): 4,
    int(RecordKind.CLOCK_SYNC): 4,
}
_LAST_STEP = 4

# The message class of each kind, for reading a record's time when it is shed.
_BODY: dict[int, type[Message]] = {
    int(RecordKind.SAMPLE): pb.DeviceSample,
    int(RecordKind.EVENT_RESPONSE): pb.EventResponse,
    int(RecordKind.REPORTED_STATE): pb.ReportedState,
    int(RecordKind.DECISION): pb.Decision,
    int(RecordKind.INTENT_STATUS): pb.IntentStatus,
    int(RecordKind.FLEXIBILITY): pb.Flexibility,
    int(RecordKind.CLOCK_SYNC): pb.ClockSync,
}

_M = TypeVar("_M", bound=Message)

THINNED = "sample thinned to aggregates"
AGGREGATES = "sample aggregates"


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


class OutboxStorageError(OutboxError):
    """The storage refused a write; nothing was changed. `condition` says which trouble:
    "disk full", "read-only file system" or "I/O error"."""

    def __init__(self, message: str, *, condition: str) -> None:
        super().__init__(message)
        self.condition = condition


@dataclass(frozen=True, slots=True)
class OutboxRow:
    seq: int
    kind: int  # a RecordKind value
    payload: bytes  # the serialized body message (e.g. a DeviceSample)
    created_wall_ns: int  # when it was appended (gateway wall clock)
    # The last seq this row stands for: == seq, except for a Gap row (seq..through_seq).
    # 0 when constructing means "== seq".
    through_seq: int = 0

    def __post_init__(self) -> None:
        if self.through_seq == 0:
            object.__setattr__(self, "through_seq", self.seq)


@dataclass(frozen=True, slots=True)
class OutboxStats:
    rows: int
    oldest_seq: int | None  # None when empty
    next_seq: int  # the seq the next appended row will get
    payload_bytes: int  # sum of payload sizes held (not the file size)
    oldest_created_wall_ns: int | None  # None when empty
    quota_bytes: int | None = None  # None: no quota
    held_bytes: int = 0  # what the quota counts: payload_bytes + ROW_OVERHEAD_BYTES per row
    shed_records: int = 0  # records shed by the quota over the file's life
    gap_rows: int = 0  # Gap rows held now


# -- storage errors -------------------------------------------------------------------------------


def _statvfs_condition(path: Path) -> str | None:
    try:
        st = os.statvfs(path.parent)
    except OSError:
        return None
    if st.f_flag & os.ST_RDONLY:
        return READ_ONLY
    if st.f_bavail == 0:
        return DISK_FULL
    return None


def storage_condition(exc: BaseException, path: Path) -> str | None:
    """The storage trouble behind `exc` ("disk full", ...), or None when it is something else.

    SQLite reports a failed write() as a generic I/O error, so the file system is asked too: a
    read-only mount or no free blocks say which trouble it really is.
    """
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        primary = code & 0xFF if isinstance(code, int) else None
        if primary == _SQLITE_FULL:
            return DISK_FULL
        if primary == _SQLITE_READONLY:
            return READ_ONLY
        if primary in (_SQLITE_IOERR, _SQLITE_CANTOPEN, _SQLITE_CORRUPT):
            return _statvfs_condition(path) or (IO_ERROR if primary == _SQLITE_IOERR else None)
        return None
    if isinstance(exc, OSError):
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return DISK_FULL
        if exc.errno == errno.EROFS:
            return READ_ONLY
        if exc.errno in (errno.EIO, errno.EFBIG):
            return _statvfs_condition(path) or IO_ERROR
    return None


_ADVICE = {
    DISK_FULL: (
        "free space on the file system holding {dir}, or set [outbox] quota_bytes below the free "
        "space so that the outbox sheds by its policy instead of filling the disk"
    ),
    READ_ONLY: (
        "the file system holding {dir} is read-only (a failing SD card is remounted read-only by "
        "the kernel): check `dmesg`, remount it read-write or replace the storage, then restart "
        "the gateway"
    ),
    IO_ERROR: (
        "the storage holding {dir} fails writes: check `dmesg` and the card's health, and replace "
        "it if errors persist"
    ),
}


def _storage_error(exc: BaseException, path: Path, doing: str) -> OutboxStorageError | None:
    condition = storage_condition(exc, path)
    if condition is None:
        return None
    advice = _ADVICE[condition].format(dir=path.parent)
    return OutboxStorageError(
        f"outbox {path}: cannot {doing}: {condition} ({exc}). Nothing was changed; control "
        f"continues and new records wait in memory. To fix: {advice}",
        condition=condition,
    )


# -- Gap records ---------------------------------------------------------------------------------


def _parse(cls: type[_M], payload: bytes) -> _M:
    """`payload` as a `cls`; an empty one if it does not parse (shedding never fails on it: the
    record is still counted, just without a time or device)."""
    try:
        return cls.FromString(payload)
    except Exception:
        return cls()


def _times(kind: int, payload: bytes) -> tuple[int | None, int | None]:
    body = _BODY.get(kind)
    if body is None:
        return None, None
    message = _parse(body, payload)
    if not message.HasField("time"):
        return None, None
    ns = ns_from_timestamp(message.time)  # type: ignore[attr-defined]
    return ns, ns


@dataclass(slots=True)
class GapAccount:
    """Builds one Gap record: what was lost, how many records and points, over which time range.

    `add_record` counts one record as appended (raw samples contribute their points and device),
    `add_gap` merges an existing Gap, `add_sample` takes an already parsed DeviceSample. An
    aggregated sample counts no records, points or bytes (its reads were counted when it was
    made), only its time window and device.
    """

    parts: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    records: int = 0
    points: int = 0
    byte_count: int = 0  # Gap.bytes
    first_ns: int | None = None
    last_ns: int | None = None
    device_ids: set[str] = field(default_factory=set)
    kinds: Counter[str] = field(default_factory=Counter)

    def add_part(self, what: str) -> None:
        for part in what.split(", "):
            if part and part not in self.parts:
                self.parts.append(part)

    def add_reason(self, reason: str) -> None:
        if reason and reason not in self.reasons:
            self.reasons.append(reason)

    def add_time(self, first_ns: int | None, last_ns: int | None) -> None:
        if first_ns is not None:
            self.first_ns = first_ns if self.first_ns is None else min(self.first_ns, first_ns)
        if last_ns is not None:
            self.last_ns = last_ns if self.last_ns is None else max(self.last_ns, last_ns)

    def add_sample(self, sample: pb.DeviceSample, size: int, *, what: str | None = None) -> None:
        if sample.aggregated_reads:
            self.add_part(what or AGGREGATES)
            start = sample.window_start if sample.HasField("window_start") else sample.time
            self.add_time(ns_from_timestamp(start), ns_from_timestamp(sample.time))
        else:
            self.add_part(what or "sample")
            self.records += 1
            self.points += len(sample.values)
            self.byte_count += size
            self.kinds["sample"] += 1
            if sample.HasField("time"):
                ns = ns_from_timestamp(sample.time)
                self.add_time(ns, ns)
        if sample.device_id:
            self.device_ids.add(sample.device_id)

    def add_record(self, kind: int, payload: bytes, *, what: str | None = None) -> None:
        if kind == _GAP:
            self.add_gap(payload)
            return
        if kind == _SAMPLE:
            self.add_sample(_parse(pb.DeviceSample, payload), len(payload), what=what)
            return
        name = _kind_name(kind)
        self.add_part(what or name)
        self.records += 1
        self.byte_count += len(payload)
        self.kinds[name] += 1
        self.add_time(*_times(kind, payload))

    def add_gap(self, payload: bytes) -> None:
        gap = _parse(pb.Gap, payload)
        self.add_part(gap.what)
        for reason in gap.reason.split("; "):
            self.add_reason(reason)
        self.records += gap.records
        self.points += gap.points
        self.byte_count += gap.bytes
        self.add_time(
            ns_from_timestamp(gap.first_time) if gap.HasField("first_time") else None,
            ns_from_timestamp(gap.last_time) if gap.HasField("last_time") else None,
        )
        self.device_ids.update(gap.device_ids)

    @property
    def empty(self) -> bool:
        return not self.parts

    def message(self) -> pb.Gap:
        gap = pb.Gap(
            what=", ".join(self.parts),
            records=self.records,
            points=self.points,
            bytes=self.byte_count,
            reason="; ".join(self.reasons),
            device_ids=sorted(self.device_ids),
        )
        if self.first_ns is not None:
            gap.first_time.CopyFrom(timestamp_from_ns(self.first_ns))
        if self.last_ns is not None:
            gap.last_time.CopyFrom(timestamp_from_ns(self.last_ns))
        return gap

    def payload(self) -> bytes:
        return self.message().SerializeToString()


def _kind_name(kind: int) -> str:
    try:
        return RecordKind(kind).name.lower()
    except ValueError:
        return f"kind {kind}"


# -- shedding: pure functions over rows ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Replacement:
    """Rows `old` (a consecutive run of seqs) are replaced by `new` covering the same seqs."""

    old: list[OutboxRow]
    new: list[OutboxRow]
    new_records: int  # records newly counted as shed (Gap.records added)

    @property
    def first_seq(self) -> int:
        return self.old[0].seq

    @property
    def last_seq(self) -> int:
        return self.old[-1].through_seq

    @property
    def freed(self) -> int:
        return _held(self.old) - _held(self.new)


def _held(rows: Iterable[OutboxRow]) -> int:
    return sum(len(row.payload) + ROW_OVERHEAD_BYTES for row in rows)


def _stretches(
    rows: Iterable[OutboxRow], member: Callable[[OutboxRow], bool]
) -> Iterator[list[OutboxRow]]:
    """Maximal runs of consecutive member rows (at most _MAX_STRETCH_ROWS each), oldest first."""
    stretch: list[OutboxRow] = []
    for row in rows:
        if not member(row) or (stretch and row.seq != stretch[-1].through_seq + 1):
            if stretch:
                yield stretch
                stretch = []
            if not member(row):
                continue
        stretch.append(row)
        if len(stretch) >= _MAX_STRETCH_ROWS:
            yield stretch
            stretch = []
    if stretch:
        yield stretch


def _thin(run: list[OutboxRow], reason: str) -> _Replacement | None:
    """One aggregate per device (and schema, boot, clock state) + one Gap for the rest of `run`.

    None when that would not free space (e.g. one read per device).
    """
    groups: dict[tuple[object, ...], _Aggregate] = {}
    gap = GapAccount(reasons=[reason])
    for row in run:
        sample = _parse(pb.DeviceSample, row.payload)
        key = (
            sample.device_id,
            tuple(sample.names),
            tuple(sample.units),
            sample.boot_id,
            sample.clock_synced,
        )
        aggregate = groups.get(key)
        if aggregate is None:
            aggregate = groups[key] = _Aggregate(len(sample.values))
        aggregate.add(sample)
        gap.add_sample(sample, len(row.payload), what=THINNED)
    if len(groups) + 1 > len(run):
        return None
    first = run[0]
    new = [
        OutboxRow(first.seq + i, _SAMPLE, aggregate.payload(), first.created_wall_ns)
        for i, aggregate in enumerate(groups.values())
    ]
    new.append(
        OutboxRow(
            first.seq + len(groups), _GAP, gap.payload(), first.created_wall_ns, run[-1].through_seq
        )
    )
    replacement = _Replacement(run, new, gap.records)
    return replacement if replacement.freed > 0 else None


class _Aggregate:
    """One device's reads: GOOD-value mean (weighted by reads), min, max, read count, window.

    Reads are collected and reduced at once in `payload` (numpy per read costs more than the
    protobuf parse)."""

    def __init__(self, points: int) -> None:
        self.points = points
        self.last = pb.DeviceSample()
        self.reads = 0
        self.start_ns: int | None = None
        self.values: list[list[float]] = []
        self.quality: list[list[int]] = []
        self.low: list[list[float]] = []
        self.high: list[list[float]] = []
        self.weights: list[int] = []

    def add(self, sample: pb.DeviceSample) -> None:
        n = max(1, sample.aggregated_reads)
        self.reads += n
        start = sample.window_start if sample.aggregated_reads else sample.time
        start_ns = ns_from_timestamp(start)
        self.start_ns = start_ns if self.start_ns is None else min(self.start_ns, start_ns)
        self.last = sample
        points = self.points
        values = list(sample.values)
        if len(values) != points or len(sample.quality) != points:
            return  # malformed: counted in the Gap, not in the means
        self.values.append(values)
        self.quality.append(list(sample.quality))
        self.low.append(list(sample.min_values) if len(sample.min_values) == points else values)
        self.high.append(list(sample.max_values) if len(sample.max_values) == points else values)
        self.weights.append(n)

    def payload(self) -> bytes:
        last = self.last
        shape = (len(self.values), self.points)
        values = np.array(self.values, dtype=np.float64).reshape(shape)
        good = (np.array(self.quality).reshape(shape) == pb.QUALITY_GOOD) & np.isfinite(values)
        weights = np.array(self.weights, dtype=np.float64)[:, None] * good
        any_good = good.any(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            total = np.where(good, values, 0.0) * weights
            mean = np.where(
                any_good, total.sum(axis=0) / np.maximum(weights.sum(axis=0), 1), math.nan
            )
        low = np.where(good, np.array(self.low).reshape(shape), np.inf).min(axis=0, initial=np.inf)
        high = np.where(good, np.array(self.high).reshape(shape), -np.inf).max(
            axis=0, initial=-np.inf
        )
        quality = [
            pb.QUALITY_GOOD if ok else q
            for ok, q in zip(any_good.tolist(), last.quality, strict=False)
        ]
        aggregate = pb.DeviceSample(
            device_id=last.device_id,
            time=last.time,
            monotonic_ns=last.monotonic_ns,
            names=last.names,
            units=last.units,
            values=mean.tolist(),
            quality=quality,
            error="" if any_good.any() else last.error,
            boot_id=last.boot_id,
            clock_synced=last.clock_synced,
            aggregated_reads=self.reads,
            min_values=np.where(any_good, low, math.nan).tolist(),
            max_values=np.where(any_good, high, math.nan).tolist(),
        )
        if self.start_ns is not None:
            aggregate.window_start.CopyFrom(timestamp_from_ns(self.start_ns))
        return aggregate.SerializeToString()


def _collapse(stretch: list[OutboxRow], reason: str) -> _Replacement | None:
    """The whole stretch (droppable rows and Gap rows) as one Gap row; None if nothing gained."""
    if len(stretch) == 1 and stretch[0].kind == _GAP:
        return None
    account = GapAccount()
    before = 0
    for row in stretch:
        if row.kind == _GAP:
            before += _parse(pb.Gap, row.payload).records
        account.add_record(row.kind, row.payload)
    account.add_reason(reason)
    first = stretch[0]
    new = OutboxRow(
        first.seq, _GAP, account.payload(), first.created_wall_ns, stretch[-1].through_seq
    )
    replacement = _Replacement(stretch, [new], account.records - before)
    return replacement if replacement.freed > 0 else None


def _member(step: int) -> Callable[[OutboxRow], bool]:
    if step == 1:
        return lambda row: row.kind == _SAMPLE
    return lambda row: row.kind == _GAP or _DROP_STEP.get(row.kind, _LAST_STEP + 1) <= step


def _replace(step: int, stretch: list[OutboxRow], reason: str) -> _Replacement | None:
    return _thin(stretch, reason) if step == 1 else _collapse(stretch, reason)


def _shed_list(rows: list[OutboxRow], need: int, reason: str) -> tuple[list[OutboxRow], int]:
    """Shed from in-memory `rows` (consecutive seqs) by the policy until `need` bytes are freed
    or nothing is left to shed; return the new rows and the records newly counted as shed."""
    shed = 0
    for step in range(1, _LAST_STEP + 1):
        if need <= 0:
            break
        replacements: list[_Replacement] = []
        for stretch in _stretches(rows, _member(step)):
            replacement = _replace(step, stretch, reason)
            if replacement is None:
                continue
            replacements.append(replacement)
            need -= replacement.freed
            shed += replacement.new_records
            if need <= 0:
                break
        if replacements:
            rows = _splice(rows, replacements)
    return rows, shed


def _splice(rows: list[OutboxRow], replacements: list[_Replacement]) -> list[OutboxRow]:
    out: list[OutboxRow] = []
    pending = iter(replacements)
    current = next(pending, None)
    for row in rows:
        if current is not None and current.first_seq <= row.seq <= current.last_seq:
            if row.through_seq == current.last_seq:
                out.extend(current.new)
                current = next(pending, None)
            continue
        out.append(row)
    return out


# -- the outbox ---------------------------------------------------------------------------------


class Outbox(StateFile):
    """The outbox file at `path` (created if absent). Use as a context manager or call `close()`.

    `quota_bytes`: the most `held_bytes` may reach (None = unbounded); see the module docstring
    for the shedding policy. At least MIN_QUOTA_BYTES.
    """

    closed_error = OutboxClosedError
    label = "outbox"

    def __init__(self, path: Path, *, clock: Clock, quota_bytes: int | None = None) -> None:
        super().__init__(path)
        if quota_bytes is not None and quota_bytes < MIN_QUOTA_BYTES:
            raise ValueError(
                f"outbox: quota_bytes must be at least {MIN_QUOTA_BYTES} bytes (Gap records are "
                f"never shed and need room), got {quota_bytes}"
            )
        self._clock = clock
        self._quota = quota_bytes
        # Per shedding step: below this seq that step has nothing left to do (in memory only; a
        # restart rescans once).
        self._shed_from = dict.fromkeys(range(1, _LAST_STEP + 1), 0)
        self._conn = self._open()

    # -- lifecycle -------------------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        try:
            conn = open_state_db(
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
        except (sqlite3.OperationalError, OSError) as exc:
            error = _storage_error(exc, self._path, "open the outbox")
            if error is None:
                raise
            raise error from exc
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                self._create_schema(conn)
            elif version == 1:
                self._migrate_from_1(conn)
            elif version != _SCHEMA_VERSION:
                raise OutboxSchemaError(
                    f"outbox {self._path} has schema version {version}, this dergw knows "
                    f"{_SCHEMA_VERSION}; run the dergw version that wrote it until it has drained, "
                    "or move the file aside"
                )
            self._next_seq = self._load_meta(conn, "next_seq")
            self._shed_records = self._load_meta(conn, "shed_records")
            rows, payload_bytes, max_seq, gaps = conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0), MAX(through_seq), "
                f"COALESCE(SUM(kind = {_GAP}), 0) FROM outbox"
            ).fetchone()
            if max_seq is not None and max_seq >= self._next_seq:
                raise OutboxSchemaError(
                    f"outbox {self._path} holds seq {max_seq} but its next_seq is "
                    f"{self._next_seq}: the file was changed outside dergw; move it aside "
                    "(seqs must never be reused)"
                )
            # Row count, bytes and Gap rows live in memory (recounted here) so that stats() is
            # O(1) and the hot path writes nothing but the rows and next_seq.
            self._rows: int = rows
            self._payload_bytes: int = payload_bytes
            self._gap_rows: int = gaps
            conn.execute("COMMIT")
        except BaseException as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            conn.close()
            error = _storage_error(exc, self._path, "open the outbox")
            if error is not None:
                raise error from exc
            raise
        # Everything committed before this process started is as durable as the OS made it;
        # treat it as not yet fsynced so the first read_after syncs before shipping.
        self._durable_next_seq = _FIRST_SEQ
        return conn

    @staticmethod
    def _create_schema(db: sqlite3.Connection) -> None:
        db.execute(
            "CREATE TABLE outbox (seq INTEGER PRIMARY KEY, kind INTEGER NOT NULL, "
            "created_wall_ns INTEGER NOT NULL, payload BLOB NOT NULL, "
            "through_seq INTEGER NOT NULL)"
        )
        db.execute("CREATE TABLE outbox_meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)")
        db.executemany(
            "INSERT INTO outbox_meta (key, value) VALUES (?, ?)",
            [("next_seq", _FIRST_SEQ), ("durable_syncs", 0), ("shed_records", 0)],
        )
        db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")

    @staticmethod
    def _migrate_from_1(conn: sqlite3.Connection) -> None:
        # Version 1 had no Gap rows: every row stands for its own seq. Runs inside the opening
        # transaction, so a crash leaves either version 1 or version 2, never half of it.
        conn.execute("ALTER TABLE outbox ADD COLUMN through_seq INTEGER NOT NULL DEFAULT 0")
        conn.execute("UPDATE outbox SET through_seq = seq")
        conn.execute("INSERT OR IGNORE INTO outbox_meta (key, value) VALUES ('shed_records', 0)")
        conn.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")

    def _load_meta(self, conn: sqlite3.Connection, key: str) -> int:
        row = conn.execute("SELECT value FROM outbox_meta WHERE key = ?", (key,)).fetchone()
        if row is None:
            raise OutboxSchemaError(
                f"outbox {self._path} has no {key} record: the file was changed outside "
                "dergw; move it aside"
            )
        return int(row[0])

    @contextmanager
    def _transaction(self, conn: sqlite3.Connection, doing: str) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT; rolls back on any error, storage trouble re-raised as
        OutboxStorageError."""
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except (sqlite3.Error, OSError) as exc:
            error = _storage_error(exc, self._path, doing)
            if error is None:
                raise
            raise error from exc

    # -- writes ----------------------------------------------------------------------------------

    def append(self, items: Sequence[tuple[int, bytes]]) -> range:
        """Append `(kind, payload)` items as one transaction; return the seqs they were given.

        Committed when this returns. An empty batch returns an empty range and writes nothing.
        Raises ValueError (and appends nothing) if any kind is not a RecordKind, and
        OutboxStorageError (appending nothing) when the storage refuses the write. With a quota,
        older rows (or, at worst, some of these items) may be shed to make room; the seqs of shed
        items are then covered by a Gap row.
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
            now = self._clock.wall_ns()
            batch_bytes = sum(len(payload) for _, payload in items)
            rows: list[tuple[int, int, int, bytes, int]]
            shed = 0
            if self._fits(batch_bytes + ROW_OVERHEAD_BYTES * len(items)):
                rows = [
                    (seq, kind, now, payload, seq)
                    for seq, (kind, payload) in zip(count(first), items, strict=False)
                ]
            else:
                kept, shed = self._make_room(conn, items, first, now)
                rows = [(r.seq, r.kind, now, r.payload, r.through_seq) for r in kept]
                batch_bytes = sum(len(r[3]) for r in rows)
            gaps = sum(1 for r in rows if r[1] == _GAP)
            with self._transaction(conn, f"append {len(items)} records"):
                conn.executemany(
                    "INSERT INTO outbox (seq, kind, created_wall_ns, payload, through_seq) "
                    "VALUES (?, ?, ?, ?, ?)",
                    rows,
                )
                conn.execute("UPDATE outbox_meta SET value = ? WHERE key = 'next_seq'", (end,))
                if shed:
                    conn.execute(
                        "UPDATE outbox_meta SET value = value + ? WHERE key = 'shed_records'",
                        (shed,),
                    )
            self._next_seq = end
            self._rows += len(rows)
            self._payload_bytes += batch_bytes
            self._gap_rows += gaps
            self._shed_records += shed
            return range(first, end)

    def _held_bytes(self) -> int:
        return self._payload_bytes + ROW_OVERHEAD_BYTES * self._rows

    def _fits(self, incoming: int) -> bool:
        return self._quota is None or self._held_bytes() + incoming <= self._quota

    def _make_room(
        self, conn: sqlite3.Connection, items: Sequence[tuple[int, bytes]], first: int, now: int
    ) -> tuple[list[OutboxRow], int]:
        """Shed held rows by the policy until the batch fits (down to 95 % of the quota), in one
        transaction of its own; if the batch cannot fit even then, shed from the batch itself.

        Returns the batch's rows as they are to be inserted, and the records shed from it.
        Called under the lock, before the append transaction.
        """
        assert self._quota is not None
        reason = f"outbox quota {self._quota} bytes reached"
        target = self._quota - max(1, int(self._quota * SHED_CHUNK_FRACTION))
        incoming = sum(len(payload) for _, payload in items) + ROW_OVERHEAD_BYTES * len(items)
        need = self._held_bytes() + incoming - target
        if self._rows:
            self._shed_held(conn, need, reason)
        batch = [
            OutboxRow(seq, kind, payload, now)
            for seq, (kind, payload) in zip(count(first), items, strict=False)
        ]
        if self._fits(incoming):
            return batch, 0
        return _shed_list(batch, self._held_bytes() + incoming - target, reason)

    def _shed_held(self, conn: sqlite3.Connection, need: int, reason: str) -> None:
        rows = payload = gaps = shed = 0
        cursors = dict(self._shed_from)
        with self._transaction(conn, "shed rows to stay within the quota"):
            for step in range(1, _LAST_STEP + 1):
                start = cursors[step]
                if step > 1:
                    # Start at the Gap row just before, if there is one, so that it merges.
                    previous = conn.execute(
                        "SELECT seq, kind FROM outbox WHERE seq < ? ORDER BY seq DESC LIMIT 1",
                        (start,),
                    ).fetchone()
                    if previous is not None and previous[1] == _GAP:
                        start = previous[0]
                for stretch in _stretches(self._scan(conn, start), _member(step)):
                    cursors[step] = stretch[-1].through_seq + 1
                    replacement = _replace(step, stretch, reason)
                    if replacement is None:
                        continue
                    self._write_replacement(conn, replacement)
                    rows += len(replacement.new) - len(replacement.old)
                    payload += sum(len(r.payload) for r in replacement.new) - sum(
                        len(r.payload) for r in replacement.old
                    )
                    gaps += sum(r.kind == _GAP for r in replacement.new) - sum(
                        r.kind == _GAP for r in replacement.old
                    )
                    shed += replacement.new_records
                    need -= replacement.freed
                    if need <= 0:
                        break
                if need <= 0:
                    break
            if shed:
                conn.execute(
                    "UPDATE outbox_meta SET value = value + ? WHERE key = 'shed_records'", (shed,)
                )
        self._rows += rows
        self._payload_bytes += payload
        self._gap_rows += gaps
        self._shed_records += shed
        self._shed_from = cursors

    def _scan(self, conn: sqlite3.Connection, start: int) -> Iterator[OutboxRow]:
        """Held rows from seq `start` on, oldest first, read a page at a time (each page is read
        completely before it is handed out, so rows already handed out may be rewritten)."""
        while True:
            page = conn.execute(
                "SELECT seq, kind, payload, created_wall_ns, through_seq FROM outbox "
                "WHERE seq >= ? ORDER BY seq LIMIT ?",
                (start, _SCAN_PAGE_ROWS),
            ).fetchall()
            if not page:
                return
            for seq, kind, payload, created, through in page:
                yield OutboxRow(seq, kind, payload, created, through)
            start = page[-1][4] + 1

    @staticmethod
    def _write_replacement(conn: sqlite3.Connection, replacement: _Replacement) -> None:
        conn.execute(
            "DELETE FROM outbox WHERE seq >= ? AND seq <= ?",
            (replacement.first_seq, replacement.last_seq),
        )
        conn.executemany(
            "INSERT INTO outbox (seq, kind, created_wall_ns, payload, through_seq) "
            "VALUES (?, ?, ?, ?, ?)",
            [(r.seq, r.kind, r.created_wall_ns, r.payload, r.through_seq) for r in replacement.new],
        )

    def ack(self, up_to_seq: int, ranges: Sequence[tuple[int, int]] = ()) -> int:
        """Delete the rows the headend committed; return how many rows were deleted.

        Committed: every seq <= `up_to_seq`, and every seq in the inclusive `ranges` (batches of
        the live lane committed ahead of the backlog). A row goes when it lies wholly inside; a Gap
        row only partly covered is trimmed to its unacknowledged seqs (its seq moves past the
        acked part, or its through_seq before it), keeping its payload, which still describes the
        whole range it was shed from: over-reporting a loss is the safe side. A range strictly
        inside a Gap row changes nothing.

        Acks at or below what was already acked are normal (repeated or late acks) and delete
        nothing. An ack beyond the last assigned seq (`up_to_seq` or a range's end) raises
        AckBeyondHeadError and deletes nothing.
        """
        if up_to_seq < 0:
            raise ValueError(f"outbox: ack up_to_seq must be >= 0, got {up_to_seq}")
        spans = [(0, up_to_seq)]
        for lo, hi in ranges:
            if lo < 0 or hi < lo:
                raise ValueError(f"outbox: ack range ({lo}, {hi}) must have 0 <= first <= last")
            spans.append((lo, hi))
        with self._lock:
            conn = self._connection()
            head = max(hi for _, hi in spans)
            if head >= self._next_seq:
                raise AckBeyondHeadError(
                    f"outbox {self._path}: the headend acknowledged up to seq {head} but this "
                    f"gateway has only assigned seqs below {self._next_seq}. Nothing was deleted. "
                    "The headend holds records this outbox never wrote: check that no other "
                    "gateway uses the same gateway id, and whether this outbox was restored from "
                    "an old copy (the uplink should re-register and fast_forward)"
                )
            if self._rows == 0:
                return 0
            deleted = freed = gaps = 0
            with self._transaction(conn, "delete acknowledged rows"):
                for lo, hi in spans:
                    d, f, g = self._ack_span(conn, lo, hi)
                    deleted += d
                    freed += f
                    gaps += g
            self._rows -= deleted
            self._payload_bytes -= freed
            self._gap_rows -= gaps
            return deleted

    @staticmethod
    def _ack_span(conn: sqlite3.Connection, lo: int, hi: int) -> tuple[int, int, int]:
        where = "seq >= ? AND seq <= ? AND through_seq <= ?"
        rows, freed, gaps = conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0), "
            f"COALESCE(SUM(kind = {_GAP}), 0) FROM outbox WHERE {where}",
            (lo, hi, hi),
        ).fetchone()
        if rows:
            conn.execute(f"DELETE FROM outbox WHERE {where}", (lo, hi, hi))
        # Only a Gap row can stick out of the span: trim it to its unacknowledged part.
        before = conn.execute(
            "SELECT seq, through_seq FROM outbox WHERE seq < ? ORDER BY seq DESC LIMIT 1", (lo,)
        ).fetchone()
        if before is not None and lo <= before[1] <= hi:
            conn.execute("UPDATE outbox SET through_seq = ? WHERE seq = ?", (lo - 1, before[0]))
        inside = conn.execute(
            "SELECT seq FROM outbox WHERE seq >= ? AND seq <= ? ORDER BY seq DESC LIMIT 1",
            (lo, hi),
        ).fetchone()
        if inside is not None:  # what is left in the span reaches beyond hi
            conn.execute("UPDATE outbox SET seq = ? WHERE seq = ?", (hi + 1, inside[0]))
        return int(rows), int(freed), int(gaps)

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

    def read_after(
        self, after_seq: int, limit: int, *, below_seq: int | None = None
    ) -> list[OutboxRow]:
        """Up to `limit` rows with through_seq > `after_seq` (and seq < `below_seq` when given),
        oldest first.

        A Gap row that swallowed seqs on both sides of `after_seq` (shed after the uplink sent
        some of them) is returned too, so its loss report still goes out.

        Rows returned here may leave the box, so before returning a row that is not yet known to
        be on stable storage this makes every commit so far durable (one fsync; see the module
        docstring for why a power cut must never roll back a seq the headend has seen).
        """
        if limit < 1:
            raise ValueError(f"outbox: read limit must be >= 1, got {limit}")
        with self._lock:
            conn = self._connection()
            rows: list[OutboxRow] = []
            # Rows never overlap, so at most one row at or below after_seq reaches past it.
            straddling = conn.execute(
                "SELECT seq, kind, payload, created_wall_ns, through_seq FROM outbox "
                "WHERE seq <= ? ORDER BY seq DESC LIMIT 1",
                (after_seq,),
            ).fetchone()
            if (
                straddling is not None
                and straddling[4] > after_seq
                and (below_seq is None or straddling[0] < below_seq)
            ):
                rows.append(OutboxRow(*straddling))
            if len(rows) < limit:
                if below_seq is None:
                    query = "WHERE seq > ? ORDER BY seq LIMIT ?"
                    args: tuple[int, ...] = (after_seq, limit - len(rows))
                else:
                    query = "WHERE seq > ? AND seq < ? ORDER BY seq LIMIT ?"
                    args = (after_seq, below_seq, limit - len(rows))
                rows.extend(
                    OutboxRow(seq, kind, payload, created, through)
                    for seq, kind, payload, created, through in conn.execute(
                        "SELECT seq, kind, payload, created_wall_ns, through_seq FROM outbox "
                        + query,
                        args,
                    )
                )
            if rows and rows[-1].through_seq >= self._durable_next_seq:
                self._make_durable(conn)
            return rows

    def _make_durable(self, conn: sqlite3.Connection) -> None:
        try:
            self._durable_write_next_seq(conn, self._next_seq)
        except OutboxStorageError:
            # The storage refuses writes (e.g. disk full), but the commits made so far are in the
            # WAL: fsync it (and the database file) directly, so that rows can still be shipped
            # and acked, which is what frees space.
            for suffix in ("-wal", ""):
                name = f"{self._path}{suffix}"
                if not os.path.exists(name):
                    continue
                try:
                    fd = os.open(name, os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                except OSError as exc:
                    error = _storage_error(exc, self._path, "make records durable")
                    raise (error or exc) from exc
        self._durable_next_seq = self._next_seq

    def _durable_write_next_seq(self, conn: sqlite3.Connection, next_seq: int) -> None:
        # A commit under synchronous=FULL fsyncs the WAL file, which also carries every earlier
        # NORMAL commit: one fsync makes all of them durable. The counter makes sure the commit
        # writes a page: SQLite skips pages whose content did not change, and then syncs nothing.
        conn.execute("PRAGMA synchronous=FULL")
        try:
            with self._transaction(conn, "make records durable"):
                conn.execute("UPDATE outbox_meta SET value = ? WHERE key = 'next_seq'", (next_seq,))
                conn.execute("UPDATE outbox_meta SET value = value + 1 WHERE key = 'durable_syncs'")
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
                quota_bytes=self._quota,
                held_bytes=self._held_bytes(),
                shed_records=self._shed_records,
                gap_rows=self._gap_rows,
            )

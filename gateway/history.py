"""The site's recent history at 1-minute resolution: what the forecaster learns from.

Owns a small SQLite file in the state directory and an in-memory copy of the same window:

* `add(wall_ns, totals)` runs every control cycle and only accumulates the minute in memory (a
  few float additions); when the wall clock enters a new minute, the finished minute's means go
  into the in-memory window and onto a pending list.
* `flush()` writes the pending minutes in one transaction and deletes what fell out of the
  retention window (default 8 days: the forecaster's 7 previous days plus today), so the file
  stays bounded (~12k rows, under 1 MB). Call it every few minutes from a worker thread, and it
  runs on `close()`.
* `arrays(now_wall_ns)` returns the window as dense numpy arrays (`gateway.forecast.
  HistoryArrays`, NaN where nothing was recorded) straight from memory: no SQL on the read path.

The file only restores the window after a restart; losing the last minutes in a power cut costs
the forecast a little accuracy and nothing else, hence WAL with `synchronous=NORMAL` and
batched writes (an SD card should not see a write per minute). Opened, like every state file,
with an exclusive lock through `gateway.statedb`.

A wall clock stepped backwards starts a new minute where it lands: minutes are keyed by their
time, so a repeated minute replaces the earlier one, and rows dated after the present at open
time (left by a clock that ran ahead) are dropped.
"""

from __future__ import annotations

import math
import sqlite3
import threading
from pathlib import Path

import numpy as np
import numpy.typing as npt

from gateway.clock import Clock
from gateway.flexibility import SiteTotals
from gateway.forecast import MINUTE_NS, HistoryArrays
from gateway.statedb import StateFile, open_state_db

__all__ = [
    "History",
    "HistoryClosedError",
    "HistoryError",
    "HistoryLockedError",
    "HistorySchemaError",
]

_SCHEMA_VERSION = 1
_MINUTES_PER_DAY = 1440
_FIELDS = ("pv_w", "load_w", "battery_w", "battery_energy_wh")
FloatArray = npt.NDArray[np.float64]


class HistoryError(Exception):
    """Base class of the history store's own errors."""


class HistoryClosedError(HistoryError):
    """The history was used after `close()`."""


class HistoryLockedError(HistoryError):
    """Another process holds the history file."""


class HistorySchemaError(HistoryError):
    """The file is not a history this version of dergw can use."""


class History(StateFile):
    """The history file at `path` (created if absent) and its in-memory window.

    retention_days: how much history is kept (memory and file).
    flush_every_min: `flush_due` turns true once this many finished minutes wait to be written.
    """

    closed_error = HistoryClosedError
    label = "history"

    def __init__(
        self,
        path: Path,
        *,
        clock: Clock,
        retention_days: float = 8.0,
        flush_every_min: int = 10,
    ) -> None:
        if retention_days <= 0:
            raise ValueError(f"history: retention_days must be > 0, got {retention_days}")
        if flush_every_min < 1:
            raise ValueError(f"history: flush_every_min must be >= 1, got {flush_every_min}")
        super().__init__(path)
        self._clock = clock
        self._capacity = max(round(retention_days * _MINUTES_PER_DAY), 1)
        self._flush_every_min = flush_every_min
        # The in-memory window is a ring indexed by minute % capacity; a slot is valid only for
        # the minute it records. Guarded by _memory_lock (add/arrays on the event loop, flush on
        # a worker thread); the connection by the base class's _lock.
        self._memory_lock = threading.Lock()
        self._slot_minute = np.full(self._capacity, -1, dtype=np.int64)
        self._values = np.full((self._capacity, len(_FIELDS)), np.nan)
        self._limited = np.zeros(self._capacity, dtype=np.bool_)
        self._minute: int | None = None  # the minute being accumulated
        self._sums = np.zeros(len(_FIELDS))
        self._counts = np.zeros(len(_FIELDS), dtype=np.int64)
        self._minute_limited = False
        self._pending: list[tuple[int, float | None, float | None, float | None, float | None, int]]
        self._pending = []
        self._conn = self._open()

    # -- lifecycle -------------------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        conn = open_state_db(
            self._path,
            synchronous="NORMAL",
            what="history",
            locked_error=HistoryLockedError,
            corrupt_error=HistorySchemaError,
            corrupt_advice=(
                "move it aside and restart: a fresh history is started and the forecast "
                "relies on persistence until a few days are recorded again"
            ),
        )
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                conn.execute(
                    "CREATE TABLE minutes (minute INTEGER PRIMARY KEY, pv_w REAL, load_w REAL, "
                    "battery_w REAL, battery_energy_wh REAL, pv_limited INTEGER NOT NULL)"
                )
                conn.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
            elif version != _SCHEMA_VERSION:
                raise HistorySchemaError(
                    f"history {self._path} has schema version {version}, this dergw knows "
                    f"{_SCHEMA_VERSION}; move the file aside (it only holds the last days of "
                    "site totals, which are rebuilt as the site runs)"
                )
            now_minute = self._clock.wall_ns() // MINUTE_NS
            rows = conn.execute(
                "SELECT minute, pv_w, load_w, battery_w, battery_energy_wh, pv_limited "
                "FROM minutes WHERE minute < ? ORDER BY minute DESC LIMIT ?",
                (now_minute, self._capacity),
            ).fetchall()
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            conn.close()
            raise
        if rows:
            table = np.array([row[:5] for row in rows], dtype=np.float64)  # NULL -> NaN
            minutes = table[:, 0].astype(np.int64)
            slots = minutes % self._capacity
            self._slot_minute[slots] = minutes
            self._values[slots] = table[:, 1:]
            self._limited[slots] = np.array([bool(row[5]) for row in rows])
        return conn

    def close(self) -> None:
        """Write what is pending, then close (idempotent)."""
        try:
            if self._conn is not None:
                self.flush()
        finally:
            super().close()

    # -- the hot path ----------------------------------------------------------------------------

    def add(self, wall_ns: int, totals: SiteTotals) -> None:
        """Accumulate one control cycle's site totals into the minute of `wall_ns` (memory only)."""
        minute = wall_ns // MINUTE_NS
        values = (totals.pv_w, totals.load_w, totals.battery_w, totals.battery_energy_wh)
        with self._memory_lock:
            if self._minute != minute:
                self._finish_minute()
                self._minute = minute
            for i, value in enumerate(values):
                if math.isfinite(value):
                    self._sums[i] += value
                    self._counts[i] += 1
            self._minute_limited |= totals.pv_limited

    def _finish_minute(self) -> None:
        """Move the accumulated minute into the window and the pending list (lock held)."""
        minute = self._minute
        if minute is None:
            return
        counts = self._counts
        means = np.where(counts > 0, self._sums / np.maximum(counts, 1), np.nan)
        slot = minute % self._capacity
        self._slot_minute[slot] = minute
        self._values[slot] = means
        self._limited[slot] = self._minute_limited
        stored = [None if math.isnan(v) else float(v) for v in means]
        self._pending.append(
            (minute, stored[0], stored[1], stored[2], stored[3], int(self._minute_limited))
        )
        if len(self._pending) > self._capacity:
            # Writes keep failing: older pending minutes would be trimmed from the file anyway.
            del self._pending[: len(self._pending) - self._capacity]
        self._minute = None
        self._sums[:] = 0.0
        self._counts[:] = 0
        self._minute_limited = False

    @property
    def flush_due(self) -> bool:
        """Enough finished minutes wait to be written (see `flush_every_min`)."""
        with self._memory_lock:
            return len(self._pending) >= self._flush_every_min

    # -- reads -----------------------------------------------------------------------------------

    def arrays(self, now_wall_ns: int) -> HistoryArrays:
        """The retention window of finished minutes before `now_wall_ns`'s minute, oldest first."""
        end = now_wall_ns // MINUTE_NS
        wanted = np.arange(end - self._capacity, end, dtype=np.int64)
        slots = wanted % self._capacity
        with self._memory_lock:
            if self._minute is not None and self._minute < end:
                # The minute is over even if no cycle has come in the new one yet.
                self._finish_minute()
            hit = self._slot_minute[slots] == wanted
            values = np.where(hit[:, None], self._values[slots], np.nan)
            limited = self._limited[slots] & hit
        return HistoryArrays(
            end_minute=end,
            pv_w=values[:, 0].copy(),
            load_w=values[:, 1].copy(),
            battery_w=values[:, 2].copy(),
            battery_energy_wh=values[:, 3].copy(),
            pv_limited=limited,
        )

    # -- writes ----------------------------------------------------------------------------------

    def flush(self) -> int:
        """Write the finished minutes in one transaction, trim to the window; return rows written.

        Call from a worker thread (asyncio.to_thread): it commits to SQLite.
        """
        with self._memory_lock:
            rows, self._pending = self._pending, []
        if not rows:
            return 0
        with self._lock:
            conn = self._connection()
            newest = max(row[0] for row in rows)
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(
                    "INSERT OR REPLACE INTO minutes (minute, pv_w, load_w, battery_w, "
                    "battery_energy_wh, pv_limited) VALUES (?, ?, ?, ?, ?, ?)",
                    rows,
                )
                # Rows after the newest minute were written by a clock that ran ahead.
                conn.execute(
                    "DELETE FROM minutes WHERE minute <= ? OR minute > ?",
                    (newest - self._capacity, newest),
                )
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                with self._memory_lock:
                    self._pending[:0] = rows  # keep them for the next try, in order
                raise
        return len(rows)

    def stored_minutes(self) -> int:
        """How many minutes the file holds (for tests and the console)."""
        with self._lock:
            return int(self._connection().execute("SELECT COUNT(*) FROM minutes").fetchone()[0])

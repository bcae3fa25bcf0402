"""The gateway's SQLite state files (outbox, intent store): opened one way, by one process only.

Every state file is opened with an exclusive lock (a second gateway on the same state_dir fails
at once instead of corrupting the sequence), in WAL mode, with the durability level its content
needs, and inside an immediate transaction so the caller can check or create its schema
atomically. Errors name the file and say what to do.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Literal, Self

__all__ = ["StateFile", "open_state_db"]


class StateFile:
    """Base of a state file: its path, connection and lock, close() and the context manager.

    Subclasses set `closed_error` and open the connection (with open_state_db) in __init__.
    Methods are called from worker threads (asyncio.to_thread), hence the lock.
    """

    closed_error: ClassVar[type[Exception]]
    label: ClassVar[str]

    def __init__(self, path: Path) -> None:
        self._path = Path(path)
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None

    @property
    def path(self) -> Path:
        return self._path

    def close(self) -> None:
        """Close the file (idempotent). Everything written before is already committed."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise self.closed_error(f"{self.label} {self._path} is closed")
        return self._conn


def open_state_db(
    path: Path,
    *,
    synchronous: Literal["NORMAL", "FULL"],
    what: str,
    locked_error: type[Exception],
    corrupt_error: type[Exception],
    corrupt_advice: str,
    pragmas: tuple[str, ...] = (),
) -> sqlite3.Connection:
    """Open `path` and return it inside BEGIN IMMEDIATE (the caller COMMITs or ROLLBACKs).

    what:           how the file is named in messages ("outbox", "intent store").
    locked_error:   raised when another connection holds the file.
    corrupt_error:  raised when the file is not a SQLite database, with `corrupt_advice`.
    """
    # isolation_level=None: the callers issue BEGIN/COMMIT themselves, so "returned" always
    # means "committed" and no implicit transaction is ever left open.
    # timeout=0: with the exclusive lock, "busy" can only mean a second gateway on this file,
    # and that should fail at once, not after a 5 s wait.
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=0)
    try:
        # EXCLUSIVE before the first WAL access: the lock is taken by the first transaction and
        # held until close, and no -shm file is needed (one process by design).
        conn.execute("PRAGMA locking_mode=EXCLUSIVE")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={synchronous}")
        for pragma in pragmas:
            conn.execute(f"PRAGMA {pragma}")
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        conn.close()
        if "locked" in str(exc) or "busy" in str(exc):
            raise locked_error(
                f"{what} {path} is held open by another process (or another connection in this "
                "one); is another dergw gateway running with the same state_dir? Stop it or give "
                "this one its own state_dir"
            ) from exc
        raise
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise corrupt_error(f"{path} is not a SQLite database ({exc}); {corrupt_advice}") from exc
    except BaseException:
        conn.close()
        raise
    return conn

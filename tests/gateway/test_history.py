"""The 1-minute history store: per-minute means, the window in memory, batched writes, bounds."""

from __future__ import annotations

import math
import sqlite3
import time
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest

from gateway.clock import ManualClock
from gateway.flexibility import SiteTotals
from gateway.forecast import MINUTE_NS
from gateway.history import (
    History,
    HistoryClosedError,
    HistoryLockedError,
    HistorySchemaError,
)

T0 = 1_718_841_600 * 10**9  # 2024-06-20T00:00Z, on a minute boundary
M0 = T0 // MINUTE_NS


def totals(
    pv: float = 1000.0,
    load: float = 500.0,
    battery: float = 0.0,
    energy: float = 2000.0,
    *,
    limited: bool = False,
) -> SiteTotals:
    return SiteTotals(pv, load, battery, energy, 9000.0, 5000.0, limited)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "history.sqlite3"


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(wall_ns=T0)


def at(minute: int, second: float = 0.0) -> int:
    return (M0 + minute) * MINUTE_NS + round(second * 1e9)


def test_minutes_are_means_of_the_cycles(path: Path, clock: ManualClock) -> None:
    with History(path, clock=clock) as history:
        history.add(at(0, 0), totals(pv=1000.0, load=400.0))
        history.add(at(0, 20), totals(pv=2000.0, load=math.nan))  # no meter this cycle
        history.add(at(0, 40), totals(pv=3000.0, load=600.0, limited=True))
        history.add(at(2, 5), totals(pv=10.0))  # minute 1 had no cycle at all
        window = history.arrays(at(2, 30))
        assert window.end_minute == M0 + 2
        assert window.start_minute == M0 + 2 - 8 * 1440
        assert len(window) == 8 * 1440
        assert window.pv_w[-2] == 2000.0
        assert window.load_w[-2] == 500.0
        assert window.pv_limited[-2]
        assert math.isnan(window.pv_w[-1])  # minute 1
        assert not window.pv_limited[-1]
        assert np.isnan(window.pv_w[:-2]).all()
        # The minute in progress is not part of the window...
        assert history.arrays(at(2, 59)).end_minute == M0 + 2
        # ...but a finished one is, even before a cycle of the next minute arrives.
        assert history.arrays(at(3, 1)).pv_w[-1] == 10.0


def test_flush_is_batched_and_the_window_survives_a_restart(path: Path, clock: ManualClock) -> None:
    history = History(path, clock=clock, flush_every_min=4)
    for minute in range(4):
        history.add(at(minute), totals(pv=100.0 * minute, energy=math.nan))
    assert history.stored_minutes() == 0  # nothing written on the hot path
    assert not history.flush_due
    history.add(at(4), totals())
    assert history.flush_due
    assert history.flush() == 4
    assert history.stored_minutes() == 4
    assert history.flush() == 0
    history.add(at(5), totals(limited=True))
    before = history.arrays(at(6))  # minute 5 is over: it joins the window and the pending list
    history.add(at(6), totals())  # in progress at close: lost, by design
    history.close()  # writes what is pending
    clock.advance(7 * 60)
    with History(path, clock=clock) as reopened:
        assert reopened.stored_minutes() == 6
        after = reopened.arrays(at(6))
        for name in ("pv_w", "load_w", "battery_w", "battery_energy_wh", "pv_limited"):
            np.testing.assert_array_equal(getattr(after, name), getattr(before, name))
        np.testing.assert_array_equal(after.battery_energy_wh[-6:-2], [np.nan] * 4)
        assert after.pv_w[-3] == 300.0
        assert after.pv_limited[-1]
        assert math.isnan(reopened.arrays(at(7)).pv_w[-1])


def test_retention_bounds_memory_and_file(path: Path, clock: ManualClock) -> None:
    ten_minutes = 10 / 1440
    with History(path, clock=clock, retention_days=ten_minutes) as history:
        for minute in range(25):
            history.add(at(minute), totals(pv=float(minute)))
        window = history.arrays(at(25))
        assert len(window) == 10
        np.testing.assert_array_equal(window.pv_w, np.arange(15.0, 25.0))
        history.flush()
        assert history.stored_minutes() == 10
    clock.advance(25 * 60)
    with History(path, clock=clock, retention_days=ten_minutes) as reopened:
        np.testing.assert_array_equal(reopened.arrays(at(25)).pv_w, np.arange(15.0, 25.0))
        # Minutes that fell out of the window read as missing, not as stale values.
        assert np.isnan(reopened.arrays(at(40)).pv_w).all()


def test_clock_stepped_back_replaces_the_minutes(path: Path, clock: ManualClock) -> None:
    with History(path, clock=clock) as history:
        history.add(at(0), totals(pv=1.0))
        history.add(at(1), totals(pv=2.0))
        history.add(at(2), totals(pv=3.0))
        history.add(at(1, 30), totals(pv=20.0))  # NTP stepped the clock back
        history.add(at(2, 30), totals(pv=30.0))
        window = history.arrays(at(3))
        np.testing.assert_array_equal(window.pv_w[-3:], [1.0, 20.0, 30.0])
        history.flush()
    clock.advance(3 * 60)
    with History(path, clock=clock) as reopened:
        np.testing.assert_array_equal(reopened.arrays(at(3)).pv_w[-3:], [1.0, 20.0, 30.0])


def test_rows_from_a_clock_that_ran_ahead_are_dropped(path: Path, clock: ManualClock) -> None:
    with History(path, clock=clock) as history:
        history.add(at(100), totals(pv=7.0))  # the clock ran 100 min ahead
        history.add(at(101), totals())
    # Back to the true time: the "future" minute is not loaded into the window.
    with History(path, clock=clock) as reopened:
        assert np.isnan(reopened.arrays(at(200)).pv_w).all()


def test_closed_locked_and_foreign_files(path: Path, clock: ManualClock) -> None:
    history = History(path, clock=clock)
    with pytest.raises(HistoryLockedError, match="same state_dir"):
        History(path, clock=clock)
    history.close()
    history.close()  # idempotent
    with pytest.raises(HistoryClosedError):
        history.stored_minutes()
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA user_version=99")
        conn.commit()
    with pytest.raises(HistorySchemaError, match="schema version 99"):
        History(path, clock=clock)
    junk = path.with_name("junk.sqlite3")
    junk.write_bytes(b"not a database at all" * 100)
    with pytest.raises(HistorySchemaError, match="not a SQLite database"):
        History(junk, clock=clock)
    with pytest.raises(ValueError, match="retention_days"):
        History(path.with_name("x.sqlite3"), clock=clock, retention_days=0)


def test_cost_figure(path: Path, clock: ManualClock) -> None:
    """add() per control cycle and arrays() per minute on a full window (printed)."""
    with History(path, clock=clock) as history:
        sample = totals()
        cycles = 8 * 1440 * 4  # 8 days at one cycle per 15 s
        started = time.perf_counter()
        for i in range(cycles):
            history.add(T0 + i * 15 * 10**9, sample)
        add_us = (time.perf_counter() - started) / cycles * 1e6
        end = T0 + cycles * 15 * 10**9
        started = time.perf_counter()
        for _ in range(50):
            window = history.arrays(end)
        arrays_ms = (time.perf_counter() - started) / 50 * 1e3
        assert np.isfinite(window.pv_w).all()
        started = time.perf_counter()
        written = history.flush()
        flush_ms = (time.perf_counter() - started) * 1e3
    print(
        f"\nhistory: add {add_us:.1f} us/cycle, arrays {arrays_ms:.2f} ms for "
        f"{len(window)} minutes, flush of {written} minutes {flush_ms:.0f} ms"
    )

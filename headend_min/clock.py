"""Wall-clock time for the headend: an injectable clock and ns <-> datetime conversions.

The headend reads time in one place so that tests can move it (presence turning stale, events
ending) without sleeping. All times are UTC nanoseconds since the epoch inside the headend and
timezone-aware UTC datetimes at the HTTP boundary.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Protocol

__all__ = ["Clock", "ManualClock", "SystemClock", "datetime_from_ns", "ns_from_datetime"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class Clock(Protocol):
    def wall_ns(self) -> int:
        """UTC wall clock, ns since the epoch."""
        ...


class SystemClock:
    def wall_ns(self) -> int:
        return time.time_ns()


class ManualClock:
    """A clock that moves only when told to (tests, simulations)."""

    def __init__(self, wall_ns: int = 1_700_000_000 * 10**9) -> None:
        self._wall_ns = wall_ns

    def wall_ns(self) -> int:
        return self._wall_ns

    def advance(self, seconds: float) -> None:
        self._wall_ns += round(seconds * 1e9)


def datetime_from_ns(wall_ns: int) -> datetime:
    """UTC ns since the epoch -> aware UTC datetime (microsecond resolution)."""
    return _EPOCH + timedelta(microseconds=wall_ns // 1000)


def ns_from_datetime(moment: datetime) -> int:
    """Datetime -> UTC ns since the epoch. A naive datetime is taken to be UTC."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000

"""Time for the whole gateway: one injectable clock with a wall (UTC) and a monotonic face.

Schedules use wall time; timeouts and staleness use monotonic time. Nothing in the gateway calls
`time.time()` or `time.monotonic()` directly, so tests run on a ManualClock at any speed.
"""

from __future__ import annotations

import time
from typing import Protocol

__all__ = ["Clock", "ManualClock", "SystemClock"]


class Clock(Protocol):
    def wall_ns(self) -> int:
        """UTC wall clock, ns since the epoch."""
        ...

    def mono_ns(self) -> int:
        """Monotonic clock, ns (arbitrary origin)."""
        ...


class SystemClock:
    def wall_ns(self) -> int:
        return time.time_ns()

    def mono_ns(self) -> int:
        return time.monotonic_ns()


class ManualClock:
    """A clock that moves only when told to (tests, simulations)."""

    def __init__(self, wall_ns: int = 1_700_000_000 * 10**9, mono_ns: int = 10**12) -> None:
        self._wall_ns = wall_ns
        self._mono_ns = mono_ns

    def wall_ns(self) -> int:
        return self._wall_ns

    def mono_ns(self) -> int:
        return self._mono_ns

    def advance(self, seconds: float) -> None:
        step = round(seconds * 1e9)
        self._wall_ns += step
        self._mono_ns += step

    def jump_wall(self, seconds: float) -> None:
        """Move only the wall clock (an NTP step), as a real clock jump would."""
        self._wall_ns += round(seconds * 1e9)

"""Can the wall clock be trusted, and did it just jump?

Schedules run on wall-clock UTC, but a Raspberry Pi has no battery-backed clock: after a power
cut while offline its wall time is wrong until NTP (or an RTC) sets it. Until the clock has been
synchronised since boot, scheduled events are not started (defaults and the static fallback
still apply) — IEEE 2030.5 events "SHALL be executed relative to the time of the server".

Trust sources (`control.clock_trust` in the config):
  "assume"      trust the clock (development, or a hardware RTC you vouch for);
  "kernel"      the kernel's NTP discipline: adjtimex() reports TIME_ERROR while unsynchronised;
  "file:PATH"   trusted once PATH exists (systemd-timesyncd: /run/systemd/timesync/synchronized).
Once trusted, the clock stays trusted for the life of the process: a lost NTP server does not
make a disciplined clock wrong, it only lets it drift slowly.

ClockWatch detects steps (NTP stepping the clock, a manual change) by comparing wall and
monotonic progress; the control loop re-resolves and logs them.

SampleClock stamps samples for time integrity (reference/appliance.md §3.5): every sample carries
the kernel boot id and whether the clock was trusted when it was taken, and when the clock becomes
trusted (or at the first look, if it already is) SampleClock reports one ClockSyncPoint, the
offset wall - monotonic at that moment, which the gateway records as a ClockSync. The headend
then corrects the boot's untrusted samples to monotonic_ns + offset.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gateway.clock import Clock

__all__ = [
    "ClockStep",
    "ClockSyncPoint",
    "ClockTrust",
    "ClockTrustError",
    "ClockWatch",
    "SampleClock",
]

NS_PER_S = 1_000_000_000
_TIME_ERROR = 5  # adjtimex() return value: clock not synchronised


class ClockTrustError(ValueError):
    """A clock_trust setting the gateway does not understand."""


class _Timex(ctypes.Structure):
    # struct timex (linux/timex.h); only `status` and the return value are used.
    _fields_ = [
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("constant", ctypes.c_long),
        ("precision", ctypes.c_long),
        ("tolerance", ctypes.c_long),
        ("time_sec", ctypes.c_long),
        ("time_usec", ctypes.c_long),
        ("tick", ctypes.c_long),
        ("ppsfreq", ctypes.c_long),
        ("jitter", ctypes.c_long),
        ("shift", ctypes.c_int),
        ("stabil", ctypes.c_long),
        ("jitcnt", ctypes.c_long),
        ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long),
        ("stbcnt", ctypes.c_long),
        ("tai", ctypes.c_int),
        ("padding", ctypes.c_int * 11),
    ]


@functools.cache
def _libc() -> ctypes.CDLL:
    # Loaded once: find_library may run ldconfig, far too slow to repeat per check.
    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _kernel_synchronised() -> bool:
    if sys.platform != "linux":
        return False
    timex = _Timex()  # modes = 0: read only
    return int(_libc().adjtimex(ctypes.byref(timex))) not in (-1, _TIME_ERROR)


class ClockTrust:
    """Answers "has the wall clock been synchronised since this process started?"."""

    def __init__(self, setting: str) -> None:
        self.setting = setting
        self._path: Path | None = None
        if setting.startswith("file:"):
            path = setting.removeprefix("file:")
            if not path:
                raise ClockTrustError("clock_trust 'file:' needs a path, e.g. file:/run/x")
            self._path = Path(path)
        elif setting not in ("assume", "kernel"):
            raise ClockTrustError(f"clock_trust {setting!r}: use 'assume', 'kernel' or 'file:PATH'")
        self._trusted = setting == "assume"

    def trusted(self) -> bool:
        if not self._trusted:
            if self._path is not None:
                self._trusted = self._path.exists()
            else:
                self._trusted = _kernel_synchronised()
        return self._trusted

    def reason(self) -> str:
        """Why the clock is not trusted (empty when it is)."""
        if self.trusted():
            return ""
        source = (
            f"{self._path} does not exist yet" if self._path else "the kernel reports no NTP sync"
        )
        return f"wall clock not synchronised since boot ({source}): scheduled events not started"


@dataclass(frozen=True, slots=True)
class ClockStep:
    step_s: float  # + = the wall clock jumped forward


class ClockWatch:
    """Detects wall-clock steps: wall time moving differently from monotonic time."""

    def __init__(self, threshold_s: float = 1.0) -> None:
        self._threshold_ns = round(threshold_s * NS_PER_S)
        self._offset_ns: int | None = None

    def observe(self, wall_ns: int, mono_ns: int) -> ClockStep | None:
        offset = wall_ns - mono_ns
        previous, self._offset_ns = self._offset_ns, offset
        if previous is None or abs(offset - previous) < self._threshold_ns:
            return None
        return ClockStep((offset - previous) / NS_PER_S)


@dataclass(frozen=True, slots=True)
class ClockSyncPoint:
    """The wall clock became trusted: for `boot_id`, true wall time = monotonic + offset."""

    boot_id: str
    wall_minus_mono_ns: int
    wall_ns: int  # when it was measured


class SampleClock:
    """Stamps samples with the boot id and the clock's trust state; reports when trust begins.

    `synced()` answers from memory once the clock is trusted (trust is kept for the life of the
    process, like ClockTrust); before that it asks `trust` at most once per `recheck_s` of
    monotonic time, so it is cheap enough to call for every read. The first time it finds the
    clock trusted it calls `on_sync` once, with the offset measured right then.
    """

    def __init__(
        self,
        trust: ClockTrust,
        clock: Clock,
        *,
        boot_id: str,
        on_sync: Callable[[ClockSyncPoint], None],
        recheck_s: float = 1.0,
    ) -> None:
        self._trust = trust
        self._clock = clock
        self.boot_id = boot_id
        self._on_sync = on_sync
        self._recheck_ns = round(recheck_s * NS_PER_S)
        self._next_check_ns: int | None = None
        self._synced = False

    def synced(self) -> bool:
        """Is the wall clock trusted now? Ask before a read: a reading taken after a `True` has
        a trusted wall time (a sync during the read leaves that sample marked untrusted, which
        the headend corrects anyway)."""
        if self._synced:
            return True
        now = self._clock.mono_ns()
        if self._next_check_ns is not None and now < self._next_check_ns:
            return False
        self._next_check_ns = now + self._recheck_ns
        if not self._trust.trusted():
            return False
        self._synced = True
        before = self._clock.mono_ns()
        wall = self._clock.wall_ns()
        after = self._clock.mono_ns()
        self._on_sync(ClockSyncPoint(self.boot_id, wall - (before + after) // 2, wall))
        return True

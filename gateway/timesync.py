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
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ClockStep", "ClockTrust", "ClockTrustError", "ClockWatch"]

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


def _kernel_synchronised() -> bool:
    if sys.platform != "linux":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    timex = _Timex()  # modes = 0: read only
    return int(libc.adjtimex(ctypes.byref(timex))) not in (-1, _TIME_ERROR)


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

"""Talking to systemd: readiness, status, watchdog pets and stopping (the sd_notify protocol).

The protocol is one datagram of `KEY=value` lines to the AF_UNIX socket named by $NOTIFY_SOCKET
(a leading `@` names the abstract namespace); systemd calls it a stable API, so this is our own
small implementation rather than a dependency. Without $NOTIFY_SOCKET (not run by systemd, or
not `Type=notify`) every call is a no-op.

The watchdog rule is pure (`watchdog_ok`): pet only while the control loop completed a cycle
recently AND the outbox answered recently. A hung control cycle or a blocked SQLite commit then
stops the pets and systemd restarts the process (`WatchdogSec=` in systemd/dergw-gateway.service).
A thread that pets unconditionally would prove nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable

from gateway.clock import Clock

__all__ = [
    "Notifier",
    "Progress",
    "run_watchdog",
    "watchdog_max_age_s",
    "watchdog_ok",
    "watchdog_pet_interval_s",
]

log = logging.getLogger(__name__)

NS_PER_S = 1_000_000_000


def watchdog_ok(
    last_cycle_mono_ns: int | None,
    last_outbox_ok_mono_ns: int | None,
    now_mono_ns: int,
    max_age_ns: int,
) -> bool:
    """May the watchdog be petted now?

    Only when both the control loop finished a cycle and the outbox finished a commit attempt
    within `max_age_ns` of `now_mono_ns` (monotonic ns). Never before either has happened once.
    """
    if last_cycle_mono_ns is None or last_outbox_ok_mono_ns is None:
        return False
    return (
        now_mono_ns - last_cycle_mono_ns <= max_age_ns
        and now_mono_ns - last_outbox_ok_mono_ns <= max_age_ns
    )


def watchdog_pet_interval_s(
    env: dict[str, str] | None = None, pid: int | None = None
) -> float | None:
    """Half of systemd's WatchdogSec (from $WATCHDOG_USEC), or None when no watchdog is armed
    for this process (sd_watchdog_enabled(3): $WATCHDOG_PID, when set, must be our pid)."""
    environ = os.environ if env is None else env
    usec = environ.get("WATCHDOG_USEC", "")
    watchdog_pid = environ.get("WATCHDOG_PID", "")
    if watchdog_pid and watchdog_pid != str(os.getpid() if pid is None else pid):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1e6 / 2 if value > 0 else None


def watchdog_max_age_s(pet_interval_s: float, *, control_period_s: float, commit_s: float) -> float:
    """How old the last control cycle / outbox commit may be while still counting as healthy:
    one pet interval, but never less than three control periods or commit intervals (a slow but
    live loop must not be killed)."""
    return max(pet_interval_s, 3 * control_period_s, 3 * commit_s)


class Notifier:
    """Sends sd_notify messages to $NOTIFY_SOCKET (read once, at construction)."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        environ = os.environ if env is None else env
        raw = environ.get("NOTIFY_SOCKET", "")
        # '@name' is the abstract namespace: a leading NUL byte on the wire.
        self.address: str | None = ("\0" + raw[1:] if raw.startswith("@") else raw) or None
        self.sent = 0  # datagrams sent (diagnostics, tests)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *lines: str) -> bool:
        """Send one message; False when not under systemd or the send failed (logged once,
        never raised: a notification must not take the gateway down)."""
        if self.address is None:
            return False
        message = "\n".join(lines).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self.address)
                sock.sendall(message)
        except OSError as exc:
            log.warning("sd_notify to %r failed: %s", self.address, exc)
            return False
        self.sent += 1
        return True

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, status: str) -> bool:
        return self.notify(f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str = "") -> bool:
        return self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))


class Progress:
    """When a counter (control cycles, outbox commit rounds) last moved, on the monotonic clock."""

    def __init__(self) -> None:
        self._count: int | None = None
        self.last_change_mono_ns: int | None = None

    def observe(self, count: int, now_mono_ns: int) -> int | None:
        if self._count is not None and count != self._count:
            self.last_change_mono_ns = now_mono_ns
        self._count = count
        return self.last_change_mono_ns


async def run_watchdog(
    notifier: Notifier,
    *,
    pet_interval_s: float,
    max_age_s: float,
    control_cycles: Callable[[], int],
    outbox_rounds: Callable[[], int],
    clock: Clock,
) -> None:
    """Pet systemd's watchdog every `pet_interval_s` while `watchdog_ok` holds. Progress is
    checked at least once a second, so the ages are exact to a second. Runs until cancelled."""
    check_s = min(pet_interval_s, 1.0)
    pet_interval_ns = round(pet_interval_s * NS_PER_S)
    max_age_ns = round(max_age_s * NS_PER_S)
    control, outbox = Progress(), Progress()
    last_pet_ns: int | None = None
    was_ok = True
    while True:
        now = clock.mono_ns()
        last_cycle = control.observe(control_cycles(), now)
        last_round = outbox.observe(outbox_rounds(), now)
        ok = watchdog_ok(last_cycle, last_round, now, max_age_ns)
        if ok and (last_pet_ns is None or now - last_pet_ns >= pet_interval_ns):
            notifier.watchdog()
            last_pet_ns = now
        if last_pet_ns is not None and ok != was_ok:
            # Once per change: systemd restarts the gateway if this lasts WatchdogSec.
            if ok:
                log.warning("watchdog: the control loop and the outbox progress again")
            else:
                log.error(
                    "watchdog: no control cycle or no outbox commit round for %.0f s: "
                    "systemd's watchdog is no longer petted",
                    max_age_s,
                )
            was_ok = ok
        await asyncio.sleep(check_s)

"""Local overrides: time-boxed controls a site technician sets at the gateway. Pure.

An override is an entry point into the same path as everything else: the schedule applies it
above events (for the modes it sets), and the safety kernel clamps it like any other request, so
an override can never take the site past a protection, interlock or utility limit. Every override
carries its origin and expires on the monotonic clock (a wall-clock step cannot stretch it).
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Collection
from dataclasses import dataclass, fields

from dergw.v1 import MAX_ABS_WATTS
from gateway.intent import Controls
from gateway.schedule import Override

__all__ = ["MAX_OVERRIDE_S", "OverrideBook", "OverrideError", "TimedOverride"]

NS_PER_S = 1_000_000_000
# An override is a commissioning/troubleshooting tool, not a way to run a site: at most a day.
MAX_OVERRIDE_S = 24 * 3600

_NON_NEGATIVE_W = ("export_limit_w", "import_limit_w", "gen_limit_w", "load_limit_w")
_SIGNED_W = ("fixed_w", "target_w")


class OverrideError(ValueError):
    """An override request was refused; nothing changed. The message says why."""


@dataclass(frozen=True, slots=True)
class TimedOverride:
    override: Override
    expires_mono_ns: int


def _check(controls: Controls) -> None:
    if controls.is_empty():
        raise OverrideError("an override must set at least one control")
    for f in fields(controls):
        value = getattr(controls, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise OverrideError(f"{f.name}: not a number")
    if controls.max_gen_pct is not None and not 0.0 <= controls.max_gen_pct <= 100.0:
        raise OverrideError(f"max_gen_pct: must be within 0..100 %, got {controls.max_gen_pct:g}")
    for name in _NON_NEGATIVE_W + _SIGNED_W:
        value = getattr(controls, name)
        if value is None:
            continue
        if name in _NON_NEGATIVE_W and value < 0.0:
            raise OverrideError(f"{name}: must be >= 0 W, got {value:g}")
        if abs(value) > MAX_ABS_WATTS:
            raise OverrideError(f"{name}: {value:g} W is out of range")
    if controls.ramp_time_s is not None and controls.ramp_time_s < 0.0:
        raise OverrideError("ramp_time_s: must be >= 0 s")


class OverrideBook:
    """The overrides in force. Not thread-safe: owned by the control loop."""

    def __init__(self) -> None:
        self._active: dict[str, TimedOverride] = {}

    def add(
        self,
        controls: Controls,
        *,
        origin: str,
        duration_s: float,
        now_mono_ns: int,
        devices: Collection[str],
        device_id: str | None = None,
    ) -> TimedOverride:
        if not origin.strip():
            raise OverrideError("an override needs its origin (who asks, from where)")
        if not 0.0 < duration_s <= MAX_OVERRIDE_S:
            raise OverrideError(f"duration_s: must be within 0..{MAX_OVERRIDE_S} s")
        if device_id is not None and device_id not in devices:
            raise OverrideError(
                f"unknown device {device_id!r}; this gateway has {', '.join(sorted(devices))}"
            )
        _check(controls)
        timed = TimedOverride(
            Override(uuid.uuid4().hex[:12], origin, controls, device_id),
            now_mono_ns + round(duration_s * NS_PER_S),
        )
        self._active[timed.override.override_id] = timed
        return timed

    def clear(self, override_id: str) -> TimedOverride | None:
        return self._active.pop(override_id, None)

    def expire(self, now_mono_ns: int) -> list[TimedOverride]:
        """Drop and return the overrides whose time is up."""
        expired = [t for t in self._active.values() if t.expires_mono_ns <= now_mono_ns]
        for timed in expired:
            del self._active[timed.override.override_id]
        return expired

    def timed(self) -> tuple[TimedOverride, ...]:
        """The overrides in force with their expiry, oldest first."""
        return tuple(self._active.values())

    def active(self) -> tuple[Override, ...]:
        # Oldest first: a newer override on the same mode is applied later and wins.
        return tuple(t.override for t in self._active.values())

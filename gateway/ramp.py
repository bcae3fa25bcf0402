"""Software ramp: how far a setpoint may move per control cycle. Pure.

Many inverters ignore their ramp registers over SunSpec (protocols.md §4.4), so the safety kernel
rate-limits its own setpoint changes: a generation cap or a battery's fixed power moves from the
value last enforced towards the new one by at most `rate x elapsed time`. The rate comes from the
intent's `ramp_time_s` (move to the new value over that time) or from the site policy (% of the
device rating per second, like IEEE 2030.5 setGradW); no rate means no software ramp.
"""

from __future__ import annotations

import math

__all__ = ["NO_RAMP", "event_rate_w_per_s", "policy_rate_w_per_s", "ramp", "step_w"]

NO_RAMP = math.inf

# An event ramp is never slower than this share of the rating over its ramp time, so that a
# change decided after the event started (e.g. by the export loop) is not frozen by a ramp that
# was computed for a change of ~0 W.
_MIN_EVENT_CHANGE_FRACTION = 0.01


def policy_rate_w_per_s(ramp_pct_per_s: float | None, rating_w: float) -> float:
    """The policy ramp in W/s for a device of `rating_w` (NO_RAMP when none is configured)."""
    if ramp_pct_per_s is None or not ramp_pct_per_s > 0.0 or not rating_w > 0.0:
        return NO_RAMP
    return ramp_pct_per_s / 100.0 * rating_w


def event_rate_w_per_s(change_w: float, ramp_time_s: float, rating_w: float) -> float:
    """The rate that moves a setpoint by `change_w` in `ramp_time_s` (0 s = at once)."""
    if not ramp_time_s > 0.0 or not math.isfinite(change_w):
        return NO_RAMP
    floor_w = _MIN_EVENT_CHANGE_FRACTION * max(rating_w, 0.0)
    rate = max(abs(change_w), floor_w) / ramp_time_s
    return rate if rate > 0.0 else NO_RAMP


def step_w(rate_w_per_s: float, elapsed_s: float) -> float:
    """How far a setpoint may move in `elapsed_s` at `rate_w_per_s` (inf when not ramped)."""
    if not math.isfinite(rate_w_per_s):
        return math.inf
    return rate_w_per_s * max(elapsed_s, 0.0)


def ramp(last_w: float | None, desired_w: float, max_step_w: float) -> float:
    """`desired_w`, moved from `last_w` by at most `max_step_w` (no memory: no ramp)."""
    if last_w is None or not math.isfinite(max_step_w):
        return desired_w
    if abs(desired_w - last_w) <= max_step_w:
        # Exactly the target when the step reaches it (last - step may round past it).
        return desired_w
    return min(max(desired_w, last_w - max_step_w), last_w + max_step_w)

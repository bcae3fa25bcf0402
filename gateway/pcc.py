"""Closed-loop export/import control on the PCC meter: the loop's arithmetic and memory. Pure.

The loop does not integrate an error. Each cycle it estimates the site's *net load as seen by the
devices it steers*:

    net_load_w = pcc_w + (what the steered devices make now)        (pcc_w: + import, - export)

which is load minus every generator the loop does not steer. It does not change when the steered
devices move, so inverter lag cannot wind the loop up. From it:

    export budget (max total output of the steered devices) = net_load + export_limit - margin
    import floor  (min total output of the steered devices) = net_load - import_limit + margin

Samples are averaged over a window, time-weighted (each sample holds until the next one), so
that noise does not move the budget. A budget tightens at once, to the tighter of the latest
sample and the average (a limit violation is corrected in the very cycle it is seen); it loosens
only from the average, by a share (`relax_gain`) of the gap per cycle and never by more than a
bounded step, never above what the latest sample allows, and not at all within a deadband. While
the grid frequency is outside the droop deadband (protocols.md §3.4) the inverters' frequency
response overrides their limits: the budget is held, not chased, so that the loop does not wind
up against the inverters and overshoot when the frequency returns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = [
    "NetLoad",
    "PccLoopState",
    "frequency_response",
    "next_lower_bound",
    "next_upper_bound",
    "observe",
]

Sample = tuple[int, float]  # (monotonic ns, net load W)

_NOMINAL_CANDIDATES_HZ = (50.0, 60.0)


@dataclass(frozen=True, slots=True)
class PccLoopState:
    """The loop's memory between cycles (kept in the kernel's state)."""

    samples: tuple[Sample, ...] = ()  # oldest first, covering the averaging window
    export_budget_w: float | None = None  # the export budget last cycle (None: no export limit)
    import_floor_w: float | None = None  # the import floor last cycle (None: no import limit)


@dataclass(frozen=True, slots=True)
class NetLoad:
    """The net load estimate: the latest sample and the time-weighted mean over the window."""

    latest_w: float
    mean_w: float


def observe(
    samples: tuple[Sample, ...],
    *,
    sample_mono_ns: int,
    net_load_w: float,
    now_mono_ns: int,
    window_s: float,
) -> tuple[tuple[Sample, ...], NetLoad]:
    """Add a sample (unless it is the one already held) and average over the window.

    A sample taken at the same instant as the newest one held is the same meter reading seen
    again (the control loop may run faster than the meter is polled): it is not added twice, and
    the latest value stays the one computed when it was first seen, so that devices measured
    after the meter do not skew the estimate.
    """
    sample_mono_ns = min(sample_mono_ns, now_mono_ns)
    if not samples or sample_mono_ns > samples[-1][0]:
        samples = (*samples, (sample_mono_ns, net_load_w))
    window_ns = max(int(window_s * 1e9), 0)
    start_ns = now_mono_ns - window_ns
    # Keep the newest sample at or before the window start: it holds into the window.
    first = 0
    for i, (t_ns, _) in enumerate(samples):
        if t_ns <= start_ns:
            first = i
        else:
            break
    samples = samples[first:]
    weighted = 0.0
    duration = 0
    for i, (t_ns, value_w) in enumerate(samples):
        end_ns = samples[i + 1][0] if i + 1 < len(samples) else now_mono_ns
        held_ns = end_ns - max(t_ns, start_ns)
        if held_ns > 0:
            weighted += value_w * held_ns
            duration += held_ns
    latest_w = samples[-1][1]
    mean_w = weighted / duration if duration > 0 else latest_w
    return samples, NetLoad(latest_w=latest_w, mean_w=mean_w)


def frequency_response(
    grid_hz: float | None, *, nominal_hz: float | None, deadband_hz: float
) -> bool:
    """True while the grid frequency is outside nominal +- deadband (inverters in droop).

    nominal_hz None: the nearer of 50 and 60 Hz. An unknown frequency is not a response.
    """
    if grid_hz is None or not math.isfinite(grid_hz):
        return False
    if nominal_hz is None:
        nominal_hz = min(_NOMINAL_CANDIDATES_HZ, key=lambda hz: abs(grid_hz - hz))
    return abs(grid_hz - nominal_hz) > deadband_hz


def next_upper_bound(
    previous_w: float | None,
    *,
    tight_w: float,
    loose_w: float,
    deadband_w: float,
    relax_gain: float,
    relax_max_step_w: float,
) -> float:
    """An upper bound (e.g. the export budget) for this cycle.

    tight_w: the bound from the more conservative estimate (the latest sample or the mean);
    loose_w: the bound from the mean. Tightening below previous - deadband is immediate;
    loosening moves `relax_gain` of the way to loose_w, by at most relax_max_step_w, and never
    above tight_w + deadband (with deadband <= margin, the limit itself per the latest sample).
    """
    if previous_w is None or not math.isfinite(previous_w):
        return tight_w
    if tight_w < previous_w - deadband_w:
        return tight_w
    if loose_w > previous_w + deadband_w:
        step_w = min(relax_gain * (loose_w - previous_w), relax_max_step_w)
        return max(previous_w, min(previous_w + step_w, tight_w + deadband_w))
    return previous_w


def next_lower_bound(
    previous_w: float | None,
    *,
    tight_w: float,
    loose_w: float,
    deadband_w: float,
    relax_gain: float,
    relax_max_step_w: float,
) -> float:
    """A lower bound (e.g. the import floor): `next_upper_bound` mirrored."""
    return -next_upper_bound(
        None if previous_w is None else -previous_w,
        tight_w=-tight_w,
        loose_w=-loose_w,
        deadband_w=deadband_w,
        relax_gain=relax_gain,
        relax_max_step_w=relax_max_step_w,
    )

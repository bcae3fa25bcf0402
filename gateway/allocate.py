"""Allocation of site-level quantities across devices: deterministic, vectorised (numpy). Pure.

Two kinds of split live here:

* `split_proportional`: the planner splits a site target or limit across inverters so that each
  gets a share proportional to its rating, none above its own cap, and whatever a capped device
  cannot take is redistributed to the others (water-filling).
* `split_by_headroom` / `allocate_export` / `allocate_import`: the safety kernel moves devices
  away from where they are now to meet a PCC limit, each in proportion to how far it can move
  (its headroom), so that no device is asked for more than it can do and the others take over
  from a device that cannot move (unavailable, faulted, at a BMS or SoC limit, at its ramp).

Same inputs, same split: no dependence on order of arrival, dict iteration or floating-point
accident beyond the arithmetic itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = [
    "ExportAllocation",
    "ImportAllocation",
    "allocate_export",
    "allocate_import",
    "split_by_headroom",
    "split_proportional",
]

FloatArray = npt.NDArray[np.float64]

# Below this many watts, a remainder is treated as fully allocated.
_EPSILON_W = 1e-6


def split_proportional(total_w: float, weights: FloatArray, caps_w: FloatArray) -> FloatArray:
    """Split `total_w` (>= 0) by `weights`, each share within [0, caps_w[i]].

    The sum of the result is min(total_w, sum(caps_w over devices with weight > 0)).
    """
    weights = np.asarray(weights, dtype=np.float64)
    caps_w = np.asarray(caps_w, dtype=np.float64)
    if weights.shape != caps_w.shape:
        raise ValueError("split_proportional: weights and caps differ in shape")
    allocation = np.zeros_like(caps_w)
    eligible = (weights > 0.0) & (caps_w > 0.0)
    remaining = min(max(float(total_w), 0.0), float(caps_w[eligible].sum()))
    # Each pass saturates at least one device or allocates everything: at most n passes.
    while remaining > _EPSILON_W and eligible.any():
        # Normalise first: remaining * a subnormal weight would underflow to 0 and stall.
        fractions = weights[eligible] / weights[eligible].sum()
        taken = np.minimum(remaining * fractions, caps_w[eligible] - allocation[eligible])
        allocation[eligible] += taken
        taken_w = float(taken.sum())
        if taken_w <= 0.0:
            break  # nothing left that any device can take (rounding at the edge of a cap)
        remaining -= taken_w
        eligible &= (caps_w - allocation) > _EPSILON_W
    return allocation


def split_by_headroom(total_w: float, headroom_w: FloatArray) -> FloatArray:
    """Split `total_w` (>= 0) in proportion to each device's headroom, none above its headroom.

    Negative or NaN headroom counts as none. The sum of the result is min(total_w, sum(headroom)):
    when the total exceeds what the devices can move, each moves all the way.
    """
    room = np.asarray(headroom_w, dtype=np.float64)
    room = np.where(room > 0.0, room, 0.0)  # also maps NaN to 0
    available_w = float(room.sum())
    total_w = float(total_w)
    if not total_w > 0.0 or available_w <= 0.0:
        return np.zeros_like(room)
    if total_w >= available_w:
        return room
    # total/available < 1, so every share stays within its device's headroom.
    return room * (total_w / available_w)


@dataclass(frozen=True, slots=True)
class ExportAllocation:
    """How the export budget is met: new values per device and what could not be removed.

    pv_caps_w:     generation cap per PV inverter.
    free_w:        output per battery that the intent does not command (soaks surplus: < 0).
    commanded_w:   output per battery the intent commands (discharge cut when nothing else helps).
    shortfall_w:   output above the budget that no device could remove (uncontrollable).
    """

    pv_caps_w: FloatArray
    free_w: FloatArray
    commanded_w: FloatArray
    shortfall_w: float


def allocate_export(
    budget_w: float,
    *,
    pv_reference_w: FloatArray,
    pv_floor_w: FloatArray,
    pv_ceiling_w: FloatArray,
    free_now_w: FloatArray,
    free_floor_w: FloatArray,
    free_release_w: FloatArray,
    commanded_w: FloatArray,
    commanded_floor_w: FloatArray,
) -> ExportAllocation:
    """Fit the controllable output (PV caps + battery outputs) into `budget_w`, surplus first.

    pv_reference_w is what each inverter is expected to make (within [floor, ceiling]). When the
    total would exceed the budget, the excess is taken, in this order, from
      1. batteries the intent leaves free: they charge (soak) more, each in proportion to its
         remaining charge room (free_now - free_floor);
      2. PV: curtailed in proportion to what each makes above its floor;
      3. batteries the intent commands: their discharge is cut, in proportion to the discharge
         they have above their floor (they are never made to charge for it).
    When the total is within the budget, the spare budget first releases soaking batteries
    (free_release_w: how far each may come back towards idle), then lifts PV caps above their
    references in proportion to the room up to each ceiling.

    Every result stays within its device's [floor, ceiling]; the caps plus battery outputs never
    exceed the budget unless even the floors do (then `shortfall_w` says by how much).
    """
    pv_ref = np.asarray(pv_reference_w, dtype=np.float64)
    free = np.asarray(free_now_w, dtype=np.float64)
    commanded = np.asarray(commanded_w, dtype=np.float64)
    total_w = float(pv_ref.sum() + free.sum() + commanded.sum())
    excess_w = total_w - float(budget_w)
    if excess_w <= 0.0:
        spare_w = -excess_w
        release = split_by_headroom(spare_w, free_release_w)
        spare_w -= float(release.sum())
        lift = split_by_headroom(spare_w, np.asarray(pv_ceiling_w) - pv_ref)
        return ExportAllocation(pv_ref + lift, free + release, commanded.copy(), 0.0)
    soak = split_by_headroom(excess_w, free - np.asarray(free_floor_w))
    excess_w -= float(soak.sum())
    curtail = split_by_headroom(excess_w, pv_ref - np.asarray(pv_floor_w))
    excess_w -= float(curtail.sum())
    cut = split_by_headroom(excess_w, commanded - np.asarray(commanded_floor_w))
    excess_w -= float(cut.sum())
    return ExportAllocation(
        pv_ref - curtail,
        free - soak,
        commanded - cut,
        max(excess_w, 0.0) if excess_w > _EPSILON_W else 0.0,
    )


@dataclass(frozen=True, slots=True)
class ImportAllocation:
    """How an import limit is met: new battery outputs and the part that could not be met."""

    battery_w: FloatArray
    shortfall_w: float


def allocate_import(
    needed_w: float, *, battery_now_w: FloatArray, battery_ceiling_w: FloatArray
) -> ImportAllocation:
    """Raise battery output (charge less, then discharge) by `needed_w` in total.

    Each battery moves in proportion to its room up to its ceiling (its discharge limit after
    BMS, SoC guard and ramp). What the batteries cannot cover is the shortfall: with no
    controllable loads, nothing else can reduce import.
    """
    now = np.asarray(battery_now_w, dtype=np.float64)
    raise_w = split_by_headroom(needed_w, np.asarray(battery_ceiling_w) - now)
    shortfall_w = max(float(needed_w) - float(raise_w.sum()), 0.0)
    return ImportAllocation(now + raise_w, shortfall_w if shortfall_w > _EPSILON_W else 0.0)

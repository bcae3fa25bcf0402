"""Allocation of a site-level quantity across devices: deterministic, vectorised (numpy). Pure.

Used by the planner to split a site target or limit across inverters so that each gets a share
proportional to its rating, none above its own cap, and whatever a capped device cannot take is
redistributed to the others (water-filling). Same inputs, same split: no dependence on order of
arrival, dict iteration or floating-point accident beyond the arithmetic itself.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["split_proportional"]

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

"""Battery state-of-charge guard with hysteresis (OpenEMS LimitTotalDischarge style). Pure.

Per battery, two latches:

* discharge: set when SoC is at or below the floor, or unknown (a battery whose charge we cannot
  see is not drained: a safer default than OpenEMS, which does not block on an undefined SoC);
  cleared only once SoC rises above floor + hysteresis.
* charge: set when SoC is at or above the ceiling; cleared once SoC falls below ceiling -
  hysteresis. An unknown SoC leaves it as it was (the BMS protects the top end on its own).

The hysteresis keeps a battery sitting at its floor from toggling between discharge and idle
every cycle. The latches live in the safety kernel's state between cycles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["SocGuard", "soc_guard_step"]


@dataclass(frozen=True, slots=True)
class SocGuard:
    """The guard's latches for one battery."""

    discharge_blocked: bool = False
    charge_blocked: bool = False


def soc_guard_step(
    previous: SocGuard,
    soc_pct: float | None,
    *,
    floor_pct: float,
    ceiling_pct: float,
    hysteresis_pct: float,
) -> SocGuard:
    """The latches after observing `soc_pct` (None or NaN = unknown)."""
    hysteresis_pct = max(hysteresis_pct, 0.0)
    if soc_pct is None or not math.isfinite(soc_pct):
        return SocGuard(discharge_blocked=True, charge_blocked=previous.charge_blocked)
    discharge_blocked = previous.discharge_blocked
    if soc_pct <= floor_pct:
        discharge_blocked = True
    elif discharge_blocked and soc_pct > floor_pct + hysteresis_pct:
        discharge_blocked = False
    charge_blocked = previous.charge_blocked
    if soc_pct >= ceiling_pct:
        charge_blocked = True
    elif charge_blocked and soc_pct < ceiling_pct - hysteresis_pct:
        charge_blocked = False
    return SocGuard(discharge_blocked=discharge_blocked, charge_blocked=charge_blocked)

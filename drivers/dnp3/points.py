"""The IEEE 1815.2 (AN2018-001) points a DER plant controller serves, mapped to canonical names.

Indices and scales are the profile's (protocols.md §5.2; the CDPT as shipped in the PNNL
mesa-tool PICS profile that dnp3py bundles). Canonical names and units are the SunSpec driver's
(`drivers.sunspec.profile`), so the control loop and the snapshot treat a DNP3 plant like any
other PV device. Values on the wire are 32-bit transmission integers:
engineering = raw x scale.

Control pattern per function (AN2018-001): a BO "Enable <function>" (latched), AOs for the
setpoint and the reversion timeout, each AO mirrored by an AI that reports the value in force,
and a BI that reports the mode in force. The driver writes the AOs, then the enable BO, and reads
back the AIs/BI.

Sign conventions: generation positive, charging negative (1815.2); the system meter's active
power (AI537) is the plant's output at the point of interconnection (+ = export), the same sign
as a SunSpec inverter's `W`.

Pure data: no I/O.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

__all__ = [
    "AI",
    "AO",
    "BI",
    "BO",
    "CONTROLS",
    "NAMEPLATE_MAX_W",
    "PV_POINTS",
    "Dnp3Point",
    "Kind",
    "group_indices",
]


class Kind(enum.StrEnum):
    AI = "ai"  # analog input (g30 static / g32 events)
    BI = "bi"  # binary input (g1 / g2)
    BO = "bo"  # binary output status (g10)


@dataclass(frozen=True, slots=True)
class Dnp3Point:
    """One canonical point served by one DNP3 point: engineering value = raw x scale."""

    name: str
    unit: str
    kind: Kind
    index: int
    scale: float = 1.0
    valid_min: float = float("-inf")
    valid_max: float = float("inf")


class AI:
    """Analog input indices used by the driver (AN2018-001 / 1815.2 absolute indices)."""

    MAX_GEN_W: Final = 32  # Maximum Active Generation Power (setting), W
    MAX_VAR_INJ: Final = 34  # Maximum Reactive Injection Power, var
    MAX_VA_GEN: Final = 36  # Maximum Apparent Generation Power, VA
    AVAIL_GEN_W: Final = 43  # System Available Active Generation Power, W
    WLIM_RVRT_S: Final = 145  # Active Power Limit Reversion Timeout Period (mirror of AO85)
    WLIM_MAX_PCT: Final = 148  # Active Power Limit Maximum, 0.1 % (mirror of AO87)
    METER_HZ: Final = 536  # System Meter Frequency, 0.001 Hz
    METER_W: Final = 537  # System Meter Active Power, W
    METER_VAR: Final = 541  # System Meter Reactive Power, var
    METER_PF: Final = 545  # System Meter Power Factor, 0.01
    METER_VA: Final = 546  # System Meter Apparent Power, VA
    METER_V: Final = 547  # System Meter Phase A Volts, 0.1 V
    METER_A: Final = 554  # System Meter Current A, 0.1 A


class BI:
    P1_ALARM: Final = 1  # System Has Priority 1 Alarms (a fault)
    SWITCH_CLOSED: Final = 23  # DER Connect/Disconnect Switch Closed Status (mirror of BO5)
    WLIM_ENABLED: Final = 69  # Operating Mode - Active Power Limit Enabled (mirror of BO17)


class BO:
    CONNECT: Final = 5  # DER Connect/Disconnect Switch (latch on = closed)
    WLIM_ENABLE: Final = 17  # Enable Active Power Limit Mode


class AO:
    WLIM_RVRT_S: Final = 85  # Active Power Limit Reversion Timeout Period, s
    # Active Power Limit Maximum, 0.1 % of WMax. The 1815.2 point tables as dnp3py ships them name
    # AO87 "Maximum (Pos = Generation)" and AO88 "Minimum"; py1815 reads clause 6.4.2.2 as AO87 =
    # charging and AO88 = generation. We follow the point tables (what outstations are built from)
    # and verify by read-back of AI148. Read-back cannot tell the two readings apart, so
    # commissioning confirms with a test cap that the plant's output (AI537) follows.
    WLIM_MAX_PCT: Final = 87


# The canonical points of a PV plant controller (DeviceKind.PV), in schema order.
PV_POINTS: Final[tuple[Dnp3Point, ...]] = (
    Dnp3Point("W", "W", Kind.AI, AI.METER_W),
    Dnp3Point("Var", "var", Kind.AI, AI.METER_VAR),
    Dnp3Point("VA", "VA", Kind.AI, AI.METER_VA),
    Dnp3Point("PF", "", Kind.AI, AI.METER_PF, 0.01, -1.0, 1.0),
    Dnp3Point("Hz", "Hz", Kind.AI, AI.METER_HZ, 0.001, 40.0, 70.0),
    Dnp3Point("V", "V", Kind.AI, AI.METER_V, 0.1, 0.0, 1e6),
    Dnp3Point("A", "A", Kind.AI, AI.METER_A, 0.1),
    Dnp3Point("WMax", "W", Kind.AI, AI.MAX_GEN_W, valid_min=0.0),
    Dnp3Point("WAvail", "W", Kind.AI, AI.AVAIL_GEN_W, valid_min=0.0),
    Dnp3Point("WMaxLimPct", "%", Kind.AI, AI.WLIM_MAX_PCT, 0.1, 0.0, 100.0),
    Dnp3Point("WMaxLimEna", "", Kind.BI, BI.WLIM_ENABLED, valid_min=0.0, valid_max=1.0),
    Dnp3Point("WMaxLimRvrtTms", "s", Kind.AI, AI.WLIM_RVRT_S, valid_min=0.0),
    Dnp3Point("Conn", "", Kind.BI, BI.SWITCH_CLOSED, valid_min=0.0, valid_max=1.0),
    Dnp3Point("Alarm", "", Kind.BI, BI.P1_ALARM, valid_min=0.0, valid_max=1.0),
)

# Points whose value is a control the driver writes (reported in PointSchema.writable).
CONTROLS: Final = frozenset({"WMaxLimPct", "WMaxLimEna", "WMaxLimRvrtTms", "Conn"})

# Nameplate sources: AI index -> Nameplate field (read once at connect).
NAMEPLATE_MAX_W: Final = {
    "max_w": AI.MAX_GEN_W,
    "max_va": AI.MAX_VA_GEN,
    "max_var": AI.MAX_VAR_INJ,
}


def group_indices(points: tuple[Dnp3Point, ...]) -> dict[str, list[int]]:
    """The indices per point kind ("ai", "bi", "bo") a poll must report for `points`."""
    out: dict[str, set[int]] = {k.value: set() for k in Kind}
    for p in points:
        out[p.kind.value].add(p.index)
    out[Kind.AI.value].update(NAMEPLATE_MAX_W.values())
    out[Kind.BO.value].update((BO.CONNECT, BO.WLIM_ENABLE))
    return {k: sorted(v) for k, v in out.items()}

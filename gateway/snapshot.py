"""SiteSnapshot: the latest readings of every device, and the control loop's view of them.

Pollers write into the snapshot; the control loop reads it through `device_states()` and
`pcc_w()`, which apply the staleness rules on the monotonic clock: a reading older than
`stale_periods` poll periods, or a failed read, is not used for control. Values are never
re-stamped: a failed read leaves the last good reading (with its own timestamp) in place and only
marks the device down.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from drivers.contract import DeviceInfo, DeviceKind, Nameplate, Reading
from gateway.safety import DeviceState

__all__ = ["DeviceSlot", "SiteSnapshot"]

NS_PER_S = 1_000_000_000


@dataclass(slots=True)
class DeviceSlot:
    device_id: str
    kind: DeviceKind
    poll_period_s: float
    role: str | None = None
    info: DeviceInfo | None = None  # None until discovered
    last_good: Reading | None = None
    last_read_ok: bool = False
    last_error: str = "not connected yet"
    last_read_mono_ns: int | None = None  # when the last read (good or bad) completed

    def age_s(self, now_mono_ns: int) -> float | None:
        if self.last_good is None:
            return None
        return (now_mono_ns - self.last_good.mono_ns) / NS_PER_S


class SiteSnapshot:
    """Per-device latest state. Not thread-safe: owned by the gateway's event loop."""

    def __init__(self, slots: Iterable[DeviceSlot], *, stale_periods: int) -> None:
        self._slots = {slot.device_id: slot for slot in slots}
        self.stale_periods = stale_periods

    @property
    def slots(self) -> dict[str, DeviceSlot]:
        return self._slots

    def set_info(self, info: DeviceInfo) -> None:
        self._slots[info.device_id].info = info

    def update(self, reading: Reading) -> None:
        slot = self._slots[reading.device_id]
        slot.last_read_mono_ns = reading.mono_ns
        if reading.ok:
            slot.last_good = reading
            slot.last_read_ok = True
            slot.last_error = ""
        else:
            slot.last_read_ok = False
            slot.last_error = reading.error or "read failed"

    def mark_down(self, device_id: str, reason: str) -> None:
        slot = self._slots[device_id]
        slot.last_read_ok = False
        slot.last_error = reason

    def _fresh(self, slot: DeviceSlot, now_mono_ns: int) -> Reading | None:
        age = slot.age_s(now_mono_ns)
        if not slot.last_read_ok or age is None or slot.last_good is None:
            return None
        if age > self.stale_periods * slot.poll_period_s:
            return None
        return slot.last_good

    def read_since(self, mono_ns: int) -> bool:
        """Has every discovered device been read (successfully or not) since `mono_ns`?"""
        return all(
            slot.last_read_mono_ns is not None and slot.last_read_mono_ns >= mono_ns
            for slot in self._slots.values()
            if slot.info is not None
        )

    def availability(self, device_id: str, now_mono_ns: int) -> tuple[bool, str]:
        slot = self._slots[device_id]
        if slot.info is None:
            return False, f"not discovered: {slot.last_error}"
        if self._fresh(slot, now_mono_ns) is None:
            age = slot.age_s(now_mono_ns)
            age_text = "never read" if age is None else f"last good read {age:.1f} s ago"
            return False, f"stale ({age_text}): {slot.last_error or 'no fresh reading'}"
        return True, ""

    def device_states(self, now_mono_ns: int) -> dict[str, DeviceState]:
        """The safety kernel's view of every non-meter device."""
        states: dict[str, DeviceState] = {}
        for device_id, slot in self._slots.items():
            if slot.kind is DeviceKind.METER:
                continue
            available, reason = self.availability(device_id, now_mono_ns)
            plate = slot.info.nameplate if slot.info is not None else Nameplate()
            fresh = self._fresh(slot, now_mono_ns)
            states[device_id] = DeviceState(
                device_id=device_id,
                kind=slot.kind,
                max_w=plate.max_w,
                max_charge_w=plate.max_charge_w,
                max_discharge_w=plate.max_discharge_w,
                available=available,
                unavailable_reason=reason,
                measured_w=fresh.get("W") if fresh is not None else None,
                controls=slot.info.controls if slot.info is not None else frozenset(),
                soc_pct=fresh.get("SoC") if fresh is not None else None,
                bms_charge_max_w=fresh.get("WChaRteMax") if fresh is not None else None,
                bms_discharge_max_w=fresh.get("WDisChaRteMax") if fresh is not None else None,
                fault=fresh.fault if fresh is not None else None,
            )
        return states

    def pcc_reading(self, now_mono_ns: int) -> Reading | None:
        """The PCC meter's latest reading if fresh and good, else None (stale, bad, no meter)."""
        for slot in self._slots.values():
            if slot.role == "pcc":
                return self._fresh(slot, now_mono_ns)
        return None

    def pcc_w(self, now_mono_ns: int) -> float | None:
        """PCC meter power (+ import / - export) if fresh and good, else None (stale or bad)."""
        reading = self.pcc_reading(now_mono_ns)
        return reading.get("W") if reading is not None else None

    def grid_response(self, now_mono_ns: int) -> str | None:
        """Which device reports an autonomous grid-support response now (e.g. frequency-watt)."""
        for device_id, slot in self._slots.items():
            fresh = self._fresh(slot, now_mono_ns)
            if fresh is not None and fresh.grid_response:
                return f"{device_id} {fresh.grid_response}"
        return None

    def grid_hz(self, now_mono_ns: int) -> float | None:
        """Grid frequency at the PCC meter, if fresh and good."""
        reading = self.pcc_reading(now_mono_ns)
        return reading.get("Hz") if reading is not None else None

"""The driver contract every field-protocol driver follows (SunSpec Modbus now; OPC UA, DNP3 later).

A driver owns one device and its connection. Its surface is small and uniform:

    info = await driver.connect()          # discover the device, return inventory + nameplate
    reading = await driver.read()          # every point, one timestamp, a quality per point
    result = await driver.write(setpoint)  # only a SafeSetpoint; verified by read-back
    health = driver.health()
    await driver.close()

Rules that every driver keeps (tests hold them to it):
  * `read()` never raises for device or transport errors: it returns a Reading whose points are
    all QUALITY_BAD_COMM with NaN values and `error` set. It never returns an older value with a
    new timestamp. When the device itself reports a fault or trip, `fault` says so (the safety
    kernel then stops commanding it toward more output).
  * `write()` accepts nothing but a SafeSetpoint, writes it, reads the registers back and reports
    `ok=True` only when the read-back matches; otherwise `ok=False` with a reason. It never raises
    for device or transport errors either.
  * Readings are packed: one schema object per device, numpy arrays of values and qualities, so
    the hot path never builds one Python object per point.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from gateway.safety import SafeSetpoint

__all__ = [
    "ALL_CONTROLS",
    "Control",
    "DeviceInfo",
    "DeviceKind",
    "Driver",
    "DriverError",
    "DriverHealth",
    "HealthTracker",
    "LinkState",
    "Nameplate",
    "PointSchema",
    "Quality",
    "Reading",
    "WriteResult",
    "check_setpoint",
]


class DriverError(Exception):
    """A driver could not do what was asked (connect, discover); the message says what to check."""


class DeviceKind(enum.StrEnum):
    PV = "pv"
    BATTERY = "battery"
    METER = "meter"


class Control(enum.StrEnum):
    """What a device can be commanded to do (its controls as discovered by the driver)."""

    GENERATION_CAP = "generation_cap"  # honours SafeSetpoint.max_active_power_w
    ACTIVE_POWER = "active_power"  # honours SafeSetpoint.active_power_w (storage)
    CONNECT = "connect"  # honours SafeSetpoint.connect


ALL_CONTROLS = frozenset(Control)


class Quality(enum.IntEnum):
    """Per-point quality. Values equal the wire enum dergw.v1.Quality."""

    GOOD = 1
    NOT_IMPLEMENTED = 2  # the device serves the "not implemented" sentinel
    BAD_COMM = 3  # the read failed; the value is NaN
    OUT_OF_RANGE = 4  # NaN or outside the physical range; excluded from control


class LinkState(enum.StrEnum):
    DISCONNECTED = "disconnected"
    CONNECTED = "connected"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class PointSchema:
    """Names and units of the points a device reports, in a fixed order (one object per device)."""

    names: tuple[str, ...]
    units: tuple[str, ...]
    writable: frozenset[str] = frozenset()
    index: Mapping[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.names) != len(self.units):
            raise ValueError("PointSchema: names and units differ in length")
        if len(set(self.names)) != len(self.names):
            raise ValueError("PointSchema: duplicate point names")
        object.__setattr__(self, "index", {name: i for i, name in enumerate(self.names)})

    def __len__(self) -> int:
        return len(self.names)


@dataclass(frozen=True, slots=True)
class Nameplate:
    """Ratings discovered from the device, in W / VA / var / Wh; 0.0 = not applicable or unknown."""

    max_w: float = 0.0
    max_va: float = 0.0
    max_var: float = 0.0
    max_charge_w: float = 0.0
    max_discharge_w: float = 0.0
    energy_wh: float = 0.0


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """What `connect()` discovered: identity, nameplate and the point schema of `read()`."""

    device_id: str
    kind: DeviceKind
    protocol: str  # e.g. "sunspec-modbus-tcp"
    address: str  # e.g. "127.0.0.1:15020/unit 3"
    manufacturer: str
    model: str
    serial_number: str
    nameplate: Nameplate
    schema: PointSchema
    controls: frozenset[Control] = ALL_CONTROLS


@dataclass(frozen=True, slots=True)
class Reading:
    """One read of one device. `values[i]` / `quality[i]` belong to `schema.names[i]`.

    Timestamps are taken when the read completed: `wall_ns` (UTC epoch ns) for the record,
    `mono_ns` (monotonic ns) for staleness decisions.
    """

    device_id: str
    wall_ns: int
    mono_ns: int
    schema: PointSchema
    values: npt.NDArray[np.float64]
    quality: npt.NDArray[np.uint8]
    error: str | None = None  # the read failed (every point BAD_COMM)
    fault: str | None = None  # the device reports a fault or trip state (why), from this read
    # The device reports an autonomous grid-support response in force (frequency-watt,
    # volt-watt): its output legitimately departs from setpoints and must not be fought.
    grid_response: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def get(self, name: str) -> float | None:
        """The value of `name` if present and GOOD, else None."""
        i = self.schema.index.get(name)
        if i is None or self.quality[i] != Quality.GOOD:
            return None
        return float(self.values[i])


@dataclass(frozen=True, slots=True)
class WriteResult:
    """Outcome of `write()`: `ok` only when the device read back what was written."""

    device_id: str
    ok: bool
    wall_ns: int
    readback: Mapping[str, float] = field(default_factory=dict)
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class DriverHealth:
    state: LinkState
    last_ok_mono_ns: int | None = None
    consecutive_failures: int = 0
    total_failures: int = 0
    last_error: str | None = None


@dataclass(slots=True)
class HealthTracker:
    """A driver's link state and failure counters, kept the same way by every driver;
    `snapshot()` is what `Driver.health()` returns."""

    state: LinkState = LinkState.DISCONNECTED
    last_ok_mono_ns: int | None = None
    consecutive_failures: int = 0
    total_failures: int = 0
    last_error: str | None = None

    def ok(self, mono_ns: int) -> None:
        """The device answered (a read, a verified write, a connect)."""
        self.state = LinkState.CONNECTED
        self.consecutive_failures = 0
        self.last_ok_mono_ns = mono_ns

    def failed(self, error: str) -> None:
        self.state = LinkState.FAILED
        self.consecutive_failures += 1
        self.total_failures += 1
        self.last_error = error

    def snapshot(self) -> DriverHealth:
        return DriverHealth(
            state=self.state,
            last_ok_mono_ns=self.last_ok_mono_ns,
            consecutive_failures=self.consecutive_failures,
            total_failures=self.total_failures,
            last_error=self.last_error,
        )


def check_setpoint(setpoint: object, device_id: str) -> None:
    """What every driver's write() checks first: a SafeSetpoint (nothing else reaches a device)
    addressed to this driver's device. Raises TypeError / ValueError: both are programming errors,
    never device conditions."""
    from gateway.safety import SafeSetpoint  # runtime import: the kernel mints the type

    if not isinstance(setpoint, SafeSetpoint):
        raise TypeError(
            f"{device_id}: write() accepts only gateway.safety.SafeSetpoint (from enforce()), "
            f"got {type(setpoint).__name__}"
        )
    if setpoint.device_id != device_id:
        raise ValueError(
            f"setpoint for device {setpoint.device_id!r} sent to driver of {device_id!r}"
        )


@runtime_checkable
class Driver(Protocol):
    """The async contract of a device driver (see the module docstring for the rules)."""

    @property
    def device_id(self) -> str: ...

    async def connect(self) -> DeviceInfo: ...

    async def read(self) -> Reading: ...

    async def write(self, setpoint: SafeSetpoint) -> WriteResult: ...

    def health(self) -> DriverHealth: ...

    async def close(self) -> None: ...

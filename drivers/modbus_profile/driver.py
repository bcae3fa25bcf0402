"""A generic Modbus driver (TCP or RTU) that executes a device profile (`profile.DeviceProfile`).

Same contract as the SunSpec driver (drivers.contract): `connect()` loads nothing from the
device's own map — the profile is the map — but reads every planned register once to prove the
unit answers; `read()` never raises for device errors (BAD_COMM + NaN + error), `write()` takes
only a SafeSetpoint, writes with FC16, reads the registers back and compares them word for word.

Writes a profile can express (canonical writable points):
  * generation cap -> `WMaxLimPct` (% of nameplate max_w, or of the `WMax`/`WRtg` point), with
    `WMaxLimEna` = 1 (or 100 % and 0 to release) when the profile maps it;
  * battery fixed power -> `WSet` (W, + = discharge);
  * connect -> `Conn`.
Values are floored to the register resolution (a cap is never rounded up). Anything else is
refused with ok=False and a reason. Transport is `drivers.sunspec.transport` (shared RTU bus,
pacing) so profile devices and SunSpec devices can share one RS-485 line.
"""

from __future__ import annotations

import asyncio
import math
import struct
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeVar

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, model_validator

from drivers.contract import (
    Control,
    DeviceInfo,
    DeviceKind,
    DriverError,
    DriverHealth,
    HealthTracker,
    LinkState,
    Nameplate,
    PointSchema,
    Quality,
    Reading,
    WriteResult,
    check_setpoint,
)
from drivers.modbus_profile.profile import DeviceProfile, PointMap, ProfileError, load_profile
from drivers.sunspec.driver import plan_reads
from drivers.sunspec.transport import LinkDown, ModbusLink, RtuLink, SerialSettings, TcpLink
from gateway.clock import Clock
from gateway.safety import SafeSetpoint

__all__ = ["PROTOCOL", "ModbusProfileDriver", "ModbusProfileParams", "decode", "encode"]

PROTOCOL: Final = "modbus-profile"
T = TypeVar("T")
Order = Literal["big", "little"]
_FMT: Final = {"int16": ">h", "uint16": ">H", "int32": ">i", "uint32": ">I", "float32": ">f"}


class ModbusProfileParams(BaseModel):
    """The `params` table of a `driver = "modbus-profile"` device."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    profile: str = Field(min_length=1)  # a shipped profile name or a path to a TOML file
    transport: Literal["tcp", "rtu"] = "tcp"
    host: str = ""
    port: int = Field(default=502, ge=1, le=65535)
    serial_port: str = ""
    baudrate: int = Field(default=9600, ge=300, le=4_000_000)
    parity: Literal["N", "E", "O"] = "N"
    stopbits: Literal[1, 2] = 1
    bytesize: Literal[7, 8] = 8
    unit_id: int = Field(default=1, ge=1, le=247)
    timeout_s: float = Field(default=1.0, gt=0.0, le=60.0)

    @model_validator(mode="after")
    def _check(self) -> ModbusProfileParams:
        if self.transport == "tcp" and not self.host:
            raise ValueError('transport "tcp" needs host')
        if self.transport == "rtu" and not self.serial_port:
            raise ValueError('transport "rtu" needs serial_port (e.g. "/dev/ttyUSB0")')
        return self


def decode(pm: PointMap, words: list[int], order: Order) -> float:
    """The raw number in `words` (before scale)."""
    ws = words if order == "big" or len(words) == 1 else list(reversed(words))
    value: float = struct.unpack(_FMT[pm.type], struct.pack(f">{len(ws)}H", *ws))[0]
    return float(value)


def encode(pm: PointMap, raw: float, order: Order) -> list[int]:
    """Words holding `raw` (already divided by scale); integers must be in range."""
    if pm.type == "float32":
        data = struct.pack(">f", raw)
    else:
        data = struct.pack(_FMT[pm.type], int(raw))
    words = list(struct.unpack(f">{len(data) // 2}H", data))
    return words if order == "big" or len(words) == 1 else list(reversed(words))


@dataclass(frozen=True, slots=True)
class _Planned:
    name: str
    pm: PointMap
    at: int  # index into its table's buffer
    sf_at: int | None


class ModbusProfileDriver:
    """A `drivers.contract.Driver` for a Modbus device described by a profile."""

    def __init__(
        self, device_id: str, kind: DeviceKind, params: ModbusProfileParams, clock: Clock
    ) -> None:
        self._device_id = device_id
        self._kind = DeviceKind(kind)
        self._params = params
        self._clock = clock
        try:
            self._profile = load_profile(params.profile)
        except ProfileError as exc:
            raise DriverError(str(exc)) from exc
        if self._profile.kind is not self._kind:
            raise DriverError(
                f"profile {self._profile.name} ({self._profile.source}) describes a "
                f"{self._profile.kind.value}, but {device_id} is configured as {self._kind.value}"
            )
        self._link: ModbusLink
        if params.transport == "rtu":
            settings = SerialSettings(
                params.serial_port, params.baudrate, params.parity, params.stopbits, params.bytesize
            )
            self._link = RtuLink(settings, params.timeout_s)
        else:
            self._link = TcpLink(params.host, params.port, params.timeout_s, f"profile:{device_id}")
        self._address = f"{self._link.address}/unit {params.unit_id}"
        self._lock = asyncio.Lock()
        p = self._profile
        names = tuple(p.points)
        self._schema = PointSchema(
            names,
            tuple(pm.unit for pm in p.points.values()),
            frozenset(n for n, pm in p.points.items() if pm.writable),
        )
        self._plans: dict[str, tuple[Any, list[_Planned]]] = {}
        for table in ("holding", "input"):
            mine = [pm for pm in p.points.values() if pm.table == table]
            spans = [(pm.address, pm.size) for pm in mine]
            spans += [(pm.sf_address, 1) for pm in mine if pm.sf_address is not None]
            if not spans:
                continue
            plan = plan_reads(spans, p.max_read)
            planned = [
                _Planned(
                    n,
                    pm,
                    pm.address - plan.start,
                    None if pm.sf_address is None else pm.sf_address - plan.start,
                )
                for n, pm in p.points.items()
                if pm.table == table
            ]
            self._plans[table] = (plan, planned)
        self._connected = False
        self._health = HealthTracker()

    @property
    def device_id(self) -> str:
        return self._device_id

    @property
    def profile(self) -> DeviceProfile:
        return self._profile

    @property
    def link(self) -> ModbusLink:
        return self._link

    # ------------------------------------------------------------------ contract surface

    async def connect(self) -> DeviceInfo:
        async with self._lock:
            try:
                await self._link.ensure()
                values, _ = await self._read_all()
            except (LinkDown, _LinkError) as exc:
                message = (
                    f"{self._device_id}: profile {self._profile.name} on {self._address}: {exc}: "
                    "check the address, unit id and that the profile fits the device"
                )
                self._record_failure(message)
                raise DriverError(message) from exc
            self._connected = True
            self._record_ok()
        p = self._profile
        controls: set[Control] = set()
        if self._kind is not DeviceKind.METER:
            if "WMaxLimPct" in self._schema.writable:
                controls.add(Control.GENERATION_CAP)
            if "Conn" in self._schema.writable:
                controls.add(Control.CONNECT)
            if self._kind is DeviceKind.BATTERY and "WSet" in self._schema.writable:
                controls.add(Control.ACTIVE_POWER)
        nameplate = p.nameplate
        if nameplate.max_w <= 0:
            for name in ("WMax", "WRtg"):
                i = self._schema.index.get(name)
                if i is not None and math.isfinite(values[i]) and values[i] > 0:
                    nameplate = Nameplate(
                        max_w=float(values[i]),
                        max_va=p.nameplate.max_va,
                        max_var=p.nameplate.max_var,
                        max_charge_w=p.nameplate.max_charge_w,
                        max_discharge_w=p.nameplate.max_discharge_w,
                        energy_wh=p.nameplate.energy_wh,
                    )
                    break
        self._nameplate = nameplate
        return DeviceInfo(
            device_id=self._device_id,
            kind=self._kind,
            protocol=f"{PROTOCOL}-{self._params.transport}:{p.name}",
            address=self._address,
            manufacturer=p.manufacturer,
            model=p.model,
            serial_number="",
            nameplate=nameplate,
            schema=self._schema,
            controls=frozenset(controls),
        )

    async def read(self) -> Reading:
        if not self._connected:
            raise RuntimeError(f"{self._device_id}: read() before connect()")
        async with self._lock:
            try:
                await self._link.ensure()
                values, quality = await self._read_all()
            except (LinkDown, _LinkError) as exc:
                return self._bad_reading(f"read failed on {self._address}: {exc}")
        self._record_ok()
        return Reading(
            device_id=self._device_id,
            wall_ns=self._clock.wall_ns(),
            mono_ns=self._clock.mono_ns(),
            schema=self._schema,
            values=values,
            quality=quality,
        )

    async def write(self, setpoint: SafeSetpoint) -> WriteResult:
        check_setpoint(setpoint, self._device_id)
        if not self._connected:
            return self._result(False, reason="not connected: connect() has not succeeded")
        async with self._lock:
            return await self._write_locked(setpoint)

    def health(self) -> DriverHealth:
        return self._health.snapshot()

    async def close(self) -> None:
        async with self._lock:
            await self._link.close()
            self._health.state = LinkState.DISCONNECTED

    # ------------------------------------------------------------------ I/O

    async def _request(self, what: str, request: Any) -> Any:
        timeout = self._params.timeout_s + 1.0
        try:
            rr = await self._link.call(lambda c: _bounded(request(c), timeout))
        except LinkDown:
            raise
        except Exception as exc:  # pymodbus raises several types; all mean "no valid answer"
            self._link.drop()
            raise _LinkError(f"{what}: {type(exc).__name__}: {exc}") from exc
        if rr.isError():
            code = int(getattr(rr, "exception_code", 0) or 0)
            raise _LinkError(f"{what}: Modbus exception {code}")
        return rr

    async def _read_table(self, table: str, address: int, count: int) -> list[int]:
        unit = self._params.unit_id

        def request(c: Any) -> Any:
            if table == "input":
                return c.read_input_registers(address, count=count, device_id=unit)
            return c.read_holding_registers(address, count=count, device_id=unit)

        rr = await self._request(f"reading {count} {table} registers at {address}", request)
        regs = list(rr.registers)
        if len(regs) != count:
            raise _LinkError(f"asked for {count} registers at {address}, got {len(regs)}")
        return regs

    async def _read_all(self) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.uint8]]:
        n = len(self._schema)
        values = np.full(n, np.nan, dtype=np.float64)
        quality = np.full(n, Quality.GOOD, dtype=np.uint8)
        for table, (plan, planned) in self._plans.items():
            buf = [0] * plan.size
            for req in plan.requests:
                at = req.address - plan.start
                buf[at : at + req.count] = await self._read_table(table, req.address, req.count)
            for pl in planned:
                i = self._schema.index[pl.name]
                raw = decode(pl.pm, buf[pl.at : pl.at + pl.pm.size], self._profile.order(pl.pm))
                sf = 0
                if pl.sf_at is not None:
                    sf = struct.unpack(">h", struct.pack(">H", buf[pl.sf_at]))[0]
                value = raw * pl.pm.scale * 10.0**sf + pl.pm.offset
                values[i] = value
                if not math.isfinite(value):
                    quality[i] = Quality.OUT_OF_RANGE
        return values, quality

    async def _write_words(self, address: int, words: list[int]) -> None:
        unit = self._params.unit_id
        await self._request(
            f"writing {len(words)} registers at {address}",
            lambda c: c.write_registers(address, words, device_id=unit),
        )

    # ------------------------------------------------------------------ writes

    def _plan_write(self, sp: SafeSetpoint) -> dict[str, float]:
        w = self._schema.writable
        out: dict[str, float] = {}
        if self._kind is DeviceKind.METER:
            raise _Refused(f"{self._device_id} is a meter: it takes no setpoints")
        if sp.connect is not None:
            if "Conn" not in w:
                raise _Refused(f"profile {self._profile.name} maps no writable Conn")
            out["Conn"] = 1.0 if sp.connect else 0.0
        if sp.active_power_w is not None:
            if "WSet" not in w or self._kind is not DeviceKind.BATTERY:
                raise _Refused(f"profile {self._profile.name} maps no writable WSet")
            out["WSet"] = sp.active_power_w
        if sp.max_active_power_w is not None or "WMaxLimPct" in w:
            if "WMaxLimPct" not in w:
                raise _Refused(f"profile {self._profile.name} maps no writable WMaxLimPct")
            if sp.max_active_power_w is None:
                out["WMaxLimPct"] = 100.0
                if "WMaxLimEna" in w:
                    out["WMaxLimEna"] = 0.0
            else:
                rating = self._nameplate.max_w
                if rating <= 0:
                    raise _Refused("no max_w rating to convert watts into a percentage")
                out["WMaxLimPct"] = min(max(sp.max_active_power_w / rating * 100.0, 0.0), 100.0)
                if "WMaxLimEna" in w:
                    out["WMaxLimEna"] = 1.0
        return out

    async def _write_locked(self, sp: SafeSetpoint) -> WriteResult:
        try:
            wanted = self._plan_write(sp)
            await self._link.ensure()
            words: dict[str, list[int]] = {}
            factor: dict[str, float] = {}
            for name, value in wanted.items():
                pm = self._profile.points[name]
                sf = 0
                if pm.sf_address is not None:
                    (word,) = await self._read_table("holding", pm.sf_address, 1)
                    sf = struct.unpack(">h", struct.pack(">H", word))[0]
                factor[name] = pm.scale * 10.0**sf
                raw = (value - pm.offset) / factor[name]
                if pm.type != "float32":
                    raw = math.copysign(math.floor(abs(raw) + 1e-9), raw)
                try:
                    words[name] = encode(pm, raw, self._profile.order(pm))
                except struct.error as exc:
                    raise _Refused(f"{name}={value:g} does not fit {pm.type}: {exc}") from exc
            # Enable flags last: the value is in place before it takes effect.
            for name in sorted(words, key=lambda n: n.endswith("Ena")):
                await self._write_words(self._profile.points[name].address, words[name])
            readback: dict[str, float] = {}
            mismatches: list[str] = []
            for name, want in words.items():
                pm = self._profile.points[name]
                got = await self._read_table("holding", pm.address, pm.size)
                raw_back = decode(pm, got, self._profile.order(pm))
                readback[name] = raw_back * factor[name] + pm.offset
                if got != want:
                    mismatches.append(f"{name}: wrote {want}, read back {got}")
        except _Refused as exc:
            return self._result(False, reason=f"write not attempted: {exc}")
        except (LinkDown, _LinkError) as exc:
            message = f"write failed on {self._address}: {exc}"
            self._record_failure(message)
            return self._result(False, reason=message)
        self._record_ok()
        if mismatches:
            return self._result(
                False,
                readback,
                "read-back mismatch (the device did not take the write): " + "; ".join(mismatches),
            )
        return self._result(True, readback)

    # ------------------------------------------------------------------ bookkeeping

    def _result(
        self, ok: bool, readback: Mapping[str, float] | None = None, reason: str | None = None
    ) -> WriteResult:
        return WriteResult(
            device_id=self._device_id,
            ok=ok,
            wall_ns=self._clock.wall_ns(),
            readback=dict(readback or {}),
            reason=reason,
        )

    def _record_ok(self) -> None:
        self._health.ok(self._clock.mono_ns())

    def _record_failure(self, error: str) -> None:
        self._link.drop()
        self._health.failed(error)

    def _bad_reading(self, error: str) -> Reading:
        self._record_failure(error)
        n = len(self._schema)
        return Reading(
            device_id=self._device_id,
            wall_ns=self._clock.wall_ns(),
            mono_ns=self._clock.mono_ns(),
            schema=self._schema,
            values=np.full(n, np.nan, dtype=np.float64),
            quality=np.full(n, Quality.BAD_COMM, dtype=np.uint8),
            error=error,
        )


class _LinkError(Exception):
    pass


class _Refused(Exception):
    pass


async def _bounded(request: Awaitable[T], timeout_s: float) -> T:
    async with asyncio.timeout(timeout_s):
        return await request

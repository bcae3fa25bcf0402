"""The SunSpec Modbus TCP driver: discovery, packed polling and verified writes over pymodbus.

This module is the I/O edge of `drivers.sunspec`. It owns the connection to one device (pymodbus
`AsyncModbusTcpClient`), the discovery of its SunSpec map, the read plan, and the translation of a
`gateway.safety.SafeSetpoint` into register writes. Register layouts come from `models`, numbers
from `codec`, the canonical point set from `profile`; everything here that is not I/O is a pure
helper (`plan_reads`) or precomputed at `connect()` so that `read()` is a fixed sequence of
requests plus a few numpy calls.

Behaviour that callers rely on (drivers.contract):
  * `connect()` scans the base addresses for "SunS", walks the model chain (ID and L read
    separately, as pysunspec2 does, because some devices omit the end model's L) until 0xFFFF,
    an illegal-address exception or L = 0, checks that the models fit the configured kind, reads
    identity and nameplate, and compiles the read plan and decoder. Failures raise DriverError.
  * `read()` never raises for device/transport errors and never re-stamps old values: a failure
    gives every point BAD_COMM with NaN. A failed read closes the TCP connection (so a late reply
    can never be matched to a later request); the next read reconnects once, bounded by
    timeout_s. Backoff belongs to the gateway's poller.
  * `read()` sets `Reading.fault` when the device reports a fault or trip (`status.fault_reason`:
    St = FAULT, an Evt1 trip bit, battery State = FAULT).
  * `write()` takes only a SafeSetpoint, reads the control blocks (fresh scale factors), writes
    each control with FC16 (value, timers and enable in one request wherever the map has them
    in one writable run: 123, 704), reads the registers back and compares them word for word.
    `ok` is True only when they match.
  * The generation cap goes to 704 (`WMaxLimPctEna`, `WMaxLimPct`, `WMaxLimPctRvrtTms`) when the
    device serves 704's WMaxLimPct, else to 123 (protocols.md §2.2 "Which to use"). On 704 the
    same FC16 carries the reversion values from `SafeSetpoint.revert_cap_w`: a cap gives
    `WMaxLimPctRvrt` = that cap in % of WMax (floored) and `WMaxLimPctEnaRvrt` = ENABLED, None
    gives `WMaxLimPctEnaRvrt` = DISABLED (the device's own default, i.e. no limit). A device
    that does not implement the reversion registers gets the cap and timer alone; the result is
    then ok with a `reason` saying the reversion cap could not be set. Model 123 has no
    reversion values: there `revert_cap_w` cannot be honoured (same note).
  * One asyncio.Lock serialises all I/O of a driver: reads and writes may come from different tasks.
  * Transport (`drivers.sunspec.transport`): `transport = "tcp"` is one connection per device;
    `transport = "rtu"` puts the device on a serial bus shared with every device configured on
    the same port: one FIFO lock per bus taken per request, t3.5 inter-frame pacing, and a
    failed request re-opens the port (inside the bus lock) instead of closing a TCP socket.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal, TypeVar

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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
from drivers.sunspec import codec, models, profile, status
from drivers.sunspec.transport import LinkDown, ModbusLink, RtuLink, SerialSettings, TcpLink
from gateway.clock import Clock
from gateway.safety import SafeSetpoint

__all__ = [
    "MAX_READ_REGISTERS",
    "PROTOCOL",
    "PROTOCOL_RTU",
    "ModelInstance",
    "ReadPlan",
    "ReadRequest",
    "SunSpecModbusDriver",
    "SunSpecModbusParams",
    "make_link",
    "plan_reads",
]

PROTOCOL: Final = "sunspec-modbus-tcp"
PROTOCOL_RTU: Final = "sunspec-modbus-rtu"
MAX_READ_REGISTERS: Final = 125  # Modbus FC03 limit (pysunspec2 REQ_COUNT_MAX)
SUNS_MARKER: Final = (0x5375, 0x6E53)  # "SunS"
END_MODEL_ID: Final = 0xFFFF
_MAX_MODELS: Final = 256  # guard against a chain that never ends (garbage L values)
_ILLEGAL_ADDRESS: Final = 2
_EXCEPTION_NAMES: Final = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "server device failure",
    5: "acknowledge",
    6: "server device busy",
    10: "gateway path unavailable",
    11: "gateway target device failed to respond",
}
# Models whose registers a write may need: controls and the ratings that scale them.
_WRITE_CONTEXT_MODELS: Final = (120, 121, 123, 124, 702, 704, 802)
_ENABLED: Final = 1.0
_DISABLED: Final = 0.0
_STOR_CHARGE: Final = 0b01  # model 124 StorCtl_Mod bit 0
_STOR_DISCHARGE: Final = 0b10  # bit 1
_WSET_MOD_WATTS: Final = 1.0  # model 704 WSetMod

T = TypeVar("T")
U16 = npt.NDArray[np.uint16]
F64 = npt.NDArray[np.float64]
# Model blocks read in one pass, by model id (first instance): the instance and its registers.
_Blocks = dict[int, tuple["ModelInstance", U16]]


class SunSpecModbusParams(BaseModel):
    """The `params` table of a `driver = "sunspec-modbus"` device.

    `transport = "tcp"` (default) needs `host` (and `port`); `transport = "rtu"` needs
    `serial_port` (e.g. "/dev/ttyUSB0") and the line settings shared by every device on that
    RS-485 bus (`baudrate`, `parity`, `stopbits`, `bytesize`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    transport: Literal["tcp", "rtu"] = "tcp"
    host: str = ""
    port: int = Field(default=502, ge=1, le=65535)
    serial_port: str = ""
    baudrate: int = Field(default=19200, ge=300, le=4_000_000)
    parity: Literal["N", "E", "O"] = "N"
    stopbits: Literal[1, 2] = 1
    bytesize: Literal[7, 8] = 8
    unit_id: int = Field(default=1, ge=1, le=247)
    timeout_s: float = Field(default=1.0, gt=0.0, le=60.0)
    base_addresses: tuple[int, ...] = (40000, 0, 50000)
    raw_points: bool = False

    @field_validator("base_addresses")
    @classmethod
    def _check_bases(cls, bases: tuple[int, ...]) -> tuple[int, ...]:
        if not bases:
            raise ValueError("needs at least one base address (SunSpec uses 40000, 0, 50000)")
        for b in bases:
            if not 0 <= b <= 0xFFFF - 4:
                raise ValueError(f"base address {b} is not a Modbus register address")
        return bases

    @model_validator(mode="after")
    def _check_transport(self) -> SunSpecModbusParams:
        if self.transport == "tcp" and not self.host:
            raise ValueError('transport "tcp" needs host (the device or Modbus gateway address)')
        if self.transport == "rtu" and not self.serial_port:
            raise ValueError('transport "rtu" needs serial_port (e.g. "/dev/ttyUSB0")')
        return self

    @property
    def serial(self) -> SerialSettings:
        return SerialSettings(
            self.serial_port, self.baudrate, self.parity, self.stopbits, self.bytesize
        )


def make_link(params: SunSpecModbusParams, name: str) -> ModbusLink:
    """The link `params` describe: a TCP connection or a place on a shared serial bus."""
    if params.transport == "rtu":
        return RtuLink(params.serial, params.timeout_s)
    return TcpLink(params.host, params.port, params.timeout_s, name)


@dataclass(frozen=True, slots=True)
class ModelInstance:
    """One model found in the device's chain."""

    model_id: int
    address: int  # PDU address of its ID register
    length: int  # its L
    instance: int  # 1 for the first model with this id, 2 for the second, ...
    layout: models.ModelLayout | None  # None when no definition ships for the id

    @property
    def prefix(self) -> str:
        """Name prefix of its raw points: "802" for the first 802, "802:2" for the second."""
        return str(self.model_id) if self.instance == 1 else f"{self.model_id}:{self.instance}"

    @property
    def span(self) -> int:
        """Registers worth reading: up to the end of its last compiled point (ID and L included)."""
        if self.layout is None:
            return 2
        return max(p.end for p in self.layout.points)


@dataclass(frozen=True, slots=True)
class ReadRequest:
    address: int
    count: int


@dataclass(frozen=True, slots=True)
class ReadPlan:
    """Requests that cover the needed registers; the buffer holds registers start..start+size."""

    requests: tuple[ReadRequest, ...]
    start: int
    size: int

    @property
    def registers(self) -> int:
        return sum(r.count for r in self.requests)


def plan_reads(spans: Iterable[tuple[int, int]], max_count: int = MAX_READ_REGISTERS) -> ReadPlan:
    """The fewest read requests (each ≤ max_count registers) covering every (address, count) span.

    Greedy from the lowest needed register: each request starts at the first register not yet
    covered and extends as far as max_count allows, trimmed to the last needed register inside
    it. For covering points with fixed-length windows this is optimal. A request may cover
    registers between needed spans: inside a SunSpec chain they belong to other models and read
    fine, and one request is cheaper than two.
    """
    merged: list[list[int]] = []
    for address, count in sorted((a, c) for a, c in spans if c > 0):
        end = address + count
        if merged and address <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([address, end])
    if not merged:
        return ReadPlan((), 0, 0)
    requests: list[ReadRequest] = []
    i = 0
    pos = merged[0][0]
    while i < len(merged):
        start = max(pos, merged[i][0])
        limit = start + max_count
        end = start
        j = i
        while j < len(merged) and merged[j][0] < limit:
            end = min(merged[j][1], limit)
            if merged[j][1] > limit:
                break
            j += 1
        requests.append(ReadRequest(start, end - start))
        pos = end
        i = j
    return ReadPlan(tuple(requests), merged[0][0], merged[-1][1] - merged[0][0])


class _LinkError(Exception):
    """A request failed (transport, timeout, malformed or exception response)."""


class _DeviceException(_LinkError):
    """The device answered with a Modbus exception response."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class _WriteRefused(Exception):
    """The setpoint cannot be written to this device (no such control, no rating to scale)."""


@dataclass(frozen=True, slots=True)
class _WriteOp:
    """Points of one model to set, written as few FC16s as the map allows (see `_runs`).

    `gate` is the point that switches the control on or off (an `_Ena` or mode point). When a
    control's registers are not one writable run, the run holding the gate is written last when
    enabling (the new setpoint is in place before it takes effect) and first when disabling.
    """

    model: ModelInstance
    values: Mapping[str, float]
    gate: str | None = None
    enabling: bool = True
    note: str | None = None  # landed, but short of what was asked (reported with ok=True)


def _runs(layout: models.ModelLayout, names: Iterable[str]) -> list[tuple[int, int]]:
    """Contiguous runs (first, end) of writable registers covering the points `names`.

    Only RW registers go into an FC16: devices reject a multi-register write whose range includes
    a read-only register (SMA documents exception 2 for it), so a control whose points straddle
    read-only ones (model 124: StorCtl_Mod ... ChaSt ... OutWRte) takes more than one write.
    Writable points between wanted ones in a run are rewritten with the values just read.
    """
    wanted = sorted((layout.point(n) for n in names), key=lambda p: p.offset)
    for p in wanted:
        if not p.writable:
            raise _WriteRefused(f"{layout.model_id}.{p.name} is read-only")
    first, end = wanted[0].offset, max(p.end for p in wanted)
    runs: list[tuple[int, int]] = []
    start = cursor = -1
    for p in sorted(layout.points, key=lambda q: q.offset):
        if p.end <= first or p.offset >= end:
            continue
        if p.writable and p.offset == cursor:
            cursor = p.end
            continue
        if start >= 0:
            runs.append((start, cursor))
        start, cursor = (p.offset, p.end) if p.writable else (-1, -1)
    if start >= 0:
        runs.append((start, cursor))
    trimmed: list[tuple[int, int]] = []
    for a, b in runs:
        inside = [p for p in wanted if a <= p.offset < b]
        if inside:
            # Fillers only between wanted points, never past them: they may hold sentinels.
            trimmed.append((inside[0].offset, max(p.end for p in inside)))
    return trimmed


@dataclass(slots=True)
class _Compiled:
    """Everything `read()` needs, precomputed at connect()."""

    plan: ReadPlan
    schema: PointSchema
    decoder: codec.Decoder
    scale: F64
    offset: F64
    lo: F64
    hi: F64
    check_idx: npt.NDArray[np.intp]  # buffer indices of the ID/L registers of planned models
    check_expected: U16


@dataclass(frozen=True, slots=True)
class _Discovery:
    """What connect() found; committed to the driver only when discovery succeeded as a whole."""

    base: int
    models: tuple[ModelInstance, ...]
    first: dict[int, ModelInstance]
    compiled: _Compiled
    info: DeviceInfo


class SunSpecModbusDriver:
    """A `drivers.contract.Driver` for one SunSpec device over Modbus TCP or RTU."""

    def __init__(
        self, device_id: str, kind: DeviceKind, params: SunSpecModbusParams, clock: Clock
    ) -> None:
        self._device_id = device_id
        self._kind = DeviceKind(kind)
        self._params = params
        self._clock = clock
        self._link = make_link(params, f"sunspec:{device_id}")
        self._address = f"{self._link.address}/unit {params.unit_id}"
        self._protocol = PROTOCOL_RTU if params.transport == "rtu" else PROTOCOL
        self._lock = asyncio.Lock()
        self._base: int | None = None
        self._models: tuple[ModelInstance, ...] = ()
        self._first: dict[int, ModelInstance] = {}
        self._compiled: _Compiled | None = None
        self._health = HealthTracker()

    # ------------------------------------------------------------------ contract surface

    @property
    def device_id(self) -> str:
        return self._device_id

    @property
    def models(self) -> tuple[ModelInstance, ...]:
        """The model chain found by the last connect()."""
        return self._models

    @property
    def base_address(self) -> int | None:
        return self._base

    @property
    def read_plan(self) -> ReadPlan | None:
        return None if self._compiled is None else self._compiled.plan

    async def connect(self) -> DeviceInfo:
        """Discover the device, compile the read plan; raises DriverError saying what to check."""
        async with self._lock:
            self._drop_client()
            try:
                found = await self._discover()
            except DriverError as exc:
                self._record_failure(str(exc))
                raise
            except _LinkError as exc:
                message = f"SunSpec discovery on {self._address} failed: {exc}"
                self._record_failure(message)
                raise DriverError(message) from exc
            # Commit all at once: a failed re-discovery leaves the previous map in force (reads
            # then verify it through the ID/L check).
            self._base, self._models, self._first = found.base, found.models, found.first
            self._compiled = found.compiled
            self._record_ok()
            return found.info

    async def read(self) -> Reading:
        """Every point of the schema, one timestamp; BAD_COMM everywhere on any failure."""
        compiled = self._compiled
        if compiled is None:
            raise RuntimeError(f"{self._device_id}: read() before connect()")
        async with self._lock:
            try:
                await self._ensure_link()
                buf = await self._run_plan(compiled.plan)
            except _LinkError as exc:
                return self._bad_reading(compiled.schema, f"read failed on {self._address}: {exc}")
        if not np.array_equal(buf[compiled.check_idx], compiled.check_expected):
            return self._bad_reading(compiled.schema, self._map_changed_message(buf, compiled))
        values, quality = compiled.decoder.decode(buf)
        values = values * compiled.scale + compiled.offset
        good = quality == Quality.GOOD
        # NaN compares False, so a NaN that decoded GOOD also lands here.
        outside = good & ~((values >= compiled.lo) & (values <= compiled.hi))
        quality[outside] = Quality.OUT_OF_RANGE
        self._record_ok()
        return Reading(
            device_id=self._device_id,
            wall_ns=self._clock.wall_ns(),
            mono_ns=self._clock.mono_ns(),
            schema=compiled.schema,
            values=values,
            quality=quality,
            fault=status.fault_reason(compiled.schema, values, quality),
            grid_response=status.grid_response_reason(compiled.schema, values, quality),
        )

    async def write(self, setpoint: SafeSetpoint) -> WriteResult:
        """Write a SafeSetpoint, verify by read-back; ok=False with a reason on any failure."""
        check_setpoint(setpoint, self._device_id)
        if self._compiled is None:
            return self._write_result(False, reason="not connected: connect() has not succeeded")
        async with self._lock:
            return await self._write_locked(setpoint)

    def health(self) -> DriverHealth:
        return self._health.snapshot()

    async def close(self) -> None:
        async with self._lock:
            await self._link.close()
            self._health.state = LinkState.DISCONNECTED

    # ------------------------------------------------------------------ link and requests

    @property
    def link(self) -> ModbusLink:
        """The transport (TCP connection or place on a shared RTU bus)."""
        return self._link

    async def _ensure_link(self) -> None:
        try:
            await self._link.ensure()
        except LinkDown as exc:
            raise _LinkError(str(exc)) from exc

    def _drop_client(self) -> None:
        self._link.drop()

    async def _read_regs(self, address: int, count: int) -> list[int]:
        unit = self._params.unit_id
        try:
            # pymodbus enforces timeout_s per request; the outer bound only guards its internals.
            # (On a shared RTU bus the wait for its turn comes before, outside this bound.)
            rr = await self._link.call(
                lambda c: _bounded(
                    c.read_holding_registers(address, count=count, device_id=unit),
                    self._params.timeout_s + 1.0,
                )
            )
        except LinkDown as exc:
            raise _LinkError(str(exc)) from exc
        except Exception as exc:  # pymodbus raises several types; all mean "no valid answer"
            raise _LinkError(
                f"reading {count} registers at {address}: {type(exc).__name__}: {exc}"
            ) from exc
        if rr.isError():
            code = int(getattr(rr, "exception_code", 0) or 0)
            raise _DeviceException(
                f"Modbus exception {code} ({_EXCEPTION_NAMES.get(code, 'unknown')}) reading "
                f"{count} registers at {address}",
                code,
            )
        regs = list(rr.registers)
        if len(regs) != count:
            raise _LinkError(f"asked for {count} registers at {address}, got {len(regs)}")
        return regs

    async def _write_regs(self, address: int, words: Sequence[int]) -> None:
        unit = self._params.unit_id
        try:
            # Always FC16, even for one register: some inverters reject FC06.
            rr = await self._link.call(
                lambda c: _bounded(
                    c.write_registers(address, list(words), device_id=unit),
                    self._params.timeout_s + 1.0,
                )
            )
        except LinkDown as exc:
            raise _LinkError(str(exc)) from exc
        except Exception as exc:  # see _read_regs
            raise _LinkError(
                f"writing {len(words)} registers at {address}: {type(exc).__name__}: {exc}"
            ) from exc
        if rr.isError():
            code = int(getattr(rr, "exception_code", 0) or 0)
            raise _DeviceException(
                f"Modbus exception {code} ({_EXCEPTION_NAMES.get(code, 'unknown')}) writing "
                f"{len(words)} registers at {address}",
                code,
            )

    async def _run_plan(self, plan: ReadPlan) -> U16:
        buf: U16 = np.zeros(plan.size, dtype=np.uint16)
        for req in plan.requests:
            at = req.address - plan.start
            buf[at : at + req.count] = await self._read_regs(req.address, req.count)
        return buf

    # ------------------------------------------------------------------ health bookkeeping

    def _record_ok(self) -> None:
        self._health.ok(self._clock.mono_ns())

    def _record_failure(self, error: str) -> None:
        # Drop the connection: a late reply must never be taken for the answer to a new request.
        self._drop_client()
        self._health.failed(error)

    def _bad_reading(self, schema: PointSchema, error: str) -> Reading:
        self._record_failure(error)
        n = len(schema)
        return Reading(
            device_id=self._device_id,
            wall_ns=self._clock.wall_ns(),
            mono_ns=self._clock.mono_ns(),
            schema=schema,
            values=np.full(n, np.nan, dtype=np.float64),
            quality=np.full(n, Quality.BAD_COMM, dtype=np.uint8),
            error=error,
        )

    def _map_changed_message(self, buf: U16, compiled: _Compiled) -> str:
        found = buf[compiled.check_idx].reshape(-1, 2)
        expected = compiled.check_expected.reshape(-1, 2)
        for (fid, flen), (eid, elen), idx in zip(
            found.tolist(), expected.tolist(), compiled.check_idx[::2].tolist(), strict=True
        ):
            if (fid, flen) != (eid, elen):
                return (
                    f"SunSpec map changed on {self._address}: expected model {eid} (L={elen}) at "
                    f"{compiled.plan.start + idx}, found ID={fid} L={flen}; call connect() to "
                    "rediscover (firmware update or a different device at this address?)"
                )
        return f"SunSpec map changed on {self._address}"

    # ------------------------------------------------------------------ discovery

    async def _discover(self) -> _Discovery:
        await self._ensure_link()
        base = await self._find_base()
        chain = await self._walk_chain(base)
        first: dict[int, ModelInstance] = {}
        for m in chain:
            first.setdefault(m.model_id, m)
        ids = [m.model_id for m in chain]
        missing = profile.missing_for_kind(self._kind, ids)
        if missing:
            raise DriverError(
                f"device {self._device_id} on {self._address} is configured as {self._kind.value} "
                f"but lacks {' and '.join(missing)}; found SunSpec models {ids}: check the unit "
                "id and the device kind in the configuration"
            )
        # One pass over everything connect needs: identity, nameplate and every candidate source.
        wanted = {1, *_WRITE_CONTEXT_MODELS, *self._candidate_models()}
        blocks = await self._read_models([first[mid] for mid in sorted(wanted) if mid in first])

        def has_point(mid: int, point: str) -> bool:
            inst = first.get(mid)
            return inst is not None and inst.layout is not None and point in inst.layout

        def implemented(mid: int, point: str) -> bool:
            return _value(blocks, mid, point) is not None

        resolved = profile.resolve(self._kind, has_point, implemented)
        nameplate = self._nameplate(blocks)
        compiled = self._compile(resolved, nameplate, chain, first)

        manufacturer = model_name = serial = ""
        if 1 in blocks:
            common, block = blocks[1]
            assert common.layout is not None  # _read_models keeps compiled layouts only
            manufacturer = codec.decode_string(common.layout, block, "Mn")
            model_name = codec.decode_string(common.layout, block, "Md")
            serial = codec.decode_string(common.layout, block, "SN")
        info = DeviceInfo(
            device_id=self._device_id,
            kind=self._kind,
            protocol=self._protocol,
            address=self._address,
            manufacturer=manufacturer,
            model=model_name,
            serial_number=serial,
            nameplate=nameplate,
            schema=compiled.schema,
            controls=_controls(self._kind, first),
        )
        return _Discovery(base, chain, first, compiled, info)

    async def _find_base(self) -> int:
        problems: list[str] = []
        for base in self._params.base_addresses:
            try:
                regs = await self._read_regs(base, 2)
            except _DeviceException as exc:
                problems.append(f"{base}: {exc}")
                continue
            except _LinkError as exc:
                problems.append(f"{base}: {exc}")
                # After a timeout the reply may still arrive: start the next probe on a new socket.
                self._drop_client()
                try:
                    await self._ensure_link()
                except _LinkError as again:
                    problems.append(str(again))
                    break
                continue
            if tuple(regs) == SUNS_MARKER:
                return base
            problems.append(f"{base}: found 0x{regs[0]:04X} 0x{regs[1]:04X}")
        bases = ", ".join(str(b) for b in self._params.base_addresses)
        raise DriverError(
            f"no SunSpec marker 'SunS' at {bases} on {self._address} ({'; '.join(problems)}): "
            "check the unit id and that SunSpec is enabled on the device"
        )

    async def _walk_chain(self, base: int) -> tuple[ModelInstance, ...]:
        chain: list[ModelInstance] = []
        seen: dict[int, int] = {}
        address = base + 2
        while len(chain) < _MAX_MODELS:
            # ID and L separately: some devices serve the end ID without an L register.
            try:
                (model_id,) = await self._read_regs(address, 1)
            except _DeviceException as exc:
                if exc.code == _ILLEGAL_ADDRESS and chain:
                    break  # a chain that just stops instead of ending with 0xFFFF
                raise
            if model_id == END_MODEL_ID:
                break
            try:
                (length,) = await self._read_regs(address + 1, 1)
            except _DeviceException as exc:
                if exc.code == _ILLEGAL_ADDRESS and chain:
                    break
                raise
            if length == 0:
                break
            if address + 2 + length > 0x10000:
                raise DriverError(
                    f"model {model_id} at {address} on {self._address} claims L={length}, "
                    "beyond the Modbus address space: the SunSpec map is corrupt"
                )
            seen[model_id] = seen.get(model_id, 0) + 1
            chain.append(
                ModelInstance(model_id, address, length, seen[model_id], _layout(model_id, length))
            )
            address += 2 + length
        if not chain:
            raise DriverError(
                f"'SunS' found at {base} on {self._address} but no model follows at {base + 2}: "
                "the SunSpec map is empty or corrupt"
            )
        return tuple(chain)

    def _candidate_models(self) -> set[int]:
        ids = {s.model_id for cp in profile.PROFILES[self._kind] for s in cp.sources}
        ids |= {s.model_id for sources in profile.NAMEPLATE_SOURCES.values() for s in sources}
        return ids

    async def _read_models(self, instances: Sequence[ModelInstance]) -> _Blocks:
        """Blocks of the given (first-instance) models with compiled layouts, by model id."""
        usable = [m for m in instances if m.layout is not None]
        plan = plan_reads((m.address, m.span) for m in usable)
        buf = await self._run_plan(plan)
        return {
            m.model_id: (m, buf[m.address - plan.start : m.address - plan.start + m.span])
            for m in usable
        }

    def _nameplate(self, blocks: _Blocks) -> Nameplate:
        fields: dict[str, float] = {}
        for name, sources in profile.NAMEPLATE_SOURCES.items():
            value = 0.0
            for s in sources:
                v = _value(blocks, s.model_id, s.point)
                if v is not None and math.isfinite(v) and v > 0:
                    value = v
                    break
            fields[name] = value
        if self._kind is DeviceKind.METER:
            return Nameplate()
        return Nameplate(**fields)

    def _compile(
        self,
        resolved: Sequence[profile.ResolvedPoint],
        nameplate: Nameplate,
        chain: Sequence[ModelInstance],
        first: Mapping[int, ModelInstance],
    ) -> _Compiled:
        rating = max(nameplate.max_w, nameplate.max_va)
        names: list[str] = []
        units: list[str] = []
        writable: set[str] = set()
        scale: list[float] = []
        offset: list[float] = []
        lo: list[float] = []
        hi: list[float] = []
        items: list[tuple[ModelInstance, models.PointDef]] = []
        for rp in resolved:
            inst = first[rp.source.model_id]
            assert inst.layout is not None  # resolve() only binds points of compiled layouts
            pdef = inst.layout.point(rp.source.point)
            cp = rp.point
            names.append(cp.name)
            units.append(cp.unit)
            if cp.control and pdef.writable:
                writable.add(cp.name)
            scale.append(rp.source.scale)
            offset.append(rp.source.offset)
            low, high = cp.valid_min, cp.valid_max
            if cp.nameplate_factor is not None and rating > 0:
                bound = cp.nameplate_factor * rating
                low, high = max(low, -bound), min(high, bound)
            lo.append(low)
            hi.append(high)
            items.append((inst, pdef))
        if self._params.raw_points:
            for inst in chain:
                if inst.layout is None:
                    continue
                for i in inst.layout.numeric:
                    pdef = inst.layout.points[i]
                    if pdef.name in ("ID", "L"):
                        continue
                    names.append(f"{inst.prefix}.{pdef.name}")
                    units.append(pdef.units)
                    scale.append(1.0)
                    offset.append(0.0)
                    lo.append(-math.inf)
                    hi.append(math.inf)
                    items.append((inst, pdef))
        planned = sorted({id(inst): inst for inst, _ in items}.values(), key=lambda m: m.address)
        plan = plan_reads((m.address, m.span) for m in planned)
        fields: list[codec.Field] = []
        for inst, pdef in items:
            assert inst.layout is not None
            base = inst.address - plan.start
            sf_offset = (
                None if pdef.sf_index is None else base + inst.layout.points[pdef.sf_index].offset
            )
            fields.append(codec.Field(base + pdef.offset, pdef.type, sf_offset, pdef.sf_const or 0))
        check_idx: list[int] = []
        check_expected: list[int] = []
        for m in planned:
            check_idx += [m.address - plan.start, m.address - plan.start + 1]
            check_expected += [m.model_id, m.length]
        return _Compiled(
            plan=plan,
            schema=PointSchema(tuple(names), tuple(units), frozenset(writable)),
            decoder=codec.Decoder(fields),
            scale=np.array(scale, dtype=np.float64),
            offset=np.array(offset, dtype=np.float64),
            lo=np.array(lo, dtype=np.float64),
            hi=np.array(hi, dtype=np.float64),
            check_idx=np.array(check_idx, dtype=np.intp),
            check_expected=np.array(check_expected, dtype=np.uint16),
        )

    # ------------------------------------------------------------------ writes

    def _write_result(
        self, ok: bool, *, readback: Mapping[str, float] | None = None, reason: str | None = None
    ) -> WriteResult:
        return WriteResult(
            device_id=self._device_id,
            ok=ok,
            wall_ns=self._clock.wall_ns(),
            readback=dict(readback or {}),
            reason=reason,
        )

    async def _write_locked(self, setpoint: SafeSetpoint) -> WriteResult:
        try:
            self._check_supported(setpoint)
        except _WriteRefused as exc:
            return self._write_result(False, reason=str(exc))
        context = [self._first[m] for m in _WRITE_CONTEXT_MODELS if m in self._first]
        try:
            await self._ensure_link()
            blocks = await self._read_models(context)
        except _LinkError as exc:
            message = f"write not attempted: reading the control registers failed: {exc}"
            self._record_failure(message)
            return self._write_result(False, reason=message)
        try:
            ops = self._plan_write(setpoint, blocks)
            encoded = [self._encode(op, blocks[op.model.model_id][1]) for op in ops]
        except (_WriteRefused, codec.CodecError) as exc:
            return self._write_result(False, reason=f"write not attempted: {exc}")
        written: list[tuple[_WriteOp, U16]] = []
        try:
            for op, (runs, block) in zip(ops, encoded, strict=True):
                for first, end in runs:
                    await self._write_regs(op.model.address + first, block[first:end].tolist())
                written.append((op, block))
            after = await self._read_models([op.model for op in ops])
        except _DeviceException as exc:
            # The device answered and said no (value out of its range, control locked): the
            # link is fine, the command did not land.
            done = ", ".join(str(op.model.model_id) for op, _ in written) or "none"
            return self._write_result(
                False, reason=f"device refused the write (blocks written: {done}): {exc}"
            )
        except _LinkError as exc:
            done = ", ".join(str(op.model.model_id) for op, _ in written) or "none"
            message = f"write failed on {self._address} (blocks written: {done}): {exc}"
            self._record_failure(message)
            return self._write_result(False, reason=message)
        self._record_ok()
        return self._verify(written, after)

    def _check_supported(self, sp: SafeSetpoint) -> None:
        if self._kind is DeviceKind.METER:
            raise _WriteRefused(f"{self._device_id} is a meter: it takes no setpoints")
        if sp.revert_after_s < 0:
            raise _WriteRefused(f"revert_after_s={sp.revert_after_s} is negative")
        if sp.active_power_w is not None and not (
            self._kind is DeviceKind.BATTERY and (124 in self._first or 704 in self._first)
        ):
            raise _WriteRefused(
                f"{self._device_id} has no storage control (model 124 or 704 WSet) for "
                f"active_power_w={sp.active_power_w:g} W"
            )
        if sp.connect is not None and 123 not in self._first:
            raise _WriteRefused(f"{self._device_id} has no model 123 to connect/disconnect")
        cap_model = 123 in self._first or 704 in self._first
        # A battery without 123/704: its fixed power is the only lever and must honour the cap.
        if (
            sp.max_active_power_w is not None
            and not cap_model
            and (sp.active_power_w is None or sp.active_power_w > sp.max_active_power_w)
        ):
            raise _WriteRefused(
                f"{self._device_id} has no model 123 or 704 to cap active power at "
                f"{sp.max_active_power_w:g} W"
            )

    def _plan_write(self, sp: SafeSetpoint, blocks: _Blocks) -> list[_WriteOp]:
        """The write operations for `sp`, in a safe order (pure, given the control blocks)."""
        revert = float(sp.revert_after_s)
        ops: list[_WriteOp] = []
        if self._kind is DeviceKind.BATTERY:
            if 124 in self._first:
                ops.append(self._storage_124(sp.active_power_w, revert, blocks))
            elif 704 in self._first:
                ops.append(self._storage_704(sp.active_power_w, revert, blocks))
        if self._cap_model(blocks) == 704:
            ops.append(self._cap_704(sp.max_active_power_w, sp.revert_cap_w, revert, blocks))
        elif 123 in self._first:
            op = self._cap_123(sp.max_active_power_w, revert, blocks)
            if sp.revert_cap_w is not None:
                note = (
                    f"revert cap {sp.revert_cap_w:g} W not set: model 123 has no reversion "
                    "values, the device reverts to its own default (no limit)"
                )
                op = _WriteOp(op.model, op.values, op.gate, op.enabling, note)
            ops.append(op)
        if sp.connect is not None:
            conn = _WriteOp(
                self._first[123],
                {
                    "Conn_WinTms": 0.0,
                    "Conn_RvrtTms": revert,
                    "Conn": _ENABLED if sp.connect else _DISABLED,
                },
            )
            # Disconnect before anything else; connect only once the new limits are in place.
            if sp.connect:
                ops.append(conn)
            else:
                ops.insert(0, conn)
        return ops

    def _cap_model(self, blocks: _Blocks) -> int | None:
        """Where the generation cap goes: 704 when it serves WMaxLimPct, else 123 (if any)."""
        if 704 in self._first and _value(blocks, 704, "WMaxLimPct") is not None:
            return 704
        if 123 in self._first:
            return 123
        return 704 if 704 in self._first else None

    def _rating(self, blocks: _Blocks, sources: Sequence[tuple[int, str]]) -> float:
        for mid, point in sources:
            v = _value(blocks, mid, point)
            if v is not None and math.isfinite(v) and v > 0:
                return v
        names = ", ".join(f"{mid} {point}" for mid, point in sources if mid in self._first)
        raise _WriteRefused(
            f"no rating to convert watts into a percentage: {names or 'no rating model'} "
            "not implemented or zero on the device"
        )

    def _floor(self, mid: int, point: str, value: float, blocks: _Blocks) -> float:
        """`value` with its magnitude floored to the register resolution (10**SF).

        A command must never exceed what the safety kernel enforced, so rounding goes towards 0.
        """
        inst, block = blocks[mid]
        assert inst.layout is not None
        pdef = inst.layout.point(point)
        sf = pdef.sf_const or 0
        if pdef.sf_index is not None:
            raw = int(block[inst.layout.points[pdef.sf_index].offset])
            sf = raw - 0x10000 if raw >= 0x8000 else raw
            if sf == -0x8000:
                raise codec.EncodeError(
                    f"{mid}.{point}: its scale factor is not implemented on the device"
                )
        # The 1e-9 absorbs binary noise (50.0 / 0.01 may come out as 4999.999999999999).
        if sf < 0:
            k = math.floor(abs(value) * 10.0 ** (-sf) + 1e-9)
            magnitude = k / 10.0 ** (-sf)
        else:
            k = math.floor(abs(value) / 10.0**sf + 1e-9)
            magnitude = k * 10.0**sf
        return math.copysign(magnitude, value)

    def _cap_123(self, cap_w: float | None, revert: float, blocks: _Blocks) -> _WriteOp:
        if cap_w is None:
            pct, ena = 100.0, _DISABLED
        else:
            base = self._rating(blocks, ((121, "WMax"), (120, "WRtg")))
            pct = self._floor(123, "WMaxLimPct", min(max(cap_w / base * 100.0, 0.0), 100.0), blocks)
            ena = _ENABLED
        return _WriteOp(
            self._first[123],
            {
                "WMaxLimPct": pct,
                "WMaxLimPct_WinTms": 0.0,
                "WMaxLimPct_RvrtTms": revert,
                "WMaxLimPct_RmpTms": 0.0,
                "WMaxLim_Ena": ena,
            },
            gate="WMaxLim_Ena",
            enabling=ena == _ENABLED,
        )

    def _cap_704(
        self, cap_w: float | None, revert_cap_w: float | None, revert: float, blocks: _Blocks
    ) -> _WriteOp:
        def pct_of(watts: float, point: str) -> float:
            base = self._rating(
                blocks, ((702, "WMax"), (702, "WMaxRtg"), (121, "WMax"), (120, "WRtg"))
            )
            return self._floor(704, point, min(max(watts / base * 100.0, 0.0), 100.0), blocks)

        if cap_w is None:
            pct, ena = 100.0, _DISABLED
        else:
            pct, ena = pct_of(cap_w, "WMaxLimPct"), _ENABLED
        values = {"WMaxLimPctEna": ena, "WMaxLimPct": pct, "WMaxLimPctRvrtTms": revert}
        # The reversion values ride in the same FC16 (offsets 14-19 are one writable run). A
        # device serving the not-implemented value there has no reversion: leave it alone.
        note: str | None = None
        has_reversion = all(
            _value(blocks, 704, point) is not None
            for point in ("WMaxLimPctRvrt", "WMaxLimPctEnaRvrt")
        )
        if has_reversion:
            if revert_cap_w is None:
                values["WMaxLimPctEnaRvrt"] = _DISABLED
            else:
                values["WMaxLimPctRvrt"] = pct_of(revert_cap_w, "WMaxLimPctRvrt")
                values["WMaxLimPctEnaRvrt"] = _ENABLED
        elif revert_cap_w is not None:
            note = (
                f"revert cap {revert_cap_w:g} W not set: the device does not implement 704 "
                "WMaxLimPctRvrt/WMaxLimPctEnaRvrt, it reverts to its own default (no limit)"
            )
        return _WriteOp(
            self._first[704],
            values,
            gate="WMaxLimPctEna",
            enabling=ena == _ENABLED,
            note=note,
        )

    def _storage_124(self, active_w: float | None, revert: float, blocks: _Blocks) -> _WriteOp:
        mode, in_pct, out_pct = 0.0, 0.0, 0.0
        if active_w is not None and active_w > 0:
            base = self._rating(blocks, ((120, "MaxDisChaRte"), (802, "WDisChaRteMax")))
            mode = float(_STOR_DISCHARGE)
            out_pct = self._floor(124, "OutWRte", min(active_w / base * 100.0, 100.0), blocks)
        elif active_w is not None and active_w < 0:
            base = self._rating(blocks, ((124, "WChaMax"),))
            mode = float(_STOR_CHARGE)
            in_pct = self._floor(124, "InWRte", min(-active_w / base * 100.0, 100.0), blocks)
        elif active_w is not None:
            # 0 W: both limits active at 0 % = hold (neither charge nor discharge).
            mode = float(_STOR_CHARGE | _STOR_DISCHARGE)
        return _WriteOp(
            self._first[124],
            {
                "StorCtl_Mod": mode,
                "OutWRte": out_pct,
                "InWRte": in_pct,
                "InOutWRte_WinTms": 0.0,
                "InOutWRte_RvrtTms": revert,
            },
            gate="StorCtl_Mod",
            enabling=active_w is not None,
        )

    def _storage_704(self, active_w: float | None, revert: float, blocks: _Blocks) -> _WriteOp:
        watts = 0.0 if active_w is None else self._floor(704, "WSet", active_w, blocks)
        return _WriteOp(
            self._first[704],
            {
                "WSetEna": _DISABLED if active_w is None else _ENABLED,
                "WSetMod": _WSET_MOD_WATTS,
                "WSet": watts,
                "WSetRvrtTms": revert,
            },
            gate="WSetEna",
            enabling=active_w is not None,
        )

    def _encode(self, op: _WriteOp, block: U16) -> tuple[list[tuple[int, int]], U16]:
        """The runs (first, end) to write, in order, and the model block with the op encoded."""
        layout = op.model.layout
        assert layout is not None
        encoded = codec.encode_points(layout, block, op.values)
        runs = _runs(layout, op.values)
        if op.gate is not None and len(runs) > 1:
            gate = layout.point(op.gate).offset

            def holds_gate(run: tuple[int, int]) -> bool:
                return run[0] <= gate < run[1]

            # sorted() is stable: False sorts first, so enabling puts the gate run last.
            runs = sorted(runs, key=holds_gate if op.enabling else lambda r: not holds_gate(r))
        return runs, encoded

    def _verify(self, written: Sequence[tuple[_WriteOp, U16]], after: _Blocks) -> WriteResult:
        readback: dict[str, float] = {}
        mismatches: list[str] = []
        for op, block in written:
            layout = op.model.layout
            assert layout is not None
            got = after[op.model.model_id][1]
            for name in op.values:
                p = layout.point(name)
                want_words = block[p.offset : p.end].tolist()
                got_words = got[p.offset : p.end].tolist()
                value = codec.decode_point(layout, got, name)
                readback[f"{op.model.model_id}.{name}"] = math.nan if value is None else value
                if want_words != got_words:
                    mismatches.append(
                        f"{op.model.model_id}.{name}: wrote {_hex(want_words)}, "
                        f"read back {_hex(got_words)}"
                    )
        if mismatches:
            return self._write_result(
                False,
                readback=readback,
                reason="read-back mismatch (the device did not take the write): "
                + "; ".join(mismatches),
            )
        notes = [op.note for op, _ in written if op.note is not None]
        return self._write_result(True, readback=readback, reason="; ".join(notes) or None)


async def _bounded(request: Awaitable[T], timeout_s: float) -> T:
    async with asyncio.timeout(timeout_s):
        return await request


def _value(blocks: _Blocks, mid: int, point: str) -> float | None:
    """A scaled value from a block read at connect/write time (None: absent or not implemented)."""
    entry = blocks.get(mid)
    if entry is None:
        return None
    inst, block = entry
    if inst.layout is None or point not in inst.layout:
        return None
    return codec.decode_point(inst.layout, block, point)


def _hex(words: Sequence[int]) -> str:
    return " ".join(f"0x{w:04X}" for w in words)


def _layout(model_id: int, length: int) -> models.ModelLayout | None:
    try:
        return models.get_layout(model_id, length)
    except (models.UnknownModelError, models.LayoutError):
        # Vendor models without a definition are walked past, never decoded.
        return None


def _controls(kind: DeviceKind, models: Mapping[int, object]) -> frozenset[Control]:
    """The controls this device offers, from the models it serves (what write() can do)."""
    if kind is DeviceKind.METER:
        return frozenset()
    controls: set[Control] = set()
    if 123 in models or 704 in models:
        controls.add(Control.GENERATION_CAP)
    if 123 in models:
        controls.add(Control.CONNECT)
    if kind is DeviceKind.BATTERY and (124 in models or 704 in models):
        controls.add(Control.ACTIVE_POWER)
    return frozenset(controls)

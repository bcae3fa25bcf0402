"""An in-memory driver that keeps the driver contract, for control-loop tests without sockets."""

from __future__ import annotations

import asyncio

import numpy as np
from pydantic import BaseModel, ConfigDict

from drivers.contract import (
    ALL_CONTROLS,
    DeviceInfo,
    DeviceKind,
    DriverHealth,
    LinkState,
    Nameplate,
    PointSchema,
    Quality,
    Reading,
    WriteResult,
)
from gateway.clock import Clock
from gateway.safety import SafeSetpoint

SCHEMA = PointSchema(names=("W", "SoC", "Hz"), units=("W", "%", "Hz"))


class MemoryParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    max_w: float = 10_000.0


class MemoryDriver:
    """Reads what the test sets in `.w` / `.soc`; records every SafeSetpoint written."""

    def __init__(
        self, device_id: str, kind: DeviceKind, params: MemoryParams, clock: Clock
    ) -> None:
        self._device_id = device_id
        self._kind = kind
        self._params = params
        self._clock = clock
        self.w = 0.0
        self.soc: float | None = 50.0 if kind is DeviceKind.BATTERY else None
        self.hz = 50.0
        self.writes: list[SafeSetpoint] = []
        self.fail_writes = False
        self.hang_writes = False  # a hung driver: write() never returns

    @property
    def device_id(self) -> str:
        return self._device_id

    async def connect(self) -> DeviceInfo:
        max_w = 0.0 if self._kind is DeviceKind.METER else self._params.max_w
        return DeviceInfo(
            device_id=self._device_id,
            kind=self._kind,
            protocol="memory",
            address="memory",
            manufacturer="tests",
            model="memory",
            serial_number=self._device_id,
            nameplate=Nameplate(max_w=max_w, max_charge_w=max_w, max_discharge_w=max_w),
            schema=SCHEMA,
            controls=frozenset() if self._kind is DeviceKind.METER else ALL_CONTROLS,
        )

    async def read(self) -> Reading:
        soc = np.nan if self.soc is None else self.soc
        values = np.array([self.w, soc, self.hz], dtype=np.float64)
        quality = np.where(np.isnan(values), Quality.NOT_IMPLEMENTED, Quality.GOOD).astype(np.uint8)
        return Reading(
            self._device_id, self._clock.wall_ns(), self._clock.mono_ns(), SCHEMA, values, quality
        )

    async def write(self, setpoint: SafeSetpoint) -> WriteResult:
        self.writes.append(setpoint)
        if self.hang_writes:
            await asyncio.Event().wait()
        if self.fail_writes:
            return WriteResult(self._device_id, False, self._clock.wall_ns(), reason="refused")
        return WriteResult(self._device_id, True, self._clock.wall_ns())

    def health(self) -> DriverHealth:
        return DriverHealth(LinkState.CONNECTED)

    async def close(self) -> None:
        return None

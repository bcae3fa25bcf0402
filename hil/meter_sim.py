"""A non-SunSpec PCC meter: Eastron SDM630-style float32 input registers fed by the site physics.

Layout (0-based PDU addresses, FC04 input registers, IEEE-754 float32, high word first — the
SDM630 Modbus protocol document's "3xxxx" table minus 30001):

    0/2/4   L1/L2/L3 voltage (V)          12/14/16  L1/L2/L3 active power (W)
    6/8/10  L1/L2/L3 current (A)          42        average L-N voltage (V)
    52      total system power (W)        56        total system VA
    60      total system VAr              62        total power factor
    70      frequency (Hz)                72 / 74   import / export energy (kWh)

Signs as the SDM630 reports them: power + = import from the grid (the SunSpec meter convention).
FC03 on the measurement block is answered with ILLEGAL_FUNCTION, like the real meter (holding
registers hold its configuration, not served here). Faults: `silent` (no answer) and
`exception` (SERVER_DEVICE_FAILURE) via `fault`.

The meter reads `SiteSimulator.physics` on every request (no own state), so it shows the same
PCC power as the SunSpec 203 meter of that site.
"""

from __future__ import annotations

import math
import struct
from typing import Any

from pymodbus.constants import ExcCodes
from pymodbus.exceptions import NoSuchIdException
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from hil.server import SimulatorError, SiteSimulator

__all__ = ["SDM630_REGISTERS", "Sdm630Meter"]

SDM630_REGISTERS = 76  # 0..75: through export energy
_FC_READ_INPUT = 4


def _f32(value: float) -> tuple[int, int]:
    hi, lo = struct.unpack(">HH", struct.pack(">f", value))
    return hi, lo


class Sdm630Meter:
    """One SDM630-style meter; serve it on TCP (`start_tcp`) or put `sim_device()` on a bus."""

    def __init__(self, sim: SiteSimulator, unit_id: int = 1) -> None:
        self.sim = sim
        self.unit_id = unit_id
        self.fault: str | None = None  # None | "silent" | "exception"
        self.requests = 0
        self._server: ModbusTcpServer | None = None
        self.port: int | None = None

    def image(self) -> list[int]:
        """The register image now (from the physics)."""
        ph = self.sim.physics
        v = [float(x) for x in ph.grid_v]
        w, var = float(ph.meter_w), float(ph.meter_var)
        va = math.hypot(w, var)
        pf = w / va if va else 1.0
        regs = [0] * SDM630_REGISTERS

        def put(addr: int, value: float) -> None:
            regs[addr], regs[addr + 1] = _f32(value)

        for k in range(3):
            put(0 + 2 * k, v[k])
            put(6 + 2 * k, va / 3 / v[k] if v[k] else 0.0)
            put(12 + 2 * k, w / 3)
        put(42, sum(v) / 3)
        put(52, w)
        put(56, va)
        put(60, var)
        put(62, pf)
        put(70, float(ph.grid_hz))
        put(72, ph.meter_import_wh / 1000.0)
        put(74, ph.meter_export_wh / 1000.0)
        return regs

    def sim_device(self) -> SimDevice:
        async def hook(
            function_code: int,
            start_address: int,
            address: int,
            count: int,
            registers: list[int],
            set_values: list[int] | list[bool] | None,
        ) -> ExcCodes | None:
            self.requests += 1
            if self.fault == "silent":
                raise NoSuchIdException(f"simulated silent SDM630 unit {self.unit_id}")
            if self.fault == "exception":
                return ExcCodes.DEVICE_FAILURE
            if set_values is not None:
                return ExcCodes.ILLEGAL_ADDRESS
            if function_code != _FC_READ_INPUT:
                return ExcCodes.ILLEGAL_FUNCTION
            index = address - start_address
            registers[index : index + count] = self.image()[address : address + count]
            return None

        return SimDevice(
            id=self.unit_id,
            simdata=[
                SimData(0, count=SDM630_REGISTERS, values=0, datatype=DataType.REGISTERS),
            ],
            action=hook,
        )

    async def start_tcp(self, host: str = "127.0.0.1", port: int = 0) -> int:
        server = ModbusTcpServer(
            context=[self.sim_device()], address=(host, port), ignore_missing_devices=True
        )
        try:
            await server.serve_forever(background=True)
        except RuntimeError as exc:
            raise SimulatorError(f"cannot listen on {host}:{port}: {exc}") from exc
        self._server = server
        transport: Any = server.transport
        self.port = int(transport.sockets[0].getsockname()[1])
        return self.port

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.shutdown()

"""Test equipment for the SunSpec driver: register images built by pysunspec2, served by pymodbus.

Images are encoded with pysunspec2's own `sunspec2.device.Model` (its Python codec, not ours), so
a test that decodes them with `drivers.sunspec.codec` checks our codec against an independent
implementation. `ImageServer` serves one image on a loopback port with pymodbus' `SimDevice`
and can inject faults (silent, exception responses), refuse writes to read-only registers, ignore
writes (to provoke read-back mismatches) and record the writes it received.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pymodbus.constants import ExcCodes
from pymodbus.exceptions import NoSuchIdException
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice
from sunspec2.device import Model

from drivers.sunspec.models import get_layout
from tests.support import free_tcp_port

SUNS = [0x5375, 0x6E53]
END = [0xFFFF, 0x0000]


@dataclass
class ModelSpec:
    """One model of an image: raw values (SFs, enums, raw ints) and scaled values (pysunspec2)."""

    model_id: int
    raw: Mapping[str, Any] = field(default_factory=dict)
    scaled: Mapping[str, float] = field(default_factory=dict)
    length: int | None = None  # L to serve (None = as defined)


def model_words(spec: ModelSpec) -> list[int]:
    """The model block (ID, L, body) encoded by pysunspec2."""
    m = Model(spec.model_id, model_len=spec.length or 0)
    for name, value in spec.raw.items():
        m.points[name].set_value(value)
    for name, value in spec.scaled.items():
        m.points[name].set_value(value, computed=True)
    data = m.get_mb()
    words = list(struct.unpack(f">{len(data) // 2}H", data))
    if spec.length is not None:
        words[1] = spec.length
    return words


def image(
    specs: Sequence[ModelSpec], *, end: bool = True, marker: Sequence[int] = SUNS
) -> list[int]:
    """`SunS`, the models in order, and (unless `end=False`) the end model 0xFFFF 0."""
    words = list(marker)
    for spec in specs:
        words += model_words(spec)
    if end:
        words += END
    return words


def readonly_offsets(specs: Sequence[ModelSpec], *, base_offset: int = 2) -> set[int]:
    """Image offsets (from the base) of every read-only register of the models in `specs`."""
    out: set[int] = {0, 1}
    at = base_offset
    for spec in specs:
        layout = get_layout(spec.model_id, spec.length)
        for p in layout.points:
            if not p.writable:
                out.update(range(at + p.offset, at + p.end))
        at += layout.size
    return out


class ImageServer:
    """A Modbus TCP server on 127.0.0.1 serving `words` at `address` for `unit_id`.

    mode: None (normal), "silent" (no answer at all), "exception" (DEVICE_FAILURE to everything).
    ignore_writes: accept writes but keep the registers unchanged (a device that drops them).
    refuse_writes: answer writes with ILLEGAL_VALUE.
    readonly: image offsets that refuse writes with ILLEGAL_ADDRESS, as real devices do.
    """

    def __init__(
        self,
        words: Sequence[int],
        *,
        address: int = 40000,
        unit_id: int = 1,
        readonly: Iterable[int] = (),
    ) -> None:
        self.address = address
        self.unit_id = unit_id
        self.port = 0
        self.mode: str | None = None
        self.ignore_writes = False
        self.refuse_writes = False  # answer writes with ILLEGAL_VALUE
        self.writes: list[tuple[int, list[int]]] = []
        self.reads: list[tuple[int, int]] = []
        self._readonly = frozenset(readonly)
        self._registers: list[int] | None = None
        self._start_address = address
        self._initial = list(words)
        self._server: ModbusTcpServer | None = None

    @property
    def registers(self) -> list[int]:
        """The live image (as served), from the base address."""
        if self._registers is None:
            return list(self._initial)
        at = self.address - self._start_address
        return self._registers[at : at + len(self._initial)]

    def reg(self, offset: int) -> int:
        return self.registers[offset]

    def poke(self, offset: int, value: int) -> None:
        """Change a served register (offset from the base), as device firmware would."""
        assert self._registers is not None, "poke() needs one request served first"
        self._registers[self.address - self._start_address + offset] = value

    async def _action(
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        self._registers = registers
        self._start_address = start_address
        if self.mode == "silent":
            raise NoSuchIdException("silent")  # with ignore_missing_devices: no answer at all
        if self.mode == "exception":
            return ExcCodes.DEVICE_FAILURE
        if set_values is None:
            self.reads.append((address, count))
            return None
        offset = address - self.address
        if any(offset + k in self._readonly for k in range(count)):
            return ExcCodes.ILLEGAL_ADDRESS
        if self.refuse_writes:
            return ExcCodes.ILLEGAL_VALUE
        values = [int(v) for v in set_values]
        self.writes.append((address, values))
        if self.ignore_writes:
            # pymodbus stores set_values after the hook: make it store what is already there.
            at = address - start_address
            set_values[:] = registers[at : at + count]  # type: ignore[index]
        return None

    async def start(self, port: int | None = None) -> None:
        self.port = free_tcp_port() if port is None else port
        device = SimDevice(
            id=self.unit_id,
            simdata=[
                SimData(
                    self.address, count=1, values=list(self._initial), datatype=DataType.REGISTERS
                )
            ],
            action=self._action,
        )
        self._server = ModbusTcpServer(
            context=[device], address=("127.0.0.1", self.port), ignore_missing_devices=True
        )
        await self._server.serve_forever(background=True)

    async def stop(self) -> None:
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.shutdown()
            self._server = None
            await asyncio.sleep(0)


# A PV inverter (1, 103, 120, 121, 123): 10 kW, W_SF 0, WMaxLimPct_SF -2.
def pv_models(
    *, w: float = 4321.0, common_length: int | None = None, wmax: float | None = 8000.0
) -> list[ModelSpec]:
    settings: dict[str, float] = {} if wmax is None else {"WMax": wmax}
    return [
        ModelSpec(
            1,
            raw={"Mn": "Acme", "Md": "PV-10", "SN": "SN123", "Vr": "1.0", "DA": 1},
            length=common_length,
        ),
        ModelSpec(
            103,
            raw={
                "A_SF": -2,
                "V_SF": -1,
                "W_SF": 0,
                "Hz_SF": -2,
                "VA_SF": 0,
                "VAr_SF": 0,
                "PF_SF": -1,
                "WH_SF": 0,
                "Tmp_SF": -1,
                "DCW_SF": 0,
                "St": 4,
                "Evt1": 0,
                "Evt2": 0,
            },
            scaled={
                "A": 18.76,
                "PhVphA": 230.4,
                "W": w,
                "Hz": 50.02,
                "VA": 4400.0,
                "VAr": -150.0,
                "PF": 98.1,
                "WH": 123456.0,
                "TmpCab": 41.5,
                "DCW": 4500.0,
            },
        ),
        ModelSpec(
            120,
            raw={"DERTyp": 4, "WRtg_SF": 0, "VARtg_SF": 0, "VArRtg_SF": 0, "ARtg_SF": -1},
            scaled={"WRtg": 10000.0, "VARtg": 10000.0, "VArRtgQ1": 4400.0},
        ),
        ModelSpec(121, raw={"WMax_SF": 0}, scaled=settings),
        ModelSpec(
            123,
            raw={
                "Conn": 1,
                "WMaxLim_Ena": 0,
                "OutPFSet_Ena": 0,
                "VArPct_Ena": 0,
                "WMaxLimPct_SF": -2,
                "OutPFSet_SF": -3,
                "Conn_WinTms": 0,
                "Conn_RvrtTms": 0,
                "WMaxLimPct_WinTms": 0,
                "WMaxLimPct_RvrtTms": 0,
                "WMaxLimPct_RmpTms": 0,
            },
            scaled={"WMaxLimPct": 100.0},
        ),
    ]


def battery_7xx_models() -> list[ModelSpec]:
    """A 7xx-only battery inverter: 1, 701, 702, 704, 713, 802 (no 12x models)."""
    return [
        ModelSpec(1, raw={"Mn": "Acme", "Md": "BAT-7", "SN": "B7"}),
        ModelSpec(
            701,
            raw={"W_SF": 0, "V_SF": -1, "Hz_SF": -3, "A_SF": -1, "PF_SF": -3, "VA_SF": 0},
            scaled={"W": -1500.0, "VL1": 231.0, "Hz": 50.001, "A": 6.5, "PF": 0.99, "VA": 1500.0},
        ),
        ModelSpec(
            702,
            raw={"W_SF": 0, "VA_SF": 0},
            scaled={
                "WMaxRtg": 6000.0,
                "WMax": 5000.0,
                "WChaRteMax": 4000.0,
                "WDisChaRteMax": 4500.0,
            },
        ),
        ModelSpec(
            704,
            raw={
                "WMaxLimPct_SF": -1,
                "WSet_SF": 0,
                "WMaxLimPctEna": 0,
                "WMaxLimPctRvrt": 1000,
                "WMaxLimPctEnaRvrt": 0,
                "WMaxLimPctRvrtTms": 0,
                "WSetEna": 0,
                "WSetMod": 1,
                "WSetRvrt": 0,
                "WSetPct": 0,
                "WSetPctRvrt": 0,
                "WSetEnaRvrt": 0,
                "WSetRvrtTms": 0,
            },
            scaled={"WMaxLimPct": 100.0, "WSet": 0.0},
        ),
        ModelSpec(713, raw={"WH_SF": 0, "Pct_SF": -1}, scaled={"WHRtg": 9000.0, "SoC": 63.4}),
        ModelSpec(
            802,
            raw={"SoC_SF": -1, "WChaDisChaMax_SF": 0, "WHRtg_SF": 0, "State": 3},
            scaled={"SoC": 63.5, "WChaRteMax": 3000.0, "WDisChaRteMax": 3500.0, "WHRtg": 9000.0},
        ),
    ]


def pv_7xx_models(*, reversion: bool = True) -> list[ModelSpec]:
    """A 7xx-only PV inverter: 1, 701, 702, 704; 702 WMax 8000 W, WMaxLimPct_SF -1.

    `reversion=False`: 704 serves the not-implemented value for WMaxLimPctRvrt/EnaRvrt.
    """
    rvrt = {"WMaxLimPctRvrt": 1000, "WMaxLimPctEnaRvrt": 0} if reversion else {}
    return [
        ModelSpec(1, raw={"Mn": "Acme", "Md": "PV-7", "SN": "P7"}),
        ModelSpec(
            701,
            raw={"W_SF": 0, "V_SF": -1, "Hz_SF": -3, "InvSt": 3, "ConnSt": 1, "Alrm": 0},
            scaled={"W": 4000.0, "VL1": 230.0, "Hz": 50.0},
        ),
        ModelSpec(702, raw={"W_SF": 0}, scaled={"WMaxRtg": 10000.0, "WMax": 8000.0}),
        ModelSpec(
            704,
            raw={"WMaxLimPct_SF": -1, "WMaxLimPctEna": 0, "WMaxLimPctRvrtTms": 0, **rvrt},
            scaled={"WMaxLimPct": 100.0},
        ),
    ]


def meter_models(w: float = -2500.0) -> list[ModelSpec]:
    return [
        ModelSpec(1, raw={"Mn": "Acme", "Md": "M-3", "SN": "M1"}),
        ModelSpec(
            203,
            raw={"W_SF": 0, "Hz_SF": -2, "V_SF": -1, "PF_SF": -1, "TotWh_SF": 0, "A_SF": -1},
            scaled={
                "W": w,
                "WphA": w / 3,
                "WphB": w / 3,
                "WphC": w / 3,
                "Hz": 49.98,
                "PhVphA": 229.9,
                "PF": -95.0,
                "TotWhImp": 1000.0,
                "TotWhExp": 2000.0,
                "A": 11.2,
            },
        ),
    ]

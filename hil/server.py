"""A simulated site on Modbus TCP: SunSpec register images driven by `hil.physics`.

Owns the binding between the pure physics and the wire:
- one `RegisterBank` per device kind (rows = devices), filled with static nameplate data once
  and re-encoded column-wise from the physics arrays after every step;
- pymodbus 3.16 simulator devices (`SimDevice` + `ModbusTcpServer`, no deprecated datastore):
  each device's async action hook copies the requested registers from its bank into pymodbus'
  live register list on every request, validates writes (read-only points and out-of-range or
  unknown enum values are refused with a Modbus exception) and queues them for the physics;
- the physics task: fixed dt at `physics_hz`, catching up when the event loop was late; queued
  writes take effect at the next step, and controls that the physics changes on its own (revert
  timers) are written back into the registers;
- communication fault injection per device (`Fault`), injected site conditions (grid
  frequency, irradiance, load, SoC) and inverter trips (`set_device_fault`), and a `SiteState`
  snapshot for tests;
- measuring hooks for benchmarks: listeners told, with `time.monotonic()`, of every accepted
  Modbus write (`add_write_listener`) and of every physics step (`add_step_listener`), so a
  latency ends at the instant the device held the value, not at the next sample.

Device models (`MODELS`, by device group): PV inverter 1/103/120/121/123 ("pv", family "1xx")
or 1/701/702/704 ("pv-7xx", family "7xx"), battery inverter 1/103/120/124/802, PCC meter 1/203;
each chain ends with 0xFFFF/0. Energy counters start at `ENERGY_START_WH` so that a fresh acc32
counter never reads as 0, which SunSpec reserves for "not implemented". The physics acts on
Conn, WMaxLimPct (+ _Ena, _RvrtTms, _RmpTms), Conn_RvrtTms, WMax and WGra (1xx PV);
WMaxLimPctEna, WMaxLimPct, WMaxLimPctRvrtTms and the reversion values WMaxLimPctRvrt /
WMaxLimPctEnaRvrt (704), WMax (702) and WRmp (704) (7xx PV); StorCtl_Mod, OutWRte, InWRte,
InOutWRte_RvrtTms and WChaMax (battery). Other writable points (OutPFSet, VArPct, *_WinTms,
WChaGra, SoCRsvMin/Max, SetOp, 704 WSet*/VarSet*/PF*, ...) are validated, stored and served
back, but have no effect.

A tripped inverter (`set_device_fault(id, True)`) serves St = FAULT (103) or InvSt = FAULT (701)
and its trip bit in 103 Evt1 / 701 Alrm, and produces nothing until cleared.

Mixed-protocol sites (a device's `protocol` in the site file): every device keeps its register
image here (so `state()` decodes its controls whatever its wire), but only "modbus-tcp" devices
are served by the TCP servers. "modbus-rtu" devices share one `hil.rtu_sim.RtuSiteSimulator`
bus (same request hooks and faults); an "opcua" battery gets a `hil.opcua_sim.OpcUaBatterySim`
and a "dnp3" PV inverter a `hil.dnp3_sim.Dnp3PlantSimulator`, both on this simulator's physics
(they apply their controls to it, it steps it). Their endpoints say how to reach them
(`Endpoint.protocol`, `serial_port`, `url`, `root`); `protocol_sim(device_id)` hands out the
protocol simulator for its own fault hooks.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from pymodbus.constants import ExcCodes
from pymodbus.exceptions import NoSuchIdException
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from hil.physics import (
    BatteryParams,
    PhysicsConfig,
    PhysicsConfigError,
    Profile,
    PvParams,
    SitePhysics,
)
from hil.site import DeviceSpec, SiteSpec
from hil.sunspec_image import PointDef, RegisterBank, build_layout

if TYPE_CHECKING:
    from hil.dnp3_sim import Dnp3PlantSimulator
    from hil.opcua_sim import OpcUaBatterySim
    from hil.rtu_sim import RtuSiteSimulator

log = logging.getLogger(__name__)

# Model chains by device group: the kind, with "-7xx" for devices of family "7xx".
MODELS: Mapping[str, tuple[int, ...]] = MappingProxyType(
    {
        "pv": (1, 103, 120, 121, 123),
        "battery": (1, 103, 120, 124, 802),
        "meter": (1, 203),
        "pv-7xx": (1, 701, 702, 704),
    }
)
MANUFACTURER = "dergw-sim"
MODEL_NAMES = MappingProxyType(
    {"pv": "sim-pv-inverter", "battery": "sim-battery-inverter", "meter": "sim-pcc-meter"}
)
SIM_VERSION = "0.1.0"
ENERGY_START_WH = 100_000.0
DC_BUS_V = 600.0  # PV string voltage
BATTERY_NOMINAL_V = 400.0
_SQRT3 = math.sqrt(3.0)

# 103 St (701 InvSt is the same list, one lower: OFF = 0 ... FAULT = 6, STANDBY = 7)
ST_OFF, ST_SLEEPING, ST_MPPT, ST_THROTTLED, ST_FAULT, ST_STANDBY = 1, 2, 4, 5, 7, 8
DEFAULT_TRIP_ALARM = "GROUND_FAULT"  # 103 Evt1 / 701 Alrm bit set by set_device_fault
# 124 / 802 ChaSt
CHA_EMPTY, CHA_DISCHARGING, CHA_CHARGING, CHA_FULL, CHA_HOLDING = 2, 3, 4, 5, 6
BAT_STATE_CONNECTED = 3  # 802 State
BAT_TYPE_LITHIUM_ION = 4  # 802 Typ


class Fault(enum.Enum):
    """Faults injectable per device."""

    SILENT = "silent"  # requests get no answer at all (the client times out)
    EXCEPTION = "exception"  # every request gets a SERVER_DEVICE_FAILURE exception response
    FROZEN = "frozen"  # registers stop updating (writes still land)
    NAN_METER = "nan_meter"  # meter W (total and per phase) served as "not implemented"
    # Writes are answered normally but not applied (an inverter in local mode, or one that
    # silently drops remote commands): only reading the registers back reveals it.
    IGNORE_WRITES = "ignore_writes"


class SimulatorError(RuntimeError):
    """The simulator cannot do what was asked (cannot listen, unknown device, wrong state)."""


@dataclass(frozen=True)
class Endpoint:
    """Where a device is served. Modbus TCP: host/port/unit_id; the other protocols add theirs."""

    host: str
    port: int
    unit_id: int  # Modbus unit id; DNP3 outstation address
    protocol: str = "modbus-tcp"
    serial_port: str = ""  # modbus-rtu: the pty a client opens
    baudrate: int = 0  # modbus-rtu
    url: str = ""  # opcua: the endpoint URL
    root: str = ""  # opcua: the browse path of the device object

    def describe(self) -> str:
        """Where a client connects, in the words of the device's protocol."""
        if self.protocol == "modbus-rtu":
            return f"modbus-rtu {self.serial_port} {self.baudrate} baud, unit {self.unit_id}"
        if self.protocol == "opcua":
            return f"opcua {self.url} object {self.root}"
        if self.protocol == "dnp3":
            return f"dnp3 {self.host}:{self.port} outstation {self.unit_id}"
        return f"modbus-tcp {self.host}:{self.port} unit {self.unit_id}"


@dataclass(frozen=True)
class AcceptedWrite:
    """A Modbus write the simulator accepted (see `SiteSimulator.add_write_listener`)."""

    mono: float  # time.monotonic() when accepted: the registers hold the values from then on
    device_id: str
    refs: tuple[str, ...]  # the points it touched ("123.WMaxLimPct", ...)


WriteListener = Callable[[AcceptedWrite], None]
StepListener = Callable[[float], None]  # time.monotonic() after the step's registers were encoded


@dataclass(frozen=True)
class DeviceState:
    """One device: physics truth plus its control registers decoded (None = not applicable).

    For 7xx PV, `wmaxlim_*` come from 704 and `conn` from 701 ConnSt.
    """

    id: str
    kind: str
    ac_w: float  # meters: the PCC power (+ import)
    available_w: float | None
    soc_pct: float | None
    wmaxlim_pct: float | None
    wmaxlim_ena: int | None
    conn: int | None
    stor_ctl_mod: int | None
    in_w_rte: float | None
    out_w_rte: float | None
    fault: Fault | None
    family: str = "1xx"
    tripped: bool = False  # set_device_fault: the inverter reports FAULT and produces nothing
    trip_alarm: str | None = None  # the Evt1 / Alrm bit it reports while tripped
    droop_w: float = 0.0  # frequency response this step (+ up, - down)
    wmaxlim_pct_rvrt: float | None = None  # 704 reversion values and time left on the timer
    wmaxlim_ena_rvrt: int | None = None
    wmaxlim_rvrt_rem_s: float | None = None


@dataclass(frozen=True)
class SiteState:
    """A consistent snapshot of the site between two physics steps."""

    t_s: float
    steps: int
    load_w: float
    meter_w: float  # + import from grid, - export
    pv_w: float
    battery_w: float  # + discharge
    grid_hz: float
    devices: Mapping[str, DeviceState]
    irradiance_w_m2: float = 0.0  # before each inverter's own noise
    irradiance_override: float | None = None  # injected conditions in force (None = profile)
    load_override: float | None = None
    grid_hz_override: float | None = None


# --- scaling helpers ------------------------------------------------------------------------


def _fit_sf(max_abs: float, *, lowest: int, limit: int = 32767) -> int:
    """Smallest scale factor >= `lowest` at which `max_abs` fits a register of `limit`."""
    sf = lowest
    while max_abs / 10.0**sf > limit and sf < 6:
        sf += 1
    return sf


def _w_sf(spec: DeviceSpec, bound_w: float) -> int:
    return spec.w_sf if spec.w_sf is not None else _fit_sf(bound_w * 1.2, lowest=0)


# --- per-device runtime ---------------------------------------------------------------------


def device_group(spec: DeviceSpec) -> str:
    """The `MODELS` key of a device: its kind, with "-7xx" for family "7xx"."""
    return spec.kind if spec.family == "1xx" else f"{spec.kind}-{spec.family}"


@dataclass(eq=False)
class _Device:
    spec: DeviceSpec
    bank: RegisterBank
    row: int  # row in its group's bank
    phys: int  # index in the physics arrays of its kind
    limits: Mapping[str, tuple[float, float]]  # writable modelled points: allowed range
    # register ref -> (physics keyword, conversion) for writes that reach the physics
    controls: Mapping[str, tuple[str, Callable[[Any], Any]]]
    fault: Fault | None = None
    trip_alarm: str | None = None
    frozen: npt.NDArray[np.uint16] | None = None
    pending: set[str] = field(default_factory=set)

    @property
    def served(self) -> npt.NDArray[np.uint16]:
        """The registers a client sees now."""
        return self.frozen if self.frozen is not None else self.bank.regs[self.row]


def _physics_config(spec: SiteSpec) -> PhysicsConfig:
    pvs = [d for d in spec.devices if d.kind == "pv"]
    bats = [d for d in spec.devices if d.kind == "battery"]

    def arr(devs: list[DeviceSpec], get: Callable[[DeviceSpec], float]) -> npt.NDArray:
        return np.array([get(d) for d in devs], dtype=np.float64)

    return PhysicsConfig(
        droop_pct=spec.frequency_response.droop_pct,
        droop_deadband_hz=spec.frequency_response.deadband_hz,
        irradiance=Profile.from_points(spec.profiles.irradiance),
        load=Profile.from_points(spec.profiles.load),
        pv=PvParams(
            rating_w=arr(pvs, lambda d: d.rating_w or 0.0),
            ramp_pct_per_s=arr(pvs, lambda d: d.ramp_pct_per_s),
        ),
        battery=BatteryParams(
            rating_w=arr(bats, lambda d: d.rating_w or 0.0),
            max_charge_w=arr(bats, lambda d: d.charge_w),
            max_discharge_w=arr(bats, lambda d: d.discharge_w),
            capacity_wh=arr(bats, lambda d: d.capacity_wh or 0.0),
            efficiency=arr(bats, lambda d: d.efficiency),
            soc_min_pct=arr(bats, lambda d: d.soc_min_pct),
            soc_max_pct=arr(bats, lambda d: d.soc_max_pct),
            initial_soc_pct=arr(bats, lambda d: d.soc_pct),
            ramp_pct_per_s=arr(bats, lambda d: d.ramp_pct_per_s),
        ),
        irradiance_noise_pct=spec.profiles.irradiance_noise_pct,
        load_noise_pct=spec.profiles.load_noise_pct,
        nominal_v=spec.grid.nominal_v,
        nominal_hz=float(spec.grid.nominal_hz),
        v_noise=spec.grid.v_noise,
        hz_noise=spec.grid.hz_noise,
    )


# --- static images (nameplate, settings, scale factors) -------------------------------------


def _set_common(bank: RegisterBank, row: int, spec: DeviceSpec) -> None:
    bank.set_value(row, "1.Mn", MANUFACTURER)
    bank.set_value(row, "1.Md", MODEL_NAMES[spec.kind])
    bank.set_value(row, "1.Vr", SIM_VERSION)
    bank.set_value(row, "1.SN", spec.id)
    bank.set_raw(row, "1.DA", spec.unit_id)
    bank.set_raw(row, "1.Pad", 0)


def _set_raws(bank: RegisterBank, row: int, model: int, values: Mapping[str, int]) -> None:
    for name, raw in values.items():
        bank.set_raw(row, f"{model}.{name}", raw)


def _set_values(bank: RegisterBank, row: int, model: int, values: Mapping[str, float]) -> None:
    for name, value in values.items():
        bank.set_value(row, f"{model}.{name}", value)


def _static_103(bank: RegisterBank, row: int, w_sf: int) -> None:
    sfs = {"A_SF": -1, "V_SF": -1, "W_SF": w_sf, "Hz_SF": -2, "VA_SF": w_sf, "VAr_SF": w_sf}
    sfs |= {"PF_SF": -1, "WH_SF": 0, "DCA_SF": -2, "DCV_SF": -1, "DCW_SF": w_sf, "Tmp_SF": -1}
    _set_raws(bank, row, 103, sfs)
    _set_raws(bank, row, 103, {"Evt1": 0, "Evt2": 0})


def _static_120(
    bank: RegisterBank, row: int, spec: DeviceSpec, site: SiteSpec, w_sf: int, der_type: int
) -> None:
    rating = float(spec.rating_w or 0.0)
    _set_raws(
        bank,
        row,
        120,
        {"DERTyp": der_type, "WRtg_SF": w_sf, "VARtg_SF": w_sf, "VArRtg_SF": w_sf},
    )
    _set_raws(bank, row, 120, {"ARtg_SF": -1, "PFRtg_SF": -2, "Pad": 0})
    var_rtg = 0.44 * rating  # IEEE 1547 Cat B reactive capability
    _set_values(
        bank, row, 120, {"WRtg": rating, "VARtg": rating, "ARtg": rating / 3 / site.grid.nominal_v}
    )
    _set_values(bank, row, 120, {"VArRtgQ1": var_rtg, "VArRtgQ2": var_rtg})
    _set_values(bank, row, 120, {"VArRtgQ3": -var_rtg, "VArRtgQ4": -var_rtg})
    _set_values(bank, row, 120, {"PFRtgQ1": 0.8, "PFRtgQ2": 0.8, "PFRtgQ3": -0.8, "PFRtgQ4": -0.8})


def _init_pv(bank: RegisterBank, row: int, spec: DeviceSpec, site: SiteSpec) -> None:
    rating = float(spec.rating_w or 0.0)
    w_sf = _w_sf(spec, rating)
    _set_common(bank, row, spec)
    _static_103(bank, row, w_sf)
    _static_120(bank, row, spec, site, w_sf, der_type=4)
    _set_raws(bank, row, 121, {"WMax_SF": w_sf, "VRef_SF": -1, "VRefOfs_SF": -1})
    _set_raws(bank, row, 121, {"WGra_SF": -1, "ECPNomHz_SF": -2})
    _set_values(bank, row, 121, {"VRef": site.grid.nominal_v, "VRefOfs": 0.0})
    _set_values(bank, row, 121, {"ECPNomHz": float(site.grid.nominal_hz)})
    _set_raws(bank, row, 123, {"WMaxLimPct_SF": spec.pct_sf, "OutPFSet_SF": -3, "VArPct_SF": -1})
    _set_raws(bank, row, 123, {"OutPFSet_Ena": 0, "VArPct_Ena": 0, "WMaxLimPct_WinTms": 0})
    _set_values(bank, row, 123, {"OutPFSet": 1.0})


def _init_battery(bank: RegisterBank, row: int, spec: DeviceSpec, site: SiteSpec) -> None:
    rating = float(spec.rating_w or 0.0)
    capacity = float(spec.capacity_wh or 0.0)
    w_sf = _w_sf(spec, max(rating, spec.charge_w, spec.discharge_w))
    wh_sf = _fit_sf(capacity, lowest=0, limit=65534)
    ah = capacity / BATTERY_NOMINAL_V
    ah_sf = _fit_sf(ah, lowest=-1, limit=65534)
    _set_common(bank, row, spec)
    _static_103(bank, row, w_sf)
    _static_120(bank, row, spec, site, w_sf, der_type=82)
    _set_raws(bank, row, 120, {"WHRtg_SF": wh_sf, "AhrRtg_SF": ah_sf})
    _set_raws(bank, row, 120, {"MaxChaRte_SF": w_sf, "MaxDisChaRte_SF": w_sf})
    _set_values(bank, row, 120, {"WHRtg": capacity, "AhrRtg": ah})
    _set_values(bank, row, 120, {"MaxChaRte": spec.charge_w, "MaxDisChaRte": spec.discharge_w})
    _set_raws(bank, row, 124, {"WChaMax_SF": w_sf, "WChaDisChaGra_SF": -1, "MinRsvPct_SF": -1})
    _set_raws(bank, row, 124, {"ChaState_SF": -1, "StorAval_SF": -1, "InBatV_SF": -1})
    _set_raws(bank, row, 124, {"InOutWRte_SF": spec.pct_sf, "InOutWRte_WinTms": 0})
    _set_values(bank, row, 124, {"WChaGra": spec.ramp_pct_per_s, "WDisChaGra": spec.ramp_pct_per_s})
    _set_values(bank, row, 124, {"MinRsvPct": spec.soc_min_pct})
    _set_raws(bank, row, 802, {"AHRtg_SF": ah_sf, "WHRtg_SF": wh_sf, "WChaDisChaMax_SF": w_sf})
    _set_raws(bank, row, 802, {"SoC_SF": -1, "DoD_SF": -1, "SoH_SF": 0, "V_SF": -1})
    _set_raws(bank, row, 802, {"CellV_SF": -3, "A_SF": -1, "AMax_SF": -1, "W_SF": w_sf})
    _set_values(bank, row, 802, {"AHRtg": ah, "WHRtg": capacity, "SoH": 100.0})
    _set_values(bank, row, 802, {"SoCMax": spec.soc_max_pct, "SoCMin": spec.soc_min_pct})
    _set_values(bank, row, 802, {"SocRsvMax": spec.soc_max_pct, "SoCRsvMin": spec.soc_min_pct})
    _set_raws(bank, row, 802, {"LocRemCtl": 0, "CtrlHb": 0, "AlmRst": 0})
    _set_raws(bank, row, 802, {"Typ": BAT_TYPE_LITHIUM_ION, "State": BAT_STATE_CONNECTED})
    _set_raws(bank, row, 802, {"Evt1": 0, "Evt2": 0, "EvtVnd1": 0, "EvtVnd2": 0})
    _set_raws(bank, row, 802, {"SetOp": 1, "SetInvState": 3})  # CONNECT, INVERTER_STARTED


def _meter_bound_w(site: SiteSpec) -> float:
    gen = sum(d.rating_w or 0.0 for d in site.devices if d.kind == "pv")
    gen += sum(d.discharge_w for d in site.devices if d.kind == "battery")
    peak_load = max(v for _, v in site.profiles.load) * (1 + site.profiles.load_noise_pct / 20)
    charge = sum(d.charge_w for d in site.devices if d.kind == "battery")
    return max(gen, peak_load + charge, 1.0)


def _init_meter(bank: RegisterBank, row: int, spec: DeviceSpec, site: SiteSpec) -> None:
    bound = _meter_bound_w(site)
    w_sf = _w_sf(spec, bound)
    a_sf = _fit_sf(bound * 1.2 / site.grid.nominal_v, lowest=-2)
    _set_common(bank, row, spec)
    _set_raws(bank, row, 203, {"A_SF": a_sf, "V_SF": -1, "Hz_SF": -2, "W_SF": w_sf})
    _set_raws(bank, row, 203, {"VA_SF": w_sf, "VAR_SF": w_sf, "PF_SF": -1, "TotWh_SF": 0})
    _set_raws(bank, row, 203, {"Evt": 0})


def _init_pv_7xx(bank: RegisterBank, row: int, spec: DeviceSpec, site: SiteSpec) -> None:
    rating = float(spec.rating_w or 0.0)
    w_sf = _w_sf(spec, rating)
    v_nom = site.grid.nominal_v
    var_rtg = 0.44 * rating  # IEEE 1547 Cat B reactive capability
    _set_common(bank, row, spec)
    # 701 DERMeasureAC
    _set_raws(bank, row, 701, {"A_SF": -1, "V_SF": -1, "Hz_SF": -3, "W_SF": w_sf, "PF_SF": -2})
    _set_raws(bank, row, 701, {"VA_SF": w_sf, "Var_SF": w_sf, "TotWh_SF": 0, "Tmp_SF": -1})
    _set_raws(bank, row, 701, {"ACType": 2, "DERMode": 0b1})  # THREE_PHASE, GRID_FOLLOWING
    # 702 DERCapacity: ratings and settings
    _set_raws(bank, row, 702, {"W_SF": w_sf, "PF_SF": -2, "VA_SF": w_sf, "Var_SF": w_sf})
    _set_raws(bank, row, 702, {"V_SF": -1, "A_SF": -1})
    _set_values(bank, row, 702, {"WMaxRtg": rating, "VAMaxRtg": rating, "VAMax": rating})
    _set_values(bank, row, 702, {"VarMaxInjRtg": var_rtg, "VarMaxAbsRtg": var_rtg})
    _set_values(bank, row, 702, {"VarMaxInj": var_rtg, "VarMaxAbs": var_rtg})
    _set_values(bank, row, 702, {"VNomRtg": v_nom, "VMaxRtg": 1.1 * v_nom, "VMinRtg": 0.88 * v_nom})
    _set_values(bank, row, 702, {"VNom": v_nom, "VMax": 1.1 * v_nom, "VMin": 0.88 * v_nom})
    _set_values(bank, row, 702, {"AMaxRtg": rating / 3 / v_nom, "AMax": rating / 3 / v_nom})
    _set_values(bank, row, 702, {"PFOvrExtRtg": 0.8, "PFUndExtRtg": 0.8})
    _set_values(bank, row, 702, {"PFOvrExt": 0.8, "PFUndExt": 0.8})
    _set_raws(bank, row, 702, {"NorOpCatRtg": 1, "AbnOpCatRtg": 1})  # CAT_B, CAT_2
    _set_raws(bank, row, 702, {"CtrlModes": (1 << 0) | (1 << 5)})  # MAX_W, FREQ_WATT
    _set_raws(bank, row, 702, {"IntIslandCatRtg": 0b1, "IntIslandCat": 0b1})  # UNCATEGORIZED
    # 704 DERCtlAC: the functions the simulator does not model are served disabled.
    _set_raws(bank, row, 704, {"PF_SF": -3, "WMaxLimPct_SF": spec.pct_sf, "WSet_SF": w_sf})
    _set_raws(bank, row, 704, {"WSetPct_SF": -1, "VarSet_SF": w_sf, "VarSetPct_SF": -1})
    for fn in ("PFWInj", "PFWAbs"):
        _set_raws(bank, row, 704, {f"{fn}Ena": 0, f"{fn}EnaRvrt": 0})
        _set_raws(bank, row, 704, {f"{fn}RvrtTms": 0, f"{fn}RvrtRem": 0})
        for group in (fn, f"{fn}Rvrt"):
            _set_values(bank, row, 704, {f"{group}.PF": 1.0})
            _set_raws(bank, row, 704, {f"{group}.Ext": 0})
    _set_raws(bank, row, 704, {"WSetEna": 0, "WSetMod": 0, "WSet": 0, "WSetRvrt": 0})
    _set_raws(bank, row, 704, {"WSetPct": 0, "WSetPctRvrt": 0, "WSetEnaRvrt": 0})
    _set_raws(bank, row, 704, {"WSetRvrtTms": 0, "WSetRvrtRem": 0})
    _set_raws(bank, row, 704, {"VarSetEna": 0, "VarSetMod": 0, "VarSetPri": 0, "VarSet": 0})
    _set_raws(bank, row, 704, {"VarSetRvrt": 0, "VarSetPct": 0, "VarSetPctRvrt": 0})
    _set_raws(bank, row, 704, {"VarSetEnaRvrt": 0, "VarSetRvrtTms": 0, "VarSetRvrtRem": 0})
    _set_raws(bank, row, 704, {"WRmpRef": 1, "AntiIslEna": 1})  # W_MAX, ENABLED


_INITIALISERS: Mapping[str, Callable[[RegisterBank, int, DeviceSpec, SiteSpec], None]] = {
    "pv": _init_pv,
    "battery": _init_battery,
    "meter": _init_meter,
    "pv-7xx": _init_pv_7xx,
}


def _write_limits(spec: DeviceSpec) -> dict[str, tuple[float, float]]:
    """Allowed ranges (engineering units) of the writable points that the physics uses."""
    if spec.kind == "pv" and spec.family == "7xx":
        return {
            "704.WMaxLimPct": (0.0, 100.0),
            "704.WMaxLimPctRvrt": (0.0, 100.0),
            "704.WMaxLimPctRvrtTms": (0.0, float(0xFFFFFFFE)),
            "704.WRmp": (0.0, 1000.0),
            "702.WMax": (0.0, float(spec.rating_w or 0.0)),
        }
    if spec.kind == "pv":
        timer = (0.0, 65534.0)
        return {
            "123.WMaxLimPct": (0.0, 100.0),
            "123.WMaxLimPct_RvrtTms": timer,
            "123.WMaxLimPct_RmpTms": timer,
            "123.Conn_RvrtTms": timer,
            "121.WMax": (0.0, float(spec.rating_w or 0.0)),
            "121.WGra": (0.0, 1000.0),
        }
    if spec.kind == "battery":
        return {
            "124.OutWRte": (-100.0, 100.0),
            "124.InWRte": (-100.0, 100.0),
            "124.InOutWRte_RvrtTms": (0.0, 65534.0),
            "124.WChaMax": (0.0, spec.charge_w),
        }
    return {}


# register ref -> (physics keyword, conversion) for writes that reach the physics
_PV_CONTROLS: Mapping[str, tuple[str, Callable[[Any], Any]]] = {
    "123.WMaxLimPct": ("wmaxlim_pct", float),
    "123.WMaxLim_Ena": ("wmaxlim_ena", lambda v: v == 1),
    "123.WMaxLimPct_RvrtTms": ("wmaxlim_rvrt_s", float),
    "123.WMaxLimPct_RmpTms": ("wmaxlim_rmp_s", float),
    "123.Conn": ("conn", lambda v: v == 1),
    "123.Conn_RvrtTms": ("conn_rvrt_s", float),
    "121.WMax": ("wmax_w", float),
    "121.WGra": ("wgra_pct_per_s", float),
}
_PV_7XX_CONTROLS: Mapping[str, tuple[str, Callable[[Any], Any]]] = {
    "704.WMaxLimPctEna": ("wmaxlim_ena", lambda v: v == 1),
    "704.WMaxLimPct": ("wmaxlim_pct", float),
    "704.WMaxLimPctRvrt": ("wmaxlim_pct_rvrt", float),
    "704.WMaxLimPctEnaRvrt": ("wmaxlim_ena_rvrt", lambda v: v == 1),
    "704.WMaxLimPctRvrtTms": ("wmaxlim_rvrt_s", float),
    "702.WMax": ("wmax_w", float),
    "704.WRmp": ("wgra_pct_per_s", float),
}
_BATTERY_CONTROLS: Mapping[str, tuple[str, Callable[[Any], Any]]] = {
    "124.StorCtl_Mod": ("stor_ctl_mod", int),
    "124.OutWRte": ("out_w_rte_pct", float),
    "124.InWRte": ("in_w_rte_pct", float),
    "124.InOutWRte_RvrtTms": ("rvrt_s", float),
    "124.WChaMax": ("w_cha_max_w", float),
}
_CONTROLS: Mapping[str, Mapping[str, tuple[str, Callable[[Any], Any]]]] = {
    "pv": _PV_CONTROLS,
    "pv-7xx": _PV_7XX_CONTROLS,
    "battery": _BATTERY_CONTROLS,
    "meter": {},
}


def _check_write(dev: _Device, pdef: PointDef, regs: npt.NDArray[np.uint16]) -> str | None:
    """Why a candidate register row is not acceptable for `pdef`, or None if it is."""
    ref = pdef.ref
    modelled = ref in dev.controls or ref in dev.limits
    raw = dev.bank.get_raw(dev.row, ref, regs)
    if raw is None:
        return f"{ref}: the not-implemented value cannot be written" if modelled else None
    if pdef.type.startswith("enum") and pdef.symbols and raw not in pdef.symbols.values():
        return f"{ref}: {raw} is not one of {dict(pdef.symbols)}"
    if pdef.type.startswith("bitfield") and pdef.symbols:
        allowed = sum(1 << bit for bit in pdef.symbols.values())
        if isinstance(raw, int) and raw & ~allowed:
            return f"{ref}: bits {raw:#x} outside the defined {allowed:#x}"
    if ref in dev.limits:
        value = dev.bank.get_value(dev.row, ref, regs)
        lo, hi = dev.limits[ref]
        if not isinstance(value, int | float) or not lo <= value <= hi:
            return f"{ref}: {value} outside [{lo}, {hi}]"
    return None


@contextlib.contextmanager
def _as_simulator_error() -> Iterator[None]:
    """Physics refusals (a NaN, a negative load) as SimulatorError, like every other misuse."""
    try:
        yield
    except PhysicsConfigError as exc:
        raise SimulatorError(str(exc)) from exc


def _decoded(dev: _Device, ref: str, applies: bool) -> Any:
    """A control register of `dev` decoded with its SF, or None where it does not apply."""
    return dev.bank.get_value(dev.row, ref) if applies else None


class SiteSimulator:
    """A simulated site: physics plus one Modbus TCP server per port group.

    Use `async with SiteSimulator(spec) as sim:` or `await start()` / `await stop()`.
    """

    def __init__(self, spec: SiteSpec, *, seed: int | None = None) -> None:
        self.spec = spec
        self.seed = spec.seed if seed is None else seed
        self.dt = 1.0 / spec.physics_hz
        self.physics = SitePhysics(_physics_config(spec), seed=self.seed)
        self.endpoints: dict[str, Endpoint] = {}
        # Banks and device lists by group (MODELS key); `phys` indexes the physics arrays of the
        # device's kind, in site-file order, whatever its group.
        self._banks: dict[str, RegisterBank] = {}
        self._devices: dict[str, _Device] = {}
        self._by_group: dict[str, list[_Device]] = {group: [] for group in MODELS}
        self._phys_idx: dict[str, npt.NDArray[np.intp]] = {}
        phys_of = {
            d.id: i
            for kind in ("pv", "battery")
            for i, d in enumerate(d for d in spec.devices if d.kind == kind)
        }
        for group in MODELS:
            specs = [d for d in spec.devices if device_group(d) == group]
            bank = RegisterBank(build_layout(MODELS[group]), len(specs))
            self._banks[group] = bank
            for row, dspec in enumerate(specs):
                _INITIALISERS[group](bank, row, dspec, spec)
                dev = _Device(
                    spec=dspec,
                    bank=bank,
                    row=row,
                    phys=phys_of.get(dspec.id, 0),
                    limits=_write_limits(dspec),
                    controls=_CONTROLS[group],
                )
                self._devices[dspec.id] = dev
                self._by_group[group].append(dev)
            self._phys_idx[group] = np.array([d.phys for d in self._by_group[group]], dtype=np.intp)
        # Per group and row: the Evt1 / Alrm bit a tripped device reports (set_device_fault).
        self._alarm_bits = {group: np.zeros(len(devs)) for group, devs in self._by_group.items()}
        for dev in self._by_group["pv-7xx"]:
            # 704 reversion values until a client writes its own: back to DISABLED (100 %).
            self.physics.set_pv_controls(dev.phys, wmaxlim_pct_rvrt=100.0, wmaxlim_ena_rvrt=False)
        self._controls_encoded = -1  # physics.controls_version last mirrored into registers
        self._encode()
        self._servers: list[ModbusTcpServer] = []
        self._task: asyncio.Task[None] | None = None
        self.rtu: RtuSiteSimulator | None = None
        self._protocol_sims: dict[str, OpcUaBatterySim | Dnp3PlantSimulator] = {}
        self._cert_dir: tempfile.TemporaryDirectory[str] | None = None
        self._write_listeners: list[WriteListener] = []
        self._step_listeners: list[StepListener] = []

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen on every port of the site, then start the physics task."""
        if self._servers:
            raise SimulatorError("simulator already started")
        groups: dict[int | str, list[_Device]] = {}
        for dev in self._devices.values():
            if dev.spec.protocol == "modbus-tcp":
                groups.setdefault(self.spec.server_key(dev.spec), []).append(dev)
        try:
            for devices in groups.values():
                await self._start_server(devices)
            await self._start_protocol_servers()
        except BaseException:
            await self.stop()
            raise
        self._task = asyncio.create_task(self._run_physics(), name=f"hil-physics-{self.spec.name}")

    async def _start_protocol_servers(self) -> None:
        """The RTU bus, OPC UA and DNP3 servers of the devices that use those protocols."""
        by_protocol: dict[str, list[_Device]] = {}
        for dev in self._devices.values():
            by_protocol.setdefault(dev.spec.protocol, []).append(dev)
        host = self.spec.host
        rtu_devs = by_protocol.get("modbus-rtu", [])
        if rtu_devs:
            from hil.rtu_sim import RtuSiteSimulator  # imports this module

            baudrate = 38400
            self.rtu = RtuSiteSimulator(self, [d.spec.id for d in rtu_devs], baudrate=baudrate)
            await self.rtu.start()
            for dev in rtu_devs:
                self.endpoints[dev.spec.id] = Endpoint(
                    host,
                    0,
                    dev.spec.unit_id,
                    protocol="modbus-rtu",
                    serial_port=self.rtu.client_port,
                    baudrate=baudrate,
                )
        for dev in by_protocol.get("opcua", []):
            from hil.opcua_sim import OpcUaBatterySim

            if self._cert_dir is None:
                self._cert_dir = tempfile.TemporaryDirectory(prefix="dergw-sim-opcua-")
            opcua = OpcUaBatterySim(
                cert_dir=Path(self._cert_dir.name) / dev.spec.id,
                physics=self.physics,
                battery_index=dev.phys,
                device=dev.spec.id,
                serial=dev.spec.id,
                host=host,
                port=dev.spec.port or 0,
                physics_hz=min(self.spec.physics_hz, 10.0),
                step_physics=False,
            )
            self._protocol_sims[dev.spec.id] = opcua
            await opcua.start()
            self.endpoints[dev.spec.id] = Endpoint(
                host,
                opcua.port,
                dev.spec.unit_id,
                protocol="opcua",
                url=opcua.url,
                root=dev.spec.id,  # a browse path under Objects, in the simulator's namespace
            )
        for dev in by_protocol.get("dnp3", []):
            from hil.dnp3_sim import Dnp3PlantSimulator

            dnp3 = Dnp3PlantSimulator(
                host=host,
                port=dev.spec.port or 0,
                address=dev.spec.unit_id,
                physics_hz=min(self.spec.physics_hz, 10.0),
                physics=self.physics,
                pv_index=dev.phys,
                step_physics=False,
            )
            self._protocol_sims[dev.spec.id] = dnp3
            await dnp3.start()
            self.endpoints[dev.spec.id] = Endpoint(
                host, dnp3.port, dev.spec.unit_id, protocol="dnp3"
            )
        for protocol, devs in by_protocol.items():
            if protocol != "modbus-tcp":
                log.info("serving %s over %s", [d.spec.id for d in devs], protocol)

    def protocol_sim(self, device_id: str) -> OpcUaBatterySim | Dnp3PlantSimulator:
        """The OPC UA or DNP3 simulator serving `device_id` (for its own fault hooks)."""
        dev = self._device(device_id)
        sim = self._protocol_sims.get(device_id)
        if sim is None:
            raise SimulatorError(
                f"{device_id!r} is served over {dev.spec.protocol}, not by a protocol simulator "
                "of its own (or the simulator is not started)"
            )
        return sim

    async def _start_server(self, devices: list[_Device]) -> None:
        spec = devices[0].spec
        port = spec.port if spec.port is not None else self.spec.port
        sim_devices = [
            SimDevice(
                id=dev.spec.unit_id,
                simdata=[
                    SimData(
                        dev.spec.base_address,
                        count=1,
                        values=dev.served.tolist(),
                        datatype=DataType.REGISTERS,
                    )
                ],
                action=self._make_hook(dev),
            )
            for dev in devices
        ]
        # ignore_missing_devices lets the SILENT fault drop a request without any answer.
        server = ModbusTcpServer(
            context=sim_devices, address=(self.spec.host, port), ignore_missing_devices=True
        )
        try:
            await server.serve_forever(background=True)
        except RuntimeError as exc:
            raise SimulatorError(
                f"cannot listen on {self.spec.host}:{port} for {[d.spec.id for d in devices]}: "
                "is the port in use? Choose another port in the site file (0 = any free port)"
            ) from exc
        self._servers.append(server)
        transport: Any = server.transport
        bound_port = int(transport.sockets[0].getsockname()[1])
        for dev in devices:
            self.endpoints[dev.spec.id] = Endpoint(self.spec.host, bound_port, dev.spec.unit_id)
        log.info("serving %s on %s:%d", [d.spec.id for d in devices], self.spec.host, bound_port)

    async def stop(self) -> None:
        """Stop the physics task and close every server and client connection."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        servers, self._servers = self._servers, []
        for server in servers:
            await server.shutdown()
        sims, self._protocol_sims = self._protocol_sims, {}
        for sim in sims.values():
            with contextlib.suppress(Exception):
                await sim.stop()
        rtu, self.rtu = self.rtu, None
        if rtu is not None:
            await rtu.stop()
        cert_dir, self._cert_dir = self._cert_dir, None
        if cert_dir is not None:
            cert_dir.cleanup()

    async def __aenter__(self) -> SiteSimulator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def physics_task(self) -> asyncio.Task[None] | None:
        """The running physics task (done early only if the physics raised)."""
        return self._task

    # --- physics loop -------------------------------------------------------------------------

    async def _run_physics(self) -> None:
        loop = asyncio.get_running_loop()
        max_catch_up = max(1, int(self.spec.physics_hz))  # at most 1 s of backlog per wake-up
        next_at = loop.time() + self.dt
        while True:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            now = loop.time()
            done = 0
            while next_at <= now and done < max_catch_up:
                self.step()
                next_at += self.dt
                done += 1
            if next_at <= now:
                # Hopelessly late (e.g. the process was stopped): drop the backlog rather than
                # spiral; simulated time then lags wall time by the skipped steps.
                skipped = int((now - next_at) / self.dt) + 1
                log.warning("physics %d steps behind; skipping them", skipped)
                next_at = now + self.dt

    def step(self) -> None:
        """One fixed-dt step: apply queued writes, advance the physics, re-encode registers.

        The physics task calls this; tests may call it directly on a simulator that was not
        started to advance simulated time without waiting on the wall clock.
        """
        self._apply_pending()
        self.physics.step(self.dt)
        self._encode()
        if self._step_listeners:
            now = time.monotonic()
            for listener in tuple(self._step_listeners):
                listener(now)

    def _apply_pending(self) -> None:
        appliers: Mapping[str, Callable[..., None]] = {
            "pv": self.physics.set_pv_controls,
            "battery": self.physics.set_battery_controls,
        }
        for dev in self._devices.values():
            if not dev.pending:
                continue
            kwargs = {}
            for ref in sorted(dev.pending & dev.controls.keys()):
                name, convert = dev.controls[ref]
                value = dev.bank.get_value(dev.row, ref)
                if value is not None:
                    kwargs[name] = convert(value)
            dev.pending.clear()
            if kwargs:
                appliers[dev.spec.kind](dev.phys, **kwargs)

    # --- encoding physics -> registers ----------------------------------------------------------

    def _encode(self) -> None:
        ph = self.physics
        # Static points (nameplate, SFs, model 1) were encoded once; measurements change every
        # step; controls only on a write or a revert.
        controls = ph.controls_version != self._controls_encoded
        self._controls_encoded = ph.controls_version
        if self._by_group["pv"]:
            self._encode_pv(self._banks["pv"], self._phys_idx["pv"], controls)
        if self._by_group["pv-7xx"]:
            self._encode_pv_7xx(self._banks["pv-7xx"], self._phys_idx["pv-7xx"], controls)
        if ph.n_bat:
            self._encode_battery(self._banks["battery"], controls)
        if self._by_group["meter"]:
            self._encode_meter(self._banks["meter"])

    def _encode_103(
        self,
        bank: RegisterBank,
        ac_w: npt.NDArray,
        dc_w: npt.NDArray,
        dc_v: npt.NDArray,
        energy_wh: npt.NDArray,
        rating_w: npt.NDArray,
    ) -> None:
        ph = self.physics
        n = len(ac_w)
        v = ph.grid_v
        phase_a = np.abs(ac_w)[:, None] / 3.0 / v[None, :]  # (n, 3)
        for k, name in enumerate(("AphA", "AphB", "AphC")):
            bank.set_column(f"103.{name}", phase_a[:, k])
        bank.set_column("103.A", phase_a.sum(axis=1))
        for k, name in enumerate(("PhVphA", "PhVphB", "PhVphC")):
            bank.set_column(f"103.{name}", np.full(n, v[k]))
        for k, name in enumerate(("PPVphAB", "PPVphBC", "PPVphCA")):
            bank.set_column(f"103.{name}", np.full(n, (v[k] + v[(k + 1) % 3]) / 2 * _SQRT3))
        bank.set_column("103.W", ac_w)
        bank.set_column("103.VA", np.abs(ac_w))
        bank.set_column("103.VAr", np.zeros(n))
        bank.set_column("103.PF", np.full(n, 100.0))
        bank.set_column("103.Hz", np.full(n, ph.grid_hz))
        bank.set_column("103.WH", energy_wh + ENERGY_START_WH)
        bank.set_column("103.DCW", dc_w)
        bank.set_column("103.DCV", dc_v)
        bank.set_column("103.DCA", np.abs(dc_w) / dc_v)
        bank.set_column("103.TmpCab", 30.0 + 15.0 * np.abs(ac_w) / rating_w)

    def _pv_st(self, idx: npt.NDArray[np.intp]) -> npt.NDArray[np.int64]:
        """103 St of the PV inverters `idx` (701 InvSt = this - 1)."""
        ph = self.physics
        available, limit = ph.pv_available_w[idx], ph.pv_limit_w[idx]
        st = np.where(
            ~ph.pv_conn[idx],
            ST_OFF,
            np.where(
                available < 1.0,
                ST_SLEEPING,
                np.where(
                    (limit < available - 1.0) | (ph.pv_droop_w[idx] < -1.0), ST_THROTTLED, ST_MPPT
                ),
            ),
        )
        return np.where(ph.pv_tripped[idx], ST_FAULT, st).astype(np.int64)

    def _trip_bits(self, group: str, tripped: npt.NDArray[np.bool_]) -> npt.NDArray[np.float64]:
        """The Evt1 / Alrm column: each tripped device's alarm bit, 0 for the others."""
        return np.where(tripped, self._alarm_bits[group], 0.0)

    def _encode_pv(self, bank: RegisterBank, idx: npt.NDArray[np.intp], controls: bool) -> None:
        ph = self.physics
        rating = ph.config.pv.rating_w[idx]
        ac = ph.pv_ac_w[idx]
        dc_w = ac / 0.97  # inverter efficiency, for a plausible DC side only
        self._encode_103(bank, ac, dc_w, np.full(len(idx), DC_BUS_V), ph.pv_energy_wh[idx], rating)
        bank.set_column("103.St", self._pv_st(idx), scaled=False)
        bank.set_column("103.Evt1", self._trip_bits("pv", ph.pv_tripped[idx]), scaled=False)
        if not controls:
            return
        # Controls and settings mirror the physics, so device-side reverts show in the registers.
        bank.set_column("121.WMax", ph.pv_wmax_w[idx])
        bank.set_column("121.WGra", ph.pv_wgra_pct_per_s[idx])
        bank.set_column("123.Conn", ph.pv_conn[idx].astype(np.float64), scaled=False)
        bank.set_column("123.Conn_RvrtTms", ph.pv_conn_rvrt_s[idx], scaled=False)
        bank.set_column("123.WMaxLimPct", ph.pv_wmaxlim_pct[idx])
        bank.set_column("123.WMaxLimPct_RvrtTms", ph.pv_wmaxlim_rvrt_s[idx], scaled=False)
        bank.set_column("123.WMaxLimPct_RmpTms", ph.pv_wmaxlim_rmp_s[idx], scaled=False)
        bank.set_column("123.WMaxLim_Ena", ph.pv_wmaxlim_ena[idx].astype(np.float64), scaled=False)

    def _encode_pv_7xx(self, bank: RegisterBank, idx: npt.NDArray[np.intp], controls: bool) -> None:
        ph = self.physics
        n = len(idx)
        rating = ph.config.pv.rating_w[idx]
        ac = ph.pv_ac_w[idx]
        v = ph.grid_v
        tripped = ph.pv_tripped[idx]
        connected = ph.pv_conn[idx] & ~tripped
        col = lambda x: np.full(n, float(x))  # noqa: E731 - a tiny local broadcaster
        # 701 DERMeasureAC
        st = self._pv_st(idx)
        bank.set_column("701.InvSt", st - 1, scaled=False)
        bank.set_column("701.St", connected.astype(np.float64), scaled=False)  # OFF / ON
        bank.set_column("701.ConnSt", connected.astype(np.float64), scaled=False)
        bank.set_column("701.Alrm", self._trip_bits("pv-7xx", tripped), scaled=False)
        limited = (ph.pv_limit_w[idx] < ph.pv_available_w[idx] - 1.0) & connected
        droop = np.abs(ph.pv_droop_w[idx]) > 1.0
        throt_src = np.where(limited & ~droop, 1 << 0, 0) | np.where(droop, 1 << 5, 0)
        bank.set_column("701.ThrotSrc", throt_src.astype(np.float64), scaled=False)  # MAX_W, FW
        phase_w = ac / 3.0
        phase_a = np.abs(ac)[:, None] / 3.0 / v[None, :]
        bank.set_column("701.W", ac)
        bank.set_column("701.VA", np.abs(ac))
        bank.set_column("701.Var", np.zeros(n))
        bank.set_column("701.PF", col(1.0))
        bank.set_column("701.A", phase_a.sum(axis=1))
        bank.set_column("701.LLV", col(v.mean() * _SQRT3))
        bank.set_column("701.LNV", col(v.mean()))
        bank.set_column("701.Hz", col(ph.grid_hz))
        bank.set_column("701.TotWhInj", ph.pv_energy_wh[idx] + ENERGY_START_WH)
        bank.set_column("701.TotWhAbs", np.zeros(n))
        bank.set_column("701.TmpCab", 30.0 + 15.0 * np.abs(ac) / rating)
        for k, line in enumerate(("L1", "L2", "L3")):
            bank.set_column(f"701.W{line}", phase_w)
            bank.set_column(f"701.VA{line}", np.abs(phase_w))
            bank.set_column(f"701.Var{line}", np.zeros(n))
            bank.set_column(f"701.PF{line}", col(1.0))
            bank.set_column(f"701.A{line}", phase_a[:, k])
            bank.set_column(f"701.V{line}", col(v[k]))
        for k, pair in enumerate(("VL1L2", "VL2L3", "VL3L1")):
            bank.set_column(f"701.{pair}", col((v[k] + v[(k + 1) % 3]) / 2 * _SQRT3))
        # The reversion countdown runs every step.
        remaining = np.ceil(ph.pv_wmaxlim_rvrt_rem_s()[idx])
        bank.set_column("704.WMaxLimPctRvrtRem", remaining, scaled=False)
        if not controls:
            return
        bank.set_column("702.WMax", ph.pv_wmax_w[idx])
        bank.set_column("704.WRmp", ph.pv_wgra_pct_per_s[idx], scaled=False)
        ena = ph.pv_wmaxlim_ena[idx].astype(np.float64)
        bank.set_column("704.WMaxLimPctEna", ena, scaled=False)
        bank.set_column("704.WMaxLimPct", ph.pv_wmaxlim_pct[idx])
        bank.set_column("704.WMaxLimPctRvrt", ph.pv_wmaxlim_pct_rvrt[idx])
        ena_rvrt = ph.pv_wmaxlim_ena_rvrt[idx].astype(np.float64)
        bank.set_column("704.WMaxLimPctEnaRvrt", ena_rvrt, scaled=False)
        bank.set_column("704.WMaxLimPctRvrtTms", ph.pv_wmaxlim_rvrt_s[idx], scaled=False)

    def _encode_battery(self, bank: RegisterBank, controls: bool) -> None:
        ph = self.physics
        cfg = ph.config.battery
        ac = ph.bat_ac_w
        soc = ph.bat_soc_pct
        one_way = np.sqrt(cfg.efficiency)
        dc_w = np.where(ac > 0, ac / one_way, ac * one_way)
        dc_v = BATTERY_NOMINAL_V * (0.9 + 0.002 * soc)  # rises with SoC, ~360-400 V
        energy = ph.bat_discharged_wh
        self._encode_103(bank, ac, dc_w, dc_v, energy, cfg.rating_w)
        st = np.where(np.abs(ac) > 1.0, ST_MPPT, ST_STANDBY)
        bank.set_column("103.St", np.where(ph.bat_tripped, ST_FAULT, st), scaled=False)
        bank.set_column("103.Evt1", self._trip_bits("battery", ph.bat_tripped), scaled=False)
        cha_st = np.where(
            soc >= cfg.soc_max_pct - 0.05,
            CHA_FULL,
            np.where(
                soc <= cfg.soc_min_pct + 0.05,
                CHA_EMPTY,
                np.where(ac > 1.0, CHA_DISCHARGING, np.where(ac < -1.0, CHA_CHARGING, CHA_HOLDING)),
            ),
        )
        if controls:
            bank.set_column("124.WChaMax", ph.bat_w_cha_max_w)
            bank.set_column("124.StorCtl_Mod", ph.bat_stor_ctl_mod, scaled=False)
            bank.set_column("124.OutWRte", ph.bat_out_w_rte_pct)
            bank.set_column("124.InWRte", ph.bat_in_w_rte_pct)
            bank.set_column("124.InOutWRte_RvrtTms", ph.bat_rvrt_s, scaled=False)
        bank.set_column("124.ChaState", soc)
        ah_rtg = cfg.capacity_wh / BATTERY_NOMINAL_V
        bank.set_column("124.StorAval", np.maximum(soc - cfg.soc_min_pct, 0.0) / 100.0 * ah_rtg)
        bank.set_column("124.InBatV", dc_v)
        bank.set_column("124.ChaSt", cha_st, scaled=False)
        # 802
        bank.set_column("802.WChaRteMax", ph.bat_cha_lim_w)
        bank.set_column("802.WDisChaRteMax", ph.bat_dis_lim_w)
        bank.set_column("802.SoC", soc)
        bank.set_column("802.DoD", 100.0 - soc)
        bank.set_column("802.NCyc", np.floor(ph.bat_discharged_wh / cfg.capacity_wh), scaled=False)
        bank.set_column("802.ChaSt", cha_st, scaled=False)
        bank.set_column("802.Hb", np.full(ph.n_bat, float(int(ph.t_s) % 65535)), scaled=False)
        bank.set_column("802.V", dc_v)
        bank.set_column("802.A", dc_w / dc_v)
        bank.set_column("802.AChaMax", ph.bat_cha_lim_w / dc_v)
        bank.set_column("802.ADisChaMax", ph.bat_dis_lim_w / dc_v)
        bank.set_column("802.W", dc_w)

    def _encode_meter(self, bank: RegisterBank) -> None:
        ph = self.physics
        n = bank.n
        v = ph.grid_v
        w, var = ph.meter_w, ph.meter_var
        va = math.hypot(w, var)
        col = lambda x: np.full(n, float(x))  # noqa: E731 - a tiny local broadcaster
        for k, ph_name in enumerate(("A", "B", "C")):
            bank.set_column(f"203.Aph{ph_name}", col(va / 3 / v[k]))
            bank.set_column(f"203.PhVph{ph_name}", col(v[k]))
            bank.set_column(f"203.Wph{ph_name}", col(w / 3))
            bank.set_column(f"203.VAph{ph_name}", col(va / 3))
            bank.set_column(f"203.VARph{ph_name}", col(var / 3))
            bank.set_column(f"203.PFph{ph_name}", col(100.0 * w / va if va else 100.0))
        for k, name in enumerate(("PhVphAB", "PhVphBC", "PhVphCA")):
            bank.set_column(f"203.{name}", col((v[k] + v[(k + 1) % 3]) / 2 * _SQRT3))
        bank.set_column("203.A", col(sum(va / 3 / vk for vk in v)))
        bank.set_column("203.PhV", col(v.mean()))
        bank.set_column("203.PPV", col(v.mean() * _SQRT3))
        bank.set_column("203.Hz", col(ph.grid_hz))
        bank.set_column("203.W", col(w))
        bank.set_column("203.VA", col(va))
        bank.set_column("203.VAR", col(var))
        bank.set_column("203.PF", col(100.0 * w / va if va else 100.0))
        bank.set_column("203.TotWhImp", col(ph.meter_import_wh + ENERGY_START_WH))
        bank.set_column("203.TotWhExp", col(ph.meter_export_wh + ENERGY_START_WH))
        for dev in self._by_group["meter"]:
            if dev.fault is Fault.NAN_METER:
                self._blank_meter_w(dev)

    @staticmethod
    def _blank_meter_w(dev: _Device) -> None:
        for name in ("W", "WphA", "WphB", "WphC"):
            dev.bank.set_raw(dev.row, f"203.{name}", None)

    # --- Modbus request hook ----------------------------------------------------------------

    def _make_hook(self, dev: _Device):
        base = dev.spec.base_address

        async def hook(
            function_code: int,
            start_address: int,
            address: int,
            count: int,
            registers: list[int],
            set_values: list[int] | list[bool] | None,
        ) -> ExcCodes | None:
            if dev.fault is Fault.SILENT:
                # Handled by pymodbus (ignore_missing_devices=True) by sending nothing at all.
                raise NoSuchIdException(f"simulated SILENT fault on {dev.spec.id}")
            if dev.fault is Fault.EXCEPTION:
                return ExcCodes.DEVICE_FAILURE
            offset = address - base
            if set_values is not None:
                if dev.fault is Fault.IGNORE_WRITES:
                    return None
                return self._write(dev, offset, [int(v) for v in set_values])
            index = address - start_address
            registers[index : index + count] = dev.served[offset : offset + count].tolist()
            return None

        return hook

    def _write(self, dev: _Device, offset: int, values: list[int]) -> ExcCodes | None:
        layout = dev.bank.layout
        end = offset + len(values)
        if not layout.writable[offset:end].all():
            log.info("%s: refused write to read-only registers +%d..+%d", dev.spec.id, offset, end)
            return ExcCodes.ILLEGAL_ADDRESS
        candidate = dev.bank.regs[dev.row].copy()
        candidate[offset:end] = values
        touched = layout.points_touched(offset, len(values))
        for pdef, _ in touched:
            reason = _check_write(dev, pdef, candidate)
            if reason is not None:
                log.info("%s: refused write: %s", dev.spec.id, reason)
                return ExcCodes.ILLEGAL_VALUE
        dev.bank.regs[dev.row, offset:end] = values
        if dev.frozen is not None:
            dev.frozen[offset:end] = values
        dev.pending.update(pdef.ref for pdef, _ in touched)
        if self._write_listeners:
            accepted = AcceptedWrite(
                time.monotonic(), dev.spec.id, tuple(pdef.ref for pdef, _ in touched)
            )
            for listener in tuple(self._write_listeners):
                listener(accepted)
        return None

    # --- measuring hooks ------------------------------------------------------------------------

    def add_write_listener(self, listener: WriteListener) -> Callable[[], None]:
        """Call `listener` synchronously on every accepted Modbus write (TCP or RTU), after the
        registers took the values (`read_point` shows them); refused and ignored writes
        (`Fault.IGNORE_WRITES`) are not reported. Returns a function that removes it.

        It runs inside the request handler: keep it to a few microseconds (record, don't act).
        """
        self._write_listeners.append(listener)
        return lambda: self._write_listeners.remove(listener)

    def add_step_listener(self, listener: StepListener) -> Callable[[], None]:
        """Call `listener(time.monotonic())` after every physics step, once its registers were
        re-encoded (`state()` shows the step); returns a function that removes it."""
        self._step_listeners.append(listener)
        return lambda: self._step_listeners.remove(listener)

    # --- inspection and faults ------------------------------------------------------------------

    def _device(self, device_id: str) -> _Device:
        try:
            return self._devices[device_id]
        except KeyError:
            raise SimulatorError(
                f"unknown device {device_id!r}; this site has {sorted(self._devices)}"
            ) from None

    def address_of(self, device_id: str, ref: str) -> int:
        """Absolute PDU address of a point ("123.WMaxLimPct") on `device_id` (for tests)."""
        dev = self._device(device_id)
        return dev.spec.base_address + dev.bank.layout.point(ref)[1]

    def read_point(self, device_id: str, ref: str) -> float | int | str | None:
        """A point as a Modbus client would read it now ("123.WMaxLimPct"), scaled by its SF.

        Reflects FROZEN and NAN_METER; None for a not-implemented value.
        """
        dev = self._device(device_id)
        return dev.bank.get_value(dev.row, ref, dev.served)

    def set_fault(self, device_id: str, fault: Fault | None) -> None:
        """Inject (or clear, with None) a fault on one device; takes effect immediately."""
        dev = self._device(device_id)
        if dev.spec.protocol in ("opcua", "dnp3"):
            self._set_protocol_fault(dev, fault)
            return
        if fault is Fault.NAN_METER and dev.spec.kind != "meter":
            raise SimulatorError(f"NAN_METER applies to meters; {device_id!r} is {dev.spec.kind}")
        dev.fault = fault
        dev.frozen = dev.bank.regs[dev.row].copy() if fault is Fault.FROZEN else None
        if fault is Fault.NAN_METER:
            self._blank_meter_w(dev)
        elif dev.spec.kind == "meter":
            self._encode_meter(dev.bank)

    def _set_protocol_fault(self, dev: _Device, fault: Fault | None) -> None:
        """The faults an OPC UA or DNP3 device supports: DNP3 SILENT, OPC UA FROZEN; None clears."""
        sim = self.protocol_sim(dev.spec.id)
        from hil.dnp3_sim import Dnp3PlantSimulator

        if isinstance(sim, Dnp3PlantSimulator) and fault in (None, Fault.SILENT):
            sim.restore() if fault is None else sim.make_silent()
        elif not isinstance(sim, Dnp3PlantSimulator) and fault in (None, Fault.FROZEN):
            sim.freeze(fault is Fault.FROZEN)
        else:
            raise SimulatorError(
                f"{dev.spec.id!r} ({dev.spec.protocol}) does not simulate {fault}; use the "
                "protocol simulator's own hooks (protocol_sim)"
            )
        dev.fault = fault

    # --- injected conditions (effective at the next physics step) --------------------------------

    def set_grid_frequency(self, hz: float | None) -> None:
        """Hold the grid at `hz` (None = nominal with noise); the meter and inverters serve it.

        Outside the droop deadband every inverter responds (see `hil.physics`), so the site's
        export may legitimately differ from what a controller commanded.
        """
        with _as_simulator_error():
            self.physics.set_grid_frequency(hz)

    def set_irradiance_override(self, w_m2: float | None) -> None:
        """Replace the irradiance profile with `w_m2` (a PV step); None = back to the profile."""
        with _as_simulator_error():
            self.physics.set_irradiance_override(w_m2)

    def set_load_override(self, w: float | None) -> None:
        """Replace the site-load profile with `w` (a load step); None = back to the profile."""
        with _as_simulator_error():
            self.physics.set_load_override(w)

    def set_soc(self, device_id: str, soc_pct: float) -> None:
        """Jump a battery's state of charge (0-100 %); its BMS limits follow at once."""
        dev = self._device(device_id)
        if dev.spec.kind != "battery":
            raise SimulatorError(f"set_soc applies to batteries; {device_id!r} is {dev.spec.kind}")
        with _as_simulator_error():
            self.physics.set_battery_soc(dev.phys, soc_pct)

    def set_device_fault(
        self, device_id: str, fault: bool, *, alarm: str = DEFAULT_TRIP_ALARM
    ) -> None:
        """Trip an inverter (`fault=True`) or clear the trip; not a communication `Fault`.

        Tripped, it produces nothing and serves St = FAULT (103; 701 InvSt = FAULT) with the
        `alarm` bit set in 103 Evt1 / 701 Alrm (a symbol name from the model JSON, e.g.
        "GROUND_FAULT", "OVER_TEMP"). Cleared, the bit goes, St returns to MPPT and the output
        ramps up from 0 at WGra.
        """
        dev = self._device(device_id)
        if dev.spec.kind == "meter":
            raise SimulatorError(f"{device_id!r} is a meter: only inverters trip")
        group = device_group(dev.spec)
        ref = "701.Alrm" if dev.spec.family == "7xx" else "103.Evt1"
        symbols = dev.bank.layout.point(ref)[0].symbols
        if alarm not in symbols:
            raise SimulatorError(f"unknown {ref} alarm {alarm!r}; choose one of {sorted(symbols)}")
        dev.trip_alarm = alarm if fault else None
        self._alarm_bits[group][dev.row] = float(1 << symbols[alarm]) if fault else 0.0
        if dev.spec.kind == "pv":
            self.physics.set_pv_trip(dev.phys, fault)
        else:
            self.physics.set_battery_trip(dev.phys, fault)

    def state(self) -> SiteState:
        """Snapshot of physics truth, injected conditions and decoded control registers."""
        ph = self.physics
        rem = ph.pv_wmaxlim_rvrt_rem_s()
        devices: dict[str, DeviceState] = {}
        for dev in self._devices.values():
            kind, i = dev.spec.kind, dev.phys
            pv, bat = kind == "pv", kind == "battery"
            pv7 = pv and dev.spec.family == "7xx"
            if pv:
                ac_w, droop_w, tripped = ph.pv_ac_w[i], ph.pv_droop_w[i], ph.pv_tripped[i]
            elif bat:
                ac_w, droop_w, tripped = ph.bat_ac_w[i], ph.bat_droop_w[i], ph.bat_tripped[i]
            else:
                ac_w, droop_w, tripped = ph.meter_w, 0.0, False
            devices[dev.spec.id] = DeviceState(
                id=dev.spec.id,
                kind=kind,
                ac_w=float(ac_w),
                available_w=float(ph.pv_available_w[i]) if pv else None,
                soc_pct=float(ph.bat_soc_pct[i]) if bat else None,
                wmaxlim_pct=_decoded(dev, "704.WMaxLimPct" if pv7 else "123.WMaxLimPct", pv),
                wmaxlim_ena=_decoded(dev, "704.WMaxLimPctEna" if pv7 else "123.WMaxLim_Ena", pv),
                conn=_decoded(dev, "701.ConnSt" if pv7 else "123.Conn", pv),
                stor_ctl_mod=_decoded(dev, "124.StorCtl_Mod", bat),
                in_w_rte=_decoded(dev, "124.InWRte", bat),
                out_w_rte=_decoded(dev, "124.OutWRte", bat),
                fault=dev.fault,
                family=dev.spec.family,
                tripped=bool(tripped),
                trip_alarm=dev.trip_alarm if tripped else None,
                droop_w=float(droop_w),
                wmaxlim_pct_rvrt=_decoded(dev, "704.WMaxLimPctRvrt", pv7),
                wmaxlim_ena_rvrt=_decoded(dev, "704.WMaxLimPctEnaRvrt", pv7),
                wmaxlim_rvrt_rem_s=float(rem[i]) if pv else None,
            )
        return SiteState(
            t_s=ph.t_s,
            steps=ph.steps,
            load_w=float(ph.load_w),
            meter_w=float(ph.meter_w),
            pv_w=float(ph.pv_ac_w.sum()),
            battery_w=float(ph.bat_ac_w.sum()),
            grid_hz=float(ph.grid_hz),
            devices=MappingProxyType(devices),
            irradiance_w_m2=float(ph.irradiance_w_m2),
            irradiance_override=ph.irradiance_override,
            load_override=ph.load_override,
            grid_hz_override=ph.grid_hz_override,
        )

    def manifest(self) -> dict[str, Any]:
        """The manifest document (`dergw hil run --manifest`): where each device listens."""
        if not self.endpoints:
            raise SimulatorError("start the simulator before asking for its manifest")
        return {
            "site": self.spec.name,
            "devices": [
                {
                    "id": d.id,
                    "kind": d.kind,
                    "host": self.endpoints[d.id].host,
                    "port": self.endpoints[d.id].port,
                    "unit_id": d.unit_id,
                    "role": d.role,
                }
                | (
                    {}
                    if d.protocol == "modbus-tcp"
                    else {
                        "protocol": d.protocol,
                        "serial_port": self.endpoints[d.id].serial_port,
                        "url": self.endpoints[d.id].url,
                        "root": self.endpoints[d.id].root,
                    }
                )
                for d in self.spec.devices
            ],
        }

"""A simulated utility-scale PV plant controller on DNP3 (IEEE 1815.2), for HIL tests.

The DNP3 side is dnp3py's MESA / IEEE 1815.2 DER outstation (`dnp3.mesa`, loaded from its bundled
PICS profile: an implementation independent of the gateway's master). The numbers come from
`hil.physics.SitePhysics` (one PV inverter standing for the plant, no load: the system meter
reads the plant's output at the point of interconnection):

- BO17 / AO87 / AO85 (enable, limit in 0.1 % of WMax, reversion timeout) drive the physics'
  WMaxLim_Ena / WMaxLimPct / WMaxLimPct_RvrtTms; BO5 drives Conn. When the reversion timer
  fires the physics disables the limit and the outstation's BO17/BI69 follow.
- Every physics step mirrors into the outstation's database: AI537 W, AI541 var, AI545 PF,
  AI546 VA, AI536 Hz, AI547 V, AI554 A, AI32/34/36 ratings, AI43 available W, AI145/AI148 the
  limit in force, BI69 limit enabled, BI23 switch closed, BI1 P1 alarm (= tripped).

Clients connect through a small TCP relay in front of the outstation (`port`), which injects
faults: `make_silent()` (bytes are dropped both ways: the master times out), `make_malformed()`
(each response chunk gets a corrupted octet: CRC errors), `restore()`; `restart()` stops the
outstation, drops every connection and starts it again (a device reboot).

On a mixed site (`hil.server.SiteSimulator`, protocol "dnp3") the plant is one PV inverter of the
site's shared physics: `physics=`, `pv_index=`, `step_physics=False` (the site steps it; this
simulator only mirrors it into the outstation and applies controls). `controls_applied` counts
the controls that reached the physics, `last_control_mono` is when the latest one did.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import math
import time
from importlib.resources import as_file, files
from typing import Any

import numpy as np
from dnp3.core.enums import ControlCode
from dnp3.mesa import MesaOutstation, create_mesa_outstation
from dnp3.mesa.command_handler import MesaCommandHandler
from dnp3.outstation.handler import CommandResult

from hil.physics import PhysicsConfig, Profile, PvParams, SitePhysics

__all__ = ["Dnp3Fault", "Dnp3PlantSimulator"]


class Dnp3Fault(enum.Enum):
    NONE = "none"
    SILENT = "silent"
    MALFORMED = "malformed"


class _PlantHandler(MesaCommandHandler):
    """The MESA handler, plus: a control that lands also reaches the physics."""

    sim: Dnp3PlantSimulator

    def _execute_analog_output(self, index: int, value: float) -> CommandResult:
        result = super()._execute_analog_output(index, value)
        if result.status == 0:
            self.sim._on_analog(index, value)
        return result

    def _execute_binary_output(self, index: int, code: ControlCode, count: int) -> CommandResult:
        result = super()._execute_binary_output(index, code, count)
        if result.status == 0 and count == 1:
            on = code in (ControlCode.LATCH_ON, ControlCode.PULSE_ON, ControlCode.CLOSE_PULSE_ON)
            off = code in (ControlCode.LATCH_OFF, ControlCode.PULSE_OFF, ControlCode.TRIP_PULSE_ON)
            if on or off:
                self.sim._on_binary(index, on)
        return result


class Dnp3PlantSimulator:
    """A PV plant controller: 1815.2 outstation + physics + fault-injecting relay."""

    def __init__(
        self,
        *,
        rating_w: float = 5_000_000.0,
        irradiance_w_m2: float = 900.0,
        host: str = "127.0.0.1",
        port: int = 0,
        address: int = 10,
        master_address: int = 1,
        physics_hz: float = 10.0,
        seed: int = 0,
        profile: str = "full",
        physics: SitePhysics | None = None,
        pv_index: int = 0,
        step_physics: bool = True,
    ) -> None:
        self.host = host
        self._want_port = port
        self.address = address
        self.master_address = master_address
        self.dt = 1.0 / physics_hz
        self.profile = profile
        self.step_physics = step_physics  # False: a caller steps the shared physics
        if physics is None:
            self.nominal_v = 19_919.0  # 34.5 kV line-to-line, phase volts
            physics = SitePhysics(
                PhysicsConfig(
                    irradiance=Profile.from_points([(0.0, irradiance_w_m2)]),
                    load=Profile.from_points([(0.0, 0.0)]),
                    pv=PvParams(np.array([rating_w]), np.array([100.0])),
                    nominal_hz=60.0,
                    nominal_v=self.nominal_v,
                    v_noise=20.0,
                ),
                seed=seed,
            )
            pv_index = 0
        else:
            if not 0 <= pv_index < physics.n_pv:
                raise ValueError(f"pv_index {pv_index}: the physics has {physics.n_pv} PV")
            self.nominal_v = physics.config.nominal_v
            rating_w = float(physics.config.pv.rating_w[pv_index])
        self.physics = physics
        self.i = pv_index
        self.rating_w = rating_w
        self.controls_applied = 0
        self.last_control_mono: float | None = None
        self.fault = Dnp3Fault.NONE
        self.outstation: MesaOutstation | None = None
        self._os_task: asyncio.Task[None] | None = None
        self._phys_task: asyncio.Task[None] | None = None
        self._relay: asyncio.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()
        self._port = 0
        self.requests_relayed = 0

    @property
    def port(self) -> int:
        return self._port

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        await self._start_outstation()
        self._relay = await asyncio.start_server(self._relay_conn, self.host, self._want_port)
        self._port = int(self._relay.sockets[0].getsockname()[1])
        self._phys_task = asyncio.create_task(self._run_physics(), name="dnp3-sim-physics")

    async def _start_outstation(self) -> None:
        res = files("dnp3.mesa") / "data" / "profiles" / f"{self.profile}.json"
        with as_file(res) as path:
            os_ = create_mesa_outstation(
                path,
                host="127.0.0.1",
                port=0,
                address=self.address,
                master_address=self.master_address,
            )
        handler = os_.handler
        handler.__class__ = _PlantHandler  # same state, plus the physics hooks
        assert isinstance(handler, _PlantHandler)
        handler.sim = self
        self.outstation = os_
        self._mirror()
        self._os_task = asyncio.create_task(os_.run(), name="dnp3-sim-outstation")
        for _ in range(200):
            if os_.local_address is not None:
                return
            if self._os_task.done():
                self._os_task.result()
            await asyncio.sleep(0.01)
        raise RuntimeError("DNP3 outstation did not start listening")

    async def _stop_outstation(self) -> None:
        os_, task, self.outstation, self._os_task = self.outstation, self._os_task, None, None
        if os_ is not None:
            with contextlib.suppress(Exception):
                await os_.stop()
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task

    def _drop_connections(self) -> None:
        for w in list(self._conns):
            w.close()
        self._conns.clear()

    async def restart(self) -> None:
        """A device reboot: outstation down, every connection dropped, outstation up again."""
        self._drop_connections()
        await self._stop_outstation()
        await self._start_outstation()

    async def stop(self) -> None:
        if self._phys_task is not None:
            self._phys_task.cancel()
            with contextlib.suppress(BaseException):
                await self._phys_task
        if self._relay is not None:
            self._relay.close()
        self._drop_connections()
        await self._stop_outstation()

    async def __aenter__(self) -> Dnp3PlantSimulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def make_silent(self) -> None:
        self.fault = Dnp3Fault.SILENT

    def make_malformed(self) -> None:
        self.fault = Dnp3Fault.MALFORMED

    def restore(self) -> None:
        self.fault = Dnp3Fault.NONE

    # --- relay --------------------------------------------------------------------------------

    async def _relay_conn(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        os_ = self.outstation
        addr = os_.local_address if os_ is not None else None
        if addr is None:
            cw.close()
            return
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", addr[1])
        except OSError:
            cw.close()
            return
        self._conns.update((cw, uw))

        async def pump(r: asyncio.StreamReader, w: asyncio.StreamWriter, up: bool) -> None:
            try:
                while data := await r.read(65536):
                    if self.fault is Dnp3Fault.SILENT:
                        continue
                    if self.fault is Dnp3Fault.MALFORMED and not up and len(data) > 12:
                        b = bytearray(data)
                        b[11] ^= 0xFF  # inside the first data block: its CRC no longer matches
                        data = bytes(b)
                    if up:
                        self.requests_relayed += 1
                    w.write(data)
                    await w.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                w.close()

        await asyncio.gather(pump(cr, uw, True), pump(ur, cw, False))
        self._conns.difference_update((cw, uw))

    # --- physics ------------------------------------------------------------------------------

    def _count_control(self) -> None:
        self.controls_applied += 1
        self.last_control_mono = time.monotonic()

    def _on_analog(self, index: int, raw: float) -> None:
        if index == 87:
            self.physics.set_pv_controls(self.i, wmaxlim_pct=raw * 0.1)
            self._count_control()
        elif index == 85:
            self.physics.set_pv_controls(self.i, wmaxlim_rvrt_s=raw)
            self._count_control()

    def _on_binary(self, index: int, on: bool) -> None:
        if index == 17:
            self.physics.set_pv_controls(self.i, wmaxlim_ena=on)
            self._count_control()
        elif index == 5:
            self.physics.set_pv_controls(self.i, conn=on)
            self._count_control()
        self._mirror()

    async def _run_physics(self) -> None:
        loop = asyncio.get_running_loop()
        next_t = loop.time()
        while True:
            next_t += self.dt
            if self.step_physics:
                self.physics.step(self.dt)
            self._mirror()
            await asyncio.sleep(max(0.0, next_t - loop.time()))

    def _mirror(self) -> None:
        os_ = self.outstation
        if os_ is None:
            return
        db = os_.database
        ph, i = self.physics, self.i
        w = float(ph.pv_ac_w[i])
        v = float(ph.grid_v[0])
        ai: dict[int, float] = {
            537: w,
            541: 0.0,
            545: 100.0,  # PF 1.00 (0.01 scale)
            546: abs(w),
            536: ph.grid_hz * 1000.0,
            547: v * 10.0,
            554: (w / (3.0 * v) if v > 0 else 0.0) * 10.0,
            32: float(ph.pv_wmax_w[i]),
            36: self.rating_w,
            34: self.rating_w * 0.44,
            43: float(ph.pv_available_w[i]),
            148: float(ph.pv_wmaxlim_pct[i]) * 10.0,
            145: float(ph.pv_wmaxlim_rvrt_s[i]),
        }
        for index, value in ai.items():
            db.update_analog_input(index, float(round(value)) if math.isfinite(value) else 0.0)
        ena = bool(ph.pv_wmaxlim_ena[i])
        conn = bool(ph.pv_conn[i])
        binaries: list[tuple[str, int, bool]] = [
            ("bi", 69, ena),
            ("bo", 17, ena),
            ("bi", 23, conn),
            ("bo", 5, conn),
            ("bi", 1, bool(ph.pv_tripped[i])),
        ]
        for kind, index, value in binaries:
            upd: Any = db.update_binary_input if kind == "bi" else db.update_binary_output
            upd(index, value)

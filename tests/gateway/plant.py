"""A closed loop in-process: the safety kernel steering hil.physics, no sockets.

The plant is the simulator's pure numpy physics (hil.physics.SitePhysics), stepped at 20 Hz. The
controller runs every 200 ms and sees what a 200 ms poll would have shown it one poll earlier
(the PCC meter and each device's output, frequency, SoC and BMS limits, with a one-sample delay),
then writes its setpoints the way the SunSpec driver would (WMaxLimPct of WMax, model 124 storage
rates). Tests read the truth from the physics at every step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from drivers.contract import DeviceKind
from gateway.safety import (
    DeviceState,
    Enforcement,
    KernelPolicy,
    KernelState,
    Limit,
    PlannedSetpoint,
    SafeSetpoint,
    SiteConditions,
    enforce,
)
from hil.physics import (
    STOR_CHARGE,
    STOR_DISCHARGE,
    BatteryParams,
    PhysicsConfig,
    Profile,
    PvParams,
    SitePhysics,
)

PHYSICS_DT_S = 0.05
CONTROL_PERIOD_S = 0.2
STEPS_PER_CYCLE = round(CONTROL_PERIOD_S / PHYSICS_DT_S)
NS = 1_000_000_000


@dataclass(frozen=True)
class BatterySpec:
    rating_w: float
    capacity_wh: float = 20_000.0
    initial_soc_pct: float = 50.0
    ramp_pct_per_s: float = 0.0  # 0: the battery follows its command within a step


@dataclass
class _Poll:
    t_ns: int
    meter_w: float
    grid_hz: float
    pv_w: np.ndarray
    bat_w: np.ndarray
    soc_pct: np.ndarray
    bat_cha_lim_w: np.ndarray
    bat_dis_lim_w: np.ndarray


@dataclass
class Trace:
    """What happened: per physics step (truth) and per control cycle (the kernel's view)."""

    t_s: list[float] = field(default_factory=list)
    export_w: list[float] = field(default_factory=list)  # truth at the PCC, + export
    cycle_t_s: list[float] = field(default_factory=list)
    budget_w: list[float | None] = field(default_factory=list)
    enforcements: list[Enforcement] = field(default_factory=list)

    def export_between(self, start_s: float, end_s: float) -> np.ndarray:
        t = np.array(self.t_s)
        return np.array(self.export_w)[(t >= start_s) & (t < end_s)]

    def budget_between(self, start_s: float, end_s: float) -> np.ndarray:
        t = np.array(self.cycle_t_s)
        b = np.array([np.nan if v is None else v for v in self.budget_w])
        return b[(t >= start_s) & (t < end_s)]

    def settled_at(self, after_s: float, limit_w: float, *, until_s: float) -> float | None:
        """The first time after `after_s` from which export stays at or under the limit."""
        t = np.array(self.t_s)
        export = np.array(self.export_w)
        window = (t >= after_s) & (t < until_s)
        over = np.flatnonzero(window & (export > limit_w))
        if over.size == 0:
            return after_s
        last_over = over[-1]
        return (
            float(t[last_over + 1])
            if last_over + 1 < t.size and t[last_over + 1] < until_s
            else None
        )


class Plant:
    """PV inverters and batteries behind one PCC meter, steered by gateway.safety.enforce."""

    def __init__(
        self,
        *,
        pv_ratings_w: Sequence[float],
        batteries: Sequence[BatterySpec] = (),
        irradiance_w_m2: float = 1000.0,
        load_w: float = 2000.0,
        pv_ramp_pct_per_s: float = 0.0,
        noise_pct: float = 1.0,
        seed: int = 1,
        policy: KernelPolicy | None = None,
        export_limits: tuple[Limit, ...] = (),
        import_limits: tuple[Limit, ...] = (),
        planned: Callable[[], Sequence[PlannedSetpoint]] | None = None,
    ) -> None:
        n, m = len(pv_ratings_w), len(batteries)
        bat = BatteryParams(
            rating_w=np.array([b.rating_w for b in batteries], dtype=np.float64),
            max_charge_w=np.array([b.rating_w for b in batteries], dtype=np.float64),
            max_discharge_w=np.array([b.rating_w for b in batteries], dtype=np.float64),
            capacity_wh=np.array([b.capacity_wh for b in batteries], dtype=np.float64),
            efficiency=np.full(m, 0.92),
            soc_min_pct=np.full(m, 5.0),
            soc_max_pct=np.full(m, 100.0),
            initial_soc_pct=np.array([b.initial_soc_pct for b in batteries], dtype=np.float64),
            ramp_pct_per_s=np.array([b.ramp_pct_per_s or 1e6 for b in batteries], dtype=np.float64),
            taper_band_pct=5.0,
        )
        config = PhysicsConfig(
            irradiance=Profile.from_points([[0.0, irradiance_w_m2]]),
            load=Profile.from_points([[0.0, load_w]]),
            pv=PvParams(
                rating_w=np.array(pv_ratings_w, dtype=np.float64),
                ramp_pct_per_s=np.full(n, pv_ramp_pct_per_s),
            ),
            battery=bat,
            irradiance_noise_pct=noise_pct,
            load_noise_pct=noise_pct,
            hz_noise=0.005,
        )
        self.physics = SitePhysics(config, seed=seed)
        self.pv_ids = [f"pv{i}" for i in range(n)]
        self.bat_ids = [f"bat{i}" for i in range(m)]
        self.pv_ratings_w = list(pv_ratings_w)
        self.bat_ratings_w = [b.rating_w for b in batteries]
        self.policy = policy or KernelPolicy()
        self.export_limits = export_limits
        self.import_limits = import_limits
        self.state = KernelState()
        self.trace = Trace()
        self.unavailable: set[str] = set()
        self.faults: dict[str, str] = {}
        self.meter_stale = False  # the PCC reading is withheld (pcc_w None)
        self._planned = planned
        self._poll = self._take_poll()

    # -- sensing --------------------------------------------------------------------------------

    def _take_poll(self) -> _Poll:
        ph = self.physics
        return _Poll(
            t_ns=round(ph.t_s * NS),
            meter_w=float(ph.meter_w),
            grid_hz=float(ph.grid_hz),
            pv_w=ph.pv_ac_w.copy(),
            bat_w=ph.bat_ac_w.copy(),
            soc_pct=ph.bat_soc_pct.copy(),
            bat_cha_lim_w=ph.bat_cha_lim_w.copy(),
            bat_dis_lim_w=ph.bat_dis_lim_w.copy(),
        )

    def device_states(self, poll: _Poll) -> dict[str, DeviceState]:
        states: dict[str, DeviceState] = {}
        for i, device_id in enumerate(self.pv_ids):
            states[device_id] = DeviceState(
                device_id,
                DeviceKind.PV,
                self.pv_ratings_w[i],
                available=device_id not in self.unavailable,
                measured_w=float(poll.pv_w[i]),
                fault=self.faults.get(device_id),
            )
        for i, device_id in enumerate(self.bat_ids):
            rating = self.bat_ratings_w[i]
            states[device_id] = DeviceState(
                device_id,
                DeviceKind.BATTERY,
                rating,
                max_charge_w=rating,
                max_discharge_w=rating,
                available=device_id not in self.unavailable,
                measured_w=float(poll.bat_w[i]),
                soc_pct=float(poll.soc_pct[i]),
                bms_charge_max_w=float(poll.bat_cha_lim_w[i]),
                bms_discharge_max_w=float(poll.bat_dis_lim_w[i]),
                fault=self.faults.get(device_id),
            )
        return states

    # -- acting ---------------------------------------------------------------------------------

    def _write(self, setpoint: SafeSetpoint) -> None:
        ph = self.physics
        if setpoint.device_id in self.pv_ids:
            i = self.pv_ids.index(setpoint.device_id)
            cap = setpoint.max_active_power_w
            if cap is None:
                ph.set_pv_controls(i, wmaxlim_ena=False, wmaxlim_pct=100.0)
            else:
                # The driver floors the percentage to the register resolution (0.01 %).
                pct = np.floor(min(max(cap / self.pv_ratings_w[i] * 100.0, 0.0), 100.0) * 100) / 100
                ph.set_pv_controls(i, wmaxlim_ena=True, wmaxlim_pct=float(pct))
            if setpoint.connect is not None:
                ph.set_pv_controls(i, conn=setpoint.connect)
            return
        i = self.bat_ids.index(setpoint.device_id)
        active, rating = setpoint.active_power_w, self.bat_ratings_w[i]
        if active is None or active == 0.0:
            ph.set_battery_controls(i, stor_ctl_mod=0, out_w_rte_pct=0.0, in_w_rte_pct=0.0)
        elif active > 0:
            ph.set_battery_controls(
                i, stor_ctl_mod=STOR_DISCHARGE, out_w_rte_pct=active / rating * 100.0
            )
        else:
            ph.set_battery_controls(
                i, stor_ctl_mod=STOR_CHARGE, in_w_rte_pct=-active / rating * 100.0
            )

    # -- running --------------------------------------------------------------------------------

    def cycle(self) -> Enforcement:
        """One control cycle on the previous poll, then one control period of physics."""
        poll = self._poll  # one-sample delay: what the last poll saw
        now_ns = round(self.physics.t_s * NS)
        devices = self.device_states(poll)
        if self._planned is not None:
            planned = list(self._planned())
        else:
            planned = [PlannedSetpoint(device_id) for device_id in [*self.pv_ids, *self.bat_ids]]
        enforcement = enforce(
            planned,
            devices,
            SiteConditions(
                pcc_w=None if self.meter_stale else poll.meter_w,
                export_limits=self.export_limits,
                import_limits=self.import_limits,
                grid_hz=poll.grid_hz,
                now_mono_ns=now_ns,
                pcc_mono_ns=poll.t_ns,
            ),
            revert_after_s=60,
            policy=self.policy,
            state=self.state,
        )
        self.state = enforcement.state
        for setpoint in enforcement.setpoints:
            self._write(setpoint)
        self.trace.cycle_t_s.append(self.physics.t_s)
        self.trace.budget_w.append(enforcement.state.export_budget_w)
        self.trace.enforcements.append(enforcement)
        self._poll = self._take_poll()
        for _ in range(STEPS_PER_CYCLE):
            self.physics.step(PHYSICS_DT_S)
            self.trace.t_s.append(self.physics.t_s)
            self.trace.export_w.append(-float(self.physics.meter_w))
        return enforcement

    def run(self, seconds: float) -> None:
        for _ in range(round(seconds / CONTROL_PERIOD_S)):
            self.cycle()

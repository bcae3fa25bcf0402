"""Site physics: a deterministic, vectorised model of PV inverters, batteries, load and the PCC.

Owns the numbers a simulated site produces, and nothing else: no asyncio, no sockets, no wall
clock, no registers. The caller advances time with `step(dt)` (always the same fixed dt), and
feeds control inputs with `set_pv_controls` / `set_battery_controls`, the way a register write
would (a write also restarts that control's device-side revert timer). All state is plain numpy
arrays, one element per device of a kind, so a step costs the same few dozen array operations
for 3 or 300 devices. Given the seed and the same sequence of commands at the same steps, every
array is bit-for-bit identical between runs.

Sign conventions (protocols.md §4.1):
- Device AC power (`pv_ac_w`, `bat_ac_w`): positive = generation / discharge into the site;
  negative = absorbing (a battery charging).
- PCC meter (`meter_w`): positive = import from the grid, negative = export.
  `meter_w = load_w - sum(pv_ac_w) - sum(bat_ac_w)`.

Model, per step:
- PV available power = irradiance(t) x (1 + noise) x rating / 1000, capped at the rating. The
  inverter output is min(available, limit), where `limit` ramps towards the commanded limit
  (WMax x WMaxLimPct when WMaxLim_Ena, else WMax; 0 while disconnected) at WGra %WMax/s, or over
  WMaxLimPct_RmpTms seconds when that is > 0. Disconnecting drops output at once; reconnecting
  ramps up from 0.
- Revert timers: when a control block has not been written for its *_RvrtTms (> 0), the control
  returns to its reversion values: WMaxLim_Ena -> the reversion enable (model 704
  WMaxLimPctEnaRvrt; DISABLED = 100 % for model 123, which has no reversion registers) and
  WMaxLimPct -> the reversion percentage (704 WMaxLimPctRvrt; unchanged for 123), Conn ->
  CONNECT, StorCtl_Mod -> 0. A timer fires once per write of its block.
- Frequency response (IEEE 1547-2018 droop, protocols.md §3.3/§3.4): outside the deadband
  (|f - nominal| > 0.036 Hz by default) every inverter moves its output by
  rating x (|f - nominal| - deadband) / (nominal x droop): down on over-frequency, up (within
  what is available, above a commanded limit) on under-frequency. Applied at once (no response
  time), after the limit ramp, and reported per device as `pv_droop_w` / `bat_droop_w`.
- Injected conditions: an irradiance, load or grid-frequency override replaces the profile (or
  nominal) value from the next step (the noise still applies to irradiance and load, not to an
  overridden frequency); `set_battery_soc` jumps a SoC; a tripped inverter (`set_pv_trip` /
  `set_battery_trip`) produces nothing until cleared, then ramps up from 0 like a reconnection.
- Battery command (model 124): +OutWRte% x max discharge if StorCtl_Mod bit 1 (DISCHARGE),
  -InWRte% x WChaMax if bit 0 (CHARGE), the net if both, 0 W (idle) if neither. The command is
  clamped by the BMS limits, which taper linearly to 0 within `taper_band_pct` of SoCMin/SoCMax,
  and by the energy left before the SoC bound; output ramps at `ramp_pct_per_s` of rating.
  SoC integrates DC energy with the round-trip efficiency split evenly between the two ways.
- Noise (irradiance, load, grid V and Hz) is first-order autoregressive (smooth, not white),
  drawn from `np.random.default_rng(seed)` in a fixed order every step. The grid frequency's
  noise is bounded at 3 sigma (inside the droop deadband for the default 0.01 Hz).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]

STOR_CHARGE = 0b01  # model 124 StorCtl_Mod bit 0
STOR_DISCHARGE = 0b10  # bit 1
_NOISE_TAU_S = 2.0  # correlation time of the AR(1) noise
_LOAD_VAR_RATIO = 0.25  # site load reactive power: var = 0.25 x W (PF ~0.97 lagging)


class PhysicsConfigError(ValueError):
    """The physics configuration is inconsistent (profile shape, array lengths, bounds)."""


@dataclass(frozen=True)
class Profile:
    """A looping piecewise-linear profile: period = last t (a single point is a constant)."""

    t_s: FloatArray
    values: FloatArray

    @classmethod
    def from_points(cls, points: list[tuple[float, float]] | list[list[float]]) -> Profile:
        arr = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        if arr.shape[0] == 0 or arr[0, 0] != 0 or np.any(np.diff(arr[:, 0]) <= 0):
            raise PhysicsConfigError("profile needs [t_s, value] points from t = 0, increasing")
        return cls(t_s=arr[:, 0].copy(), values=arr[:, 1].copy())

    def at(self, t: float) -> float:
        period = float(self.t_s[-1])
        if period <= 0:
            return float(self.values[0])
        return float(np.interp(math.fmod(t, period), self.t_s, self.values))


@dataclass(frozen=True)
class PvParams:
    """Static PV inverter parameters, one element per inverter."""

    rating_w: FloatArray
    ramp_pct_per_s: FloatArray  # initial WGra (%WMax/s)


@dataclass(frozen=True)
class BatteryParams:
    """Static battery parameters, one element per battery."""

    rating_w: FloatArray
    max_charge_w: FloatArray
    max_discharge_w: FloatArray
    capacity_wh: FloatArray
    efficiency: FloatArray  # round trip
    soc_min_pct: FloatArray
    soc_max_pct: FloatArray
    initial_soc_pct: FloatArray
    ramp_pct_per_s: FloatArray
    taper_band_pct: float = 10.0


def _empty() -> FloatArray:
    return np.zeros(0, dtype=np.float64)


def _no_batteries() -> BatteryParams:
    e = _empty
    return BatteryParams(e(), e(), e(), e(), e(), e(), e(), e(), e())


@dataclass(frozen=True)
class PhysicsConfig:
    """Everything the physics needs; the server builds it from a SiteSpec."""

    irradiance: Profile
    load: Profile
    pv: PvParams = field(default_factory=lambda: PvParams(_empty(), _empty()))
    battery: BatteryParams = field(default_factory=lambda: _no_batteries())
    irradiance_noise_pct: float = 1.0
    load_noise_pct: float = 1.0
    nominal_v: float = 230.0
    nominal_hz: float = 50.0
    v_noise: float = 0.5
    hz_noise: float = 0.01
    droop_pct: float = 5.0  # frequency droop k (%); 0 = no frequency response
    droop_deadband_hz: float = 0.036


def _check_lengths(name: str, arrays: dict[str, FloatArray]) -> int:
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise PhysicsConfigError(f"{name} parameter arrays differ in length: {lengths}")
    return next(iter(lengths.values()), 0)


class SitePhysics:
    """Mutable site state plus `step(dt)`. Attributes are public numpy arrays (read them)."""

    def __init__(self, config: PhysicsConfig, *, seed: int) -> None:
        self.config = config
        self.rng = np.random.default_rng(seed)
        pv, bat = config.pv, config.battery
        self.n_pv = _check_lengths("pv", vars(pv))
        self.n_bat = _check_lengths(
            "battery", {k: v for k, v in vars(bat).items() if k != "taper_band_pct"}
        )
        if np.any(bat.soc_min_pct >= bat.soc_max_pct):
            raise PhysicsConfigError("battery soc_min_pct must be below soc_max_pct")
        n, m = self.n_pv, self.n_bat
        self.t_s = 0.0
        self.steps = 0
        # Bumped whenever a control changes (a command or a revert), so that callers mirroring
        # the controls elsewhere (registers) re-encode them only when they changed.
        self.controls_version = 0

        # PV: outputs
        self.pv_available_w = np.zeros(n)
        self.pv_ac_w = np.zeros(n)
        self.pv_limit_w = pv.rating_w.astype(np.float64).copy()  # ramped effective limit
        self.pv_energy_wh = np.zeros(n)
        # PV: controls (registers 121/123)
        self.pv_wmax_w = pv.rating_w.astype(np.float64).copy()
        self.pv_wgra_pct_per_s = pv.ramp_pct_per_s.astype(np.float64).copy()
        self.pv_wmaxlim_pct = np.full(n, 100.0)
        self.pv_wmaxlim_ena = np.zeros(n, dtype=np.bool_)
        self.pv_wmaxlim_rvrt_s = np.zeros(n)
        self.pv_wmaxlim_rmp_s = np.zeros(n)
        # Reversion values applied when the WMaxLimPct timer fires. The percentage applies only
        # once written (704 WMaxLimPctRvrt); a 123 device's reversion just disables the limit.
        self.pv_wmaxlim_pct_rvrt = np.full(n, 100.0)
        self.pv_wmaxlim_has_pct_rvrt = np.zeros(n, dtype=np.bool_)
        self.pv_wmaxlim_ena_rvrt = np.zeros(n, dtype=np.bool_)
        self.pv_wmaxlim_armed = np.zeros(n, dtype=np.bool_)  # the timer will fire
        self.pv_conn = np.ones(n, dtype=np.bool_)
        self.pv_conn_rvrt_s = np.zeros(n)
        self.pv_wmaxlim_written_t = np.zeros(n)
        self.pv_conn_written_t = np.zeros(n)
        # A commanded RmpTms transition: its rate (W/s) while `pv_rmp_active`.
        self.pv_rmp_rate_w = np.zeros(n)
        self.pv_rmp_active = np.zeros(n, dtype=np.bool_)
        self.pv_tripped = np.zeros(n, dtype=np.bool_)
        self.pv_droop_w = np.zeros(n)  # frequency response this step (+ up, - down)

        # Battery: outputs
        self.bat_ac_w = np.zeros(m)
        self.bat_soc_pct = bat.initial_soc_pct.astype(np.float64).copy()
        self.bat_cha_lim_w = np.zeros(m)  # BMS dynamic limits (802 WChaRteMax / WDisChaRteMax)
        self.bat_dis_lim_w = np.zeros(m)
        self.bat_charged_wh = np.zeros(m)  # AC energy in / out, lifetime
        self.bat_discharged_wh = np.zeros(m)
        # Battery: controls (register 124)
        self.bat_stor_ctl_mod = np.zeros(m, dtype=np.int64)
        self.bat_out_w_rte_pct = np.zeros(m)
        self.bat_in_w_rte_pct = np.zeros(m)
        self.bat_w_cha_max_w = bat.max_charge_w.astype(np.float64).copy()
        self.bat_rvrt_s = np.zeros(m)
        self.bat_written_t = np.zeros(m)
        self.bat_cmd_w = np.zeros(m)  # the ramped command, before the frequency response
        self.bat_tripped = np.zeros(m, dtype=np.bool_)
        self.bat_droop_w = np.zeros(m)
        self._update_bms_limits()

        # Site and grid
        self.load_w = config.load.at(0.0)
        self.meter_w = self.load_w
        self.meter_var = self.load_w * _LOAD_VAR_RATIO
        self.meter_import_wh = 0.0
        self.meter_export_wh = 0.0
        self.grid_hz = float(config.nominal_hz)
        self.grid_v = np.full(3, float(config.nominal_v))
        self.irradiance_w_m2 = config.irradiance.at(0.0)
        # Injected conditions (None = follow the profile / nominal).
        self.irradiance_override: float | None = None
        self.load_override: float | None = None
        self.grid_hz_override: float | None = None

        # AR(1) noise states: [pv irradiance x n, load, hz, v x 3]
        self._noise = np.zeros(n + 5)
        self._noise_sigma = np.concatenate(
            [
                np.full(n, config.irradiance_noise_pct / 100.0),
                [config.load_noise_pct / 100.0, config.hz_noise],
                np.full(3, config.v_noise),
            ]
        )
        # t = 0 is a physical state too: PV already produces what the irradiance allows.
        self._step_pv(0.0)
        self._update_outputs(0.0)

    # --- commands -----------------------------------------------------------------------------

    def set_pv_controls(
        self,
        i: int,
        *,
        wmaxlim_pct: float | None = None,
        wmaxlim_ena: bool | None = None,
        wmaxlim_rvrt_s: float | None = None,
        wmaxlim_rmp_s: float | None = None,
        conn: bool | None = None,
        conn_rvrt_s: float | None = None,
        wmax_w: float | None = None,
        wgra_pct_per_s: float | None = None,
        wmaxlim_pct_rvrt: float | None = None,
        wmaxlim_ena_rvrt: bool | None = None,
    ) -> None:
        """Apply a write to PV inverter `i`'s controls; restarts the written block's revert timer.

        The WMaxLimPct block is WMaxLimPct, WMaxLim_Ena, their timers and (704) their reversion
        values; the Conn block is Conn and Conn_RvrtTms. WMax and WGra are settings (no timer).
        """
        self.controls_version += 1
        old_target = self._pv_target_w()[i]
        if wmax_w is not None:
            self.pv_wmax_w[i] = wmax_w
        if wgra_pct_per_s is not None:
            self.pv_wgra_pct_per_s[i] = wgra_pct_per_s
        block = (
            wmaxlim_pct,
            wmaxlim_ena,
            wmaxlim_rvrt_s,
            wmaxlim_rmp_s,
            wmaxlim_pct_rvrt,
            wmaxlim_ena_rvrt,
        )
        if any(v is not None for v in block):
            self.pv_wmaxlim_written_t[i] = self.t_s
            if wmaxlim_pct_rvrt is not None:
                self.pv_wmaxlim_pct_rvrt[i] = wmaxlim_pct_rvrt
                self.pv_wmaxlim_has_pct_rvrt[i] = True
            if wmaxlim_ena_rvrt is not None:
                self.pv_wmaxlim_ena_rvrt[i] = wmaxlim_ena_rvrt
            if wmaxlim_pct is not None:
                self.pv_wmaxlim_pct[i] = wmaxlim_pct
            if wmaxlim_ena is not None:
                self.pv_wmaxlim_ena[i] = wmaxlim_ena
            if wmaxlim_rvrt_s is not None:
                self.pv_wmaxlim_rvrt_s[i] = wmaxlim_rvrt_s
            if wmaxlim_rmp_s is not None:
                self.pv_wmaxlim_rmp_s[i] = wmaxlim_rmp_s
            self.pv_wmaxlim_armed[i] = self.pv_wmaxlim_rvrt_s[i] > 0
        if conn is not None or conn_rvrt_s is not None:
            self.pv_conn_written_t[i] = self.t_s
            if conn is not None:
                self.pv_conn[i] = conn
            if conn_rvrt_s is not None:
                self.pv_conn_rvrt_s[i] = conn_rvrt_s
        new_target = self._pv_target_w()[i]
        if new_target != old_target and self.pv_wmaxlim_rmp_s[i] > 0:
            # RmpTms: move from the present limit to the new one in RmpTms seconds.
            delta = abs(new_target - self.pv_limit_w[i])
            self.pv_rmp_rate_w[i] = delta / self.pv_wmaxlim_rmp_s[i]
            self.pv_rmp_active[i] = True
        elif new_target != old_target:
            self.pv_rmp_active[i] = False

    def set_battery_controls(
        self,
        i: int,
        *,
        stor_ctl_mod: int | None = None,
        out_w_rte_pct: float | None = None,
        in_w_rte_pct: float | None = None,
        rvrt_s: float | None = None,
        w_cha_max_w: float | None = None,
    ) -> None:
        """Apply a write to battery `i`'s model-124 controls; restarts its revert timer.

        The timed block is StorCtl_Mod, OutWRte, InWRte and InOutWRte_RvrtTms; WChaMax is a
        setting (no timer).
        """
        self.controls_version += 1
        if w_cha_max_w is not None:
            self.bat_w_cha_max_w[i] = w_cha_max_w
        block = (stor_ctl_mod, out_w_rte_pct, in_w_rte_pct, rvrt_s)
        if any(v is not None for v in block):
            self.bat_written_t[i] = self.t_s
            if stor_ctl_mod is not None:
                self.bat_stor_ctl_mod[i] = stor_ctl_mod
            if out_w_rte_pct is not None:
                self.bat_out_w_rte_pct[i] = out_w_rte_pct
            if in_w_rte_pct is not None:
                self.bat_in_w_rte_pct[i] = in_w_rte_pct
            if rvrt_s is not None:
                self.bat_rvrt_s[i] = rvrt_s

    def set_battery_soc(self, i: int, soc_pct: float) -> None:
        """Jump battery `i`'s state of charge (clamped to 0-100 %); the BMS limits follow."""
        if not math.isfinite(soc_pct):
            raise PhysicsConfigError(f"SoC must be a number, got {soc_pct}")
        self.bat_soc_pct[i] = min(max(soc_pct, 0.0), 100.0)
        self._update_bms_limits()

    def set_pv_trip(self, i: int, tripped: bool) -> None:
        """Trip (output 0 at once) or clear PV inverter `i`; cleared, it ramps up from 0."""
        self.pv_tripped[i] = tripped
        if tripped:
            self.pv_limit_w[i] = 0.0
            self.pv_ac_w[i] = 0.0

    def set_battery_trip(self, i: int, tripped: bool) -> None:
        """Trip (output 0 at once) or clear battery inverter `i`; cleared, it ramps from 0."""
        self.bat_tripped[i] = tripped
        if tripped:
            self.bat_cmd_w[i] = 0.0
            self.bat_ac_w[i] = 0.0

    def set_irradiance_override(self, w_m2: float | None) -> None:
        """Replace the irradiance profile with a constant (None = back to the profile)."""
        if w_m2 is not None and not (math.isfinite(w_m2) and w_m2 >= 0):
            raise PhysicsConfigError(f"irradiance must be >= 0 W/m², got {w_m2}")
        self.irradiance_override = None if w_m2 is None else float(w_m2)

    def set_load_override(self, w: float | None) -> None:
        """Replace the load profile with a constant (None = back to the profile)."""
        if w is not None and not (math.isfinite(w) and w >= 0):
            raise PhysicsConfigError(f"site load must be >= 0 W, got {w}")
        self.load_override = None if w is None else float(w)

    def set_grid_frequency(self, hz: float | None) -> None:
        """Hold the grid at `hz` exactly (None = back to nominal with noise)."""
        if hz is not None and not (math.isfinite(hz) and hz > 0):
            raise PhysicsConfigError(f"grid frequency must be > 0 Hz, got {hz}")
        self.grid_hz_override = None if hz is None else float(hz)

    def pv_wmaxlim_rvrt_rem_s(self) -> FloatArray:
        """Seconds left on each PV WMaxLimPct revert timer (0 = not armed)."""
        left = self.pv_wmaxlim_rvrt_s - (self.t_s - self.pv_wmaxlim_written_t)
        return np.where(self.pv_wmaxlim_armed, np.maximum(left, 0.0), 0.0)

    # --- time ---------------------------------------------------------------------------------

    def step(self, dt: float) -> None:
        """Advance the site by `dt` seconds (callers use one fixed dt)."""
        if dt <= 0:
            raise PhysicsConfigError(f"dt must be positive, got {dt}")
        self.steps += 1
        # Rounded to the nanosecond so that n fixed steps land on n x dt exactly enough for
        # revert timers (>= comparisons) not to drift by a step over long runs.
        self.t_s = round(self.t_s + dt, 9)
        self._apply_reverts()
        self._advance_noise(dt)
        self._update_grid()
        self._step_pv(dt)
        self._step_battery(dt)
        self._update_outputs(dt)

    def _apply_reverts(self) -> None:
        t = self.t_s
        expired = (self.pv_wmaxlim_rvrt_s > 0) & (
            t - self.pv_wmaxlim_written_t >= self.pv_wmaxlim_rvrt_s
        )
        revert = expired & self.pv_wmaxlim_armed
        if revert.any():
            self.pv_wmaxlim_armed[revert] = False
            self.pv_wmaxlim_ena[revert] = self.pv_wmaxlim_ena_rvrt[revert]
            self.pv_wmaxlim_pct = np.where(
                revert & self.pv_wmaxlim_has_pct_rvrt, self.pv_wmaxlim_pct_rvrt, self.pv_wmaxlim_pct
            )
            self.pv_rmp_active[revert] = False  # the revert uses the default ramp (WGra)
            self.controls_version += 1
        expired = (self.pv_conn_rvrt_s > 0) & (t - self.pv_conn_written_t >= self.pv_conn_rvrt_s)
        revert = expired & ~self.pv_conn
        if revert.any():
            self.pv_conn[revert] = True
            self.controls_version += 1
        expired = (self.bat_rvrt_s > 0) & (t - self.bat_written_t >= self.bat_rvrt_s)
        revert = expired & (self.bat_stor_ctl_mod != 0)
        if revert.any():
            self.bat_stor_ctl_mod[revert] = 0
            self.controls_version += 1

    def _advance_noise(self, dt: float) -> None:
        a = math.exp(-dt / _NOISE_TAU_S)
        draws = self.rng.standard_normal(self._noise.shape[0])
        self._noise = a * self._noise + math.sqrt(1.0 - a * a) * self._noise_sigma * draws

    def _update_grid(self) -> None:
        cfg = self.config
        n = self.n_pv
        if self.grid_hz_override is not None:
            self.grid_hz = self.grid_hz_override
        else:
            # Bounded at 3 sigma: the default 0.01 Hz of noise never reaches the 0.036 Hz droop
            # deadband, so only an injected frequency (or a noisier grid) makes inverters respond.
            bound = 3.0 * cfg.hz_noise
            self.grid_hz = cfg.nominal_hz + min(max(float(self._noise[n + 1]), -bound), bound)
        self.grid_v = cfg.nominal_v + self._noise[n + 2 : n + 5]

    def _droop_pu(self) -> float:
        """Frequency response in per unit of rating: + raise output, - lower it, 0 in band."""
        cfg = self.config
        if cfg.droop_pct <= 0:
            return 0.0
        deviation = self.grid_hz - cfg.nominal_hz
        beyond = abs(deviation) - cfg.droop_deadband_hz
        if beyond <= 0:
            return 0.0
        return -math.copysign(beyond / (cfg.nominal_hz * cfg.droop_pct / 100.0), deviation)

    def _pv_target_w(self) -> FloatArray:
        pct_limit = self.pv_wmax_w * self.pv_wmaxlim_pct / 100.0
        limited = np.where(self.pv_wmaxlim_ena, pct_limit, np.inf)
        running = self.pv_conn & ~self.pv_tripped
        return np.where(running, np.minimum(self.pv_wmax_w, limited), 0.0)

    def _step_pv(self, dt: float) -> None:
        cfg = self.config
        n = self.n_pv
        base = self.irradiance_override
        self.irradiance_w_m2 = cfg.irradiance.at(self.t_s) if base is None else base
        irr = self.irradiance_w_m2 * (1.0 + self._noise[:n])
        rating = cfg.pv.rating_w
        self.pv_available_w = np.clip(irr * rating / 1000.0, 0.0, rating)
        target = self._pv_target_w()
        running = self.pv_conn & ~self.pv_tripped
        # Disconnection and trips are immediate; the limit then ramps up from 0 on return.
        self.pv_limit_w = np.where(running, self.pv_limit_w, 0.0)
        wgra = self.pv_wgra_pct_per_s
        default_rate = np.where(wgra > 0, wgra / 100.0 * self.pv_wmax_w, np.inf)
        rate = np.where(self.pv_rmp_active, self.pv_rmp_rate_w, default_rate)
        # An unlimited rate (inf) must stay unlimited at dt = 0 too (inf * 0 would be NaN).
        max_step = np.full_like(rate, np.inf)
        np.multiply(rate, dt, out=max_step, where=np.isfinite(rate))
        delta = np.clip(target - self.pv_limit_w, -max_step, max_step)
        self.pv_limit_w = self.pv_limit_w + delta
        self.pv_rmp_active &= self.pv_limit_w != target
        limited = np.minimum(self.pv_available_w, self.pv_limit_w)
        # Frequency droop overrides the commanded limit (OpenDER p_funcs): down from the present
        # output on over-frequency, up towards what is available on under-frequency.
        responded = np.clip(limited + self._droop_pu() * rating, 0.0, self.pv_available_w)
        responded = np.where(running, responded, 0.0)
        self.pv_droop_w = responded - np.where(running, limited, 0.0)
        self.pv_ac_w = responded
        self.pv_energy_wh += self.pv_ac_w * dt / 3600.0

    def _update_bms_limits(self) -> None:
        bat = self.config.battery
        band = bat.taper_band_pct
        soc = self.bat_soc_pct
        self.bat_cha_lim_w = bat.max_charge_w * np.clip((bat.soc_max_pct - soc) / band, 0.0, 1.0)
        self.bat_dis_lim_w = bat.max_discharge_w * np.clip((soc - bat.soc_min_pct) / band, 0.0, 1.0)

    def _step_battery(self, dt: float) -> None:
        bat = self.config.battery
        if self.n_bat == 0:
            return
        one_way = np.sqrt(bat.efficiency)
        mod = self.bat_stor_ctl_mod
        discharge = self.bat_out_w_rte_pct / 100.0 * bat.max_discharge_w
        charge = self.bat_in_w_rte_pct / 100.0 * self.bat_w_cha_max_w
        command = np.where(mod & STOR_DISCHARGE, discharge, 0.0)
        command -= np.where(mod & STOR_CHARGE, charge, 0.0)
        self._update_bms_limits()
        # Energy left before the SoC bound, as the AC power that would use it up in this step.
        soc = self.bat_soc_pct
        e_dis_wh = np.maximum(soc - bat.soc_min_pct, 0.0) / 100.0 * bat.capacity_wh
        e_cha_wh = np.maximum(bat.soc_max_pct - soc, 0.0) / 100.0 * bat.capacity_wh
        dis_max = np.minimum.reduce(
            [self.bat_dis_lim_w, bat.rating_w, e_dis_wh * 3600.0 / dt * one_way]
        )
        cha_max = np.minimum.reduce(
            [
                self.bat_cha_lim_w,
                bat.rating_w,
                np.maximum(self.bat_w_cha_max_w, 0.0),
                e_cha_wh * 3600.0 / dt / one_way,
            ]
        )
        target = np.where(self.bat_tripped, 0.0, np.clip(command, -cha_max, dis_max))
        rate = bat.ramp_pct_per_s / 100.0 * bat.rating_w * dt
        cmd = self.bat_cmd_w + np.clip(target - self.bat_cmd_w, -rate, rate)
        # BMS limits are hard: they cut in at once, without a ramp.
        cmd = np.where(self.bat_tripped, 0.0, np.clip(cmd, -cha_max, dis_max))
        self.bat_cmd_w = cmd
        ac = np.where(
            self.bat_tripped, 0.0, np.clip(cmd + self._droop_pu() * bat.rating_w, -cha_max, dis_max)
        )
        self.bat_droop_w = ac - cmd
        self.bat_ac_w = ac
        dc_wh = np.where(ac > 0, ac / one_way, ac * one_way) * dt / 3600.0
        self.bat_soc_pct = np.clip(soc - dc_wh / bat.capacity_wh * 100.0, 0.0, 100.0)
        self.bat_discharged_wh += np.maximum(ac, 0.0) * dt / 3600.0
        self.bat_charged_wh += np.maximum(-ac, 0.0) * dt / 3600.0
        # The BMS limits stay those that bound this step's power, so that a client reading
        # W and WChaRteMax / WDisChaRteMax together never sees the power exceed the limit.

    def _update_outputs(self, dt: float) -> None:
        cfg = self.config
        n = self.n_pv
        noise = self._noise
        base = cfg.load.at(self.t_s) if self.load_override is None else self.load_override
        self.load_w = max(0.0, base * (1.0 + noise[n]))
        self.meter_w = self.load_w - float(self.pv_ac_w.sum()) - float(self.bat_ac_w.sum())
        self.meter_var = self.load_w * _LOAD_VAR_RATIO
        self.meter_import_wh += max(self.meter_w, 0.0) * dt / 3600.0
        self.meter_export_wh += max(-self.meter_w, 0.0) * dt / 3600.0

    # --- convenience --------------------------------------------------------------------------

    def snapshot(self) -> dict[str, np.ndarray | float | int]:
        """Copies of all state arrays and scalars (for determinism checks and debugging)."""
        out: dict[str, np.ndarray | float | int] = {}
        for key, value in vars(self).items():
            if key in ("config", "rng"):
                continue
            out[key] = value.copy() if isinstance(value, np.ndarray) else value
        return out

"""Short-horizon forecast of the site's PV, load and battery energy, from its own history. Pure.

Owns the forecasting method and its error measurement; plain numpy over plain arrays, with the
time passed in (no clock, no I/O). Input is `HistoryArrays`: a dense grid of 1-minute means
(`gateway.history` keeps it), NaN where nothing was measured. Output is a `Forecast`: one point
every `step_s` (5 min) out to `horizon_s` (4 h); the +15 min point is one of them.

Method (every step vectorised; one call costs a few ms on a Pi for 8 days of history):

* **PV** is forecast as *available* PV (what the arrays could produce; a future curtailment is not
  forecast). With the site's latitude/longitude, the shape is the clear-sky irradiance
  (`clear_sky_ghi`: NOAA solar position + Haurwitz clear-sky model, implemented here) and the
  quantity forecast is the ratio rho = PV / clear-sky irradiance (W per W/m^2, i.e. the array's
  size times its clear-sky index). rho at a horizon h is

      rho(h) = w(h) * rho_recent + (1 - w(h)) * rho_typical(t + h),   w(h) = exp(-(age + h) / tau)

  where rho_recent is the ratio over the last `recent_min` minutes that were not curtailed,
  `age` how old those minutes are, and rho_typical the ratio at the same time of day (+-
  `half_window_min`) over the previous `climatology_days` days. Curtailed minutes (`pv_limited`)
  are excluded everywhere: their output says nothing about what the sky allowed. The array's
  size cancels out of the ratio, so no PV model is needed. Without latitude/longitude, the shape
  is the typical PV of the previous days at the same time of day, and the recent ratio to it is
  persisted the same way (falling back to plain persistence without previous days).
* **Load** (= PCC + PV + battery, as the history stores it) is the typical load at the same
  time of day plus the recent departure from it, decaying with the horizon:

      load(h) = typical(t + h) + w_load(h) * (load_recent - typical(now))

  which is a blend of recent persistence and the previous days that also follows the daily
  ramp; plain persistence without previous days.
* **Battery energy** (Wh above the SoC floor) starts from the energy now and integrates the
  battery power expected over each step: the schedule the caller passes where it knows one (an
  event's fixed power), else the typical battery power at that time of day blended with the
  present power (`w_battery`). AC energy, no conversion losses; clipped to [0, usable capacity]
  step by step (a full battery stops charging, an empty one stops discharging).

`measure_forecast_error` replays a history and scores this forecaster against persistence and
clear-sky baselines at chosen horizons (used by the tests and by the HIL scenarios).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = [
    "MINUTE_NS",
    "Forecast",
    "ForecastConfig",
    "ForecastSkill",
    "HistoryArrays",
    "SiteGeo",
    "SkillRow",
    "clear_sky_ghi",
    "forecast",
    "measure_forecast_error",
    "solar_cos_zenith",
]

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]

MINUTE_NS = 60 * 1_000_000_000
_MINUTES_PER_DAY = 1440
# Clear-sky irradiance below this (W/m^2, sun below ~5 degrees) says too little about the sky:
# ratios near sunrise and sunset would divide noise by almost nothing.
_MIN_GHI_W_M2 = 50.0
# A recent-to-typical PV ratio beyond this is a measurement or climatology accident.
_MAX_PV_RATIO = 3.0


@dataclass(frozen=True, slots=True)
class SiteGeo:
    """Where the site is (degrees; north and east positive)."""

    latitude_deg: float
    longitude_deg: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.latitude_deg) and -90.0 <= self.latitude_deg <= 90.0):
            raise ValueError(f"latitude must be within -90..90 degrees, got {self.latitude_deg}")
        if not (math.isfinite(self.longitude_deg) and -180.0 <= self.longitude_deg <= 180.0):
            raise ValueError(
                f"longitude must be within -180..180 degrees, got {self.longitude_deg}"
            )


@dataclass(frozen=True, slots=True)
class HistoryArrays:
    """Dense 1-minute history, oldest first; element i is the mean over minute start_minute + i.

    Minutes are counted since the epoch (wall_ns // MINUTE_NS). NaN = not measured.
    pv_w: PV output; load_w: site load (PCC + PV + battery); battery_w: + discharge / - charge;
    battery_energy_wh: stored energy above the SoC floor; pv_limited: some PV was held at a
    generation cap during the minute (its output is then not what the sky allowed).
    """

    end_minute: int  # the minute just after the last element (exclusive end)
    pv_w: FloatArray
    load_w: FloatArray
    battery_w: FloatArray
    battery_energy_wh: FloatArray
    pv_limited: BoolArray

    def __post_init__(self) -> None:
        n = len(self.pv_w)
        lengths = {
            len(self.load_w),
            len(self.battery_w),
            len(self.battery_energy_wh),
            len(self.pv_limited),
        }
        if lengths != {n}:
            raise ValueError("HistoryArrays: the arrays differ in length")

    def __len__(self) -> int:
        return len(self.pv_w)

    @property
    def start_minute(self) -> int:
        return self.end_minute - len(self.pv_w)

    @classmethod
    def empty(cls, end_minute: int) -> HistoryArrays:
        nothing = np.zeros(0, dtype=np.float64)
        return cls(end_minute, nothing, nothing, nothing, nothing, np.zeros(0, dtype=np.bool_))

    def until(self, end_minute: int, *, days: float | None = None) -> HistoryArrays:
        """The part before `end_minute` (views, no copy), at most `days` long."""
        stop = min(max(end_minute - self.start_minute, 0), len(self))
        start = 0 if days is None else max(stop - round(days * _MINUTES_PER_DAY), 0)
        return HistoryArrays(
            self.start_minute + stop,
            self.pv_w[start:stop],
            self.load_w[start:stop],
            self.battery_w[start:stop],
            self.battery_energy_wh[start:stop],
            self.pv_limited[start:stop],
        )


@dataclass(frozen=True, slots=True)
class ForecastConfig:
    step_s: int = 300  # one point every 5 min...
    horizon_s: int = 4 * 3600  # ...out to 4 h
    recent_min: int = 15  # the "now" that persistence carries forward
    climatology_days: int = 7  # previous days that make the typical day
    half_window_min: int = 10  # +- minutes around the same time of day
    pv_tau_s: float = 5400.0  # how fast the recent clear-sky index gives way to the typical
    load_tau_s: float = 7200.0  # how fast the recent load anomaly decays
    battery_tau_s: float = 1800.0  # how fast the present battery power gives way to the typical
    prior_clear_sky_index: float = 0.8  # no history at all: this share of clear-sky output

    def __post_init__(self) -> None:
        if self.step_s <= 0 or self.horizon_s < self.step_s or self.horizon_s % self.step_s:
            raise ValueError(
                f"forecast: horizon_s ({self.horizon_s}) must be a positive multiple of step_s "
                f"({self.step_s})"
            )
        if self.recent_min < 1 or self.climatology_days < 1 or self.half_window_min < 0:
            raise ValueError("forecast: recent_min and climatology_days must be >= 1")
        if min(self.pv_tau_s, self.load_tau_s, self.battery_tau_s) <= 0:
            raise ValueError("forecast: the time constants must be > 0 s")

    @property
    def offsets_s(self) -> IntArray:
        return np.arange(self.step_s, self.horizon_s + 1, self.step_s, dtype=np.int64)


@dataclass(frozen=True, slots=True)
class Forecast:
    """Forecast points at `offsets_s` after `issued_wall_ns` (arrays of equal length).

    pv_w is *available* PV; battery_w is the battery power assumed over the step ending at each
    point (+ discharge); NaN = no basis to forecast. pv_available_w: the estimate for now,
    which `gateway.flexibility` uses for the headroom of curtailed inverters.
    """

    issued_wall_ns: int
    offsets_s: IntArray
    pv_w: FloatArray
    load_w: FloatArray
    battery_w: FloatArray
    battery_energy_wh: FloatArray
    pv_available_w: float
    pv_basis: str  # "clear-sky", "typical day", "persistence" or "none": what the PV rests on

    def at(self, offset_s: int) -> tuple[float, float, float]:
        """(pv_w, load_w, battery_energy_wh) at one of the offsets; KeyError if it is not one."""
        index = np.flatnonzero(self.offsets_s == offset_s)
        if index.size == 0:
            raise KeyError(f"forecast has no point at +{offset_s} s")
        i = int(index[0])
        return float(self.pv_w[i]), float(self.load_w[i]), float(self.battery_energy_wh[i])


# ---------------------------------------------------------------------------------------------
# Solar geometry.


def solar_cos_zenith(minutes: FloatArray, geo: SiteGeo) -> FloatArray:
    """Cosine of the solar zenith angle at `minutes` since the epoch (UTC, fractional).

    The NOAA general solar position formulas (fractional year, equation of time, declination,
    hour angle); accurate to a few tenths of a degree, which is far below what a forecast needs.
    """
    minutes = np.asarray(minutes, dtype=np.float64)
    if minutes.size == 0:
        return np.zeros(0, dtype=np.float64)
    day_number = np.floor(minutes / _MINUTES_PER_DAY)
    # Calendar arithmetic once per distinct day (a history spans a handful), not per minute.
    first_day = int(day_number.min())
    day_index = (day_number - first_day).astype(np.int64)
    dates = np.arange(first_day, int(day_number.max()) + 1).astype("datetime64[D]")
    years = dates.astype("datetime64[Y]")
    year_start = years.astype("datetime64[D]")
    day_of_year = (dates - year_start).astype(np.float64)[day_index]  # 0-based
    year_days = ((years + 1).astype("datetime64[D]") - year_start).astype(np.float64)[day_index]
    minute_of_day = minutes - day_number * _MINUTES_PER_DAY
    gamma = 2.0 * np.pi / year_days * (day_of_year + (minute_of_day / 60.0 - 12.0) / 24.0)
    cos1, sin1 = np.cos(gamma), np.sin(gamma)
    # Multiple angles from the single one: a third of the trigonometry on long histories.
    cos2, sin2 = 2.0 * cos1 * cos1 - 1.0, 2.0 * sin1 * cos1
    cos3, sin3 = cos1 * (4.0 * cos1 * cos1 - 3.0), sin1 * (3.0 - 4.0 * sin1 * sin1)
    equation_of_time_min = 229.18 * (
        0.000075 + 0.001868 * cos1 - 0.032077 * sin1 - 0.014615 * cos2 - 0.040849 * sin2
    )
    declination = (
        0.006918
        - 0.399912 * cos1
        + 0.070257 * sin1
        - 0.006758 * cos2
        + 0.000907 * sin2
        - 0.002697 * cos3
        + 0.00148 * sin3
    )
    true_solar_min = minute_of_day + equation_of_time_min + 4.0 * geo.longitude_deg
    hour_angle = np.radians(true_solar_min / 4.0 - 180.0)
    latitude = math.radians(geo.latitude_deg)
    result: FloatArray = math.sin(latitude) * np.sin(declination) + math.cos(latitude) * np.cos(
        declination
    ) * np.cos(hour_angle)
    return result


def clear_sky_ghi(minutes: FloatArray, geo: SiteGeo) -> FloatArray:
    """Clear-sky global horizontal irradiance (W/m^2), Haurwitz model; 0 while the sun is down."""
    cos_zenith = solar_cos_zenith(minutes, geo)
    up = cos_zenith > 0.0
    safe = np.where(up, cos_zenith, 1.0)
    result: FloatArray = np.where(up, 1098.0 * safe * np.exp(-0.059 / safe), 0.0)
    return result


# ---------------------------------------------------------------------------------------------
# Window sums over the history grid.


class _Windows:
    """O(1) sums of a masked series over any index range, from prefix sums (built once)."""

    def __init__(self, values: FloatArray, mask: BoolArray) -> None:
        taken = mask & np.isfinite(values)
        self.n = len(values)
        self._sum = np.concatenate(([0.0], np.cumsum(np.where(taken, values, 0.0))))
        self._count = np.concatenate(([0], np.cumsum(taken, dtype=np.int64)))

    def sums(self, start: IntArray, stop: IntArray) -> tuple[FloatArray, IntArray]:
        """(sum, count) over [start, stop) element-wise; ranges are clipped to the history."""
        a = np.clip(start, 0, self.n)
        b = np.clip(stop, 0, self.n)
        b = np.maximum(a, b)
        return self._sum[b] - self._sum[a], self._count[b] - self._count[a]


def _same_time_ranges(
    target_index: FloatArray, days: int, half_window: int
) -> tuple[IntArray, IntArray]:
    """Index ranges around the same time of day on each of the previous `days` days.

    Shape (targets, days). target_index is fractional (minutes after the history's start).
    """
    centre = np.floor(target_index)[:, None] - _MINUTES_PER_DAY * np.arange(1, days + 1)[None, :]
    centre_i = centre.astype(np.int64)
    return centre_i - half_window, centre_i + half_window + 1


def _typical(
    windows: _Windows, target_index: FloatArray, days: int, half_window: int
) -> tuple[FloatArray, IntArray]:
    """Sum and count of the same-time-of-day windows, summed over the previous days."""
    start, stop = _same_time_ranges(target_index, days, half_window)
    total, count = windows.sums(start, stop)
    return total.sum(axis=1), count.sum(axis=1)


def _ratio(numerator: FloatArray, denominator: FloatArray, floor: float) -> FloatArray:
    ok = denominator > floor
    result: FloatArray = np.where(ok, numerator / np.where(ok, denominator, 1.0), np.nan)
    return result


def _recent(
    windows: _Windows, valid: BoolArray, recent_min: int
) -> tuple[float, float, int, int] | None:
    """(sum, count, start, stop) over the `recent_min` minutes that end at the last valid one.

    None when no minute is valid.
    """
    last = np.flatnonzero(valid)
    if last.size == 0:
        return None
    stop = int(last[-1]) + 1
    start = max(stop - recent_min, 0)
    total, count = windows.sums(np.array([start]), np.array([stop]))
    return float(total[0]), float(count[0]), start, stop


def _first_finite(*candidates: FloatArray | float) -> FloatArray:
    """Element-wise: the first candidate that is finite (NaN if none is)."""
    result: FloatArray = np.full(np.shape(candidates[0]), np.nan)
    for candidate in candidates:
        result = np.where(np.isfinite(result), result, candidate)
    return result


# ---------------------------------------------------------------------------------------------
# The forecaster.


def forecast(
    history: HistoryArrays,
    now_wall_ns: int,
    geo: SiteGeo | None,
    *,
    pv_rating_w: float,
    battery_energy_wh: float,
    battery_capacity_wh: float,
    battery_w_now: float | None = None,
    battery_schedule_w: Sequence[float] | FloatArray | None = None,
    config: ForecastConfig = ForecastConfig(),
) -> Forecast:
    """Forecast PV, load and battery energy after `now_wall_ns` from `history`.

    pv_rating_w:          sum of the PV inverters' ratings (forecasts are clipped to it; with
                          no history at all, the clear-sky scale is rating / 1000 W/m^2).
    battery_energy_wh:    stored energy above the SoC floor now (NaN = unknown).
    battery_capacity_wh:  usable energy between the SoC floor and ceiling (0 = no battery).
    battery_w_now:        the battery power now (+ discharge); None = the last minute's mean.
    battery_schedule_w:   the battery power planned over each step (one value per point, NaN =
                          no plan there), e.g. from an event's fixed power; None = no plan.
    The history may extend past now (replays): only minutes before now are used.
    """
    offsets_s = config.offsets_s
    now_minute = now_wall_ns / MINUTE_NS
    history = history.until(math.floor(now_minute))
    start_minute = history.start_minute
    # Fractional history index of each target and of now.
    target_index = now_minute + offsets_s / 60.0 - start_minute
    now_index = now_minute - start_minute
    pv_cap_w = pv_rating_w if pv_rating_w > 0 else math.inf

    pv_w, pv_now_w, basis = _forecast_pv(
        history, target_index, now_index, geo, pv_cap_w, pv_rating_w, config
    )
    load_w = _forecast_load(history, target_index, now_index, offsets_s, config)
    battery_w = _forecast_battery_power(
        history, target_index, offsets_s, battery_w_now, battery_schedule_w, config
    )
    energy = _integrate_energy(
        battery_energy_wh, battery_capacity_wh, battery_w, offsets_s, config.step_s
    )
    return Forecast(
        issued_wall_ns=now_wall_ns,
        offsets_s=offsets_s,
        pv_w=pv_w,
        load_w=load_w,
        battery_w=battery_w,
        battery_energy_wh=energy,
        pv_available_w=pv_now_w,
        pv_basis=basis,
    )


def _forecast_pv(
    history: HistoryArrays,
    target_index: FloatArray,
    now_index: float,
    geo: SiteGeo | None,
    pv_cap_w: float,
    pv_rating_w: float,
    config: ForecastConfig,
) -> tuple[FloatArray, float, str]:
    """PV at the targets, PV available now, and what the forecast rests on."""
    n = len(history)
    days, half = config.climatology_days, config.half_window_min
    pv = history.pv_w
    usable = ~history.pv_limited & np.isfinite(pv)
    horizons_s = (target_index - now_index) * 60.0
    # Targets first, then "now" as horizon 0 (the estimate of what is available now).
    all_index = np.concatenate((target_index, [now_index]))
    all_horizon_s = np.concatenate((horizons_s, [0.0]))

    if geo is not None:
        minutes = history.start_minute + np.arange(n, dtype=np.float64) + 0.5
        shape_hist = clear_sky_ghi(minutes, geo)
        shape_all = clear_sky_ghi(history.start_minute + all_index, geo)
        valid = usable & (shape_hist >= _MIN_GHI_W_M2)
        pv_sums = _Windows(pv, valid)
        shape_sums = _Windows(shape_hist, valid)
        pv_typ, _ = _typical(pv_sums, all_index, days, half)
        shape_typ, _ = _typical(shape_sums, all_index, days, half)
        rho_typical = _ratio(pv_typ, shape_typ, _MIN_GHI_W_M2)
        whole_pv, _ = pv_sums.sums(np.array([n - days * _MINUTES_PER_DAY]), np.array([n]))
        whole_shape, _ = shape_sums.sums(np.array([n - days * _MINUTES_PER_DAY]), np.array([n]))
        rho_days = float(_ratio(whole_pv, whole_shape, _MIN_GHI_W_M2)[0])
        recent = _recent(pv_sums, valid, config.recent_min)
        rho_recent = math.nan
        age_s = 0.0
        if recent is not None:
            pv_sum, _, start, stop = recent
            shape_sum, _ = shape_sums.sums(np.array([start]), np.array([stop]))
            rho_recent = float(_ratio(np.array([pv_sum]), shape_sum, _MIN_GHI_W_M2)[0])
            age_s = max(now_index - stop, 0.0) * 60.0
        prior = config.prior_clear_sky_index * pv_rating_w / 1000.0 if pv_rating_w > 0 else np.nan
        base = _first_finite(rho_typical, rho_days, rho_recent, prior)
        if math.isfinite(rho_recent):
            weight = np.exp(-(age_s + all_horizon_s) / config.pv_tau_s)
            rho = weight * rho_recent + (1.0 - weight) * base
        else:
            rho = base
        pv_all = np.clip(rho * shape_all, 0.0, pv_cap_w)
        has_history = math.isfinite(rho_recent) or math.isfinite(rho_days)
        basis = "clear-sky" if has_history else ("clear-sky prior" if pv_rating_w > 0 else "none")
        pv_all = np.where(shape_all > 0.0, pv_all, 0.0)
        return pv_all[:-1].copy(), float(pv_all[-1]), basis

    # No geometry: the typical day of the previous days is the shape.
    pv_sums = _Windows(pv, usable)
    typ_sum, typ_count = _typical(pv_sums, all_index, days, half)
    typical_all = _ratio(typ_sum, typ_count.astype(np.float64), 0.0)
    recent = _recent(pv_sums, usable, config.recent_min)
    if recent is None:
        fallback = np.where(np.isfinite(typical_all), typical_all, np.nan)
        basis = "typical day" if np.isfinite(typical_all).any() else "none"
        pv_all = np.clip(fallback, 0.0, pv_cap_w)
        return pv_all[:-1].copy(), float(pv_all[-1]), basis
    pv_sum, count, start, stop = recent
    level = pv_sum / count
    age_s = max(now_index - stop, 0.0) * 60.0
    # The typical PV over the same recent minutes, minute by minute (vectorised over them).
    recent_index = np.arange(start, stop, dtype=np.float64)
    recent_typ_sum, recent_typ_count = _typical(pv_sums, recent_index, days, half)
    recent_typical = _ratio(recent_typ_sum, recent_typ_count.astype(np.float64), 0.0)
    recent_usable = usable[start:stop] & np.isfinite(recent_typical)
    typical_level = float(np.sum(np.where(recent_usable, recent_typical, 0.0)))
    measured_level = float(np.sum(np.where(recent_usable, pv[start:stop], 0.0)))
    floor_w = 0.05 * pv_rating_w if pv_rating_w > 0 else 1.0
    if np.isfinite(typical_all).any() and typical_level > floor_w * max(recent_usable.sum(), 1):
        ratio = min(measured_level / typical_level, _MAX_PV_RATIO)
        weight = np.exp(-(age_s + all_horizon_s) / config.pv_tau_s)
        scale = 1.0 + weight * (ratio - 1.0)
        pv_all = np.where(np.isfinite(typical_all), typical_all * scale, level)
        basis = "typical day"
    else:
        # Too little typical PV to scale against (night, no previous days): persist the level,
        # giving way to the typical day where one is known.
        weight = np.exp(-(age_s + all_horizon_s) / config.pv_tau_s)
        pv_all = np.where(
            np.isfinite(typical_all), weight * level + (1.0 - weight) * typical_all, level
        )
        basis = "persistence"
    pv_all = np.clip(pv_all, 0.0, pv_cap_w)
    return pv_all[:-1].copy(), float(pv_all[-1]), basis


def _forecast_load(
    history: HistoryArrays,
    target_index: FloatArray,
    now_index: float,
    offsets_s: IntArray,
    config: ForecastConfig,
) -> FloatArray:
    days, half = config.climatology_days, config.half_window_min
    load = history.load_w
    valid = np.isfinite(load)
    sums = _Windows(load, valid)
    typ_sum, typ_count = _typical(sums, target_index, days, half)
    typical = _ratio(typ_sum, typ_count.astype(np.float64), 0.0)
    recent = _recent(sums, valid, config.recent_min)
    if recent is None:
        result: FloatArray = np.clip(typical, 0.0, None)
        return result
    load_sum, count, start, stop = recent
    level = load_sum / count
    age_s = max(now_index - stop, 0.0) * 60.0
    centre = np.array([(start + stop) / 2.0])
    now_sum, now_count = _typical(sums, centre, days, half)
    typical_now = float(_ratio(now_sum, now_count.astype(np.float64), 0.0)[0])
    weight = np.exp(-(age_s + offsets_s) / config.load_tau_s)
    if math.isfinite(typical_now):
        blended = typical + weight * (level - typical_now)
    else:
        blended = weight * level + (1.0 - weight) * typical
    result = np.clip(np.where(np.isfinite(blended), blended, level), 0.0, None)
    return result


def _forecast_battery_power(
    history: HistoryArrays,
    target_index: FloatArray,
    offsets_s: IntArray,
    battery_w_now: float | None,
    schedule_w: Sequence[float] | FloatArray | None,
    config: ForecastConfig,
) -> FloatArray:
    days, half = config.climatology_days, config.half_window_min
    battery = history.battery_w
    valid = np.isfinite(battery)
    sums = _Windows(battery, valid)
    # The power over each step: the typical power at the step's middle.
    step_index = target_index - config.step_s / 120.0
    typ_sum, typ_count = _typical(sums, step_index, days, half)
    typical = _ratio(typ_sum, typ_count.astype(np.float64), 0.0)
    present = battery_w_now
    if present is None or not math.isfinite(present):
        present = float(battery[-1]) if len(battery) and valid[-1] else math.nan
    if math.isfinite(present):
        weight = np.exp(-(offsets_s - config.step_s / 2.0) / config.battery_tau_s)
        expected = np.where(
            np.isfinite(typical), weight * present + (1.0 - weight) * typical, present
        )
    else:
        expected = np.where(np.isfinite(typical), typical, 0.0)
    if schedule_w is not None:
        planned = np.asarray(schedule_w, dtype=np.float64)
        if planned.shape != expected.shape:
            raise ValueError(
                f"forecast: battery_schedule_w has {planned.size} values, expected one per point "
                f"({expected.size})"
            )
        expected = np.where(np.isfinite(planned), planned, expected)
    result: FloatArray = expected
    return result


def _integrate_energy(
    energy_wh: float, capacity_wh: float, battery_w: FloatArray, offsets_s: IntArray, step_s: int
) -> FloatArray:
    if capacity_wh <= 0:
        return np.zeros(len(offsets_s))
    if not math.isfinite(energy_wh):
        return np.full(len(offsets_s), np.nan)
    # Sequential on purpose: a clip at full or empty changes every later step. 48 steps.
    result = np.empty(len(offsets_s))
    level = min(max(energy_wh, 0.0), capacity_wh)
    delta = -battery_w * step_s / 3600.0
    for i in range(len(offsets_s)):
        level = min(max(level + float(delta[i]), 0.0), capacity_wh)
        result[i] = level
    return result


# ---------------------------------------------------------------------------------------------
# Measuring the forecast error.


@dataclass(frozen=True, slots=True)
class SkillRow:
    quantity: str  # "pv", "load", "battery_energy"
    horizon_s: int
    method: str  # "forecast", "persistence", "clear-sky", "typical day"
    mae: float  # mean absolute error, W (Wh for battery energy)
    normalized_mae: float  # mae / the quantity's scale (PV rating, mean load, battery capacity)
    count: int  # how many forecast-target pairs were scored


@dataclass(frozen=True, slots=True)
class ForecastSkill:
    rows: tuple[SkillRow, ...]
    issues: int  # how many forecasts were issued

    def mae(self, quantity: str, horizon_s: int, method: str) -> float:
        for row in self.rows:
            if (row.quantity, row.horizon_s, row.method) == (quantity, horizon_s, method):
                return row.mae
        raise KeyError(f"no score for {quantity} +{horizon_s} s by {method}")

    def table(self) -> str:
        header = f"{'quantity':<15}{'horizon':>9}  {'method':<12}{'MAE':>10}{'nMAE':>8}{'n':>7}"
        lines = [
            f"{row.quantity:<15}{row.horizon_s // 60:>7} m  {row.method:<12}"
            f"{row.mae:>10.1f}{row.normalized_mae * 100:>7.1f}%{row.count:>7}"
            for row in self.rows
        ]
        return "\n".join([header, *lines])


def measure_forecast_error(
    history: HistoryArrays,
    geo: SiteGeo | None,
    *,
    pv_rating_w: float,
    battery_capacity_wh: float = 0.0,
    horizons_s: Sequence[int] = (900, 4 * 3600),
    warmup_days: float = 2.0,
    issue_every_min: int = 15,
    config: ForecastConfig = ForecastConfig(),
) -> ForecastSkill:
    """Replay `history`: forecast every `issue_every_min` after `warmup_days`, score each horizon.

    Each forecast sees only the minutes before its issue time. Targets are the 1-minute means
    at issue + horizon (PV only where it was not curtailed, and in daylight: the sun above the
    horizon with `geo`, else PV produced or forecast).
    Baselines: persistence (the mean of the last `recent_min` minutes, held flat), clear-sky
    (with `geo`: clear-sky irradiance times the array's clear-sky scale, the 90th percentile of
    PV / irradiance over the previous days), and the typical day for load.
    """
    offsets = config.offsets_s
    for horizon in horizons_s:
        if horizon not in offsets:
            raise ValueError(
                f"horizon {horizon} s is not a forecast point ({config.step_s} s grid)"
            )
    n = len(history)
    start = history.start_minute
    first = start + math.ceil(warmup_days * _MINUTES_PER_DAY)
    last = history.end_minute - int(max(horizons_s)) // 60 - 1
    issue_minutes = np.arange(first, last + 1, issue_every_min, dtype=np.int64)
    if issue_minutes.size == 0:
        raise ValueError(
            f"history of {n} minutes is too short for {warmup_days} warm-up days and the horizons"
        )
    errors: dict[tuple[str, int, str], list[float]] = {}
    recent = config.recent_min
    minutes_all = start + np.arange(n, dtype=np.float64) + 0.5
    ghi_all = clear_sky_ghi(minutes_all, geo) if geo is not None else None

    def add(quantity: str, horizon: int, method: str, error: float) -> None:
        errors.setdefault((quantity, horizon, method), []).append(abs(error))

    for issue in issue_minutes:
        now_ns = int(issue) * MINUTE_NS
        index = int(issue) - start  # the first minute not seen
        past = history.until(int(issue), days=config.climatology_days + 1)
        energy_now = float(history.battery_energy_wh[index - 1])
        result = forecast(
            past,
            now_ns,
            geo,
            pv_rating_w=pv_rating_w,
            battery_energy_wh=energy_now,
            battery_capacity_wh=battery_capacity_wh,
            config=config,
        )
        window = slice(index - recent, index)
        pv_recent = history.pv_w[window]
        pv_persist = float(np.nanmean(pv_recent)) if np.isfinite(pv_recent).any() else math.nan
        load_recent = history.load_w[window]
        load_persist = (
            float(np.nanmean(load_recent)) if np.isfinite(load_recent).any() else math.nan
        )
        clear_scale = math.nan
        if ghi_all is not None:
            lo = max(index - config.climatology_days * _MINUTES_PER_DAY, 0)
            sky = ghi_all[lo:index]
            ok = (
                (sky >= _MIN_GHI_W_M2)
                & np.isfinite(history.pv_w[lo:index])
                & ~history.pv_limited[lo:index]
            )
            if ok.any():
                clear_scale = float(np.quantile(history.pv_w[lo:index][ok] / sky[ok], 0.9))
        for horizon in horizons_s:
            point = int(np.flatnonzero(offsets == horizon)[0])
            target = index + horizon // 60
            pv_actual = float(history.pv_w[target])
            if ghi_all is not None:
                daylight = bool(ghi_all[target] > 0.0)
            else:  # daylight as the data sees it: something was produced or forecast
                daylight = pv_actual > 0.0 or bool(result.pv_w[point] > 0.0)
            if math.isfinite(pv_actual) and not history.pv_limited[target] and daylight:
                add("pv", horizon, "forecast", result.pv_w[point] - pv_actual)
                if math.isfinite(pv_persist):
                    add("pv", horizon, "persistence", pv_persist - pv_actual)
                if ghi_all is not None and math.isfinite(clear_scale):
                    add("pv", horizon, "clear-sky", clear_scale * ghi_all[target] - pv_actual)
            load_actual = float(history.load_w[target])
            if math.isfinite(load_actual) and math.isfinite(result.load_w[point]):
                add("load", horizon, "forecast", result.load_w[point] - load_actual)
                if math.isfinite(load_persist):
                    add("load", horizon, "persistence", load_persist - load_actual)
                typical = _typical_value(history.load_w, target, config)
                if math.isfinite(typical):
                    add("load", horizon, "typical day", typical - load_actual)
            energy_actual = float(history.battery_energy_wh[target])
            if battery_capacity_wh > 0 and math.isfinite(energy_actual):
                add(
                    "battery_energy",
                    horizon,
                    "forecast",
                    result.battery_energy_wh[point] - energy_actual,
                )
                if math.isfinite(energy_now):
                    add("battery_energy", horizon, "persistence", energy_now - energy_actual)
    load_scale = float(np.nanmean(history.load_w)) if np.isfinite(history.load_w).any() else 1.0
    scales = {
        "pv": pv_rating_w if pv_rating_w > 0 else 1.0,
        "load": load_scale if load_scale > 0 else 1.0,
        "battery_energy": battery_capacity_wh if battery_capacity_wh > 0 else 1.0,
    }
    order = {"pv": 0, "load": 1, "battery_energy": 2}
    rows = [
        SkillRow(
            quantity,
            horizon,
            method,
            float(np.mean(values)),
            float(np.mean(values)) / scales[quantity],
            len(values),
        )
        for (quantity, horizon, method), values in sorted(
            errors.items(), key=lambda item: (order[item[0][0]], item[0][1], item[0][2])
        )
    ]
    return ForecastSkill(tuple(rows), int(issue_minutes.size))


def _typical_value(series: FloatArray, target: int, config: ForecastConfig) -> float:
    """The same-time-of-day mean of `series` over the previous days, seen from `target`."""
    values = []
    for day in range(1, config.climatology_days + 1):
        centre = target - day * _MINUTES_PER_DAY
        lo = max(centre - config.half_window_min, 0)
        hi = max(centre + config.half_window_min + 1, 0)
        chunk = series[lo:hi]
        chunk = chunk[np.isfinite(chunk)]
        if chunk.size:
            values.append(chunk)
    if not values:
        return math.nan
    return float(np.mean(np.concatenate(values)))

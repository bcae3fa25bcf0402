"""Several days of a simulated site at 1-minute resolution, from `hil.physics` (seeded).

Test equipment for the forecaster: a day-shaped irradiance with drifting clouds, a daily load
shape that varies day to day, and a battery on a fixed daily schedule (charge around midday,
discharge in the evening), stepped through the simulator's physics one minute at a time. The
sky uses its own, simpler solar geometry (Cooper's declination, no equation of time), so the
forecaster's clear-sky model is not checked against itself.

    history, geo = simulate_site_days(days=8, seed=7)
    skill = measure_forecast_error(history, geo, pv_rating_w=PV_RATING_W, ...)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from gateway.forecast import HistoryArrays, SiteGeo
from hil.physics import (
    STOR_CHARGE,
    STOR_DISCHARGE,
    BatteryParams,
    PhysicsConfig,
    Profile,
    PvParams,
    SitePhysics,
)

__all__ = ["SimulatedSite", "simulate_site_days"]

PV_RATING_W = 6000.0
BATTERY_CAPACITY_WH = 10_000.0
BATTERY_SOC_MIN_PCT = 10.0
BATTERY_SOC_MAX_PCT = 95.0
# 2024-06-03T00:00Z, in days since the epoch.
START_DAY = 19_877


@dataclass(frozen=True)
class SimulatedSite:
    history: HistoryArrays
    geo: SiteGeo
    pv_rating_w: float
    battery_capacity_wh: float  # usable, between the SoC floor and ceiling


def _sky_cos_zenith(minutes: np.ndarray, latitude: float, longitude: float) -> np.ndarray:
    day_of_year = (np.floor(minutes / 1440.0).astype(np.int64) - (START_DAY - 154)) % 365
    declination = np.radians(23.45) * np.sin(2.0 * np.pi * (284 + day_of_year) / 365.0)
    solar_hour = (minutes % 1440.0) / 60.0 + longitude / 15.0
    hour_angle = np.radians(15.0 * (solar_hour - 12.0))
    lat = math.radians(latitude)
    return np.sin(lat) * np.sin(declination) + np.cos(lat) * np.cos(declination) * np.cos(
        hour_angle
    )


def simulate_site_days(
    *,
    days: int = 8,
    seed: int = 7,
    latitude: float = 48.1,
    longitude: float = 11.6,
    sunny: tuple[float, float] = (0.75, 1.0),
    cloud_depth: float = 0.7,
) -> SimulatedSite:
    """`days` days from START_DAY; `sunny` bounds each day's clear-sky index before clouds."""
    rng = np.random.default_rng(seed)
    n = days * 1440 + 1
    minutes = START_DAY * 1440 + np.arange(n, dtype=np.float64)
    cos_zenith = _sky_cos_zenith(minutes, latitude, longitude)
    clear = np.where(cos_zenith > 0, 1000.0 * np.clip(cos_zenith, 0.0, None) ** 1.15, 0.0)
    day_index = np.arange(n) // 1440
    day_level = rng.uniform(*sunny, size=days + 1)[day_index]
    # Clouds: an AR(1) process with a 20-minute memory; only its positive half shades.
    decay = math.exp(-1.0 / 20.0)
    draws = rng.standard_normal(n) * math.sqrt(1.0 - decay * decay) * 0.6
    clouds = np.zeros(n)
    for i in range(1, n):
        clouds[i] = decay * clouds[i - 1] + draws[i]
    index = np.clip(day_level - cloud_depth * np.maximum(clouds, 0.0), 0.15, 1.05)
    t_s = np.arange(n) * 60.0
    irradiance = Profile.from_points(np.column_stack([t_s, clear * index]).tolist())
    local_h = ((minutes % 1440.0) / 60.0 + longitude / 15.0) % 24.0
    shape_h = [0, 5, 6.5, 8, 9.5, 12, 13, 17, 19, 21, 22.5, 24]
    shape_w = [350, 350, 900, 1500, 700, 600, 800, 700, 2200, 1900, 600, 350]
    day_scale = rng.uniform(0.85, 1.15, size=days + 1)[day_index]
    load = Profile.from_points(
        np.column_stack([t_s, np.interp(local_h, shape_h, shape_w) * day_scale]).tolist()
    )

    def one(value: float) -> np.ndarray:
        return np.array([value])

    config = PhysicsConfig(
        irradiance=irradiance,
        load=load,
        pv=PvParams(rating_w=one(PV_RATING_W), ramp_pct_per_s=one(100.0)),
        battery=BatteryParams(
            rating_w=one(5000.0),
            max_charge_w=one(5000.0),
            max_discharge_w=one(5000.0),
            capacity_wh=one(BATTERY_CAPACITY_WH),
            efficiency=one(0.9),
            soc_min_pct=one(BATTERY_SOC_MIN_PCT),
            soc_max_pct=one(BATTERY_SOC_MAX_PCT),
            initial_soc_pct=one(50.0),
            ramp_pct_per_s=one(10.0),
        ),
        irradiance_noise_pct=2.0,
        load_noise_pct=5.0,
    )
    physics = SitePhysics(config, seed=seed)
    pv = np.empty(n)
    site_load = np.empty(n)
    battery = np.empty(n)
    soc = np.empty(n)
    for i in range(n):
        if i:
            hour = local_h[i]
            mode = STOR_CHARGE if 10 <= hour < 14 else STOR_DISCHARGE if 18 <= hour < 21 else 0
            if mode != physics.bat_stor_ctl_mod[0]:
                physics.set_battery_controls(
                    0, stor_ctl_mod=mode, in_w_rte_pct=40.0, out_w_rte_pct=60.0
                )
            physics.step(60.0)
        pv[i] = physics.pv_ac_w.sum()
        battery[i] = physics.bat_ac_w.sum()
        # What the gateway computes: load = PCC + PV + battery.
        site_load[i] = physics.meter_w + pv[i] + battery[i]
        soc[i] = physics.bat_soc_pct[0]
    energy = (soc - BATTERY_SOC_MIN_PCT) / 100.0 * BATTERY_CAPACITY_WH
    history = HistoryArrays(
        end_minute=int(minutes[-1]) + 1,
        pv_w=pv,
        load_w=site_load,
        battery_w=battery,
        battery_energy_wh=energy,
        pv_limited=np.zeros(n, dtype=np.bool_),
    )
    usable = (BATTERY_SOC_MAX_PCT - BATTERY_SOC_MIN_PCT) / 100.0 * BATTERY_CAPACITY_WH
    return SimulatedSite(history, SiteGeo(latitude, longitude), PV_RATING_W, usable)

"""The forecaster: solar geometry, each quantity's method, bounds, and its measured error."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gateway.forecast import (
    MINUTE_NS,
    ForecastConfig,
    HistoryArrays,
    SiteGeo,
    clear_sky_ghi,
    forecast,
    measure_forecast_error,
    solar_cos_zenith,
)
from tests.gateway.simulated_days import SimulatedSite, simulate_site_days

DAY = 1440
# 2024-06-20T00:00Z in minutes since the epoch (the June solstice).
SOLSTICE = 19_894 * DAY
# 2024-03-20T00:00Z (the March equinox).
EQUINOX = 19_802 * DAY
MUNICH = SiteGeo(48.14, 11.58)


def elevation_deg(minutes: np.ndarray, geo: SiteGeo) -> np.ndarray:
    return np.degrees(np.arcsin(np.clip(solar_cos_zenith(minutes, geo), -1.0, 1.0)))


def history_of(
    pv: np.ndarray,
    load: np.ndarray | None = None,
    *,
    end_minute: int,
    battery: np.ndarray | None = None,
    limited: np.ndarray | None = None,
) -> HistoryArrays:
    n = len(pv)
    return HistoryArrays(
        end_minute=end_minute,
        pv_w=np.asarray(pv, dtype=np.float64),
        load_w=np.zeros(n) if load is None else np.asarray(load, dtype=np.float64),
        battery_w=np.zeros(n) if battery is None else np.asarray(battery, dtype=np.float64),
        battery_energy_wh=np.zeros(n),
        pv_limited=np.zeros(n, dtype=np.bool_) if limited is None else limited,
    )


# -- solar geometry -------------------------------------------------------------------------------


def test_noon_elevation_matches_declination() -> None:
    day = SOLSTICE + np.arange(DAY, dtype=np.float64)
    greenwich = SiteGeo(51.4769, 0.0)
    # At the solstice the noon sun stands 90 - latitude + 23.44 degrees high.
    assert elevation_deg(day, greenwich).max() == pytest.approx(90 - 51.4769 + 23.44, abs=0.2)
    equator = SiteGeo(0.0, 0.0)
    assert elevation_deg(EQUINOX + np.arange(DAY, dtype=np.float64), equator).max() > 89.0
    # Solar noon at Greenwich in late June is ~12:02 UTC (equation of time ~ -1.7 min)...
    noon = int(np.argmax(elevation_deg(day, greenwich)))
    assert 12 * 60 - 1 <= noon <= 12 * 60 + 4
    # ...and 46 min earlier in Munich, 11.58 degrees east.
    noon_munich = int(np.argmax(elevation_deg(day, MUNICH)))
    assert noon - noon_munich == pytest.approx(4 * 11.58, abs=1.5)
    assert elevation_deg(np.array([SOLSTICE + 0.0]), greenwich)[0] < -10  # midnight
    southern = SiteGeo(-33.9, 18.4)  # Cape Town: winter in June
    assert elevation_deg(day, southern).max() == pytest.approx(90 - 33.9 - 23.44, abs=0.3)


def test_clear_sky_irradiance() -> None:
    day = SOLSTICE + np.arange(DAY, dtype=np.float64)
    ghi = clear_sky_ghi(day, MUNICH)
    assert ghi.min() == 0.0
    assert 850 < ghi.max() < 1000
    assert (ghi[elevation_deg(day, MUNICH) <= 0] == 0).all()
    # More sun, more irradiance.
    order = np.argsort(solar_cos_zenith(day, MUNICH))
    assert (np.diff(ghi[order]) >= -1e-9).all()
    assert clear_sky_ghi(np.zeros(0), MUNICH).shape == (0,)


def test_bad_geo_and_config() -> None:
    with pytest.raises(ValueError, match="latitude"):
        SiteGeo(91.0, 0.0)
    with pytest.raises(ValueError, match="longitude"):
        SiteGeo(0.0, math.nan)
    with pytest.raises(ValueError, match="multiple"):
        ForecastConfig(step_s=300, horizon_s=1000)
    with pytest.raises(ValueError, match="differ in length"):
        HistoryArrays(10, np.zeros(3), np.zeros(2), np.zeros(3), np.zeros(3), np.zeros(3, bool))


# -- the method, on histories whose answer is known ------------------------------------------------


def test_points_every_five_minutes_to_four_hours_including_fifteen() -> None:
    result = forecast(
        HistoryArrays.empty(SOLSTICE),
        SOLSTICE * MINUTE_NS,
        None,
        pv_rating_w=0.0,
        battery_energy_wh=math.nan,
        battery_capacity_wh=0.0,
    )
    assert result.offsets_s[0] == 300
    assert result.offsets_s[-1] == 4 * 3600
    assert len(result.offsets_s) == 48
    assert 900 in result.offsets_s
    np.testing.assert_equal(
        result.at(900), (result.pv_w[2], result.load_w[2], result.battery_energy_wh[2])
    )
    with pytest.raises(KeyError):
        result.at(901)


def test_no_history_at_all() -> None:
    now = (SOLSTICE + 10 * 60) * MINUTE_NS  # 10:00 UTC
    blind = forecast(
        HistoryArrays.empty(SOLSTICE + 600),
        now,
        None,
        pv_rating_w=5000.0,
        battery_energy_wh=2000.0,
        battery_capacity_wh=8000.0,
    )
    assert np.isnan(blind.pv_w).all()
    assert np.isnan(blind.load_w).all()
    assert blind.pv_basis == "none"
    assert (blind.battery_energy_wh == 2000.0).all()  # no power known: held
    # With the site's position the clear-sky shape gives a prior: 80 % of clear-sky output.
    prior = forecast(
        HistoryArrays.empty(SOLSTICE + 600),
        now,
        MUNICH,
        pv_rating_w=5000.0,
        battery_energy_wh=2000.0,
        battery_capacity_wh=8000.0,
    )
    assert prior.pv_basis == "clear-sky prior"
    expected = 0.8 * 5.0 * clear_sky_ghi(now / MINUTE_NS + prior.offsets_s / 60.0, MUNICH)
    np.testing.assert_allclose(prior.pv_w, np.minimum(expected, 5000.0), rtol=1e-9)


def repeating_days(days: int, geo: SiteGeo | None, rho: float = 4.0) -> HistoryArrays:
    """PV = rho x clear-sky every day; load the same every day (a ramp up through the day)."""
    n = days * DAY
    minutes = SOLSTICE + np.arange(n, dtype=np.float64)
    shape = clear_sky_ghi(minutes + 0.5, geo if geo is not None else MUNICH)
    minute_of_day = np.arange(n) % DAY
    load = 300.0 + minute_of_day  # 300 W at midnight, up 1 W per minute
    return history_of(rho * shape, load, end_minute=SOLSTICE + n)


@pytest.mark.parametrize("geo", [MUNICH, None], ids=["clear-sky", "typical-day"])
def test_repeating_days_are_forecast_exactly(geo: SiteGeo | None) -> None:
    history = repeating_days(8, geo)
    now_minute = SOLSTICE + 7 * DAY + 9 * 60  # day 7, 09:00 UTC
    result = forecast(
        history,
        now_minute * MINUTE_NS,
        geo,
        pv_rating_w=5000.0,
        battery_energy_wh=0.0,
        battery_capacity_wh=0.0,
    )
    targets = now_minute + result.offsets_s / 60.0
    expected_pv = 4.0 * clear_sky_ghi(targets, MUNICH)
    # Same-time windows average +-10 minutes of a smooth curve: a small bias, no more.
    np.testing.assert_allclose(result.pv_w, expected_pv, rtol=0.02, atol=5.0)
    expected_load = 300.0 + (targets % DAY)
    np.testing.assert_allclose(result.load_w, expected_load, atol=1.0)
    assert result.pv_available_w == pytest.approx(
        4.0 * float(clear_sky_ghi(np.array([now_minute + 0.0]), MUNICH)[0]), rel=0.02
    )


def test_a_cloudy_morning_persists_then_gives_way_to_the_typical_day() -> None:
    history = repeating_days(8, MUNICH)
    now_minute = SOLSTICE + 7 * DAY + 9 * 60
    # The last hour produced half of what the typical day did.
    recent = history.until(now_minute)
    recent.pv_w[-60:] *= 0.5
    result = forecast(
        recent,
        now_minute * MINUTE_NS,
        MUNICH,
        pv_rating_w=5000.0,
        battery_energy_wh=0.0,
        battery_capacity_wh=0.0,
    )
    typical = 4.0 * clear_sky_ghi(now_minute + result.offsets_s / 60.0, MUNICH)
    share = result.pv_w / typical
    assert share[2] == pytest.approx(0.5 + 0.5 * (1 - math.exp(-900 / 5400)), abs=0.03)
    assert share[-1] == pytest.approx(0.5 + 0.5 * (1 - math.exp(-14400 / 5400)), abs=0.03)
    assert (np.diff(share) > 0).all()  # monotonically back towards the typical day


def test_curtailed_minutes_do_not_teach_the_forecast() -> None:
    history = repeating_days(8, MUNICH)
    now_minute = SOLSTICE + 7 * DAY + 12 * 60
    past = history.until(now_minute)
    clean = forecast(
        past, now_minute * MINUTE_NS, MUNICH, pv_rating_w=5000, battery_energy_wh=0,
        battery_capacity_wh=0,
    )  # fmt: skip
    # The last 40 minutes were held at 500 W by an export limit, and flagged as such; so was
    # the same hour every previous day.
    curtailed = HistoryArrays(
        past.end_minute,
        past.pv_w.copy(),
        past.load_w,
        past.battery_w,
        past.battery_energy_wh,
        past.pv_limited.copy(),
    )
    for day in range(8):
        hour = slice(len(past) - 40 - day * DAY, len(past) - day * DAY)
        curtailed.pv_w[hour] = 500.0
        curtailed.pv_limited[hour] = True
    held = forecast(
        curtailed, now_minute * MINUTE_NS, MUNICH, pv_rating_w=5000, battery_energy_wh=0,
        battery_capacity_wh=0,
    )  # fmt: skip
    # What the sky allows now is still known (from before the cap), with a little decay.
    assert held.pv_available_w == pytest.approx(clean.pv_available_w, rel=0.03)
    np.testing.assert_allclose(held.pv_w, clean.pv_w, rtol=0.03)
    # Unflagged, the same output would read as a dark sky.
    curtailed.pv_limited[:] = False
    fooled = forecast(
        curtailed, now_minute * MINUTE_NS, MUNICH, pv_rating_w=5000, battery_energy_wh=0,
        battery_capacity_wh=0,
    )  # fmt: skip
    assert fooled.pv_available_w < 0.5 * clean.pv_available_w


def test_pv_is_zero_at_night_and_within_the_rating() -> None:
    history = repeating_days(8, MUNICH, rho=20.0)  # an array twice its inverters' rating
    now_minute = SOLSTICE + 7 * DAY + 17 * 60
    result = forecast(
        history.until(now_minute),
        now_minute * MINUTE_NS,
        MUNICH,
        pv_rating_w=5000.0,
        battery_energy_wh=0.0,
        battery_capacity_wh=0.0,
    )
    assert result.pv_w.max() <= 5000.0
    night = clear_sky_ghi(now_minute + result.offsets_s / 60.0, MUNICH) == 0.0
    assert night.any()
    assert (result.pv_w[night] == 0.0).all()


def test_load_without_previous_days_is_persistence() -> None:
    n = 120
    load = np.full(n, 800.0)
    load[-15:] = 1200.0
    history = history_of(np.zeros(n), load, end_minute=SOLSTICE + n)
    result = forecast(
        history,
        (SOLSTICE + n) * MINUTE_NS,
        None,
        pv_rating_w=0.0,
        battery_energy_wh=0.0,
        battery_capacity_wh=0.0,
    )
    np.testing.assert_allclose(result.load_w, 1200.0)


def test_battery_energy_integrates_the_schedule_and_saturates() -> None:
    history = HistoryArrays.empty(SOLSTICE)
    config = ForecastConfig()
    points = len(config.offsets_s)
    charging = np.full(points, -2400.0)  # 200 Wh per 5-minute step
    result = forecast(
        history,
        SOLSTICE * MINUTE_NS,
        None,
        pv_rating_w=0.0,
        battery_energy_wh=500.0,
        battery_capacity_wh=1000.0,
        battery_schedule_w=charging,
    )
    np.testing.assert_allclose(result.battery_energy_wh[:3], [700.0, 900.0, 1000.0])
    assert (result.battery_energy_wh[2:] == 1000.0).all()
    # Full, then discharging: the clip does not remember the charge it could not take.
    schedule = np.full(points, np.nan)
    schedule[:6] = -2400.0
    schedule[6:] = 1200.0
    result = forecast(
        history,
        SOLSTICE * MINUTE_NS,
        None,
        pv_rating_w=0.0,
        battery_energy_wh=500.0,
        battery_capacity_wh=1000.0,
        battery_w_now=0.0,
        battery_schedule_w=schedule,
    )
    assert result.battery_energy_wh[5] == 1000.0
    assert result.battery_energy_wh[6] == pytest.approx(900.0)
    assert result.battery_energy_wh[-1] == 0.0
    with pytest.raises(ValueError, match="one per point"):
        forecast(
            history,
            SOLSTICE * MINUTE_NS,
            None,
            pv_rating_w=0.0,
            battery_energy_wh=500.0,
            battery_capacity_wh=1000.0,
            battery_schedule_w=[0.0],
        )


def test_battery_power_follows_the_typical_day() -> None:
    n = 3 * DAY
    battery = np.zeros(n)
    minute_of_day = np.arange(n) % DAY
    battery[(minute_of_day >= 18 * 60) & (minute_of_day < 20 * 60)] = 3000.0  # evening discharge
    history = history_of(np.zeros(n), end_minute=SOLSTICE + n, battery=battery)
    now_minute = SOLSTICE + n + 17 * 60
    result = forecast(
        history,
        now_minute * MINUTE_NS,
        None,
        pv_rating_w=0.0,
        battery_energy_wh=8000.0,
        battery_capacity_wh=9000.0,
        battery_w_now=0.0,
        config=ForecastConfig(battery_tau_s=60.0),  # the present power forgotten at once
    )
    # 2 h at 3 kW from 18:00: nothing out by 17:30, 6 kWh out by 21:00 (the +-10 min
    # same-time windows blur the edges of the schedule, not the energy).
    assert result.at(1800)[2] == pytest.approx(8000.0, abs=1.0)
    assert result.at(2 * 3600)[2] == pytest.approx(5000.0, abs=250.0)
    assert result.at(4 * 3600)[2] == pytest.approx(2000.0, abs=1.0)


@settings(max_examples=300, deadline=None)
@given(
    pv=hnp.arrays(
        np.float64,
        st.integers(0, 3 * DAY),
        elements=st.one_of(st.floats(0, 8000), st.just(math.nan)),
    ),
    start_hour=st.integers(0, 23),
    use_geo=st.booleans(),
    energy=st.floats(0, 20_000),
    capacity=st.floats(0, 10_000),
    battery_now=st.floats(-5000, 5000),
)
def test_forecast_stays_within_physical_bounds(
    pv: np.ndarray,
    start_hour: int,
    use_geo: bool,
    energy: float,
    capacity: float,
    battery_now: float,
) -> None:
    n = len(pv)
    end = SOLSTICE + 3 * DAY + start_hour * 60
    load = np.where(np.isnan(pv), np.nan, pv / 2.0)
    history = history_of(pv, load, end_minute=end, battery=np.full(n, battery_now))
    result = forecast(
        history,
        end * MINUTE_NS,
        MUNICH if use_geo else None,
        pv_rating_w=6000.0,
        battery_energy_wh=energy,
        battery_capacity_wh=capacity,
        battery_w_now=battery_now,
    )
    finite = np.isfinite(result.pv_w)
    assert ((result.pv_w[finite] >= 0.0) & (result.pv_w[finite] <= 6000.0)).all()
    load_w = result.load_w[np.isfinite(result.load_w)]
    assert (load_w >= 0.0).all()
    stored = result.battery_energy_wh
    assert ((stored >= 0.0) & (stored <= max(capacity, 0.0))).all()


# -- measured error ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def simulated() -> SimulatedSite:
    return simulate_site_days(days=8, seed=7)


def test_forecast_error_on_simulated_days(simulated: SimulatedSite) -> None:
    """PV, load and battery energy error at +15 min and +4 h over six simulated days.

    The figures are printed (pytest -s); the one assertion is the robust one: at +4 h the
    forecaster beats naive persistence for PV, with and without the site's position.
    """
    site = simulated
    for geo in (site.geo, None):
        started = time.perf_counter()
        skill = measure_forecast_error(
            site.history,
            geo,
            pv_rating_w=site.pv_rating_w,
            battery_capacity_wh=site.battery_capacity_wh,
        )
        elapsed = time.perf_counter() - started
        label = "with latitude/longitude" if geo is not None else "without latitude/longitude"
        print(
            f"\nforecast error, {label}: {skill.issues} forecasts over 6 days "
            f"({elapsed / skill.issues * 1e3:.2f} ms per forecast incl. scoring)\n"
            f"{skill.table()}"
        )
        assert skill.mae("pv", 4 * 3600, "forecast") < skill.mae("pv", 4 * 3600, "persistence")


def test_forecast_cost_figure(simulated: SimulatedSite) -> None:
    """Time one forecast over a full 8-day history (printed; a Pi 4 is ~4x slower)."""
    site = simulated
    now = site.history.end_minute * MINUTE_NS
    for geo in (site.geo, None):
        runs = 50
        started = time.perf_counter()
        for _ in range(runs):
            forecast(
                site.history,
                now,
                geo,
                pv_rating_w=site.pv_rating_w,
                battery_energy_wh=1000.0,
                battery_capacity_wh=site.battery_capacity_wh,
            )
        per_call_ms = (time.perf_counter() - started) / runs * 1e3
        print(f"\nforecast over {len(site.history)} minutes, geo={geo}: {per_call_ms:.2f} ms")

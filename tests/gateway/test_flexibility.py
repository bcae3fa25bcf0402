"""Headroom now: PV curtailment and its estimate, battery limits, site limits, the wire record."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dergw.v1 import ns_from_timestamp, pb
from drivers.contract import Control, DeviceKind
from gateway.flexibility import (
    FlexDevice,
    SiteLimits,
    compute_flexibility,
    is_pv_limited,
    site_totals,
)
from gateway.flexibility_wire import flexibility_payload
from gateway.forecast import MINUTE_NS, HistoryArrays, forecast
from gateway.safety import DeviceState

PV = DeviceKind.PV
BATTERY = DeviceKind.BATTERY


def pv(device_id: str = "pv-1", *, rating: float = 5000.0, **kwargs: object) -> FlexDevice:
    return FlexDevice(device_id, PV, rating, **kwargs)  # type: ignore[arg-type]


def battery(
    device_id: str = "bat-1",
    *,
    power: float | None = 0.0,
    soc: float | None = 50.0,
    **kwargs: object,
) -> FlexDevice:
    fields: dict[str, object] = {
        "max_charge_w": 3000.0,
        "max_discharge_w": 4000.0,
        "capacity_wh": 10_000.0,
        **kwargs,
    }
    return FlexDevice(
        device_id,
        BATTERY,
        5000.0,
        measured_w=power,
        soc_pct=soc,
        **fields,  # type: ignore[arg-type]
    )


def headroom(
    devices: list[FlexDevice],
    limits: SiteLimits | None = None,
    *,
    pv_available_w: float | None = None,
) -> tuple[float, float]:
    result = compute_flexibility(devices, limits or SiteLimits(), pv_available_w=pv_available_w)
    return result.up_w, result.down_w


# -- PV ------------------------------------------------------------------------------------------


def test_uncapped_pv_can_only_go_down() -> None:
    assert headroom([pv(measured_w=3000.0)]) == (0.0, 3000.0)
    # A cap that does not bind (the sky gives less) is no headroom either.
    assert headroom([pv(measured_w=2000.0, cap_w=4000.0)]) == (0.0, 2000.0)


def test_capped_pv_headroom_from_an_uncapped_sibling() -> None:
    # pv-2 (10 kW) makes 6 kW freely: 60 % of rating is what the sky allows now.
    devices = [
        pv("pv-1", measured_w=1000.0, cap_w=1000.0),
        pv("pv-2", rating=10_000.0, measured_w=6000.0),
    ]
    result = compute_flexibility(devices, SiteLimits(), pv_available_w=100.0)
    assert result.up_w == pytest.approx(0.6 * 5000.0 - 1000.0)
    assert result.down_w == pytest.approx(7000.0)
    assert "uncapped inverters now" in result.devices[0].basis


def test_capped_pv_headroom_from_the_forecast_estimate() -> None:
    devices = [pv("pv-1", measured_w=1000.0, cap_w=1000.0), pv("pv-2", measured_w=0.0, cap_w=0.0)]
    # The site could make 8 kW of its 10 kW rating: 4 kW per inverter.
    assert headroom(devices, pv_available_w=8000.0) == (3000.0 + 4000.0, 1000.0)
    # Never more than the inverter's rating.
    assert headroom(devices, pv_available_w=50_000.0) == (4000.0 + 5000.0, 1000.0)
    # No estimate: claim nothing rather than something that is not there.
    assert headroom(devices) == (0.0, 1000.0)
    assert headroom(devices, pv_available_w=math.nan) == (0.0, 1000.0)


def test_limited_means_at_the_cap_within_tolerance() -> None:
    assert is_pv_limited(pv(measured_w=990.0, cap_w=1000.0))  # 2 % of 5 kW = 100 W tolerance
    assert not is_pv_limited(pv(measured_w=800.0, cap_w=1000.0))
    assert not is_pv_limited(pv(measured_w=1000.0))
    assert not is_pv_limited(pv(measured_w=None, cap_w=1000.0))
    assert not is_pv_limited(battery(power=0.0, cap_w=0.0))


def test_pv_that_cannot_be_commanded_offers_nothing() -> None:
    assert headroom([pv(measured_w=3000.0, available=False)]) == (0.0, 0.0)
    assert headroom([pv(measured_w=None)]) == (0.0, 0.0)
    assert headroom([pv(measured_w=3000.0, can_curtail=False)]) == (0.0, 0.0)


# -- batteries -----------------------------------------------------------------------------------


def test_battery_headroom_from_where_it_is() -> None:
    assert headroom([battery(power=0.0)]) == (4000.0, 3000.0)
    assert headroom([battery(power=1000.0)]) == (3000.0, 4000.0)  # discharging 1 kW
    assert headroom([battery(power=-2000.0)]) == (6000.0, 1000.0)  # charging 2 kW
    # Measurement missing: the commanded power stands in.
    assert headroom([battery(power=None, setpoint_w=1000.0)]) == (3000.0, 4000.0)


def test_battery_bms_limits_and_soc_band() -> None:
    assert headroom([battery(bms_discharge_max_w=1500.0, bms_charge_max_w=500.0)]) == (
        1500.0,
        500.0,
    )
    assert headroom([battery(power=0.0, soc=10.0)], SiteLimits(soc_min_pct=10.0)) == (0.0, 3000.0)
    # Full: it can stop charging and discharge, not charge more.
    assert headroom([battery(power=-1000.0, soc=95.0)], SiteLimits(soc_max_pct=95.0)) == (
        5000.0,
        0.0,
    )
    # Nameplate discharge unknown: the rating stands in.
    assert headroom([battery(max_discharge_w=0.0)]) == (5000.0, 3000.0)


def test_battery_with_unknown_soc_offers_only_to_stop() -> None:
    assert headroom([battery(power=1000.0, soc=None)]) == (0.0, 1000.0)
    assert headroom([battery(power=-500.0, soc=None)]) == (500.0, 0.0)
    # The BMS's own limits still say what it can do.
    assert headroom([battery(power=0.0, soc=None, bms_discharge_max_w=2000.0)]) == (2000.0, 0.0)


def test_battery_sustain_limits_to_the_energy() -> None:
    # 10 % above a 10 % floor of 10 kWh = 1 kWh, to be held for 30 min.
    limits = SiteLimits(soc_min_pct=10.0, soc_max_pct=90.0, sustain_s=1800.0)
    up, down = headroom([battery(soc=20.0)], limits)
    assert up == pytest.approx(2000.0)  # 1 kWh over 30 min
    assert down == pytest.approx(3000.0)  # 7 kWh of room: the charge rating binds


def test_battery_not_dispatchable_offers_nothing() -> None:
    assert headroom([battery(can_dispatch=False)]) == (0.0, 0.0)
    assert headroom([battery(available=False)]) == (0.0, 0.0)


# -- site limits ---------------------------------------------------------------------------------


def test_contract_export_limit_bounds_up() -> None:
    devices = [battery(power=0.0)]  # 4 kW up
    # Exporting 1 kW with a 2 kW export limit: 1 kW more.
    result = compute_flexibility(devices, SiteLimits(pcc_w=-1000.0, export_limit_w=2000.0))
    assert result.up_w == pytest.approx(1000.0)
    assert result.bound_by == ("contract export limit",)
    # Importing 1 kW: 3 kW more.
    assert headroom(devices, SiteLimits(pcc_w=1000.0, export_limit_w=2000.0))[0] == 3000.0
    # Already beyond the limit: nothing, never negative.
    assert headroom(devices, SiteLimits(pcc_w=-3000.0, export_limit_w=2000.0))[0] == 0.0
    # No meter: assume no load, every generated W exported.
    no_meter = [pv(measured_w=1500.0), battery(power=0.0)]
    assert headroom(no_meter, SiteLimits(export_limit_w=2000.0))[0] == 500.0


def test_contract_import_limit_bounds_down() -> None:
    devices = [pv(measured_w=3000.0)]
    assert headroom(devices, SiteLimits(pcc_w=500.0, import_limit_w=2000.0))[1] == 1500.0
    # Without a meter the load is unknown: no more import can be promised.
    assert headroom(devices, SiteLimits(import_limit_w=2000.0))[1] == 0.0


def test_site_limits_are_checked() -> None:
    with pytest.raises(ValueError, match="soc_min_pct"):
        SiteLimits(soc_min_pct=60.0, soc_max_pct=40.0)
    with pytest.raises(ValueError, match="sustain_s"):
        SiteLimits(sustain_s=-1.0)


# -- site totals ---------------------------------------------------------------------------------


def test_site_totals() -> None:
    devices = [
        pv("pv-1", measured_w=2000.0, cap_w=2000.0),
        pv("pv-2", rating=3000.0, measured_w=1000.0),
        battery(power=-500.0, soc=30.0),
    ]
    totals = site_totals(devices, SiteLimits(pcc_w=-700.0, soc_min_pct=10.0, soc_max_pct=90.0))
    assert totals.pv_w == 3000.0
    assert totals.battery_w == -500.0
    assert totals.load_w == -700.0 + 3000.0 - 500.0
    assert totals.battery_energy_wh == pytest.approx(2000.0)
    assert totals.battery_capacity_wh == pytest.approx(8000.0)
    assert totals.pv_rating_w == 8000.0
    assert totals.pv_limited
    # No meter: no load; one PV unmeasured: no PV sum (and no load).
    assert math.isnan(site_totals(devices, SiteLimits()).load_w)
    partial = site_totals([*devices, pv("pv-3", measured_w=None)], SiteLimits(pcc_w=0.0))
    assert math.isnan(partial.pv_w)
    assert math.isnan(partial.load_w)
    # A battery with unknown SoC adds no energy and no capacity.
    assert site_totals([battery(soc=None)], SiteLimits()).battery_capacity_wh == 0.0


def test_of_device_state() -> None:
    state = DeviceState(
        "bat-1",
        BATTERY,
        max_w=5000.0,
        max_charge_w=3000.0,
        max_discharge_w=4000.0,
        measured_w=-100.0,
        controls=frozenset({Control.ACTIVE_POWER}),
        soc_pct=55.0,
        bms_charge_max_w=2500.0,
        bms_discharge_max_w=None,
    )
    device = FlexDevice.of(state, setpoint_w=-100.0, capacity_wh=9000.0)
    assert device.can_dispatch
    assert not device.can_curtail
    assert (device.rating_w, device.soc_pct, device.bms_charge_max_w) == (5000.0, 55.0, 2500.0)
    assert device.capacity_wh == 9000.0
    faulted = FlexDevice.of(DeviceState("pv-1", PV, 5000.0, fault="ground fault"))
    assert not faulted.available


# -- properties ----------------------------------------------------------------------------------

_maybe_w = st.one_of(st.none(), st.floats(-6000, 12_000))


@st.composite
def _devices(draw: st.DrawFn) -> list[FlexDevice]:
    devices: list[FlexDevice] = []
    for i in range(draw(st.integers(0, 4))):
        if draw(st.booleans()):
            devices.append(
                pv(
                    f"pv-{i}",
                    rating=draw(st.floats(0, 10_000)),
                    measured_w=draw(_maybe_w),
                    cap_w=draw(st.one_of(st.none(), st.floats(0, 10_000))),
                    available=draw(st.booleans()),
                )
            )
        else:
            devices.append(
                battery(
                    f"bat-{i}",
                    power=draw(_maybe_w),
                    soc=draw(st.one_of(st.none(), st.floats(-5, 105))),
                    bms_charge_max_w=draw(st.one_of(st.none(), st.floats(-100, 6000))),
                    bms_discharge_max_w=draw(st.one_of(st.none(), st.floats(-100, 6000))),
                )
            )
    return devices


@settings(max_examples=500, deadline=None)
@given(
    devices=_devices(),
    pcc=st.one_of(st.none(), st.floats(-20_000, 20_000)),
    export_limit=st.one_of(st.none(), st.floats(0, 20_000)),
    import_limit=st.one_of(st.none(), st.floats(0, 20_000)),
    estimate=st.one_of(st.none(), st.floats(0, 50_000)),
)
def test_headroom_is_never_negative_and_respects_the_connection(
    devices: list[FlexDevice],
    pcc: float | None,
    export_limit: float | None,
    import_limit: float | None,
    estimate: float | None,
) -> None:
    limits = SiteLimits(pcc_w=pcc, export_limit_w=export_limit, import_limit_w=import_limit)
    result = compute_flexibility(devices, limits, pv_available_w=estimate)
    assert math.isfinite(result.up_w)
    assert math.isfinite(result.down_w)
    assert result.up_w >= 0.0
    assert result.down_w >= 0.0
    if export_limit is not None and pcc is not None:
        assert result.up_w <= max(export_limit + pcc, 0.0) + 1e-6
    if import_limit is not None and pcc is not None:
        assert result.down_w <= max(import_limit - pcc, 0.0) + 1e-6
    # Nothing beyond what the devices could physically do.
    ceiling = sum(
        d.rating_w if d.kind is PV else d.max_discharge_w + max(-(d.measured_w or 0.0), 0.0)
        for d in devices
    )
    assert result.up_w <= ceiling + 1e-6


# -- the wire record ------------------------------------------------------------------------------


def test_payload_round_trip() -> None:
    devices = [pv(measured_w=2000.0, cap_w=2000.0), battery(power=-500.0, soc=30.0)]
    limits = SiteLimits(pcc_w=-300.0)
    issued_ns = 1_718_841_600 * 10**9  # 2024-06-20T00:00Z
    prediction = forecast(
        HistoryArrays.empty(issued_ns // MINUTE_NS),
        issued_ns,
        None,
        pv_rating_w=5000.0,
        battery_energy_wh=2000.0,
        battery_capacity_wh=10_000.0,
        battery_w_now=-500.0,
    )
    result = compute_flexibility(devices, limits, pv_available_w=4000.0)
    message = pb.Flexibility.FromString(flexibility_payload(issued_ns, result, prediction))
    assert ns_from_timestamp(message.time) == issued_ns
    assert message.up_w == result.up_w == pytest.approx(2000.0 + 4000.0 + 500.0)
    assert message.down_w == result.down_w
    assert (message.pv_w, message.battery_w, message.load_w) == (2000.0, -500.0, 1200.0)
    assert message.battery_energy_wh == pytest.approx(3000.0)
    assert message.battery_capacity_wh == 10_000.0
    assert [p.offset_s for p in message.forecast] == list(prediction.offsets_s)
    assert math.isnan(message.forecast[0].pv_w)  # no basis: NaN, not a made-up 0
    np.testing.assert_allclose(
        [p.battery_energy_wh for p in message.forecast], prediction.battery_energy_wh
    )
    # Sent 70 s after the forecast was made: offsets count from the record's time, and the
    # point that is already past is left out.
    later = pb.Flexibility.FromString(
        flexibility_payload(issued_ns + 70 * 10**9, result, prediction)
    )
    assert [p.offset_s for p in later.forecast][:2] == [230, 530]
    assert len(later.forecast) == len(prediction.offsets_s)
    without = pb.Flexibility.FromString(flexibility_payload(issued_ns, result, None))
    assert len(without.forecast) == 0

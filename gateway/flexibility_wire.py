"""The `dergw.v1.Flexibility` record: the site's headroom now and its forecast, encoded.

Part of the gateway's edge to the wire contract (beside `gateway.wire`), kept in its own module
so that `gateway.flexibility` and `gateway.forecast` stay free of generated code. The runtime
appends the bytes to the outbox as `RecordKind.FLEXIBILITY`.
"""

from __future__ import annotations

from dergw.v1 import pb, timestamp_from_ns
from gateway.flexibility import Flexibility
from gateway.forecast import Forecast

__all__ = ["flexibility_payload"]


def flexibility_payload(wall_ns: int, flexibility: Flexibility, forecast: Forecast | None) -> bytes:
    """Serialized Flexibility at `wall_ns`; forecast offsets are counted from `wall_ns`.

    NaN (unknown: no fresh meter, no basis to forecast) goes on the wire as NaN.
    """
    totals = flexibility.totals
    message = pb.Flexibility(
        time=timestamp_from_ns(wall_ns),
        up_w=flexibility.up_w,
        down_w=flexibility.down_w,
        pv_w=totals.pv_w,
        load_w=totals.load_w,
        battery_w=totals.battery_w,
        battery_energy_wh=totals.battery_energy_wh,
        battery_capacity_wh=totals.battery_capacity_wh,
    )
    if forecast is not None:
        # A forecast issued a little before the record keeps its points' absolute times.
        shift_s = (wall_ns - forecast.issued_wall_ns) / 1e9
        message.forecast.extend(
            pb.ForecastPoint(
                offset_s=round(float(offset) - shift_s),
                pv_w=float(pv),
                load_w=float(load),
                battery_energy_wh=float(energy),
            )
            for offset, pv, load, energy in zip(
                forecast.offsets_s,
                forecast.pv_w,
                forecast.load_w,
                forecast.battery_energy_wh,
                strict=True,
            )
            if float(offset) - shift_s > 0
        )
    return message.SerializeToString()

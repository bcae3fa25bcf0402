"""The flexibility reporter: the site's headroom now and its short-horizon forecast, upstream.

Every control cycle it adds the site's totals to the minute history (gateway.history); once a
minute it forecasts (gateway.forecast), computes the headroom (gateway.flexibility) and records
a Flexibility record in the outbox, so the headend can aggregate flexibility per feeder. The
arithmetic is pure; this module only feeds it and keeps the history file flushed off the loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence

from gateway.clock import Clock
from gateway.config import GatewayConfig
from gateway.flexibility import FlexDevice, SiteLimits, compute_flexibility, site_totals
from gateway.flexibility_wire import flexibility_payload
from gateway.forecast import SiteGeo, forecast
from gateway.history import History
from gateway.intent import SiteConstraints
from gateway.outbox import RecordKind
from gateway.runtime.recorder import Recorder
from gateway.safety import DeviceState, SafeSetpoint
from gateway.snapshot import SiteSnapshot

__all__ = ["FlexReporter"]

log = logging.getLogger(__name__)

NS_PER_S = 1_000_000_000
REPORT_EVERY_S = 60.0


class FlexReporter:
    def __init__(
        self,
        config: GatewayConfig,
        *,
        history: History,
        snapshot: SiteSnapshot,
        recorder: Recorder,
        clock: Clock,
    ) -> None:
        self._config = config
        self._history = history
        self._snapshot = snapshot
        self._recorder = recorder
        self._clock = clock
        site = config.site
        self._geo = (
            SiteGeo(site.latitude, site.longitude)
            if site.latitude is not None and site.longitude is not None
            else None
        )
        self._last_report_mono_ns: int | None = None
        self._devices: list[FlexDevice] = []
        self._limits = SiteLimits()

    def observe(
        self,
        states: Mapping[str, DeviceState],
        setpoints: Sequence[SafeSetpoint],
        constraints: SiteConstraints | None,
        now_wall_ns: int,
        now_mono_ns: int,
    ) -> None:
        """Called once per control cycle, after enforcement: feed the minute history."""
        by_id = {s.device_id: s for s in setpoints}
        devices = []
        for device_id, state in states.items():
            setpoint = by_id.get(device_id)
            cap_w = None
            if setpoint is not None:
                cap_w = 0.0 if setpoint.connect is False else setpoint.max_active_power_w
            info = self._snapshot.slots[device_id].info
            devices.append(
                FlexDevice.of(
                    state,
                    cap_w=cap_w,
                    setpoint_w=setpoint.active_power_w if setpoint is not None else None,
                    capacity_wh=info.nameplate.energy_wh if info is not None else 0.0,
                )
            )
        soc_min = constraints.soc_min_pct if constraints and constraints.soc_min_pct else 0.0
        soc_max = constraints.soc_max_pct if constraints and constraints.soc_max_pct else 100.0
        self._devices = devices
        self._limits = SiteLimits(
            pcc_w=self._snapshot.pcc_w(now_mono_ns),
            soc_min_pct=min(soc_min, soc_max),
            soc_max_pct=max(soc_min, soc_max),
            export_limit_w=self._config.site.export_limit_w,
            import_limit_w=self._config.site.import_limit_w,
        )
        self._history.add(now_wall_ns, site_totals(devices, self._limits))

    async def maybe_report(self) -> None:
        """Once a minute: forecast, headroom, one Flexibility record; flush the history."""
        now_mono = self._clock.mono_ns()
        due = (
            self._last_report_mono_ns is None
            or now_mono - self._last_report_mono_ns >= REPORT_EVERY_S * NS_PER_S
        )
        # Nothing to say until a device has a fresh reading (a report of unknowns would only
        # read as "no flexibility" upstream for a minute).
        if not due or not any(d.available for d in self._devices):
            return
        self._last_report_mono_ns = now_mono
        now = self._clock.wall_ns()
        totals = site_totals(self._devices, self._limits)
        predicted = forecast(
            self._history.arrays(now),
            now,
            self._geo,
            pv_rating_w=totals.pv_rating_w,
            battery_energy_wh=totals.battery_energy_wh,
            battery_capacity_wh=totals.battery_capacity_wh,
            battery_w_now=totals.battery_w,
        )
        flexibility = compute_flexibility(
            self._devices, self._limits, pv_available_w=predicted.pv_available_w
        )
        self._recorder.record(
            RecordKind.FLEXIBILITY, flexibility_payload(now, flexibility, predicted)
        )
        if self._history.flush_due:
            await asyncio.to_thread(self._history.flush)

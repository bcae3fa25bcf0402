"""FixedSource: a gateway made of fixed data, for tests, screenshots and UI work without a site.

It behaves like the gateway where the console can tell: an override above the site's export limit
is refused (as the safety kernel refuses it), an accepted one becomes the control source until
`advance()` moves its expiry past zero. Nothing here reads a clock or draws a random number.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from gateway.console.model import (
    ConsoleSnapshot,
    ControlView,
    DeviceView,
    EventView,
    HeaderView,
    LimitView,
    OutboxView,
    OverrideView,
    PointRead,
    PointValue,
    TestWriteView,
    UplinkView,
    ValidationView,
)
from gateway.console.source import SourceError

__all__ = ["SITE_EXPORT_LIMIT_W", "FixedSource", "fixed_snapshot"]

SITE_EXPORT_LIMIT_W = 10_000.0


def fixed_snapshot() -> ConsoleSnapshot:
    """A small commissioned site: a PV inverter, a battery and a meter, one of them stale."""
    return ConsoleSnapshot(
        header=HeaderView(
            gateway_id="gw-0042",
            site="riverside-farm",
            version="0.1.0 (slot A)",
            uptime_s=3 * 86400 + 4 * 3600 + 5 * 60,
            clock_synced=True,
        ),
        uplink=UplinkView(
            transport="grpc",
            state="connected",
            last_ack_age_s=2.0,
            reconnects=3,
            cert_days_left=41.5,
            tls_failure=None,
        ),
        outbox=OutboxView(
            backlog=128,
            oldest_unsent_age_s=12.0,
            size_bytes=3_400_000,
            quota_bytes=64_000_000,
            shed=0,
        ),
        devices=(
            DeviceView(
                device_id="pv1",
                kind="inverter",
                protocol="modbus-tcp",
                address="10.0.0.21:502/unit 1",
                last_good_age_s=0.8,
                errors=0,
                state="ok",
                values=(
                    PointValue("P", 7420.0, "W"),
                    PointValue("Q", -310.0, "var"),
                    PointValue("V", 231.4, "V"),
                    PointValue("f", 50.01, "Hz"),
                    PointValue("PF", 0.99, ""),
                    PointValue("state", "MPPT", ""),
                ),
            ),
            DeviceView(
                device_id="bess1",
                kind="battery",
                protocol="rtu",
                address="/dev/ttyUSB0 @9600 8N1 id 7",
                last_good_age_s=1.2,
                errors=2,
                state="ok",
                values=(
                    PointValue("P", -2500.0, "W"),
                    PointValue("SoC", 64.0, "%"),
                    PointValue("V", 52.1, "V"),
                    PointValue("state", "charging", ""),
                ),
            ),
            DeviceView(
                device_id="meter1",
                kind="meter",
                protocol="modbus-tcp",
                address="10.0.0.30:502/unit 3",
                last_good_age_s=47.0,
                errors=12,
                state="stale",
                last_error="timeout after 1.0 s",
                values=(PointValue("P", 4920.0, "W"), PointValue("f", 50.0, "Hz")),
            ),
        ),
        control=ControlView(
            active_event="dr-2026-11-22-evening",
            source="headend",
            version=17,
            expires_in_s=1800.0,
            limits=(
                LimitView("export_limit_w", 8000.0, "W", "intent v17"),
                LimitView("import_limit_w", SITE_EXPORT_LIMIT_W, "W", "site limit"),
                LimitView("bess1.charge_w", 2500.0, "W", "soc guard"),
            ),
        ),
        events=(
            EventView("2026-11-22T18:01:40Z", "ERROR", "bess1: over-temperature cleared"),
            EventView("2026-11-22T19:00:35Z", "INFO", "intent v17 applied (headend)"),
            EventView("2026-11-22T19:01:35Z", "WARNING", "meter1: timeout after 1.0 s"),
        ),
        audit_head="9f2c4e1ab07d",
    )


class FixedSource:
    """An in-memory gateway. `advance(s)` moves time forward by s seconds."""

    description = "fixed data (no gateway)"

    def __init__(self, snapshot: ConsoleSnapshot | None = None) -> None:
        self._snap = snapshot or fixed_snapshot()
        self._next_override = 1
        self._now_s = 120.0  # seconds after 19:00:00Z on the fixed day
        self.requests: list[str] = []  # what the console asked for, in order (for tests)

    async def snapshot(self) -> ConsoleSnapshot:
        self.requests.append("snapshot")
        return self._snap

    async def set_override(
        self,
        *,
        device_id: str | None,
        controls: Mapping[str, float],
        duration_s: float,
        reason: str,
    ) -> str:
        self.requests.append("override.set")
        too_high = {k: v for k, v in controls.items() if v > SITE_EXPORT_LIMIT_W}
        if too_high:
            name, value = next(iter(too_high.items()))
            raise SourceError(
                "refused",
                f"safety: {name}={value:g} exceeds the site limit {SITE_EXPORT_LIMIT_W:g} W",
            )
        override_id = f"ov-{self._next_override}"
        self._next_override += 1
        override = OverrideView(
            override_id=override_id,
            device_id=device_id,
            controls=", ".join(f"{k}={v:g}" for k, v in sorted(controls.items())),
            expires_in_s=duration_s,
            reason=reason,
            by="console",
        )
        control = self._snap.control
        limits = tuple(
            replace(lim, value=controls[lim.name], bound_by=f"override {override_id}")
            if lim.name in controls
            else lim
            for lim in control.limits
        )
        self._snap = replace(
            self._snap,
            control=replace(
                control, source="override", limits=limits, overrides=(*control.overrides, override)
            ),
            events=(*self._snap.events, self._event(f"override {override_id} set: {reason}")),
        )
        return override_id

    async def clear_override(self, override_id: str) -> None:
        self.requests.append("override.clear")
        if not any(o.override_id == override_id for o in self._snap.control.overrides):
            raise SourceError("not_found", f"no active override {override_id}")
        self._end_overrides({override_id}, "cleared")

    async def rescan(self, device_id: str) -> None:
        self.requests.append("rescan")
        if self._snap.device(device_id) is None:
            raise SourceError("not_found", f"no device {device_id}")

    async def test_write(
        self, *, device_id: str, controls: Mapping[str, float], duration_s: float
    ) -> TestWriteView:
        self.requests.append("test_write")
        if self._snap.device(device_id) is None:
            raise SourceError("not_found", f"no device {device_id}")
        override_id = await self.set_override(
            device_id=device_id, controls=controls, duration_s=duration_s, reason="test write"
        )
        readback = tuple(
            ("WMaxLimPct", value) for name, value in controls.items() if name == "max_gen_pct"
        )
        return TestWriteView(device_id, override_id, True, True, "", readback)

    async def read_point(self, device_id: str, point: str) -> PointRead:
        self.requests.append("read_point")
        device = self._snap.device(device_id)
        if device is None:
            raise SourceError("not_found", f"no device {device_id}")
        for value in device.values:
            if value.name == point:
                return PointRead(device_id, point, value.value, value.unit)
        raise SourceError("not_found", f"{device_id} has no point {point}")

    async def validate_config(self, path: str) -> ValidationView:
        self.requests.append("validate_config")
        if path.endswith("bad.toml"):
            return ValidationView(False, ("[site] export_limit_w: must be >= 0",), "")
        return ValidationView(
            True,
            (),
            "--- running\n+++ " + path + "\n@@ [site] @@\n-export_limit_w = 10000\n"
            "+export_limit_w = 9000",
        )

    async def close(self) -> None:
        return None

    def advance(self, seconds: float) -> None:
        """Move time on: ages grow, expiries shrink, overrides whose time is up expire."""
        snap = self._snap
        control = snap.control
        overrides = tuple(
            replace(o, expires_in_s=None if o.expires_in_s is None else o.expires_in_s - seconds)
            for o in control.overrides
        )
        self._snap = replace(
            snap,
            header=replace(snap.header, uptime_s=snap.header.uptime_s + seconds),
            control=replace(
                control,
                overrides=overrides,
                expires_in_s=None
                if control.expires_in_s is None
                else max(0.0, control.expires_in_s - seconds),
            ),
        )
        self._now_s += seconds
        expired = {
            o.override_id for o in overrides if o.expires_in_s is not None and o.expires_in_s <= 0
        }
        if expired:
            self._end_overrides(expired, "expired")

    def _end_overrides(self, ended: set[str], how: str) -> None:
        snap = self._snap
        base = fixed_snapshot().control
        remaining = tuple(o for o in snap.control.overrides if o.override_id not in ended)
        # With no override left the limits go back to what the intent and the site set.
        limits = snap.control.limits if remaining else base.limits
        control = replace(
            snap.control,
            overrides=remaining,
            limits=limits,
            source="override" if remaining else base.source,
        )
        events = tuple(self._event(f"override {o} {how}") for o in sorted(ended))
        self._snap = replace(snap, control=control, events=snap.events + events)

    def _event(self, text: str) -> EventView:
        minutes, seconds = divmod(int(self._now_s), 60)
        hours, minutes = divmod(minutes, 60)
        return EventView(f"2026-11-22T{19 + hours:02d}:{minutes:02d}:{seconds:02d}Z", "INFO", text)

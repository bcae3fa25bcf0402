"""LiveSource: the console's data from a running gateway, through its local API socket.

The wire models (gateway.localapi.schema) are reduced here to the console's view model, so the
screens depend on one small set of shapes and the fixed test data exercises the same code.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar

from pydantic import ValidationError

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
from gateway.localapi.client import LocalApiClient, LocalApiError
from gateway.localapi.schema import DeviceStatus, OverrideControls, Snapshot

__all__ = ["LiveSource", "device_state", "to_view"]

_T = TypeVar("_T")


def device_state(device: DeviceStatus) -> str:
    """ok: usable for control; fault: the link failed; stale: anything else (no fresh reading)."""
    if device.available:
        return "ok"
    if device.link_state == "failed":
        return "fault"
    return "stale"


def _device(device: DeviceStatus) -> DeviceView:
    return DeviceView(
        device_id=device.id,
        kind=device.kind,
        protocol=device.protocol,
        address=device.address or "(not discovered)",
        last_good_age_s=device.last_good_poll_age_s,
        errors=device.total_errors,
        state=device_state(device),
        last_error=device.last_error or device.unavailable_reason,
        values=tuple(PointValue(p.name, p.value, p.unit, p.quality) for p in device.points),
    )


def to_view(snap: Snapshot) -> ConsoleSnapshot:
    header, uplink, outbox, control = snap.header, snap.uplink, snap.outbox, snap.control
    event = control.active_events[0] if control.active_events else None
    limits = tuple(
        LimitView(
            name=f"{sp.device_id} max P",
            value=sp.max_active_power_w,
            unit="W",
            bound_by=", ".join(sp.bound_by) or "—",
        )
        for sp in control.setpoints
    )
    if control.site_controls:
        limits = (LimitView("site", None, control.site_controls, "site controls"), *limits)
    return ConsoleSnapshot(
        header=HeaderView(
            gateway_id=header.gateway_id,
            site=header.site_name or header.site_id,
            version=header.version,
            uptime_s=header.uptime_s,
            clock_synced=header.clock_synced,
        ),
        uplink=UplinkView(
            transport=f"{uplink.transport}{'+tls' if uplink.tls else ''} {uplink.target}",
            state=uplink.state,
            last_ack_age_s=uplink.last_ack_age_s,
            reconnects=uplink.reconnects,
            cert_days_left=uplink.cert_days_left,
            tls_failure=uplink.tls_failure,
        ),
        outbox=OutboxView(
            backlog=outbox.backlog_records,
            oldest_unsent_age_s=outbox.oldest_unsent_age_s,
            size_bytes=outbox.bytes,
            quota_bytes=outbox.quota_bytes,
            shed=outbox.shed_records_total,
            condition=outbox.storage_condition,
        ),
        devices=tuple(_device(d) for d in snap.devices),
        control=ControlView(
            active_event=event.event_id if event else None,
            source=event.source if event else control.source,
            version=control.intent_version,
            expires_in_s=event.expires_in_s if event else None,
            limits=limits,
            overrides=tuple(
                OverrideView(
                    override_id=o.override_id,
                    device_id=o.device_id,
                    controls=", ".join(f"{k}={v}" for k, v in sorted(o.controls.items())),
                    expires_in_s=o.expires_in_s,
                    reason="",
                    by=o.origin,
                )
                for o in control.overrides
            ),
            notes=tuple(control.notes)
            + ((f"blocked: {control.blocked_reason}",) if control.blocked_reason else ()),
        ),
        events=tuple(EventView(e.time, e.level, e.text) for e in snap.events),
    )


class LiveSource:
    """A DataSource over one local API connection (opened lazily, reopened after a failure)."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self._client: LocalApiClient | None = None

    @property
    def description(self) -> str:
        return self.socket_path

    async def _api(self) -> LocalApiClient:
        if self._client is None:
            try:
                self._client = await LocalApiClient.connect(self.socket_path)
            except OSError as exc:
                raise SourceError(
                    "unavailable",
                    f"cannot open {self.socket_path} ({exc.strerror or exc}): is the gateway "
                    "running, and are you in its technician group?",
                ) from None
        return self._client

    async def _drop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    async def _call(self, call: Callable[[LocalApiClient], Awaitable[_T]]) -> _T:
        api = await self._api()
        try:
            return await call(api)
        except LocalApiError as exc:
            raise SourceError(str(exc.code), exc.message) from None
        except (ConnectionError, OSError, TimeoutError) as exc:
            await self._drop()
            raise SourceError("unavailable", f"lost the gateway: {exc}") from None
        except ValidationError as exc:
            raise SourceError(
                "bad_response",
                f"the gateway's answer does not fit this console ({exc.error_count()} problems): "
                "are the gateway and the console the same dergw version?",
            ) from None

    async def snapshot(self) -> ConsoleSnapshot:
        return to_view(await self._call(lambda api: api.snapshot()))

    async def set_override(
        self,
        *,
        device_id: str | None,
        controls: Mapping[str, float],
        duration_s: float,
        reason: str,
    ) -> str:
        try:
            body = OverrideControls.model_validate(dict(controls))
        except ValidationError as exc:
            allowed = ", ".join(OverrideControls.model_fields)
            first = exc.errors()[0]
            raise SourceError(
                "bad_request", f"{first['loc'][0]}: {first['msg']} (controls: {allowed})"
            ) from None
        result = await self._call(
            lambda api: api.override_set(
                body, duration_s=duration_s, reason=reason, device_id=device_id, confirm=True
            )
        )
        return result.override_id

    async def clear_override(self, override_id: str) -> None:
        result = await self._call(lambda api: api.override_clear(override_id))
        if not result.cleared:
            raise SourceError("not_found", f"override {override_id} was not active")

    async def rescan(self, device_id: str) -> None:
        await self._call(lambda api: api.rescan(device_id))

    async def test_write(
        self, *, device_id: str, controls: Mapping[str, float], duration_s: float
    ) -> TestWriteView:
        try:
            body = OverrideControls.model_validate(dict(controls))
        except ValidationError as exc:
            allowed = ", ".join(OverrideControls.model_fields)
            first = exc.errors()[0]
            raise SourceError(
                "bad_request", f"{first['loc'][0]}: {first['msg']} (controls: {allowed})"
            ) from None
        result = await self._call(
            lambda api: api.test_write(
                device_id, body, duration_s=duration_s, reason="console test write", confirm=True
            )
        )
        return TestWriteView(
            device_id=result.device_id,
            override_id=result.override_id,
            written=result.written,
            ok=result.ok,
            reason=result.reason,
            readback=tuple(sorted(result.readback.items())),
        )

    async def read_point(self, device_id: str, point: str) -> PointRead:
        result = await self._call(lambda api: api.read_point(device_id, point))
        value = result.point
        return PointRead(
            device_id, value.name, value.value, value.unit, value.quality, result.age_s
        )

    async def validate_config(self, path: str) -> ValidationView:
        result = await self._call(lambda api: api.validate_config(path))
        return ValidationView(result.ok, tuple(result.errors), result.diff)

    async def close(self) -> None:
        await self._drop()

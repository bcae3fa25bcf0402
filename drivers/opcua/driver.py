"""The OPC UA driver: browse discovery, subscription-fed reads and verified writes over asyncua.

One `asyncua.Client` per device. The address space is the project namespace of protocols.md §6
(served by `hil.opcua_sim`): one object per device whose variables carry the canonical SunSpec
names (`W`, `Var`, `Hz`, `SoC`, `WMaxLimPct`, `WMaxLimEna`, `StorCtlMod`, ...), so that the
canonical point set, units and physical ranges come from `drivers.sunspec.profile` unchanged and
the gateway sees the same names whatever the protocol.

Behaviour that callers rely on (drivers.contract):
  * `connect()` opens a session (Basic256Sha256 SignAndEncrypt with the configured client
    certificate unless the params say `security = "none"`), resolves the root node, browses its
    children by browse name, builds the schema from the canonical points the device serves,
    reads identity (`Mn`, `Md`, `SN`) and nameplate (`WMax`, `WChaRteMaxRtg`,
    `WDisChaRteMaxRtg`, `WHRtg`, `VAMax`), primes the value cache with one Read and creates a
    subscription (publishing interval, per-item sampling interval and absolute DataChangeFilter
    deadband from the params). Failures raise DriverError.
  * `read()` does no network I/O on the happy path: it copies the cache the subscription keeps
    up to date. A value that did not change (deadband) is still current as long as the
    subscription publishes (data or keep-alive) within `stale_after_s`; otherwise, or when the
    session is gone, every point is BAD_COMM with NaN and the link is dropped. Per point: a Bad
    StatusCode or a value never received -> BAD_COMM (NaN); Uncertain, NaN or outside the
    canonical range -> OUT_OF_RANGE.
  * Reconnect with session restore: a read() on a dropped link reconnects (new session,
    re-browse, re-prime, new subscription) when the backoff allows (reconnect_min_s doubling
    to reconnect_max_s, reset on success); between attempts reads return BAD_COMM at once.
  * `write()` takes only a SafeSetpoint and writes the control nodes in one Write request, the
    enable gate last when enabling and first when disabling (model 123/124 semantics: cap =
    WMaxLimPct % of WMax + WMaxLimEna + WMaxLimPctRvrtTms; storage = StorCtlMod + InWRte /
    OutWRte % of the charge / discharge rating + InOutWRteRvrtTms), then reads them back with
    one Read: `ok` only when every node reads back what was written.
  * One asyncio.Lock serialises connect / reconnect / write.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from asyncua import ua
from asyncua.client.client import Client
from asyncua.client.ua_client import UaClientState
from asyncua.common.node import Node
from asyncua.common.subscription import DataChangeNotif, Subscription
from asyncua.crypto import security_policies
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.uaerrors import UaError, UaStatusCodeError

from drivers.contract import (
    Control,
    DeviceInfo,
    DeviceKind,
    DriverError,
    DriverHealth,
    HealthTracker,
    LinkState,
    Nameplate,
    PointSchema,
    Quality,
    Reading,
    WriteResult,
    check_setpoint,
)
from drivers.opcua.params import OpcUaParams
from drivers.sunspec import profile, status
from gateway.clock import Clock
from gateway.safety import SafeSetpoint

__all__ = ["PROTOCOL", "OpcUaDriver", "OpcUaParams", "known_variable_names"]

PROTOCOL: Final = "opcua"
_ENABLED: Final = 1.0
_DISABLED: Final = 0.0
_STOR_CHARGE: Final = 0b01
_STOR_DISCHARGE: Final = 0b10
# Points the OPC UA namespace adds to the canonical SunSpec set (the revert timers).
_EXTRA_POINTS: Final = (
    profile.CanonicalPoint("WMaxLimPctRvrtTms", "s", (), 0.0, math.inf, control=True),
    profile.CanonicalPoint("InOutWRteRvrtTms", "s", (), 0.0, math.inf, control=True),
)
_CAP_NODES: Final = ("WMaxLimPct", "WMaxLimEna", "WMaxLimPctRvrtTms")
_STORAGE_NODES: Final = ("StorCtlMod", "InWRte", "OutWRte", "InOutWRteRvrtTms")
_NAMEPLATE_NODES: Final = {
    "max_w": ("WMax", "WMaxRtg"),
    "max_va": ("VAMax", "VAMaxRtg"),
    "max_var": ("VarMaxInj", "VarMaxInjRtg"),
    "max_charge_w": ("WChaRteMaxRtg",),
    "max_discharge_w": ("WDisChaRteMaxRtg",),
    "energy_wh": ("WHRtg",),
}
_IDENTITY_NODES: Final = ("Mn", "Md", "SN")


def known_variable_names() -> frozenset[str]:
    """Every variable browse name the driver reads: points, identity and nameplate."""
    names = {cp.name for points in profile.PROFILES.values() for cp in points}
    names.update(cp.name for cp in _EXTRA_POINTS)
    names.update(_IDENTITY_NODES)
    names.update(n for sources in _NAMEPLATE_NODES.values() for n in sources)
    return frozenset(names)


class _LinkError(Exception):
    """The session is unusable (transport, timeout, protocol error)."""


class _WriteRefused(Exception):
    """The setpoint cannot be written to this device."""


@dataclass(slots=True)
class _Session:
    """One live connection: client, subscription and the nodes of the schema, in schema order."""

    client: Client
    subscription: Subscription
    nodes: list[Node]
    by_name: dict[str, Node]


class _Cache:
    """The subscription's latest values per schema index (filled by the handler)."""

    def __init__(self, n: int, index: Mapping[Any, int]) -> None:
        self.index = dict(index)  # NodeId -> schema index
        self.values = np.full(n, np.nan, dtype=np.float64)
        self.status = np.zeros(n, dtype=np.uint32)  # OPC UA StatusCode value
        self.received = np.zeros(n, dtype=np.bool_)
        self.notifications = 0

    def store(self, i: int, value: Any, code: int) -> None:
        try:
            self.values[i] = float(value)
        except (TypeError, ValueError):
            self.values[i] = math.nan
        self.status[i] = code
        self.received[i] = True

    def store_dv(self, i: int, dv: ua.DataValue) -> None:
        code = dv.StatusCode.value if dv.StatusCode is not None else 0
        value = dv.Value.Value if dv.Value is not None else None
        self.store(i, value, code)

    # asyncua SubscriptionHandler protocol
    def datachange_notification(self, node: Node, val: Any, data: DataChangeNotif) -> None:
        i = self.index.get(node.nodeid)
        if i is None:
            return
        self.notifications += 1
        dv = data.monitored_item.Value
        if dv is None:
            self.store(i, val, 0)
        else:
            self.store_dv(i, dv)

    def status_change_notification(self, status: ua.StatusChangeNotification) -> None:
        # The server says the subscription is gone (e.g. BadTimeout): everything is stale.
        self.received[:] = False


def _severity(codes: npt.NDArray[np.uint32]) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """(bad, uncertain) masks from StatusCode values (top bits: 00 good, 01 uncertain, 1x bad)."""
    top = codes >> 30
    return top >= 2, top == 1


class OpcUaDriver:
    """A `drivers.contract.Driver` for one device in the project OPC UA namespace."""

    def __init__(self, device_id: str, kind: DeviceKind, params: OpcUaParams, clock: Clock) -> None:
        self._device_id = device_id
        self._kind = DeviceKind(kind)
        self._params = params
        self._clock = clock
        self._address = f"{params.url} {params.root}"
        self._lock = asyncio.Lock()
        self._session: _Session | None = None
        self._cache: _Cache | None = None
        self._schema: PointSchema | None = None
        self._points: tuple[profile.CanonicalPoint, ...] = ()
        self._lo: npt.NDArray[np.float64] = np.zeros(0)
        self._hi: npt.NDArray[np.float64] = np.zeros(0)
        self._vtypes: dict[str, ua.VariantType] = {}
        self._nameplate = Nameplate()
        self._health = HealthTracker()
        self._backoff_s = params.reconnect_min_s
        self._next_attempt_mono = 0.0
        self.reconnects = 0  # sessions restored after a loss

    # ------------------------------------------------------------------ contract surface

    @property
    def device_id(self) -> str:
        return self._device_id

    async def connect(self) -> DeviceInfo:
        async with self._lock:
            await self._drop_session()
            try:
                async with asyncio.timeout(self._params.timeout_s * 4 + 2.0):
                    info = await self._discover()
            except DriverError as exc:
                self._record_failure(str(exc))
                raise
            except (_LinkError, TimeoutError, OSError, UaError) as exc:
                message = f"OPC UA discovery on {self._address} failed: {_describe(exc)}"
                self._record_failure(message)
                raise DriverError(message) from exc
            self._record_ok()
            return info

    async def read(self) -> Reading:
        schema = self._schema
        if schema is None:
            raise RuntimeError(f"{self._device_id}: read() before connect()")
        session = self._session
        if session is None or not self._alive(session):
            if session is not None:
                await self._lose(f"session to {self._address} lost")
            error = await self._try_restore()
            if error is not None:
                return self._bad_reading(schema, error)
        stale = self._stale_for()
        if stale is not None:
            await self._lose(stale)
            return self._bad_reading(schema, stale)
        return self._good_reading(schema)

    async def write(self, setpoint: SafeSetpoint) -> WriteResult:
        check_setpoint(setpoint, self._device_id)
        if self._schema is None:
            return self._result(False, reason="not connected: connect() has not succeeded")
        try:
            values, note = self._plan_write(setpoint)
        except _WriteRefused as exc:
            return self._result(False, reason=f"write not attempted: {exc}")
        async with self._lock:
            session = self._session
            if session is None or not self._alive(session):
                return self._result(
                    False, reason=f"write not attempted: no session to {self._address}"
                )
            return await self._write_locked(session, values, note)

    def health(self) -> DriverHealth:
        return self._health.snapshot()

    async def close(self) -> None:
        async with self._lock:
            await self._drop_session()
            self._health.state = LinkState.DISCONNECTED

    # ------------------------------------------------------------------ session

    async def _open(self) -> Client:
        p = self._params
        client = Client(
            p.url, timeout=p.timeout_s, watchdog_intervall=max(p.stale_after_s / 3, 0.5)
        )
        client.application_uri = p.application_uri
        client.name = f"dergw {self._device_id}"
        if p.security != "none":
            assert p.client_cert is not None  # the params validator requires both
            assert p.client_key is not None
            try:
                await client.set_security(
                    security_policies.SecurityPolicyBasic256Sha256,
                    certificate=str(p.client_cert),
                    private_key=str(p.client_key),
                    server_certificate=None if p.server_cert is None else str(p.server_cert),
                    mode=ua.MessageSecurityMode.SignAndEncrypt,
                )
            except (OSError, ValueError) as exc:
                raise DriverError(
                    f"{self._device_id}: cannot load the client certificate/key "
                    f"({p.client_cert}, {p.client_key}): {exc}"
                ) from exc
            except UaError as exc:
                raise DriverError(
                    f"{self._address} offers no Basic256Sha256 SignAndEncrypt endpoint ({exc}); "
                    'security "none" is used only when the params say security = "none"'
                ) from exc
        await client.connect(auto_reconnect=False)
        return client

    async def _resolve_root(self, client: Client) -> Node:
        root = self._params.root
        if "=" in root:
            return client.get_node(root)
        ns_index: int | None = None
        path = ["0:Objects"]
        for part in root.strip("/").split("/"):
            if ":" in part.split("=")[0] and part.split(":", 1)[0].isdigit():
                path.append(part)
                continue
            if ns_index is None:
                try:
                    ns_index = await client.get_namespace_index(self._params.namespace_uri)
                except ValueError:
                    raise DriverError(
                        f"{self._params.url} has no namespace {self._params.namespace_uri!r}: "
                        "check namespace_uri in the device params"
                    ) from None
            path.append(f"{ns_index}:{part}")
        try:
            return await client.nodes.root.get_child(path)
        except UaStatusCodeError as exc:
            raise DriverError(
                f"no node at browse path {'/'.join(path)} on {self._params.url}: check root"
            ) from exc

    async def _children(self, root: Node) -> dict[str, Node]:
        children = await root.get_children()
        names = await asyncio.gather(*(c.read_browse_name() for c in children))
        return {qn.Name: c for qn, c in zip(names, children, strict=True)}

    async def _start_session(self, client: Client, by_name: Mapping[str, Node]) -> _Session:
        schema = self._schema
        assert schema is not None
        nodes = [by_name[name] for name in schema.names]
        cache = _Cache(len(nodes), {n.nodeid: i for i, n in enumerate(nodes)})
        # Prime: one Read of every point, then the subscription delivers changes from there.
        for i, dv in enumerate(await client.read_attributes(nodes)):
            cache.store_dv(i, dv)
        p = self._params
        params = ua.CreateSubscriptionParameters()
        params.RequestedPublishingInterval = p.publishing_interval_ms
        keepalive_ms = max(p.stale_after_s * 1000.0 / 3.0, p.publishing_interval_ms)
        params.RequestedMaxKeepAliveCount = max(1, int(keepalive_ms // p.publishing_interval_ms))
        params.RequestedLifetimeCount = params.RequestedMaxKeepAliveCount * 3
        params.MaxNotificationsPerPublish = 0
        params.PublishingEnabled = True
        params.Priority = 0
        sub = await client.create_subscription(params, cache)
        requests = []
        for i, node in enumerate(nodes):
            mparams = ua.MonitoringParameters()
            mparams.ClientHandle = i + 1  # unique: asyncua routes notifications by it
            mparams.SamplingInterval = p.sampling_interval_ms
            mparams.QueueSize = 1
            mparams.DiscardOldest = True
            band = p.deadbands.get(schema.names[i], p.deadband)
            if band > 0 and self._vtypes.get(schema.names[i], ua.VariantType.Double) in (
                ua.VariantType.Double,
                ua.VariantType.Float,
            ):
                mfilter = ua.DataChangeFilter()
                mfilter.Trigger = ua.DataChangeTrigger.StatusValue
                mfilter.DeadbandType = ua.DeadbandType.Absolute
                mfilter.DeadbandValue = band
                mparams.Filter = mfilter
            req = ua.MonitoredItemCreateRequest()
            req.ItemToMonitor = ua.ReadValueId()
            req.ItemToMonitor.NodeId = node.nodeid
            req.ItemToMonitor.AttributeId = AttributeIds.Value
            req.MonitoringMode = ua.MonitoringMode.Reporting
            req.RequestedParameters = mparams
            requests.append(req)
        handles = await sub.create_monitored_items(requests)
        for name, h in zip(schema.names, handles, strict=True):
            if isinstance(h, ua.StatusCode) and not h.is_good():
                raise DriverError(f"cannot monitor {name} on {self._address}: {h}")
        self._cache = cache
        return _Session(client, sub, nodes, dict(by_name))

    async def _discover(self) -> DeviceInfo:
        client = await self._open()
        try:
            root = await self._resolve_root(client)
            by_name = await self._children(root)
            points = [
                cp for cp in (*profile.PROFILES[self._kind], *_EXTRA_POINTS) if cp.name in by_name
            ]
            if "W" not in by_name:
                raise DriverError(
                    f"{self._address}: the root node has no W variable (found "
                    f"{sorted(by_name)}): check root and namespace_uri"
                )
            extra = [
                n
                for n in (*_IDENTITY_NODES, *(x for v in _NAMEPLATE_NODES.values() for x in v))
                if n in by_name
            ]
            static = await client.read_values([by_name[n] for n in extra])
            found = dict(zip(extra, static, strict=True))
            writable = [cp.name for cp in points if cp.control]
            vtypes = await asyncio.gather(
                *(by_name[n].read_data_type_as_variant_type() for n in writable)
            )
            self._vtypes = dict(zip(writable, vtypes, strict=True))
            self._points = tuple(points)
            self._schema = PointSchema(
                names=tuple(cp.name for cp in points),
                units=tuple(cp.unit for cp in points),
                writable=frozenset(writable),
            )
            self._lo = np.array([cp.valid_min for cp in points], dtype=np.float64)
            self._hi = np.array([cp.valid_max for cp in points], dtype=np.float64)
            self._nameplate = _nameplate(found)
            self._session = await self._start_session(client, by_name)
        except BaseException:
            await _disconnect(client)
            raise
        names = set(self._schema.names)
        controls: set[Control] = set()
        if set(_CAP_NODES[:2]) <= names:
            controls.add(Control.GENERATION_CAP)
        if self._kind is DeviceKind.BATTERY and set(_STORAGE_NODES[:3]) <= names:
            controls.add(Control.ACTIVE_POWER)
        if "Conn" in names:
            controls.add(Control.CONNECT)
        self._backoff_s = self._params.reconnect_min_s
        return DeviceInfo(
            device_id=self._device_id,
            kind=self._kind,
            protocol=PROTOCOL,
            address=self._address,
            manufacturer=str(found.get("Mn") or ""),
            model=str(found.get("Md") or ""),
            serial_number=str(found.get("SN") or ""),
            nameplate=self._nameplate,
            schema=self._schema,
            controls=frozenset(controls),
        )

    def _alive(self, session: _Session) -> bool:
        return session.client.uaclient.state is UaClientState.CONNECTED

    def _stale_for(self) -> str | None:
        session = self._session
        if session is None:
            return f"no session to {self._address}"
        last = session.subscription.last_publish_at
        # Before the first publish the primed values are fresh as of connect().
        if last is None:
            return None
        age = time.monotonic() - last
        if age > self._params.stale_after_s:
            return (
                f"subscription on {self._address} silent for {age:.1f} s "
                f"(> stale_after_s = {self._params.stale_after_s:g}): no data and no keep-alive"
            )
        return None

    async def _lose(self, error: str) -> None:
        async with self._lock:
            await self._drop_session()
            self._record_failure(error)
            self._next_attempt_mono = time.monotonic() + self._backoff_s
            self._backoff_s = min(self._backoff_s * 2.0, self._params.reconnect_max_s)

    async def _try_restore(self) -> str | None:
        """Reconnect and restore the session if the backoff allows; None when it is back."""
        now = time.monotonic()
        if now < self._next_attempt_mono:
            return (
                f"{self._health.last_error or 'disconnected'}; next reconnect in "
                f"{self._next_attempt_mono - now:.1f} s"
            )
        async with self._lock:
            if self._session is not None:
                return None
            schema = self._schema
            assert schema is not None
            client: Client | None = None
            try:
                async with asyncio.timeout(self._params.timeout_s * 3 + 1.0):
                    client = await self._open()
                    root = await self._resolve_root(client)
                    by_name = await self._children(root)
                    missing = [n for n in schema.names if n not in by_name]
                    if missing:
                        raise DriverError(
                            f"address space changed on {self._address}: {missing} gone; "
                            "call connect() to rediscover"
                        )
                    self._session = await self._start_session(client, by_name)
            except (DriverError, _LinkError, TimeoutError, OSError, UaError) as exc:
                if client is not None:
                    await _disconnect(client)
                message = f"reconnect to {self._address} failed: {_describe(exc)}"
                self._record_failure(message)
                self._next_attempt_mono = time.monotonic() + self._backoff_s
                self._backoff_s = min(self._backoff_s * 2.0, self._params.reconnect_max_s)
                return message
            self._backoff_s = self._params.reconnect_min_s
            self.reconnects += 1
            self._record_ok()
            return None

    async def _drop_session(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await _disconnect(session.client)

    # ------------------------------------------------------------------ readings

    def _good_reading(self, schema: PointSchema) -> Reading:
        cache = self._cache
        assert cache is not None
        values = cache.values.copy()
        bad, uncertain = _severity(cache.status)
        bad |= ~cache.received
        quality = np.full(len(schema), Quality.GOOD, dtype=np.uint8)
        finite = np.isfinite(values)
        with np.errstate(invalid="ignore"):
            outside = ~((values >= self._lo) & (values <= self._hi))
        rating = max(self._nameplate.max_w, self._nameplate.max_va)
        if rating > 0:
            for i, cp in enumerate(self._points):
                if (
                    cp.nameplate_factor is not None
                    and abs(values[i]) > cp.nameplate_factor * rating
                ):
                    outside[i] = True
        quality[uncertain | ~finite | outside] = Quality.OUT_OF_RANGE
        quality[bad] = Quality.BAD_COMM
        values[bad] = np.nan
        self._record_ok()
        return Reading(
            device_id=self._device_id,
            wall_ns=self._clock.wall_ns(),
            mono_ns=self._clock.mono_ns(),
            schema=schema,
            values=values,
            quality=quality,
            fault=status.fault_reason(schema, values, quality),
            grid_response=status.grid_response_reason(schema, values, quality),
        )

    def _bad_reading(self, schema: PointSchema, error: str) -> Reading:
        n = len(schema)
        return Reading(
            device_id=self._device_id,
            wall_ns=self._clock.wall_ns(),
            mono_ns=self._clock.mono_ns(),
            schema=schema,
            values=np.full(n, np.nan, dtype=np.float64),
            quality=np.full(n, Quality.BAD_COMM, dtype=np.uint8),
            error=error,
        )

    # ------------------------------------------------------------------ writes

    def _plan_write(self, sp: SafeSetpoint) -> tuple[list[tuple[str, float]], str | None]:
        """(node, value) pairs in write order, and a note for a request honoured only in part."""
        schema = self._schema
        assert schema is not None
        names = set(schema.names)
        if self._kind is DeviceKind.METER:
            raise _WriteRefused(f"{self._device_id} is a meter: it takes no setpoints")
        if sp.revert_after_s < 0:
            raise _WriteRefused(f"revert_after_s={sp.revert_after_s} is negative")
        has_cap = set(_CAP_NODES) <= names
        has_storage = set(_STORAGE_NODES) <= names
        if sp.active_power_w is not None and not (self._kind is DeviceKind.BATTERY and has_storage):
            raise _WriteRefused(
                f"{self._device_id} has no storage control nodes {_STORAGE_NODES} for "
                f"active_power_w={sp.active_power_w:g} W"
            )
        if sp.connect is not None and "Conn" not in names:
            raise _WriteRefused(f"{self._device_id} has no Conn node to connect/disconnect")
        if (
            sp.max_active_power_w is not None
            and not has_cap
            and (sp.active_power_w is None or sp.active_power_w > sp.max_active_power_w)
        ):
            raise _WriteRefused(
                f"{self._device_id} has no cap nodes {_CAP_NODES} to cap active power at "
                f"{sp.max_active_power_w:g} W"
            )
        revert = float(sp.revert_after_s)
        order: list[tuple[str, float]] = []
        note: str | None = None
        np_ = self._nameplate

        def gated(values: list[tuple[str, float]], gate: tuple[str, float], enabling: bool) -> None:
            order.extend([*values, gate] if enabling else [gate, *values])

        if self._kind is DeviceKind.BATTERY and has_storage:
            mode, in_pct, out_pct = 0.0, 0.0, 0.0
            w = sp.active_power_w
            if w is not None and w > 0:
                out_pct = min(w / _rating(np_.max_discharge_w, "WDisChaRteMaxRtg") * 100.0, 100.0)
                mode = float(_STOR_DISCHARGE)
            elif w is not None and w < 0:
                in_pct = min(-w / _rating(np_.max_charge_w, "WChaRteMaxRtg") * 100.0, 100.0)
                mode = float(_STOR_CHARGE)
            elif w is not None:
                mode = float(_STOR_CHARGE | _STOR_DISCHARGE)
            gated(
                [("OutWRte", out_pct), ("InWRte", in_pct), ("InOutWRteRvrtTms", revert)],
                ("StorCtlMod", mode),
                w is not None,
            )
        if has_cap:
            cap = sp.max_active_power_w
            if cap is None:
                pct, ena = 100.0, _DISABLED
            else:
                pct = min(max(cap / _rating(np_.max_w, "WMax") * 100.0, 0.0), 100.0)
                pct = math.floor(pct * 1e6) / 1e6  # never above what the kernel enforced
                ena = _ENABLED
            gated(
                [("WMaxLimPct", pct), ("WMaxLimPctRvrtTms", revert)],
                ("WMaxLimEna", ena),
                ena == _ENABLED,
            )
            if sp.revert_cap_w is not None:
                note = (
                    f"revert cap {sp.revert_cap_w:g} W not set: the namespace has no reversion "
                    "values, the device reverts to its own default (no limit)"
                )
        if sp.connect is not None:
            conn = ("Conn", _ENABLED if sp.connect else _DISABLED)
            order = [*order, conn] if sp.connect else [conn, *order]
        return order, note

    async def _write_locked(
        self, session: _Session, values: Sequence[tuple[str, float]], note: str | None
    ) -> WriteResult:
        nodes = [session.by_name[name] for name, _ in values]
        dvs = [
            ua.DataValue(
                ua.Variant(
                    _coerce(v, self._vtypes.get(n)), self._vtypes.get(n, ua.VariantType.Double)
                )
            )
            for n, v in values
        ]
        try:
            async with asyncio.timeout(self._params.timeout_s * 2 + 1.0):
                results = await session.client.uaclient.write_attributes(
                    [n.nodeid for n in nodes], dvs, AttributeIds.Value
                )
                refused = [
                    f"{name}: {code.name}"
                    for (name, _), code in zip(values, results, strict=True)
                    if not code.is_good()
                ]
                if refused:
                    return self._result(
                        False, reason=f"device refused the write: {'; '.join(refused)}"
                    )
                after = await session.client.read_attributes(nodes)
        except (TimeoutError, OSError, UaError) as exc:
            message = f"write failed on {self._address}: {_describe(exc)}"
            self._record_failure(message)
            return self._result(False, reason=message)
        readback: dict[str, float] = {}
        mismatches: list[str] = []
        for (name, want), dv in zip(values, after, strict=True):
            got = dv.Value.Value if dv.Value is not None else None
            try:
                got_f = float(got)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                got_f = math.nan
            readback[name] = got_f
            expected = float(_coerce(want, self._vtypes.get(name)))
            if not (dv.StatusCode is None or dv.StatusCode.is_good()) or got_f != expected:
                mismatches.append(f"{name}: wrote {expected:g}, read back {got_f:g}")
        self._record_ok()
        if mismatches:
            return self._result(
                False,
                readback=readback,
                reason="read-back mismatch (the device did not take the write): "
                + "; ".join(mismatches),
            )
        return self._result(True, readback=readback, reason=note)

    def _result(
        self, ok: bool, *, readback: Mapping[str, float] | None = None, reason: str | None = None
    ) -> WriteResult:
        return WriteResult(
            device_id=self._device_id,
            ok=ok,
            wall_ns=self._clock.wall_ns(),
            readback=dict(readback or {}),
            reason=reason,
        )

    # ------------------------------------------------------------------ health bookkeeping

    def _record_ok(self) -> None:
        self._health.ok(self._clock.mono_ns())

    def _record_failure(self, error: str) -> None:
        self._health.failed(error)


def _rating(value: float, name: str) -> float:
    if not (math.isfinite(value) and value > 0):
        raise _WriteRefused(f"no {name} rating on the device to convert watts into a percentage")
    return value


def _nameplate(found: Mapping[str, Any]) -> Nameplate:
    fields: dict[str, float] = {}
    for field_name, sources in _NAMEPLATE_NODES.items():
        for src in sources:
            try:
                v = float(found.get(src))  # type: ignore[arg-type]
            except (TypeError, ValueError):
                continue
            if math.isfinite(v) and v > 0:
                fields[field_name] = v
                break
    return Nameplate(**fields)


_INT_TYPES: Final = {
    ua.VariantType.Boolean,
    ua.VariantType.SByte,
    ua.VariantType.Byte,
    ua.VariantType.Int16,
    ua.VariantType.UInt16,
    ua.VariantType.Int32,
    ua.VariantType.UInt32,
    ua.VariantType.Int64,
    ua.VariantType.UInt64,
}


def _coerce(value: float, vtype: ua.VariantType | None) -> Any:
    """`value` as the Python type the node's data type needs (ints floor toward zero)."""
    if vtype is ua.VariantType.Boolean:
        return value >= 0.5
    if vtype in _INT_TYPES:
        return int(value)
    return float(value)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def _disconnect(client: Client) -> None:
    try:
        async with asyncio.timeout(1.0):
            await client.disconnect()
    except Exception:  # the link is already gone or going: nothing left to release remotely
        client.disconnect_socket()

"""A simulated battery PCS on OPC UA: an asyncua server over `hil.physics`.

Owns the binding between the pure physics (one `SitePhysics` with one battery, or a battery of a
caller's `SitePhysics`) and an OPC UA address space in the project namespace `NAMESPACE`
(protocols.md §6: no released companion spec models DER control, so a small namespace mirrors
the SunSpec names and units the SunSpec driver reports):

    Objects/
      <device>                 (Object, browse name ns:<device>)
        Mn, Md, SN             String   identity (SunSpec model 1)
        WMax, WChaRteMaxRtg, WDisChaRteMaxRtg, WHRtg      Double  nameplate (W, W, W, Wh)
        W, VA, Var, PF, Hz, V, A, SoC, WChaRteMax, WDisChaRteMax, WH        Double  measurements
        St, Evt1, BatState     UInt32   status (SunSpec 103 St / Evt1, 802 State)
        WMaxLimPct, WMaxLimEna, WMaxLimPctRvrtTms         writable: generation cap (SunSpec 123)
        StorCtlMod, InWRte, OutWRte, InOutWRteRvrtTms     writable: storage control (SunSpec 124)

Measurements are `AnalogItemType` variables with `EngineeringUnits` and `EURange` where the unit
is physical. Every variable has a stable string NodeId "<device>.<name>".

Control semantics (same as the Modbus simulator's model 123/124):
  * StorCtlMod / InWRte / OutWRte / InOutWRteRvrtTms drive `SitePhysics.set_battery_controls`
    (+ discharge at OutWRte % of the max discharge, - charge at InWRte % of WChaMax); the physics
    reverts StorCtlMod to 0 after InOutWRteRvrtTms without a write.
  * WMaxLimPct (% of WMax) with WMaxLimEna caps the discharge; the physics has no battery cap,
    so the simulator applies it by clamping the OutWRte it hands to the physics. Its revert timer
    (WMaxLimPctRvrtTms > 0) runs on simulated time: WMaxLimEna -> 0 when it expires without a
    write (model 123 has no reversion values).
  * Client writes (PostWrite callback) are queued and applied at the next physics step; values
    changed by the simulator itself (reverts) are written back to the nodes.

Security: the server offers None and Basic256Sha256 SignAndEncrypt with a self-signed
certificate generated into `cert_dir` (`make_self_signed`). It accepts any client certificate
(test equipment: no trust list).

Fault hooks: `stop_serving()` (the server goes away: connection refused), `restart()` (a fresh
server on the same endpoint; the physics kept running), `set_point_status(name, code)` (a bad or
uncertain StatusCode on one variable), `freeze(True)` (values stop updating). Broken OPC UA
streams (malformed messages, dropped messages) come from `hil.opcua_relay.OpcUaFaultRelay` in
front of the server.

Start-up: the standard address space is loaded from a shelf cached on disk
(`hil.opcua_aspace.new_server`, ~0.2 s instead of 2-5 s per start); `aspace_cache=False` builds it.
"""

# asyncua types its NodeId/StatusCode/DateTime arguments as NewTypes and exports little
# explicitly; the simulator (test equipment) passes plain ints/strs/datetimes as its docs do.
# mypy: disable-error-code="arg-type,attr-defined"
from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import logging
import math
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from asyncua import Node, Server, ua
from asyncua.common.callback import CallbackType, ServerItemCallback
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hil.opcua_aspace import new_server
from hil.physics import BatteryParams, PhysicsConfig, Profile, SitePhysics

log = logging.getLogger(__name__)

NAMESPACE = "urn:dergw:sim"
SERVER_APP_URI = "urn:dergw:sim:opcua-battery"
MANUFACTURER = "dergw-sim"
MODEL_NAME = "sim-battery-pcs-opcua"
ST_MPPT, ST_FAULT, ST_STANDBY = 4, 7, 8  # SunSpec 103 St
BAT_STATE_CONNECTED = 3  # SunSpec 802 State

# name -> (unit as served, UNECE code for EngineeringUnits or None, EURange or None)
_MEASUREMENTS: Mapping[str, tuple[str, str | None]] = {
    "W": ("W", "WTT"),
    "VA": ("VA", "D46"),
    "Var": ("var", "D44"),
    "PF": ("", None),
    "Hz": ("Hz", "HTZ"),
    "V": ("V", "VLT"),
    "A": ("A", "AMP"),
    "SoC": ("%", "P1"),
    "WChaRteMax": ("W", "WTT"),
    "WDisChaRteMax": ("W", "WTT"),
    "WH": ("Wh", "WHR"),
}
_NAMEPLATE = ("WMax", "WChaRteMaxRtg", "WDisChaRteMaxRtg", "WHRtg")
_STATUS = ("St", "Evt1", "BatState")
# writable control -> (initial value, low, high)
CONTROLS: Mapping[str, tuple[float, float, float]] = {
    "WMaxLimPct": (100.0, 0.0, 100.0),
    "WMaxLimEna": (0.0, 0.0, 1.0),
    "WMaxLimPctRvrtTms": (0.0, 0.0, 86400.0),
    "StorCtlMod": (0.0, 0.0, 3.0),
    "InWRte": (0.0, 0.0, 100.0),
    "OutWRte": (0.0, 0.0, 100.0),
    "InOutWRteRvrtTms": (0.0, 0.0, 86400.0),
}


_POLICIES: Mapping[str, ua.SecurityPolicyType] = {
    "none": ua.SecurityPolicyType.NoSecurity,
    "basic256sha256-sign-encrypt": ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
}


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def make_self_signed(
    directory: Path, stem: str, app_uri: str, *, server: bool, host: str = "127.0.0.1"
) -> tuple[Path, Path]:
    """A self-signed OPC UA application certificate (DER) and its key (PEM) in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, stem)])
    now = datetime.datetime.now(datetime.UTC)
    sans: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier(app_uri),
        x509.DNSName(socket.gethostname()),
        x509.DNSName("localhost"),
    ]
    with contextlib.suppress(ValueError):
        sans.append(x509.IPAddress(ipaddress.ip_address(host)))
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=True,
                key_encipherment=True,
                data_encipherment=True,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path = directory / f"{stem}.der"
    key_path = directory / f"{stem}.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.DER))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def default_physics(
    *,
    rating_w: float = 5000.0,
    capacity_wh: float = 10000.0,
    soc_pct: float = 50.0,
    load_w: float = 3000.0,
    seed: int = 1,
) -> SitePhysics:
    """A one-battery site (no PV) with a constant load: what the simulator runs by default."""

    def one(v: float) -> np.ndarray:
        return np.array([v], dtype=np.float64)

    config = PhysicsConfig(
        irradiance=Profile.from_points([(0.0, 0.0)]),
        load=Profile.from_points([(0.0, load_w)]),
        battery=BatteryParams(
            rating_w=one(rating_w),
            max_charge_w=one(rating_w),
            max_discharge_w=one(rating_w),
            capacity_wh=one(capacity_wh),
            efficiency=one(0.9),
            soc_min_pct=one(5.0),
            soc_max_pct=one(95.0),
            initial_soc_pct=one(soc_pct),
            ramp_pct_per_s=one(100.0),
        ),
    )
    return SitePhysics(config, seed=seed)


@dataclass
class _CapState:
    pct: float = 100.0
    ena: bool = False
    rvrt_s: float = 0.0
    written_t: float = 0.0
    armed: bool = False


class OpcUaBatterySim:
    """One battery PCS served over OPC UA. `async with OpcUaBatterySim(cert_dir=...) as sim:`."""

    def __init__(
        self,
        *,
        cert_dir: Path,
        physics: SitePhysics | None = None,
        battery_index: int = 0,
        device: str = "Battery1",
        serial: str = "bat-opcua-1",
        host: str = "127.0.0.1",
        port: int = 0,
        physics_hz: float = 10.0,
        step_physics: bool = True,
        policies: tuple[str, ...] = ("none", "basic256sha256-sign-encrypt"),
        aspace_cache: bool = True,
    ) -> None:
        self.physics = physics if physics is not None else default_physics()
        if not 0 <= battery_index < self.physics.n_bat:
            raise ValueError(f"battery_index {battery_index}: the physics has {self.physics.n_bat}")
        self.i = battery_index
        self.device = device
        self.serial = serial
        self.host = host
        self.port = port or _free_port(host)
        self.dt = 1.0 / physics_hz
        self.step_physics = step_physics  # False: a caller steps the shared physics
        self.policies = policies
        self.aspace_cache = aspace_cache  # standard address space from a shelf (hil.opcua_aspace)
        self.cert_path, self.key_path = make_self_signed(
            cert_dir, "sim-server", SERVER_APP_URI, server=True, host=host
        )
        self.server: Server | None = None
        self.ns = 0
        self.nodes: dict[str, Node] = {}
        self._nodeids: dict[ua.NodeId, str] = {}
        self._task: asyncio.Task[None] | None = None
        self._pending: dict[str, float] = {}
        self._controls: dict[str, float] = {k: v[0] for k, v in CONTROLS.items()}
        self._cap = _CapState()
        self._status: dict[str, ua.StatusCode] = {}
        self._frozen = False
        self._controls_seen = -1
        self.writes = 0

    @property
    def url(self) -> str:
        return f"opc.tcp://{self.host}:{self.port}/dergw-sim/"

    @property
    def root_path(self) -> str:
        """The browse path of the device object, as the driver's `root` param takes it."""
        return f"0:Objects/{self.ns}:{self.device}"

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        await self._start_server()
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"opcua-sim-{self.device}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.stop_serving()

    async def __aenter__(self) -> OpcUaBatterySim:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def stop_serving(self) -> None:
        """Fault: the server goes away (clients see the connection drop); physics continues."""
        server, self.server = self.server, None
        self.nodes.clear()
        self._nodeids.clear()
        if server is not None:
            # asyncua's stop() waits for its 1 s server-clock loop to wake up: cancel it instead.
            clock = getattr(server.iserver, "time_task", None)
            if isinstance(clock, asyncio.Task):
                clock.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await clock
                server.iserver.time_task = None
            await server.stop()

    async def restart(self) -> None:
        """A fresh server on the same endpoint (a rebooted device: sessions are gone)."""
        await self.stop_serving()
        await self._start_server()

    def set_point_status(self, name: str, code: int | None) -> None:
        """Serve `name` with StatusCode `code` (e.g. StatusCodes.BadSensorFailure); None = Good."""
        if code is None:
            self._status.pop(name, None)
        else:
            self._status[name] = ua.StatusCode(code)

    def freeze(self, frozen: bool) -> None:
        """Stop (or resume) updating the measurement nodes; writes still land."""
        self._frozen = frozen

    # --- address space ------------------------------------------------------------------------

    async def _start_server(self) -> None:
        server = await new_server(cache=self.aspace_cache)
        server.set_endpoint(self.url)
        server.set_server_name("dergw OPC UA battery PCS simulator")
        await server.set_application_uri(SERVER_APP_URI)
        await server.load_certificate(str(self.cert_path))
        await server.load_private_key(str(self.key_path))
        server.set_security_policy([_POLICIES[p] for p in self.policies])
        self.ns = await server.register_namespace(NAMESPACE)
        await self._build(server)
        await server.start()
        server.subscribe_server_callback(CallbackType.PostWrite, self._on_write)
        self.server = server
        self._controls_seen = -1
        await self._publish()
        log.info("OPC UA battery %s serving on %s", self.device, self.url)

    async def _build(self, server: Server) -> None:
        ns, dev = self.ns, self.device
        obj = await server.nodes.objects.add_object(ua.NodeId(dev, ns), ua.QualifiedName(dev, ns))
        self.nodes.clear()
        self._nodeids.clear()

        async def var(name: str, value: Any, vtype: ua.VariantType) -> Node:
            node = await obj.add_variable(
                ua.NodeId(f"{dev}.{name}", ns), ua.QualifiedName(name, ns), value, varianttype=vtype
            )
            self.nodes[name] = node
            self._nodeids[node.nodeid] = name
            return node

        async def analog(name: str, value: float, unit: str, code: str | None) -> Node:
            node = await obj.add_variable(
                ua.NodeId(f"{dev}.{name}", ns),
                ua.QualifiedName(name, ns),
                value,
                varianttype=ua.VariantType.Double,
                datatype=ua.NodeId(ua.ObjectIds.Double),
            )
            if code is not None:
                eu = ua.EUInformation()
                eu.NamespaceUri = "http://www.opcfoundation.org/UA/units/un/cefact"
                eu.UnitId = _unece_id(code)
                eu.DisplayName = ua.LocalizedText(unit)
                eu.Description = ua.LocalizedText(unit)
                await node.add_property(0, "EngineeringUnits", eu)
            self.nodes[name] = node
            self._nodeids[node.nodeid] = name
            return node

        bat = self.physics.config.battery
        await var("Mn", MANUFACTURER, ua.VariantType.String)
        await var("Md", MODEL_NAME, ua.VariantType.String)
        await var("SN", self.serial, ua.VariantType.String)
        nameplate = {
            "WMax": float(bat.rating_w[self.i]),
            "WChaRteMaxRtg": float(bat.max_charge_w[self.i]),
            "WDisChaRteMaxRtg": float(bat.max_discharge_w[self.i]),
            "WHRtg": float(bat.capacity_wh[self.i]),
        }
        for name, value in nameplate.items():
            await analog(
                name, value, "Wh" if name == "WHRtg" else "W", "WHR" if name == "WHRtg" else "WTT"
            )
        for name, (unit, code) in _MEASUREMENTS.items():
            await analog(name, 0.0, unit, code)
        for name in _STATUS:
            await var(name, ua.UInt32(0), ua.VariantType.UInt32)
        for name in CONTROLS:
            node = await analog(
                name, self._controls[name], "%" if "Pct" in name or "WRte" in name else "", None
            )
            await node.set_writable()

    # --- writes -------------------------------------------------------------------------------

    async def _on_write(self, event: ServerItemCallback, _dispatcher: Any) -> None:
        for req, res in zip(event.request_params.NodesToWrite, event.response_params, strict=False):
            name = self._nodeids.get(req.NodeId)
            if name is None or name not in CONTROLS or not res.is_good():
                continue
            value = req.Value.Value.Value if req.Value and req.Value.Value else None
            try:
                number = float(value)
            except (TypeError, ValueError):
                continue
            self._pending[name] = number
            self.writes += 1

    def _apply_pending(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        ph, i = self.physics, self.i
        lo_hi = {k: (v[1], v[2]) for k, v in CONTROLS.items()}
        for name, value in pending.items():
            lo, hi = lo_hi[name]
            self._controls[name] = min(max(value, lo), hi) if math.isfinite(value) else lo
        c = self._controls
        if {"WMaxLimPct", "WMaxLimEna", "WMaxLimPctRvrtTms"} & pending.keys():
            cap = self._cap
            cap.pct, cap.ena = c["WMaxLimPct"], c["WMaxLimEna"] >= 0.5
            cap.rvrt_s, cap.written_t = c["WMaxLimPctRvrtTms"], ph.t_s
            cap.armed = cap.rvrt_s > 0
        kwargs: dict[str, Any] = {"out_w_rte_pct": self._capped_out_pct()}
        if {"StorCtlMod", "InWRte", "OutWRte", "InOutWRteRvrtTms"} & pending.keys():
            kwargs |= {
                "stor_ctl_mod": int(c["StorCtlMod"]),
                "in_w_rte_pct": c["InWRte"],
                "rvrt_s": c["InOutWRteRvrtTms"],
            }
            ph.set_battery_controls(i, **kwargs)
        else:
            # A cap change alone: no storage write, so the storage revert timer keeps running.
            ph.bat_out_w_rte_pct[i] = kwargs["out_w_rte_pct"]
            ph.controls_version += 1

    def _capped_out_pct(self) -> float:
        out = self._controls["OutWRte"]
        cap = self._cap
        if not cap.ena:
            return out
        bat = self.physics.config.battery
        cap_w = float(bat.rating_w[self.i]) * cap.pct / 100.0
        return min(out, cap_w / float(bat.max_discharge_w[self.i]) * 100.0)

    def _apply_cap_revert(self) -> None:
        cap, ph = self._cap, self.physics
        if cap.armed and ph.t_s - cap.written_t >= cap.rvrt_s:
            cap.armed = False
            cap.ena = False
            self._controls["WMaxLimEna"] = 0.0
            ph.bat_out_w_rte_pct[self.i] = self._capped_out_pct()
            ph.controls_version += 1

    # --- physics loop -------------------------------------------------------------------------

    def step(self) -> None:
        """Apply queued writes, advance the physics (unless shared), apply the cap revert."""
        self._apply_pending()
        if self.step_physics:
            self.physics.step(self.dt)
        self._apply_cap_revert()
        ph, i = self.physics, self.i
        if ph.bat_stor_ctl_mod[i] != int(self._controls["StorCtlMod"]):
            self._controls["StorCtlMod"] = float(ph.bat_stor_ctl_mod[i])  # physics revert

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time() + self.dt
        while True:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            self.step()
            next_at += self.dt
            if next_at < loop.time():
                next_at = loop.time() + self.dt
            if self.server is not None:
                try:
                    await self._publish()
                except Exception:  # a stopping server: the next tick retries
                    log.debug("publish failed", exc_info=True)

    def measurements(self) -> dict[str, float]:
        """The values the nodes serve now (physics truth, SunSpec names and units)."""
        ph, i = self.physics, self.i
        cfg = ph.config
        ac = float(ph.bat_ac_w[i])
        v = float(np.mean(ph.grid_v))
        var = 0.0
        va = math.hypot(ac, var)
        tripped = bool(ph.bat_tripped[i])
        return {
            "W": ac,
            "VA": va,
            "Var": var,
            "PF": 1.0 if va < 1e-9 else ac / va,
            "Hz": float(ph.grid_hz),
            "V": v,
            "A": va / (3.0 * v) if v > 0 else 0.0,
            "SoC": float(ph.bat_soc_pct[i]),
            "WChaRteMax": float(ph.bat_cha_lim_w[i]),
            "WDisChaRteMax": float(ph.bat_dis_lim_w[i]),
            "WH": float(ph.bat_discharged_wh[i]) + 100_000.0,
            "St": float(ST_FAULT if tripped else ST_MPPT if abs(ac) > 1.0 else ST_STANDBY),
            "Evt1": 1.0 if tripped else 0.0,  # GROUND_FAULT bit
            "BatState": float(BAT_STATE_CONNECTED),
            "_hz_nominal": float(cfg.nominal_hz),
        }

    async def _publish(self) -> None:
        server = self.server
        if server is None:
            return
        now = datetime.datetime.now(datetime.UTC)
        values = {} if self._frozen else self.measurements()
        values.pop("_hz_nominal", None)
        ph = self.physics
        if ph.controls_version != self._controls_seen:
            self._controls_seen = ph.controls_version
            values |= self._controls
        for name, value in values.items():
            node = self.nodes.get(name)
            if node is None:
                continue
            if name in _STATUS:
                variant = ua.Variant(ua.UInt32(int(value)), ua.VariantType.UInt32)
            else:
                variant = ua.Variant(float(value), ua.VariantType.Double)
            status = self._status.get(name, ua.StatusCode(ua.StatusCodes.Good))
            dv = ua.DataValue(variant, StatusCode=status, SourceTimestamp=now, ServerTimestamp=now)
            await server.write_attribute_value(node.nodeid, dv)

    def controls(self) -> dict[str, float]:
        """The control values in force (as served back to clients)."""
        return dict(self._controls)


def _unece_id(code: str) -> int:
    """The UNECE common code packed as OPC 10000-8 EUInformation.UnitId."""
    n = 0
    for ch in code:
        n = (n << 8) | ord(ch)
    return n

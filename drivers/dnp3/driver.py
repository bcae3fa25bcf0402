"""DNP3 (IEEE 1815.2 / AN2018-001) plant-controller driver behind the driver contract.

The DNP3 master itself runs in a child process (`drivers.dnp3.worker`, one per device) with one
of two backends: `dnp3py` (pure Python) or `pydnp3` (C++ opendnp3 binding, built by
packaging/pydnp3/build-wheel). The driver talks to it over a pipe (drivers.dnp3.protocol). When
the child dies (a native crash, a kill) or stops answering, the driver reports every point
BAD_COMM, counts the failure and starts a new child after a backoff that doubles on each failed
restart (`restart_backoff_s` .. `restart_backoff_max_s`) and resets on the first good read.

Reads: an integrity poll (class 1/2/3 events, then class 0) on every read by default; with
`poll = "events"` a class 1/2/3 poll, with an integrity poll every `integrity_interval_s` and
after every (re)connection.

Writes (AN2018-001 pattern, Active Power Limit function):
  cap    -> AO85 reversion timeout = revert_after_s, AO87 limit = cap in 0.1 % of WMax (AI32,
            floored so the device never exceeds the cap), then BO17 latch on (enable);
  no cap -> BO17 latch off;
  connect-> BO5 latch on (close) / off (open).
Analog outputs are 32-bit (g41v1); `control_mode` picks select-before-operate (default) or
direct operate. Verified by read-back of the mirror inputs: AI145, AI148, BI69, BI23.
1815.2 has no reversion *value* for the limit (the device reverts to no limit), so a
`revert_cap_w` lands as a note on an ok result, as on SunSpec model 123.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import math
import os
import signal
import sys
import time
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

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
from drivers.dnp3 import points as P
from drivers.dnp3.protocol import BACKENDS, decode, encode
from gateway.clock import Clock

if TYPE_CHECKING:
    from gateway.safety import SafeSetpoint

__all__ = ["PROTOCOL", "Dnp3Driver", "Dnp3Params", "available_backends"]

PROTOCOL = "dnp3-tcp"
# The checkout holding `drivers` (the child imports drivers.dnp3.worker from it).
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_FLAG_ONLINE = 0x01
_FLAG_COMM_LOST = 0x04
_FLAG_OVER_RANGE = 0x20  # analog inputs only
_STATUS = {
    1: "TIMEOUT",
    2: "NO_SELECT",
    3: "FORMAT_ERROR",
    4: "NOT_SUPPORTED",
    5: "ALREADY_ACTIVE",
    6: "HARDWARE_ERROR",
    7: "LOCAL",
    8: "TOO_MANY_OBJS",
    9: "NOT_AUTHORIZED",
    10: "AUTOMATION_INHIBIT",
    11: "PROCESSING_LIMITED",
    12: "OUT_OF_RANGE",
}


def available_backends() -> list[str]:
    """The backends usable on this machine (library installed and backend module present)."""
    found = []
    for name, lib in (("pydnp3", "pydnp3"), ("dnp3py", "dnp3")):
        if importlib.util.find_spec(lib) is None:
            continue
        if importlib.util.find_spec(BACKENDS[name]) is not None:
            found.append(name)
    return found


class Dnp3Params(BaseModel):
    """The `params` table of a `driver = "dnp3"` device (a 1815.2 DER plant controller)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str
    port: int = Field(default=20000, ge=1, le=65535)
    outstation_address: int = Field(default=10, ge=0, le=65519)
    master_address: int = Field(default=1, ge=0, le=65519)
    backend: Literal["auto", "dnp3py", "pydnp3"] = "auto"
    control_mode: Literal["select_before_operate", "direct"] = "select_before_operate"
    poll: Literal["integrity", "events"] = "integrity"
    integrity_interval_s: float = Field(default=60.0, gt=0.0)
    timeout_s: float = Field(default=2.0, gt=0.0, le=60.0)
    restart_backoff_s: float = Field(default=0.5, gt=0.0, le=60.0)
    restart_backoff_max_s: float = Field(default=30.0, gt=0.0, le=3600.0)
    max_w: float = Field(default=0.0, ge=0.0)  # WMax override when AI32 is not served


class _ChildGone(Exception):
    """The worker process died or stopped answering."""


class _OpError(Exception):
    """The worker answered with an error."""


class Dnp3Driver:
    def __init__(self, device_id: str, kind: DeviceKind, params: Dnp3Params, clock: Clock) -> None:
        kind = DeviceKind(kind)
        if kind is not DeviceKind.PV:
            raise DriverError(
                f"{device_id}: the DNP3 driver models a PV plant controller (kind pv)"
            )
        self._device_id = device_id
        self._kind = kind
        self._params = params
        self._clock = clock
        self._backend = self._pick_backend(params.backend)
        self._address = f"{params.host}:{params.port}/outstation {params.outstation_address}"
        self._lock = asyncio.Lock()
        self._proc: asyncio.subprocess.Process | None = None
        self._next_id = 0
        self._opened = False
        self._restart_at = 0.0  # monotonic s before which no new child is started
        self._backoff = params.restart_backoff_s
        self._last_integrity = -math.inf
        self._points: tuple[P.Dnp3Point, ...] = P.PV_POINTS
        self._schema = PointSchema(
            names=tuple(p.name for p in self._points),
            units=tuple(p.unit for p in self._points),
            writable=P.CONTROLS,
        )
        self._info: DeviceInfo | None = None
        self._max_w = params.max_w
        self._health = HealthTracker()
        self.restarts = 0  # children started after the first
        self.children_started = 0
        self.malformed = 0  # answers or responses that could not be decoded

    # --- contract -----------------------------------------------------------------------------

    @property
    def device_id(self) -> str:
        return self._device_id

    @property
    def backend(self) -> str:
        return self._backend

    @property
    def backend_pid(self) -> int | None:
        """The worker child's pid (tests kill it to simulate a native crash)."""
        p = self._proc
        return p.pid if p is not None and p.returncode is None else None

    async def connect(self) -> DeviceInfo:
        async with self._lock:
            try:
                await self._ensure_child(force=True)
                raw = await self._poll(integrity=True)
            except (_ChildGone, _OpError) as exc:
                self._fail(str(exc))
                raise DriverError(
                    f"{self._device_id}: DNP3 outstation {self._address} not reachable "
                    f"({exc}); check host, port and outstation/master addresses"
                ) from exc
        self._ok()
        present = {(k, int(r[0])) for k in ("ai", "bi", "bo") for r in raw[k]}
        pts = tuple(p for p in P.PV_POINTS if (p.kind.value, p.index) in present)
        if not any(p.name == "W" for p in pts):
            raise DriverError(f"{self._device_id}: outstation serves no AI537 (active power)")
        self._points = pts
        self._schema = PointSchema(
            names=tuple(p.name for p in pts),
            units=tuple(p.unit for p in pts),
            writable=P.CONTROLS & {p.name for p in pts},
        )
        ai = {int(r[0]): float(r[1]) for r in raw["ai"] if int(r[2]) & _FLAG_ONLINE}
        plate = {k: max(ai.get(i, 0.0), 0.0) for k, i in P.NAMEPLATE_MAX_W.items()}
        if self._params.max_w > 0:
            plate["max_w"] = self._params.max_w
        self._max_w = plate["max_w"]
        controls = {Control.GENERATION_CAP} if "WMaxLimPct" in self._schema.index else set()
        if "Conn" in self._schema.index:
            controls.add(Control.CONNECT)
        self._info = DeviceInfo(
            device_id=self._device_id,
            kind=self._kind,
            protocol=PROTOCOL,
            address=self._address,
            manufacturer="",
            model="IEEE 1815.2 DER plant controller",
            serial_number=f"dnp3:{self._params.outstation_address}",
            nameplate=Nameplate(**plate),
            schema=self._schema,
            controls=frozenset(controls),
        )
        return self._info

    async def read(self) -> Reading:
        async with self._lock:
            try:
                await self._ensure_child()
                now = time.monotonic()
                integrity = (
                    self._params.poll == "integrity"
                    or now - self._last_integrity >= self._params.integrity_interval_s
                )
                raw = await self._poll(integrity)
            except (_ChildGone, _OpError) as exc:
                self._fail(str(exc))
                return self._bad(str(exc))
        return self._reading(raw)

    async def write(self, setpoint: SafeSetpoint) -> WriteResult:
        check_setpoint(setpoint, self._device_id)
        if setpoint.active_power_w is not None:
            return self._result(False, reason="a PV plant controller takes no active-power target")
        notes: list[str] = []
        analog: list[tuple[int, int]] = []
        crob: list[tuple[int, str]] = []
        expect: dict[tuple[str, int], float] = {}
        if setpoint.max_active_power_w is not None:
            if self._max_w <= 0:
                return self._result(False, reason="no WMax (AI32) to scale the cap; set max_w")
            pct = min(max(setpoint.max_active_power_w / self._max_w * 100.0, 0.0), 100.0)
            raw = math.floor(pct * 10.0 + 1e-9)
            revert = max(int(setpoint.revert_after_s), 0)
            analog = [(P.AO.WLIM_RVRT_S, revert), (P.AO.WLIM_MAX_PCT, raw)]
            crob.append((P.BO.WLIM_ENABLE, "latch_on"))
            expect |= {("ai", P.AI.WLIM_RVRT_S): revert, ("ai", P.AI.WLIM_MAX_PCT): raw}
            expect[("bi", P.BI.WLIM_ENABLED)] = 1.0
            if setpoint.revert_cap_w is not None:
                notes.append(
                    f"revert cap {setpoint.revert_cap_w:g} W not set: 1815.2 has no reversion "
                    "value for the active power limit, the plant reverts to no limit"
                )
        else:
            crob.append((P.BO.WLIM_ENABLE, "latch_off"))
            expect[("bi", P.BI.WLIM_ENABLED)] = 0.0
        if setpoint.connect is not None:
            crob.append((P.BO.CONNECT, "latch_on" if setpoint.connect else "latch_off"))
            expect[("bi", P.BI.SWITCH_CLOSED)] = 1.0 if setpoint.connect else 0.0
        mode = "sbo" if self._params.control_mode == "select_before_operate" else "direct"
        async with self._lock:
            try:
                await self._ensure_child()
                # Setpoints first, then the enables (the value is in place before it applies).
                for ops, what in ((analog, "analog"), (crob, "crob")):
                    if not ops:
                        continue
                    ans = await self._call(
                        {"op": "operate", "mode": mode, what: [list(o) for o in ops]}
                    )
                    bad = [
                        f"{'AO' if what == 'analog' else 'BO'}{ops[i][0]}: "
                        f"{_STATUS.get(int(s), str(s))}"
                        for i, s in enumerate(ans.get("status", []))
                        if int(s) != 0
                    ]
                    if bad:
                        return self._result(False, reason="refused: " + ", ".join(bad))
                raw_back = await self._poll(integrity=True)
            except (_ChildGone, _OpError) as exc:
                self._fail(str(exc))
                return self._result(False, reason=str(exc))
        got = {(k, int(r[0])): float(r[1]) for k in ("ai", "bi") for r in raw_back[k]}
        readback = {f"{k.upper()}{i}": v for (k, i), v in got.items() if (k, i) in expect}
        mismatch = [
            f"{k.upper()}{i}={got.get((k, i))} (wrote {v:g})"
            for (k, i), v in expect.items()
            if got.get((k, i)) != v
        ]
        if mismatch:
            return self._result(False, readback, "read-back differs: " + ", ".join(mismatch))
        return self._result(True, readback, "; ".join(notes) or None)

    def health(self) -> DriverHealth:
        return self._health.snapshot()

    async def close(self) -> None:
        async with self._lock:
            await self._stop_child()
            self._health.state = LinkState.DISCONNECTED

    # --- child process ------------------------------------------------------------------------

    @staticmethod
    def _pick_backend(name: str) -> str:
        have = available_backends()
        if name == "auto":
            if not have:
                raise DriverError("no DNP3 backend installed: pip install 'dergw[dnp3]'")
            return have[0]
        if name not in have:
            raise DriverError(f"DNP3 backend {name!r} is not installed (have: {have or 'none'})")
        return name

    async def _ensure_child(self, force: bool = False) -> None:
        p = self._proc
        if p is not None and p.returncode is None and self._opened:
            return
        now = time.monotonic()
        if p is not None:
            died = p.returncode is not None
            await self._stop_child()
            if died and not force:
                # Report this read BAD_COMM; a new child comes after the backoff.
                self._restart_at = now + self._backoff
                raise _ChildGone(f"DNP3 master process exited (rc {p.returncode})")
        if not force and now < self._restart_at:
            raise _ChildGone(f"DNP3 master process down; restart in {self._restart_at - now:.1f} s")
        # Back off before the next attempt in case this one fails too.
        self._restart_at = now + self._backoff
        self._backoff = min(self._backoff * 2.0, self._params.restart_backoff_max_s)
        env = dict(os.environ)
        root = _ROOT
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "drivers.dnp3.worker",
            "--backend",
            self._backend,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
            limit=1 << 20,
        )
        if self.children_started:
            self.restarts += 1
        self.children_started += 1
        prm = self._params
        # The child reconnects on its own before each request; once it has the settings it is
        # "open", even when this first connection attempt fails (reported as this call's error).
        self._last_integrity = -math.inf
        self._opened = True
        await self._call(
            {
                "op": "open",
                "host": prm.host,
                "port": prm.port,
                "master": prm.master_address,
                "outstation": prm.outstation_address,
                "timeout_s": prm.timeout_s,
                "points": P.group_indices(P.PV_POINTS),
            },
            wait_s=prm.timeout_s * 2 + 10.0,  # a cold child imports its backend first
        )

    async def _stop_child(self) -> None:
        p, self._proc, self._opened = self._proc, None, False
        if p is None:
            return
        if p.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGKILL)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(p.wait(), 5.0)

    async def _call(self, req: dict[str, Any], wait_s: float | None = None) -> dict[str, Any]:
        p = self._proc
        if p is None or p.stdin is None or p.stdout is None or p.returncode is not None:
            self._opened = False
            raise _ChildGone("DNP3 master process not running")
        self._next_id += 1
        req["id"] = self._next_id
        # A select-before-operate is two exchanges; allow for both plus the pipe.
        limit = wait_s if wait_s is not None else self._params.timeout_s * 2 + 1.0
        try:
            p.stdin.write(encode(req))
            await p.stdin.drain()
            line = await asyncio.wait_for(p.stdout.readline(), limit)
        except TimeoutError:
            await self._stop_child()
            raise _ChildGone(f"DNP3 master process did not answer within {limit:g} s") from None
        except (OSError, ValueError) as exc:  # broken pipe, over-long line
            await self._stop_child()
            raise _ChildGone(f"DNP3 master process pipe: {exc}") from exc
        if not line:
            rc = await p.wait()
            self._proc, self._opened = None, False
            self._restart_at = time.monotonic() + self._backoff
            raise _ChildGone(f"DNP3 master process exited (rc {rc})")
        try:
            ans = decode(line)
        except ValueError as exc:
            self.malformed += 1
            await self._stop_child()
            raise _ChildGone(f"DNP3 master process answered garbage: {exc}") from exc
        if ans.get("id") != req["id"]:
            self.malformed += 1
            await self._stop_child()
            raise _ChildGone("DNP3 master process answered out of order")
        if not ans.get("ok"):
            err = str(ans.get("error", "unknown error"))
            if "parse" in err.lower() or "malformed" in err.lower() or "crc" in err.lower():
                self.malformed += 1
            raise _OpError(err)
        return ans

    async def _poll(self, integrity: bool) -> dict[str, Any]:
        ans = await self._call({"op": "poll", "classes": "integrity" if integrity else "events"})
        if integrity:
            self._last_integrity = time.monotonic()
        return ans

    # --- readings -----------------------------------------------------------------------------

    def _reading(self, raw: dict[str, Any]) -> Reading:
        pts = self._points
        n = len(pts)
        values = np.full(n, np.nan)
        quality = np.full(n, Quality.NOT_IMPLEMENTED, dtype=np.uint8)
        got = {(k, int(r[0])): (float(r[1]), int(r[2])) for k in ("ai", "bi", "bo") for r in raw[k]}
        for i, p in enumerate(pts):
            v = got.get((p.kind.value, p.index))
            if v is None:
                continue
            val, flags = v
            if not flags & _FLAG_ONLINE or flags & _FLAG_COMM_LOST:
                quality[i] = Quality.BAD_COMM
                continue
            eng = val * p.scale
            values[i] = eng
            over = p.kind is P.Kind.AI and flags & _FLAG_OVER_RANGE
            ok = math.isfinite(eng) and p.valid_min <= eng <= p.valid_max and not over
            quality[i] = Quality.GOOD if ok else Quality.OUT_OF_RANGE
        fault = None
        alarm = got.get(("bi", P.BI.P1_ALARM))
        if alarm is not None and alarm[0] >= 1.0:
            fault = "DNP3 BI1: the plant reports priority 1 alarms"
        self._ok()
        return Reading(
            device_id=self._device_id,
            wall_ns=self._clock.wall_ns(),
            mono_ns=self._clock.mono_ns(),
            schema=self._schema,
            values=values,
            quality=quality,
            fault=fault,
        )

    def _bad(self, error: str) -> Reading:
        n = len(self._schema)
        return Reading(
            device_id=self._device_id,
            wall_ns=self._clock.wall_ns(),
            mono_ns=self._clock.mono_ns(),
            schema=self._schema,
            values=np.full(n, np.nan),
            quality=np.full(n, Quality.BAD_COMM, dtype=np.uint8),
            error=error,
        )

    def _ok(self) -> None:
        self._health.ok(self._clock.mono_ns())
        self._backoff = self._params.restart_backoff_s

    def _fail(self, error: str) -> None:
        self._health.failed(error)

    def _result(
        self, ok: bool, readback: dict[str, float] | None = None, reason: str | None = None
    ) -> WriteResult:
        return WriteResult(
            device_id=self._device_id,
            ok=ok,
            wall_ns=self._clock.wall_ns(),
            readback=readback or {},
            reason=reason,
        )

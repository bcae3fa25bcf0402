"""Site files for the simulator: the TOML schema, its validation, and loading.

Owns the shape of `hil/sites/*.toml`. A site is a name, a seed, a physics rate, the address the
Modbus servers listen on, the grid and the inverters' frequency response, two looping profiles
(irradiance in W/m², site load in W) and a list of devices (PV inverters on the 1xx or 7xx
SunSpec models, batteries, one PCC meter). Validation is strict (`extra="forbid"`) and
every error names the offending key, so a typo in a site file fails loudly instead of silently
simulating something else.

Port rules: devices without a `port` share one Modbus TCP server on the site's `port`; devices
with the same explicit `port` share that server; a device with `port = 0` gets a server of its
own on a free port. Port 0 anywhere means "pick a free port" (reported in the endpoints and the
manifest).

Protocols (`protocol` per device, default "modbus-tcp"): "modbus-rtu" devices share one RS-485
bus (a socat pty pair; distinct unit ids; no `port`); "opcua" serves a battery as an OPC UA
server of its own (`port`, default any free port); "dnp3" serves a PV inverter (family "1xx") as
an IEEE 1815.2 plant controller (outstation address = `unit_id`, `port` default any free port).
Every device runs on the one site physics whatever its protocol, so the PCC meter sees them all.
"""

from __future__ import annotations

import itertools
import re
import tomllib
from collections import Counter
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DeviceKind = Literal["pv", "battery", "meter"]
# Which SunSpec models a device serves: "1xx" = 1/103/120/121/123 (PV), 1/103/120/124/802
# (battery); "7xx" = the IEEE 1547-2018 models 1/701/702/704 (PV only).
ModelFamily = Literal["1xx", "7xx"]
# How a device is served: Modbus TCP (SunSpec), Modbus RTU (SunSpec on the site's RS-485 bus),
# OPC UA (batteries) or DNP3 / IEEE 1815.2 (PV plant controllers).
Protocol = Literal["modbus-tcp", "modbus-rtu", "opcua", "dnp3"]

# SunSpec common model (1) stores the serial number (= device id) in a 16-register string.
_MAX_ID_CHARS = 32
_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class SiteFileError(ValueError):
    """A site file is missing, is not TOML, or does not match the schema."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


ProfilePoint = tuple[Annotated[float, Field(ge=0)], Annotated[float, Field(ge=0)]]


class ProfilesSpec(_Strict):
    """Looping, linearly interpolated profiles: lists of `[t_s, value]`, first t = 0.

    The profile repeats with period = last t; make the last value equal the first for a
    seamless loop. A single point is a constant.
    """

    irradiance: list[ProfilePoint] = Field(default_factory=lambda: [(0.0, 850.0)])
    load: list[ProfilePoint] = Field(default_factory=lambda: [(0.0, 3000.0)])
    irradiance_noise_pct: float = Field(default=1.0, ge=0, le=20)
    load_noise_pct: float = Field(default=1.0, ge=0, le=20)

    @field_validator("irradiance", "load")
    @classmethod
    def _check_profile(cls, points: list[ProfilePoint]) -> list[ProfilePoint]:
        if not points:
            raise ValueError("needs at least one [t_s, value] point")
        if points[0][0] != 0:
            raise ValueError(f"first point must be at t_s = 0, got {points[0][0]}")
        times = [t for t, _ in points]
        if any(b <= a for a, b in itertools.pairwise(times)):
            raise ValueError("t_s values must be strictly increasing")
        return points


class GridSpec(_Strict):
    """The grid at the PCC: nominal voltage (line-to-neutral) and frequency, plus noise."""

    nominal_v: float = Field(default=230.0, gt=0, le=1000)
    nominal_hz: Literal[50, 60] = 50
    v_noise: float = Field(default=0.5, ge=0, le=20)
    hz_noise: float = Field(default=0.01, ge=0, le=1)


class FrequencyResponseSpec(_Strict):
    """IEEE 1547-2018 frequency droop of every inverter (protocols.md §3.3): 0 % = none."""

    droop_pct: float = Field(default=5.0, ge=0, le=100)
    deadband_hz: float = Field(default=0.036, ge=0, le=5)


class DeviceSpec(_Strict):
    """One simulated SunSpec device."""

    id: str
    kind: DeviceKind
    family: ModelFamily = "1xx"
    protocol: Protocol = "modbus-tcp"
    unit_id: int = Field(ge=1, le=247)
    port: int | None = Field(default=None, ge=0, le=65535)
    base_address: Literal[0, 40000, 50000] = 40000
    role: Literal["pcc"] | None = None
    rating_w: float | None = Field(default=None, gt=0, le=1_000_000)
    ramp_pct_per_s: float = Field(default=50.0, gt=0, le=1000)
    # Battery only.
    capacity_wh: float | None = Field(default=None, gt=0, le=10_000_000)
    soc_pct: float = Field(default=50.0, ge=0, le=100)
    soc_min_pct: float = Field(default=5.0, ge=0, le=100)
    soc_max_pct: float = Field(default=95.0, ge=0, le=100)
    efficiency: float = Field(default=0.92, gt=0.5, le=1.0)
    max_charge_w: float | None = Field(default=None, gt=0)
    max_discharge_w: float | None = Field(default=None, gt=0)
    # Register scaling: the W scale factor (None = the smallest that fits the rating) and the
    # WMaxLimPct / InOutWRte scale factor. Non-zero values make client scaling bugs visible.
    w_sf: int | None = Field(default=None, ge=-2, le=3)
    pct_sf: Literal[-2, -1, 0] = -1

    @field_validator("id")
    @classmethod
    def _check_id(cls, value: str) -> str:
        if len(value) > _MAX_ID_CHARS or not _ID_PATTERN.match(value):
            raise ValueError(
                f"device id {value!r} must be 1-{_MAX_ID_CHARS} characters of letters, digits, "
                "'_', '.', '-' (it is served as the SunSpec serial number)"
            )
        return value

    @model_validator(mode="after")
    def _check_kind_fields(self) -> DeviceSpec:
        if self.kind in ("pv", "battery") and self.rating_w is None:
            raise ValueError(f"device {self.id!r}: kind {self.kind!r} needs rating_w")
        if self.kind == "battery":
            if self.capacity_wh is None:
                raise ValueError(f"device {self.id!r}: kind 'battery' needs capacity_wh")
            if not self.soc_min_pct < self.soc_max_pct:
                raise ValueError(f"device {self.id!r}: soc_min_pct must be below soc_max_pct")
        else:
            extra = [
                key
                for key in ("capacity_wh", "max_charge_w", "max_discharge_w")
                if getattr(self, key) is not None
            ]
            if extra:
                raise ValueError(f"device {self.id!r}: {', '.join(extra)} only apply to batteries")
        if self.family == "7xx" and self.kind != "pv":
            raise ValueError(
                f"device {self.id!r}: family '7xx' (models 701/702/704) is simulated for PV "
                "inverters only; use family '1xx' for batteries and meters"
            )
        if self.kind == "meter":
            if self.role != "pcc":
                raise ValueError(
                    f"device {self.id!r}: meters are simulated at the PCC only; set role = 'pcc'"
                )
            if self.rating_w is not None:
                raise ValueError(f"device {self.id!r}: rating_w does not apply to meters")
        elif self.role is not None:
            raise ValueError(f"device {self.id!r}: role only applies to meters")
        self._check_protocol()
        return self

    def _check_protocol(self) -> None:
        if self.protocol == "opcua" and self.kind != "battery":
            raise ValueError(
                f"device {self.id!r}: protocol 'opcua' is simulated for batteries only "
                "(the OPC UA battery PCS)"
            )
        if self.protocol == "dnp3" and (self.kind != "pv" or self.family != "1xx"):
            raise ValueError(
                f"device {self.id!r}: protocol 'dnp3' is simulated for PV inverters of family "
                "'1xx' only (an IEEE 1815.2 plant controller)"
            )
        if self.protocol == "modbus-rtu" and self.port is not None:
            raise ValueError(
                f"device {self.id!r}: port does not apply to protocol 'modbus-rtu' (the site's "
                "RS-485 bus is a pty pair)"
            )
        if self.protocol in ("opcua", "dnp3") and self.base_address != 40000:
            raise ValueError(f"device {self.id!r}: base_address only applies to Modbus protocols")

    @property
    def charge_w(self) -> float:
        """Nameplate max charge power (defaults to the inverter rating)."""
        return float(self.max_charge_w or self.rating_w or 0.0)

    @property
    def discharge_w(self) -> float:
        """Nameplate max discharge power (defaults to the inverter rating)."""
        return float(self.max_discharge_w or self.rating_w or 0.0)


class SiteSpec(_Strict):
    """A whole simulated site (one TOML file)."""

    name: str = Field(min_length=1, max_length=64)
    seed: int = Field(default=0, ge=0)
    physics_hz: float = Field(default=20.0, ge=10, le=1000)
    host: str = "127.0.0.1"
    port: int = Field(default=5020, ge=0, le=65535)
    grid: GridSpec = Field(default_factory=GridSpec)
    frequency_response: FrequencyResponseSpec = Field(default_factory=FrequencyResponseSpec)
    profiles: ProfilesSpec = Field(default_factory=ProfilesSpec)
    devices: list[DeviceSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _check_devices(self) -> SiteSpec:
        dup_ids = [i for i, n in Counter(d.id for d in self.devices).items() if n > 1]
        if dup_ids:
            raise ValueError(f"duplicate device id(s): {', '.join(sorted(dup_ids))}")
        meters = [d.id for d in self.devices if d.kind == "meter"]
        if len(meters) > 1:
            raise ValueError(f"a site has at most one PCC meter, got {', '.join(meters)}")
        seen: dict[tuple[object, int], str] = {}
        for device in self.devices:
            if device.protocol in ("opcua", "dnp3"):
                continue  # a server of their own each
            bus: object = "rtu" if device.protocol == "modbus-rtu" else self.server_key(device)
            key = (bus, device.unit_id)
            if key in seen:
                where = "the RS-485 bus" if bus == "rtu" else f"port {key[0]}"
                raise ValueError(
                    f"devices {seen[key]!r} and {device.id!r} share {where} and unit_id "
                    f"{device.unit_id}; give one of them another unit_id or port"
                )
            seen[key] = device.id
        return self

    def server_key(self, device: DeviceSpec) -> int | str:
        """Which Modbus server a device is served by: a port, or a private free-port server."""
        if device.port is None:
            return self.port if self.port != 0 else "site:0"
        if device.port == 0:
            return f"own:{device.id}"
        # An explicit port equal to the site port lands on the shared site server.
        return device.port

    def with_overrides(
        self, *, seed: int | None = None, host: str | None = None, port: int | None = None
    ) -> SiteSpec:
        """A copy with CLI overrides applied (re-validated)."""
        data = self.model_dump()
        if seed is not None:
            data["seed"] = seed
        if host is not None:
            data["host"] = host
        if port is not None:
            data["port"] = port
        return SiteSpec.model_validate(data)


def _format_errors(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(part) for part in err["loc"]) or "(top level)"
        lines.append(f"  {where}: {err['msg']}")
    return "\n".join(lines)


def parse_site(text: str, *, source: str = "<site>") -> SiteSpec:
    """Parse and validate site TOML text; raises SiteFileError naming the bad key."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SiteFileError(f"{source}: not valid TOML: {exc}") from exc
    try:
        return SiteSpec.model_validate(data)
    except ValidationError as exc:
        raise SiteFileError(
            f"{source}: invalid site file ({exc.error_count()} error(s)):\n{_format_errors(exc)}"
        ) from exc


def load_site(path: str | Path) -> SiteSpec:
    """Read and validate a site file; raises SiteFileError with a message saying what to fix."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise SiteFileError(f"cannot read site file {file}: {exc.strerror or exc}") from exc
    return parse_site(text, source=str(file))

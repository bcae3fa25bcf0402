"""Device profiles as data: a TOML file maps Modbus registers to canonical DER points.

    [profile]
    name = "eastron-sdm630"
    kind = "meter"                 # pv | battery | meter
    manufacturer = "Eastron"
    model = "SDM630"
    word_order = "big"             # default for 32-bit types: "big" = high word first

    [nameplate]                    # optional ratings in W / VA / var / Wh (drivers.contract)
    max_w = 10000

    [points.W]                     # a canonical name (the SunSpec driver's: W, Var, Hz, SoC...)
    table = "input"                # "holding" (FC03, FC16 for writes) | "input" (FC04)
    address = 52                   # 0-based PDU address
    type = "float32"               # int16 | uint16 | int32 | uint32 | float32
    word_order = "big"             # optional, overrides [profile].word_order
    scale = 1.0                    # value = raw * scale * 10**SF + offset
    sf_address = 40085             # optional: int16 power-of-ten SF register (same table)
    offset = 0.0
    unit = "W"
    writable = false               # holding registers only

Canonical names are those of `drivers.sunspec.profile` (so the control loop and the snapshot
work unchanged), plus `WSet` (W, + = discharge) for a battery's fixed active power. Unknown
names, keys, types and tables are refused: `ProfileError` names the file, the key and the
reason ("eastron.toml: points.W.type: 'float' is not one of ...").
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from drivers.contract import DeviceKind, Nameplate
from drivers.sunspec import profile as sunspec_profile

__all__ = [
    "PROFILE_DIR",
    "TYPES",
    "DeviceProfile",
    "PointMap",
    "ProfileError",
    "canonical_names",
    "load_profile",
    "parse_profile",
    "shipped_profiles",
]

PROFILE_DIR: Final = Path(__file__).resolve().parent.parent / "profiles"
TYPES: Final = {"int16": 1, "uint16": 1, "int32": 2, "uint32": 2, "float32": 2}
_EXTRA_NAMES: Final = {"WSet": "W"}


class ProfileError(ValueError):
    """A profile file is unreadable or invalid; the message names file, key and reason."""


def canonical_names() -> dict[str, str]:
    """Every canonical point name with its unit (all kinds of the SunSpec profile, plus WSet)."""
    out: dict[str, str] = {}
    for points in sunspec_profile.PROFILES.values():
        for cp in points:
            out.setdefault(cp.name, cp.unit)
    out.update(_EXTRA_NAMES)
    return out


class _Header(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    kind: DeviceKind
    manufacturer: str = ""
    model: str = ""
    description: str = ""
    word_order: Literal["big", "little"] = "big"
    max_read: int = Field(default=125, ge=1, le=125)


class PointMap(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    table: Literal["holding", "input"] = "holding"
    address: int = Field(ge=0, le=0xFFFF)
    type: Literal["int16", "uint16", "int32", "uint32", "float32"]
    word_order: Literal["big", "little"] | None = None
    scale: float = 1.0
    sf_address: int | None = Field(default=None, ge=0, le=0xFFFF)
    offset: float = 0.0
    unit: str = ""
    writable: bool = False

    @property
    def size(self) -> int:
        return TYPES[self.type]

    @model_validator(mode="after")
    def _check(self) -> PointMap:
        if self.writable and self.table != "holding":
            raise ValueError("only holding registers are writable (table = 'holding')")
        if self.address + self.size > 0x10000:
            raise ValueError(f"{self.type} at {self.address} runs past register 65535")
        if not math.isfinite(self.scale) or self.scale == 0.0:
            raise ValueError("scale must be a finite, non-zero number")
        return self


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    profile: _Header
    nameplate: Nameplate | None = None
    points: dict[str, PointMap] = Field(min_length=1)


@dataclass(frozen=True, slots=True)
class DeviceProfile:
    name: str
    kind: DeviceKind
    manufacturer: str
    model: str
    word_order: Literal["big", "little"]
    max_read: int
    nameplate: Nameplate
    points: dict[str, PointMap]
    source: str  # file it came from

    def order(self, point: PointMap) -> Literal["big", "little"]:
        return point.word_order or self.word_order


def _loc(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def parse_profile(text: str, source: str = "<profile>") -> DeviceProfile:
    """Parse and validate a profile; ProfileError names `source`, the key and the reason."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{source}: not valid TOML: {exc}") from exc
    nameplate_raw = raw.get("nameplate")
    try:
        if nameplate_raw is not None:
            if not isinstance(nameplate_raw, dict):
                raise ProfileError(f"{source}: nameplate: must be a table")
            unknown = sorted(set(nameplate_raw) - set(Nameplate.__dataclass_fields__))
            if unknown:
                raise ProfileError(
                    f"{source}: nameplate.{unknown[0]}: unknown rating; known: "
                    f"{', '.join(Nameplate.__dataclass_fields__)}"
                )
        parsed = _File.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{_loc(e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ProfileError(f"{source}: {problems}") from exc
    known = canonical_names()
    for name, point in parsed.points.items():
        if name not in known:
            raise ProfileError(
                f"{source}: points.{name}: not a canonical point name; use the SunSpec "
                f"driver's names ({', '.join(sorted(known))})"
            )
        if point.unit and known[name] and point.unit != known[name]:
            raise ProfileError(
                f"{source}: points.{name}.unit: {point.unit!r}, but canonical {name} is in "
                f"{known[name]!r}: convert with scale"
            )
        if point.sf_address is not None and point.type == "float32":
            raise ProfileError(f"{source}: points.{name}.sf_address: float32 takes no SF")
    header = parsed.profile
    return DeviceProfile(
        name=header.name,
        kind=header.kind,
        manufacturer=header.manufacturer,
        model=header.model,
        word_order=header.word_order,
        max_read=header.max_read,
        nameplate=parsed.nameplate or Nameplate(),
        points=dict(parsed.points),
        source=source,
    )


def load_profile(ref: str | Path) -> DeviceProfile:
    """A profile by path, or by name among the shipped ones (drivers/profiles/NAME.toml)."""
    path = Path(ref)
    if not path.suffix and not path.exists():
        path = PROFILE_DIR / f"{ref}.toml"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        shipped = ", ".join(p.stem for p in shipped_profiles())
        raise ProfileError(f"{path}: cannot read profile ({exc}); shipped: {shipped}") from exc
    return parse_profile(text, str(path))


def shipped_profiles() -> list[Path]:
    return sorted(PROFILE_DIR.glob("*.toml"))

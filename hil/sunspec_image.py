"""SunSpec register images laid out from pysunspec2's shipped JSON model definitions.

Owns:
- reading `sunspec2/models/json/model_<id>.json` (the only source of register layouts here: no
  hand-typed tables) and laying out a model's top-level group, then its fixed (non-repeating)
  nested groups as "<group>.<point>" (704's PF groups): a point's offset is the sum of the sizes
  of the points before it, `L` = total size - 2;
- the codec between raw register words and values for the SunSpec types, including the
  "not implemented" sentinels (protocols.md §2.1), which are served for every point that the
  simulator does not drive;
- `ImageLayout` (a chain `SunS`, models..., end marker `0xFFFF 0`) and `RegisterBank`: one
  uint16 matrix per layout, one row per device, so that physics outputs for all devices of a
  kind are encoded with one vectorised column write per point.

It deliberately uses none of pysunspec2's Python code (only its JSON): the tests check this
layout against pysunspec2's own `Model` as an independent implementation.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cache
from importlib import resources
from types import MappingProxyType
from typing import cast

import numpy as np
import numpy.typing as npt

SUNS_MARKER = (0x5375, 0x6E53)  # "SunS"
END_MODEL_ID = 0xFFFF

# type -> register words of the "not implemented" value (sunspec2/mb.py, protocols.md §2.1).
_SENTINEL_WORDS: dict[str, tuple[int, ...]] = {
    "int16": (0x8000,),
    "uint16": (0xFFFF,),
    "count": (0xFFFF,),
    "acc16": (0,),
    "enum16": (0xFFFF,),
    "bitfield16": (0xFFFF,),
    "sunssf": (0x8000,),
    "pad": (0,),
    "int32": (0x8000, 0),
    "uint32": (0xFFFF, 0xFFFF),
    "acc32": (0, 0),
    "enum32": (0xFFFF, 0xFFFF),
    "bitfield32": (0xFFFF, 0xFFFF),
    "ipaddr": (0, 0),
    "float32": (0x7FC0, 0),
    "int64": (0x8000, 0, 0, 0),
    "uint64": (0xFFFF,) * 4,
    "acc64": (0,) * 4,
    "float64": (0x7FF8, 0, 0, 0),
}
_VARIABLE_SIZE = {"string", "ipv6addr"}  # sentinel = all zero words, size from the JSON
_SIGNED = {"int16", "sunssf", "int32", "int64"}
_ACCUMULATORS = {"acc16", "acc32", "acc64"}


class SunSpecModelError(ValueError):
    """A model definition cannot be found or laid out by this (fixed-group) image builder."""


class PointValueError(ValueError):
    """A value does not fit the point's type, or a point name is unknown."""


@dataclass(frozen=True, slots=True)
class PointDef:
    """One point of a model's top-level group, as laid out from the JSON."""

    model_id: int
    name: str
    type: str
    size: int  # registers
    offset: int  # registers from the model's ID register
    writable: bool
    mandatory: bool
    sf: str | int | None  # name of the scale-factor point, a fixed exponent, or None
    symbols: Mapping[str, int]
    static_value: int | None  # e.g. the model ID

    @property
    def ref(self) -> str:
        return f"{self.model_id}.{self.name}"

    def sentinel_words(self) -> tuple[int, ...]:
        if self.type in _VARIABLE_SIZE:
            return (0,) * self.size
        return _SENTINEL_WORDS[self.type]


@dataclass(frozen=True)
class ModelDef:
    """A SunSpec model's fixed top-level group: `length` is the L register value."""

    model_id: int
    name: str
    points: Mapping[str, PointDef]

    @property
    def length(self) -> int:
        return sum(p.size for p in self.points.values()) - 2


def _json_text(model_id: int) -> str:
    path = resources.files("sunspec2").joinpath("models", "json", f"model_{model_id}.json")
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise SunSpecModelError(
            f"SunSpec model {model_id} is not among pysunspec2's shipped definitions ({path})"
        ) from exc


def _group_points(model_id: int, group: Mapping[str, object]) -> list[tuple[str, dict]]:
    """(name, raw point) of the top-level points, then of each fixed nested group, prefixed.

    A fixed group (no `count`, e.g. 704's `PFWInj`) is one instance laid out after the points
    before it, its points named "<group>.<point>" as pysunspec2 reaches them. Repeating groups
    (a `count`) change L with the device's counts, which a fixed image cannot serve.
    """
    raw_points = cast("list[dict]", group.get("points", []))
    out: list[tuple[str, dict]] = [(str(raw["name"]), raw) for raw in raw_points]
    for sub in cast("list[dict]", group.get("groups", [])):
        if sub.get("count") is not None or sub.get("groups"):
            raise SunSpecModelError(
                f"model {model_id} ({group['name']}) has repeating or nested groups "
                f"({sub['name']}); this image builder lays out fixed groups only"
            )
        out.extend((f"{sub['name']}.{raw['name']}", raw) for raw in sub.get("points", []))
    return out


@cache
def load_model_def(model_id: int) -> ModelDef:
    """Lay out model `model_id` from pysunspec2's JSON (cached)."""
    doc = json.loads(_json_text(model_id))
    group = doc["group"]
    points: dict[str, PointDef] = {}
    offset = 0
    for name, raw in _group_points(model_id, group):
        ptype = raw["type"]
        size = int(raw["size"])
        if ptype not in _SENTINEL_WORDS and ptype not in _VARIABLE_SIZE:
            raise SunSpecModelError(f"model {model_id} point {name}: unsupported type {ptype}")
        if ptype not in _VARIABLE_SIZE and size != len(_SENTINEL_WORDS[ptype]):
            raise SunSpecModelError(
                f"model {model_id} point {name}: size {size} does not match type {ptype}"
            )
        sf = raw.get("sf")
        points[name] = PointDef(
            model_id=model_id,
            name=name,
            type=ptype,
            size=size,
            offset=offset,
            writable=raw.get("access", "R") == "RW",
            mandatory=raw.get("mandatory", "O") == "M",
            sf=int(sf) if isinstance(sf, int) else sf,
            symbols=MappingProxyType({s["name"]: int(s["value"]) for s in raw.get("symbols", [])}),
            static_value=raw.get("value") if isinstance(raw.get("value"), int) else None,
        )
        offset += size
    for name, pdef in points.items():
        prefix = name.rpartition(".")[0]
        if prefix and isinstance(pdef.sf, str) and f"{prefix}.{pdef.sf}" in points:
            # A point of a fixed group names an SF of its own group first, else of the model.
            points[name] = replace(pdef, sf=f"{prefix}.{pdef.sf}")
    return ModelDef(model_id=model_id, name=group["name"], points=MappingProxyType(points))


# --- scalar codec ---------------------------------------------------------------------------


def encode_raw(pdef: PointDef, raw: float | str | None) -> list[int]:
    """Register words for a raw (unscaled) value; None gives the not-implemented sentinel."""
    if raw is None:
        return list(pdef.sentinel_words())
    if pdef.type == "string":
        if not isinstance(raw, str):
            raise PointValueError(f"{pdef.ref} is a string point, got {raw!r}")
        data = raw.encode("utf-8")
        if len(data) > pdef.size * 2:
            raise PointValueError(f"{pdef.ref}: {raw!r} is longer than {pdef.size * 2} bytes")
        data = data.ljust(pdef.size * 2, b"\0")
        return list(struct.unpack(f">{pdef.size}H", data))
    if isinstance(raw, str):
        raise PointValueError(f"{pdef.ref} is numeric ({pdef.type}), got {raw!r}")
    nbytes = pdef.size * 2
    if pdef.type in ("float32", "float64"):
        data = struct.pack(">f" if pdef.size == 2 else ">d", float(raw))
    else:
        try:
            data = int(raw).to_bytes(nbytes, "big", signed=pdef.type in _SIGNED)
        except OverflowError as exc:
            raise PointValueError(f"{pdef.ref}: {raw} does not fit {pdef.type}") from exc
    return list(struct.unpack(f">{pdef.size}H", data))


def decode_raw(
    pdef: PointDef, words: Sequence[int] | npt.NDArray[np.uint16]
) -> int | float | str | None:
    """Raw value of a point from its register words; None for the not-implemented sentinel."""
    words = [int(w) for w in words]
    if pdef.type == "string":
        text = struct.pack(f">{len(words)}H", *words).split(b"\0", 1)[0]
        return text.decode("utf-8", errors="replace") or None
    if tuple(words) == pdef.sentinel_words() and pdef.type != "pad":
        return None
    data = struct.pack(f">{len(words)}H", *words)
    if pdef.type in ("float32", "float64"):
        value = struct.unpack(">f" if pdef.size == 2 else ">d", data)[0]
        return None if math.isnan(value) else float(value)
    return int.from_bytes(data, "big", signed=pdef.type in _SIGNED)


# --- image layout ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageLayout:
    """A device's register map relative to its base address: `SunS`, models, end marker."""

    model_ids: tuple[int, ...]
    model_offsets: Mapping[int, int]  # model id -> offset of its ID register from the base
    length: int  # registers, including SunS and the end marker
    points: Mapping[str, tuple[PointDef, int]]  # "123.WMaxLimPct" -> (def, offset from base)
    writable: npt.NDArray[np.bool_] = field(repr=False)
    # For each register: index into `point_list` of the point that covers it (-1 = marker/IDs).
    owner: npt.NDArray[np.int32] = field(repr=False)
    point_list: tuple[tuple[PointDef, int], ...] = field(repr=False)

    def point(self, ref: str) -> tuple[PointDef, int]:
        """(definition, offset from base) of "model.Point"; raises PointValueError if unknown."""
        try:
            return self.points[ref]
        except KeyError:
            raise PointValueError(
                f"unknown point {ref!r}; expected 'model.Point' with model in {self.model_ids}"
            ) from None

    def points_touched(self, start: int, count: int) -> list[tuple[PointDef, int]]:
        """The points overlapping registers [start, start+count) (offsets from base)."""
        idx = np.unique(self.owner[start : start + count])
        return [self.point_list[i] for i in idx if i >= 0]


@cache
def build_layout(model_ids: tuple[int, ...]) -> ImageLayout:
    """Lay out a model chain. Model 1 must come first; each model may appear once."""
    if not model_ids or model_ids[0] != 1:
        raise SunSpecModelError("a SunSpec map starts with the common model 1")
    if len(set(model_ids)) != len(model_ids):
        raise SunSpecModelError(f"each model may appear once in this simulator: {model_ids}")
    offsets: dict[int, int] = {}
    points: dict[str, tuple[PointDef, int]] = {}
    offset = len(SUNS_MARKER)
    for mid in model_ids:
        mdef = load_model_def(mid)
        offsets[mid] = offset
        for pdef in mdef.points.values():
            points[pdef.ref] = (pdef, offset + pdef.offset)
        offset += mdef.length + 2
    length = offset + 2  # end model: ID 0xFFFF, L 0
    writable = np.zeros(length, dtype=np.bool_)
    owner = np.full(length, -1, dtype=np.int32)
    point_list = tuple(points.values())
    for i, (pdef, off) in enumerate(point_list):
        if pdef.name not in ("ID", "L"):
            owner[off : off + pdef.size] = i
        if pdef.writable:
            writable[off : off + pdef.size] = True
    return ImageLayout(
        model_ids=model_ids,
        model_offsets=MappingProxyType(offsets),
        length=length,
        points=MappingProxyType(points),
        writable=writable,
        owner=owner,
        point_list=point_list,
    )


# --- register banks -------------------------------------------------------------------------


def _to_raw(value: float, sf: int) -> float:
    """Engineering value -> raw, rounded: raw = value / 10**sf (exact powers of ten only)."""
    return round(value * 10**-sf) if sf < 0 else round(value / 10**sf)


@dataclass(frozen=True, slots=True)
class _ColumnEncoder:
    """Everything `set_column` needs for one point, precomputed (scale factors are static)."""

    pdef: PointDef
    offset: int
    mul: npt.NDArray[np.float64]  # raw = value * mul / div, per row; both exact powers of 10
    div: npt.NDArray[np.float64]
    lo: float
    hi: float


class RegisterBank:
    """Register images of `n` devices sharing one layout: `regs[row, offset_from_base]`.

    Every point starts as its not-implemented sentinel; `ID`/`L`, `SunS` and the end marker are
    filled in. Values are set in engineering units and scaled with the row's own scale-factor
    register, so rows may use different scale factors. Scale factors are treated as static once
    `set_column` is in use (the per-point encoders are cached; any `set_raw` clears the cache).
    """

    def __init__(self, layout: ImageLayout, n: int) -> None:
        self.layout = layout
        self.n = n
        self.regs: npt.NDArray[np.uint16] = np.zeros((n, layout.length), dtype=np.uint16)
        self.regs[:, 0:2] = SUNS_MARKER
        for mid, moff in layout.model_offsets.items():
            self.regs[:, moff] = mid
            self.regs[:, moff + 1] = load_model_def(mid).length
        for pdef, off in layout.point_list:
            if pdef.name not in ("ID", "L"):
                self.regs[:, off : off + pdef.size] = pdef.sentinel_words()
        self.regs[:, layout.length - 2] = END_MODEL_ID
        self.regs[:, layout.length - 1] = 0
        self._encoders: dict[tuple[str, bool], _ColumnEncoder] = {}

    # scale factors ---------------------------------------------------------------------------

    def sf_of(self, pdef: PointDef) -> npt.NDArray[np.int16]:
        """Scale-factor exponent of `pdef` for every row (0 where the point has no SF)."""
        if pdef.sf is None:
            return np.zeros(self.n, dtype=np.int16)
        if isinstance(pdef.sf, int):
            return np.full(self.n, pdef.sf, dtype=np.int16)
        _, sf_off = self.layout.point(f"{pdef.model_id}.{pdef.sf}")
        return self.regs[:, sf_off].view(np.int16).copy()

    # writes ----------------------------------------------------------------------------------

    def set_raw(self, row: int, ref: str, raw: float | str | None) -> None:
        """Set one point of one row from its raw value (None = not implemented)."""
        pdef, off = self.layout.point(ref)
        self.regs[row, off : off + pdef.size] = encode_raw(pdef, raw)
        self._encoders.clear()  # it may have been a scale factor

    def set_value(self, row: int, ref: str, value: float | str | None) -> None:
        """Set one point in engineering units (scaled with the row's SF); None = sentinel."""
        pdef, _ = self.layout.point(ref)
        if value is None or isinstance(value, str):
            self.set_raw(row, ref, value)
            return
        sf = int(self.sf_of(pdef)[row])
        if pdef.type.startswith("float"):
            self.set_raw(row, ref, value * 10.0**-sf)
        else:
            self.set_raw(row, ref, int(_to_raw(value, sf)))

    def _encoder(self, ref: str, scaled: bool) -> _ColumnEncoder:
        pdef, off = self.layout.point(ref)
        sf = self.sf_of(pdef).astype(np.float64) if scaled else np.zeros(self.n)
        nbits = 16 * pdef.size
        if pdef.type in _SIGNED:
            lo, hi = -(2.0 ** (nbits - 1)) + 1, 2.0 ** (nbits - 1) - 1
        else:
            lo, hi = 0.0, 2.0**nbits - 2
        enc = _ColumnEncoder(
            pdef=pdef,
            offset=off,
            mul=np.power(10.0, np.maximum(-sf, 0.0)),
            div=np.power(10.0, np.maximum(sf, 0.0)),
            lo=lo,
            hi=hi,
        )
        self._encoders[(ref, scaled)] = enc
        return enc

    def set_column(self, ref: str, values: npt.ArrayLike, *, scaled: bool = True) -> None:
        """Vectorised: set `ref` for every row from engineering values (NaN = sentinel).

        Integer types saturate at their range, one step short of the sentinel, the way a device
        register saturates; accumulators wrap.
        """
        enc = self._encoders.get((ref, scaled)) or self._encoder(ref, scaled)
        pdef, off, size = enc.pdef, enc.offset, enc.pdef.size
        raw = np.rint(np.asarray(values, dtype=np.float64) * enc.mul / enc.div)
        nan = np.isnan(raw)
        any_nan = bool(nan.any())
        if any_nan:
            raw[nan] = 0.0
        ptype = pdef.type
        if ptype == "float32":
            bits = raw.astype(np.float32).view(np.uint32).astype(np.int64)
        elif ptype in _ACCUMULATORS:
            bits = np.mod(raw, 2.0 ** (16 * size)).astype(np.uint64).astype(np.int64)
        else:
            bits = np.minimum(np.maximum(raw, enc.lo), enc.hi).astype(np.int64)
        if size == 1:
            self.regs[:, off] = bits & 0xFFFF
        else:
            for i in range(size):
                self.regs[:, off + i] = (bits >> (16 * (size - 1 - i))) & 0xFFFF
        if any_nan:
            self.regs[nan, off : off + size] = pdef.sentinel_words()

    # reads -----------------------------------------------------------------------------------

    def get_raw(self, row: int, ref: str, regs: npt.NDArray[np.uint16] | None = None):
        """Raw value of one point (None = not implemented). `regs` overrides the row's data."""
        pdef, off = self.layout.point(ref)
        data = self.regs[row] if regs is None else regs
        return decode_raw(pdef, data[off : off + pdef.size])

    def get_value(
        self, row: int, ref: str, regs: npt.NDArray[np.uint16] | None = None
    ) -> int | float | str | None:
        """Engineering value of one point: raw x 10**SF; None if the point or its SF is unset."""
        pdef, _ = self.layout.point(ref)
        raw = self.get_raw(row, ref, regs)
        if raw is None or isinstance(raw, str) or pdef.sf is None:
            return raw
        if isinstance(pdef.sf, int):
            sf: int | None = pdef.sf
        else:
            sf_raw = self.get_raw(row, f"{pdef.model_id}.{pdef.sf}", regs)
            sf = None if sf_raw is None else int(sf_raw)
        if sf is None:
            return None
        return raw * 10**sf if sf >= 0 else raw / 10 ** (-sf)


def mandatory_refs(layout: ImageLayout) -> Iterable[str]:
    """All mandatory points of a layout (for "every mandatory point is served" checks)."""
    return (ref for ref, (pdef, _) in layout.points.items() if pdef.mandatory)

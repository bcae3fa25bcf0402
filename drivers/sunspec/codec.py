"""SunSpec register codec: whole blocks of registers <-> engineering values, vectorised with numpy.

This module owns the number rules of SunSpec: big-endian word order, two's complement, float bit
patterns, "not implemented" sentinels and power-of-ten scale factors. It is pure (no I/O).

Decoding is compiled once and run many times: a `Decoder` is built from a list of `Field`s (where a
point sits in a register buffer, its type and where its scale factor sits) into a handful of numpy
index arrays; `Decoder.decode(block)` then turns a `uint16` buffer into `float64` values and `uint8`
qualities for all fields at once. Fields may come from one model (`layout_decoder`) or from many
models laid out in one device image (the driver compiles one decoder per device), so a poll costs a
fixed number of numpy calls whatever the number of points.

Quality rules (drivers.contract.Quality):
  * the type's sentinel (int16 0x8000, uint16/enum16/bitfield16 0xFFFF, acc* 0, int32 0x80000000,
    uint32/enum32/bitfield32 0xFFFFFFFF, float32 0x7FC00000, ...) -> NaN, NOT_IMPLEMENTED;
  * a point whose scale factor register holds the sunssf sentinel -> NaN, NOT_IMPLEMENTED;
  * a float that is NaN/inf without being the sentinel -> OUT_OF_RANGE (the value is kept as is).

Encoding (for writes) is per point and scalar: `encode_value` range-checks against the type (the
sentinel is never a legal value: writing it would read back as "not implemented") and raises
`EncodeRangeError` naming the point, the value and the allowed range. `encode_points` writes several
points into a copy of a model block, taking each point's scale factor from that same block (i.e.
as read from the device just before).
"""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from drivers.contract import Quality
from drivers.sunspec.models import NUMERIC_TYPES, ModelLayout, PointDef

__all__ = [
    "SENTINELS",
    "BlockSizeError",
    "CodecError",
    "Decoder",
    "EncodeError",
    "EncodeRangeError",
    "Field",
    "decode_model",
    "decode_point",
    "decode_string",
    "encode_points",
    "encode_value",
    "fields_of",
    "layout_decoder",
    "raw_range",
]

U16 = npt.NDArray[np.uint16]
F64 = npt.NDArray[np.float64]
U8 = npt.NDArray[np.uint8]
IDX = npt.NDArray[np.intp]


class CodecError(ValueError):
    """Registers and values could not be converted."""


class BlockSizeError(CodecError):
    """The register block is shorter than the fields it must hold."""


class EncodeError(CodecError):
    """A value cannot be encoded for this point (type not numeric, scale factor unknown)."""


class EncodeRangeError(EncodeError):
    """The value, once scaled and rounded, does not fit the point's type (or is its sentinel)."""


# "Not implemented" sentinels as unsigned raw words of the type's width (sunspec2/mb.py).
SENTINELS: Final[Mapping[str, int]] = {
    "int16": 0x8000,
    "sunssf": 0x8000,
    "uint16": 0xFFFF,
    "count": 0xFFFF,
    "enum16": 0xFFFF,
    "bitfield16": 0xFFFF,
    "acc16": 0,
    "int32": 0x8000_0000,
    "uint32": 0xFFFF_FFFF,
    "enum32": 0xFFFF_FFFF,
    "bitfield32": 0xFFFF_FFFF,
    "acc32": 0,
    "float32": 0x7FC0_0000,
    "int64": 0x8000_0000_0000_0000,
    "uint64": 0xFFFF_FFFF_FFFF_FFFF,
    "acc64": 0,
    "float64": 0x7FF8_0000_0000_0000,
}

_SIGNED: Final = frozenset({"int16", "sunssf", "int32", "int64"})
_FLOAT: Final = frozenset({"float32", "float64"})
_WIDTH: Final[Mapping[str, int]] = {
    **dict.fromkeys(("int16", "sunssf", "uint16", "count", "enum16", "bitfield16", "acc16"), 1),
    **dict.fromkeys(("int32", "uint32", "enum32", "bitfield32", "acc32", "float32"), 2),
    **dict.fromkeys(("int64", "uint64", "acc64", "float64"), 4),
}

_GOOD: Final = np.uint8(Quality.GOOD)
_NOT_IMPL: Final = np.uint8(Quality.NOT_IMPLEMENTED)
_OUT_OF_RANGE: Final = np.uint8(Quality.OUT_OF_RANGE)


@dataclass(frozen=True, slots=True)
class Field:
    """One numeric point in a register buffer: its position, type and scale-factor position."""

    offset: int  # index of the point's first register in the buffer
    type: str
    sf_offset: int | None = None  # index of its sunssf register in the same buffer
    sf_const: int = 0  # literal exponent when the definition gives a number, not a point

    @property
    def size(self) -> int:
        return _WIDTH[self.type]


def fields_of(
    layout: ModelLayout, base: int = 0, names: Iterable[str] | None = None
) -> list[Field]:
    """Fields of the numeric points of `layout` (or `names`, in order) at buffer index `base`."""
    points: Iterable[PointDef] = (
        (layout.points[i] for i in layout.numeric)
        if names is None
        else (layout.point(n) for n in names)
    )
    out: list[Field] = []
    for p in points:
        if p.type not in NUMERIC_TYPES:
            raise CodecError(f"model {layout.model_id} point {p.name!r}: {p.type} is not numeric")
        sf_offset = None if p.sf_index is None else base + layout.points[p.sf_index].offset
        out.append(Field(base + p.offset, p.type, sf_offset, p.sf_const or 0))
    return out


class _SizeClass:
    """Index arrays for the fields of one register width (1, 2 or 4 words)."""

    __slots__ = ("float_idx", "n", "neg", "offsets", "out", "sentinel", "signed_idx", "width")

    def __init__(self, width: int, items: Sequence[tuple[int, Field]]) -> None:
        self.width = width
        self.n = len(items)
        self.out: IDX = np.array([i for i, _ in items], dtype=np.intp)
        # offsets[:, k] is the k-th (most significant first) word of each field.
        base = np.array([f.offset for _, f in items], dtype=np.intp)
        self.offsets: IDX = (base[:, None] + np.arange(width, dtype=np.intp)[None, :]).reshape(
            self.n, width
        )
        dtype = {1: np.uint16, 2: np.uint32, 4: np.uint64}[width]
        self.sentinel = np.array([SENTINELS[f.type] for _, f in items], dtype=dtype)
        self.signed_idx: IDX = np.array(
            [k for k, (_, f) in enumerate(items) if f.type in _SIGNED], dtype=np.intp
        )
        self.float_idx: IDX = np.array(
            [k for k, (_, f) in enumerate(items) if f.type in _FLOAT], dtype=np.intp
        )
        self.neg = float(2 ** (16 * width))

    def raw(
        self, block: U16
    ) -> npt.NDArray[np.uint16] | npt.NDArray[np.uint32] | npt.NDArray[np.uint64]:
        words = block[self.offsets]
        if self.width == 1:
            return words[:, 0]
        if self.width == 2:
            w32 = words.astype(np.uint32)
            return (w32[:, 0] << np.uint32(16)) | w32[:, 1]
        w64 = words.astype(np.uint64)
        r64: npt.NDArray[np.uint64] = (
            (w64[:, 0] << np.uint64(48))
            | (w64[:, 1] << np.uint64(32))
            | (w64[:, 2] << np.uint64(16))
            | w64[:, 3]
        )
        return r64


_SIGNED_VIEW: Final = {1: np.int16, 2: np.int32, 4: np.int64}
_FLOAT_VIEW: Final = {2: np.float32, 4: np.float64}


class Decoder:
    """A compiled decoder for a fixed list of fields: `decode(block)` -> (values, quality)."""

    __slots__ = ("_classes", "_scaled", "_sf_const", "_sf_fields", "_sf_offsets", "min_len", "n")

    def __init__(self, fields: Sequence[Field]) -> None:
        self.n = len(fields)
        self.min_len = max(
            [f.offset + f.size for f in fields]
            + [f.sf_offset + 1 for f in fields if f.sf_offset is not None],
            default=0,
        )
        if any(f.offset < 0 or (f.sf_offset is not None and f.sf_offset < 0) for f in fields):
            raise CodecError("Decoder: negative field offset")
        by_width: dict[int, list[tuple[int, Field]]] = {1: [], 2: [], 4: []}
        for i, f in enumerate(fields):
            if f.type not in _WIDTH:
                raise CodecError(f"Decoder: type {f.type!r} is not numeric")
            by_width[f.size].append((i, f))
        self._classes = tuple(_SizeClass(w, items) for w, items in by_width.items() if items)
        self._sf_fields: IDX = np.array(
            [i for i, f in enumerate(fields) if f.sf_offset is not None], dtype=np.intp
        )
        self._sf_offsets: IDX = np.array(
            [f.sf_offset for f in fields if f.sf_offset is not None], dtype=np.intp
        )
        self._sf_const = np.array([f.sf_const for f in fields], dtype=np.int64)
        self._scaled = bool(self._sf_fields.size) or bool(np.any(self._sf_const))

    def decode(self, block: npt.ArrayLike) -> tuple[F64, U8]:
        """Values (NaN where not implemented) and qualities of every field, in field order."""
        regs: U16 = np.asarray(block, dtype=np.uint16)
        if regs.ndim != 1 or regs.shape[0] < self.min_len:
            raise BlockSizeError(
                f"register block of {regs.shape[0] if regs.ndim == 1 else regs.shape} registers; "
                f"the fields need {self.min_len}"
            )
        values: F64 = np.empty(self.n, dtype=np.float64)
        notimpl = np.zeros(self.n, dtype=np.bool_)
        for cls in self._classes:
            raw = cls.raw(regs)
            vals = raw.astype(np.float64)
            if cls.signed_idx.size:
                vals[cls.signed_idx] = raw[cls.signed_idx].view(_SIGNED_VIEW[cls.width])
            if cls.float_idx.size:
                # Signalling-NaN bit patterns warn on the cast; they are flagged OUT_OF_RANGE below.
                with np.errstate(invalid="ignore"):
                    vals[cls.float_idx] = raw[cls.float_idx].view(_FLOAT_VIEW[cls.width])
            values[cls.out] = vals
            notimpl[cls.out] = raw == cls.sentinel
        if self._scaled:
            exp = self._sf_const.copy()
            if self._sf_fields.size:
                sf_raw = regs[self._sf_offsets]
                exp[self._sf_fields] = sf_raw.view(np.int16)
                notimpl[self._sf_fields] |= sf_raw == 0x8000
            # Divide for negative exponents: raw / 10**k is the double nearest the decimal value,
            # raw * 10**-k is not (e.g. 2345 * 0.1 != 234.5 exactly).
            with np.errstate(over="ignore", invalid="ignore"):
                power = np.power(10.0, np.abs(exp).astype(np.float64))
                values = np.where(exp < 0, values / power, values * power)
        quality: U8 = np.full(self.n, _GOOD, dtype=np.uint8)
        quality[~np.isfinite(values)] = _OUT_OF_RANGE
        values[notimpl] = np.nan
        quality[notimpl] = _NOT_IMPL
        return values, quality


@functools.cache
def layout_decoder(layout: ModelLayout) -> Decoder:
    """The decoder of all numeric points of `layout` (order: `layout.numeric`), cached."""
    return Decoder(fields_of(layout))


def decode_model(layout: ModelLayout, block: npt.ArrayLike) -> tuple[F64, U8]:
    """Decode a whole model block; `values[k]` belongs to `layout.points[layout.numeric[k]]`."""
    return layout_decoder(layout).decode(block)


def decode_point(layout: ModelLayout, block: npt.ArrayLike, name: str) -> float | None:
    """One scaled value, None when not implemented (scalar helper: connect-time, not hot path)."""
    index = layout.index.get(name)
    if index is None or index not in layout.numeric:
        raise KeyError(f"model {layout.model_id} has no numeric point {name!r}")
    values, quality = decode_model(layout, block)
    k = layout.numeric.index(index)
    return None if quality[k] != _GOOD else float(values[k])


def decode_string(layout: ModelLayout, block: npt.ArrayLike, name: str) -> str:
    """A string point: NUL-padded ASCII/UTF-8; "" when not implemented (first byte NUL)."""
    p = layout.point(name)
    if p.type != "string":
        raise CodecError(f"model {layout.model_id} point {name!r} is {p.type}, not a string")
    regs = np.asarray(block, dtype=np.uint16)
    if regs.shape[0] < p.end:
        raise BlockSizeError(f"model {layout.model_id} point {name!r} needs {p.end} registers")
    data = regs[p.offset : p.end].astype(">u2").tobytes()
    return data.split(b"\0", 1)[0].decode("utf-8", errors="replace").strip()


def raw_range(ptype: str) -> tuple[int, int]:
    """The legal raw integer range of an integer type: the type's range minus its sentinel."""
    sentinel = SENTINELS[ptype]
    bits = 16 * _WIDTH[ptype]
    if ptype in _SIGNED:
        return -(1 << (bits - 1)) + 1, (1 << (bits - 1)) - 1  # min is the sentinel
    if sentinel == 0:
        return 1, (1 << bits) - 1  # accumulators: 0 means "not implemented"
    return 0, (1 << bits) - 2  # max is the sentinel


def encode_value(ptype: str, value: float, sf: int = 0, *, name: str = "value") -> tuple[int, ...]:
    """Register words (most significant first) of `value` in engineering units at exponent `sf`.

    Integer types: raw = round(value / 10**sf) (round half to even). Raises EncodeRangeError when
    the value is not finite or the raw value is outside the type or equals its sentinel.
    """
    if ptype not in _WIDTH:
        raise EncodeError(f"{name}: type {ptype!r} cannot be encoded from a number")
    width = _WIDTH[ptype]
    if not math.isfinite(value):
        raise EncodeRangeError(f"{name} = {value}: not a finite number")
    scaled = value * 10 ** (-sf) if sf < 0 else value / 10**sf
    if ptype in _FLOAT:
        fmt = ">f" if width == 2 else ">d"
        try:
            packed = struct.pack(fmt, scaled)
        except OverflowError:
            packed = b""
        if not packed or not math.isfinite(struct.unpack(fmt, packed)[0]):
            raise EncodeRangeError(f"{name} = {value}: does not fit {ptype}")
        words = struct.unpack(f">{width}H", packed)
        return tuple(int(w) for w in words)
    raw = round(scaled)
    lo, hi = raw_range(ptype)
    if not lo <= raw <= hi:
        raise EncodeRangeError(
            f"{name} = {value} (sf {sf}) -> raw {raw}, outside {ptype} range {lo}..{hi}"
            + (
                " (the sentinel is reserved for 'not implemented')"
                if raw == _sentinel_int(ptype)
                else ""
            )
        )
    unsigned = raw & ((1 << (16 * width)) - 1)
    return tuple((unsigned >> (16 * (width - 1 - k))) & 0xFFFF for k in range(width))


def _sentinel_int(ptype: str) -> int:
    sentinel = SENTINELS[ptype]
    bits = 16 * _WIDTH[ptype]
    if ptype in _SIGNED and sentinel >= 1 << (bits - 1):
        return sentinel - (1 << bits)
    return sentinel


def encode_points(layout: ModelLayout, block: npt.ArrayLike, values: Mapping[str, float]) -> U16:
    """A copy of `block` with `values` ({point: engineering value}) encoded in place.

    Scale factors are taken from `block` (as read from the device). SF points given in `values`
    are written first, so a caller building an image can set an SF and its points together.
    """
    out: U16 = np.array(block, dtype=np.uint16, copy=True)
    if out.ndim != 1:
        raise BlockSizeError("encode_points: the block must be one-dimensional")
    ordered = sorted(values.items(), key=lambda kv: layout.point(kv[0]).type != "sunssf")
    for name, value in ordered:
        p = layout.point(name)
        if out.shape[0] < p.end:
            raise BlockSizeError(
                f"model {layout.model_id} point {name!r} ends at register {p.end}; "
                f"block has {out.shape[0]}"
            )
        sf = p.sf_const or 0
        if p.sf_index is not None:
            sf_point = layout.points[p.sf_index]
            if out.shape[0] <= sf_point.offset:
                raise BlockSizeError(
                    f"model {layout.model_id} point {name!r}: scale factor {sf_point.name} "
                    "is outside the block"
                )
            sf = int(out[sf_point.offset : sf_point.offset + 1].view(np.int16)[0])
            if sf == -0x8000:
                raise EncodeError(
                    f"{layout.model_id}.{name}: its scale factor {sf_point.name} is not "
                    "implemented (0x8000) on the device, so the value cannot be scaled"
                )
        words = encode_value(
            p.type, float(value), sf, name=f"{layout.model_id}.{name} [{p.units or '-'}]"
        )
        out[p.offset : p.end] = words
    return out

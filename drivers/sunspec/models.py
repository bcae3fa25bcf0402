"""Register layouts of SunSpec models, compiled from pysunspec2's shipped JSON definitions.

This module owns the answer to "where is point P of model M, how big is it, what type, which scale
factor": nothing here is hand-typed. `get_layout(model_id, length)` reads
`sunspec2/models/json/model_<id>.json` (the SunSpec Alliance's canonical definitions, shipped in the
pysunspec2 wheel), walks the top-level group and returns a frozen `ModelLayout`, cached per
(model_id, length).

Offsets count registers from the model start: `ID` at 0, `L` at 1, the first body point at 2, as in
the SunSpec specification and pysunspec2 (`Point.offset`).

What is compiled, and what is deliberately not:
  * the top-level points of the model, in definition order;
  * nested groups *without* a count (fixed, e.g. 704's `PFWInj`), named `"<group>.<point>"`, up to
    the first repeating group;
  * repeating groups (those with a `count`, e.g. 160 `module`, 705 `Crv`) are NOT compiled: their
    size depends on counts read from the device. The models the gateway uses (1, 101-103, 111-113,
    120-124, 201-204, 211-214, 701-704, 713, 802) need none of them. Their names are listed in
    `ModelLayout.skipped_groups` so a caller can tell.
  * legacy model 1 with L = 65 (no `Pad`), which pysunspec2 also accepts (`sunspec2/device.py`).
  * a device that serves a shorter L than the definition (older revisions): the points that do not
    fit are dropped (`ModelLayout.truncated`); a longer L leaves the extra registers unnamed.

Pure: file reads of package data only, no I/O with devices.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from importlib import resources
from types import MappingProxyType
from typing import Any, Final

__all__ = [
    "NUMERIC_TYPES",
    "TYPE_SIZES",
    "LayoutError",
    "ModelLayout",
    "PointDef",
    "UnknownModelError",
    "available_model_ids",
    "get_layout",
]

# Register size of every fixed-size SunSpec type (pysunspec2 `mb.point_type_info`).
TYPE_SIZES: Final[Mapping[str, int]] = MappingProxyType(
    {
        "int16": 1,
        "uint16": 1,
        "count": 1,
        "acc16": 1,
        "enum16": 1,
        "bitfield16": 1,
        "pad": 1,
        "sunssf": 1,
        "int32": 2,
        "uint32": 2,
        "acc32": 2,
        "enum32": 2,
        "bitfield32": 2,
        "ipaddr": 2,
        "float32": 2,
        "int64": 4,
        "uint64": 4,
        "acc64": 4,
        "float64": 4,
        "eui48": 4,
        "ipv6addr": 8,
    }
)

# Types the codec turns into float64 values (everything that is a number, not an address/string).
NUMERIC_TYPES: Final[frozenset[str]] = frozenset(
    {
        "int16",
        "uint16",
        "count",
        "acc16",
        "enum16",
        "bitfield16",
        "sunssf",
        "int32",
        "uint32",
        "acc32",
        "enum32",
        "bitfield32",
        "float32",
        "int64",
        "uint64",
        "acc64",
        "float64",
    }
)

_JSON_DIR: Final = "models/json"


class LayoutError(ValueError):
    """A model definition could not be compiled into a layout (bad definition or length)."""


class UnknownModelError(LookupError):
    """No SunSpec definition ships for this model id (a vendor model, or newer than pysunspec2)."""

    def __init__(self, model_id: int) -> None:
        super().__init__(model_id)
        self.model_id = model_id

    def __str__(self) -> str:
        return (
            f"no SunSpec definition for model {self.model_id} in pysunspec2's model JSON "
            f"(sunspec2/{_JSON_DIR}/model_{self.model_id}.json): vendor models need their own "
            "definition file"
        )


@dataclass(frozen=True, slots=True)
class PointDef:
    """One point of a model: where it sits (registers from the model start) and how to read it."""

    name: str
    offset: int
    size: int
    type: str
    units: str = ""
    access: str = "R"  # "R" or "RW"
    mandatory: bool = False
    static: bool = False
    sf: str | None = None  # name of the sunssf point that scales this one
    sf_index: int | None = None  # index of that point in ModelLayout.points
    sf_const: int | None = None  # a literal exponent given in the definition instead of a name
    symbols: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def end(self) -> int:
        """Offset one past the last register of the point."""
        return self.offset + self.size

    @property
    def writable(self) -> bool:
        return self.access == "RW"

    @property
    def numeric(self) -> bool:
        return self.type in NUMERIC_TYPES


@dataclass(frozen=True, eq=False, slots=True)
class ModelLayout:
    """The compiled register layout of one model at one length (hash/eq by identity: cached)."""

    model_id: int
    name: str  # the definition's group name, e.g. "inverter_three_phase"
    label: str
    length: int  # the L this layout is for (registers after ID and L)
    definition_length: int  # L of the definition with zero repeating-group instances
    points: tuple[PointDef, ...]
    skipped_groups: tuple[str, ...]
    truncated: tuple[str, ...]  # points dropped because the served L is too short
    index: Mapping[str, int] = field(init=False, repr=False)
    numeric: tuple[int, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "index", MappingProxyType({p.name: i for i, p in enumerate(self.points)})
        )
        object.__setattr__(
            self,
            "numeric",
            tuple(i for i, p in enumerate(self.points) if p.numeric),
        )

    @property
    def size(self) -> int:
        """Registers in the whole model block, ID and L included (L + 2)."""
        return self.length + 2

    def point(self, name: str) -> PointDef:
        try:
            return self.points[self.index[name]]
        except KeyError:
            raise KeyError(f"model {self.model_id} ({self.name}) has no point {name!r}") from None

    def __contains__(self, name: object) -> bool:
        return name in self.index

    def point_at(self, offset: int) -> PointDef | None:
        """The point that covers register `offset` (None for unnamed registers)."""
        for p in self.points:
            if p.offset <= offset < p.end:
                return p
        return None


def available_model_ids() -> tuple[int, ...]:
    """Model ids that have a shipped JSON definition."""
    ids: list[int] = []
    for entry in resources.files("sunspec2").joinpath(_JSON_DIR).iterdir():
        stem = entry.name.removesuffix(".json")
        if entry.name.endswith(".json") and stem.startswith("model_"):
            try:
                ids.append(int(stem.removeprefix("model_")))
            except ValueError:
                continue
    return tuple(sorted(ids))


@functools.cache
def _definition(model_id: int) -> Mapping[str, Any]:
    path = resources.files("sunspec2").joinpath(f"{_JSON_DIR}/model_{model_id}.json")
    if not path.is_file():
        raise UnknownModelError(model_id)
    loaded: Any = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(loaded, dict) or not isinstance(loaded.get("group"), dict):
        raise LayoutError(f"model {model_id}: definition has no top-level group")
    return loaded


def _point_size(model_id: int, pdef: Mapping[str, Any]) -> int:
    ptype = str(pdef["type"])
    size = pdef.get("size")
    if size is not None:
        return int(size)
    try:
        return TYPE_SIZES[ptype]
    except KeyError:
        raise LayoutError(
            f"model {model_id} point {pdef.get('name')!r}: type {ptype!r} has no size"
        ) from None


def _raw_points(model_id: int, group: Mapping[str, Any]) -> tuple[list[tuple[str, Any]], list[str]]:
    """Top-level points, then fixed nested groups (prefixed) until the first repeating group."""
    out: list[tuple[str, Any]] = [(str(p["name"]), p) for p in group.get("points", [])]
    skipped: list[str] = []
    blocked = False
    for sub in group.get("groups", []):
        name = str(sub["name"])
        # Everything after a repeating group moves with its count: stop compiling there.
        if blocked or sub.get("count") is not None:
            blocked = True
            skipped.append(name)
            continue
        if sub.get("groups"):
            # A fixed group that nests further groups: not used by any model we need.
            blocked = True
            skipped.append(name)
            continue
        out.extend((f"{name}.{p['name']}", p) for p in sub.get("points", []))
    return out, skipped


def get_layout(model_id: int, length: int | None = None) -> ModelLayout:
    """The layout of `model_id` as served with model length `length` (None = as defined).

    Cached: the same (model_id, L) gives the same object. Raises UnknownModelError when no
    definition ships, LayoutError when `length` is not a valid L or the definition is malformed.
    """
    if length is None:
        definition = _definition(model_id)
        raw, _ = _raw_points(model_id, definition["group"])
        length = sum(_point_size(model_id, p) for _, p in raw) - 2
    return _compile(model_id, int(length))


@functools.cache
def _compile(model_id: int, served: int) -> ModelLayout:
    definition = _definition(model_id)
    group: Mapping[str, Any] = definition["group"]
    raw, skipped = _raw_points(model_id, group)
    defined_size = sum(_point_size(model_id, p) for _, p in raw)
    # Repeating groups contribute nothing at count 0, so this is the definition's base length.
    definition_length = defined_size - 2
    if served < 0 or served > 0xFFFE:
        raise LayoutError(f"model {model_id}: model length {served} is not a valid L")

    legacy_common = model_id == 1 and served == 65
    points: list[PointDef] = []
    truncated: list[str] = []
    offset = 0
    for name, pdef in raw:
        if legacy_common and name == "Pad":
            continue  # legacy model 1 (L = 65) has no Pad register
        size = _point_size(model_id, pdef)
        if offset + size > served + 2:
            truncated.append(name)
            offset += size
            continue
        sf_name: str | None = None
        sf_const: int | None = None
        sf_raw = pdef.get("sf")
        if sf_raw is not None:
            try:
                sf_const = int(sf_raw)
            except (TypeError, ValueError):
                sf_name = str(sf_raw)
        symbols = MappingProxyType(
            {str(s["name"]): int(s["value"]) for s in pdef.get("symbols", []) or []}
        )
        points.append(
            PointDef(
                name=name,
                offset=offset,
                size=size,
                type=str(pdef["type"]),
                units=str(pdef.get("units", "") or "").strip(),
                access=str(pdef.get("access", "R")),
                mandatory=pdef.get("mandatory", "O") == "M",
                static=pdef.get("static", "D") == "S",
                sf=sf_name,
                sf_const=sf_const,
                symbols=symbols,
            )
        )
        offset += size
    if len(points) < 2 or points[0].name != "ID" or points[1].name != "L":
        raise LayoutError(f"model {model_id}: definition does not start with ID and L")

    by_name = {p.name: i for i, p in enumerate(points)}
    resolved: list[PointDef] = []
    for p in points:
        if p.sf is None:
            resolved.append(p)
            continue
        # A point of a fixed nested group may name an SF of its own group or of the model.
        group_prefix = p.name.rpartition(".")[0]
        candidates = [f"{group_prefix}.{p.sf}", p.sf] if group_prefix else [p.sf]
        sf_index = next((by_name[c] for c in candidates if c in by_name), None)
        if sf_index is None:
            if p.sf in truncated or f"{group_prefix}.{p.sf}" in truncated:
                # The SF register is beyond the served length: the point cannot be scaled.
                truncated.append(p.name)
                continue
            raise LayoutError(f"model {model_id} point {p.name!r}: scale factor {p.sf!r} not found")
        if points[sf_index].type != "sunssf":
            raise LayoutError(
                f"model {model_id} point {p.name!r}: scale factor {p.sf!r} is not a sunssf"
            )
        resolved.append(replace(p, sf_index=sf_index))
    # Dropping points whose SF was truncated shifts indices: re-resolve against the final list.
    if len(resolved) != len(points):
        final_index = {p.name: i for i, p in enumerate(resolved)}
        resolved = [
            p if p.sf_index is None else replace(p, sf_index=final_index[points[p.sf_index].name])
            for p in resolved
        ]

    return ModelLayout(
        model_id=model_id,
        name=str(group.get("name", "")),
        label=str(group.get("label", "") or ""),
        length=served,
        definition_length=definition_length,
        points=tuple(resolved),
        skipped_groups=tuple(skipped),
        truncated=tuple(truncated),
    )

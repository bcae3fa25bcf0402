"""The operator's desired state as the gateway holds it: plain, immutable domain data.

Converted from the wire (dergw.v1.IntentDocument) in gateway.wire; consumed by gateway.schedule.
Events are immutable once received (IEEE 2030.5 §10.2.3): only their status changes, by a newer
version of the document.

Programs follow IEEE 2030.5 DERProgram: each has a primacy (lower wins) and a default control.
An event belongs to at most one program, and its `primacy` is its program's (gateway.wire copies
it from the program, so the rest of the gateway reads `ControlEvent.primacy` only).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field, fields

__all__ = [
    "MODES",
    "ControlEvent",
    "Controls",
    "EventStatus",
    "Intent",
    "Program",
    "SiteConstraints",
    "modes_from_mask",
    "modes_to_mask",
]

NS_PER_S = 1_000_000_000


class EventStatus(enum.IntEnum):
    """Server-set event status; values equal dergw.v1.EventStatus and 2030.5 currentStatus."""

    SCHEDULED = 0
    ACTIVE = 1
    CANCELLED = 2
    CANCELLED_RANDOMIZED = 3
    SUPERSEDED = 4
    COMPLETED = 5


@dataclass(frozen=True, slots=True)
class Controls:
    """Controls asked for by an event or a default. None = no constraint from this source."""

    max_gen_pct: float | None = None  # generation cap, % of each device's max W
    fixed_w: float | None = None  # fixed active power, + discharge / - charge
    target_w: float | None = None  # target active power of the scope
    export_limit_w: float | None = None  # at the PCC
    import_limit_w: float | None = None  # at the PCC
    gen_limit_w: float | None = None  # max generation of the scope
    load_limit_w: float | None = None  # max charge / load of the scope
    connect: bool | None = None
    energize: bool | None = None
    ramp_time_s: float | None = None

    def is_empty(self) -> bool:
        return all(getattr(self, f.name) is None for f in fields(self))

    def modes(self) -> frozenset[str]:
        """The control modes this source asks for (the fields that are set)."""
        return frozenset(f.name for f in fields(self) if getattr(self, f.name) is not None)

    def describe(self) -> str:
        """Compact human form, e.g. 'export_limit_w=2000'."""
        parts = [
            f"{f.name}={value:g}" if isinstance(value, float) else f"{f.name}={value}"
            for f in fields(self)
            if (value := getattr(self, f.name)) is not None
        ]
        return ", ".join(parts) or "no controls"


# The control modes, in declaration order: the field names of Controls (= dergw.v1.Controls
# field numbers 1..10, so the order is stable and a bit mask of it can be persisted).
MODES: tuple[str, ...] = tuple(f.name for f in fields(Controls))


def modes_to_mask(modes: Iterable[str]) -> int:
    """A set of modes as a bit mask (bit i = MODES[i]), e.g. to persist withdrawn modes."""
    return sum(1 << MODES.index(mode) for mode in set(modes))


def modes_from_mask(mask: int) -> frozenset[str]:
    """The inverse of modes_to_mask (unknown bits are ignored)."""
    return frozenset(mode for i, mode in enumerate(MODES) if mask >> i & 1)


@dataclass(frozen=True, slots=True)
class ControlEvent:
    event_id: str
    created_wall_ns: int
    start_wall_ns: int
    duration_s: int
    primacy: int
    controls: Controls
    device_id: str | None = None  # None = the whole site
    randomize_start_s: int = 0
    randomize_duration_s: int = 0
    status: EventStatus = EventStatus.SCHEDULED
    program_id: str | None = None  # None = belongs to no program (primacy is its own)

    @property
    def nominal_end_wall_ns(self) -> int:
        """End without randomization (what 'expired on arrival' is judged against)."""
        return self.start_wall_ns + self.duration_s * NS_PER_S


@dataclass(frozen=True, slots=True)
class SiteConstraints:
    export_limit_w: float | None = None
    import_limit_w: float | None = None
    soc_min_pct: float | None = None
    soc_max_pct: float | None = None


@dataclass(frozen=True, slots=True)
class Program:
    """An IEEE 2030.5 DERProgram: a primacy (lower wins) and its DefaultDERControl."""

    program_id: str
    primacy: int
    default_control: Controls = field(default_factory=Controls)


@dataclass(frozen=True, slots=True)
class Intent:
    site_id: str
    version: int
    issued_wall_ns: int
    events: tuple[ControlEvent, ...]
    # The site's base default: applies to a mode that no event and no program default asks for.
    default_control: Controls
    constraints: SiteConstraints
    programs: tuple[Program, ...] = ()

    @property
    def program_ids(self) -> frozenset[str]:
        return frozenset(p.program_id for p in self.programs)

"""What a benchmark reports and how a budget judges it (pure; no I/O).

A benchmark module (`bench/<name>.py`, listed in `bench.registry`) has
`async def run(options: BenchOptions) -> list[Figure]`. Each `Figure` is one row of the table
`dergw bench` prints: a measured value (a rate, a median, a size), optionally its p50 / p99, and
the ARCHITECTURE.md budget it is held to. `Budget.holds` is the only place a figure is judged.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Comparison = Literal[">=", "<="]
Checked = Literal["value", "p50", "p99"]


@dataclass(frozen=True)
class Budget:
    """A limit from ARCHITECTURE.md: `checked` of the figure must be `op` `limit`."""

    op: Comparison
    limit: float
    checked: Checked = "value"

    def holds(self, figure: Figure) -> bool:
        measured = getattr(figure, self.checked)
        if measured is None or not math.isfinite(measured):
            return False
        return bool(measured >= self.limit if self.op == ">=" else measured <= self.limit)

    def describe(self, unit: str) -> str:
        symbol = "≥" if self.op == ">=" else "≤"
        prefix = "" if self.checked == "value" else f"{self.checked} "
        return f"{prefix}{symbol} {format_number(self.limit)} {unit}".strip()


@dataclass(frozen=True)
class Figure:
    """One measured line. `value` is the headline (a rate, or the median of a latency)."""

    bench: str
    name: str
    value: float
    unit: str
    p50: float | None = None
    p99: float | None = None
    budget: Budget | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def verdict(self) -> Literal["ok", "OVER", ""]:
        if self.budget is None:
            return ""
        return "ok" if self.budget.holds(self) else "OVER"

    def to_json(self) -> dict[str, Any]:
        document = asdict(self)
        document["budget_text"] = self.budget.describe(self.unit) if self.budget else ""
        document["verdict"] = self.verdict
        return document

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> Figure:
        budget = document.get("budget")
        return cls(
            bench=document["bench"],
            name=document["name"],
            value=float(document["value"]),
            unit=document["unit"],
            p50=document.get("p50"),
            p99=document.get("p99"),
            budget=Budget(**budget) if budget else None,
            note=document.get("note", ""),
            extra=dict(document.get("extra", {})),
        )


@dataclass(frozen=True)
class BenchOptions:
    """What every benchmark is run with. `quick` shrinks durations and sizes (tests, smoke runs)."""

    quick: bool = False
    workdir: str | None = None  # where files go (a disk, not tmpfs, for honest fsyncs)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100): a value that was actually observed."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return float(ordered[min(rank, len(ordered)) - 1])


def latency_figure(
    bench: str,
    name: str,
    samples_s: Sequence[float],
    *,
    unit: str = "ms",
    budget: Budget | None = None,
    note: str = "",
) -> Figure:
    """A latency figure from samples in seconds: value = median, with p50 / p99, in `unit`."""
    scale = {"s": 1.0, "ms": 1e3, "µs": 1e6}[unit]
    median = statistics.median(samples_s) * scale if samples_s else math.nan
    return Figure(
        bench=bench,
        name=name,
        value=median,
        unit=unit,
        p50=median,
        p99=percentile(samples_s, 99) * scale if samples_s else math.nan,
        budget=budget,
        note=note or f"n={len(samples_s)}",
    )


def format_number(value: float | None) -> str:
    if value is None:
        return ""
    if not math.isfinite(value):
        return str(value)
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def render_table(figures: Sequence[Figure]) -> str:
    """The table `dergw bench` prints: one row per figure, budget and verdict beside it."""
    header = ("benchmark", "figure", "value", "p50", "p99", "unit", "budget", "", "note")
    rows = [
        (
            f.bench,
            f.name,
            format_number(f.value),
            format_number(f.p50),
            format_number(f.p99),
            f.unit,
            f.budget.describe(f.unit) if f.budget else "",
            f.verdict,
            f.note,
        )
        for f in figures
    ]
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header))]
    numeric = {2, 3, 4}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in numeric else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    out = [line(header), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    return "\n".join(out)

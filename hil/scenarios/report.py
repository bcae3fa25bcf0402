"""How scenarios report: a live timeline while they run, then checks with a verdict and figures."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from hil.server import SiteState

__all__ = ["Check", "ScenarioResult", "Timeline", "process_rss_mb"]


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str = ""


@dataclass
class ScenarioResult:
    name: str
    checks: list[Check] = field(default_factory=list)
    figures: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(check.passed for check in self.checks)

    def render(self, out: TextIO) -> None:
        print(f"\nscenario {self.name}:", file=out)
        for check in self.checks:
            mark = "PASS" if check.passed else "FAIL"
            print(
                f"  [{mark}] {check.name}" + (f" — {check.detail}" if check.detail else ""),
                file=out,
            )
        if self.figures:
            figures = ", ".join(
                f"{name}={_figure(value)}"
                for name, value in self.figures.items()
                if not math.isnan(value)
            )
            print(f"  figures: {figures}", file=out)
        verdict = "PASSED" if self.passed else "FAILED"
        print(f"scenario {self.name} {verdict}", file=out)


def _figure(value: float) -> str:
    """1000 W as 1000, not 1e+03; small values with three significant digits."""
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


class Timeline:
    """One line per second: what the site physically does, and what the gateway says it enforces."""

    def __init__(self, out: TextIO, pv_ids: list[str]) -> None:
        self._out = out
        self._pv_ids = pv_ids

    def header(self) -> None:
        print(
            f"{'t':>6}  {'PCC W':>8} {'':6}  {'PV W':>7} {'PV cap':>7}  {'BAT W':>6} {'SoC':>5}"
            f"  {'limit':>8}  event",
            file=self._out,
        )

    def note(self, text: str) -> None:
        print(f"{'':>6}  >>> {text}", file=self._out, flush=True)

    def row(self, t_s: float, state: SiteState, limit_w: float | None, event_id: str) -> None:
        pv = [d for d in state.devices.values() if d.kind == "pv"]
        caps = [float(d.wmaxlim_pct or 0.0) if d.wmaxlim_ena else 100.0 for d in pv]
        cap_text = f"{sum(caps) / len(caps):5.1f} %" if caps else "-"
        socs = [d.soc_pct for d in state.devices.values() if d.kind == "battery"]
        soc_text = f"{socs[0]:4.1f}%" if socs else "-"
        direction = "export" if state.meter_w < 0 else "import"
        limit_text = f"{limit_w:6.0f} W" if limit_w is not None else "    none"
        print(
            f"{t_s:5.0f}s  {state.meter_w:8.0f} {direction:6}  {state.pv_w:7.0f} {cap_text:>7}"
            f"  {state.battery_w:6.0f} {soc_text:>5}  {limit_text}  {event_id or '(default)'}",
            file=self._out,
            flush=True,
        )


def process_rss_mb(pid: int, field: str = "VmRSS") -> float | None:
    """A memory figure of a process from /proc (Linux), MB, or None when unavailable.

    VmRSS includes file-backed pages (shared libraries), whose resident share depends on the
    page cache (fault-around maps more of a library that is fully cached), so it varies by
    ~10 MB between runs of the same program; RssAnon is the process's own memory.
    """
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None

"""Pure text formatting for the console: ages, sizes, values with units. No Textual here."""

from __future__ import annotations

__all__ = ["fmt_age", "fmt_bytes", "fmt_duration", "fmt_value", "parse_controls"]


def fmt_duration(seconds: float) -> str:
    """Compact, largest two units: 3d4h, 2h05m, 4m07s, 12s."""
    s = int(max(0.0, seconds))
    days, rest = divmod(s, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def fmt_age(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 10:
        return f"{seconds:.1f}s ago"
    return f"{fmt_duration(seconds)} ago"


def fmt_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def fmt_value(value: float | str | None, unit: str) -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    text = f"{value:.2f}" if abs(value) < 100 and value != int(value) else f"{value:g}"
    return f"{text} {unit}".rstrip()


def parse_controls(text: str) -> dict[str, float]:
    """`export_limit_w=5000, import_limit_w=0` -> {name: value}. Raises ValueError with the
    offending item, so the form can say what to fix."""
    controls: dict[str, float] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, sep, raw = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"{item!r}: write name=value, e.g. export_limit_w=5000")
        try:
            controls[name.strip()] = float(raw)
        except ValueError:
            raise ValueError(f"{item!r}: {raw.strip()!r} is not a number") from None
    if not controls:
        raise ValueError("no controls given: write name=value, e.g. export_limit_w=5000")
    return controls

"""Which seqs of a gateway the headend has committed: a watermark plus ranges above it (pure).

Gateways send two lanes at once (live records as they happen, the backlog oldest first), so seqs
arrive out of order. The headend keeps, per gateway, the contiguous `watermark` (every seq at or
below it is committed or was settled before this headend saw it) and the committed ranges above
it, sorted, disjoint and never touching each other or the watermark. Acks carry both, so a
gateway deletes exactly what is committed and nothing else.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

__all__ = ["SeqRanges", "absorb"]

SeqRanges = tuple[tuple[int, int], ...]


def absorb(
    watermark: int, ranges: Sequence[tuple[int, int]], new: Iterable[tuple[int, int]]
) -> tuple[int, SeqRanges]:
    """Add the inclusive ranges `new` to (`watermark`, `ranges`); return the normalized result.

    Ranges at or below the watermark change nothing; a range reaching watermark + 1 raises the
    watermark and pulls in every range it then touches.
    """
    merged: list[tuple[int, int]] = []
    for first, last in sorted([*ranges, *new]):
        if first > last:
            raise ValueError(f"seq range {first}..{last} is empty (first > last)")
        if last <= watermark:
            continue
        first = max(first, watermark + 1)
        if merged and first <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], last))
        else:
            merged.append((first, last))
    if merged and merged[0][0] == watermark + 1:
        watermark = merged.pop(0)[1]
    return watermark, tuple(merged)

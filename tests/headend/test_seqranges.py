"""The committed-seq bookkeeping: watermark + ranges, against a brute-force set."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from headend_min.seqranges import absorb


def test_in_order_batches_raise_the_watermark() -> None:
    assert absorb(0, (), [(1, 10)]) == (10, ())
    assert absorb(10, (), [(11, 20)]) == (20, ())


def test_a_live_batch_ahead_of_the_backlog_is_kept_as_a_range() -> None:
    assert absorb(10, (), [(50, 60)]) == (10, ((50, 60),))
    # The backlog catches up and closes the hole: everything collapses into the watermark.
    assert absorb(10, ((50, 60),), [(11, 49)]) == (60, ())


def test_replays_and_overlaps_change_nothing_twice() -> None:
    assert absorb(20, ((30, 40),), [(5, 15), (30, 35)]) == (20, ((30, 40),))
    assert absorb(20, ((30, 40),), [(38, 45), (46, 46)]) == (20, ((30, 46),))


def test_an_empty_range_is_a_bug() -> None:
    with pytest.raises(ValueError, match="empty"):
        absorb(0, (), [(5, 4)])


@settings(max_examples=2000, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(1, 120), st.integers(0, 15)).map(lambda t: (t[0], t[0] + t[1])),
        max_size=25,
    ),
    st.integers(0, 30),
)
def test_matches_a_set_of_seqs(batches: list[tuple[int, int]], start: int) -> None:
    watermark, ranges = start, ()
    seen = set(range(1, start + 1))
    for first, last in batches:
        watermark, ranges = absorb(watermark, ranges, [(first, last)])
        seen.update(range(first, last + 1))
        expected_watermark = 0
        while expected_watermark + 1 in seen:
            expected_watermark += 1
        assert watermark == expected_watermark
        covered = set(range(1, watermark + 1))
        for index, (low, high) in enumerate(ranges):
            assert low <= high
            assert low > watermark + 1
            if index:
                assert low > ranges[index - 1][1] + 1
            covered.update(range(low, high + 1))
        assert covered == seen

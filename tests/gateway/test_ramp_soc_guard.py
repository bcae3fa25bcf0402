"""The software ramp and the SoC guard: small pure pieces of the safety kernel."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.ramp import NO_RAMP, event_rate_w_per_s, policy_rate_w_per_s, ramp, step_w
from gateway.soc_guard import SocGuard, soc_guard_step

watts = st.floats(-1e5, 1e5, allow_nan=False)


@settings(max_examples=2000, deadline=None)
@given(watts, watts, st.floats(0.0, 1e4), st.floats(0.0, 100.0))
def test_ramp_moves_towards_the_target_by_at_most_rate_times_time(
    last: float, desired: float, rate: float, elapsed: float
) -> None:
    value = ramp(last, desired, step_w(rate, elapsed))
    assert abs(value - last) <= rate * elapsed + 1e-9
    # Never past the target, and all the way when the step allows it.
    assert min(last, desired) - 1e-9 <= value <= max(last, desired) + 1e-9
    if abs(desired - last) <= rate * elapsed:
        assert value == desired


def test_no_rate_or_no_memory_means_no_ramp() -> None:
    assert ramp(None, 5000.0, 1.0) == 5000.0
    assert ramp(0.0, 5000.0, step_w(NO_RAMP, 1.0)) == 5000.0
    assert policy_rate_w_per_s(None, 10_000.0) == NO_RAMP
    assert policy_rate_w_per_s(0.0, 10_000.0) == NO_RAMP
    assert policy_rate_w_per_s(10.0, 10_000.0) == pytest.approx(1000.0)


def test_event_rate_moves_the_change_over_the_ramp_time() -> None:
    assert event_rate_w_per_s(-6000.0, 60.0, 10_000.0) == pytest.approx(100.0)
    assert event_rate_w_per_s(6000.0, 0.0, 10_000.0) == NO_RAMP  # 0 s: at once
    # A change of ~0 W still gets a usable rate (1 % of the rating over the ramp time).
    assert event_rate_w_per_s(0.0, 10.0, 10_000.0) == pytest.approx(10.0)
    assert math.isinf(step_w(NO_RAMP, 5.0))


def _guard(soc: float | None, previous: SocGuard | None = None) -> SocGuard:
    return soc_guard_step(
        previous or SocGuard(), soc, floor_pct=10.0, ceiling_pct=90.0, hysteresis_pct=5.0
    )


def test_discharge_block_latches_at_the_floor_and_clears_above_floor_plus_hysteresis() -> None:
    guard = SocGuard()
    seen = []
    for soc in (20.0, 12.0, 10.0, 11.0, 14.0, 15.0, 15.1, 12.0, 10.0):
        guard = _guard(soc, guard)
        seen.append(guard.discharge_blocked)
    assert seen == [False, False, True, True, True, True, False, False, True]


def test_charge_block_latches_at_the_ceiling_and_clears_below_ceiling_minus_hysteresis() -> None:
    guard = SocGuard()
    seen = []
    for soc in (80.0, 90.0, 88.0, 85.0, 84.9, 89.0):
        guard = _guard(soc, guard)
        seen.append(guard.charge_blocked)
    assert seen == [False, True, True, True, False, False]


def test_unknown_soc_blocks_discharge_and_keeps_the_charge_latch() -> None:
    assert _guard(None) == SocGuard(discharge_blocked=True, charge_blocked=False)
    assert _guard(math.nan, SocGuard(charge_blocked=True)) == SocGuard(True, True)
    # Known again but inside the hysteresis band: still blocked (conservative).
    assert _guard(12.0, _guard(None)).discharge_blocked
    assert not _guard(50.0, _guard(None)).discharge_blocked


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.one_of(st.none(), st.floats(0.0, 100.0)), min_size=1, max_size=20))
def test_guard_never_allows_discharge_at_or_below_the_floor(socs: list[float | None]) -> None:
    guard = SocGuard()
    for soc in socs:
        guard = _guard(soc, guard)
        if soc is None or soc <= 10.0:
            assert guard.discharge_blocked
        if soc is not None and soc >= 90.0:
            assert guard.charge_blocked
        if soc is not None and soc > 15.0:
            assert not guard.discharge_blocked
        if soc is not None and soc < 85.0:
            assert not guard.charge_blocked

"""Admission control: a reconnect storm becomes an even stream of sessions (pure, fake clock)."""

from __future__ import annotations

import pytest

from headend_min.session import Admission


class _Mono:
    def __init__(self) -> None:
        self.ns = 0

    def __call__(self) -> int:
        return self.ns

    def advance(self, seconds: float) -> None:
        self.ns += int(seconds * 1e9)


def test_a_burst_is_admitted_then_the_rest_are_spread_out() -> None:
    mono = _Mono()
    admission = Admission(rate_per_s=10, burst=5, mono_ns=mono)
    answers = [admission.admit() for _ in range(25)]
    assert answers[:5] == [None] * 5
    delays = answers[5:]
    assert all(d is not None for d in delays)
    # Each refused gateway is promised a later slot: 20 gateways at 10/s spread over ~2 s.
    assert delays == sorted(delays)  # type: ignore[type-var]
    assert delays[0] == 1
    assert delays[-1] == 2
    assert admission.admitted == 5
    assert admission.refused == 20


def test_tokens_come_back_at_the_rate() -> None:
    mono = _Mono()
    admission = Admission(rate_per_s=2, burst=1, mono_ns=mono)
    assert admission.admit() is None
    assert admission.admit() == 1
    # The refused one's token is reserved for it: 0.5 s later nothing is free yet...
    mono.advance(0.5)
    assert admission.admit() is not None
    # ...and once the promises are paid, sessions are admitted again.
    mono.advance(5.0)
    assert admission.admit() is None


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="rate_per_s"):
        Admission(rate_per_s=0, burst=1)

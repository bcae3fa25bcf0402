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


def test_a_refused_gateway_is_admitted_in_its_reserved_slot() -> None:
    mono = _Mono()
    admission = Admission(rate_per_s=2, burst=1, mono_ns=mono)
    assert admission.admit("gw-1") is None
    assert admission.admit("gw-2") == 1
    assert admission.reservations == 1
    # Back too early: told the rest of the wait, and no second slot is taken.
    mono.advance(0.2)
    assert admission.admit("gw-2") == 1
    # Others arriving meanwhile queue behind it...
    assert admission.admit("gw-3") == 1
    # ...and at its slot gw-2 gets in although no token is free for a newcomer.
    mono.advance(0.3)
    assert admission.admit("gw-2") is None
    assert admission.admit("gw-4") is not None
    assert admission.reservations == 2  # gw-3 and gw-4


def test_a_retrying_storm_is_admitted_at_the_rate() -> None:
    """Thousands of gateways retrying at their RetryAfter (plus jitter) all get in, at the
    admission rate: retries never take the slots promised to the ones refused before."""
    mono = _Mono()
    admission = Admission(rate_per_s=200, burst=400, mono_ns=mono)
    gateways = 3000
    come_back_ns = dict.fromkeys(range(gateways), 0)
    admitted_at: dict[int, int] = {}
    step_ns = 10_000_000
    while come_back_ns and mono.ns < 60 * 10**9:
        for gateway in [g for g, at in come_back_ns.items() if at <= mono.ns]:
            wait_s = admission.admit(f"gw-{gateway}")
            if wait_s is None:
                admitted_at[gateway] = mono.ns
                del come_back_ns[gateway]
            else:
                # The gateway's own jitter: up to half the delay again.
                come_back_ns[gateway] = mono.ns + int(wait_s * 1.25e9)
        mono.ns += step_ns
    assert len(admitted_at) == gateways
    last_s = max(admitted_at.values()) / 1e9
    # 400 at once, then 200/s: (3000 - 400) / 200 = 13 s, plus the jitter of the last ones.
    assert 12.0 < last_s < 20.0

"""Schedule resolution: every rule by a named example, and hypothesis against a brute force.

The rules are protocols.md §1.3 (event rules), §1.6 (defaults) and §1.8 (offline); the module
docstring of gateway.schedule restates them.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, note, settings
from hypothesis import strategies as st

from gateway.intent import (
    MODES,
    NS_PER_S,
    ControlEvent,
    Controls,
    EventStatus,
    Intent,
    Program,
    SiteConstraints,
)
from gateway.schedule import (
    ActiveControls,
    ArrivalVerdict,
    ControlSource,
    Override,
    arrival_verdict,
    effective_window,
    effective_windows,
    next_boundary_wall_ns,
    ownership,
    resolve,
)

T0 = 1_800_000_000 * NS_PER_S
DEVICES = frozenset({"pv1", "pv2", "bat1"})
FALLBACK = Controls(export_limit_w=5000.0)
DEFAULT = Controls(max_gen_pct=100.0)


def _event(
    event_id: str,
    start_s: int,
    duration_s: int,
    *,
    primacy: int = 1,
    created_s: int = 0,
    device_id: str | None = None,
    status: EventStatus = EventStatus.SCHEDULED,
    export_w: float = 1000.0,
    controls: Controls | None = None,
    program_id: str | None = None,
) -> ControlEvent:
    return ControlEvent(
        event_id=event_id,
        created_wall_ns=T0 + created_s * NS_PER_S,
        start_wall_ns=T0 + start_s * NS_PER_S,
        duration_s=duration_s,
        primacy=primacy,
        controls=controls if controls is not None else Controls(export_limit_w=export_w),
        device_id=device_id,
        status=status,
        program_id=program_id,
    )


def _intent(
    *events: ControlEvent,
    default: Controls = DEFAULT,
    programs: tuple[Program, ...] = (),
    version: int = 3,
) -> Intent:
    return Intent("site", version, T0, tuple(events), default, SiteConstraints(), programs)


def _site_event(active: ActiveControls) -> str | None:
    (event_id,) = active.site.event_ids or {None}
    return event_id


def _at(
    intent: Intent | None,
    t_s: float,
    offsets: dict[str, tuple[int, int]] | None = None,
    **kwargs: Any,
) -> ActiveControls:
    return resolve(
        intent,
        T0 + round(t_s * NS_PER_S),
        fallback=FALLBACK,
        devices=DEVICES,
        offsets=offsets,
        **kwargs,
    )


# -- defaults and fallback (§1.6, §1.8) -------------------------------------------------------


def test_no_intent_uses_the_static_fallback() -> None:
    active = _at(None, 0)
    assert active.source is ControlSource.FALLBACK
    assert active.site.controls == FALLBACK
    assert active.site.label("export_limit_w") == "fallback (config)"
    assert active.intent_version == 0


def test_intent_without_any_default_uses_the_fallback() -> None:
    active = _at(_intent(default=Controls()), 0)
    assert active.source is ControlSource.FALLBACK
    assert active.site.controls == FALLBACK


def test_fallback_stops_once_any_default_was_received() -> None:
    # A program default for another mode is "a default": the fallback's export limit is gone.
    program = Program("utility", 1, Controls(max_gen_pct=80.0))
    active = _at(_intent(default=Controls(), programs=(program,)), 0)
    assert active.site.controls == Controls(max_gen_pct=80.0)
    assert active.site.label("max_gen_pct") == "default of program utility v3"
    assert active.site.sources["max_gen_pct"].program_id == "utility"


def test_program_defaults_per_mode_lowest_primacy_then_program_id_then_base() -> None:
    programs = (
        Program("z-aggregator", 2, Controls(export_limit_w=9000.0, import_limit_w=7000.0)),
        Program("utility", 1, Controls(export_limit_w=3000.0)),
        Program("a-retailer", 2, Controls(import_limit_w=6000.0, connect=True)),
    )
    base = Controls(export_limit_w=1.0, import_limit_w=1.0, connect=False, max_gen_pct=90.0)
    site = _at(_intent(default=base, programs=programs), 0).site
    assert site.controls == Controls(
        export_limit_w=3000.0, import_limit_w=6000.0, connect=True, max_gen_pct=90.0
    )
    assert site.label("export_limit_w") == "default of program utility v3"
    assert site.label("import_limit_w") == "default of program a-retailer v3"  # tie: program_id
    assert site.label("connect") == "default of program a-retailer v3"
    assert site.label("max_gen_pct") == "default control v3"  # no program asks for it


def test_default_applies_outside_events_and_event_inside() -> None:
    intent = _intent(_event("e1", 10, 20))
    assert _at(intent, 9.999).source is ControlSource.DEFAULT
    inside = _at(intent, 10)
    assert inside.source is ControlSource.EVENT
    assert _site_event(inside) == "e1"
    assert inside.site.controls == Controls(max_gen_pct=100.0, export_limit_w=1000.0)
    assert inside.site.label("export_limit_w") == "event e1"
    assert inside.site.label("max_gen_pct") == "default control v3"
    assert _site_event(_at(intent, 29.999)) == "e1"
    after = _at(intent, 30)
    assert after.source is ControlSource.DEFAULT
    assert after.site.controls == DEFAULT


def test_gen10_any_active_event_beats_every_default_then_supersession() -> None:
    """CSIP-AUS GEN-10 (§1.3 rule 8): a primacy-2 event beats the primacy-1 program's default;
    a later primacy-1 event supersedes it for good; then the primacy-1 default returns."""
    programs = (
        Program("utility", 1, Controls(export_limit_w=3000.0)),
        Program("aggregator", 2),
    )
    p2 = _event("p2", 0, 600, primacy=2, export_w=20000.0, program_id="aggregator")
    v1 = _intent(p2, default=Controls(), programs=programs)
    active = _at(v1, 10)
    assert active.site.controls.export_limit_w == 20000.0
    assert active.site.label("export_limit_w") == "event p2 (program aggregator)"
    assert active.site.sources["export_limit_w"].program_id == "aggregator"

    p1 = _event("p1", 100, 60, primacy=1, created_s=100, export_w=0.0, program_id="utility")
    v2 = replace(v1, version=4, events=(p2, p1))
    assert ownership(v2, {}, DEVICES) == {"p1": {"export_limit_w"}, "p2": set()}
    assert _at(v2, 130).site.controls.export_limit_w == 0.0
    after = _at(v2, 200)  # p2's window still runs, but it is superseded: the default is back
    assert after.site.controls.export_limit_w == 3000.0
    assert after.site.label("export_limit_w") == "default of program utility v4"


def test_all23_offline_keeps_following_five_back_to_back_events_then_the_default() -> None:
    """CSIP-AUS ALL-23 (§1.8 rule 1): default export/import 0 W, five back-to-back 60 s
    controls, comms lost: follow the schedule, then the default."""
    default = Controls(export_limit_w=0.0, import_limit_w=0.0)
    events = [_event(f"c{i}", 60 * i, 60, export_w=1000.0 * (i + 1)) for i in range(5)]
    intent = _intent(*events, default=default)
    for i in range(5):
        for t in (60 * i, 60 * i + 30, 60 * i + 59.999):
            active = _at(intent, t)
            assert _site_event(active) == f"c{i}", t
            assert active.site.controls.export_limit_w == 1000.0 * (i + 1)
    assert _at(intent, 300).site.controls == default
    assert _at(intent, 300).source is ControlSource.DEFAULT


# -- priority and supersession (§1.3 rules 6, 7) ---------------------------------------------


def test_successive_events_leave_no_gap() -> None:
    intent = _intent(_event("a", 0, 10, export_w=1.0), _event("b", 10, 10, export_w=2.0))
    for t in (0, 5, 9.999999, 10, 15, 19.999):
        assert _at(intent, t).source is ControlSource.EVENT, t
    assert _site_event(_at(intent, 9.999999)) == "a"
    assert _site_event(_at(intent, 10)) == "b"
    assert ownership(intent) == {"a": {"export_limit_w"}, "b": {"export_limit_w"}}


def test_lower_primacy_wins_and_supersedes_for_good() -> None:
    intent = _intent(
        _event("low", 0, 100, primacy=2, created_s=50),
        _event("high_old", 0, 100, primacy=1, created_s=1),
        _event("high_new", 0, 100, primacy=1, created_s=2),
    )
    assert _site_event(_at(intent, 5)) == "high_new"
    owned = ownership(intent)
    assert owned == {"high_new": {"export_limit_w"}, "high_old": set(), "low": set()}


def test_equal_primacy_tie_is_broken_by_the_newer_creation_then_event_id() -> None:
    older = _event("older", 0, 100, created_s=1, export_w=1.0)
    newer = _event("newer", 50, 10, created_s=2, export_w=2.0)
    intent = _intent(older, newer)
    # The newer one supersedes the older for its whole window, not just where they overlap.
    assert _site_event(_at(intent, 10)) is None
    assert _site_event(_at(intent, 55)) == "newer"
    assert _site_event(_at(intent, 70)) is None  # the older one does not resume
    twins = _intent(_event("b", 0, 10, export_w=2.0), _event("a", 0, 10, export_w=1.0))
    assert _site_event(_at(twins, 1)) == "a"  # identical rank: event_id decides


def test_nested_event_supersedes_the_outer_one_which_never_resumes() -> None:
    intent = _intent(_event("outer", 0, 100, primacy=2), _event("inner", 40, 20, primacy=1))
    assert [_site_event(_at(intent, t)) for t in (10, 45, 70)] == [None, "inner", None]


def test_partly_superseded_event_keeps_its_other_modes_for_its_whole_window() -> None:
    wide = _event("wide", 0, 100, primacy=2, controls=Controls(export_limit_w=5.0, connect=True))
    narrow = _event("narrow", 40, 20, primacy=1, controls=Controls(export_limit_w=0.0))
    intent = _intent(wide, narrow, default=Controls(export_limit_w=9.0))
    assert ownership(intent) == {"wide": {"connect"}, "narrow": {"export_limit_w"}}
    at_10, at_50, at_70 = (_at(intent, t).site for t in (10, 50, 70))
    assert (at_10.label("export_limit_w"), at_10.label("connect")) == (
        "default control v3",
        "event wide",
    )
    assert at_50.controls == Controls(export_limit_w=0.0, connect=True)
    assert at_50.event_ids == {"wide", "narrow"}
    assert at_70.controls == Controls(export_limit_w=9.0, connect=True)


def test_a_mode_freed_by_supersession_passes_down_the_chain() -> None:
    """high takes x from mid; low (overlapping mid only) may own x: mid does not own it."""
    high = _event("high", 0, 10, primacy=0, controls=Controls(export_limit_w=1.0))
    mid = _event("mid", 5, 20, primacy=1, controls=Controls(export_limit_w=2.0, connect=True))
    low = _event("low", 20, 20, primacy=2, controls=Controls(export_limit_w=3.0, connect=False))
    owned = ownership(_intent(high, mid, low))
    assert owned == {"high": {"export_limit_w"}, "mid": {"connect"}, "low": {"export_limit_w"}}


def test_withdrawn_modes_are_never_owned_again() -> None:
    wide = _event("wide", 0, 100, controls=Controls(export_limit_w=5.0, connect=True))
    intent = _intent(wide, default=Controls(export_limit_w=9.0))
    assert ownership(intent, withdrawn={"wide": frozenset({"export_limit_w"})}) == {
        "wide": {"connect"}
    }
    active = _at(intent, 1, withdrawn={"wide": frozenset({"export_limit_w"})})
    assert active.site.label("export_limit_w") == "default control v3"
    assert active.site.label("connect") == "event wide"


def test_cancelled_superseded_and_completed_events_never_apply() -> None:
    for status in (
        EventStatus.CANCELLED,
        EventStatus.CANCELLED_RANDOMIZED,
        EventStatus.SUPERSEDED,
        EventStatus.COMPLETED,
    ):
        intent = _intent(_event("e", 0, 100, status=status))
        assert _at(intent, 5).source is ControlSource.DEFAULT
        assert ownership(intent) == {"e": set()}


def test_cancellation_mid_event_returns_to_the_next_control_at_once() -> None:
    running = _event("e", 0, 100, primacy=2)
    under = _event("under", 0, 200, primacy=3, export_w=7.0)  # superseded by e, stays so
    v1 = _intent(running, under)
    assert _site_event(_at(v1, 50)) == "e"
    v2 = replace(v1, version=4, events=(replace(running, status=EventStatus.CANCELLED), under))
    # "under" was superseded for good (the lifecycle remembers it: `withdrawn`, see
    # tests/gateway/test_lifecycle.py), so the default takes over at once.
    after = _at(v2, 50, withdrawn={"under": frozenset(MODES)})
    assert after.source is ControlSource.DEFAULT
    assert after.site.controls == DEFAULT
    # Without that memory the static rules alone would let "under" own its mode again.
    assert ownership(v2)["under"] == {"export_limit_w"}


# -- scopes ------------------------------------------------------------------------------------


def test_device_event_applies_to_that_device_only() -> None:
    intent = _intent(_event("d", 0, 100, device_id="pv2"))
    active = _at(intent, 1)
    assert active.site.controls == DEFAULT
    assert _site_event(active) is None
    assert {d: set(sc.event_ids) for d, sc in active.device.items()} == {"pv2": {"d"}}
    assert active.device["pv2"].controls == Controls(export_limit_w=1000.0)  # only its modes
    assert active.source is ControlSource.EVENT
    assert active.for_device("pv2").controls == Controls(max_gen_pct=100.0, export_limit_w=1000.0)
    assert active.for_device("pv1") == active.site


def test_device_and_site_events_do_not_compete() -> None:
    site = _event("site", 0, 100, primacy=0, controls=Controls(max_gen_pct=50.0))
    device = _event("dev", 0, 100, primacy=5, device_id="pv1", controls=Controls(max_gen_pct=80.0))
    active = _at(_intent(site, device), 1)
    assert active.site.controls.max_gen_pct == 50.0
    assert active.device["pv1"].controls.max_gen_pct == 80.0
    assert active.for_device("pv1").controls.max_gen_pct == 80.0  # replaces the site's value
    assert active.for_device("pv2").controls.max_gen_pct == 50.0


def test_events_of_one_device_compete_with_each_other_only() -> None:
    a = _event("a", 0, 100, device_id="pv1", primacy=1)
    b = _event("b", 0, 100, device_id="pv1", primacy=2)
    c = _event("c", 0, 100, device_id="pv2", primacy=3)
    assert ownership(_intent(a, b, c), {}, DEVICES) == {
        "a": {"export_limit_w"},
        "b": set(),
        "c": {"export_limit_w"},
    }


def test_unknown_device_event_is_never_widened_to_the_site() -> None:
    intent = _intent(_event("ghost", 0, 100, device_id="pv99"))
    active = _at(intent, 1)
    assert active.source is ControlSource.DEFAULT
    assert active.site.controls == DEFAULT
    assert dict(active.device) == {}
    verdict, reason = arrival_verdict(intent.events[0], T0, DEVICES)
    assert verdict is ArrivalVerdict.REJECTED_INVALID
    assert "pv99" in reason


def test_event_of_an_unknown_program_is_never_applied() -> None:
    programs = (Program("utility", 1),)
    stray = _event("stray", 0, 100, program_id="nope")
    intent = _intent(stray, programs=programs)
    assert _at(intent, 1).source is ControlSource.DEFAULT
    verdict, reason = arrival_verdict(stray, T0, DEVICES, programs=intent.program_ids)
    assert verdict is ArrivalVerdict.REJECTED_INVALID
    assert "'nope'" in reason
    assert "utility" in reason
    # An event of no program is valid, with its own primacy.
    plain = _event("plain", 0, 100)
    assert arrival_verdict(plain, T0, DEVICES, programs={"utility"})[0] is ArrivalVerdict.ACCEPTED


# -- overrides and blocked events ----------------------------------------------------------


def test_overrides_beat_events_and_defaults_for_the_modes_they_set() -> None:
    site_event = _event("s", 0, 100, controls=Controls(export_limit_w=1.0, connect=True))
    dev_event = _event("d", 0, 100, device_id="pv1", controls=Controls(max_gen_pct=10.0))
    intent = _intent(site_event, dev_event)
    overrides = [
        Override("o1", "console: alice", Controls(export_limit_w=500.0, max_gen_pct=20.0)),
        Override("o2", "console: bob", Controls(max_gen_pct=30.0), device_id="pv2"),
        Override("o3", "console: eve", Controls(connect=False), device_id="pv99"),
    ]
    active = _at(intent, 1, overrides=overrides)
    assert active.site.controls == Controls(export_limit_w=500.0, max_gen_pct=20.0, connect=True)
    assert active.site.label("export_limit_w") == "local override (console: alice)"
    assert active.site.label("connect") == "event s"
    # The site override takes max_gen_pct from pv1's event too; pv2's own override beats it.
    assert "pv1" not in active.device
    assert active.for_device("pv1").controls.max_gen_pct == 20.0
    assert active.device["pv2"].controls == Controls(max_gen_pct=30.0)
    assert "pv99" not in active.device
    assert active.source is ControlSource.OVERRIDE


def test_blocked_events_leave_defaults_fallback_and_overrides() -> None:
    intent = _intent(_event("e", 0, 100), _event("d", 0, 100, device_id="pv1"))
    override = Override("o", "console", Controls(connect=True))
    active = _at(
        intent,
        1,
        overrides=[override],
        events_allowed=False,
        blocked_reason="clock not synchronised",
    )
    assert active.active_event_ids == ()
    assert active.site.controls == Controls(max_gen_pct=100.0, connect=True)
    assert not active.events_allowed
    assert active.blocked_reason == "clock not synchronised"


# -- time: arrival, randomization, successive events (§1.3 rules 3, 4, 5) ---------------------


def test_event_already_ended_on_arrival_is_rejected_late() -> None:
    event = replace(_event("old", 0, 10), randomize_duration_s=100)
    # The nominal end counts, not the randomized one.
    assert arrival_verdict(event, T0 + 10 * NS_PER_S, DEVICES)[0] is ArrivalVerdict.REJECTED_LATE
    assert arrival_verdict(event, T0 + 9 * NS_PER_S, DEVICES)[0] is ArrivalVerdict.ACCEPTED


def test_randomization_offsets_shift_the_window() -> None:
    event = _event("r", 100, 10)
    assert effective_window(event, (5, -3)) == (T0 + 105 * NS_PER_S, T0 + 112 * NS_PER_S)
    assert effective_window(event, (5, -30)) == (T0 + 105 * NS_PER_S, T0 + 105 * NS_PER_S)
    assert _at(_intent(event), 103, offsets={"r": (5, 0)}).source is ControlSource.DEFAULT
    assert _at(_intent(event), 105, offsets={"r": (5, 0)}).source is ControlSource.EVENT


@pytest.mark.parametrize(("a_duration_offset", "b_start_offset"), [(20, 10), (-20, 10), (0, -5)])
def test_successive_events_with_randomization_stay_gapless(
    a_duration_offset: int, b_start_offset: int
) -> None:
    """§1.3 rule 5: the later event starts at the earlier one's *effective* end."""
    a = _event("a", 0, 60, export_w=1.0)
    b = _event("b", 60, 60, export_w=2.0)
    offsets = {"a": (0, a_duration_offset), "b": (b_start_offset, 7)}
    a_end = 60 + a_duration_offset
    windows = effective_windows([a, b], offsets)
    assert windows["a"] == (T0, T0 + a_end * NS_PER_S)
    assert windows["b"] == (T0 + a_end * NS_PER_S, T0 + (a_end + 67) * NS_PER_S)
    assert effective_window(b, offsets["b"], others=[a], others_offsets=offsets) == windows["b"]
    intent = _intent(a, b)
    assert ownership(intent, offsets) == {"a": {"export_limit_w"}, "b": {"export_limit_w"}}
    assert _site_event(_at(intent, a_end - 0.001, offsets)) == "a"
    assert _site_event(_at(intent, a_end, offsets)) == "b"
    assert next_boundary_wall_ns(intent, T0, offsets) == T0 + a_end * NS_PER_S


def test_successive_rule_chains_and_respects_scope_and_status() -> None:
    a = _event("a", 0, 10)
    b = _event("b", 10, 10)
    c = _event("c", 20, 10)
    other_scope = _event("dev", 10, 10, device_id="pv1")
    cancelled = _event("x", 0, 10, device_id="pv2", status=EventStatus.CANCELLED)
    after_cancelled = _event("y", 10, 10, device_id="pv2")
    offsets = {"a": (0, 3), "b": (0, 4), "dev": (2, 0), "x": (0, 9), "y": (1, 0)}
    windows = effective_windows([a, b, c, other_scope, cancelled, after_cancelled], offsets)
    assert windows["b"] == (T0 + 13 * NS_PER_S, T0 + 27 * NS_PER_S)
    assert windows["c"] == (T0 + 27 * NS_PER_S, T0 + 37 * NS_PER_S)
    assert windows["dev"] == (T0 + 12 * NS_PER_S, T0 + 22 * NS_PER_S)  # no chain across scopes
    assert windows["y"] == (T0 + 11 * NS_PER_S, T0 + 21 * NS_PER_S)  # nor after a cancelled one


def test_next_boundary_skips_server_ended_events() -> None:
    intent = _intent(_event("a", 10, 10, status=EventStatus.CANCELLED), _event("b", 30, 10))
    assert next_boundary_wall_ns(intent, T0, {}) == T0 + 30 * NS_PER_S
    assert next_boundary_wall_ns(intent, T0 + 30 * NS_PER_S, {}) == T0 + 40 * NS_PER_S
    assert next_boundary_wall_ns(intent, T0 + 40 * NS_PER_S, {}) is None
    assert next_boundary_wall_ns(None, T0, {}) is None


# --------------------------------------------------------------------------------------------
# Brute force: a deliberately naive reference, checked against resolve per mode.

_MODES_USED = ("export_limit_w", "max_gen_pct", "connect", "fixed_w")
_PROGRAMS = ("p1", "p2")
_SCOPES = (None, None, None, "pv1", "pv1", "bat1", "nope")
_STATUSES = (
    *[EventStatus.SCHEDULED] * 6,
    *[EventStatus.ACTIVE] * 3,
    EventStatus.CANCELLED,
    EventStatus.SUPERSEDED,
    EventStatus.COMPLETED,
)


def _controls(modes: frozenset[str], salt: int) -> Controls:
    values: dict[str, Any] = {}
    for mode in modes:
        values[mode] = (salt % 2 == 0) if mode == "connect" else float(salt * 10 + len(mode))
    return replace(Controls(), **values)


class _Digits:
    """Decodes one drawn integer into many small choices: a cheap strategy keeps 10,000
    examples fast (hypothesis' per-draw cost dominates otherwise)."""

    def __init__(self, seed: int) -> None:
        # Hypothesis favours small integers; hashing spreads them over every choice.
        self.seed = int.from_bytes(hashlib.blake2b(seed.to_bytes(16, "big")).digest(), "big")

    def take(self, n: int) -> int:
        self.seed, digit = divmod(self.seed, n)
        return digit

    def pick(self, options: tuple[Any, ...]) -> Any:
        return options[self.take(len(options))]

    def modes(self, *, at_least_one: bool) -> frozenset[str]:
        mask = self.take(16)
        if at_least_one and mask == 0:
            mask = 1 << self.take(4)
        return frozenset(m for i, m in enumerate(_MODES_USED) if mask >> i & 1)


_SEED = st.integers(0, 2**64)


@st.composite
def _cases(
    draw: st.DrawFn,
) -> tuple[Intent, dict[str, tuple[int, int]], list[Override], bool, int]:
    head = _Digits(draw(_SEED))
    programs = tuple(
        Program(_PROGRAMS[i], head.take(3), _controls(head.modes(at_least_one=False), 7 + i))
        for i in range(head.take(3))
    )
    primacy_of = {p.program_id: p.primacy for p in programs}
    events: list[ControlEvent] = []
    offsets: dict[str, tuple[int, int]] = {}
    n_events = head.take(8)
    for i, seed in enumerate(draw(st.lists(_SEED, min_size=n_events, max_size=n_events))):
        digits = _Digits(seed)
        defined = tuple(p.program_id for p in programs)
        program_id = digits.pick((None, None, *defined, *defined, "ghost"))
        own_primacy = digits.take(3)
        event = ControlEvent(
            event_id=f"e{i}",
            created_wall_ns=T0 + digits.take(4) * NS_PER_S,
            # Starts on a 5 s grid so that successive events (rule 5) occur often.
            start_wall_ns=T0 + 5 * digits.take(9) * NS_PER_S,
            duration_s=5 * (1 + digits.take(6)),
            primacy=primacy_of.get(program_id or "", own_primacy),
            controls=_controls(digits.modes(at_least_one=True), i),
            device_id=digits.pick(_SCOPES),
            status=digits.pick(_STATUSES),
            program_id=program_id,
        )
        events.append(event)
        offsets[event.event_id] = (digits.take(7) - 3, digits.take(9) - 4)
    overrides = [
        Override(
            f"o{i}",
            f"tech {i}",
            _controls(head.modes(at_least_one=True), 20 + i),
            head.pick((None, "pv1", "nope")),
        )
        for i in range(head.pick((0, 0, 0, 1, 2)))
    ]
    base = _controls(head.modes(at_least_one=False), 3)
    intent = Intent("site", 9, T0, tuple(events), base, SiteConstraints(), programs)
    t_s = head.take(80) - 5  # the instant resolved, in s from T0
    note(f"intent={intent!r}\noffsets={offsets!r}\noverrides={overrides!r}\nt_s={t_s}")
    return intent, offsets, overrides, head.pick((True, True, True, False)), t_s


_BRUTE_DEVICES = frozenset({"pv1", "bat1"})
_BRUTE_FALLBACK = Controls(export_limit_w=5000.0, connect=True)


def _reference_windows(
    events: tuple[ControlEvent, ...], offsets: dict[str, tuple[int, int]]
) -> dict[str, tuple[int, int]]:
    """Windows in whole seconds from T0, rule 4 then rule 5, by plain recursion."""
    terminal = {
        EventStatus.CANCELLED,
        EventStatus.CANCELLED_RANDOMIZED,
        EventStatus.SUPERSEDED,
        EventStatus.COMPLETED,
    }

    def window(event: ControlEvent) -> tuple[int, int]:
        start = (event.start_wall_ns - T0) // NS_PER_S + offsets[event.event_id][0]
        length = max(0, event.duration_s + offsets[event.event_id][1])
        if event.status not in terminal:
            ends = [
                window(p)[1]
                for p in events
                if p.status not in terminal
                and p.device_id == event.device_id
                and p.event_id != event.event_id
                and p.nominal_end_wall_ns == event.start_wall_ns
            ]
            if ends:
                start = max(ends)
        return start, start + length

    return {e.event_id: window(e) for e in events}


def _reference(
    intent: Intent,
    offsets: dict[str, tuple[int, int]],
    overrides: list[Override],
    events_allowed: bool,
    t: int,
) -> dict[str | None, dict[str, tuple[Any, ControlSource, str | None]]]:
    """Per scope and mode at second t: (value, source kind, event id), the naive way."""
    windows = _reference_windows(intent.events, offsets)
    programs = {p.program_id for p in intent.programs}

    def runs(event: ControlEvent) -> bool:
        return (
            event.status
            not in (
                EventStatus.CANCELLED,
                EventStatus.CANCELLED_RANDOMIZED,
                EventStatus.SUPERSEDED,
                EventStatus.COMPLETED,
            )
            and (event.device_id is None or event.device_id in _BRUTE_DEVICES)
            and (event.program_id is None or event.program_id in programs)
        )

    def overlap(a: ControlEvent, b: ControlEvent) -> bool:
        (a0, a1), (b0, b1) = windows[a.event_id], windows[b.event_id]
        return any(a0 <= s < a1 and b0 <= s < b1 for s in range(min(a0, b0), max(a1, b1)))

    def higher(a: ControlEvent, b: ControlEvent) -> bool:
        if a.primacy != b.primacy:
            return a.primacy < b.primacy
        if a.created_wall_ns != b.created_wall_ns:
            return a.created_wall_ns > b.created_wall_ns
        return a.event_id < b.event_id

    memo: dict[tuple[str, str], bool] = {}

    def owns(event: ControlEvent, mode: str) -> bool:
        key = (event.event_id, mode)
        if key not in memo:
            memo[key] = (
                runs(event)
                and getattr(event.controls, mode) is not None
                and not any(
                    other.device_id == event.device_id
                    and higher(other, event)
                    and overlap(other, event)
                    and owns(other, mode)
                    for other in intent.events
                )
            )
        return memo[key]

    result: dict[str | None, dict[str, tuple[Any, ControlSource, str | None]]] = {None: {}}
    ranked = sorted(intent.programs, key=lambda p: (p.primacy, p.program_id))
    any_default = not intent.default_control.is_empty() or any(
        not p.default_control.is_empty() for p in ranked
    )
    for mode in MODES:
        for controls in [p.default_control for p in ranked] + [intent.default_control]:
            if getattr(controls, mode) is not None:
                result[None][mode] = (getattr(controls, mode), ControlSource.DEFAULT, None)
                break
        else:
            if not any_default and getattr(_BRUTE_FALLBACK, mode) is not None:
                value = getattr(_BRUTE_FALLBACK, mode)
                result[None][mode] = (value, ControlSource.FALLBACK, None)
    if events_allowed:
        for scope in (None, *sorted(_BRUTE_DEVICES)):
            for mode in MODES:
                owners = [
                    e
                    for e in intent.events
                    if e.device_id == scope
                    and owns(e, mode)
                    and windows[e.event_id][0] <= t < windows[e.event_id][1]
                ]
                assert len(owners) <= 1, (scope, mode, owners)  # one owner per mode at a time
                if owners:
                    value = getattr(owners[0].controls, mode)
                    result.setdefault(scope, {})[mode] = (
                        value,
                        ControlSource.EVENT,
                        owners[0].event_id,
                    )
    for override in overrides:
        if override.device_id is not None and override.device_id not in _BRUTE_DEVICES:
            continue
        for mode in MODES:
            value = getattr(override.controls, mode)
            if value is None:
                continue
            result.setdefault(override.device_id, {})[mode] = (value, ControlSource.OVERRIDE, None)
            if override.device_id is None:
                for scope, modes in result.items():
                    if scope is not None and modes.get(mode, (0, None))[1] is ControlSource.EVENT:
                        del modes[mode]
    return {scope: modes for scope, modes in result.items() if modes or scope is None}


def _observed(
    active: ActiveControls,
) -> dict[str | None, dict[str, tuple[Any, ControlSource, str | None]]]:
    scopes = {None: active.site, **active.device}
    return {
        scope: {
            mode: (getattr(controls.controls, mode), source.source, source.event_id)
            for mode, source in controls.sources.items()
        }
        for scope, controls in scopes.items()
    }


@settings(max_examples=10_000, deadline=None)
@given(_cases())
def test_resolve_matches_brute_force(
    case: tuple[Intent, dict[str, tuple[int, int]], list[Override], bool, int],
) -> None:
    intent, offsets, overrides, events_allowed, t_s = case
    active = resolve(
        intent,
        T0 + t_s * NS_PER_S,
        fallback=_BRUTE_FALLBACK,
        devices=_BRUTE_DEVICES,
        offsets=offsets,
        overrides=overrides,
        events_allowed=events_allowed,
    )
    assert _observed(active) == _reference(intent, offsets, overrides, events_allowed, t_s)
    for scope in (active.site, *active.device.values()):
        for mode, source in scope.sources.items():
            assert source.event_id is None or source.program_id == next(
                e.program_id for e in intent.events if e.event_id == source.event_id
            ), mode
    assert "nope" not in active.device

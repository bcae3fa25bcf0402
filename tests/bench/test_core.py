"""bench.core, the pure part of the benchmarks: how a budget judges a figure, percentiles, the
table and the JSON round trip (unit + property tests)."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.core import Budget, Figure, format_number, latency_figure, percentile, render_table

finite = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e12, max_value=1e12)


def _figure(
    value: float,
    *,
    p50: float | None = None,
    p99: float | None = None,
    budget: Budget | None = None,
    note: str = "",
) -> Figure:
    return Figure("b", "n", value, "points/s", p50=p50, p99=p99, budget=budget, note=note)


def test_at_least_budget() -> None:
    budget = Budget(">=", 500_000)
    assert budget.holds(_figure(500_000))
    assert budget.holds(_figure(2_600_000))
    assert not budget.holds(_figure(499_999.9))


def test_at_most_budget_checks_p99_not_the_median() -> None:
    budget = Budget("<=", 5, checked="p99")
    assert budget.holds(_figure(9.0, p50=9.0, p99=5.0))  # value is not what is judged
    assert not budget.holds(_figure(1.0, p50=1.0, p99=5.01))


@pytest.mark.parametrize("measured", [math.nan, math.inf, -math.inf])
def test_unmeasurable_figures_never_hold(measured: float) -> None:
    assert not Budget(">=", 0).holds(_figure(measured))
    assert not Budget("<=", 1e300).holds(_figure(measured))
    assert not Budget("<=", 5, checked="p99").holds(_figure(1.0, p99=measured))


def test_a_missing_p99_does_not_hold() -> None:
    assert not Budget("<=", 5, checked="p99").holds(_figure(1.0))


def test_verdict() -> None:
    assert _figure(1.0).verdict == ""
    assert _figure(1.0, budget=Budget(">=", 1)).verdict == "ok"
    assert _figure(1.0, budget=Budget(">=", 2)).verdict == "OVER"


@given(value=finite, limit=finite)
def test_exactly_one_side_of_a_limit_holds_unless_equal(value: float, limit: float) -> None:
    at_least = Budget(">=", limit).holds(_figure(value))
    at_most = Budget("<=", limit).holds(_figure(value))
    assert at_least or at_most
    assert (at_least and at_most) == (value == limit)


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile(values, 0) == 1.0
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))


@given(values=st.lists(finite, min_size=1, max_size=200), q=st.floats(0, 100))
def test_percentile_is_an_observed_value_and_monotone(values: list[float], q: float) -> None:
    p = percentile(values, q)
    assert p in values
    assert min(values) <= p <= max(values)
    assert percentile(values, min(100.0, q + 1)) >= p


def test_latency_figure_in_ms() -> None:
    samples = [0.001] * 98 + [0.010, 0.100]  # seconds
    figure = latency_figure("b", "lat", samples, budget=Budget("<=", 5, checked="p99"))
    assert figure.unit == "ms"
    assert figure.value == pytest.approx(1.0)
    assert figure.p50 == pytest.approx(1.0)
    assert figure.p99 == pytest.approx(10.0)
    assert figure.verdict == "OVER"
    assert figure.note == "n=100"
    empty = latency_figure("b", "lat", [], budget=Budget("<=", 5, checked="p99"))
    assert math.isnan(empty.value)
    assert empty.verdict == "OVER"


def test_table_shows_budget_and_verdict() -> None:
    figures = [
        _figure(2_600_000, budget=Budget(">=", 500_000), note="n=5"),
        latency_figure("control", "decision", [0.006] * 10, budget=Budget("<=", 5, checked="p99")),
        _figure(123.0),
    ]
    table = render_table(figures)
    lines = table.splitlines()
    assert len(lines) == 2 + len(figures)
    assert "budget" in lines[0]
    assert "2,600,000" in lines[2]
    assert "≥ 500,000 points/s" in lines[2]
    assert lines[2].split()[-2:] == ["ok", "n=5"]
    assert "p99 ≤ 5.00 ms" in lines[3]
    assert "OVER" in lines[3]
    assert "ok" not in lines[4].split()
    assert "OVER" not in lines[4]


def test_format_number() -> None:
    assert format_number(None) == ""
    assert format_number(2_612_345.6) == "2,612,346"
    assert format_number(123.4) == "123"
    assert format_number(12.34) == "12.3"
    assert format_number(1.234) == "1.23"
    assert format_number(0.01234) == "0.0123"
    assert format_number(math.nan) == "nan"


figures = st.builds(
    Figure,
    bench=st.text(min_size=1, max_size=20),
    name=st.text(min_size=1, max_size=40),
    value=finite,
    unit=st.sampled_from(["points/s", "ms", "s", "MB", "%"]),
    p50=st.none() | finite,
    p99=st.none() | finite,
    budget=st.none()
    | st.builds(
        Budget,
        op=st.sampled_from([">=", "<="]),
        limit=finite,
        checked=st.sampled_from(["value", "p50", "p99"]),
    ),
    note=st.text(max_size=40),
    extra=st.dictionaries(st.text(max_size=10), st.integers() | st.text(max_size=10), max_size=3),
)


@given(figure=figures)
def test_figure_json_round_trip(figure: Figure) -> None:
    document = json.loads(json.dumps(figure.to_json()))
    assert Figure.from_json(document) == figure
    assert document["verdict"] == figure.verdict
    assert document["budget_text"] == (figure.budget.describe(figure.unit) if figure.budget else "")

"""Prometheus metrics: the pure exposition (`metrics.render`) and a live headend's `/metrics`."""

from __future__ import annotations

import math
import re
from pathlib import Path

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from headend_min.app import Headend
from headend_min.config import Endpoint, HeadendConfig
from headend_min.metrics import Metric, render
from tests.headend.fake_gateway import sample_record
from tests.headend.harness import RunningHeadend
from tests.mqtt_support import Mosquitto, mosquitto_broker
from tests.support import async_wait_until, free_tcp_port

__all__ = ["mosquitto_broker"]  # the fixture, imported for pytest

_EVENT = {"duration_s": 600, "controls": {"max_gen_pct": 50}}


def test_render_writes_help_type_and_sorted_samples() -> None:
    counters = [
        Metric.by("x_total", "counter", "Things, by kind.", "kind", {"b": 2, "a": 1}),
        Metric.single("y_total", "counter", "Other things.", 0),
    ]
    gauges = [Metric.single("z", "gauge", "A level.", 2.5)]
    assert render(counters, gauges) == (
        "# HELP x_total Things, by kind.\n"
        "# TYPE x_total counter\n"
        'x_total{kind="a"} 1\n'
        'x_total{kind="b"} 2\n'
        "# HELP y_total Other things.\n"
        "# TYPE y_total counter\n"
        "y_total 0\n"
        "# HELP z A level.\n"
        "# TYPE z gauge\n"
        "z 2.5\n"
    )


def test_render_of_nothing_is_empty_and_a_family_without_samples_keeps_its_header() -> None:
    assert render([], []) == ""
    text = render([Metric.by("r_total", "counter", "R.", "code", {})], [])
    assert text == "# HELP r_total R.\n# TYPE r_total counter\n"


def test_render_escapes_label_values_and_help() -> None:
    metric = Metric.by("m", "gauge", 'a\\b\nc "q"', "site", {'s"1\\\n': 1})
    assert render([], [metric]) == (
        '# HELP m a\\\\b\\nc "q"\n# TYPE m gauge\nm{site="s\\"1\\\\\\n"} 1\n'
    )


def test_render_writes_special_floats_as_prometheus_spells_them() -> None:
    samples = {(("v", "nan"),): math.nan, (("v", "pinf"),): math.inf, (("v", "ninf"),): -math.inf}
    text = render([], [Metric("f", "gauge", "F.", samples)])
    assert 'f{v="nan"} NaN' in text
    assert 'f{v="pinf"} +Inf' in text
    assert 'f{v="ninf"} -Inf' in text


@pytest.mark.parametrize(
    ("counters", "gauges", "message"),
    [
        ([Metric.single("1bad", "counter", "h", 1)], [], "invalid metric name"),
        ([Metric.by("ok", "counter", "h", "__x", {"a": 1})], [], "invalid label name"),
        ([Metric.by("ok", "counter", "h", "a-b", {"a": 1})], [], "invalid label name"),
        ([Metric.single("g", "gauge", "h", 1)], [], "listed with the counters"),
        ([], [Metric.single("c", "counter", "h", 1)], "listed with the gauges"),
        (
            [Metric.single("d", "counter", "h", 1)],
            [Metric.single("d", "gauge", "h", 1)],
            "given twice",
        ),
    ],
)
def test_render_refuses_what_prometheus_would_not_parse(
    counters: list[Metric], gauges: list[Metric], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        render(counters, gauges)


_SAMPLE_RE = re.compile(
    r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_]\w*="(?:[^"\\]|\\.)*",?)*\})? (\S+)$'
)


@given(
    st.dictionaries(
        st.text(max_size=12),
        st.one_of(st.integers(-(2**60), 2**60), st.floats(allow_nan=False)),
        max_size=6,
    )
)
def test_every_rendered_sample_is_one_parseable_line_whatever_the_label_values(
    values: dict[str, float],
) -> None:
    text = render([], [Metric.by("g", "gauge", "help\nwith newline", "label", values)])
    # The format separates lines with \n only (a label value may hold U+2028 or U+0085).
    lines = text.removesuffix("\n").split("\n")
    assert lines[:2] == ["# HELP g help\\nwith newline", "# TYPE g gauge"]
    assert len(lines) == 2 + len(values)
    for line in lines[2:]:
        match = _SAMPLE_RE.fullmatch(line)
        assert match is not None, line
        assert match.group(1) == "g"
        float(match.group(3).replace("+Inf", "inf"))


def _parse(text: str) -> dict[str, float]:
    """`name{labels}` -> value of each sample line (comments skipped)."""
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        selector, _, value = line.rpartition(" ")
        samples[selector] = float(value)
    return samples


async def test_metrics_need_a_viewer_token_and_count_what_the_headend_did(
    headend: RunningHeadend,
) -> None:
    root = f"http://{headend.headend.http_endpoint}"
    async with httpx.AsyncClient(base_url=root, timeout=5.0) as anonymous:
        refused = await anonymous.get("/metrics")
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"].startswith("Bearer")
    token = (await headend.http.post("/tokens", json={"name": "prom", "role": "viewer"})).json()
    viewer = httpx.AsyncClient(
        base_url=root, timeout=5.0, headers={"Authorization": f"Bearer {token['token']}"}
    )
    a = headend.gateway("gw-a", "site-a")
    b = headend.gateway("gw-b", "site-b")
    await a.connect()
    await b.connect()
    now = headend.clock.wall_ns()
    batch = await a.send_records(
        [
            sample_record("pv-1", {"W": (1000.0, "W")}, time_ns=now),
            sample_record("pv-1", {"W": (1100.0, "W")}, time_ns=now),
        ]
    )
    await a.wait_ack(batch.last_seq)
    posted = await headend.http.post("/sites/site-a/intents", json={"events": [_EVENT]})
    assert posted.status_code == 201
    version = (await a.next_intent()).version
    await a.ack_intent(version)
    await b.close()

    async def settled() -> bool:
        text = (await viewer.get("/metrics")).text
        samples = _parse(text)
        return (
            samples.get('dergw_headend_intent_acks_total{status="persisted"}') == 1
            and samples.get("dergw_headend_gateways_online") == 1
        )

    async with viewer:
        await async_wait_until(settled, timeout_s=5.0, what="the ack and gw-b's close")
        response = await viewer.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    samples = _parse(response.text)
    assert samples["dergw_headend_gateways"] == 2
    assert samples["dergw_headend_gateways_online"] == 1
    assert samples["dergw_headend_grpc_streams_open"] == 1
    assert samples["dergw_headend_telemetry_batches_committed_total"] == 1
    assert samples["dergw_headend_telemetry_records_committed_total"] == 2
    assert samples["dergw_headend_intents_posted_total"] == 1
    assert samples['dergw_headend_intent_acks_total{status="persisted"}'] == 1
    assert samples['dergw_headend_auth_refusals_total{code="401"}'] == 1
    assert samples["dergw_headend_admission_admitted_total"] == 2
    assert samples["dergw_headend_admission_retry_after_total"] == 0
    assert "dergw_headend_mqtt_connects_total" not in samples  # no MQTT link configured
    assert "# TYPE dergw_headend_gateways gauge" in response.text


async def test_metrics_of_a_headend_with_an_mqtt_link(
    mosquitto_broker: Mosquitto, tmp_path: Path
) -> None:
    config = HeadendConfig(
        grpc=Endpoint("127.0.0.1", free_tcp_port()),
        http=Endpoint("127.0.0.1", free_tcp_port()),
        db_path=tmp_path / "headend.sqlite3",
        mqtt=Endpoint(mosquitto_broker.host, mosquitto_broker.port),
        admin_token_file=tmp_path / "admin-token",
    )
    async with (
        Headend(config) as headend,
        httpx.AsyncClient(
            base_url=f"http://{headend.http_endpoint}",
            headers={"Authorization": f"Bearer {headend.admin_token}"},
        ) as http,
    ):
        response = await http.get("/metrics")
    assert response.status_code == 200
    samples = _parse(response.text)
    assert samples["dergw_headend_mqtt_connects_total"] == 1
    assert samples['dergw_headend_mqtt_messages_dropped_total{reason="oversize"}'] == 0
    assert samples["dergw_headend_mqtt_store_errors_total"] == 0
    assert samples["dergw_headend_gateways"] == 0

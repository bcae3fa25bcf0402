"""The headend's Prometheus metrics: in-process counters and the text exposition (format 0.0.4).

Counters live where the events happen (plain dataclasses: `SessionCounters` in
`session.GatewaySessions`, `ApiCounters` in the API, `mqtt_link.MqttLinkStats`, the
authenticator's refusals, `session.Admission`); gauges (gateways, streams) are read when scraped.
`process_metrics` turns those objects into `Metric`s and `render` (pure) writes the text
`GET /metrics` serves. Counters are per process: a scraper sums them over the instances behind a
load balancer, while the gateway gauges come from the shared database and are the same on each.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # the link modules import this one (counters), so only their types here
    from headend_min.auth import Authenticator
    from headend_min.link import GatewayLinkService
    from headend_min.mqtt_link import MqttLink
    from headend_min.session import GatewaySessions

__all__ = [
    "CONTENT_TYPE",
    "PREFIX",
    "ApiCounters",
    "Metric",
    "ProcessSources",
    "SessionCounters",
    "process_metrics",
    "render",
]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "dergw_headend_"
_NAME_RE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")

Labels = tuple[tuple[str, str], ...]


@dataclass(slots=True)
class SessionCounters:
    """What the gateways' sessions did (gRPC and MQTT alike), since this process started."""

    telemetry_batches: int = 0
    # Records of committed batches; a resent record that was already stored counts again.
    telemetry_records: int = 0
    intent_acks: Counter[str] = field(default_factory=Counter)  # by IntentAckStatus name


@dataclass(slots=True)
class ApiCounters:
    """What operators did through the HTTP API, since this process started."""

    intents_posted: int = 0  # new intent versions (posts and cancellations)


@dataclass(frozen=True, slots=True)
class Metric:
    """One metric family: `samples` maps label tuples (may be empty) to values."""

    name: str
    kind: Literal["counter", "gauge"]
    help: str
    samples: Mapping[Labels, float]

    @classmethod
    def single(
        cls, name: str, kind: Literal["counter", "gauge"], help: str, value: float
    ) -> Metric:
        return cls(name, kind, help, {(): value})

    @classmethod
    def by(
        cls,
        name: str,
        kind: Literal["counter", "gauge"],
        help: str,
        label: str,
        values: Mapping[str, float],
    ) -> Metric:
        return cls(name, kind, help, {((label, key),): v for key, v in values.items()})


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _value(number: float) -> str:
    if math.isnan(number):
        return "NaN"
    if math.isinf(number):
        return "+Inf" if number > 0 else "-Inf"
    if float(number).is_integer() and abs(number) < 2**53:
        return str(int(number))
    return repr(float(number))


def render(counters: Sequence[Metric], gauges: Sequence[Metric]) -> str:
    """The text exposition of the metric families, each with its HELP and TYPE lines.

    Raises ValueError for a name or label that Prometheus would not accept, a family given twice
    or a family whose `kind` contradicts the list it is in (a programming error, not input).
    """
    lines: list[str] = []
    seen: set[str] = set()
    for expected, families in (("counter", counters), ("gauge", gauges)):
        for metric in families:
            if metric.kind != expected:
                raise ValueError(f"{metric.name} is a {metric.kind}, listed with the {expected}s")
            if _NAME_RE.fullmatch(metric.name) is None:
                raise ValueError(f"invalid metric name {metric.name!r}")
            if metric.name in seen:
                raise ValueError(f"metric {metric.name} given twice")
            seen.add(metric.name)
            lines.append(f"# HELP {metric.name} {_escape_help(metric.help)}")
            lines.append(f"# TYPE {metric.name} {metric.kind}")
            for labels, number in sorted(metric.samples.items()):
                for key, _ in labels:
                    if _LABEL_RE.fullmatch(key) is None or key.startswith("__"):
                        raise ValueError(f"invalid label name {key!r} of {metric.name}")
                text = ",".join(f'{key}="{_escape_label(value)}"' for key, value in labels)
                selector = f"{metric.name}{{{text}}}" if text else metric.name
                lines.append(f"{selector} {_value(number)}")
    return "\n".join(lines) + "\n" if lines else ""


@dataclass(frozen=True, slots=True)
class ProcessSources:
    """The in-process objects `GET /metrics` reads besides the database."""

    sessions: GatewaySessions
    link: GatewayLinkService | None = None
    mqtt: MqttLink | None = None


def process_metrics(
    *,
    gateways_total: int,
    gateways_online: int,
    api: ApiCounters,
    authenticator: Authenticator,
    sources: ProcessSources | None,
) -> tuple[list[Metric], list[Metric]]:
    """(counters, gauges) of this process, for `render`."""
    counters = [
        Metric.single(
            PREFIX + "intents_posted_total",
            "counter",
            "New intent versions posted through the HTTP API (posts and cancellations).",
            api.intents_posted,
        ),
        Metric.by(
            PREFIX + "auth_refusals_total",
            "counter",
            "HTTP API requests refused by token checks, by status (401 no valid token, 403 role "
            "or site scope).",
            "code",
            {str(code): n for code, n in authenticator.refused.items()},
        ),
    ]
    gauges = [
        Metric.single(
            PREFIX + "gateways", "gauge", "Gateways known to the headend.", gateways_total
        ),
        Metric.single(
            PREFIX + "gateways_online",
            "gauge",
            "Gateways with a live stream or a recent presence refresh.",
            gateways_online,
        ),
    ]
    if sources is None:
        return counters, gauges
    session = sources.sessions.counters
    counters += [
        Metric.single(
            PREFIX + "telemetry_batches_committed_total",
            "counter",
            "Telemetry batches committed (gRPC and MQTT).",
            session.telemetry_batches,
        ),
        Metric.single(
            PREFIX + "telemetry_records_committed_total",
            "counter",
            "Records of committed telemetry batches (a resent record counts again).",
            session.telemetry_records,
        ),
        Metric.by(
            PREFIX + "intent_acks_total",
            "counter",
            "Intent acks received from gateways, by status.",
            "status",
            dict(session.intent_acks),
        ),
    ]
    admission = sources.sessions.admission
    if admission is not None:
        counters += [
            Metric.single(
                PREFIX + "admission_admitted_total",
                "counter",
                "New gateway sessions admitted by the reconnect token bucket.",
                admission.admitted,
            ),
            Metric.single(
                PREFIX + "admission_retry_after_total",
                "counter",
                "New gateway sessions told RetryAfter (reconnect storm spreading).",
                admission.refused,
            ),
        ]
    if sources.link is not None:
        gauges.append(
            Metric.single(
                PREFIX + "grpc_streams_open",
                "gauge",
                "Gateway gRPC streams open on this process.",
                sources.link.open_streams,
            )
        )
    if sources.mqtt is not None:
        stats = sources.mqtt.stats
        counters += [
            Metric.single(
                PREFIX + "mqtt_connects_total",
                "counter",
                "Connections of the headend's MQTT client to the broker.",
                stats.connects,
            ),
            Metric.by(
                PREFIX + "mqtt_messages_received_total",
                "counter",
                "Gateway messages received over MQTT, by message body.",
                "body",
                stats.received,
            ),
            Metric.single(
                PREFIX + "mqtt_messages_published_total",
                "counter",
                "Messages the headend published to gateways over MQTT.",
                stats.published,
            ),
            Metric.single(
                PREFIX + "mqtt_batches_acked_total",
                "counter",
                "Telemetry batches received over MQTT and acknowledged.",
                stats.batches_acked,
            ),
            Metric.by(
                PREFIX + "mqtt_messages_dropped_total",
                "counter",
                "MQTT messages dropped unprocessed, by reason.",
                "reason",
                {
                    "oversize": stats.dropped_oversize,
                    "undecodable": stats.dropped_undecodable,
                    "misaddressed": stats.dropped_misaddressed,
                    "revoked": stats.refused_revoked,
                },
            ),
            Metric.single(
                PREFIX + "mqtt_protocol_violations_total",
                "counter",
                "MQTT messages that broke the protocol (answered with RetryAfter).",
                stats.protocol_violations,
            ),
            Metric.single(
                PREFIX + "mqtt_store_errors_total",
                "counter",
                "MQTT messages that hit a database error (answered with RetryAfter).",
                stats.store_errors,
            ),
        ]
    return counters, gauges

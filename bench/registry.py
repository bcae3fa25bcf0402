"""Every benchmark `dergw bench` knows: name -> (module, one-line description, default set?).

Modules are imported only when their benchmark runs (each in its own process, see `bench.cli`),
so listing them costs nothing. The default set is the one held to ARCHITECTURE.md's budgets.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Entry:
    module: str
    description: str
    default: bool = True


BENCHMARKS: dict[str, Entry] = {
    "e2e-telemetry": Entry(
        "bench.e2e_telemetry",
        "simulated devices -> gateway -> outbox -> uplink -> headend commit, points/s "
        "(20 and 100 devices, gRPC and MQTT) and latency at 1 s polling",
    ),
    "outbox": Entry("bench.outbox", "outbox append and drain, points/s"),
    "backlog-drain": Entry(
        "bench.backlog_drain", "1 h outage backlog at 1,000 points/s: drain time, live p99"
    ),
    "control-decision": Entry(
        "bench.control_decision", "snapshot -> enforced setpoints for 50 devices"
    ),
    "intent-latency": Entry(
        "bench.intent_latency", "headend intent POST -> device register written (HIL)"
    ),
    "export-breach": Entry(
        "bench.export_breach", "export-limit breach -> curtailment written (HIL, 200 ms poll)"
    ),
    "gateway-footprint": Entry(
        "bench.gateway_footprint", "gateway RSS and CPU, 20 devices at 1 s polling"
    ),
    "headend-fleet": Entry(
        "bench.headend_fleet",
        "N simulated gateways at 1 batch/s: largest N with ack p99 < 1 s (SQLite, PostgreSQL), "
        "intent fan-out to all N, mass reconnect",
    ),
    "headend-commit": Entry(
        "bench.headend_commit",
        "store commit_telemetry from many concurrent gateways (SQLite, PostgreSQL): group commit",
        default=False,
    ),
    # Not held to a budget; kept runnable (`dergw bench --all` or by name).
    "driver-opcua": Entry("bench.driver_opcua", "OPC UA driver reads", default=False),
    "driver-dnp3": Entry("bench.driver_dnp3", "DNP3 integrity and event polls", default=False),
    "driver-rtu": Entry("bench.driver_rtu", "SunSpec over Modbus RTU on a pty", default=False),
    "multi-site": Entry("bench.multi_site", "mixed-protocol site reads", default=False),
    "mqtt-round-trip": Entry(
        "bench.mqtt_round_trip", "one batch through mosquitto to commit and back", default=False
    ),
    "opcua-sim-start": Entry("bench.opcua_sim_start", "OPC UA simulator start", default=False),
}

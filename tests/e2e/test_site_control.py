"""Acceptance: a real gateway process controls a simulated 12-device site through the headend.

Everything crosses real sockets: HTTP to the headend, gRPC headend <-> gateway, Modbus TCP
gateway <-> simulator. Effects are verified at the simulator's registers (the physical truth),
never in the gateway's memory.
"""

from __future__ import annotations

import asyncio
import math

import psutil
import pytest

from hil.scenarios.harness import BenchError
from tests.e2e.conftest import BenchFactory, responses_for, started, wait_api, wait_point

pytestmark = pytest.mark.hil  # real processes and sockets on loopback

SITE = "/sites/demo-site"
PV_RATINGS = {f"pv{i}": 1000.0 * (i + 2) for i in range(1, 11)}  # twelve.toml: 3..12 kW


async def test_twelve_devices_register_with_distinct_telemetry(bench_factory: BenchFactory) -> None:
    async with bench_factory("twelve.toml") as bench:
        await started(bench)
        site = await bench.api.get(SITE)
        devices = {d["device_id"]: d for d in site["devices"]}
        assert len(devices) == 12
        assert {d["kind"] for d in devices.values()} == {"PV", "BATTERY", "METER"}
        for device_id, rating in PV_RATINGS.items():
            assert devices[device_id]["nameplate"]["max_w"] == pytest.approx(rating)
            assert devices[device_id]["serial_number"] == device_id
        assert devices["meter1"]["role"] == "pcc"

        def all_reporting(points: list[dict[str, object]]) -> bool:
            good = {p["device_id"] for p in points if p["point"] == "W" and p["quality"] == "GOOD"}
            return good >= set(devices)

        latest = await wait_api(
            bench,
            "/telemetry/latest?site_id=demo-site",
            all_reporting,
            what="a good W sample from every device",
        )
        watts = {p["device_id"]: p["value"] for p in latest if p["point"] == "W"}
        state = bench.sim.state()
        for device_id in PV_RATINGS:
            # Telemetry is per device: each inverter reports its own output (they differ by
            # rating), close to what the simulator made at about the same time.
            truth = state.devices[device_id].ac_w
            assert watts[device_id] == pytest.approx(truth, rel=0.15, abs=150.0), device_id
        assert len({round(watts[d]) for d in PV_RATINGS}) == len(PV_RATINGS)
        assert watts["meter1"] == pytest.approx(state.meter_w, rel=0.2, abs=800.0)


async def test_device_command_changes_only_that_device(bench_factory: BenchFactory) -> None:
    async with bench_factory("twelve.toml") as bench:
        await started(bench)
        await bench.api.post(
            f"{SITE}/devices/pv3/intents",
            {"events": [{"event_id": "cap-pv3", "duration_s": 6, "controls": {"max_gen_pct": 40}}]},
        )
        await wait_point(bench, "pv3", "123.WMaxLim_Ena", lambda v: v == 1)
        assert bench.sim.read_point("pv3", "123.WMaxLimPct") == pytest.approx(40.0, abs=0.1)
        for _ in range(10):
            for device_id in PV_RATINGS.keys() - {"pv3"}:
                assert bench.sim.read_point(device_id, "123.WMaxLim_Ena") == 0, device_id
            assert bench.sim.read_point("bat1", "124.StorCtl_Mod") == 0
            await asyncio.sleep(0.2)
        # Regression (a): when the event ends the device is written back to its default, as
        # seen at the simulator's register, not only in the gateway's memory.
        await wait_point(bench, "pv3", "123.WMaxLim_Ena", lambda v: v == 0, timeout_s=10)
        events = await wait_api(
            bench,
            "/events?site_id=demo-site",
            lambda body: responses_for(body, "cap-pv3")[-1:] == ["COMPLETED"],
            what="COMPLETED for cap-pv3",
        )
        assert responses_for(events, "cap-pv3") == ["RECEIVED", "STARTED", "COMPLETED"]


async def test_site_target_is_split_by_rating_clamped_and_logged(
    bench_factory: BenchFactory,
) -> None:
    async with bench_factory("twelve.toml") as bench:
        await started(bench)
        capacity_w = sum(PV_RATINGS.values()) + 10_000.0
        await bench.api.post(
            f"{SITE}/intents",
            {
                "events": [
                    {"event_id": "half", "duration_s": 60, "controls": {"target_w": capacity_w / 2}}
                ]
            },
        )
        # Split by rating: every inverter gets the same share of its own rating (50 %).
        for device_id in PV_RATINGS:
            await wait_point(bench, device_id, "123.WMaxLim_Ena", lambda v: v == 1)
            pct = bench.sim.read_point(device_id, "123.WMaxLimPct")
            assert pct == pytest.approx(50.0, abs=0.1), device_id
        await wait_point(bench, "bat1", "124.OutWRte", lambda v: v == pytest.approx(50.0, abs=0.1))
        assert bench.sim.read_point("bat1", "124.StorCtl_Mod") == 2  # DISCHARGE

        # A target beyond what the site can make: each device is clamped to its own rating.
        await bench.api.post(
            f"{SITE}/intents",
            {
                "replace_events": True,
                "events": [{"event_id": "all", "duration_s": 60, "controls": {"target_w": 1e6}}],
            },
        )
        for device_id in PV_RATINGS:
            await wait_point(
                bench, device_id, "123.WMaxLimPct", lambda v: v == pytest.approx(100.0, abs=0.1)
            )
        await wait_point(bench, "bat1", "124.OutWRte", lambda v: v == pytest.approx(100.0, abs=0.1))

        log_text = bench.workdir.joinpath("gateway.log").read_text()
        split_lines = [line for line in log_text.splitlines() if "split target_w" in line]
        assert any(
            "split target_w 42500 W by rating: bat1=5000 W, pv1=1500 W" in line
            and "pv10=6000 W" in line
            for line in split_lines
        ), split_lines


async def test_unknown_device_command_is_rejected_and_changes_nothing(
    bench_factory: BenchFactory,
) -> None:
    async with bench_factory("demo.toml") as bench:
        await started(bench)
        before = {
            ref: bench.sim.read_point("pv1", ref) for ref in ("123.WMaxLim_Ena", "123.WMaxLimPct")
        }
        for path, body in (
            (
                f"{SITE}/intents",
                {
                    "events": [
                        {"device_id": "pv99", "duration_s": 60, "controls": {"max_gen_pct": 0}}
                    ]
                },
            ),
            (
                f"{SITE}/devices/pv99/intents",
                {"events": [{"duration_s": 60, "controls": {"max_gen_pct": 0}}]},
            ),
        ):
            with pytest.raises(BenchError, match=r"HTTP 4\d\d.*pv99"):
                await bench.api.post(path, body)
        site = await bench.api.get(SITE)
        assert site["intent_version"] == 0  # nothing was created, nothing was sent
        await asyncio.sleep(1.0)
        after = {ref: bench.sim.read_point("pv1", ref) for ref in before}
        assert after == before
        assert after["123.WMaxLim_Ena"] == 0


async def test_gateway_listens_on_no_tcp_port(bench_factory: BenchFactory) -> None:
    async with bench_factory("demo.toml") as bench:
        await started(bench)
        assert bench.gateway is not None
        process = psutil.Process(bench.gateway.process.pid)
        connections = process.net_connections(kind="inet")
        listening = [c for c in connections if c.status == psutil.CONN_LISTEN]
        assert listening == [], f"gateway listens on {[c.laddr for c in listening]}"
        # ...and it did dial out: to the headend's gRPC port and to the Modbus devices.
        remote_ports = {c.raddr.port for c in connections if c.raddr}
        grpc_port = int(bench.grpc_target.rsplit(":", 1)[1])
        modbus_port = bench.sim.endpoints["pv1"].port
        assert {grpc_port, modbus_port} <= remote_ports
        assert not math.isnan(float(grpc_port))

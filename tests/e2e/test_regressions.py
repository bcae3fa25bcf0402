"""Regression tests for defects of the reference system this product replaces.

(a) is in test_site_control.py (an ended event writes the default back, seen at the register).
Each test here names its defect. All run the real processes against the simulator.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import grpc
import pytest

from dergw.v1 import pb, timestamp_from_ns
from dergw.v1.dergw_pb2_grpc import GatewayLinkServicer, add_GatewayLinkServicer_to_server
from headend_min.signing import SigningKey, load_or_create_signing_key, sign_intent
from hil.scenarios.harness import Bench
from hil.server import Fault
from tests.e2e.conftest import BenchFactory, responses_for, started, wait_api, wait_point
from tests.support import free_tcp_port

pytestmark = pytest.mark.hil  # real processes and sockets on loopback

SITE = "/sites/demo-site"


async def _hold(
    bench: Bench, seconds: float, refs: dict[str, tuple[str, str]]
) -> list[dict[str, Any]]:
    """Sample control registers for `seconds`; return every distinct observation."""
    seen: list[dict[str, Any]] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        observation = {name: bench.sim.read_point(dev, ref) for name, (dev, ref) in refs.items()}
        if not seen or seen[-1] != observation:
            seen.append(observation)
        await asyncio.sleep(0.05)
    return seen


async def _wait_online(bench: Bench, timeout_s: float = 20.0) -> None:
    await wait_api(
        bench,
        f"/gateways/{bench.gateway_id}",
        lambda g: g["online"],
        timeout_s=timeout_s,
        what="gateway online",
    )


async def test_b_expired_event_is_never_reapplied_after_gateway_or_headend_restart(
    bench_factory: BenchFactory,
) -> None:
    async with bench_factory("demo.toml") as bench:
        await started(bench)
        await bench.api.post(
            f"{SITE}/devices/pv1/intents",
            {"events": [{"event_id": "short", "duration_s": 3, "controls": {"max_gen_pct": 30}}]},
        )
        await wait_point(bench, "pv1", "123.WMaxLimPct", lambda v: v == pytest.approx(30.0))
        await wait_point(bench, "pv1", "123.WMaxLim_Ena", lambda v: v == 0, timeout_s=10)
        await wait_api(
            bench,
            "/events?site_id=demo-site",
            lambda body: responses_for(body, "short") == ["RECEIVED", "STARTED", "COMPLETED"],
            what="the event completed",
        )
        watched = {"ena": ("pv1", "123.WMaxLim_Ena")}

        assert bench.gateway is not None
        await bench.gateway.stop()
        await bench.start_gateway()
        await _wait_online(bench)
        assert await _hold(bench, 3.0, watched) == [{"ena": 0}]

        await bench.restart_headend(down_s=0.5)
        await _wait_online(bench)
        assert await _hold(bench, 3.0, watched) == [{"ena": 0}]

        events = await bench.api.get("/events?site_id=demo-site")
        assert responses_for(events, "short") == ["RECEIVED", "STARTED", "COMPLETED"]
        log = bench.workdir.joinpath("gateway.log").read_text()
        assert log.count("event short: STARTED") == 1


async def test_d_headend_restart_changes_no_setpoint(bench_factory: BenchFactory) -> None:
    async with bench_factory("demo.toml") as bench:
        await started(bench)
        await bench.api.post(
            f"{SITE}/intents",
            {
                "events": [
                    {
                        "event_id": "hold",
                        "duration_s": 120,
                        "device_id": "pv1",
                        "controls": {"max_gen_pct": 40},
                    },
                    {
                        "event_id": "charge",
                        "duration_s": 120,
                        "device_id": "bat1",
                        "controls": {"fixed_w": -2000},
                    },
                ]
            },
        )
        await wait_point(bench, "pv1", "123.WMaxLimPct", lambda v: v == pytest.approx(40.0))
        await wait_point(bench, "bat1", "124.StorCtl_Mod", lambda v: v == 1)  # CHARGE
        watched = {
            "pv_pct": ("pv1", "123.WMaxLimPct"),
            "pv_ena": ("pv1", "123.WMaxLim_Ena"),
            "bat_mod": ("bat1", "124.StorCtl_Mod"),
            "bat_in": ("bat1", "124.InWRte"),
            "bat_out": ("bat1", "124.OutWRte"),
        }
        before = await _hold(bench, 0.5, watched)
        assert len(before) == 1

        restart = asyncio.create_task(bench.restart_headend(down_s=2.0))
        during = await _hold(bench, 4.0, watched)
        await restart
        await _wait_online(bench)
        after = await _hold(bench, 2.0, watched)
        assert during == before
        assert after == before


async def test_e_applied_only_after_read_back_and_failed_with_a_reason(
    bench_factory: BenchFactory,
) -> None:
    async with bench_factory("demo.toml") as bench:
        await started(bench)
        # The device answers writes normally but does not apply them (e.g. in local mode):
        # only the read-back can tell, and "applied" must not be claimed.
        bench.sim.set_fault("pv1", Fault.IGNORE_WRITES)
        posted = await bench.api.post(
            f"{SITE}/devices/pv1/intents",
            {"events": [{"event_id": "cap", "duration_s": 60, "controls": {"max_gen_pct": 25}}]},
        )
        version = posted["version"]
        failed = await wait_api(
            bench,
            f"{SITE}/intents/{version}",
            lambda body: body["gateways"] and body["gateways"][0]["status"] == "FAILED",
            what="intent status FAILED",
        )
        reason = failed["gateways"][0]["status_reason"]
        assert "pv1" in reason
        assert "WMaxLimPct" in reason or "read" in reason
        events = await bench.api.get("/events?site_id=demo-site")
        assert responses_for(events, "cap") == ["RECEIVED", "FAILED"]
        assert "pv1" in next(r["reason"] for r in events if r["status"] == "FAILED")

        bench.sim.set_fault("pv1", None)
        await wait_api(
            bench,
            f"{SITE}/intents/{version}",
            lambda body: body["gateways"][0]["status"] == "APPLIED",
            what="intent status APPLIED once the write reads back",
        )
        events = await bench.api.get("/events?site_id=demo-site")
        assert responses_for(events, "cap") == ["RECEIVED", "FAILED", "STARTED"]
        assert bench.sim.read_point("pv1", "123.WMaxLimPct") == pytest.approx(25.0)


async def test_f_stale_reads_are_flagged_bad_never_restamped(bench_factory: BenchFactory) -> None:
    async with bench_factory("demo.toml") as bench:
        await started(bench)
        await wait_api(
            bench,
            "/telemetry/latest?site_id=demo-site&device_id=pv1",
            lambda pts: any(p["point"] == "W" and p["quality"] == "GOOD" for p in pts),
            what="a good reading of pv1",
        )
        fault_start = time.time()
        bench.sim.set_fault("pv1", Fault.SILENT)
        latest = await wait_api(
            bench,
            "/telemetry/latest?site_id=demo-site&device_id=pv1",
            lambda pts: any(
                p["point"] == "W"
                and p["quality"] == "BAD_COMM"
                and _epoch(p["time"]) > fault_start + 2.0
                for p in pts
            ),
            timeout_s=15,
            what="bad-quality W stamped after the fault began",
        )
        w_point = next(p for p in latest if p["point"] == "W")
        assert w_point["value"] is None
        # Let several polls fail while silent (each times out after the driver's 1 s).
        since = urlencode(
            {
                "site_id": "demo-site",
                "device_id": "pv1",
                "point": "W",
                "start": datetime.fromtimestamp(fault_start + 1.5, UTC).isoformat(),
            }
        )
        await wait_api(
            bench,
            f"/telemetry/history?{since}",
            lambda page: sum(i["quality"] == "BAD_COMM" for i in page["items"]) >= 3,
            timeout_s=15,
            what="three failed reads recorded",
        )
        bench.sim.set_fault("pv1", None)
        await wait_api(
            bench,
            "/telemetry/latest?site_id=demo-site&device_id=pv1",
            lambda pts: any(p["point"] == "W" and p["quality"] == "GOOD" for p in pts),
            what="good readings again",
        )
        fault_end = time.time()
        # Margins: a read in flight when the fault began (timeout 1 s) / the first good poll.
        query = urlencode(
            {
                "site_id": "demo-site",
                "device_id": "pv1",
                "point": "W",
                "start": datetime.fromtimestamp(fault_start + 1.5, UTC).isoformat(),
                "end": datetime.fromtimestamp(fault_end - 1.5, UTC).isoformat(),
            }
        )
        history = await bench.api.get(f"/telemetry/history?{query}")
        assert history["items"], "no samples during the fault"
        # During the fault: every sample is bad, with no value, and stamped at its own read time
        # (never a last good value with a fresh timestamp).
        assert {item["quality"] for item in history["items"]} == {"BAD_COMM"}
        assert all(item["value"] is None for item in history["items"])
        times = [_epoch(item["time"]) for item in history["items"]]
        assert times == sorted(times)
        assert len(set(times)) == len(times)


def _epoch(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


class _RogueHeadend(GatewayLinkServicer):
    """A headend that sends an event for a device the gateway does not have."""

    def __init__(self) -> None:
        self.records: list[pb.Record] = []
        self.intent_acks: list[pb.IntentAck] = []
        self.sent = False
        # It signs with the key the bench's gateway trusts (a headend bug, not a forgery).
        self.key: SigningKey | None = None

    async def Connect(  # type: ignore[override]
        self, request_iterator: AsyncIterator[pb.UpMessage], context: object
    ) -> AsyncIterator[pb.DownMessage]:
        async for message in request_iterator:
            kind = message.WhichOneof("body")
            if kind == "register":
                yield pb.DownMessage(register_ack=pb.RegisterAck())
                if self.sent:
                    continue  # a re-register (inventory update) on the same stream
                self.sent = True
                now_ns = time.time_ns()
                event = pb.ControlEvent(
                    event_id="ghost",
                    created_at=timestamp_from_ns(now_ns),
                    start=timestamp_from_ns(now_ns),
                    duration_s=60,
                    primacy=1,
                    device_id="pv99",
                )
                event.controls.max_gen_pct = 0.0
                document = pb.IntentDocument(
                    site_id=message.register.site.site_id,
                    version=1,
                    issued_at=timestamp_from_ns(now_ns),
                    events=[event],
                )
                assert self.key is not None
                signed = sign_intent(
                    document, gateway_id=message.register.gateway_id, key=self.key, now_ns=now_ns
                )
                yield pb.DownMessage(signed_intent=signed)
            elif kind == "telemetry":
                self.records.extend(message.telemetry.records)
                yield pb.DownMessage(ack=pb.Ack(up_to_seq=message.telemetry.last_seq))
            elif kind == "intent_ack":
                self.intent_acks.append(message.intent_ack)


async def test_c_event_for_unknown_device_is_rejected_by_the_gateway_not_fanned_out(
    bench_factory: BenchFactory,
) -> None:
    rogue = _RogueHeadend()
    server = grpc.aio.server()
    add_GatewayLinkServicer_to_server(rogue, server)
    port = free_tcp_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    try:
        async with bench_factory("demo.toml", foreign_headend=f"127.0.0.1:{port}") as bench:
            rogue.key = load_or_create_signing_key(bench.signing_key)
            await bench.start_gateway()
            deadline = time.monotonic() + 30  # start-up included: generous on a loaded machine
            rejections: list[pb.EventResponse] = []
            while time.monotonic() < deadline and not rejections:
                rejections = [
                    r.event_response
                    for r in rogue.records
                    if r.HasField("event_response") and r.event_response.event_id == "ghost"
                ]
                await asyncio.sleep(0.1)
            assert rejections, "no event response for the unknown-device event"
            assert [r.status for r in rejections] == [pb.RESPONSE_STATUS_REJECTED_INVALID]
            assert "pv99" in rejections[0].reason
            assert [a.status for a in rogue.intent_acks] == [pb.INTENT_ACK_STATUS_PERSISTED]
            # Never widened to the site: no inverter was capped, now or a little later.
            for _ in range(20):
                assert bench.sim.read_point("pv1", "123.WMaxLim_Ena") == 0
                await asyncio.sleep(0.05)
    finally:
        await server.stop(grace=None)

"""The control loop with in-memory drivers: clock trust, offline limit, overrides, clock steps.

No sockets and no processes: a ManualClock, real outbox and intent store in a temp dir, and
drivers that keep the contract in memory (tests.gateway.fakes).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dergw.v1 import pb
from drivers import registry
from drivers.contract import DeviceKind
from gateway.clock import ManualClock
from gateway.config import GatewayConfig
from gateway.intent import NS_PER_S, ControlEvent, Controls, Intent, SiteConstraints
from gateway.intent_store import IntentStore
from gateway.outbox import Outbox, RecordKind
from gateway.overrides import OverrideError
from gateway.runtime.control import ControlLoop
from gateway.runtime.recorder import Recorder
from gateway.snapshot import DeviceSlot, SiteSnapshot
from tests.gateway.fakes import MemoryDriver, MemoryParams


@pytest.fixture(autouse=True)
def memory_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(
        registry.DRIVERS,
        "memory",
        registry.DriverSpec("tests.gateway.fakes", "MemoryParams", "MemoryDriver", "memory"),
    )


def _config(tmp_path: Path, **control: Any) -> GatewayConfig:
    return GatewayConfig.model_validate(
        {
            "gateway": {"id": "gw-test", "state_dir": str(tmp_path)},
            "site": {"id": "site", "name": "Site"},
            "uplink": {"transport": "grpc", "target": "127.0.0.1:1"},
            "control": {"period_s": 1.0, "revert_timeout_s": 30, "refresh_s": 10, **control},
            "devices": [
                {"id": "pv1", "kind": "pv", "driver": "memory", "params": {}},
                {"id": "meter1", "kind": "meter", "driver": "memory", "role": "pcc", "params": {}},
            ],
        }
    )


class Rig:
    def __init__(self, tmp_path: Path, offline_for_s: float | None = None, **control: Any) -> None:
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.clock = ManualClock(wall_ns=1_800_000_000 * NS_PER_S)
        self.config = _config(tmp_path, **control)
        self.drivers = {
            d.id: MemoryDriver(d.id, d.kind, MemoryParams(), self.clock)
            for d in self.config.devices
        }
        self.snapshot = SiteSnapshot(
            (DeviceSlot(d.id, d.kind, d.poll_period_s, d.role) for d in self.config.devices),
            stale_periods=3,
        )
        self.outbox = Outbox(tmp_path / "outbox.sqlite3", clock=self.clock)
        self.store = IntentStore(tmp_path / "intent.sqlite3", clock=self.clock)
        self.recorder = Recorder(self.outbox, commit_interval_s=0.1)
        self.offline_for_s = offline_for_s
        self.loop = ControlLoop(
            self.config,
            drivers=self.drivers,
            snapshot=self.snapshot,
            recorder=self.recorder,
            store=self.store,
            clock=self.clock,
            offline_for_s=lambda: self.offline_for_s,
        )

    async def poll(self) -> None:
        for driver in self.drivers.values():
            info = await driver.connect()
            if self.snapshot.slots[info.device_id].info is None:
                self.snapshot.set_info(info)
            self.snapshot.update(await driver.read())

    async def cycle(self, advance_s: float = 1.0) -> None:
        self.clock.advance(advance_s)
        await self.poll()
        await self.loop.step()
        await self.recorder.flush()

    def pv_cap(self) -> float | None:
        return self.drivers["pv1"].writes[-1].max_active_power_w

    def records(self, kind: RecordKind) -> list[Any]:
        message = {RecordKind.DECISION: pb.Decision, RecordKind.REPORTED_STATE: pb.ReportedState}
        return [
            message[kind].FromString(row.payload)
            for row in self.outbox.read_after(0, 10_000)
            if row.kind == kind
        ]

    def close(self) -> None:
        self.outbox.close()
        self.store.close()


@pytest.fixture
def rig_factory(tmp_path: Path) -> Iterator[Any]:
    rigs: list[Rig] = []

    def make(**kwargs: Any) -> Rig:
        rig = Rig(tmp_path / f"rig{len(rigs)}", **kwargs)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        rig.close()


def _intent_with_event(rig: Rig, start_in_s: float, duration_s: int, pct: float) -> Intent:
    now = rig.clock.wall_ns()
    event = ControlEvent(
        event_id="e1",
        created_wall_ns=now,
        start_wall_ns=now + round(start_in_s * NS_PER_S),
        duration_s=duration_s,
        primacy=1,
        controls=Controls(max_gen_pct=pct),
    )
    return Intent("site", 1, now, (event,), Controls(), SiteConstraints())


async def test_events_wait_for_a_trusted_clock(rig_factory: Any, tmp_path: Path) -> None:
    flag = tmp_path / "synchronized"
    rig = rig_factory(clock_trust=f"file:{flag}")
    await rig.loop.accept_intent(_intent_with_event(rig, 0, 60, 30.0))
    await rig.cycle()
    assert rig.pv_cap() is None  # the event does not start: the clock is not trusted
    reported = rig.records(RecordKind.REPORTED_STATE)[-1]
    assert not reported.clock_trusted
    assert any("not synchronised" in note for note in reported.notes)
    flag.touch()
    await rig.cycle()
    assert rig.pv_cap() == pytest.approx(3000.0)
    assert rig.records(RecordKind.REPORTED_STATE)[-1].clock_trusted


async def test_max_offline_suspends_events_only_when_configured(rig_factory: Any) -> None:
    patient = rig_factory(offline_for_s=3600.0)  # max_offline_s off by default
    await patient.loop.accept_intent(_intent_with_event(patient, 0, 600, 30.0))
    await patient.cycle()
    assert patient.pv_cap() == pytest.approx(3000.0)

    strict = rig_factory(offline_for_s=10.0, max_offline_s=60)
    await strict.loop.accept_intent(_intent_with_event(strict, 0, 600, 30.0))
    await strict.cycle()
    assert strict.pv_cap() == pytest.approx(3000.0)
    strict.offline_for_s = 120.0
    await strict.cycle()
    assert strict.pv_cap() is None  # the default (uncapped) is back
    notes = strict.records(RecordKind.REPORTED_STATE)[-1].notes
    assert any("max_offline_s" in note for note in notes)


async def test_override_applies_through_the_kernel_then_expires(rig_factory: Any) -> None:
    rig = rig_factory()
    await rig.cycle()
    override = rig.loop.add_override(
        Controls(max_gen_pct=20.0), origin="console: tech alice", duration_s=5.0
    )
    await rig.cycle()
    assert rig.pv_cap() == pytest.approx(2000.0)
    reported = rig.records(RecordKind.REPORTED_STATE)[-1]
    assert reported.source == pb.CONTROL_SOURCE_OVERRIDE
    assert any("console: tech alice" in mode.label for mode in reported.active_modes)
    await rig.cycle(advance_s=5.0)
    assert rig.pv_cap() is None
    summaries = [d.summary for d in rig.records(RecordKind.DECISION)]
    assert any(override.override_id in s and "tech alice" in s for s in summaries)
    assert any(s.endswith("expired") for s in summaries)


async def test_an_override_cannot_take_a_device_past_its_rating(rig_factory: Any) -> None:
    rig = rig_factory()
    rig.loop.add_override(Controls(gen_limit_w=50_000.0), origin="console", duration_s=60)
    await rig.cycle()
    assert rig.pv_cap() == pytest.approx(10_000.0)  # split within ratings: 10 kW inverter


@pytest.mark.parametrize(
    ("controls", "kwargs", "message"),
    [
        (Controls(), {}, "at least one control"),
        (Controls(max_gen_pct=150.0), {}, "max_gen_pct"),
        (Controls(export_limit_w=-1.0), {}, "export_limit_w"),
        (Controls(max_gen_pct=10.0), {"device_id": "pv9"}, "unknown device 'pv9'"),
        (Controls(max_gen_pct=10.0), {"duration_s": 0.0}, "duration_s"),
        (Controls(max_gen_pct=10.0), {"origin": " "}, "origin"),
    ],
)
async def test_bad_overrides_are_refused_and_change_nothing(
    rig_factory: Any, controls: Controls, kwargs: dict[str, Any], message: str
) -> None:
    rig = rig_factory()
    await rig.cycle()
    arguments: dict[str, Any] = {"origin": "console", "duration_s": 60.0, **kwargs}
    with pytest.raises(OverrideError, match=message):
        rig.loop.add_override(controls, **arguments)
    assert rig.loop.overrides.active() == ()


async def test_a_clock_step_is_noticed_and_reported(rig_factory: Any) -> None:
    rig = rig_factory()
    await rig.cycle()
    rig.clock.jump_wall(3600.0)
    await rig.cycle()
    notes = rig.records(RecordKind.REPORTED_STATE)[-1].notes
    assert any("stepped by +3600.0 s" in note for note in notes)


def test_meter_kind_is_never_controllable() -> None:
    assert DeviceKind.METER.value == "meter"


async def test_after_a_stall_decisions_wait_for_fresh_readings(rig_factory: Any) -> None:
    # Found in HIL (frozen-gateway): deciding on readings stale only because the process was
    # paused sent the site open loop and dipped every cap on resumption.
    rig = rig_factory()
    rig.loop.add_override(Controls(max_gen_pct=40.0), origin="test", duration_s=3600)
    await rig.cycle()
    writes = len(rig.drivers["pv1"].writes)
    rig.clock.advance(30.0)  # SIGSTOP for 30 s: no polls, no cycles
    await rig.loop.step()
    assert len(rig.drivers["pv1"].writes) == writes  # nothing decided on stale readings
    await rig.cycle(advance_s=0.1)  # the pollers have run again
    assert len(rig.drivers["pv1"].writes) == writes + 1
    assert rig.pv_cap() == pytest.approx(4000.0)


async def test_a_hung_driver_never_holds_up_the_control_loop(rig_factory: Any) -> None:
    rig = rig_factory(write_timeout_s=0.2)
    rig.drivers["pv1"].hang_writes = True
    started = time.monotonic()
    await rig.cycle()
    # The write was abandoned at the deadline: the cycle ends, the loop goes on.
    assert time.monotonic() - started < 2.0
    assert rig.drivers["pv1"].writes
    rig.drivers["pv1"].hang_writes = False
    await rig.cycle(advance_s=11.0)  # past refresh_s: the setpoint is written again
    assert len(rig.drivers["pv1"].writes) >= 2

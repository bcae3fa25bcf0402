"""Time integrity of samples (reference/appliance.md §3.5): boot id, monotonic and wall time,
clock trust per sample, and one ClockSync record when the clock becomes trusted."""

from __future__ import annotations

import asyncio
import logging
import uuid
from pathlib import Path

import numpy as np
import pytest

from dergw.v1 import ns_from_timestamp, pb
from drivers.contract import DeviceKind, PointSchema, Quality, Reading
from gateway.bootid import kernel_boot_id, read_boot_id
from gateway.clock import ManualClock
from gateway.outbox import Outbox, RecordKind
from gateway.runtime.poller import DevicePoller
from gateway.runtime.recorder import Recorder
from gateway.snapshot import DeviceSlot, SiteSnapshot
from gateway.timesync import ClockSyncPoint, ClockTrust, SampleClock
from gateway.wire import clock_sync_payload, sample_payload
from tests.gateway.fakes import MemoryDriver, MemoryParams
from tests.support import async_wait_until

S = 10**9
YEAR_S = 365 * 24 * 3600


def test_sample_payload_carries_every_time_field() -> None:
    schema = PointSchema(names=("W", "Hz"), units=("W", "Hz"))
    reading = Reading(
        "pv1",
        wall_ns=1_700_000_000 * S + 5,
        mono_ns=42 * S,
        schema=schema,
        values=np.array([1.0, 50.0]),
        quality=np.array([Quality.GOOD, Quality.GOOD], dtype=np.uint8),
    )
    sample = pb.DeviceSample.FromString(sample_payload(reading, boot_id="b-1", clock_synced=False))
    assert ns_from_timestamp(sample.time) == 1_700_000_000 * S + 5
    assert sample.monotonic_ns == 42 * S
    assert (sample.boot_id, sample.clock_synced) == ("b-1", False)
    assert sample.aggregated_reads == 0


@pytest.mark.parametrize("points", [0, 1, 2, 17, 200])
@pytest.mark.parametrize("error", [None, "read failed: timeout"])
def test_sample_payload_decodes_as_protobuf_builds_it(points: int, error: str | None) -> None:
    """The packed fast path (values and qualities straight from numpy) is the same message as
    protobuf's own encoding, for any length (varint lengths of 1 and 2 bytes), NaNs and error."""
    rng = np.random.default_rng(points)
    schema = PointSchema(
        names=tuple(f"p{i}" for i in range(points)), units=tuple("W" for _ in range(points))
    )
    values = rng.normal(0, 1e6, points)
    values[::3] = np.nan
    quality = rng.integers(1, 5, points).astype(np.uint8)
    reading = Reading("pv1", 1_700_000_000 * S, 7 * S, schema, values, quality, error=error)
    fast = pb.DeviceSample.FromString(sample_payload(reading, boot_id="b-1", clock_synced=True))
    reference = pb.DeviceSample(
        device_id="pv1",
        time=fast.time,
        monotonic_ns=7 * S,
        names=schema.names,
        units=schema.units,
        values=values.tolist(),
        quality=quality.tolist(),
        error=error or "",
        boot_id="b-1",
        clock_synced=True,
    )
    assert fast.SerializeToString(deterministic=True) == reference.SerializeToString(
        deterministic=True
    )


def test_clock_sync_payload() -> None:
    sync = pb.ClockSync.FromString(clock_sync_payload("b-1", -123, 1_700_000_000 * S))
    assert (sync.boot_id, sync.wall_minus_mono_ns) == ("b-1", -123)
    assert ns_from_timestamp(sync.time) == 1_700_000_000 * S


def test_boot_id_is_the_kernels(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "boot_id"
    path.write_text("0b1f6c1e-3b1a-4c52-9a55-3f3b2e1d0c9a\n")
    assert read_boot_id(path) == "0b1f6c1e-3b1a-4c52-9a55-3f3b2e1d0c9a"
    with caplog.at_level(logging.WARNING, logger="gateway.bootid"):
        fallback = read_boot_id(tmp_path / "absent")
        path.write_text("")
        other = read_boot_id(path)
    assert str(uuid.UUID(fallback)) == fallback  # a random id, said so in the log
    assert other != fallback
    assert len(caplog.records) == 2
    real = Path("/proc/sys/kernel/random/boot_id")
    if real.exists():
        assert kernel_boot_id() == real.read_text().strip()
    assert kernel_boot_id() == kernel_boot_id()  # read once


def test_sample_clock_reports_the_moment_trust_begins(tmp_path: Path) -> None:
    flag = tmp_path / "synchronized"
    clock = ManualClock(wall_ns=1_000 * S, mono_ns=7 * S)
    points: list[ClockSyncPoint] = []
    stamp = SampleClock(
        ClockTrust(f"file:{flag}"), clock, boot_id="b-1", on_sync=points.append, recheck_s=1.0
    )
    assert stamp.boot_id == "b-1"
    assert not stamp.synced()
    clock.advance(0.5)
    flag.touch()
    assert not stamp.synced()  # asked again only once per recheck_s: cheap per read
    clock.advance(0.5)
    clock.jump_wall(YEAR_S)  # NTP steps the clock as it synchronises
    assert stamp.synced()
    assert points == [ClockSyncPoint("b-1", (1_001 + YEAR_S) * S - 8 * S, (1_001 + YEAR_S) * S)]
    flag.unlink()
    clock.advance(10)
    assert stamp.synced()  # trust is kept; one ClockSync per process
    assert len(points) == 1


def test_an_already_trusted_clock_is_reported_at_the_first_look() -> None:
    clock = ManualClock(wall_ns=1_000 * S, mono_ns=7 * S)
    points: list[ClockSyncPoint] = []
    stamp = SampleClock(ClockTrust("assume"), clock, boot_id="b", on_sync=points.append)
    assert points == []
    assert stamp.synced()
    assert stamp.synced()
    assert [p.wall_minus_mono_ns for p in points] == [993 * S]


async def test_poller_stamps_samples_and_the_sync_corrects_the_early_ones(tmp_path: Path) -> None:
    """A Pi boots with its clock a year behind; NTP steps it; the ClockSync recorded then lets
    the headend put the early samples at their true time: monotonic_ns + wall_minus_mono_ns."""
    true_wall = 1_800_000_000 * S
    clock = ManualClock(wall_ns=true_wall - YEAR_S * S, mono_ns=50 * S)
    flag = tmp_path / "synchronized"
    with Outbox(tmp_path / "outbox.sqlite3", clock=clock) as outbox:
        recorder = Recorder(outbox, commit_interval_s=0.01)

        def on_sync(point: ClockSyncPoint) -> None:  # as gateway.runtime.app wires it
            recorder.record(
                RecordKind.CLOCK_SYNC,
                clock_sync_payload(point.boot_id, point.wall_minus_mono_ns, point.wall_ns),
            )

        stamp = SampleClock(
            ClockTrust(f"file:{flag}"), clock, boot_id="boot-x", on_sync=on_sync, recheck_s=0
        )
        poller = DevicePoller(
            MemoryDriver("pv1", DeviceKind.PV, MemoryParams(), clock),
            poll_period_s=0.01,
            snapshot=SiteSnapshot([DeviceSlot("pv1", DeviceKind.PV, 0.01, None)], stale_periods=3),
            recorder=recorder,
            clock=clock,
            sample_clock=stamp,
            on_discovered=lambda info: None,
        )

        async def next_read() -> None:
            taken = recorder.pending_records
            await async_wait_until(lambda: recorder.pending_records > taken, timeout_s=10)

        task = asyncio.create_task(poller.run())
        try:
            for _ in range(3):  # polling with the wrong clock
                await next_read()
                clock.advance(1)
            flag.touch()
            clock.jump_wall(YEAR_S)  # NTP: the wall clock is right from here on
            for _ in range(3):
                await next_read()
                clock.advance(1)
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        await recorder.flush()
        rows = outbox.read_after(0, 1000)
    # The clock only moves when the test moves it, wall and monotonic together (but for the
    # step), so every sample's true time is its monotonic time + this.
    true_offset = true_wall - 50 * S
    kinds = [row.kind for row in rows]
    sync_at = kinds.index(RecordKind.CLOCK_SYNC)
    assert kinds.count(RecordKind.CLOCK_SYNC) == 1
    sync = pb.ClockSync.FromString(rows[sync_at].payload)
    assert (sync.boot_id, sync.wall_minus_mono_ns) == ("boot-x", true_offset)
    before = [pb.DeviceSample.FromString(r.payload) for r in rows[:sync_at]]
    after = [pb.DeviceSample.FromString(r.payload) for r in rows[sync_at + 1 :]]
    assert before
    assert after
    assert {s.boot_id for s in before + after} == {"boot-x"}
    assert not any(s.clock_synced for s in before)
    assert all(s.clock_synced for s in after)
    for s in before:  # stamped a year off; the ClockSync puts them right
        assert ns_from_timestamp(s.time) == s.monotonic_ns + true_offset - YEAR_S * S
        assert s.monotonic_ns + sync.wall_minus_mono_ns == s.monotonic_ns + true_offset
    for s in after:
        assert ns_from_timestamp(s.time) == s.monotonic_ns + true_offset

"""One poller per device: discover it, then read it every poll period, forever.

A device that cannot be reached is retried with exponential backoff and full jitter; it never
stalls the other pollers, the control loop or the uplink. Every reading, good or bad, goes into the
snapshot and (as telemetry) into the recorder; a failed read is recorded as bad quality with its
own fresh timestamp, never as the last good values re-stamped. Each sample carries the kernel boot
id and whether the wall clock was trusted when the read began (gateway.timesync.SampleClock).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable

from drivers.contract import DeviceInfo, Driver
from gateway.clock import Clock
from gateway.outbox import RecordKind
from gateway.runtime.recorder import Recorder
from gateway.snapshot import SiteSnapshot
from gateway.timesync import SampleClock
from gateway.wire import sample_payload

__all__ = ["DevicePoller"]

log = logging.getLogger(__name__)

NS_PER_S = 1_000_000_000


class DevicePoller:
    def __init__(
        self,
        driver: Driver,
        *,
        poll_period_s: float,
        snapshot: SiteSnapshot,
        recorder: Recorder,
        clock: Clock,
        sample_clock: SampleClock,
        on_discovered: Callable[[DeviceInfo], None],
        max_backoff_s: float = 30.0,
    ) -> None:
        self._driver = driver
        self._sample_clock = sample_clock
        self._period_ns = round(poll_period_s * NS_PER_S)
        self._snapshot = snapshot
        self._recorder = recorder
        self._clock = clock
        self._on_discovered = on_discovered
        self._max_backoff_s = max_backoff_s
        self._rescan = False

    def request_rescan(self) -> None:
        """Re-run discovery (reconnect, re-read the nameplate and model) before the next read."""
        self._rescan = True

    async def _discover(self) -> DeviceInfo:
        attempt = 0
        while True:
            try:
                return await self._driver.connect()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                attempt += 1
                # Full jitter: uniform in [0, min(cap, base * 2^attempt)].
                delay = random.uniform(0.0, min(self._max_backoff_s, 0.5 * 2**attempt))
                reason = f"discovery failed: {exc}"
                self._snapshot.mark_down(self._driver.device_id, reason)
                if attempt == 1 or attempt % 10 == 0:
                    log.warning("%s: %s (retrying)", self._driver.device_id, reason)
                await asyncio.sleep(delay)

    async def run(self) -> None:
        info = await self._discover()
        self._snapshot.set_info(info)
        self._on_discovered(info)
        log.info(
            "%s: discovered %s %s %s at %s (max %.0f W)",
            info.device_id,
            info.kind.value,
            info.manufacturer,
            info.model,
            info.address,
            info.nameplate.max_w,
        )
        next_due = self._clock.mono_ns()
        failing = False
        while True:
            if self._rescan:
                self._rescan = False
                log.info("%s: rescan requested: re-running discovery", info.device_id)
                await self._driver.close()
                info = await self._discover()
                self._snapshot.set_info(info)
                self._on_discovered(info)
            synced = self._sample_clock.synced()  # before the read: see SampleClock.synced
            reading = await self._driver.read()
            self._snapshot.update(reading)
            self._recorder.record(
                RecordKind.SAMPLE,
                sample_payload(reading, boot_id=self._sample_clock.boot_id, clock_synced=synced),
            )
            if not reading.ok and not failing:
                log.warning("%s: read failed: %s", info.device_id, reading.error)
            elif reading.ok and failing:
                log.info("%s: reads recovered", info.device_id)
            failing = not reading.ok
            next_due += self._period_ns
            now = self._clock.mono_ns()
            if next_due < now:
                # Fell behind (slow device): skip missed slots rather than bursting.
                next_due = now
            await asyncio.sleep((next_due - now) / NS_PER_S)

"""The gateway process: `dergw gateway run --config FILE`.

One asyncio supervisor owns everything: one poller task per device, the control loop, the
recorder (outbox commits) and the uplink. A task that fails unexpectedly is logged and restarted
with backoff; it never takes the others down. The process listens on no TCP port.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import signal
import sys
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

from dergw.v1 import pb
from drivers.contract import DeviceInfo, Driver
from drivers.registry import DRIVERS, create_driver
from gateway.audit import AuditLog
from gateway.bootid import kernel_boot_id
from gateway.clock import Clock, SystemClock
from gateway.config import ConfigError, GatewayConfig, load_config
from gateway.history import History
from gateway.intent_store import IntentSiteMismatchError, IntentStore, OfferResult
from gateway.intent_verify import IntentRefused, TrustedKeysFile, verify_signed_intent
from gateway.localapi.server import LocalApiServer
from gateway.outbox import Outbox, RecordKind
from gateway.runtime.control import ControlLoop
from gateway.runtime.flex import FlexReporter
from gateway.runtime.poller import DevicePoller
from gateway.runtime.recorder import Recorder
from gateway.runtime.uplink import Uplink, create_transport
from gateway.runtime.uplink_tls import UplinkCredentials
from gateway.sdnotify import Notifier, run_watchdog, watchdog_max_age_s, watchdog_pet_interval_s
from gateway.snapshot import DeviceSlot, SiteSnapshot
from gateway.timesync import ClockSyncPoint, ClockTrust, SampleClock
from gateway.wire import (
    IntentError,
    clock_sync_payload,
    device_to_pb,
    intent_from_pb,
    placeholder_device_pb,
)

__all__ = ["Gateway", "main"]

log = logging.getLogger("gateway")

SOFTWARE_VERSION = "0.1.0"


async def _supervise(name: str, factory: Callable[[], Awaitable[None]]) -> None:
    """Run `factory()` forever: restart it with backoff if it fails; never let it end silently."""
    attempt = 0
    while True:
        try:
            await factory()
            log.error("task %s returned unexpectedly; restarting", name)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("task %s failed; restarting", name)
        attempt += 1
        await asyncio.sleep(random.uniform(0.0, min(30.0, 0.5 * 2**attempt)))


class Gateway:
    """Everything one site gateway runs, wired together."""

    def __init__(
        self,
        config: GatewayConfig,
        *,
        clock: Clock | None = None,
        config_path: Path | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path  # the running config file (local API's config diff)
        self.clock = clock or SystemClock()
        self.boot_id = uuid.uuid4().hex
        state_dir = Path(config.gateway.state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        self.outbox = Outbox(
            state_dir / "outbox.sqlite3", clock=self.clock, quota_bytes=config.outbox.quota_bytes
        )
        self.store = IntentStore(state_dir / "intent.sqlite3", clock=self.clock)
        # The headend's intent-signing keys (re-read when the file changes, e.g. at enrollment).
        self.intent_keys = TrustedKeysFile(config.security.intent_keys_path(state_dir))
        # Tamper-evident record of every device write, intent verdict and override; its head
        # goes upstream in ReportedState. `self.audit.intent(...)` records intent verdicts.
        self.audit = AuditLog(state_dir / "audit.db", clock=self.clock)
        self.drivers: dict[str, Driver] = {
            d.id: create_driver(d.driver, d.id, d.kind, d.params, self.clock)
            for d in config.devices
        }
        self.snapshot = SiteSnapshot(
            (DeviceSlot(d.id, d.kind, d.poll_period_s, d.role) for d in config.devices),
            stale_periods=config.control.meter_stale_periods,
        )
        self.recorder = Recorder(self.outbox, commit_interval_s=config.outbox.commit_interval_s)
        # Time integrity of samples: kernel boot id, clock trust, one ClockSync when trusted.
        self.sample_clock = SampleClock(
            ClockTrust(config.control.clock_trust),
            self.clock,
            boot_id=kernel_boot_id(),
            on_sync=self._on_clock_sync,
        )
        self.history = History(state_dir / "history.sqlite3", clock=self.clock)
        self.flex = FlexReporter(
            config,
            history=self.history,
            snapshot=self.snapshot,
            recorder=self.recorder,
            clock=self.clock,
        )
        self.control = ControlLoop(
            config,
            drivers=self.drivers,
            snapshot=self.snapshot,
            recorder=self.recorder,
            store=self.store,
            clock=self.clock,
            # Late-bound: the uplink is built just below.
            offline_for_s=lambda: self.uplink.offline_for_s(),
            flex=self.flex,
            audit=self.audit,
        )
        self.inventory_changed = asyncio.Event()
        # mTLS identity from `dergw enroll` (None: plaintext, `[uplink] tls = false`).
        self.uplink_credentials = (
            UplinkCredentials(state_dir, enroll_url=config.uplink.enroll_url, clock=self.clock)
            if config.uplink.tls
            else None
        )
        self.uplink = Uplink(
            config.uplink,
            transport=create_transport(
                config.uplink,
                gateway_id=config.gateway.id,
                boot_id=self.boot_id,
                identity=(
                    self.uplink_credentials.selected
                    if self.uplink_credentials is not None
                    else None
                ),
            ),
            gateway_id=config.gateway.id,
            outbox=self.outbox,
            recorder=self.recorder,
            register=self._register_message,
            on_intent=self._on_intent,
            inventory_changed=self.inventory_changed,
            clock=self.clock,
            site_id=config.site.id,
            credentials=self.uplink_credentials,
        )
        self.pollers: dict[str, DevicePoller] = {}
        # The local API on a Unix socket (`[local_api]`); started by run().
        self.local_api = (
            LocalApiServer(
                self,
                config.local_api.socket_path(state_dir),
                group=config.local_api.group,
            )
            if config.local_api.enabled
            else None
        )

    # -- uplink callbacks ---------------------------------------------------------------------

    def _register_message(self) -> pb.Register:
        config = self.config
        stats = self.outbox.stats()
        held = self.store.current()
        devices = []
        for device in config.devices:
            info = self.snapshot.slots[device.id].info
            if info is not None:
                devices.append(device_to_pb(info, device.role))
            else:
                protocol = DRIVERS[device.driver].protocol
                devices.append(placeholder_device_pb(device.id, device.kind, protocol, device.role))
        site = pb.Site(
            site_id=config.site.id,
            name=config.site.name,
            substation=config.site.substation,
            feeder=config.site.feeder,
        )
        if config.site.export_limit_w is not None:
            site.export_limit_w = config.site.export_limit_w
        if config.site.import_limit_w is not None:
            site.import_limit_w = config.site.import_limit_w
        return pb.Register(
            gateway_id=config.gateway.id,
            software_version=SOFTWARE_VERSION,
            site=site,
            devices=devices,
            intent_version=held.version if held is not None else 0,
            oldest_unacked_seq=stats.oldest_seq or 0,
            next_seq=stats.next_seq,
            boot_id=self.boot_id,
        )

    async def _on_intent(self, signed: pb.SignedIntent) -> pb.IntentAck:
        """Verify the signature (gateway.intent_verify), validate, persist (durably), then
        acknowledge and hand to the control loop. A refused intent changes nothing here."""
        site_id = self.config.site.id
        held = await asyncio.to_thread(self.store.current)
        persisted = held.version if held is not None and held.site_id == site_id else 0
        verdict = verify_signed_intent(
            signed,
            trusted_keys=await asyncio.to_thread(self.intent_keys.current),
            gateway_id=self.config.gateway.id,
            site_id=site_id,
            persisted_version=persisted,
            now_ns=self.clock.wall_ns(),
            clock_trusted=self.sample_clock.synced(),
        )
        if isinstance(verdict, IntentRefused):
            if verdict.rejection == pb.INTENT_REJECTION_REPLAYED and verdict.version == persisted:
                # Authentic and the version in force: a second delivery (the broker's queued
                # copy and the push after Register), not an attack.
                log.info("intent v%d ignored (stale): already holding it", verdict.version)
                return pb.IntentAck(
                    site_id=site_id,
                    version=verdict.version,
                    status=pb.INTENT_ACK_STATUS_STALE,
                    reason=f"holding v{persisted}",
                )
            log.warning("intent refused: %s", verdict)
            # Unverified: the origin is the link it came on, never what the payload claims.
            self.audit.intent(verdict.version, False, "uplink (unverified)", str(verdict))
            await self.audit.commit()
            return pb.IntentAck(
                site_id=site_id,
                version=verdict.version,
                status=pb.INTENT_ACK_STATUS_REJECTED,
                reason=str(verdict),
                rejection=verdict.rejection,  # type: ignore[arg-type]
            )
        doc = verdict.document
        origin = f"headend (key {verdict.key_id})"

        async def refuse(reason: str) -> pb.IntentAck:
            self.audit.intent(doc.version, False, origin, reason)
            await self.audit.commit()
            return ack(pb.INTENT_ACK_STATUS_REJECTED, reason)

        def ack(status: int, reason: str = "") -> pb.IntentAck:
            return pb.IntentAck(
                site_id=doc.site_id,
                version=doc.version,
                status=status,  # type: ignore[arg-type]
                reason=reason,
            )

        try:
            intent = intent_from_pb(doc)
        except IntentError as exc:
            log.warning("intent v%d rejected: %s", doc.version, exc)
            return await refuse(str(exc))
        try:
            result = await asyncio.to_thread(
                self.store.offer, doc.site_id, doc.version, doc.SerializeToString()
            )
        except IntentSiteMismatchError as exc:
            # The state directory still holds another site's intent (re-commissioned gateway).
            log.error("intent v%d rejected: %s", doc.version, exc)
            return await refuse(f"{exc}; clear the gateway state_dir")
        if result is not OfferResult.PERSISTED:
            held = await asyncio.to_thread(self.store.current)
            reason = f"holding v{held.version if held else 0}"
            log.info("intent v%d ignored (stale): %s", doc.version, reason)
            return ack(pb.INTENT_ACK_STATUS_STALE, reason)
        log.info(
            "intent v%d persisted (%d events, signed by %s)",
            doc.version,
            len(intent.events),
            verdict.key_id,
        )
        self.audit.intent(doc.version, True, origin, f"{len(intent.events)} events")
        await self.audit.commit()  # audited before the headend hears it was accepted
        await self.control.accept_intent(intent)
        return ack(pb.INTENT_ACK_STATUS_PERSISTED)

    def _on_discovered(self, info: DeviceInfo) -> None:
        self.inventory_changed.set()

    def _on_clock_sync(self, point: ClockSyncPoint) -> None:
        log.info(
            "wall clock trusted (boot %s): wall - monotonic = %d ns",
            point.boot_id,
            point.wall_minus_mono_ns,
        )
        self.recorder.record(
            RecordKind.CLOCK_SYNC,
            clock_sync_payload(point.boot_id, point.wall_minus_mono_ns, point.wall_ns),
        )

    # -- lifecycle ----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        held = await asyncio.to_thread(self.store.current)
        intent = None
        if held is not None:
            try:
                intent = intent_from_pb(pb.IntentDocument.FromString(held.document))
            except IntentError as exc:  # pragma: no cover - stored documents were validated
                log.error("stored intent v%d unreadable, ignoring it: %s", held.version, exc)
        await self.control.load(intent)
        await asyncio.to_thread(self.intent_keys.current)  # logs a missing or invalid trust file
        tasks = [
            asyncio.create_task(_supervise("recorder", self.recorder.run), name="recorder"),
            asyncio.create_task(_supervise("control", self.control.run), name="control"),
            asyncio.create_task(_supervise("uplink", self.uplink.run), name="uplink"),
        ]
        for device in self.config.devices:
            poller = self.pollers[device.id] = DevicePoller(
                self.drivers[device.id],
                poll_period_s=device.poll_period_s,
                snapshot=self.snapshot,
                recorder=self.recorder,
                clock=self.clock,
                sample_clock=self.sample_clock,
                on_discovered=self._on_discovered,
            )
            tasks.append(
                asyncio.create_task(_supervise(f"poller {device.id}", poller.run), name=device.id)
            )
        if self.local_api is not None:
            await self.local_api.start()
        log.info(
            "gateway %s ready: site %s, %d devices, uplink %s, intent v%d",
            self.config.gateway.id,
            self.config.site.id,
            len(self.config.devices),
            self.config.uplink.target,
            held.version if held else 0,
        )
        # systemd (Type=notify): ready once the stores are open and the tasks run; never waits
        # for the uplink. The watchdog is petted only while control and outbox progress.
        notifier = Notifier()
        pet_interval_s = watchdog_pet_interval_s()
        if pet_interval_s is not None:
            watchdog = run_watchdog(
                notifier,
                pet_interval_s=pet_interval_s,
                max_age_s=watchdog_max_age_s(
                    pet_interval_s,
                    control_period_s=self.config.control.period_s,
                    commit_s=self.config.outbox.commit_interval_s,
                ),
                control_cycles=lambda: self.control.cycles,
                outbox_rounds=lambda: self.recorder.rounds,
                clock=self.clock,
            )
            tasks.append(asyncio.create_task(watchdog, name="watchdog"))
        notifier.ready(f"site {self.config.site.id}, {len(self.config.devices)} devices")
        try:
            await stop.wait()
        finally:
            notifier.stopping("stopping")
            if self.local_api is not None:
                await self.local_api.close()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.gather(
                *(d.close() for d in self.drivers.values()), return_exceptions=True
            )
            self.outbox.close()
            self.store.close()
            await asyncio.to_thread(self.audit.close)
            self.history.close()
            log.info("gateway %s stopped", self.config.gateway.id)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dergw gateway", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the gateway for one site")
    run.add_argument("--config", required=True, type=Path, help="gateway config (TOML)")
    return parser.parse_args(argv)


NOISY_PROTOCOL_STACKS = ("asyncua", "pymodbus", "dnp3")


def main(argv: list[str]) -> int:
    args = _parse(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    logging.basicConfig(
        level=config.gateway.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if logging.getLevelName(config.gateway.log_level) != logging.DEBUG:
        # The protocol stacks log every session, subscription and reconnect at INFO; the drivers
        # report what matters (link state, errors) themselves, so keep the stacks to warnings.
        for stack in NOISY_PROTOCOL_STACKS:
            logging.getLogger(stack).setLevel(logging.WARNING)

    async def _run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await Gateway(config, config_path=args.config).run(stop)

    asyncio.run(_run())
    return 0

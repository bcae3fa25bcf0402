"""The control loop: the site follows its cached intent with or without the cloud.

Every control period, and at once when a new intent arrives or an event starts or ends:

    snapshot -> schedule.resolve -> plan -> safety.enforce -> driver.write(SafeSetpoint) -> verify

then the event lifecycle earns its responses (started/completed only after read-back), and
decisions and reported state are recorded for the headend. Unchanged setpoints are re-written
every `refresh_s` so that the devices' own reversion timers (armed with each write) never expire
while the gateway is alive, and do expire if it dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from drivers.contract import DeviceKind, Driver, WriteResult
from gateway.audit import AuditLog
from gateway.clock import Clock
from gateway.config import GatewayConfig
from gateway.intent import Controls, Intent, modes_from_mask, modes_to_mask
from gateway.intent_store import EventState, IntentStore
from gateway.lifecycle import (
    DeviceOutcome,
    Response,
    ResponseStatus,
    after_cycle,
    on_arrival,
    withdrawn_modes,
)
from gateway.outbox import RecordKind
from gateway.overrides import OverrideBook, TimedOverride
from gateway.plan import plan
from gateway.runtime.flex import FlexReporter
from gateway.runtime.recorder import Recorder
from gateway.safety import (
    Interlock,
    KernelPolicy,
    KernelState,
    SafeSetpoint,
    SiteConditions,
    enforce,
)
from gateway.schedule import (
    ActiveControls,
    Override,
    draw_randomization,
    effective_windows,
    next_boundary_wall_ns,
    resolve,
)
from gateway.snapshot import SiteSnapshot
from gateway.timesync import ClockTrust, ClockWatch
from gateway.wire import (
    decision_payload,
    event_response_payload,
    intent_status_payload,
    reported_state_payload,
)

__all__ = ["ControlLoop", "LastWrite"]

log = logging.getLogger(__name__)

NS_PER_S = 1_000_000_000
# Reported state goes upstream at least this often even when nothing changes.
REPORT_EVERY_S = 10.0
# ...and when why a setpoint is bound changes (an SoC guard engages, a limit takes over), at
# most this often: some reasons carry live figures (a BMS limit, a ramp rate).
REASONS_REPORT_MIN_S = 1.0
# A cycle later than this many periods means the process was stalled (paused, starved): every
# reading is then stale because of us, not the devices, and deciding on them would be wrong.
STALL_PERIODS = 3
# A setpoint change smaller than this (and than 0.5 % of the rating) is not worth a write.
MIN_CHANGE_W = 20.0


_PROBLEMS = frozenset(
    {ResponseStatus.FAILED, ResponseStatus.REJECTED_INVALID, ResponseStatus.REJECTED_LATE}
)


@dataclass(slots=True)
class _Written:
    setpoint: SafeSetpoint
    mono_ns: int
    generation: int
    ok: bool
    reason: str
    readback: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class LastWrite:
    """The newest write the loop issued to one device, as the driver verified it."""

    setpoint: SafeSetpoint
    mono_ns: int
    ok: bool
    reason: str
    readback: Mapping[str, float]


def _material_change(old: SafeSetpoint, new: SafeSetpoint, rating_w: float) -> bool:
    threshold = max(MIN_CHANGE_W, 0.005 * rating_w)

    def differs(a: float | None, b: float | None) -> bool:
        if a is None or b is None:
            return (a is None) != (b is None)
        return abs(a - b) > threshold

    return (
        differs(old.max_active_power_w, new.max_active_power_w)
        or differs(old.active_power_w, new.active_power_w)
        or old.connect != new.connect
    )


def _describe(setpoint: SafeSetpoint) -> str:
    parts = []
    if setpoint.max_active_power_w is not None:
        parts.append(f"cap {setpoint.max_active_power_w:.0f} W")
    if setpoint.active_power_w is not None:
        parts.append(f"fixed {setpoint.active_power_w:.0f} W")
    if setpoint.connect is not None:
        parts.append("connect" if setpoint.connect else "disconnect")
    text = ", ".join(parts) or "default (uncapped)"
    if setpoint.bound_by:
        text += " [" + "; ".join(setpoint.bound_by) + "]"
    return f"{setpoint.device_id}: {text}"


class ControlLoop:
    def __init__(
        self,
        config: GatewayConfig,
        *,
        drivers: Mapping[str, Driver],
        snapshot: SiteSnapshot,
        recorder: Recorder,
        store: IntentStore,
        clock: Clock,
        offline_for_s: Callable[[], float | None] = lambda: None,
        flex: FlexReporter | None = None,
        audit: AuditLog | None = None,
    ) -> None:
        self._config = config
        # Every device write and override goes into the tamper-evident audit log (None: off).
        self._audit = audit
        self._gateway_id = config.gateway.id
        self._notes: tuple[str, ...] = ()  # conditions in force, for the reported state
        self._control = config.control
        self._drivers = drivers
        self._snapshot = snapshot
        self._recorder = recorder
        self._store = store
        self._clock = clock
        self._fallback = Controls(
            export_limit_w=config.control.fallback.export_limit_w,
            import_limit_w=config.control.fallback.import_limit_w,
            max_gen_pct=config.control.fallback.max_gen_pct,
            connect=config.control.fallback.connect,
        )
        self._device_ids = frozenset(d.id for d in config.devices)
        self._controllable = tuple(
            sorted(d.id for d in config.devices if d.kind is not DeviceKind.METER)
        )
        self._ratings: dict[str, float] = {}
        self.intent: Intent | None = None
        self._wake = asyncio.Event()
        self._generation = 0
        self._generation_key: object = None
        self._written: dict[str, _Written] = {}
        self._event_states: dict[str, EventState] = {}
        # Modes each event lost for good to a higher-priority event (supersession is permanent,
        # even after the superseding event has left the document). Persisted with event states.
        self._withdrawn: dict[str, frozenset[str]] = {}
        self._status_sent: tuple[int, int, bool] | None = None
        self._last_report_mono_ns: int | None = None
        # Each setpoint's bound_by as last reported upstream.
        self._reported_reasons: tuple[tuple[str, tuple[str, ...]], ...] = ()
        self.active: ActiveControls | None = None
        self._kernel_state = KernelState()  # the safety kernel's memory between cycles
        self._policy = _kernel_policy(config)
        self._interlocks = tuple(
            Interlock(
                f"interlock {i.name}",
                Controls(
                    export_limit_w=i.export_limit_w,
                    import_limit_w=i.import_limit_w,
                    gen_limit_w=i.gen_limit_w,
                    load_limit_w=i.load_limit_w,
                    max_gen_pct=i.max_gen_pct,
                    connect=i.connect,
                ),
                device_id=i.device,
                standing=True,
            )
            for i in config.control.interlocks
        )
        self._clock_trust = ClockTrust(config.control.clock_trust)
        self._clock_watch = ClockWatch()
        self._offline_for_s = offline_for_s
        self._flex = flex
        self._last_step_mono_ns: int | None = None
        self._resume_mono_ns: int | None = None  # set while waiting for fresh readings
        self.overrides = OverrideBook()
        self.cycles = 0
        # Numbers of the last cycle begun and the last completed (a failed one never completes).
        self.cycles_begun = 0
        self.cycle_completed = 0
        # The last cycle's enforced setpoints (with their "why"), for the local API.
        self.last_setpoints: tuple[SafeSetpoint, ...] = ()

    # -- intent intake ------------------------------------------------------------------------

    async def load(self, intent: Intent | None) -> None:
        """Start-up: take the persisted intent and event states (no responses are re-sent)."""
        self.intent = intent
        self._event_states = await asyncio.to_thread(self._store.all_event_states)
        self._withdrawn = {
            event_id: modes_from_mask(state.withdrawn_mask)
            for event_id, state in self._event_states.items()
            if state.withdrawn_mask
        }
        if intent is not None:
            await self._refresh_withdrawn(intent, self._clock.wall_ns())

    async def accept_intent(self, intent: Intent) -> None:
        """A new intent version was persisted: queue arrival responses and act on it at once."""
        now = self._clock.wall_ns()
        self.intent = intent
        last = {k: ResponseStatus(v.last_response) for k, v in self._event_states.items()}
        for event in intent.events:
            if event.event_id not in self._event_states:
                # Randomization is drawn once per event and persisted, never re-drawn.
                start_offset_s, duration_offset_s = draw_randomization(self._gateway_id, event)
                self._event_states[event.event_id] = EventState(
                    drawn_start_offset_s=start_offset_s,
                    drawn_duration_offset_s=duration_offset_s,
                    last_response=0,
                    updated_wall_ns=now,
                )
        responses = on_arrival(
            intent, last, now, self._device_ids, offsets=self._offsets(), withdrawn=self._withdrawn
        )
        await self._emit_responses(intent, responses, now)
        await self._refresh_withdrawn(intent, now)
        self._wake.set()

    async def _refresh_withdrawn(self, intent: Intent, now_wall: int) -> None:
        """Recompute the modes events lost for good; persist what changed."""
        last = {k: ResponseStatus(v.last_response) for k, v in self._event_states.items()}
        withdrawn = withdrawn_modes(
            intent, last, self._offsets(), self._device_ids, previous=self._withdrawn
        )
        changed: dict[str, EventState] = {}
        for event_id, modes in withdrawn.items():
            if modes == self._withdrawn.get(event_id, frozenset()):
                continue
            state = self._event_states.get(event_id) or EventState(0, 0, 0, now_wall)
            changed[event_id] = self._event_states[event_id] = dataclasses.replace(
                state, withdrawn_mask=modes_to_mask(modes), updated_wall_ns=now_wall
            )
        self._withdrawn = dict(withdrawn)
        if changed:
            await asyncio.to_thread(self._persist_states, changed)

    # -- local overrides ----------------------------------------------------------------------

    def add_override(
        self,
        controls: Controls,
        *,
        origin: str,
        duration_s: float,
        device_id: str | None = None,
        reason: str = "",
    ) -> Override:
        """Apply `controls` locally for `duration_s`, above events, through the safety kernel.

        Raises OverrideError (nothing changes) for an invalid request. Recorded (audit log) with
        its origin and the reason given.
        """
        timed = self.overrides.add(
            controls,
            origin=origin,
            duration_s=duration_s,
            now_mono_ns=self._clock.mono_ns(),
            devices=self._device_ids,
            device_id=device_id,
        )
        override = timed.override
        scope = override.device_id or "site"
        summary = (
            f"override {override.override_id} by {origin} on {scope} for {duration_s:g} s: "
            f"{controls.describe()}"
        )
        log.warning("%s", summary)
        self._recorder.record(
            RecordKind.DECISION, decision_payload(self._clock.wall_ns(), summary, ())
        )
        if self._audit is not None:
            self._audit.override_set(
                override.override_id,
                origin=origin,
                scope=scope,
                duration_s=duration_s,
                controls=controls.describe(),
                reason=reason,
            )
        self._wake.set()
        return override

    def clear_override(self, override_id: str, *, origin: str) -> bool:
        timed = self.overrides.clear(override_id)
        if timed is None:
            return False
        summary = f"override {override_id} cleared by {origin}"
        log.warning("%s", summary)
        self._recorder.record(
            RecordKind.DECISION, decision_payload(self._clock.wall_ns(), summary, ())
        )
        if self._audit is not None:
            self._audit.override_cleared(
                override_id, origin=origin, reason=f"set by {timed.override.origin}"
            )
        self._wake.set()
        return True

    # -- the loop -----------------------------------------------------------------------------

    async def run(self) -> None:
        period_s = self._control.period_s
        while True:
            started = self._clock.mono_ns()
            try:
                await self.step()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("control cycle failed; continuing with the next cycle")
            elapsed_s = (self._clock.mono_ns() - started) / NS_PER_S
            timeout_s = max(0.0, min(period_s - elapsed_s, self._until_next_boundary_s()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=timeout_s)
            self._wake.clear()

    def _offsets(self) -> dict[str, tuple[int, int]]:
        return {
            event_id: (state.drawn_start_offset_s, state.drawn_duration_offset_s)
            for event_id, state in self._event_states.items()
        }

    def _until_next_boundary_s(self) -> float:
        """Seconds until the next event starts or ends, so boundaries are met on time."""
        now = self._clock.wall_ns()
        boundary = next_boundary_wall_ns(self.intent, now, self._offsets())
        return float("inf") if boundary is None else (boundary - now) / NS_PER_S

    def _events_gate(self, now_wall: int, now_mono: int) -> tuple[bool, list[str]]:
        """May events run now? (clock trusted, not offline too long), and notes for the report."""
        notes: list[str] = []
        step = self._clock_watch.observe(now_wall, now_mono)
        if step is not None:
            log.warning("wall clock stepped by %+.1f s: schedule re-resolved", step.step_s)
            notes.append(f"wall clock stepped by {step.step_s:+.1f} s")
        if not self._clock_trust.trusted():
            return False, [*notes, self._clock_trust.reason()]
        offline_s = self._offline_for_s()
        limit_s = self._control.max_offline_s
        if limit_s is not None and offline_s is not None and offline_s > limit_s:
            return False, [
                *notes,
                f"headend unreachable for {offline_s:.0f} s > max_offline_s {limit_s:g} s: "
                "events suspended, defaults in force",
            ]
        return True, notes

    def _stalled(self, now_mono: int) -> bool:
        """After a stall, hold decisions until every device was read again (or 3 periods).

        The devices meanwhile keep their last setpoints or, if the stall outlasted their
        reversion timers, their own reversion values: safe either way. Deciding on readings
        that are stale only because this process did not run would go open loop and then
        relax slowly from a needlessly conservative state.
        """
        period_ns = round(self._control.period_s * NS_PER_S)
        last, self._last_step_mono_ns = self._last_step_mono_ns, now_mono
        if last is not None and now_mono - last > STALL_PERIODS * period_ns:
            log.warning(
                "control loop stalled for %.1f s (process paused or starved): waiting for "
                "fresh readings before deciding",
                (now_mono - last) / NS_PER_S,
            )
            self._resume_mono_ns = now_mono
        if self._resume_mono_ns is None:
            return False
        waited = now_mono - self._resume_mono_ns
        if self._snapshot.read_since(self._resume_mono_ns) or waited > STALL_PERIODS * period_ns:
            self._resume_mono_ns = None
            return False
        return True

    async def step(self) -> None:
        now_wall, now_mono = self._clock.wall_ns(), self._clock.mono_ns()
        if self._stalled(now_mono):
            return
        self.cycles_begun += 1
        cycle = self.cycles_begun
        states = self._snapshot.device_states(now_mono)
        for device_id, state in states.items():
            if state.max_w > 0:
                self._ratings[device_id] = state.max_w
        for timed in self.overrides.expire(now_mono):
            summary = f"override {timed.override.override_id} by {timed.override.origin} expired"
            log.warning("%s", summary)
            self._recorder.record(RecordKind.DECISION, decision_payload(now_wall, summary, ()))
            if self._audit is not None:
                self._audit.override_expired(
                    timed.override.override_id, set_by=timed.override.origin
                )
        events_allowed, gate_notes = self._events_gate(now_wall, now_mono)
        intent = self.intent
        active = resolve(
            intent,
            now_wall,
            fallback=self._fallback,
            devices=self._device_ids,
            offsets=self._offsets(),
            overrides=self.overrides.active(),
            withdrawn=self._withdrawn,
            events_allowed=events_allowed,
            blocked_reason="; ".join(n for n in gate_notes if "stepped" not in n),
        )
        self.active = active
        # The controls generation: what is asked for, and by whom (not the closed-loop values).
        key = (
            active.intent_version,
            active.site.controls,
            tuple(sorted(active.site.sources.items())),
            tuple(
                (d, s.controls, tuple(sorted(s.sources.items()))) for d, s in active.device.items()
            ),
            active.events_allowed,
        )
        generation_changed = key != self._generation_key
        if generation_changed:
            self._generation += 1
            self._generation_key = key
            log.info(
                "control: %s v%d%s: %s",
                active.source.name.lower(),
                active.intent_version,
                f" events {', '.join(active.active_event_ids)}" if active.active_event_ids else "",
                active.site.controls.describe(),
            )

        pcc = self._snapshot.pcc_reading(now_mono)
        the_plan = plan(
            active,
            states,
            contract_export_limit_w=self._config.site.export_limit_w,
            contract_import_limit_w=self._config.site.import_limit_w,
            constraints=intent.constraints if intent is not None else None,
        )
        enforcement = enforce(
            the_plan.planned,
            states,
            SiteConditions(
                pcc_w=pcc.get("W") if pcc is not None else None,
                export_limits=the_plan.export_limits,
                import_limits=the_plan.import_limits,
                grid_hz=self._snapshot.grid_hz(now_mono),
                now_mono_ns=now_mono,
                pcc_mono_ns=pcc.mono_ns if pcc is not None else None,
                # Static interlocks, and the limit side of local overrides (their targets went
                # through the schedule): both rank above utility limits.
                interlocks=self._interlocks
                + tuple(
                    Interlock(f"override {o.override_id} ({o.origin})", o.controls, o.device_id)
                    for o in self.overrides.active()
                ),
                grid_response=self._snapshot.grid_response(now_mono),
            ),
            revert_after_s=self._control.revert_timeout_s,
            policy=self._policy,
            state=self._kernel_state,
        )
        self._kernel_state = enforcement.state
        self.last_setpoints = tuple(enforcement.setpoints)
        notes = (*gate_notes, *enforcement.notes)
        storage = self._recorder.storage_condition
        if storage:
            # Control goes on; what cannot be stored is counted and reported as a gap later.
            notes = (*notes, f"outbox storage: {storage}")
        if self._audit is not None and self._audit.storage_condition:
            notes = (*notes, f"audit log storage: {self._audit.storage_condition}")
        notes_changed = notes != self._notes
        self._notes = notes

        to_write = [sp for sp in enforcement.setpoints if self._needs_write(sp, now_mono)]
        changed = [
            sp
            for sp in to_write
            if (w := self._written.get(sp.device_id)) is None
            or w.generation != self._generation
            or _material_change(w.setpoint, sp, self._ratings.get(sp.device_id, 0.0))
        ]
        results = await self._write_all(to_write)
        for setpoint, result in zip(to_write, results, strict=True):
            self._written[setpoint.device_id] = _Written(
                setpoint,
                now_mono,
                self._generation,
                result.ok,
                result.reason or "",
                dict(result.readback),
            )
            if not result.ok:
                log.warning("write %s failed: %s", setpoint.device_id, result.reason)
            if self._audit is not None:
                self._audit.device_write(
                    setpoint,
                    result,
                    asked_by={
                        mode: source.label
                        for mode, source in active.for_device(setpoint.device_id).sources.items()
                    },
                    intent_version=active.intent_version,
                )
        if self._audit is not None and self._audit.pending:
            # Committed before the decision and reported state that tell the headend about
            # these writes (bounded wait: a stalled disk never holds control up).
            await self._audit.commit()

        if changed:
            summary = "; ".join(_describe(sp) for sp in changed)
            if generation_changed and the_plan.log:
                for line in the_plan.log:
                    log.info("plan: %s", line)
                summary += " | " + " | ".join(the_plan.log)
            log.info("decision: %s", summary)
            self._recorder.record(RecordKind.DECISION, decision_payload(now_wall, summary, changed))

        if self._flex is not None:
            # Reporting must never disturb control: its failures are logged, not raised.
            try:
                self._flex.observe(
                    states,
                    enforcement.setpoints,
                    intent.constraints if intent is not None else None,
                    now_wall,
                    now_mono,
                )
                await self._flex.maybe_report()
            except Exception:
                log.exception("flexibility report failed; control continues")

        outcomes = self._outcomes()
        await self._lifecycle(intent, active, outcomes, now_wall)
        self._report(
            active,
            enforcement.setpoints,
            generation_changed or notes_changed,
            now_wall,
            now_mono,
        )
        self.cycles += 1
        self.cycle_completed = cycle

    @property
    def notes(self) -> tuple[str, ...]:
        """Conditions in force as of the last cycle (interlocks, clock, offline, storage)."""
        return self._notes

    @property
    def interlocks(self) -> tuple[Interlock, ...]:
        return self._interlocks

    def last_write(self, device_id: str) -> LastWrite | None:
        """The newest write issued to `device_id` (None: never written)."""
        written = self._written.get(device_id)
        if written is None:
            return None
        return LastWrite(
            written.setpoint, written.mono_ns, written.ok, written.reason, written.readback
        )

    def timed_overrides(self) -> tuple[TimedOverride, ...]:
        """The overrides in force with their expiry (monotonic ns)."""
        return self.overrides.timed()

    def event_windows(self) -> dict[str, tuple[int, int]]:
        """Each event's effective [start, end) in wall ns (randomization applied)."""
        return effective_windows(self.intent.events, self._offsets()) if self.intent else {}

    def _needs_write(self, setpoint: SafeSetpoint, now_mono: int) -> bool:
        written = self._written.get(setpoint.device_id)
        if written is None or not written.ok or written.generation != self._generation:
            return True
        if now_mono - written.mono_ns >= self._control.refresh_s * NS_PER_S:
            return True
        return _material_change(
            written.setpoint, setpoint, self._ratings.get(setpoint.device_id, 0.0)
        )

    async def _write_all(self, setpoints: Sequence[SafeSetpoint]) -> list[WriteResult]:
        if not setpoints:
            return []
        return list(await asyncio.gather(*(self._write_one(sp) for sp in setpoints)))

    async def _write_one(self, setpoint: SafeSetpoint) -> WriteResult:
        timeout_s = self._control.write_timeout_s
        try:
            return await asyncio.wait_for(
                self._drivers[setpoint.device_id].write(setpoint), timeout=timeout_s
            )
        except TimeoutError:
            return WriteResult(
                setpoint.device_id,
                False,
                self._clock.wall_ns(),
                reason=f"write did not complete within {timeout_s:g} s ([control] "
                "write_timeout_s): the driver is hung; treated as not written",
            )

    def _outcomes(self) -> dict[str, DeviceOutcome]:
        outcomes: dict[str, DeviceOutcome] = {}
        now_mono = self._clock.mono_ns()
        for device_id in self._controllable:
            available, reason = self._snapshot.availability(device_id, now_mono)
            written = self._written.get(device_id)
            if not available:
                outcomes[device_id] = DeviceOutcome(False, f"unavailable: {reason}")
            elif written is None or written.generation != self._generation:
                outcomes[device_id] = DeviceOutcome(False, "not written yet")
            elif not written.ok:
                outcomes[device_id] = DeviceOutcome(False, written.reason)
            else:
                outcomes[device_id] = DeviceOutcome(True)
        return outcomes

    async def _lifecycle(
        self,
        intent: Intent | None,
        active: ActiveControls,
        outcomes: Mapping[str, DeviceOutcome],
        now_wall: int,
    ) -> None:
        if intent is None:
            return
        last = {k: ResponseStatus(v.last_response) for k, v in self._event_states.items()}
        responses = after_cycle(
            intent,
            active,
            last,
            outcomes,
            self._controllable,
            now_wall,
            self._offsets(),
            devices=self._device_ids,
            withdrawn=self._withdrawn,
        )
        await self._emit_responses(intent, responses, now_wall)
        if responses:
            await self._refresh_withdrawn(intent, now_wall)

        # One verdict per (version, controls generation): "applied" only when every device in
        # scope read back what was written; "failed" (with reasons) at most once before that.
        applied = all(outcome.ok for outcome in outcomes.values())
        key = (intent.version, self._generation)
        if self._status_sent == (*key, True) or (
            not applied and self._status_sent == (*key, False)
        ):
            return
        reason = "; ".join(f"{d}: {o.reason}" for d, o in outcomes.items() if not o.ok)
        event_ids = active.active_event_ids
        self._recorder.record(
            RecordKind.INTENT_STATUS,
            intent_status_payload(
                intent.version, applied, reason, event_ids[0] if event_ids else None, now_wall
            ),
        )
        self._status_sent = (*key, applied)

    async def _emit_responses(
        self, intent: Intent, responses: list[Response], now_wall: int
    ) -> None:
        if not responses:
            return
        windows = effective_windows(intent.events, self._offsets())
        for response in responses:
            state = self._event_states.get(response.event_id) or EventState(0, 0, 0, now_wall)
            self._event_states[response.event_id] = dataclasses.replace(
                state, last_response=int(response.status), updated_wall_ns=now_wall
            )
            # The window as this gateway executes it, on the responses that announce it.
            window = (
                windows.get(response.event_id)
                if response.status in (ResponseStatus.RECEIVED, ResponseStatus.STARTED)
                else None
            )
            self._recorder.record(
                RecordKind.EVENT_RESPONSE,
                event_response_payload(
                    intent.version,
                    response.event_id,
                    int(response.status),
                    response.reason,
                    now_wall,
                    effective_window=window,
                ),
            )
            level = logging.WARNING if response.status in _PROBLEMS else logging.INFO
            log.log(
                level, "event %s: %s %s", response.event_id, response.status.name, response.reason
            )
        # Persist before the next cycle so a restart never repeats or loses a response.
        snapshot = {r.event_id: self._event_states[r.event_id] for r in responses}
        await asyncio.to_thread(self._persist_states, snapshot)

    def _persist_states(self, states: Mapping[str, EventState]) -> None:
        for event_id, state in states.items():
            self._store.set_event_state(event_id, state)

    def _report(
        self,
        active: ActiveControls,
        setpoints: Sequence[SafeSetpoint],
        force: bool,
        now_wall: int,
        now_mono: int,
    ) -> None:
        since_ns = (
            None if self._last_report_mono_ns is None else now_mono - self._last_report_mono_ns
        )
        reasons = tuple(sorted((sp.device_id, sp.bound_by) for sp in setpoints))
        due = (
            since_ns is None
            or since_ns >= REPORT_EVERY_S * NS_PER_S
            or (reasons != self._reported_reasons and since_ns >= REASONS_REPORT_MIN_S * NS_PER_S)
        )
        if not (force or due):
            return
        self._last_report_mono_ns = now_mono
        self._reported_reasons = reasons
        availability = [
            (device_id, *self._snapshot.availability(device_id, now_mono))
            for device_id in sorted(self._device_ids)
        ]
        self._recorder.record(
            RecordKind.REPORTED_STATE,
            reported_state_payload(
                wall_ns=now_wall,
                active=active,
                setpoints=setpoints,
                availability=availability,
                notes=self._notes,
                clock_trusted=self._clock_trust.trusted(),
                audit_head=(
                    (head.seq, head.hash)
                    if self._audit is not None and (head := self._audit.head()).seq
                    else None
                ),
            ),
        )


def _kernel_policy(config: GatewayConfig) -> KernelPolicy:
    """The safety kernel's tuning, from the site's control config."""
    control = config.control
    return KernelPolicy(
        export_margin_w=control.export_margin_w,
        assumed_min_load_w=control.assumed_min_load_w,
        export_relax_gain=control.export_relax_gain,
        export_relax_max_step_pct=control.export_relax_max_step_pct,
        export_deadband_w=control.export_deadband_w,
        pcc_average_s=control.pcc_average_s,
        export_probe_pct=control.export_probe_pct,
        nominal_hz=float(control.nominal_hz) if control.nominal_hz is not None else None,
        frequency_deadband_hz=control.frequency_deadband_hz,
        ramp_pct_per_s=control.ramp_pct_per_s,
        ramp_down_immediate=control.ramp_down_immediate,
        soc_min_pct=control.soc_min_pct,
        soc_max_pct=control.soc_max_pct,
        soc_hysteresis_pct=control.soc_hysteresis_pct,
    )

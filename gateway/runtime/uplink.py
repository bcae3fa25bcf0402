"""The uplink: one session at a time with the headend, over gRPC or MQTT, same rules.

Per session (`gateway.runtime.transport` moves the messages):
  1. send Register, wait for RegisterAck (a RetryAfter instead ends the session: the headend is
     admitting a reconnecting fleet and says when to come back);
  2. reconcile with what the headend already committed (its watermark and the ranges above it):
     delete those rows, never resend them;
  3. then, concurrently:
     * the LIVE lane sends every row appended since the session started, as soon as the recorder
       commits it;
     * the BACKLOG lane drains the rows held from before, oldest first, paced (records/s, set by
       the headend's RegisterAck or the config) and only while the live lane has nothing waiting,
       so a long outage's backlog never delays live data;
     * Acks delete rows (the watermark and the acked ranges) after the headend's commit;
     * signed intents (SignedIntent) are verified, validated and persisted before they are
       acknowledged (IntentAck), and only then handed to the control loop (the `on_intent`
       callback does all of that); a bare IntentDocument is refused here, unread, as UNSIGNED.
       Every refusal is counted per reason in `UplinkHealth.intent_rejections`.
A broken session is retried forever with full-jitter exponential backoff, reset after
a session that stayed up. The gateway only dials out.

With `[uplink] tls = true` (the default) every connection is mTLS with the identity from
`dergw enroll` (`gateway.runtime.uplink_tls.UplinkCredentials` picks it before each attempt and
renews it). Not enrolled: the uplink stays down (health `tls_failure = "not_enrolled"`) and looks
for the identity again every `reconnect_max_s`; the control loop never depends on the uplink. A
certificate the other side rejects (expired, unknown CA, revoked; `classify_tls_failure`) waits
`rejected_backoff_s` before the next attempt instead of hammering, and shows in
`UplinkHealth.tls_failure`; each change is logged once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from dergw.v1 import MAX_RECORDS_PER_BATCH, pb
from dergw.v1.trust import rejection_name
from gateway.clock import Clock
from gateway.config import UplinkConfig
from gateway.identity import (
    Identity,
    IdentityError,
    NotEnrolledError,
    TlsFailure,
    classify_tls_failure,
)
from gateway.outbox import AckBeyondHeadError, Outbox, OutboxRow
from gateway.runtime.recorder import Recorder
from gateway.runtime.transport import UplinkTransport
from gateway.runtime.uplink_tls import NOT_ENROLLED, UplinkCredentials

__all__ = [
    "RetryAfterError",
    "Uplink",
    "UplinkHealth",
    "UplinkProtocolError",
    "create_transport",
]

log = logging.getLogger(__name__)

# A session that stayed up this long resets the backoff to its first step.
HEALTHY_SESSION_S = 30.0
REGISTER_TIMEOUT_S = 10.0
# Register again this often while no RegisterAck came: over MQTT a Register published while no
# headend was subscribed (all of them reconnecting to a restarted broker) is simply gone.
REGISTER_RESEND_S = 2.0
# Under TLS 1.3 a server refusing our certificate just closes the connection; the client sees
# it as a network drop ("Connection lost" from grpclib). This many in a row before any
# RegisterAck, with TLS on, count as a rejection (UNKNOWN_CA: most likely the headend no
# longer trusts our issuer).
HANDSHAKE_CLOSES_TO_REJECT = 3
_HANDSHAKE_CLOSE_MARKERS = ("connection lost", "connection reset")
_REJECTION_HINTS = {
    TlsFailure.EXPIRED.value: "run `dergw enroll` with a new token (renewal needs a valid one)",
    TlsFailure.REVOKED.value: "an admin must issue a new enrollment token; run `dergw enroll`",
    TlsFailure.UNKNOWN_CA.value: "the headend does not trust our certificate or we do not "
    "trust its CA (changed?): run `dergw enroll` again",
}

_BODY_FIELD = {
    field_descriptor.number: field_descriptor.name
    for field_descriptor in pb.Record.DESCRIPTOR.oneofs_by_name["body"].fields
}


class UplinkProtocolError(Exception):
    """The headend broke the protocol (e.g. no RegisterAck first); the session is dropped."""


class _RenewalReconnectError(Exception):
    """A renewed certificate is staged: end the session and reconnect with it."""


class RetryAfterError(Exception):
    """The headend asked this gateway to come back later (admission control)."""

    def __init__(self, seconds: float, reason: str) -> None:
        super().__init__(f"headend asked to retry after {seconds:g} s: {reason}")
        self.seconds = seconds
        self.reason = reason


@dataclass(slots=True)
class UplinkHealth:
    transport: str = ""
    target: str = ""
    connected: bool = False
    sessions: int = 0
    reconnects: int = 0
    last_error: str = ""
    last_ack_mono_ns: int | None = None
    acked_seq: int = 0
    sent_batches: int = 0
    sent_live_batches: int = 0
    sent_backlog_batches: int = 0
    backlog_records_per_s: float = 0.0
    retry_after_count: int = 0
    next_retry_s: float = 0.0
    intents_received: int = 0
    # Intents refused at verification, by pb.IntentRejection name (e.g. "BAD_SIGNATURE").
    intent_rejections: dict[str, int] = field(default_factory=dict)
    # Since when the headend has been unreachable (monotonic ns); None while connected.
    down_since_mono_ns: int | None = None
    notes: list[str] = field(default_factory=list)
    tls: bool = False  # mTLS with the enrolled identity
    # Why the headend (or broker) refuses us: a TlsFailure value ("expired", "unknown_ca",
    # "revoked", "no_certificate") or "not_enrolled"; kept until a session is accepted.
    tls_failure: str | None = None
    cert_serial: str | None = None  # of the certificate presented last
    cert_days_left: float | None = None
    cert_renewals: int = 0


def full_jitter_backoff_s(attempt: int, max_s: float, first_s: float = 0.5) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(max_s, first_s * 2**(attempt-1))]
    (attempt 1, 2, ...), so gateways that lost the same headend do not reconnect in lockstep."""
    window = max_s if attempt > 64 else min(max_s, first_s * 2.0 ** max(attempt - 1, 0))
    return random.uniform(0.0, window)


def _grpc_errors() -> tuple[type[BaseException], ...]:
    """grpclib's call errors when the transport is gRPC (built before `run`, so its module is
    loaded by then); an MQTT uplink never imports grpclib. The transport turns them into
    TransportClosedError; these catch any that slip through, so the session still ends and is
    retried (ssl errors are OSErrors, caught anyway)."""
    transport = sys.modules.get("gateway.runtime.grpc_transport")
    return tuple(getattr(transport, "GRPC_ERRORS", ())) if transport is not None else ()


def create_transport(
    config: UplinkConfig,
    *,
    gateway_id: str,
    boot_id: str,
    identity: Callable[[], Identity] | None = None,
) -> UplinkTransport:
    """The transport the config names (`[uplink] transport = "grpc" | "mqtt"`); mTLS with
    `identity()` (called per connection), plaintext without."""
    # Each transport's client library is imported only when the config names it: paho for
    # MQTT, grpclib for gRPC.
    if config.transport == "mqtt":
        from gateway.runtime.mqtt_transport import MqttTransport

        return MqttTransport(config, gateway_id=gateway_id, boot_id=boot_id, identity=identity)
    from gateway.runtime.grpc_transport import GrpcTransport

    return GrpcTransport(config.target, keepalive_s=config.keepalive_s, identity=identity)


class _Pace:
    """Token bucket in records/s for the backlog lane (0 = unpaced)."""

    def __init__(self, records_per_s: float, burst: int) -> None:
        self.records_per_s = records_per_s
        self._burst = float(max(burst, 1))
        self._tokens = self._burst
        self._updated = time.monotonic()

    def wait_s(self, records: int) -> float:
        """Seconds until `records` may be sent (0 = now); takes the tokens when it returns 0."""
        if self.records_per_s <= 0:
            return 0.0
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._updated) * self.records_per_s)
        self._updated = now
        if self._tokens >= records:
            self._tokens -= records
            return 0.0
        return (records - self._tokens) / self.records_per_s


@dataclass(slots=True)
class _Lanes:
    """Where each lane stands in one session; in flight = sent, not yet acknowledged."""

    live_cursor: int  # last seq sent on the live lane (rows above it are new)
    backlog_cursor: int  # last seq sent on the backlog lane
    live_start: int  # first seq of the live lane; the backlog is everything below
    live_inflight: list[tuple[int, int]] = field(default_factory=list)
    backlog_inflight: list[tuple[int, int]] = field(default_factory=list)
    acked: asyncio.Event = field(default_factory=asyncio.Event)
    # When an ack last made progress, or the first batch went out after a quiet spell.
    progress_mono: float = field(default_factory=time.monotonic)

    def sent(self) -> None:
        if not self.live_inflight and not self.backlog_inflight:
            self.progress_mono = time.monotonic()

    def stalled_s(self) -> float:
        """How long batches have waited for an ack without any progress (0 = none in flight)."""
        if not self.live_inflight and not self.backlog_inflight:
            return 0.0
        return time.monotonic() - self.progress_mono

    @property
    def backlog_done(self) -> bool:
        return self.backlog_cursor >= self.live_start - 1

    def settle(self, up_to_seq: int, ranges: list[tuple[int, int]]) -> None:
        def covered(batch: tuple[int, int]) -> bool:
            first, last = batch
            return last <= up_to_seq or any(lo <= first and last <= hi for lo, hi in ranges)

        before = len(self.live_inflight) + len(self.backlog_inflight)
        self.live_inflight = [b for b in self.live_inflight if not covered(b)]
        self.backlog_inflight = [b for b in self.backlog_inflight if not covered(b)]
        if len(self.live_inflight) + len(self.backlog_inflight) < before:
            self.progress_mono = time.monotonic()
        self.acked.set()


class Uplink:
    def __init__(
        self,
        config: UplinkConfig,
        *,
        transport: UplinkTransport,
        gateway_id: str,
        outbox: Outbox,
        recorder: Recorder,
        register: Callable[[], pb.Register],
        on_intent: Callable[[pb.SignedIntent], Awaitable[pb.IntentAck]],
        inventory_changed: asyncio.Event,
        clock: Clock,
        site_id: str,
        credentials: UplinkCredentials | None = None,
    ) -> None:
        self._config = config
        self._credentials = credentials
        self._registered = False  # the current session got its RegisterAck
        self._handshake_closes = 0  # consecutive closes before a RegisterAck (TLS on)
        self._transport = transport
        self._gateway_id = gateway_id
        self._site_id = site_id
        self._outbox = outbox
        self._recorder = recorder
        self._register = register
        self._on_intent = on_intent
        self._inventory_changed = inventory_changed
        self._clock = clock
        self.health = UplinkHealth(
            transport=transport.name,
            target=transport.target,
            down_since_mono_ns=clock.mono_ns(),
            tls=credentials is not None,
        )

    def offline_for_s(self) -> float | None:
        """How long the headend has been unreachable (None while connected)."""
        since = self.health.down_since_mono_ns
        return None if since is None else (self._clock.mono_ns() - since) / 1e9

    async def run(self) -> None:
        attempt = 0
        session_errors: tuple[type[BaseException], ...] = (
            UplinkProtocolError,
            TimeoutError,
            ConnectionError,
            OSError,
            *_grpc_errors(),
        )
        while True:
            started = time.monotonic()
            retry_after_s: float | None = None
            fixed_delay_s: float | None = None
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except _RenewalReconnectError:
                fixed_delay_s = 0.0
                self.health.last_error = "reconnecting with the renewed certificate"
            except NotEnrolledError as exc:
                self.health.last_error = f"not enrolled: run `dergw enroll` ({exc})"
                self._note_tls_failure(NOT_ENROLLED)
                fixed_delay_s = self._config.reconnect_max_s  # only a local file is checked
            except IdentityError as exc:
                self.health.last_error = f"identity unusable: {exc}"
                self._note_tls_failure(NOT_ENROLLED)
                fixed_delay_s = self._config.reconnect_max_s
            except RetryAfterError as exc:
                retry_after_s = exc.seconds
                self.health.retry_after_count += 1
                self.health.last_error = str(exc)
                if exc.reason.startswith(TlsFailure.REVOKED.value):
                    # Over MQTT the broker accepts the certificate; the headend says it is
                    # revoked in its answer instead of at the handshake.
                    self._note_tls_failure(TlsFailure.REVOKED.value)
            except session_errors as exc:
                self.health.last_error = f"{type(exc).__name__}: {exc}"
                fixed_delay_s = await self._on_failure(exc)
            finally:
                was_connected = self.health.connected
                self.health.connected = False
                if was_connected:
                    self.health.down_since_mono_ns = self._clock.mono_ns()
                with contextlib.suppress(Exception):
                    await self._transport.close()
            if was_connected:
                log.warning("uplink lost: %s", self.health.last_error)
            attempt = 1 if time.monotonic() - started > HEALTHY_SESSION_S else attempt + 1
            if fixed_delay_s is not None:
                delay = fixed_delay_s
            elif retry_after_s is not None:
                # The headend's delay plus our own jitter, so refused gateways don't come back
                # in lockstep.
                delay = retry_after_s + random.uniform(0, retry_after_s / 2)
            else:
                delay = full_jitter_backoff_s(attempt, self._config.reconnect_max_s)
            self.health.next_retry_s = delay
            if fixed_delay_s is None and (attempt in (1, 2) or attempt % 20 == 0):
                log.info("uplink: retrying in %.1f s (%s)", delay, self.health.last_error)
            await asyncio.sleep(delay)
            self.health.reconnects += 1

    def _note_tls_failure(self, failure: str | None) -> None:
        """Record why the certificate was refused; log each change once, not every attempt."""
        previous = self.health.tls_failure
        if failure == previous:
            return
        self.health.tls_failure = failure
        if failure is None:
            log.info("uplink: %s resolved", previous)
        elif failure == NOT_ENROLLED:
            log.warning(
                "uplink: %s; the uplink stays down, local control runs", self.health.last_error
            )
        else:
            log.warning(
                "uplink: certificate rejected (%s): %s; next attempts every %.0f s; %s",
                failure,
                self.health.last_error,
                self._config.rejected_backoff_s,
                _REJECTION_HINTS.get(failure, "check the headend's TLS setup"),
            )

    async def _on_failure(self, exc: BaseException) -> float | None:
        """Classify a failed session under TLS; the delay before the next attempt, or None for
        the normal backoff."""
        credentials = self._credentials
        if credentials is None:
            return None
        if await credentials.failed():
            return None  # the renewed certificate failed: retry soon with the current one
        failure = classify_tls_failure(exc, identity=credentials.identity, now=credentials.now())
        closed = not self._registered and any(
            marker in str(exc).lower() for marker in _HANDSHAKE_CLOSE_MARKERS
        )
        self._handshake_closes = self._handshake_closes + 1 if closed else 0
        if failure is TlsFailure.OTHER and self._handshake_closes >= HANDSHAKE_CLOSES_TO_REJECT:
            failure = TlsFailure.UNKNOWN_CA
        if not failure.is_rejection:
            return None
        self._note_tls_failure(failure.value)
        return self._config.rejected_backoff_s

    def _update_certificate_health(
        self, identity: Identity, credentials: UplinkCredentials
    ) -> None:
        self.health.cert_serial = identity.serial
        self.health.cert_days_left = identity.days_left(credentials.now())
        self.health.cert_renewals = credentials.renewals

    async def _renewal_watch(self, credentials: UplinkCredentials) -> None:
        """While connected: when the certificate's renewal is due, stage the renewal and end
        the session (the next one presents the new certificate)."""
        while True:
            check_in_s = credentials.renewal_check_in_s()
            if check_in_s is None:
                await asyncio.Event().wait()  # never renewed here: wait for cancellation
                continue
            if check_in_s > 0:
                await asyncio.sleep(min(check_in_s, 3600.0))
                continue
            if await credentials.stage() is not None:
                raise _RenewalReconnectError

    async def _session(self) -> None:
        transport = self._transport
        credentials = self._credentials
        self._registered = False
        if credentials is not None:
            self._update_certificate_health(await credentials.prepare(), credentials)
            if self.health.tls_failure == NOT_ENROLLED:
                self._note_tls_failure(None)  # enrolled meanwhile
        await transport.connect()
        self._inventory_changed.clear()
        await transport.send(pb.UpMessage(register=self._register()))
        register_ack = await self._await_register_ack()
        lanes = await self._on_register_ack(register_ack)
        self._registered = True
        self._handshake_closes = 0
        if credentials is not None:
            await credentials.connected()
            self._update_certificate_health(credentials.selected(), credentials)
            self._note_tls_failure(None)
        self.health.connected = True
        self.health.down_since_mono_ns = None
        self.health.sessions += 1
        log.info(
            "uplink connected to %s over %s (committed seq %d, backlog %d records)",
            transport.target,
            transport.name,
            register_ack.committed_seq,
            max(0, lanes.live_start - 1 - lanes.backlog_cursor),
        )
        pace_records_per_s = float(
            register_ack.backlog_records_per_s or self._config.backlog_records_per_s
        )
        self.health.backlog_records_per_s = pace_records_per_s
        sender = asyncio.create_task(self._send_loop(lanes, pace_records_per_s))
        renewal: asyncio.Task[None] | None = None
        if credentials is not None:
            renewal = asyncio.create_task(self._renewal_watch(credentials))
        reader: asyncio.Future[pb.DownMessage] | None = None
        try:
            while True:
                reader = asyncio.ensure_future(transport.receive())
                watched: set[asyncio.Future[Any]] = {reader, sender}
                if renewal is not None:
                    watched.add(renewal)
                done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
                if renewal is not None and renewal in done:
                    renewal.result()  # raises _RenewalReconnectError
                if sender in done:
                    sender.result()  # re-raise what stopped the sender
                    raise UplinkProtocolError("sender stopped")
                message, reader = reader.result(), None
                await self._dispatch(message, lanes)
        finally:
            for task in (sender, reader, renewal):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task

    async def _await_register_ack(self) -> pb.RegisterAck:
        deadline = time.monotonic() + REGISTER_TIMEOUT_S
        resend_at = time.monotonic() + REGISTER_RESEND_S
        # One receive in flight across the waits (cancelling a transport read is not free).
        receiving: asyncio.Future[pb.DownMessage] | None = None
        try:
            while True:
                now = time.monotonic()
                if now >= deadline:
                    raise TimeoutError(f"no RegisterAck within {REGISTER_TIMEOUT_S:g} s")
                if now >= resend_at:
                    resend_at = now + REGISTER_RESEND_S
                    await self._transport.send(pb.UpMessage(register=self._register()))
                if receiving is None:
                    receiving = asyncio.ensure_future(self._transport.receive())
                done, _ = await asyncio.wait({receiving}, timeout=min(deadline, resend_at) - now)
                if not done:
                    continue
                message, receiving = receiving.result(), None
                answer = await self._register_answer(message)
                if answer is not None:
                    return answer
        finally:
            if receiving is not None:
                receiving.cancel()

    async def _register_answer(self, message: pb.DownMessage) -> pb.RegisterAck | None:
        """The RegisterAck, None for a message to skip while waiting for it; raises otherwise."""
        body = message.WhichOneof("body")
        if body == "register_ack":
            return message.register_ack
        if body == "retry_after":
            raise RetryAfterError(message.retry_after.seconds, message.retry_after.reason)
        if body in ("signed_intent", "intent"):
            # MQTT delivers intents queued in the persistent session as soon as we connect,
            # possibly before the RegisterAck: they are handled the same way.
            await self._handle_intent(message)
            return None
        if body == "ack":
            return None  # a late ack of the previous session; the RegisterAck supersedes it
        raise UplinkProtocolError(
            f"headend answered Register with `{body or 'an empty message'}`, not RegisterAck"
        )

    async def _on_register_ack(self, ack: pb.RegisterAck) -> _Lanes:
        """Reconcile with what the headend already committed; return the session's lanes."""
        stats = await asyncio.to_thread(self._outbox.stats)
        committed = ack.committed_seq
        ranges = [(r.first_seq, r.last_seq) for r in ack.committed_ranges]
        if committed >= stats.next_seq:
            if stats.rows == 0:
                # A re-flashed gateway: continue numbering after what the headend holds.
                await asyncio.to_thread(self._outbox.fast_forward, committed + 1)
                return _Lanes(
                    live_cursor=committed, backlog_cursor=committed, live_start=committed + 1
                )
            log.error(
                "headend committed seq %d but our outbox only reached %d: this outbox was "
                "re-created while holding data; sending it anyway (the headend may drop it)",
                committed,
                stats.next_seq - 1,
            )
            committed, ranges = 0, []
        ranges = [(lo, hi) for lo, hi in ranges if hi < stats.next_seq]
        if committed > 0 or ranges:
            # Our acks for these may have been lost (e.g. kill -9 right after sending).
            await asyncio.to_thread(self._outbox.ack, committed, ranges)
        live_start = (await asyncio.to_thread(self._outbox.stats)).next_seq
        return _Lanes(live_cursor=live_start - 1, backlog_cursor=committed, live_start=live_start)

    async def _send_batch(self, rows: list[OutboxRow]) -> tuple[int, int]:
        first, last = rows[0].seq, rows[-1].through_seq
        batch = pb.TelemetryBatch(gateway_id=self._gateway_id, first_seq=first, last_seq=last)
        for row in rows:
            record = batch.records.add()
            record.seq = row.seq
            if row.through_seq != row.seq:
                record.through_seq = row.through_seq
            getattr(record, _BODY_FIELD[row.kind]).MergeFromString(row.payload)
        await self._transport.send(pb.UpMessage(telemetry=batch))
        self.health.sent_batches += 1
        return first, last

    async def _send_loop(self, lanes: _Lanes, pace_records_per_s: float) -> None:
        limit = min(self._config.batch_max_records, MAX_RECORDS_PER_BATCH)
        window = self._config.inflight_batches
        pace = _Pace(pace_records_per_s, burst=limit)
        committed = self._recorder.committed
        while True:
            if self._inventory_changed.is_set():
                self._inventory_changed.clear()
                await self._transport.send(pb.UpMessage(register=self._register()))
            progressed = False
            live_waiting = False
            # Live lane first: what just happened goes out before any backlog.
            if len(lanes.live_inflight) < window:
                committed.clear()
                rows = await asyncio.to_thread(self._outbox.read_after, lanes.live_cursor, limit)
                if rows:
                    lanes.sent()
                    sent = await self._send_batch(rows)
                    lanes.live_inflight.append(sent)
                    lanes.live_cursor = sent[1]
                    self.health.sent_live_batches += 1
                    progressed = True
                    live_waiting = len(rows) == limit
            else:
                live_waiting = True
            pace_wait_s = 0.0
            if not live_waiting and not lanes.backlog_done and len(lanes.backlog_inflight) < window:
                pace_wait_s = pace.wait_s(limit)
                if pace_wait_s == 0.0:
                    rows = await asyncio.to_thread(
                        self._outbox.read_after,
                        lanes.backlog_cursor,
                        limit,
                        below_seq=lanes.live_start,
                    )
                    if rows:
                        lanes.sent()
                        sent = await self._send_batch(rows)
                        lanes.backlog_inflight.append(sent)
                        lanes.backlog_cursor = sent[1]
                        self.health.sent_backlog_batches += 1
                        progressed = True
                    else:
                        lanes.backlog_cursor = lanes.live_start - 1
            if progressed:
                continue
            stalled_s = lanes.stalled_s()
            if stalled_s > self._config.ack_timeout_s:
                raise UplinkProtocolError(
                    f"no ack for {stalled_s:.0f} s with batches in flight; reconnecting "
                    "(unacknowledged records are sent again)"
                )
            # Nothing to send right now: wait for new rows, an ack (window space) or the pace.
            lanes.acked.clear()
            timeout = pace_wait_s if pace_wait_s > 0 else 1.0
            waiters = [
                asyncio.ensure_future(committed.wait()),
                asyncio.ensure_future(lanes.acked.wait()),
            ]
            try:
                await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()

    async def _handle_intent(self, message: pb.DownMessage) -> None:
        self.health.intents_received += 1
        if message.HasField("signed_intent"):
            intent_ack = await self._on_intent(message.signed_intent)
        else:
            # Not even looked at: only the headend's signature makes an intent actionable.
            log.warning(
                "intent refused: UNSIGNED (a bare document claiming v%d); gateways accept only "
                "signed intents",
                message.intent.version,
            )
            intent_ack = pb.IntentAck(
                site_id=self._site_id,
                version=message.intent.version,
                status=pb.INTENT_ACK_STATUS_REJECTED,
                reason="UNSIGNED: gateways accept only signed intents (SignedIntent)",
                rejection=pb.INTENT_REJECTION_UNSIGNED,
            )
        if intent_ack.rejection:
            name = rejection_name(intent_ack.rejection)
            rejections = self.health.intent_rejections
            rejections[name] = rejections.get(name, 0) + 1
        await self._transport.send(pb.UpMessage(intent_ack=intent_ack))

    async def _dispatch(self, message: pb.DownMessage, lanes: _Lanes) -> None:
        body = message.WhichOneof("body")
        if body == "ack":
            up_to = message.ack.up_to_seq
            ranges = [(r.first_seq, r.last_seq) for r in message.ack.ranges]
            try:
                await asyncio.to_thread(self._outbox.ack, up_to, ranges)
            except AckBeyondHeadError as exc:
                raise UplinkProtocolError(f"headend acknowledged seq {up_to}: {exc}") from exc
            lanes.settle(up_to, ranges)
            self.health.acked_seq = up_to
            self.health.last_ack_mono_ns = self._clock.mono_ns()
        elif body in ("signed_intent", "intent"):
            await self._handle_intent(message)
        elif body == "retry_after":
            raise RetryAfterError(message.retry_after.seconds, message.retry_after.reason)
        elif body == "register_ack":
            pass  # answer to a mid-session re-register (inventory change)
        else:
            log.warning("uplink: ignoring unknown down message %r", body)

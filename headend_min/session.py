"""What the headend does with each gateway message, whatever carried it (gRPC or MQTT).

`GatewaySessions` turns up messages into store calls and down messages; `link` (gRPC bidi stream)
and `mqtt_link` (MQTT v5 topics through a broker) only move bytes. Rules kept here, once:

* a record is acknowledged only after its batch is committed; an Ack carries the contiguous
  watermark and the committed ranges above it (the gateway's live lane runs ahead of its backlog);
* a new session is admitted by `Admission`, a token bucket: when a fleet reconnects at once (a
  headend restart), gateways beyond the bucket get `RetryAfter` with a slot reserved for them, which
  spreads them over time instead of a flood of registers and backlog resends;
* `RegisterAck.backlog_records_per_s` paces each gateway's backlog resend;
* intents go out signed for the gateway they are sent to (`intent_message`, at send time, with
  the headend's signing key); a gateway's refusal of one (IntentAck REJECTED with a
  `rejection`) is logged and stored with the check's name in its reason.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from dergw.v1 import pb, timestamp_from_ns
from dergw.v1.trust import rejection_name
from headend_min.clock import Clock
from headend_min.ingest import ProtocolViolation, plan_telemetry, registration_from_pb
from headend_min.metrics import SessionCounters
from headend_min.model import CommitResult, IntentAckInfo, RegisterOutcome, Registration, StreamRef
from headend_min.signing import DEFAULT_INTENT_VALIDITY_S, SigningKey, sign_intent
from headend_min.store import Store, StoreError

__all__ = ["Admission", "GatewaySessions", "RegisterResult", "ack_message"]

_log = logging.getLogger(__name__)

# An Ack lists at most this many committed ranges (there are rarely more than two: the live lane
# and the backlog); the rest follow in later Acks and in the next RegisterAck.
MAX_ACK_RANGES = 64
# An intent ack's reason is stored up to this many characters (a gateway's text, shown as is).
MAX_ACK_REASON_CHARS = 500


def _seq_ranges(ranges: tuple[tuple[int, int], ...]) -> list[pb.SeqRange]:
    return [pb.SeqRange(first_seq=first, last_seq=last) for first, last in ranges[:MAX_ACK_RANGES]]


def ack_message(result: CommitResult) -> pb.DownMessage:
    return pb.DownMessage(
        ack=pb.Ack(up_to_seq=result.committed_seq, ranges=_seq_ranges(result.committed_ranges))
    )


def _ack_status_name(status: int) -> str:
    """`persisted`, `stale`, `rejected` ... (`unknown` for a number this build lacks)."""
    try:
        name = pb.IntentAckStatus.Name(status)  # type: ignore[arg-type]
    except ValueError:
        return "unknown"
    return name.removeprefix("INTENT_ACK_STATUS_").lower()


class Admission:
    """Admission of new sessions: `rate_per_s` on average, bursts of `burst` (GCRA, the
    virtual-scheduling form of a token bucket).

    A refused gateway is given the next free slot and told to come back then (RetryAfter);
    the slot is reserved for it by its gateway id, so when it returns (at or after its slot,
    the gateway adds jitter) it is admitted without competing again. Without that reservation
    a storm of retries would take every new token before the promised gateways came back,
    and nobody would be admitted at all while the retries outpaced the rate. Refusals without
    a gateway id reserve a slot nobody can claim (they only spread the answers).
    """

    # A reservation not claimed this long after its slot is dropped (the gateway gave up).
    RESERVATION_TTL_S = 300.0

    def __init__(
        self,
        *,
        rate_per_s: float,
        burst: int,
        mono_ns: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("admission needs rate_per_s > 0 and burst >= 1")
        self._mono_ns = mono_ns
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._interval_ns = 1e9 / rate_per_s
        self._tolerance_ns = (burst - 1) * self._interval_ns
        # Theoretical arrival time: when the bucket is next empty of reservations (ns).
        self._tat_ns = float(mono_ns())
        # gateway_id -> the slot (mono ns) reserved for it.
        self._reserved: dict[str, float] = {}
        self.admitted = 0
        self.refused = 0

    @property
    def reservations(self) -> int:
        return len(self._reserved)

    def admit(self, gateway_id: str | None = None) -> int | None:
        """None when admitted now, else the number of seconds to wait before retrying."""
        now = float(self._mono_ns())
        if gateway_id is not None and (slot := self._reserved.get(gateway_id)) is not None:
            if now >= slot:
                del self._reserved[gateway_id]
                self.admitted += 1
                return None
            self.refused += 1
            return max(1, math.ceil((slot - now) / 1e9))
        tat = max(self._tat_ns, now)
        if tat - now <= self._tolerance_ns:
            self._tat_ns = tat + self._interval_ns
            self.admitted += 1
            return None
        slot = tat - self._tolerance_ns
        self._tat_ns = tat + self._interval_ns
        if gateway_id is not None:
            if len(self._reserved) >= 1024:
                self._drop_expired(now)
            self._reserved[gateway_id] = slot
        self.refused += 1
        return max(1, math.ceil((slot - now) / 1e9))

    def _drop_expired(self, now: float) -> None:
        horizon = now - self.RESERVATION_TTL_S * 1e9
        for gateway_id in [g for g, slot in self._reserved.items() if slot < horizon]:
            del self._reserved[gateway_id]


@dataclass(slots=True)
class RegisterResult:
    registration: Registration
    #: RegisterAck, or a single RetryAfter when the session was not admitted.
    replies: list[pb.DownMessage] = field(default_factory=list)
    outcome: RegisterOutcome | None = None

    @property
    def admitted(self) -> bool:
        return self.outcome is not None


class GatewaySessions:
    def __init__(
        self,
        store: Store,
        clock: Clock,
        *,
        signing_key: SigningKey,
        intent_validity_s: float = DEFAULT_INTENT_VALIDITY_S,
        admission: Admission | None = None,
        backlog_records_per_s: int = 0,
    ) -> None:
        self._store = store
        self._clock = clock
        self._signing_key = signing_key
        self._intent_validity_s = intent_validity_s
        self.admission = admission
        self._backlog_records_per_s = backlog_records_per_s
        self.counters = SessionCounters()  # read by GET /metrics
        # The newest intent document read per site, and the read in flight per site: shared by
        # the streams of a site when a post wakes them all (`latest_intent_after`).
        self._newest_intent: dict[str, pb.IntentDocument] = {}
        self._intent_reads: dict[str, asyncio.Task[pb.IntentDocument | None]] = {}

    @property
    def store(self) -> Store:
        return self._store

    def clock_wall_ns(self) -> int:
        """Wall-clock now (ns), from the headend's clock (tests inject a fake one)."""
        return self._clock.wall_ns()

    def parse_register(self, message: pb.Register) -> Registration:
        """Validate a Register (raises ProtocolViolation)."""
        return registration_from_pb(message)

    async def register(
        self, registration: Registration, stream: StreamRef, *, new_session: bool = True
    ) -> RegisterResult:
        """Admit (new sessions only) and store the registration; raises StoreError."""
        result = RegisterResult(registration)
        if new_session and self.admission is not None:
            retry_after_s = self.admission.admit(registration.gateway_id)
            if retry_after_s is not None:
                result.replies.append(
                    pb.DownMessage(
                        retry_after=pb.RetryAfter(
                            seconds=retry_after_s,
                            reason="headend busy admitting reconnecting gateways",
                        )
                    )
                )
                return result
        now_ns = self._clock.wall_ns()
        outcome = await self._store.register_gateway(registration, stream, now_ns)
        result.outcome = outcome
        result.replies.append(
            pb.DownMessage(
                register_ack=pb.RegisterAck(
                    committed_seq=outcome.committed_seq,
                    intent_version=outcome.site_intent_version,
                    server_time=timestamp_from_ns(now_ns),
                    committed_ranges=_seq_ranges(outcome.committed_ranges),
                    backlog_records_per_s=self._backlog_records_per_s,
                )
            )
        )
        return result

    async def telemetry(self, gateway_id: str, batch: pb.TelemetryBatch) -> pb.DownMessage:
        """Commit one batch, then return its Ack. Raises ProtocolViolation or StoreError."""
        rows = plan_telemetry(batch, gateway_id)
        result = await self._store.commit_telemetry(rows, self._clock.wall_ns())
        self.counters.telemetry_batches += 1
        self.counters.telemetry_records += len(batch.records)
        return ack_message(result)

    async def intent_ack(self, gateway_id: str, site_id: str, ack: pb.IntentAck) -> None:
        if ack.site_id != site_id:
            raise ProtocolViolation(
                f"intent_ack names site {ack.site_id!r} but gateway {gateway_id!r} registered "
                f"site {site_id!r}"
            )
        reason = ack.reason
        if ack.status == pb.INTENT_ACK_STATUS_REJECTED and ack.rejection:
            # Refused at signature verification: the reason names the check that failed
            # (e.g. "BAD_SIGNATURE: ..."), so the API's intent progress shows it as is.
            name = rejection_name(ack.rejection)
            reason = f"{name}: {ack.reason}" if not ack.reason.startswith(name) else ack.reason
            _log.warning(
                "gateway %s refused signed intent v%d: %s", gateway_id, ack.version, reason
            )
        await self._store.record_intent_ack(
            gateway_id,
            IntentAckInfo(ack.site_id, ack.version, ack.status, reason[:MAX_ACK_REASON_CHARS]),
            self._clock.wall_ns(),
        )
        self.counters.intent_acks[_ack_status_name(ack.status)] += 1

    def intent_message(self, gateway_id: str, document: pb.IntentDocument) -> pb.DownMessage:
        """`document` signed for `gateway_id` now (gateways accept only signed intents)."""
        signed = sign_intent(
            document,
            gateway_id=gateway_id,
            key=self._signing_key,
            now_ns=self._clock.wall_ns(),
            validity_s=self._intent_validity_s,
        )
        return pb.DownMessage(signed_intent=signed)

    async def latest_intent_after(
        self, site_id: str, version: int, *, known: int = 0
    ) -> pb.IntentDocument | None:
        """The site's newest document if it is newer than `version` (always the newest: versions
        posted in a burst collapse into one send).

        `known` is a version the caller knows is stored (the one it was notified of, or the
        registration's latest). A document at least that new, read for another stream of the
        site, is reused: one post to a site with thousands of streams costs one store read, not
        one per stream. Without `known` the store is always read.
        """
        if known <= 0:
            document = await self._read_intent(site_id)
        else:
            document = self._newest_intent.get(site_id)
            if document is None or document.version < known:
                document = await self._shared_intent_read(site_id)
                if document is None or document.version < known:
                    # The shared read began before `known` was stored: read it alone.
                    document = await self._read_intent(site_id)
        if document is None or document.version <= version:
            return None
        return document

    async def _read_intent(self, site_id: str) -> pb.IntentDocument | None:
        stored = await self._store.get_intent(site_id)
        if stored is None:
            return None
        newest = self._newest_intent.get(site_id)
        if newest is None or newest.version < stored.version:
            self._newest_intent[site_id] = stored.document
        return stored.document

    async def _shared_intent_read(self, site_id: str) -> pb.IntentDocument | None:
        """Join the site's read in flight, or start one (its waiters share the answer)."""
        read = self._intent_reads.get(site_id)
        if read is None:
            read = asyncio.create_task(self._read_intent(site_id))
            self._intent_reads[site_id] = read
            read.add_done_callback(functools.partial(self._intent_read_done, site_id))
        # Shielded: one waiter's stream ending must not cancel the read the others wait on.
        return await asyncio.shield(read)

    def _intent_read_done(self, site_id: str, read: asyncio.Task[pb.IntentDocument | None]) -> None:
        if self._intent_reads.get(site_id) is read:
            del self._intent_reads[site_id]
        if not read.cancelled():
            read.exception()  # retrieved here too: every waiter may have gone

    async def record_delivery(self, gateway_id: str, document: pb.IntentDocument) -> None:
        try:
            await self._store.record_intent_delivery(
                gateway_id, document.site_id, document.version, self._clock.wall_ns()
            )
        except StoreError:
            # Delivery bookkeeping is informational; the gateway's ack is what counts.
            _log.warning("could not record delivery of v%d to %s", document.version, gateway_id)

    async def close_stream(self, stream: StreamRef) -> None:
        try:
            await self._store.close_stream(stream, self._clock.wall_ns())
        except StoreError:
            # The row then goes stale and reads offline after 2 x keepalive anyway.
            _log.warning("could not record that the stream of %s closed", stream.gateway_id)
        _log.info("gateway %s disconnected", stream.gateway_id)

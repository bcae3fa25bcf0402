"""The gateway link: gRPC `dergw.v1.GatewayLink/Connect`, one bidi stream per gateway.

Per stream: the first message must be `register` (inventory and presence are stored, then a
RegisterAck, then the site's latest intent document if the gateway holds an older one); a later
`register` on the same stream (same gateway and site) updates the inventory. After
that, three things run concurrently and meet in one bounded outbox that the RPC drains:

* the reader commits each telemetry batch and only then queues `Ack(up_to_seq=last_seq)`, and
  records intent acks;
* the intent pusher waits on the `Notifier` and queues the newest document of the site, signed
  for this gateway (`GatewaySessions.intent_message`);
* the RPC itself yields queued messages and records which intent versions went out.

The only in-memory state is which streams are open on this process (transport state that
reconnecting gateways rebuild); presence is written to the store on every message and refreshed
every `presence_interval_s` while a stream is open.

Identity under mTLS (headend started with a TLS directory): who the gateway is comes from its
verified client certificate (`grpc_tls.peer_certificate`), not from the Register. A Register
naming another gateway or another site than the certificate is refused with PERMISSION_DENIED
(counted in `identity_refusals`). The presence loop also re-checks each open stream's
certificate against `is_revoked` and ends the stream of a revoked one with PERMISSION_DENIED
(the interceptor refuses it at connect from then on). Without TLS there is no peer certificate
and the Register is taken at its word (local development).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import grpc

from dergw.v1 import dergw_pb2_grpc, pb
from headend_min.clock import Clock
from headend_min.grpc_tls import peer_certificate, peer_site_id
from headend_min.ingest import ProtocolViolation
from headend_min.model import StreamRef
from headend_min.notify import IntentSubscription, Notifier
from headend_min.session import GatewaySessions
from headend_min.store import StoreError

__all__ = ["GatewayLinkService"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _End:
    """Ends the RPC: with OK when `code` is None, else with that status and details."""

    code: grpc.StatusCode | None
    details: str = ""


@dataclass(frozen=True, slots=True)
class _IntentOut:
    """A signed intent to send, with the document it carries (its delivery is recorded)."""

    message: pb.DownMessage
    document: pb.IntentDocument


@dataclass(slots=True)
class _Session:
    stream: StreamRef
    site_id: str
    outbox: asyncio.Queue[pb.DownMessage | _IntentOut | _End]
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    certificate_serial: str | None = None  # of the client certificate (None without mTLS)

    def end(self, code: grpc.StatusCode, details: str) -> None:
        """End the stream from outside (replaced, shutting down); queued messages are dropped,
        which is safe: unacked records are resent and intents are re-sent on reconnect."""
        for task in self.tasks:
            task.cancel()
        while not self.outbox.empty():
            self.outbox.get_nowait()
        self.outbox.put_nowait(_End(code, details))


class GatewayLinkService(dergw_pb2_grpc.GatewayLinkServicer):
    def __init__(
        self,
        sessions: GatewaySessions,
        notifier: Notifier,
        clock: Clock,
        *,
        presence_interval_s: float,
        register_timeout_s: float = 30.0,
        outbox_size: int = 32,
        is_revoked: Callable[[str, str], Awaitable[bool]] | None = None,
    ) -> None:
        self._sessions_ops = sessions
        self._store = sessions.store
        self._notifier = notifier
        self._clock = clock
        self._presence_interval_s = presence_interval_s
        self._register_timeout_s = register_timeout_s
        self._outbox_size = outbox_size
        self._is_revoked = is_revoked
        # Registers refused because they named another gateway or site than the certificate.
        self.identity_refusals = 0
        # Open streams ended because their certificate was revoked.
        self.revoked_streams_ended = 0
        # gateway_id -> its open stream on this process.
        self._sessions: dict[str, _Session] = {}
        # Store updates of ended streams still in flight (strong references).
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def open_streams(self) -> int:
        return len(self._sessions)

    async def Connect(
        self,
        request_iterator: AsyncIterator[pb.UpMessage],
        context: grpc.aio.ServicerContext[pb.UpMessage, pb.DownMessage],
    ) -> AsyncIterator[pb.DownMessage]:
        requests = aiter(request_iterator)
        try:
            async with asyncio.timeout(self._register_timeout_s):
                first = await anext(requests, None)
        except TimeoutError:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"no `register` within {self._register_timeout_s:g} s of opening the stream",
            )
        if first is None:
            return
        if first.WhichOneof("body") != "register":
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "the first message on a GatewayLink stream must be `register`, got "
                f"`{first.WhichOneof('body') or 'an empty UpMessage'}`",
            )
        try:
            registration = self._sessions_ops.parse_register(first.register)
        except ProtocolViolation as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"invalid register: {exc}")

        site_id = registration.site.site_id
        peer = peer_certificate(context)
        if peer is not None:
            refusal = _identity_refusal(
                peer.gateway_id, peer_site_id(context), registration.gateway_id, site_id
            )
            if refusal is not None:
                self.identity_refusals += 1
                _log.warning("refused register: %s", refusal)
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, refusal)
        stream = StreamRef(registration.gateway_id, uuid.uuid4().hex)
        session = _Session(
            stream,
            site_id,
            asyncio.Queue(self._outbox_size),
            certificate_serial=peer.serial if peer is not None else None,
        )
        # Subscribe before the registration reads the site's latest version: a version posted
        # in between is then both in the subscription and (harmlessly) possibly in the read.
        async with self._notifier.subscribe(site_id) as versions:
            try:
                try:
                    result = await self._sessions_ops.register(registration, stream)
                except StoreError:
                    _log.exception("register of %s failed", registration.gateway_id)
                    await context.abort(
                        grpc.StatusCode.UNAVAILABLE, "headend storage error during register; retry"
                    )
                if result.outcome is None:
                    # Not admitted now: the RetryAfter says when; ending the stream OK is part of
                    # the answer (the gateway closes its session and waits).
                    for reply in result.replies:
                        yield reply
                    return
                outcome = result.outcome
                self._adopt(session)
                _log.info(
                    "gateway %s (site %s) connected: committed_seq=%d, holds v%d, latest v%d",
                    stream.gateway_id,
                    site_id,
                    outcome.committed_seq,
                    registration.intent_version,
                    outcome.site_intent_version,
                )
                for reply in result.replies:
                    yield reply
                session.tasks.append(asyncio.create_task(self._read(session, requests)))
                session.tasks.append(
                    asyncio.create_task(
                        self._push_intents(
                            session,
                            versions,
                            held_version=registration.intent_version,
                            latest_version=outcome.site_intent_version,
                        )
                    )
                )
                while True:
                    item = await session.outbox.get()
                    if isinstance(item, _End):
                        if item.code is None:
                            return
                        await context.abort(item.code, item.details)
                    if isinstance(item, _IntentOut):
                        yield item.message
                        await self._record_delivery(stream, item.document)
                    else:
                        yield item
            finally:
                # Also when cancelled mid-register: the row then reads closed, not stale-open.
                await self._finish(session)

    def _adopt(self, session: _Session) -> None:
        gateway_id = session.stream.gateway_id
        previous = self._sessions.get(gateway_id)
        self._sessions[gateway_id] = session
        if previous is not None:
            # The older stream is most likely half-open (the gateway reconnected after a network
            # blip); ending it stops duplicate intent pushes to the same gateway.
            previous.end(
                grpc.StatusCode.ABORTED,
                f"replaced by a newer stream of gateway {gateway_id!r}",
            )

    async def _finish(self, session: _Session) -> None:
        # gRPC may cancel the RPC task again while this runs (the client's cancel arrives after
        # its EOF), so the bookkeeping is synchronous and the store update runs as its own task.
        for task in session.tasks:
            task.cancel()
        gateway_id = session.stream.gateway_id
        if self._sessions.get(gateway_id) is session:
            del self._sessions[gateway_id]
        closing = asyncio.create_task(self._close_stream(session.stream))
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)
        await asyncio.gather(*session.tasks, return_exceptions=True)
        await asyncio.shield(closing)

    async def _close_stream(self, stream: StreamRef) -> None:
        await self._sessions_ops.close_stream(stream)

    async def wait_closed(self) -> None:
        """Wait until every ended stream has been recorded as closed (before closing the store)."""
        while pending := [task for task in self._closing if not task.done()]:
            await asyncio.gather(*pending, return_exceptions=True)

    async def _record_delivery(self, stream: StreamRef, document: pb.IntentDocument) -> None:
        await self._sessions_ops.record_delivery(stream.gateway_id, document)

    async def _read(self, session: _Session, requests: AsyncIterator[pb.UpMessage]) -> None:
        end = _End(None)
        try:
            async for message in requests:
                await self._handle(session, message)
        except ProtocolViolation as exc:
            end = _End(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except StoreError:
            _log.exception("storage failed for gateway %s", session.stream.gateway_id)
            end = _End(
                grpc.StatusCode.UNAVAILABLE,
                "headend storage error; reconnect and resend unacked records",
            )
        except Exception:
            # Task boundary: without this a bug here would leave the RPC waiting forever.
            _log.exception("unexpected error on the stream of %s", session.stream.gateway_id)
            end = _End(grpc.StatusCode.INTERNAL, "headend error; see the headend log")
        await session.outbox.put(end)

    async def _handle(self, session: _Session, message: pb.UpMessage) -> None:
        kind = message.WhichOneof("body")
        gateway_id = session.stream.gateway_id
        if kind == "telemetry":
            # Acked only once the batch is committed (GatewaySessions.telemetry).
            ack = await self._sessions_ops.telemetry(gateway_id, message.telemetry)
            await session.outbox.put(ack)
        elif kind == "intent_ack":
            await self._sessions_ops.intent_ack(gateway_id, session.site_id, message.intent_ack)
        elif kind == "register":
            # A re-register on an open stream updates the inventory (a device the gateway
            # discovered after connecting); identity and site cannot change on a stream.
            registration = self._sessions_ops.parse_register(message.register)
            if (
                registration.gateway_id != gateway_id
                or registration.site.site_id != session.site_id
            ):
                raise ProtocolViolation(
                    "a `register` on an open stream must keep its gateway id and site "
                    f"({gateway_id!r}, {session.site_id!r}); open a new stream to change them"
                )
            result = await self._sessions_ops.register(
                registration, session.stream, new_session=False
            )
            for reply in result.replies:
                await session.outbox.put(reply)
        else:
            # A message kind added to v1 after this headend was built: additive, so ignore it.
            _log.debug("ignoring an UpMessage without a known body from %s", gateway_id)

    async def _push_intents(
        self,
        session: _Session,
        versions: IntentSubscription,
        *,
        held_version: int,
        latest_version: int,
    ) -> None:
        sent_version = held_version
        try:
            if latest_version > sent_version:
                sent_version = await self._queue_latest_intent(
                    session, sent_version, known=latest_version
                )
            async for version in versions:
                if version > sent_version:
                    sent_version = await self._queue_latest_intent(
                        session, sent_version, known=version
                    )
        except StoreError:
            _log.exception("intent push to %s failed", session.stream.gateway_id)
            await session.outbox.put(
                _End(grpc.StatusCode.UNAVAILABLE, "headend storage error; reconnect")
            )
        except Exception:
            _log.exception("unexpected error pushing intents to %s", session.stream.gateway_id)
            await session.outbox.put(_End(grpc.StatusCode.INTERNAL, "headend error; see its log"))

    async def _queue_latest_intent(
        self, session: _Session, sent_version: int, *, known: int
    ) -> int:
        document = await self._sessions_ops.latest_intent_after(
            session.site_id, sent_version, known=known
        )
        if document is None:
            return sent_version
        message = self._sessions_ops.intent_message(session.stream.gateway_id, document)
        await session.outbox.put(_IntentOut(message, document))
        return document.version

    async def run_presence(self) -> None:
        """Refresh last_seen of every open stream and end revoked ones, forever (cancel to
        stop)."""
        while True:
            await asyncio.sleep(self._presence_interval_s)
            streams = [session.stream for session in self._sessions.values()]
            try:
                await self._store.touch_streams(streams, self._clock.wall_ns())
            except StoreError:
                _log.exception("presence refresh failed for %d streams", len(streams))
            await self.end_revoked()

    async def end_revoked(self) -> int:
        """End the open streams whose client certificate is revoked; returns how many."""
        if self._is_revoked is None:
            return 0
        ended = 0
        for session in list(self._sessions.values()):
            serial = session.certificate_serial
            gateway_id = session.stream.gateway_id
            if serial is None:
                continue
            try:
                revoked = await self._is_revoked(gateway_id, serial)
            except Exception:
                # The revocation list is unreadable now: keep the stream, check again next time.
                _log.exception("revocation check failed for %s", gateway_id)
                continue
            if revoked and self._sessions.get(gateway_id) is session:
                _log.warning("ending the stream of %s: certificate %s revoked", gateway_id, serial)
                session.end(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"revoked: certificate {serial} of gateway {gateway_id} is revoked; "
                    "an admin must issue a new enrollment token",
                )
                ended += 1
        self.revoked_streams_ended += ended
        return ended

    def end_all(self, details: str) -> None:
        """Ask every open stream to end with UNAVAILABLE (gateways reconnect elsewhere)."""
        for session in list(self._sessions.values()):
            session.end(grpc.StatusCode.UNAVAILABLE, details)


def _identity_refusal(
    cert_gateway_id: str, cert_site_id: str | None, gateway_id: str, site_id: str
) -> str | None:
    """Why a Register does not match the client certificate (None: it matches)."""
    if gateway_id != cert_gateway_id:
        return (
            f"the client certificate is issued to gateway {cert_gateway_id!r}, the register "
            f"names gateway {gateway_id!r}; a gateway registers under its certificate's id "
            "(fix [gateway] id or enroll this gateway with its own token)"
        )
    if cert_site_id is not None and site_id != cert_site_id:
        return (
            f"gateway {gateway_id!r} is enrolled at site {cert_site_id!r}, the register names "
            f"site {site_id!r}; revoke it and enroll it again for the new site"
        )
    return None

"""The gRPC uplink transport: one bidi stream (`dergw.v1.GatewayLink/Connect`) to the headend.

The client is grpclib (pure Python, asyncio, HTTP/2 by h2: ~3 MB resident) rather than grpcio
(~17 MB), to keep the gateway within its memory budget; the headend serves with grpcio, and
both speak standard gRPC over HTTP/2 (plaintext, or mTLS with ALPN "h2"). Its own module so
that grpclib is imported only by a gateway whose config names the gRPC uplink
(`gateway.runtime.uplink.create_transport`).

Message bounds (`MAX_MESSAGE_BYTES`, the wire contract's): an incoming message's length is read
from its 5-byte gRPC prefix and refused (RESOURCE_EXHAUSTED, the stream is dropped) before its
body is read; an outgoing one is refused after encoding, before it is written. grpclib itself
bounds neither (it would buffer whatever length the prefix announces).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct
from collections.abc import Callable
from typing import Any, cast

from google.protobuf.message import DecodeError
from grpclib.client import Channel, Stream
from grpclib.config import Configuration
from grpclib.const import Cardinality, Status
from grpclib.encoding.proto import ProtoCodec
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError
from multidict import MultiDict

from dergw.v1 import MAX_MESSAGE_BYTES, pb
from gateway.identity import Identity
from gateway.runtime.transport import TransportClosedError

__all__ = ["CONNECT_METHOD", "GRPC_ERRORS", "GrpcTransport"]

# "/dergw.v1.GatewayLink/Connect", from the generated descriptor (no grpclib stubs needed).
CONNECT_METHOD = "/{}/Connect".format(pb.DESCRIPTOR.services_by_name["GatewayLink"].full_name)
# What a failed call raises besides OSError (ssl.SSLError included) and TimeoutError.
GRPC_ERRORS: tuple[type[Exception], ...] = (GRPCError, StreamTerminatedError, ProtocolError)
# Opening the connection (TCP, TLS handshake, request headers) gives up after this long.
CONNECT_TIMEOUT_S = 10.0

_PREFIX = struct.Struct(">?I")  # gRPC length-prefixed message: compressed flag, length


class _BoundedCodec(ProtoCodec):
    """Protobuf codec that refuses to send a message above `MAX_MESSAGE_BYTES` and reports an
    undecodable one as a gRPC error (ending the session) instead of a DecodeError."""

    def encode(self, message: Any, message_type: Any) -> bytes:
        data = super().encode(message, message_type)
        if len(data) > MAX_MESSAGE_BYTES:
            raise GRPCError(
                Status.RESOURCE_EXHAUSTED,
                f"an UpMessage of {len(data)} bytes exceeds MAX_MESSAGE_BYTES "
                f"({MAX_MESSAGE_BYTES}); send smaller batches",
            )
        return data

    def decode(self, data: bytes, message_type: Any) -> Any:
        try:
            return super().decode(data, message_type)
        except DecodeError as exc:
            raise GRPCError(Status.INTERNAL, f"undecodable DownMessage: {exc}") from None


class _BoundedStream(Stream[pb.UpMessage, pb.DownMessage]):
    """grpclib's client stream, with a receive that checks the announced length first.

    grpclib's own `recv_message` reads as many bytes as the prefix announces before anything
    can look at them; this one reads the 5-byte prefix, refuses a length above
    `MAX_MESSAGE_BYTES`, then reads the body (same grpclib 0.4 stream internals)."""

    async def recv_message(self) -> pb.DownMessage | None:
        if not self._recv_initial_metadata_done:
            await self.recv_initial_metadata()
        with self._wrapper:
            prefix = await self._stream.recv_data(_PREFIX.size)
            if not prefix:
                return None  # the headend ended its side; the status is in the trailers
            compressed, length = _PREFIX.unpack(prefix)
            if compressed:
                raise GRPCError(Status.INTERNAL, "compressed messages are not supported")
            if length > MAX_MESSAGE_BYTES:
                raise GRPCError(
                    Status.RESOURCE_EXHAUSTED,
                    f"the headend announced a {length}-byte DownMessage, more than "
                    f"MAX_MESSAGE_BYTES ({MAX_MESSAGE_BYTES}); not read",
                )
            message: pb.DownMessage = self._codec.decode(
                await self._stream.recv_data(length), pb.DownMessage
            )
            self._messages_received += 1
            return message


def _host_port(target: str) -> tuple[str, int]:
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"gRPC target {target!r} is not host:port (e.g. 127.0.0.1:50051)")
    return host.strip("[]"), int(port)


def _closed(stream: _BoundedStream, exc: Exception) -> TransportClosedError:
    """The error a failed call ends the session with: "STATUS: details" when the headend sent
    a status, else what broke."""
    if isinstance(exc, StreamTerminatedError):
        # grpcio follows its trailers with RST_STREAM while our side is open; grpclib then
        # reports the reset, the status sits in the trailers it received (its own __aexit__
        # looks there too).
        try:
            stream._maybe_raise()
        except GRPCError as status:
            exc = status
        except Exception:  # no headers or trailers to look at: keep the reset
            pass
    if isinstance(exc, GRPCError):
        return TransportClosedError(f"{exc.status.name}: {exc.message or 'no details'}")
    return TransportClosedError(f"{type(exc).__name__}: {exc}")


class GrpcTransport:
    """`UplinkTransport` over one gRPC bidi stream (`dergw.v1.GatewayLink/Connect`)."""

    name = "grpc"

    def __init__(
        self,
        target: str,
        *,
        keepalive_s: float,
        identity: Callable[[], Identity] | None = None,
    ) -> None:
        self.target = target
        self._host, self._port = _host_port(target)
        self._keepalive_s = keepalive_s
        # None: plaintext (local development); else called per connect (renewals change it).
        self._identity = identity
        self._channel: Channel | None = None
        self._stream: _BoundedStream | None = None
        self._write_lock = asyncio.Lock()

    def _config(self) -> Configuration:
        # The same keepalive as the headend's grpc_channel_options: a ping every keepalive_s,
        # also while idle, and the connection dropped when one goes unanswered.
        keepalive = self._keepalive_s
        return Configuration(
            _keepalive_time=keepalive,
            _keepalive_timeout=max(1.0, keepalive / 2),
            _keepalive_permit_without_calls=True,
            _http2_max_pings_without_data=0,
            _http2_min_sent_ping_interval_without_data=max(1.0, keepalive / 2),
        )

    def _ssl_context(self) -> ssl.SSLContext | None:
        if self._identity is None:
            return None
        # Trusts the headend CA and presents our certificate (the same context as MQTT's);
        # the server name checked is the target's host (in the headend certificate's SANs).
        context = self._identity().ssl_context()
        context.set_alpn_protocols(["h2"])
        return context

    async def connect(self) -> None:
        await self.close()
        codec = _BoundedCodec()
        channel = Channel(
            self._host, self._port, ssl=self._ssl_context(), codec=codec, config=self._config()
        )
        self._channel = channel
        stream = _BoundedStream(
            channel,
            CONNECT_METHOD,
            cast(Any, MultiDict()),  # no request metadata
            Cardinality.STREAM_STREAM,
            pb.UpMessage,
            pb.DownMessage,
            codec=codec,
            status_details_codec=None,
            dispatch=channel.__dispatch__,
        )
        await stream.__aenter__()
        self._stream = stream
        # Dial now (TCP, TLS handshake, request headers): a dead headend or a refused
        # certificate shows here or on the first read.
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                await stream.send_request()
        except GRPC_ERRORS as exc:
            raise _closed(stream, exc) from exc

    def _require_stream(self) -> _BoundedStream:
        if self._stream is None:
            raise TransportClosedError("gRPC stream is not open")
        return self._stream

    async def send(self, message: pb.UpMessage) -> None:
        stream = self._require_stream()
        try:
            async with self._write_lock:
                await stream.send_message(message)
        except GRPC_ERRORS as exc:
            raise _closed(stream, exc) from exc

    async def receive(self) -> pb.DownMessage:
        stream = self._require_stream()
        try:
            message = await stream.recv_message()
            if message is None:
                # The headend ended the call: its status (e.g. PERMISSION_DENIED) is in the
                # trailers, read once our side is ended too.
                with contextlib.suppress(*GRPC_ERRORS, OSError):
                    await stream.end()
                await stream.recv_trailing_metadata()
        except GRPC_ERRORS as exc:
            raise _closed(stream, exc) from exc
        if message is None:
            raise TransportClosedError("headend closed the stream")
        return message

    async def close(self) -> None:
        stream, self._stream = self._stream, None
        channel, self._channel = self._channel, None
        # The connection first: that ends the stream too, and wakes a pending receive() or
        # send() (they raise TransportClosedError: "Connection closed").
        if channel is not None:
            channel.close()
        if stream is not None:
            # Exiting with an error never waits for the headend; it releases the stream.
            closed = TransportClosedError("gRPC transport closed")
            with contextlib.suppress(Exception):
                await stream.__aexit__(TransportClosedError, closed, None)

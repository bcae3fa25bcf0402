"""The gRPC uplink transport: one bidi stream (`dergw.v1.GatewayLink/Connect`) to the headend.

Its own module so that grpc (~12 MB resident) is imported only by a gateway whose config names
the gRPC uplink (`gateway.runtime.uplink.create_transport`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc

from dergw.v1 import grpc_channel_options, pb
from dergw.v1.dergw_pb2_grpc import GatewayLinkStub
from gateway.grpc_tls import channel_credentials
from gateway.identity import Identity
from gateway.runtime.transport import TransportClosedError

__all__ = ["GrpcTransport"]


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
        self._keepalive_s = keepalive_s
        # None: plaintext (local development); else called per connect (renewals change it).
        self._identity = identity
        self._channel: grpc.aio.Channel | None = None
        self._call: grpc.aio.StreamStreamCall[pb.UpMessage, pb.DownMessage] | None = None
        self._write_lock = asyncio.Lock()

    async def connect(self) -> None:
        options = grpc_channel_options(keepalive_s=self._keepalive_s)
        if self._identity is None:
            self._channel = grpc.aio.insecure_channel(self.target, options=options)
        else:
            # The server name checked is the target's host (in the headend certificate's SANs).
            credentials = channel_credentials(self._identity())
            self._channel = grpc.aio.secure_channel(self.target, credentials, options=options)
        # No request iterator: this side writes with call.write() (reader/writer style). A dead
        # headend shows up as an error on the first write or read.
        self._call = GatewayLinkStub(self._channel).Connect(None)

    def _require_call(self) -> grpc.aio.StreamStreamCall[pb.UpMessage, pb.DownMessage]:
        if self._call is None:
            raise TransportClosedError("gRPC stream is not open")
        return self._call

    async def send(self, message: pb.UpMessage) -> None:
        call = self._require_call()
        try:
            async with self._write_lock:
                await call.write(message)
        except grpc.aio.AioRpcError as exc:
            raise TransportClosedError(f"{exc.code().name}: {exc.details()}") from exc
        except asyncio.InvalidStateError as exc:  # written after the RPC ended
            raise TransportClosedError("gRPC stream already ended") from exc

    async def receive(self) -> pb.DownMessage:
        call = self._require_call()
        try:
            message = await call.read()
        except grpc.aio.AioRpcError as exc:
            raise TransportClosedError(f"{exc.code().name}: {exc.details()}") from exc
        if not isinstance(message, pb.DownMessage):  # grpc.aio.EOF
            raise TransportClosedError("headend closed the stream")
        return message

    async def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
            self._call = None
        if self._channel is not None:
            await self._channel.close(None)
            self._channel = None

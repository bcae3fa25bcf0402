"""The uplink's transport contract: how one session's messages get to and from the headend.

The session logic (register, reconcile with what the headend committed, drain the outbox in two
lanes, apply acks, persist intents before acknowledging them) lives in `gateway.runtime.uplink`
and is the same for every transport. A transport only moves `dergw.v1` messages: gRPC carries
them on one bidi stream, MQTT v5 on per-direction topics. Every transport dials out; the gateway
never listens.

Lifecycle per session: `connect()`, then any number of `send()` / `receive()`, then `close()`
(always called, also after a failed `connect()`). A transport object may be reused for the next
session (MQTT keeps its persistent broker session across them).
"""

from __future__ import annotations

from typing import Protocol

from dergw.v1 import pb

__all__ = ["TransportClosedError", "UplinkTransport"]


class TransportClosedError(ConnectionError):
    """The connection to the headend (or broker) is gone; the session ends and is retried."""


class UplinkTransport(Protocol):
    #: "grpc" or "mqtt", for health and logs.
    name: str
    #: Where it connects, for health and logs (e.g. "127.0.0.1:50051", "mqtt://host:1883").
    target: str

    async def connect(self) -> None:
        """Open the connection. Raises ConnectionError, OSError or TimeoutError on failure."""
        ...

    async def send(self, message: pb.UpMessage) -> None:
        """Queue one message for the headend. Raises TransportClosedError when the connection is
        gone. Delivery is not confirmed here: records count as delivered only when an Ack for
        them arrives, so a message lost with a broken connection is simply sent again."""
        ...

    async def receive(self) -> pb.DownMessage:
        """The next message from the headend. Raises TransportClosedError when the connection is
        gone (or was closed)."""
        ...

    async def close(self) -> None:
        """Release the connection; pending receive() calls raise TransportClosedError."""
        ...

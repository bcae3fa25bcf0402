"""A fault-injecting TCP relay for OPC UA (UA-TCP / UA SecureConversation framing), for HIL tests.

asyncua's server always answers well-formed messages, so a test that needs a broken OPC UA stream
puts this relay between the client and the server (`hil.opcua_sim.OpcUaBatterySim` or any other
endpoint) and points the client at `relay.url(path)`:

    async with OpcUaFaultRelay(sim.host, sim.port) as relay:
        driver = OpcUaDriver(..., OpcUaParams(url=relay.url("/dergw-sim/"), ...))

The relay reassembles whole UA-TCP messages in both directions (8-byte header: 3-byte message
type, chunk type, UInt32 message size), so faults act on message boundaries:

  * `make_malformed("body")`: every server message reaches the client with one octet of its last
    block flipped (signature / encrypted padding under Sign or SignAndEncrypt: the client rejects
    the chunk and drops the channel);
  * `make_malformed("header")`: every server message gets the message type `XXX` (no such UA-TCP
    message: rejected whatever the security mode);
  * `make_silent()`: whole messages are dropped both ways (the client's requests time out; the
    framing stays intact, so `restore()` resumes a consistent stream);
  * `restore()`: messages pass unchanged again; `drop_connections()` closes every relayed
    connection (a cable pulled); `break_stream()` = make_malformed + wait until a client that
    received a corrupted message has hung up.

A message header that does not parse (size < 8 or above `max_message_size`) is not OPC UA: the
relay forwards the rest of that connection's bytes unframed.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import struct
import time
from typing import Literal

__all__ = ["OpcUaFaultRelay", "RelayFault"]

_HEADER = struct.Struct("<3scI")
_BAD_TYPE = b"XXX"


class RelayFault(enum.Enum):
    NONE = "none"
    SILENT = "silent"
    MALFORMED_BODY = "malformed-body"
    MALFORMED_HEADER = "malformed-header"


class _Conn:
    __slots__ = ("corrupted", "writers")

    def __init__(self, writers: tuple[asyncio.StreamWriter, asyncio.StreamWriter]) -> None:
        self.writers = writers
        self.corrupted = 0  # server messages corrupted on this connection


class OpcUaFaultRelay:
    """Relays `host:port` -> `target_host:target_port`, message by message, injecting faults."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        max_message_size: int = 16 * 1024 * 1024,
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.host = host
        self._want_port = port
        self._port = 0
        self.max_message_size = max_message_size
        self.fault = RelayFault.NONE
        self._server: asyncio.Server | None = None
        self._conns: set[_Conn] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.connections = 0  # accepted in total
        self.messages_relayed = 0  # both directions
        self.messages_corrupted = 0
        self.messages_dropped = 0
        self.broken_connections = 0  # closed after receiving a corrupted message

    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError("relay not started")
        return self._port

    def url(self, path: str = "/") -> str:
        return f"opc.tcp://{self.host}:{self.port}{path if path.startswith('/') else '/' + path}"

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, self._want_port)
        self._port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        self.drop_connections()
        # Closed sockets end the pumps; cancel only what is still running after that (a cancelled
        # start_server handler makes asyncio log a spurious error).
        tasks = list(self._tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=1.0)
            for task in pending:
                task.cancel()
            for task in pending:
                with contextlib.suppress(BaseException):
                    await task
        if server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)

    async def __aenter__(self) -> OpcUaFaultRelay:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # --- faults -------------------------------------------------------------------------------

    def make_silent(self) -> None:
        self.fault = RelayFault.SILENT

    def make_malformed(self, where: Literal["body", "header"] = "body") -> None:
        self.fault = RelayFault.MALFORMED_BODY if where == "body" else RelayFault.MALFORMED_HEADER

    def restore(self) -> None:
        self.fault = RelayFault.NONE

    def drop_connections(self) -> None:
        for conn in list(self._conns):
            for w in conn.writers:
                w.close()

    async def break_stream(
        self, where: Literal["body", "header"] = "body", *, timeout_s: float = 5.0
    ) -> None:
        """make_malformed(where), then wait until a client hung up on a corrupted message."""
        before = self.broken_connections
        self.make_malformed(where)
        deadline = time.monotonic() + timeout_s
        while self.broken_connections == before:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"no client dropped its connection within {timeout_s:g} s of corrupted "
                    f"messages ({self.messages_corrupted} corrupted so far)"
                )
            await asyncio.sleep(0.02)

    # --- relaying -----------------------------------------------------------------------------

    async def _accept(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await self._relay(cr, cw)
        finally:
            if task is not None:
                self._tasks.discard(task)

    async def _relay(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            ur, uw = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            cw.close()  # the server is down: the client sees the connection refused/closed
            return
        conn = _Conn((cw, uw))
        self._conns.add(conn)
        try:
            await asyncio.gather(
                self._pump(cr, uw, conn, to_client=False),
                self._pump(ur, cw, conn, to_client=True),
            )
        finally:
            self._conns.discard(conn)
            if conn.corrupted:
                self.broken_connections += 1

    async def _pump(
        self, r: asyncio.StreamReader, w: asyncio.StreamWriter, conn: _Conn, *, to_client: bool
    ) -> None:
        buf = bytearray()
        framed = True
        try:
            while data := await r.read(65536):
                if not framed:
                    if self.fault is not RelayFault.SILENT:
                        w.write(data)
                        await w.drain()
                    continue
                buf += data
                while len(buf) >= _HEADER.size:
                    _, _, size = _HEADER.unpack_from(buf)
                    if not _HEADER.size <= size <= self.max_message_size:
                        framed = False  # not UA-TCP: pass the rest through as it comes
                        w.write(bytes(buf))
                        buf.clear()
                        break
                    if len(buf) < size:
                        break
                    message = bytearray(buf[:size])
                    del buf[:size]
                    out = self._apply_fault(message, conn, to_client=to_client)
                    if out is not None:
                        w.write(out)
                await w.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            # Either side gone: close both ends so the other side sees it too.
            for writer in conn.writers:
                writer.close()

    def _apply_fault(self, message: bytearray, conn: _Conn, *, to_client: bool) -> bytes | None:
        fault = self.fault
        if fault is RelayFault.SILENT:
            self.messages_dropped += 1
            return None
        self.messages_relayed += 1
        if to_client and fault is RelayFault.MALFORMED_BODY and len(message) > _HEADER.size:
            message[-1] ^= 0xFF
        elif to_client and fault is RelayFault.MALFORMED_HEADER:
            message[0:3] = _BAD_TYPE
        else:
            return bytes(message)
        conn.corrupted += 1
        self.messages_corrupted += 1
        return bytes(message)

"""Modbus links for the drivers: TCP (one connection per device) and RTU (one shared serial bus).

A driver talks to its device through a `ModbusLink`:

    await link.ensure()                       # open (or re-open) the connection; LinkDown if not
    rr = await link.call(lambda c: c.read_holding_registers(a, count=n, device_id=u))
    link.drop()                               # after a failed request: never reuse the stream
    await link.close()

`TcpLink` keeps the SunSpec driver's original behaviour: its own `AsyncModbusTcpClient`,
closed after any failure so that a late reply can never answer a later request.

`RtuLink` shares one `SerialBus` with every other device on the same serial port (RS-485 is
half-duplex and a port can be opened once). The bus holds:
  * one asyncio.Lock taken per request: waiters are served in arrival (FIFO) order, so devices
    polled concurrently interleave request by request and none starves another;
  * inter-frame pacing: a request leaves no sooner than 3.5 character times after the end of the
    previous transaction (Modbus over serial line V1.02 §2.5.1.1: t3.5 = 3.5 × 11 bits / baud,
    fixed at 1.75 ms above 19200 baud);
  * failure hygiene: a request that fails (timeout, bad CRC, wrong unit) marks the port stale;
    the next transaction — inside the lock, so never under another device's request — closes
    and re-opens it, discarding any late or partial frame. `drop()` on an RTU link is therefore
    only a hint and never closes the port from outside the lock.
Buses are kept in a registry by (event loop, port); each RtuLink holds one reference from its
first `ensure()` until `close()`, and the last close shuts the port. Two devices that name the
same port with different line settings are refused (`LinkDown`) rather than silently mixed.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeVar

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ModbusIOException
from pymodbus.pdu.register_message import ReadHoldingRegistersResponse

__all__ = [
    "LinkDown",
    "ModbusLink",
    "RtuLink",
    "SerialBus",
    "SerialSettings",
    "TcpLink",
    "bus_for",
    "frame_gap_s",
]

T = TypeVar("T")
Parity = Literal["N", "E", "O"]
_FAST_GAP_S: Final = 0.00175  # t3.5 above 19200 baud (fixed by the spec)


class HoldingRegistersResponse(ReadHoldingRegistersResponse):
    """pymodbus's FC3 response, decoded in C: every poll of every device parses one per request,
    and pymodbus unpacks the registers one `struct.unpack` at a time (~15 µs per 125 registers
    here, against ~2 µs). Same `registers` (a list of ints), same error on a short frame."""

    def decode(self, data: bytes) -> None:
        if (data_len := int(data[0])) >= len(data):
            raise ModbusIOException(
                f"byte_count {data_len} > length of packet {len(data)}",
                function_code=self.function_code,
            )
        words = array.array("H", data[1 : 1 + data_len - data_len % 2])
        if sys.byteorder == "little":
            words.byteswap()
        self.registers = words.tolist()


class LinkDown(Exception):
    """The link cannot be opened or is not open; the message says what to check."""


def frame_gap_s(baudrate: int) -> float:
    """The Modbus RTU inter-frame silence t3.5 at `baudrate` (11 bits per character)."""
    if baudrate > 19200:
        return _FAST_GAP_S
    return 3.5 * 11.0 / baudrate


@dataclass(frozen=True, slots=True)
class SerialSettings:
    port: str
    baudrate: int = 19200
    parity: Parity = "N"
    stopbits: int = 1
    bytesize: int = 8

    def describe(self) -> str:
        return f"{self.port}@{self.baudrate}{self.bytesize}{self.parity}{self.stopbits}"


class ModbusLink:
    """What a driver needs from its transport (see the module docstring)."""

    address: str

    async def ensure(self) -> None:
        raise NotImplementedError

    def drop(self) -> None:
        raise NotImplementedError

    async def call(self, op: Callable[[Any], Awaitable[T]]) -> T:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


class TcpLink(ModbusLink):
    """One Modbus TCP connection per device, dropped after any failure."""

    def __init__(self, host: str, port: int, timeout_s: float, name: str) -> None:
        self._host, self._port, self._timeout_s, self._name = host, port, timeout_s, name
        self.address = f"{host}:{port}"
        self._client: AsyncModbusTcpClient | None = None

    async def ensure(self) -> None:
        if self._client is not None and self._client.connected:
            return
        self.drop()
        # retries=0: one timeout is one failure (the poller owns retry policy);
        # reconnect_delay=0: no background reconnects, the next read() reconnects lazily.
        client = AsyncModbusTcpClient(
            self._host,
            port=self._port,
            timeout=self._timeout_s,
            retries=0,
            reconnect_delay=0,
            name=self._name,
        )
        client.register(HoldingRegistersResponse)
        try:
            async with asyncio.timeout(self._timeout_s + 0.5):
                ok = await client.connect()
        except (TimeoutError, OSError) as exc:
            client.close()
            reason = exc or type(exc).__name__
            raise LinkDown(f"cannot connect to {self.address}: {reason}") from exc
        if not ok:
            client.close()
            raise LinkDown(
                f"cannot connect to {self.address}: check host, port and that the device is up"
            )
        self._client = client

    def drop(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    async def call(self, op: Callable[[Any], Awaitable[T]]) -> T:
        client = self._client
        if client is None:
            raise LinkDown("not connected")
        return await op(client)

    async def close(self) -> None:
        self.drop()


class SerialBus:
    """One serial port shared by the devices on it: a FIFO lock, t3.5 pacing, stale handling."""

    def __init__(self, settings: SerialSettings, timeout_s: float) -> None:
        self.settings = settings
        self.timeout_s = timeout_s
        self.gap_s = frame_gap_s(settings.baudrate)
        self._lock = asyncio.Lock()
        self._client: AsyncModbusSerialClient | None = None
        self._stale = False
        self._last_end = 0.0
        self.refs = 0
        self.transactions = 0  # requests that went out on this bus
        self.reopens = 0  # times the port was (re)opened

    @property
    def is_open(self) -> bool:
        return self._client is not None and self._client.connected

    def mark_stale(self) -> None:
        """A request failed: the next transaction re-opens the port before it sends."""
        self._stale = True

    async def _open_locked(self) -> AsyncModbusSerialClient:
        if self._stale and self._client is not None:
            self._client.close()
            self._client = None
        self._stale = False
        if self._client is not None and self._client.connected:
            return self._client
        if self._client is not None:
            self._client.close()
            self._client = None
        s = self.settings
        client = AsyncModbusSerialClient(
            s.port,
            baudrate=s.baudrate,
            parity=s.parity,
            stopbits=s.stopbits,
            bytesize=s.bytesize,
            timeout=self.timeout_s,
            retries=0,
            reconnect_delay=0,
            name=f"rtu:{s.port}",
        )
        client.register(HoldingRegistersResponse)
        try:
            async with asyncio.timeout(self.timeout_s + 0.5):
                ok = await client.connect()
        except (TimeoutError, OSError) as exc:
            client.close()
            raise LinkDown(f"cannot open {s.describe()}: {exc or type(exc).__name__}") from exc
        if not ok:
            client.close()
            raise LinkDown(
                f"cannot open serial port {s.port}: check the device path, permissions "
                "(dialout group) and that no other program holds it"
            )
        self._client = client
        self.reopens += 1
        return client

    async def open(self) -> None:
        async with self._lock:
            await self._open_locked()

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncModbusSerialClient]:
        """The bus for one request: in FIFO order, after the inter-frame silence."""
        loop = asyncio.get_running_loop()
        async with self._lock:
            client = await self._open_locked()
            wait = self._last_end + self.gap_s - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            self.transactions += 1
            try:
                yield client
            except BaseException:
                self._stale = True
                raise
            finally:
                self._last_end = loop.time()

    def shutdown(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


_BUSES: dict[tuple[int, str], SerialBus] = {}


def bus_for(settings: SerialSettings, timeout_s: float) -> SerialBus:
    """The bus of `settings.port` in this event loop (created on first use, one reference added)."""
    key = (id(asyncio.get_running_loop()), settings.port)
    bus = _BUSES.get(key)
    if bus is None:
        bus = _BUSES[key] = SerialBus(settings, timeout_s)
    elif bus.settings != settings:
        raise LinkDown(
            f"serial port {settings.port} is already in use as {bus.settings.describe()}; "
            f"this device asks for {settings.describe()}: devices on one bus share line settings"
        )
    else:
        # The slowest device on the bus sets the timeout of every request on it.
        bus.timeout_s = max(bus.timeout_s, timeout_s)
    bus.refs += 1
    return bus


def _release(bus: SerialBus) -> None:
    bus.refs -= 1
    if bus.refs <= 0:
        bus.shutdown()
        for key, b in list(_BUSES.items()):
            if b is bus:
                del _BUSES[key]


class RtuLink(ModbusLink):
    """A device on a shared serial bus (see `SerialBus`)."""

    def __init__(self, settings: SerialSettings, timeout_s: float) -> None:
        self.settings = settings
        self._timeout_s = timeout_s
        self.address = settings.describe()
        self._bus: SerialBus | None = None

    @property
    def bus(self) -> SerialBus | None:
        return self._bus

    async def ensure(self) -> None:
        if self._bus is None:
            self._bus = bus_for(self.settings, self._timeout_s)
        if not self._bus.is_open:
            await self._bus.open()

    def drop(self) -> None:
        if self._bus is not None:
            self._bus.mark_stale()

    async def call(self, op: Callable[[Any], Awaitable[T]]) -> T:
        bus = self._bus
        if bus is None:
            raise LinkDown("not connected")
        async with bus.transaction() as client:
            return await op(client)

    async def close(self) -> None:
        bus, self._bus = self._bus, None
        if bus is not None:
            _release(bus)

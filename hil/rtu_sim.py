"""Serve a running `SiteSimulator`'s devices over Modbus RTU on a pseudo-terminal pair.

The simulator's register banks, physics and fault injection stay in `hil.server`; this module
only adds a second wire: a pymodbus `ModbusSerialServer` (RTU framing) on one end of a pty pair
made by socat, with the same per-device request hooks the TCP servers use (so `Fault.SILENT`
gives no answer, `Fault.EXCEPTION` an exception response, writes reach the physics). A client
(the driver under test, or `dergw scan rtu`) opens the other end, `client_port`.

Extra fault for the serial wire: `set_malformed(device_id, True)` corrupts the CRC of every
response frame from that unit (what a noisy RS-485 line does); the client must count an error
and recover when it is cleared.

    async with SiteSimulator(spec) as sim, RtuSiteSimulator(sim, ["pv1", "meter1"]) as rtu:
        # `extra=[Sdm630Meter(sim, unit_id=9).sim_device()]` adds non-SunSpec devices to the bus
        params = SunSpecModbusParams(transport="rtu", serial_port=rtu.client_port, unit_id=1)

A physical line does not exist here: the pty carries bytes as fast as the processes move them,
so the baud rate only sets the inter-frame timing the client computes, not the throughput.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pymodbus.server import ModbusSerialServer
from pymodbus.simulator import DataType, SimData, SimDevice

from hil.server import SimulatorError, SiteSimulator

__all__ = ["SOCAT", "PtyPair", "RtuSiteSimulator"]

SOCAT = shutil.which("socat") or "/usr/bin/socat"


class PtyPair:
    """Two linked pseudo-terminals (socat): `server_port` <-> `client_port`."""

    def __init__(self, directory: str | None = None) -> None:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if directory is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="dergw-pty-")
            directory = self._tmp.name
        self.server_port = str(Path(directory) / "server")
        self.client_port = str(Path(directory) / "client")
        self._proc: subprocess.Popen[bytes] | None = None

    def _spawn(self) -> subprocess.Popen[bytes]:
        if not os.path.exists(SOCAT):
            raise SimulatorError(f"socat not found at {SOCAT}: install socat for RTU over a pty")
        for path in (self.server_port, self.client_port):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        return subprocess.Popen(
            [
                SOCAT,
                f"pty,raw,echo=0,link={self.server_port}",
                f"pty,raw,echo=0,link={self.client_port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def _ready(self) -> bool:
        return os.path.exists(self.server_port) and os.path.exists(self.client_port)

    async def start(self, timeout_s: float = 5.0) -> None:
        proc = self._proc = self._spawn()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not self._ready():
            if proc.poll() is not None or loop.time() > deadline:
                self.stop()
                raise SimulatorError("socat did not create the pty pair")
            await asyncio.sleep(0.01)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


class RtuSiteSimulator:
    """An RTU server for some (default: all) devices of a started `SiteSimulator`."""

    def __init__(
        self,
        sim: SiteSimulator,
        device_ids: Sequence[str] | None = None,
        *,
        baudrate: int = 19200,
        parity: str = "N",
        stopbits: int = 1,
        extra: Sequence[SimDevice] = (),
    ) -> None:
        self.sim = sim
        devices: dict[str, Any] = sim._devices  # wrapping, not re-implementing
        ids = list(devices) if device_ids is None else list(device_ids)
        unknown = [i for i in ids if i not in devices]
        if unknown:
            raise SimulatorError(f"unknown devices {unknown}; this site has {sorted(devices)}")
        units: dict[int, str] = {}
        for i in ids:
            unit = devices[i].spec.unit_id
            if unit in units:
                raise SimulatorError(
                    f"{i!r} and {units[unit]!r} both use unit id {unit}: one RS-485 bus needs "
                    "distinct unit ids"
                )
            units[unit] = i
        for dev in extra:
            if dev.id in units:
                raise SimulatorError(f"extra device unit {dev.id} clashes with {units[dev.id]!r}")
            units[dev.id] = f"extra unit {dev.id}"
        self._extra = tuple(extra)
        self.device_ids = tuple(ids)
        self.unit_ids = {i: devices[i].spec.unit_id for i in ids}
        self.baudrate, self.parity, self.stopbits = baudrate, parity, stopbits
        self._pty = PtyPair()
        self._server: ModbusSerialServer | None = None
        self._malformed: set[int] = set()
        self.frames_sent = 0

    @property
    def client_port(self) -> str:
        """The serial port a client opens."""
        return self._pty.client_port

    def set_malformed(self, device_id: str, on: bool) -> None:
        """Corrupt (or stop corrupting) the CRC of every response from `device_id`."""
        unit = self.unit_ids.get(device_id)
        if unit is None:
            raise SimulatorError(f"{device_id!r} is not served on this bus: {self.device_ids}")
        if on:
            self._malformed.add(unit)
        else:
            self._malformed.discard(unit)

    def _trace(self, sending: bool, data: bytes) -> bytes:
        if sending and data:
            self.frames_sent += 1
            if data[0] in self._malformed:
                return data[:-1] + bytes([data[-1] ^ 0xFF])
        return data

    async def start(self) -> None:
        await self._pty.start()
        devices: dict[str, Any] = self.sim._devices
        sim_devices = [
            SimDevice(
                id=devices[i].spec.unit_id,
                simdata=[
                    SimData(
                        devices[i].spec.base_address,
                        count=1,
                        values=devices[i].served.tolist(),
                        datatype=DataType.REGISTERS,
                    )
                ],
                action=self.sim._make_hook(devices[i]),
            )
            for i in self.device_ids
        ] + list(self._extra)
        server = ModbusSerialServer(
            sim_devices,
            port=self._pty.server_port,
            baudrate=self.baudrate,
            parity=self.parity,
            stopbits=self.stopbits,
            ignore_missing_devices=True,
            trace_packet=self._trace,
        )
        try:
            await server.serve_forever(background=True)
        except Exception as exc:
            self._pty.stop()
            raise SimulatorError(f"cannot serve RTU on {self._pty.server_port}: {exc}") from exc
        self._server = server

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.shutdown()
        self._pty.stop()

    async def __aenter__(self) -> RtuSiteSimulator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

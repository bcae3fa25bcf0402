"""DNP3 master backend on pydnp3 (C++ opendnp3 2.2 through pybind11): runs in the worker child.

The same operations as backend_dnp3py (drivers.dnp3.protocol.Backend) on opendnp3's master:
a TCP client channel (it reconnects on its own, 0.1 .. 2 s backoff), one master session with no
startup tasks (no automatic integrity poll, no (dis)able unsolicited: the driver polls), and
on-demand tasks:

  poll    integrity = ScanClasses(class 1/2/3 + class 0), events = ScanClasses(class 1/2/3)
          (an integrity poll instead when the channel reconnected since the last one);
          completion through an ITaskCallback, values through an ISOEHandler (last value and
          flags per point, so an event poll reports every point known so far, as dnp3py does);
  operate one CommandSet of g41v1 (AnalogOutputInt32) or g12v1 (CROB latch on/off) objects,
          DirectOperate or SelectAndOperate (opendnp3 does select, checks the echo, operates);
          the answer is the status octet per object (0 = SUCCESS, protocols.md §5).

opendnp3 calls back on its own thread (the GIL is taken by pybind11); every callback only hands
results to the asyncio loop with call_soon_threadsafe and never raises (an exception escaping into
C++ would abort the child). Python objects that C++ holds (handler, listener, task callbacks) are
kept referenced here: pybind11 does not keep a Python subclass alive for C++.

The command callback needs the dergw patch to pydnp3 (packaging/pydnp3): with pybind11 2.13 the
published binding cannot hand the ICommandTaskResult to Python. `DNP3Manager.Shutdown()` double
frees, so the manager is never shut down here: the worker leaves with os._exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from typing import Any

from pydnp3 import (  # type: ignore[import-not-found,import-untyped,unused-ignore]
    asiodnp3,
    asiopal,
    opendnp3,
    openpal,
)

from drivers.dnp3.protocol import BackendError

__all__ = ["PyDnp3Backend", "make_backend"]

_CHANNEL_OPEN = 2  # opendnp3::ChannelState::OPEN
# opendnp3::TaskCompletion
_COMPLETION = {
    0: "SUCCESS",
    1: "FAILURE_BAD_RESPONSE",
    2: "FAILURE_RESPONSE_TIMEOUT",
    3: "FAILURE_START_TIMEOUT",
    4: "FAILURE_MESSAGE_FORMAT_ERROR",
    255: "FAILURE_NO_COMMS",
}
_LINK_FAILURES = {2, 3, 255}  # no answer: the association is not usable
_MALFORMED = {1, 4}
# opendnp3::CommandPointState
_STATE_INIT, _STATE_SELECT_MISMATCH = 0, 2
# SELECT_SUCCESS, SELECT_FAIL, OPERATE_FAIL, SUCCESS: `status` is what the device answered
_STATE_ANSWERED = {1, 3, 4, 5}
_STATUS_TIMEOUT, _STATUS_UNDEFINED = 1, 127  # opendnp3::CommandStatus


def _status(state: int, status: int) -> int:
    """The status octet to report for one object of a command."""
    if state in _STATE_ANSWERED:
        return status
    return _STATUS_TIMEOUT if state == _STATE_INIT else _STATUS_UNDEFINED


def _resolve(loop: asyncio.AbstractEventLoop, fut: asyncio.Future[Any], value: Any) -> None:
    """Complete `fut` from an opendnp3 thread; never raises (the loop may be gone at exit)."""

    def _set() -> None:
        if not fut.done():
            fut.set_result(value)

    with contextlib.suppress(RuntimeError):  # loop closed
        loop.call_soon_threadsafe(_set)


def _completion(code: int) -> BackendError:
    name = _COMPLETION.get(code, str(code))
    if code in _MALFORMED:
        return BackendError(f"malformed or unexpected response ({name})")
    return BackendError(f"no response from the outstation ({name})", link=code in _LINK_FAILURES)


class _Values(opendnp3.ISOEHandler):  # type: ignore[misc]
    """The last value and flags octet per (kind, index), filled on the opendnp3 thread."""

    def __init__(self) -> None:
        super().__init__()
        self.values: dict[tuple[str, int], tuple[float, int]] = {}
        self._kinds: tuple[tuple[Any, str], ...] = (
            (opendnp3.ICollectionIndexedAnalog, "ai"),
            (opendnp3.ICollectionIndexedBinary, "bi"),
            (opendnp3.ICollectionIndexedBinaryOutputStatus, "bo"),
        )

    def Start(self) -> None:
        pass

    def End(self) -> None:
        pass

    def Process(self, info: Any, values: Any) -> None:
        kind = next((k for t, k in self._kinds if isinstance(values, t)), None)
        if kind is None:  # counters, octet strings...: not used by the 1815.2 profile
            return
        store = self.values

        def one(item: Any) -> None:
            m = item.value
            store[(kind, int(item.index))] = (float(m.value), int(m.flags.value))

        with contextlib.suppress(Exception):  # must not propagate into C++
            values.ForeachItem(one)


class _Listener(asiodnp3.IChannelListener):  # type: ignore[misc]
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.state = 0
        self.opens = 0  # connections made (opendnp3 reconnects on its own)
        self._loop = loop
        self.opened = asyncio.Event()

    def OnStateChange(self, state: Any) -> None:
        with contextlib.suppress(Exception):  # must not propagate into C++ (loop closed...)
            self.state = int(state)
            is_open = self.state == _CHANNEL_OPEN
            self.opens += is_open
            self._loop.call_soon_threadsafe(self.opened.set if is_open else self.opened.clear)


class _TaskDone(opendnp3.ITaskCallback):  # type: ignore[misc]
    """Completion of one scan; drops itself from `keep` once opendnp3 has destroyed the task."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, fut: asyncio.Future[int], keep: set[Any]
    ) -> None:
        super().__init__()
        self._loop = loop
        self._fut = fut
        self._keep = keep
        keep.add(self)

    def OnStart(self) -> None:
        pass

    def OnComplete(self, result: Any) -> None:
        with contextlib.suppress(Exception):  # must not propagate into C++
            _resolve(self._loop, self._fut, int(result))

    def OnDestroyed(self) -> None:
        with contextlib.suppress(Exception):  # must not propagate into C++ (loop closed...)
            self._loop.call_soon_threadsafe(self._keep.discard, self)


class PyDnp3Backend:
    def __init__(self) -> None:
        self._manager: Any = None  # one per child, never shut down (double free)
        self._channel: Any = None
        self._master: Any = None
        self._listener: _Listener | None = None
        self._values = _Values()
        self._app: Any = None
        self._keep: set[Any] = set()  # Python objects C++ still points at
        self._retired: list[Any] = []  # handlers of closed sessions (C++ may still hold them)
        self._points: dict[str, list[int]] = {}
        self._timeout_s = 2.0
        self._ids = itertools.count(1)
        self._integrity_at_open = -1  # listener.opens at the last integrity poll

    async def open(self, request: dict[str, Any]) -> None:
        await self.close()
        loop = asyncio.get_running_loop()
        self._points = {k: [int(i) for i in v] for k, v in request["points"].items()}
        self._timeout_s = float(request["timeout_s"])
        if self._manager is None:
            self._manager = asiodnp3.DNP3Manager(1)  # no log handler: opendnp3 logs nothing
        n = next(self._ids)
        self._values = _Values()
        self._listener = _Listener(loop)
        retry = asiopal.ChannelRetry(
            openpal.TimeDuration.Milliseconds(100), openpal.TimeDuration.Seconds(2)
        )
        self._channel = self._manager.AddTCPClient(
            f"tcp{n}",
            opendnp3.levels.NOTHING,
            retry,
            str(request["host"]),
            "0.0.0.0",  # the local adapter to connect from: any
            int(request["port"]),
            self._listener,
        )
        ms = int(self._timeout_s * 1000)
        cfg = asiodnp3.MasterStackConfig()
        cfg.master.responseTimeout = openpal.TimeDuration.Milliseconds(ms)
        cfg.master.taskStartTimeout = openpal.TimeDuration.Milliseconds(ms)
        none = opendnp3.ClassField(False, False, False, False)
        cfg.master.disableUnsolOnStartup = False
        cfg.master.unsolClassMask = none
        cfg.master.startupIntegrityClassMask = none
        cfg.link.LocalAddr = int(request["master"])
        cfg.link.RemoteAddr = int(request["outstation"])
        self._app = asiodnp3.DefaultMasterApplication.Create()
        self._master = self._channel.AddMaster(f"master{n}", self._values, self._app, cfg)
        self._master.Enable()
        await self._wait_open(self._timeout_s)

    async def _wait_open(self, within_s: float) -> None:
        listener = self._listener
        if self._master is None or listener is None:
            raise BackendError("not opened")
        if listener.state == _CHANNEL_OPEN:
            return
        try:
            await asyncio.wait_for(listener.opened.wait(), within_s)
        except TimeoutError:
            raise BackendError(
                f"cannot connect within {within_s:g} s (the channel keeps retrying)", link=True
            ) from None

    async def poll(self, integrity: bool) -> dict[str, Any]:
        await self._wait_open(self._timeout_s)
        assert self._listener is not None
        opens = self._listener.opens
        # After opendnp3 reconnected on its own, events alone would leave the values of the
        # previous connection in place: the first poll on a new connection is an integrity poll.
        integrity = integrity or opens != self._integrity_at_open
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()
        done = _TaskDone(loop, fut, self._keep)
        field = (
            opendnp3.ClassField.AllClasses()
            if integrity
            else opendnp3.ClassField(False, True, True, True)
        )
        config = opendnp3.TaskConfig(opendnp3.TaskId.Defined(next(self._ids)), done)
        self._master.ScanClasses(field, config)
        code = await self._wait(fut)
        if code != 0:
            raise _completion(code)
        if integrity:
            self._integrity_at_open = opens
        got = dict(self._values.values)
        out: dict[str, Any] = {"iin": 0, "ai": [], "bi": [], "bo": []}
        for kind in ("ai", "bi", "bo"):
            for i in self._points.get(kind, []):
                v = got.get((kind, i))
                if v is not None:
                    out[kind].append([i, v[0], v[1]])
        return out

    async def operate(
        self, sbo: bool, analog: list[tuple[int, int]], crob: list[tuple[int, bool]]
    ) -> list[int]:
        await self._wait_open(self._timeout_s)
        commands = opendnp3.CommandSet()
        if analog:
            commands.Add(
                [
                    opendnp3.IndexedAnalogOutputInt32(opendnp3.AnalogOutputInt32(int(v)), int(i))
                    for i, v in analog
                ]
            )
        if crob:
            on, off = opendnp3.ControlCode.LATCH_ON, opendnp3.ControlCode.LATCH_OFF
            commands.Add(
                [
                    opendnp3.IndexedControlRelayOutputBlock(
                        opendnp3.ControlRelayOutputBlock(on if latch else off), int(i)
                    )
                    for i, latch in crob
                ]
            )
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[tuple[int, list[tuple[int, int]]]] = loop.create_future()

        def on_result(result: Any) -> None:  # opendnp3 thread; `result` lives for this call only
            try:
                items: list[tuple[int, int]] = []
                result.ForeachItem(lambda r: items.append((int(r.state), int(r.status))))
                _resolve(loop, fut, (int(result.summary), items))
            except Exception:  # must not propagate into C++
                _resolve(loop, fut, (-1, []))

        op = self._master.SelectAndOperate if sbo else self._master.DirectOperate
        op(commands, on_result, opendnp3.TaskConfig.Default())
        summary, items = await self._wait(fut)
        n = len(analog) + len(crob)
        if summary == -1:
            raise BackendError("could not decode the command result")
        statuses = [_status(st, s) for st, s in items]
        if len(items) == n and any(st in _STATE_ANSWERED and s for st, s in items):
            return statuses  # the device refused at least one object: its status codes say why
        if summary != 0:
            raise _completion(summary)
        if len(items) != n:
            raise BackendError(f"command result names {len(items)} objects, sent {n}")
        if any(st == _STATE_SELECT_MISMATCH for st, _ in items):
            raise BackendError("select response does not echo the request (malformed)")
        return statuses

    async def _wait(self, fut: asyncio.Future[Any]) -> Any:
        # opendnp3 fails the task itself (start timeout, response timeout); this only guards
        # against a lost callback. A select-before-operate is two exchanges.
        try:
            return await asyncio.wait_for(fut, self._timeout_s * 2 + 0.25)
        except TimeoutError:
            raise BackendError("opendnp3 did not complete the task", link=True) from None

    async def close(self) -> None:
        channel, self._channel, self._master = self._channel, None, None
        if channel is not None:
            # Keep the session's Python objects referenced: C++ may call them until it is gone.
            self._retired.append((channel, self._values, self._listener, self._app))
            await asyncio.to_thread(channel.Shutdown)
        self._listener = None


def make_backend() -> PyDnp3Backend:
    return PyDnp3Backend()

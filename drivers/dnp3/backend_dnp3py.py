"""DNP3 master backend on dnp3py (pure Python, asyncio): runs inside the worker child process.

Class 0/1/2/3 polls through `MasterTcpRunner`; controls as 32-bit analog outputs (g41v1) and
CROBs (g12v1), direct operate or select-before-operate. dnp3py's `Master` parses values but not
the status octet of a control response, so `_StatusMaster` keeps the response's object blocks
and `_statuses` decodes the echoed g12/g41 objects (the status is each object's last octet).
"""

from __future__ import annotations

import contextlib
from typing import Any

from dnp3.application.fragment import ObjectBlock, RequestFragment, ResponseFragment
from dnp3.core.enums import ControlCode
from dnp3.master import (
    CommandBuilder,
    DefaultSOEHandler,
    Master,
    MasterConfig,
    MasterRunnerError,
    MasterTcpRunner,
)
from dnp3.master.handler import ResponseInfo

from drivers.dnp3.protocol import BackendError

__all__ = ["Dnp3pyBackend", "make_backend"]

_CROB_SIZE = 11  # g12v1: code, count, on-time(4), off-time(4), status
_AO32_SIZE = 5  # g41v1: value(4), status


class _StatusMaster(Master):
    last_objects: list[ObjectBlock]

    def _process_response_fragment(self, response: ResponseFragment) -> ResponseInfo:
        self.last_objects = list(response.objects)
        return super()._process_response_fragment(response)


def _statuses(objects: list[ObjectBlock]) -> list[int]:
    """The status octets of the control objects echoed in a response (qualifier 0x17/0x28)."""
    out: list[int] = []
    for block in objects:
        h = block.header
        size = {(12, 1): _CROB_SIZE, (41, 1): _AO32_SIZE}.get((h.group, h.variation))
        if size is None:
            continue
        prefix = 1 if h.qualifier == 0x17 else 2
        data = block.data
        count = data[0] if prefix == 1 else int.from_bytes(data[0:2], "little")
        pos = prefix
        for _ in range(count):
            pos += prefix + size
            if pos > len(data):
                raise BackendError("control response truncated")
            out.append(data[pos - 1])
    return out


class Dnp3pyBackend:
    def __init__(self) -> None:
        self._runner: MasterTcpRunner | None = None
        self._master: _StatusMaster | None = None
        self._handler = DefaultSOEHandler()
        self._open_req: dict[str, Any] | None = None
        self._points: dict[str, list[int]] = {}

    async def open(self, request: dict[str, Any]) -> None:
        await self.close()
        self._open_req = request
        self._points = {k: [int(i) for i in v] for k, v in request["points"].items()}
        await self._ensure_open()

    async def _ensure_open(self) -> tuple[MasterTcpRunner, _StatusMaster]:
        if self._runner is not None and self._master is not None and self._runner.is_open:
            return self._runner, self._master
        await self._drop()
        req = self._open_req
        if req is None:
            raise BackendError("not opened")
        self._handler.clear()
        master = _StatusMaster(
            config=MasterConfig(
                address=int(req["master"]),
                outstation_address=int(req["outstation"]),
                response_timeout=float(req["timeout_s"]),
            ),
            handler=self._handler,
        )
        master.last_objects = []
        runner = MasterTcpRunner(
            master=master,
            host=str(req["host"]),
            port=int(req["port"]),
            response_timeout=float(req["timeout_s"]),
        )
        try:
            await runner.open()
        except (OSError, MasterRunnerError) as exc:
            raise BackendError(f"cannot connect: {exc}", link=True) from exc
        self._runner, self._master = runner, master
        return runner, master

    async def _request(self, build: str, task: object | None = None) -> list[ResponseInfo]:
        runner, master = await self._ensure_open()  # reconnects after a lost association
        request: RequestFragment
        if build == "integrity":
            request = master.build_integrity_poll()
        elif build == "events":
            request = master.build_class_poll(class_1=True, class_2=True, class_3=True)
        else:
            request = getattr(master, f"build_{build}")(task)
        master.last_objects = []
        try:
            return await runner.request(request)
        except (OSError, MasterRunnerError) as exc:
            await self._drop()
            raise BackendError(f"{type(exc).__name__}: {exc}", link=True) from exc

    async def poll(self, integrity: bool) -> dict[str, Any]:
        infos = await self._request("integrity" if integrity else "events")
        h = self._handler
        iin = int(infos[-1].iin) if infos else 0
        out: dict[str, Any] = {"iin": iin, "ai": [], "bi": [], "bo": []}
        for i in self._points.get("ai", []):
            a = h.get_analog_input(i)
            if a is not None:
                out["ai"].append([i, a.value, a.quality])
        for i in self._points.get("bi", []):
            b = h.get_binary_input(i)
            if b is not None:
                out["bi"].append([i, 1.0 if b.value else 0.0, b.quality])
        for i in self._points.get("bo", []):
            b = h.get_binary_output(i)
            if b is not None:
                out["bo"].append([i, 1.0 if b.value else 0.0, b.quality])
        return out

    async def operate(
        self, sbo: bool, analog: list[tuple[int, int]], crob: list[tuple[int, bool]]
    ) -> list[int]:
        cb = CommandBuilder()
        for index, raw in analog:
            cb.add_analog(index, raw)
        for index, on in crob:
            cb.add_crob(index, ControlCode.LATCH_ON if on else ControlCode.LATCH_OFF)
        n = len(analog) + len(crob)
        if sbo:
            await self._request("select", cb.build_select())
            status = self._last_statuses(n)
            if any(status):
                return status
            await self._request("operate", cb.build_operate())
        else:
            await self._request("direct_operate", cb.build_direct_operate())
        return self._last_statuses(n)

    def _last_statuses(self, n: int) -> list[int]:
        assert self._master is not None
        status = _statuses(self._master.last_objects)
        if len(status) != n:
            raise BackendError(f"control response echoed {len(status)} objects, sent {n}")
        return status

    async def _drop(self) -> None:
        runner, self._runner, self._master = self._runner, None, None
        if runner is not None:
            with contextlib.suppress(OSError, MasterRunnerError):
                await runner.close()

    async def close(self) -> None:
        await self._drop()


def make_backend() -> Dnp3pyBackend:
    return Dnp3pyBackend()

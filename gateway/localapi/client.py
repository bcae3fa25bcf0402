"""An async client of the gateway's local API (see gateway.localapi.schema for the protocol).

    async with await LocalApiClient.connect("/run/dergw/dergw.sock") as api:
        snap = await api.snapshot()

Calls on one client are serialised (one request in flight per connection). An error answer
raises LocalApiError with the server's code and message.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
from types import TracebackType
from typing import Any

from gateway.localapi.schema import (
    MAX_LINE_BYTES,
    ErrorCode,
    OverrideClearResult,
    OverrideControls,
    OverrideSetResult,
    ReadPointResult,
    RescanResult,
    Response,
    Snapshot,
    TestWriteResult,
    ValidateConfigResult,
)

__all__ = ["LocalApiClient", "LocalApiError"]

# Responses can be large (a snapshot of a big site); bounded all the same.
MAX_RESPONSE_BYTES = 16 * 1024 * 1024
# sockaddr_un.sun_path holds 108 bytes with its terminating NUL (Linux).
MAX_SUN_PATH = 107


class LocalApiError(Exception):
    """The gateway answered with an error.

    code: bad_request | not_found | refused | forbidden | internal.
    """

    def __init__(self, code: ErrorCode | str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class LocalApiClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()

    @classmethod
    async def connect(cls, path: str, *, timeout_s: float = 5.0) -> LocalApiClient:
        """Connect to the gateway's socket. OSError (e.g. FileNotFoundError, PermissionError)
        when the gateway is not running or this user may not use the socket."""
        dir_fd = None
        target = path
        if len(os.fsencode(path)) > MAX_SUN_PATH:
            # Too long for sockaddr_un: reach it through its directory's descriptor.
            dir_fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY)
            target = f"/proc/self/fd/{dir_fd}/{os.path.basename(path)}"
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(target, limit=MAX_RESPONSE_BYTES), timeout_s
            )
        finally:
            if dir_fd is not None:
                os.close(dir_fd)
        return cls(reader, writer)

    async def __aenter__(self) -> LocalApiClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()

    async def call(
        self, method: str, params: dict[str, Any] | None = None, *, timeout_s: float = 10.0
    ) -> Any:
        """One request; returns the `result` or raises LocalApiError / ConnectionError."""
        async with self._lock:
            request_id = next(self._ids)
            line = json.dumps({"id": request_id, "method": method, "params": params or {}})
            if len(line) + 1 > MAX_LINE_BYTES:
                raise LocalApiError("bad_request", f"request is over {MAX_LINE_BYTES} bytes")
            self._writer.write(line.encode() + b"\n")
            await self._writer.drain()
            raw = await asyncio.wait_for(self._reader.readline(), timeout_s)
            if not raw:
                raise ConnectionError("the gateway closed the local API connection")
            response = Response.model_validate_json(raw)
            if response.error is not None:
                raise LocalApiError(response.error.code, response.error.message)
            return response.result

    # -- typed helpers -----------------------------------------------------------------------

    async def snapshot(self) -> Snapshot:
        return Snapshot.model_validate(await self.call("snapshot"))

    async def override_set(
        self,
        controls: OverrideControls | dict[str, Any],
        *,
        duration_s: float,
        reason: str,
        device_id: str | None = None,
        confirm: bool = False,
    ) -> OverrideSetResult:
        body = (
            controls.model_dump(exclude_none=True)
            if isinstance(controls, OverrideControls)
            else controls
        )
        params: dict[str, Any] = {
            "controls": body,
            "duration_s": duration_s,
            "reason": reason,
            "confirm": confirm,
        }
        if device_id is not None:
            params["device_id"] = device_id
        return OverrideSetResult.model_validate(await self.call("override.set", params))

    async def test_write(
        self,
        device_id: str,
        controls: OverrideControls | dict[str, Any],
        *,
        duration_s: float = 30.0,
        reason: str = "test write",
        confirm: bool = False,
    ) -> TestWriteResult:
        body = (
            controls.model_dump(exclude_none=True)
            if isinstance(controls, OverrideControls)
            else controls
        )
        params: dict[str, Any] = {
            "device_id": device_id,
            "controls": body,
            "duration_s": duration_s,
            "reason": reason,
            "confirm": confirm,
        }
        return TestWriteResult.model_validate(await self.call("test_write", params))

    async def override_clear(self, override_id: str) -> OverrideClearResult:
        result = await self.call("override.clear", {"override_id": override_id})
        return OverrideClearResult.model_validate(result)

    async def rescan(self, device_id: str) -> RescanResult:
        return RescanResult.model_validate(await self.call("rescan", {"device_id": device_id}))

    async def read_point(self, device_id: str, point: str) -> ReadPointResult:
        result = await self.call("read_point", {"device_id": device_id, "point": point})
        return ReadPointResult.model_validate(result)

    async def validate_config(self, path: str) -> ValidateConfigResult:
        return ValidateConfigResult.model_validate(
            await self.call("validate_config", {"path": path})
        )

    async def metrics(self) -> str:
        result = await self.call("metrics")
        if not isinstance(result, str):
            raise LocalApiError("internal", "metrics: expected text")
        return result

"""The gateway side of the local API: a Unix socket served inside the gateway's event loop.

One asyncio task per connection; each request line (at most MAX_LINE_BYTES, refused before it is
decoded) gets one response line. Requests are answered from in-memory state (gateway.localapi
.views) and never wait on a device. Who asks is the peer's user from SO_PEERCRED: overrides and
the audit log record it as "local:<user>". Access is the socket file's: mode 0660, owned by the
gateway's user and the configured `[local_api] group`. The gateway still listens on no TCP port.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import grp
import json
import logging
import os
import pwd
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ValidationError

from gateway.config import ConfigError, load_config
from gateway.intent import Controls
from gateway.localapi.client import MAX_SUN_PATH
from gateway.localapi.schema import (
    MAX_LINE_BYTES,
    ErrorCode,
    OverrideClearParams,
    OverrideClearResult,
    OverrideSetParams,
    OverrideSetResult,
    ReadPointParams,
    ReadPointResult,
    Request,
    RescanParams,
    RescanResult,
    TestWriteParams,
    TestWriteResult,
    ValidateConfigParams,
    ValidateConfigResult,
)
from gateway.localapi.views import (
    RecentEvents,
    build_snapshot,
    point_value,
    render_metrics,
    setpoint_status,
)
from gateway.overrides import OverrideError

if TYPE_CHECKING:
    from gateway.runtime.app import Gateway

__all__ = ["ApiError", "LocalApiServer", "peer_user"]

log = logging.getLogger(__name__)

NS_PER_S = 1_000_000_000
SOCKET_MODE = 0o660
# How long override.set waits for the control loop's next cycle to report what it enforces.
ENFORCEMENT_WAIT_S = 2.0
# How long test_write waits for the control loop to write the device (a cycle plus the write).
TEST_WRITE_WAIT_S = 5.0
# Loggers whose records (INFO and up) feed the snapshot's recent events.
EVENT_LOGGERS = ("gateway", "drivers")


_M = TypeVar("_M", bound=BaseModel)


class ApiError(Exception):
    """A request failed; `code` and the message go back to the client."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code: ErrorCode = code
        self.message = message


class _LineTooLong(Exception):
    pass


def peer_user(sock: socket.socket) -> str:
    """The connecting process's user name (SO_PEERCRED), or "uid<N>" without a passwd entry."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid{uid}"


def _params(model: type[_M], params: dict[str, Any]) -> _M:
    try:
        return model.model_validate(params)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'params'}: {e['msg']}"
            for e in exc.errors(include_url=False)
        )
        raise ApiError("bad_request", problems) from None


async def _read_line(reader: asyncio.StreamReader) -> bytes | None:
    """The next request line; None at EOF. An over-long line is discarded through its newline
    (without decoding it) and raises _LineTooLong."""
    try:
        return await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as exc:
        return exc.partial or None
    except asyncio.LimitOverrunError as exc:
        consumed = exc.consumed
    while True:
        await reader.readexactly(consumed)
        try:
            await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError:
            pass
        except asyncio.LimitOverrunError as exc:
            consumed = exc.consumed
            continue
        raise _LineTooLong


class LocalApiServer:
    """Serves the local API of one Gateway on `path` (see gateway.localapi.schema)."""

    def __init__(self, gateway: Gateway, path: Path, *, group: str | None = None) -> None:
        self._gw = gateway
        self.path = path
        self._group = group
        self._started_mono_ns = gateway.clock.mono_ns()
        self._recent = RecentEvents()
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        # Why each override was set here (kept while it is in force; overrides are in memory).
        self._reasons: dict[str, str] = {}
        self._methods: dict[str, Callable[[dict[str, Any], str], Awaitable[Any]]] = {
            "snapshot": self._snapshot,
            "override.set": self._override_set,
            "override.clear": self._override_clear,
            "test_write": self._test_write,
            "rescan": self._rescan,
            "read_point": self._read_point,
            "validate_config": self._validate_config,
            "metrics": self._metrics,
        }

    def attach_events(self) -> None:
        """Start collecting recent log records for the snapshot (before the gateway starts)."""
        for name in EVENT_LOGGERS:
            logging.getLogger(name).addHandler(self._recent)

    async def start(self) -> bool:
        """Listen on the socket: a stale socket file is replaced; mode 0660, `group` if set.

        A failure is logged, not raised: the gateway controls its site without its local API.
        """
        self.attach_events()
        try:
            await self._listen()
        except (OSError, KeyError) as exc:
            reason = f"no group {self._group!r}" if isinstance(exc, KeyError) else str(exc)
            log.error(
                "local API unavailable (%s): %s; the gateway runs without it "
                "(check [local_api] socket and group)",
                self.path,
                reason,
            )
            await self.close()
            return False
        log.info("local API on %s", self.path)
        return True

    async def _listen(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_socket():
            self.path.unlink()
        elif self.path.exists():
            raise OSError(f"{self.path} exists and is not a socket; refusing to replace it")
        gid = grp.getgrnam(self._group).gr_gid if self._group is not None else -1
        # Created with no access for others from the start (umask), then opened to the group.
        old_umask = os.umask(0o117)
        dir_fd = None
        try:
            bind_path = str(self.path)
            if len(os.fsencode(bind_path)) > MAX_SUN_PATH:
                # Too long for sockaddr_un: bind through the directory's descriptor instead.
                dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
                bind_path = f"/proc/self/fd/{dir_fd}/{self.path.name}"
            self._server = await asyncio.start_unix_server(
                self._connection, path=bind_path, limit=MAX_LINE_BYTES
            )
        finally:
            os.umask(old_umask)
            if dir_fd is not None:
                os.close(dir_fd)
        if gid != -1:
            os.chown(self.path, -1, gid)
        os.chmod(self.path, SOCKET_MODE)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._connections):
                task.cancel()
            await asyncio.gather(*self._connections, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        for name in EVENT_LOGGERS:
            logging.getLogger(name).removeHandler(self._recent)

    # -- connections ------------------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        try:
            sock = writer.get_extra_info("socket")
            user = peer_user(sock)
            while True:
                try:
                    line = await _read_line(reader)
                except _LineTooLong:
                    reply = self._error(None, "bad_request", f"request over {MAX_LINE_BYTES} bytes")
                else:
                    if line is None:
                        break
                    if not line.strip():
                        continue
                    reply = await self._handle(line, user)
                writer.write(reply)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            if task is not None:
                self._connections.discard(task)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    @staticmethod
    def _error(request_id: int | str | None, code: ErrorCode, message: str) -> bytes:
        body = {"id": request_id, "error": {"code": code, "message": message}}
        return json.dumps(body).encode() + b"\n"

    async def _handle(self, line: bytes, user: str) -> bytes:
        request_id: int | str | None = None
        try:
            try:
                raw = json.loads(line)
            except (ValueError, UnicodeDecodeError) as exc:
                raise ApiError("bad_request", f"not JSON: {exc}") from None
            if isinstance(raw, dict) and isinstance(raw.get("id"), int | str):
                request_id = raw["id"]
            try:
                request = Request.model_validate(raw)
            except ValidationError as exc:
                problems = "; ".join(
                    f"{'.'.join(str(p) for p in e['loc']) or 'request'}: {e['msg']}"
                    for e in exc.errors(include_url=False)
                )
                raise ApiError("bad_request", problems) from None
            handler = self._methods.get(request.method)
            if handler is None:
                raise ApiError(
                    "not_found",
                    f"unknown method {request.method!r}; methods: {', '.join(self._methods)}",
                )
            result = await handler(request.params, user)
            return json.dumps({"id": request_id, "result": result}).encode() + b"\n"
        except ApiError as exc:
            return self._error(request_id, exc.code, exc.message)
        except Exception as exc:
            log.exception("local API request failed")
            return self._error(request_id, "internal", f"{type(exc).__name__}: {exc}")

    # -- methods ----------------------------------------------------------------------------

    async def _snapshot(self, params: dict[str, Any], user: str) -> Any:
        stats = await asyncio.to_thread(self._gw.outbox.stats)
        snapshot = build_snapshot(
            self._gw,
            stats=stats,
            started_mono_ns=self._started_mono_ns,
            recent=self._recent.lines,
            reasons=self._reasons,
        )
        return snapshot.model_dump(mode="json")

    async def _metrics(self, params: dict[str, Any], user: str) -> Any:
        stats = await asyncio.to_thread(self._gw.outbox.stats)
        return render_metrics(self._gw, stats=stats, started_mono_ns=self._started_mono_ns)

    async def _add_override(
        self, request: OverrideSetParams | TestWriteParams, user: str
    ) -> tuple[str, Controls, int]:
        """Validate and apply an override (kernel and audit log); (override id, controls, the
        control loop's cycle count before it)."""
        if not request.confirm:
            raise ApiError(
                "refused",
                "confirm: an override changes what the site does; resend with confirm: true",
            )
        if not request.reason.strip():
            raise ApiError("refused", "reason: say why (it is logged with the override)")
        origin = f"local:{user}"
        control = self._gw.control
        controls = Controls(**request.controls.model_dump())
        begun = control.cycles_begun
        try:
            override = control.add_override(
                controls,
                origin=origin,
                duration_s=request.duration_s,
                device_id=request.device_id,
                reason=request.reason,
            )
        except OverrideError as exc:
            raise ApiError("refused", str(exc)) from None
        log.warning("override %s reason (%s): %s", override.override_id, origin, request.reason)
        in_force = {t.override.override_id for t in control.timed_overrides()}
        self._reasons = {k: v for k, v in self._reasons.items() if k in in_force}
        self._reasons[override.override_id] = request.reason
        await self._gw.audit.commit()  # recorded before we say it is in force
        return override.override_id, controls, begun

    async def _wait(self, done: Callable[[], bool], wait_s: float) -> None:
        # Polled: the control loop has no completion event, and adding one for us is not worth
        # touching its hot path.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while not done() and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)

    def _expires_in_s(self, override_id: str) -> float:
        timed = {t.override.override_id: t for t in self._gw.control.timed_overrides()}
        entry = timed.get(override_id)
        if entry is None:
            return 0.0
        return max(0.0, (entry.expires_mono_ns - self._gw.clock.mono_ns()) / NS_PER_S)

    async def _override_set(self, params: dict[str, Any], user: str) -> Any:
        request = _params(OverrideSetParams, params)
        override_id, controls, begun = await self._add_override(request, user)
        control = self._gw.control
        # What the kernel makes of it: its next cycle (woken by add_override).
        await self._wait(lambda: control.cycle_completed > begun, ENFORCEMENT_WAIT_S)
        return OverrideSetResult(
            override_id=override_id,
            origin=f"local:{user}",
            expires_in_s=self._expires_in_s(override_id),
            controls=controls.describe(),
            enforced=(
                [setpoint_status(sp) for sp in control.last_setpoints]
                if control.cycle_completed > begun
                else []
            ),
            notes=list(control.notes),
        ).model_dump(mode="json")

    async def _test_write(self, params: dict[str, Any], user: str) -> Any:
        request = _params(TestWriteParams, params)
        self._device(request.device_id)
        control = self._gw.control
        before = control.last_write(request.device_id)
        override_id, _, _ = await self._add_override(request, user)

        def written() -> bool:
            last = control.last_write(request.device_id)
            return last is not None and (before is None or last.mono_ns > before.mono_ns)

        await self._wait(written, TEST_WRITE_WAIT_S)
        last = control.last_write(request.device_id)
        enforced = next(
            (sp for sp in control.last_setpoints if sp.device_id == request.device_id), None
        )
        fresh = written()
        return TestWriteResult(
            override_id=override_id,
            device_id=request.device_id,
            expires_in_s=self._expires_in_s(override_id),
            written=fresh,
            ok=bool(fresh and last is not None and last.ok),
            reason=(
                (last.reason if last is not None else "")
                if fresh
                else f"nothing written within {TEST_WRITE_WAIT_S:g} s: the kernel's setpoint "
                "for the device did not change (or the device is unavailable)"
            ),
            readback=dict(last.readback) if fresh and last is not None else {},
            enforced=setpoint_status(enforced) if enforced is not None else None,
        ).model_dump(mode="json")

    async def _override_clear(self, params: dict[str, Any], user: str) -> Any:
        request = _params(OverrideClearParams, params)
        if not self._gw.control.clear_override(request.override_id, origin=f"local:{user}"):
            raise ApiError("not_found", f"no override {request.override_id!r} in force")
        await self._gw.audit.commit()
        return OverrideClearResult(override_id=request.override_id, cleared=True).model_dump(
            mode="json"
        )

    def _device(self, device_id: str) -> None:
        if device_id not in self._gw.snapshot.slots:
            known = ", ".join(sorted(self._gw.snapshot.slots))
            raise ApiError("not_found", f"unknown device {device_id!r}; devices: {known}")

    async def _rescan(self, params: dict[str, Any], user: str) -> Any:
        request = _params(RescanParams, params)
        self._device(request.device_id)
        poller = self._gw.pollers.get(request.device_id)
        if poller is None:
            raise ApiError("refused", "the gateway is still starting; try again")
        poller.request_rescan()
        log.info("%s: rescan requested by local:%s", request.device_id, user)
        return RescanResult(device_id=request.device_id, scheduled=True).model_dump(mode="json")

    async def _read_point(self, params: dict[str, Any], user: str) -> Any:
        request = _params(ReadPointParams, params)
        self._device(request.device_id)
        slot = self._gw.snapshot.slots[request.device_id]
        reading = slot.last_good
        if reading is None:
            raise ApiError("not_found", f"{request.device_id}: no good reading yet")
        index = reading.schema.index.get(request.point)
        if index is None:
            raise ApiError(
                "not_found",
                f"{request.device_id} has no point {request.point!r}; points: "
                + ", ".join(reading.schema.names),
            )
        return ReadPointResult(
            device_id=request.device_id,
            point=point_value(reading, index),
            age_s=slot.age_s(self._gw.clock.mono_ns()),
            wall_ns=reading.wall_ns,
        ).model_dump(mode="json")

    async def _validate_config(self, params: dict[str, Any], user: str) -> Any:
        request = _params(ValidateConfigParams, params)
        return (await asyncio.to_thread(self._validate, Path(request.path))).model_dump(mode="json")

    def _validate(self, path: Path) -> ValidateConfigResult:
        errors: list[str] = []
        try:
            load_config(path)
        except ConfigError as exc:
            errors = list(exc.problems)
        diff = ""
        running = self._gw.config_path
        try:
            new_text = path.read_text(encoding="utf-8")
            old_text = running.read_text(encoding="utf-8") if running is not None else ""
        except (OSError, UnicodeDecodeError):
            pass  # load_config has already said why it is unreadable
        else:
            diff = "".join(
                difflib.unified_diff(
                    old_text.splitlines(keepends=True),
                    new_text.splitlines(keepends=True),
                    fromfile=str(running) if running is not None else "(running config)",
                    tofile=str(path),
                )
            )
        return ValidateConfigResult(ok=not errors, errors=errors, diff=diff)

"""Where the console gets its data: the `DataSource` protocol and the error it raises.

The live source talks to the gateway's local API; tests use `FixedSource` (no socket, no clock).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from gateway.console.model import ConsoleSnapshot, PointRead, TestWriteView, ValidationView

__all__ = ["DataSource", "SourceError"]


class SourceError(Exception):
    """The gateway refused or failed a request; `code` is the local API's error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class DataSource(Protocol):
    """Everything the console can ask of a gateway. Write methods are only called with writes
    enabled and after the technician confirmed."""

    @property
    def description(self) -> str: ...

    async def snapshot(self) -> ConsoleSnapshot: ...

    async def set_override(
        self,
        *,
        device_id: str | None,
        controls: Mapping[str, float],
        duration_s: float,
        reason: str,
    ) -> str:
        """Returns the new override's id."""
        ...

    async def clear_override(self, override_id: str) -> None: ...

    async def rescan(self, device_id: str) -> None: ...

    async def test_write(
        self, *, device_id: str, controls: Mapping[str, float], duration_s: float
    ) -> TestWriteView: ...

    async def read_point(self, device_id: str, point: str) -> PointRead: ...

    async def validate_config(self, path: str) -> ValidationView: ...

    async def close(self) -> None: ...

"""The pipe protocol between the DNP3 driver (gateway process) and its master child process.

One JSON object per line, strictly request/response (the driver sends one request and waits for
its answer). Requests carry `id` and `op`; answers echo `id` and carry `ok` (and `error` when
not ok). Operations:

  open     {host, port, master, outstation, timeout_s, points: {"ai": [..], "bi": [..],
           "bo": [..]}}                     -> {}
  poll     {classes: "integrity" | "events"}
           -> {iin, ai: [[index, raw, flags]], bi: [...], bo: [...]}
           (only the indices named at open; a point the outstation did not report is absent)
  operate  {mode: "direct" | "sbo", analog: [[index, raw_int]], crob: [[index, "latch_on" |
           "latch_off"]]}                    -> {status: [int per operation, analog then crob]}
  close    {}                                -> {}

An error the master met on the link (`link: true`) closes the association; the next request
reopens it. The child never exits on a device error; it exits on EOF of its stdin.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendError",
    "decode",
    "encode",
]

# backend name -> module that provides `make_backend() -> Backend`
BACKENDS: dict[str, str] = {
    "dnp3py": "drivers.dnp3.backend_dnp3py",
    "pydnp3": "drivers.dnp3.backend_pydnp3",
}


class BackendError(Exception):
    """A master operation failed; `link` = the association is gone (reopen before the next)."""

    def __init__(self, message: str, *, link: bool = False) -> None:
        super().__init__(message)
        self.link = link


PointValues = list[list[float]]


class Backend(Protocol):
    """What a DNP3 master backend does inside the child process."""

    async def open(self, request: dict[str, Any]) -> None: ...

    async def poll(self, integrity: bool) -> dict[str, Any]: ...

    async def operate(
        self, sbo: bool, analog: list[tuple[int, int]], crob: list[tuple[int, bool]]
    ) -> list[int]: ...

    async def close(self) -> None: ...


def encode(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, separators=(",", ":")) + "\n").encode()


def decode(line: bytes) -> dict[str, Any]:
    obj = json.loads(line)
    if not isinstance(obj, dict):
        raise ValueError("DNP3 worker protocol: a message is a JSON object")
    return obj

"""Helpers shared by the tests: free ports, waiting on conditions, required services."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import socket
import time
from collections.abc import Awaitable, Callable

import pytest

REQUIRE_SERVICES = os.environ.get("DERGW_REQUIRE_SERVICES") == "1"


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (bind to 0, read it back, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def require_binary(name: str, why: str) -> str:
    """Path of `name`; skip when absent on a laptop, fail when DERGW_REQUIRE_SERVICES=1 (CI)."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} not found on PATH ({why}); install it to run this test"
        if REQUIRE_SERVICES:
            pytest.fail(f"{message}; DERGW_REQUIRE_SERVICES=1 makes this a failure")
        pytest.skip(message)
    return path


def require_module(name: str, why: str) -> None:
    """Skip when module `name` is not installed on a laptop; fail when DERGW_REQUIRE_SERVICES=1."""
    if importlib.util.find_spec(name) is None:
        message = f"{name} is not installed ({why})"
        if REQUIRE_SERVICES:
            pytest.fail(f"{message}; DERGW_REQUIRE_SERVICES=1 makes this a failure")
        pytest.skip(message)


def wait_until(
    predicate: Callable[[], bool], *, timeout_s: float, interval_s: float = 0.05, what: str = ""
) -> None:
    """Poll `predicate` until true; fail the test with `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what or predicate}")
        time.sleep(interval_s)


async def async_wait_until(
    predicate: Callable[[], bool | Awaitable[bool]],
    *,
    timeout_s: float,
    interval_s: float = 0.05,
    what: str = "",
) -> None:
    """Async twin of wait_until; `predicate` may be a plain or an async callable."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what or predicate}")
        await asyncio.sleep(interval_s)

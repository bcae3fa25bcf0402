"""sd_notify: the pure watchdog rule, the wire protocol on a real datagram socket, and a real
gateway that says READY, pets while healthy, stops petting when its control loop stalls."""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.config import GatewayConfig
from gateway.runtime.app import Gateway
from gateway.sdnotify import (
    Notifier,
    Progress,
    watchdog_max_age_s,
    watchdog_ok,
    watchdog_pet_interval_s,
)
from tests.support import async_wait_until

S = 1_000_000_000

# -- the pure rule ----------------------------------------------------------------------------


def test_watchdog_ok_needs_both_recent() -> None:
    assert watchdog_ok(10 * S, 10 * S, 12 * S, 5 * S)
    assert watchdog_ok(7 * S, 7 * S, 12 * S, 5 * S)  # exactly max age: still fine
    assert not watchdog_ok(6 * S, 11 * S, 12 * S, 5 * S)  # control stalled
    assert not watchdog_ok(11 * S, 6 * S, 12 * S, 5 * S)  # outbox blocked
    assert not watchdog_ok(None, 11 * S, 12 * S, 5 * S)  # no cycle yet
    assert not watchdog_ok(11 * S, None, 12 * S, 5 * S)  # no commit round yet


ages = st.integers(min_value=0, max_value=10**12)


@given(cycle_age=ages, outbox_age=ages, max_age=ages)
def test_watchdog_ok_is_both_ages_within_max(cycle_age: int, outbox_age: int, max_age: int) -> None:
    now = 10**13
    assert watchdog_ok(now - cycle_age, now - outbox_age, now, max_age) == (
        cycle_age <= max_age and outbox_age <= max_age
    )


def test_pet_interval_is_half_watchdog_usec_for_this_process() -> None:
    assert watchdog_pet_interval_s({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_pet_interval_s({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": "42"}, 42) == 0.2
    assert watchdog_pet_interval_s({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": "41"}, 42) is None
    assert watchdog_pet_interval_s({}) is None
    assert watchdog_pet_interval_s({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_pet_interval_s({"WATCHDOG_USEC": "soon"}) is None


def test_max_age_never_below_three_periods() -> None:
    assert watchdog_max_age_s(15.0, control_period_s=1.0, commit_s=0.1) == 15.0
    assert watchdog_max_age_s(15.0, control_period_s=60.0, commit_s=0.1) == 180.0
    assert watchdog_max_age_s(15.0, control_period_s=1.0, commit_s=30.0) == 90.0


def test_progress_stamps_changes_only() -> None:
    progress = Progress()
    assert progress.observe(5, 1 * S) is None  # first sight: no change seen yet
    assert progress.observe(5, 2 * S) is None
    assert progress.observe(6, 3 * S) == 3 * S
    assert progress.observe(6, 9 * S) == 3 * S


# -- the wire protocol ------------------------------------------------------------------------


@pytest.fixture
def listener() -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket in the abstract namespace, as systemd's $NOTIFY_SOCKET may be."""
    name = f"dergw-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5.0)
    try:
        yield sock, "@" + name
    finally:
        sock.close()


def test_notifier_is_a_no_op_without_notify_socket() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    assert not notifier.ready("x")
    assert notifier.sent == 0


def test_notifier_speaks_to_an_abstract_socket(listener: tuple[socket.socket, str]) -> None:
    sock, address = listener
    notifier = Notifier({"NOTIFY_SOCKET": address})
    assert notifier.ready("site s, 2 devices")
    assert sock.recv(4096) == b"READY=1\nSTATUS=site s, 2 devices"
    assert notifier.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    assert notifier.stopping()
    assert sock.recv(4096) == b"STOPPING=1"


def test_notifier_speaks_to_a_path_socket() -> None:
    # A short directory: AF_UNIX paths are limited to 108 bytes.
    with tempfile.TemporaryDirectory(prefix="dergw-") as tmp:
        path = os.path.join(tmp, "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            sock.settimeout(5.0)
            assert Notifier({"NOTIFY_SOCKET": path}).status("hello")
            assert sock.recv(4096) == b"STATUS=hello"


def test_a_vanished_socket_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": f"@dergw-nobody-{uuid.uuid4().hex}"})
    assert not notifier.watchdog()
    assert "sd_notify" in caplog.text


# -- a real gateway ---------------------------------------------------------------------------


def _config(state_dir: Path) -> GatewayConfig:
    return GatewayConfig.model_validate(
        {
            "gateway": {"id": "gw-notify", "state_dir": str(state_dir)},
            "site": {"id": "site-notify", "name": "Notify"},
            # Nothing listens on port 1: the gateway runs offline, as it must be able to.
            "uplink": {"transport": "grpc", "target": "127.0.0.1:1", "tls": False},
            "control": {"period_s": 0.05, "revert_timeout_s": 2, "refresh_s": 1},
            "outbox": {"commit_interval_s": 0.05},
            "local_api": {"enabled": False},
        }
    )


async def test_gateway_ready_pets_while_healthy_and_stops_when_control_stalls(
    tmp_path: Path, listener: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, address = listener
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # pets every 0.2 s; max age 0.2 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    gateway = Gateway(_config(tmp_path / "state"))

    messages: list[tuple[float, bytes]] = []

    async def read() -> None:
        loop = asyncio.get_running_loop()
        while True:
            messages.append((time.monotonic(), await loop.sock_recv(sock, 4096)))

    def pets_since(t: float) -> int:
        return sum(1 for at, m in messages if m == b"WATCHDOG=1" and at > t)

    # The fault: a control cycle that never finishes (a hung device write, say).
    hang = asyncio.Event()
    real_step = gateway.control.step

    async def step() -> None:
        if not hang.is_set():
            await real_step()
            return
        await asyncio.Event().wait()

    monkeypatch.setattr(gateway.control, "step", step)

    stop = asyncio.Event()
    reader = asyncio.create_task(read())
    running = asyncio.create_task(gateway.run(stop))
    try:
        await async_wait_until(lambda: bool(messages), timeout_s=10, what="READY=1")
        assert messages[0][1].startswith(b"READY=1\nSTATUS=site site-notify")
        await async_wait_until(lambda: pets_since(0) >= 3, timeout_s=10, what="watchdog pets")

        hang.set()

        def quiet_for_a_second() -> bool:
            last = max(at for at, m in messages if m == b"WATCHDOG=1")
            return time.monotonic() - last > 1.0

        await async_wait_until(quiet_for_a_second, timeout_s=10, what="pets to stop")
    finally:
        stop.set()
        await asyncio.wait_for(running, timeout=30)
        await async_wait_until(
            lambda: any(m.startswith(b"STOPPING=1") for _, m in messages),
            timeout_s=5,
            what="STOPPING=1",
        )
        reader.cancel()

"""Headend composition: listeners, startup failures, ownership of the store."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import httpx
import pytest

from headend_min.app import Headend, HeadendStartError, _listen_http
from headend_min.config import Endpoint, HeadendConfig
from headend_min.sqlite_store import SqliteStore


def test_http_listener_is_tcp_so_responses_are_not_delayed() -> None:
    # asyncio sets TCP_NODELAY on accepted connections only for proto == IPPROTO_TCP; with
    # proto 0 every HTTP response waited ~40 ms for the client's delayed ACK.
    sock = _listen_http(Endpoint("127.0.0.1", 0))
    try:
        assert sock.proto == socket.IPPROTO_TCP
        assert sock.getsockname()[1] > 0
    finally:
        sock.close()


async def test_http_round_trip_is_fast(tmp_path: Path) -> None:
    config = HeadendConfig(
        grpc=Endpoint("127.0.0.1", 0), http=Endpoint("127.0.0.1", 0), db_path=tmp_path / "h.db"
    )
    async with (
        Headend(config) as headend,
        httpx.AsyncClient(base_url=f"http://{headend.http_endpoint}/api/v1") as http,
    ):
        await http.get("/healthz")
        durations = []
        for _ in range(5):
            started = time.monotonic()
            assert (await http.get("/healthz")).status_code == 200
            durations.append(time.monotonic() - started)
        assert sorted(durations)[2] < 0.03  # the median; Nagle + delayed ACK would make it 40 ms


async def test_busy_port_is_reported_with_its_address(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = HeadendConfig(
            grpc=Endpoint("127.0.0.1", 0),
            http=Endpoint("127.0.0.1", port),
            db_path=tmp_path / "h.db",
        )
        with pytest.raises(HeadendStartError, match=f"127.0.0.1:{port}"):
            await Headend(config).start()


async def test_a_given_store_stays_open(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "h.db")
    config = HeadendConfig(
        grpc=Endpoint("127.0.0.1", 0), http=Endpoint("127.0.0.1", 0), db_path=tmp_path / "unused"
    )
    async with Headend(config, store=store):
        pass
    assert await store.list_sites() == []  # still usable: the caller owns it
    await store.close()
    assert not (tmp_path / "unused").exists()

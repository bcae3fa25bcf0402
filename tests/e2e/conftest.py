"""End-to-end fixtures: the HIL bench (simulated site in-process, headend and gateway as real
child processes on loopback) and small helpers to wait on what the site physically does."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from hil.scenarios.harness import Bench, open_bench
from hil.site import SiteSpec, load_site


def site_spec(name: str) -> SiteSpec:
    return load_site(Path(str(resources.files("hil") / "sites" / name)))


BenchFactory = Callable[..., AbstractAsyncContextManager[Bench]]


@pytest_asyncio.fixture
async def bench_factory(tmp_path: Path) -> AsyncIterator[BenchFactory]:
    """`async with bench_factory("twelve.toml", **gateway_config_options) as bench:`."""
    counter = 0

    def factory(site: str = "demo.toml", **options: Any) -> AbstractAsyncContextManager[Bench]:
        nonlocal counter
        counter += 1
        return open_bench(site_spec(site), tmp_path / f"bench{counter}", **options)

    yield factory


async def started(bench: Bench) -> Bench:
    """Start the gateway and wait until the headend shows every device discovered."""
    await bench.start_gateway()
    await bench.wait_registered()
    return bench


async def wait_point(
    bench: Bench,
    device_id: str,
    ref: str,
    predicate: Callable[[Any], bool],
    *,
    timeout_s: float = 10.0,
) -> Any:
    """Wait until the simulator's register `ref` of `device_id` satisfies `predicate`."""
    deadline = time.monotonic() + timeout_s
    value = None
    while time.monotonic() < deadline:
        value = bench.sim.read_point(device_id, ref)
        if predicate(value):
            return value
        await asyncio.sleep(0.05)
    pytest.fail(f"{device_id} {ref} = {value!r}: condition not met within {timeout_s} s")


async def wait_api(
    bench: Bench,
    path: str,
    predicate: Callable[[Any], bool],
    *,
    timeout_s: float = 10.0,
    what: str = "",
) -> Any:
    """Poll the headend API until `predicate(json)` holds."""
    deadline = time.monotonic() + timeout_s
    body = None
    while time.monotonic() < deadline:
        body = await bench.api.get(path)
        if predicate(body):
            return body
        await asyncio.sleep(0.1)
    pytest.fail(f"GET {path}: {what or 'condition'} not met within {timeout_s} s; last: {body!r}")


def responses_for(body: list[dict[str, Any]], event_id: str) -> list[str]:
    """Event response statuses for `event_id`, in the order the gateway emitted them."""
    return [r["status"] for r in sorted(body, key=lambda r: r["seq"]) if r["event_id"] == event_id]

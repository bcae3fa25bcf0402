"""Shared fixtures for the DNP3 driver tests: the backends on this machine and a sim + driver."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from drivers.contract import DeviceKind
from drivers.dnp3.driver import Dnp3Driver, Dnp3Params, available_backends
from gateway.clock import SystemClock
from tests.support import REQUIRE_SERVICES

PYDNP3_WHY = "`make pydnp3` builds its wheel once: packaging/pydnp3/build-wheel --install"
# Every backend available on this machine: dnp3py always (a dev dependency), pydnp3 where its
# wheel was built and installed. CI (DERGW_REQUIRE_SERVICES=1) builds pydnp3 on CPython 3.11,
# the Python its recipe targets, so there a missing pydnp3 fails its tests instead of hiding them.
BACKENDS = ["dnp3py", *(name for name in available_backends() if name != "dnp3py")]
if REQUIRE_SERVICES and sys.version_info[:2] == (3, 11) and "pydnp3" not in BACKENDS:
    BACKENDS.append("pydnp3")
RATING_W = 5_000_000.0


def backend_param(name: str) -> Any:
    """A pytest param for backend `name` (kept as a function: the ids read as the backend)."""
    return pytest.param(name, id=name)


@asynccontextmanager
async def plant(backend: str, **params: Any) -> AsyncIterator[tuple[Any, Dnp3Driver]]:
    from hil.dnp3_sim import Dnp3PlantSimulator

    sim = Dnp3PlantSimulator(rating_w=RATING_W)
    await sim.start()
    settings: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": sim.port,
        "backend": backend,
        # Short enough that a silent outstation shows quickly, long enough for a full integrity
        # poll (six fragments) from an outstation in the same busy test process.
        "timeout_s": 1.0,
        "restart_backoff_s": 0.2,
    }
    settings.update(params)
    driver = Dnp3Driver("plant1", DeviceKind.PV, Dnp3Params(**settings), SystemClock())
    try:
        yield sim, driver
    finally:
        await driver.close()
        await sim.stop()

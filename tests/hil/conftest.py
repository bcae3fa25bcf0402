"""Shared builders for the simulator tests: site specs and running simulators on loopback."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from typing import Any

import pytest

from hil.server import SiteSimulator
from hil.site import SiteSpec

# A quiet demo-like site: constant profiles and no noise, so register values are exact.
QUIET_SITE: dict[str, Any] = {
    "name": "quiet",
    "seed": 7,
    "physics_hz": 20,
    "host": "127.0.0.1",
    "port": 0,
    "grid": {"nominal_v": 230.0, "nominal_hz": 50, "v_noise": 0.0, "hz_noise": 0.0},
    "profiles": {
        "irradiance": [[0, 850]],
        "load": [[0, 3000]],
        "irradiance_noise_pct": 0.0,
        "load_noise_pct": 0.0,
    },
    "devices": [
        {
            "id": "pv1",
            "kind": "pv",
            "unit_id": 1,
            "rating_w": 10000,
            "ramp_pct_per_s": 100,
            "w_sf": 1,
            "pct_sf": -1,
        },
        {
            "id": "bat1",
            "kind": "battery",
            "unit_id": 2,
            "rating_w": 5000,
            "capacity_wh": 10000,
            "soc_pct": 50,
            "pct_sf": -2,
        },
        {"id": "meter1", "kind": "meter", "role": "pcc", "unit_id": 3},
    ],
}


# A 7xx PV inverter (1/701/702/704) to add to QUIET_SITE's devices.
PV7: dict[str, Any] = {
    "id": "pv7",
    "kind": "pv",
    "family": "7xx",
    "unit_id": 7,
    "rating_w": 6000,
    "ramp_pct_per_s": 100,
    "pct_sf": -2,
}


def site_spec(**overrides: Any) -> SiteSpec:
    """QUIET_SITE with top-level keys replaced."""
    data = copy.deepcopy(QUIET_SITE)
    data.update(overrides)
    return SiteSpec.model_validate(data)


@pytest.fixture
async def quiet_sim() -> AsyncIterator[SiteSimulator]:
    sim = SiteSimulator(site_spec())
    await sim.start()
    try:
        yield sim
    finally:
        await sim.stop()

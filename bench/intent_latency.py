"""Benchmark: headend intent POST -> device register written (loopback, HIL).

The product as installed, on loopback: a real `dergw headend run` (HTTPS API, mTLS gRPC), a real
`dergw gateway run` enrolled with a one-time token, and the demo site simulated in this process
(`hil.scenarios.harness.open_bench`). The gateway runs at the product's default 1 s polling and
1 s control period: an intent must reach the devices by waking the control loop, not by waiting
for its next period.

A sequence of max-generation caps (immediate-start events, each replacing the last, alternating
between two percentages so every one changes the PV inverter's WMaxLimPct) is posted over the
headend's HTTP API as an operator would. Each latency runs from just before the POST (the
request is sent from a worker thread, as `HeadendApi` does) to the instant the simulator accepts
the Modbus write that makes WMaxLimPct hold the new value: a write listener on the simulator
(`SiteSimulator.add_write_listener`) stamps it in the request handler, on the same monotonic
clock, so there is no sampling error. The POST round trip alone (the headend composing, signing
and committing the version) is reported beside it.

`running_site` (the bench up, the gateway registered) is shared with `bench.export_breach`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from bench.core import BenchOptions, Budget, Figure, latency_figure, percentile
from hil.scenarios.harness import Bench, BenchError, open_bench
from hil.scenarios.watch import iso
from hil.server import AcceptedWrite, SiteSimulator
from hil.site import SiteSpec, load_site

NAME = "intent-latency"
PV_ID = "pv1"
# The demo site's PV inverter is SunSpec 1xx: the cap is 123.WMaxLimPct (pct_sf -1: 0.1 %).
LIMIT_REF = "123.WMaxLimPct"
CAPS_PCT = (60.0, 70.0)  # alternated, so each intent moves the register
APPLY_TIMEOUT_S = 5.0
GAP_S = 0.2  # between a write landing and the next POST: posts never queue behind each other


@dataclass(frozen=True)
class _Plan:
    intents: int
    warmup: int  # first intents not counted (first TLS handshakes, cold code paths)


FULL = _Plan(intents=103, warmup=3)
QUICK = _Plan(intents=4, warmup=1)


def demo_site() -> SiteSpec:
    return load_site(Path(str(resources.files("hil") / "sites" / "demo.toml")))


@contextlib.asynccontextmanager
async def running_site(
    options: BenchOptions, spec: SiteSpec, *, prefix: str, tls: bool, **config: Any
) -> AsyncIterator[Bench]:
    """The HIL bench for `spec` with its gateway started and every device registered at the
    headend; `config` goes to the gateway config (`gateway_config_text`). Everything it
    started is stopped on exit, also on error or cancellation."""
    with tempfile.TemporaryDirectory(prefix=prefix, dir=options.workdir) as tmp:
        async with open_bench(spec, Path(tmp), tls=tls, **config) as bench:
            await bench.start_gateway()
            await bench.wait_registered()
            yield bench


@dataclass
class LimitWatch:
    """The accepted writes that set one device's limit register, stamped by the simulator."""

    sim: SiteSimulator
    device_id: str
    ref: str
    writes: list[tuple[float, float]] = field(default_factory=list)  # (monotonic, value)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def __call__(self, write: AcceptedWrite) -> None:
        if write.device_id == self.device_id and self.ref in write.refs:
            value = self.sim.read_point(self.device_id, self.ref)
            self.writes.append((write.mono, float(value) if value is not None else math.nan))
            self.changed.set()

    def first(self, *, after: float, value: float) -> float | None:
        """When the register was first written to hold `value` at or after `after`."""
        return next(
            (mono for mono, held in self.writes if mono >= after and abs(held - value) < 0.05),
            None,
        )

    async def wait_for(self, *, after: float, value: float, timeout_s: float) -> float | None:
        deadline = time.monotonic() + timeout_s
        while (landed := self.first(after=after, value=value)) is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), timeout=remaining)
        return landed


async def _post_cap(bench: Bench, index: int, pct: float) -> int:
    posted = await bench.api.post(
        f"/sites/{bench.site_id}/intents",
        {
            "replace_events": True,  # one event in force: the document stays the same size
            "events": [
                {
                    "event_id": f"bench-cap-{index}",
                    "start": iso(time.time()),
                    "duration_s": 600,
                    "controls": {"max_gen_pct": pct},
                }
            ],
        },
    )
    return int(posted["version"])


async def run(options: BenchOptions) -> list[Figure]:
    plan = QUICK if options.quick else FULL
    spec = demo_site()
    async with running_site(
        options,
        spec,
        prefix="dergw-intent-",
        tls=True,
        poll_period_s=1.0,
        control_period_s=1.0,
    ) as bench:
        watch = LimitWatch(bench.sim, PV_ID, LIMIT_REF)
        remove = bench.sim.add_write_listener(watch)
        try:
            latencies: list[float] = []
            posts: list[float] = []
            warmups: list[float] = []
            for index in range(plan.intents):
                pct = CAPS_PCT[index % len(CAPS_PCT)]
                sent = time.monotonic()
                version = await _post_cap(bench, index, pct)
                answered = time.monotonic()
                landed = await watch.wait_for(after=sent, value=pct, timeout_s=APPLY_TIMEOUT_S)
                if landed is None:
                    raise BenchError(
                        f"intent v{version} (cap {pct:g} %) did not reach {PV_ID} "
                        f"{LIMIT_REF} within {APPLY_TIMEOUT_S:g} s; gateway log:\n"
                        + (bench.gateway.log_tail() if bench.gateway else "")
                    )
                if index < plan.warmup:
                    warmups.append(landed - sent)
                else:
                    latencies.append(landed - sent)
                    posts.append(answered - sent)
                await asyncio.sleep(GAP_S)
        finally:
            remove()
    note = (
        f"n={len(latencies)} ({plan.warmup} warm-up dropped), immediate max_gen_pct events; "
        "HTTPS POST -> headend -> mTLS gRPC -> gateway (1 s poll/control) -> Modbus write, "
        "stamped by the simulator on accept; demo site"
    )
    figure = latency_figure(
        NAME,
        "intent POST -> PV limit register written",
        latencies,
        budget=Budget("<=", 250, checked="p99"),
        note=note,
    )
    post_figure = latency_figure(
        NAME,
        "of which: POST round trip (headend commit + answer)",
        posts,
        note=f"n={len(posts)}; the rest is headend push -> gateway -> device",
    )
    extra = {
        "samples_ms": [round(s * 1e3, 2) for s in latencies],
        "post_samples_ms": [round(s * 1e3, 2) for s in posts],
        "warmup_samples_ms": [round(s * 1e3, 2) for s in warmups],
        "max_ms": max(latencies) * 1e3 if latencies else math.nan,
        "after_post_p99_ms": percentile([a - p for a, p in zip(latencies, posts, strict=True)], 99)
        * 1e3,
        "tls": True,
    }
    return [replace(figure, extra=extra), post_figure]

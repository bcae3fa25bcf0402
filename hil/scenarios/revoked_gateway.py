"""`revoked-gateway`: a gateway's certificate is revoked while it streams under a cap.

Runs as installed (`--tls`): the headend has its own CA, the gateway enrolled with a one-time
token and streams over mTLS. The operator posts a cap (`pct`), then revokes the gateway with
`dergw headend gateways revoke`. Judged:

- the headend ends the revoked gateway's open stream (it shows offline) without a restart;
- the gateway classifies the refusal as `revoked` and backs off instead of hammering: during
  `observe_s` after that, the headend refuses at most `max_attempts` connection attempts;
- the gateway cannot renew its certificate (the headend answers 403);
- the site keeps following its cached intent: the cap stays at `pct` at the registers throughout
  (the cloud is not in the control loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TextIO

from hil.scenarios.harness import Bench, BenchError
from hil.scenarios.probe import site_devices
from hil.scenarios.report import Check, ScenarioResult
from hil.scenarios.watch import SiteWatcher, capped_at, iso, not_capped_at

__all__ = ["RevokedGatewayParams", "run_revoked_gateway"]

REJECTED_LINE = "certificate rejected (revoked)"
# What the headend logs when it refuses a revoked gateway: at the gRPC handshake's call, or a
# message through the broker (which authenticates certificates but knows no revocations).
REFUSED_LINES = ("refused gRPC call", "no valid certificate")


@dataclass(frozen=True)
class RevokedGatewayParams:
    pct: float = 60.0
    event_s: float = 900.0
    apply_timeout_s: float = 15.0
    # The headend ends a revoked gateway's stream from its presence loop (keepalive / 2).
    offline_timeout_s: float = 30.0
    observe_s: float = 8.0
    max_attempts: int = 2


async def _online(bench: Bench) -> bool | None:
    with contextlib.suppress(BenchError, OSError):
        gateway = await bench.api.get(f"/gateways/{bench.gateway_id}")
        return bool(gateway["online"])
    return None


def _log(bench: Bench, which: str) -> str:
    process = bench.gateway if which == "gateway" else bench.headend
    if process is None:
        return ""
    try:
        return process.log_path.read_text(errors="replace")
    except OSError:
        return ""


def _refusals(bench: Bench) -> int:
    text = _log(bench, "headend")
    return sum(text.count(line) for line in REFUSED_LINES)


async def _wait(predicate: Callable[[], Awaitable[bool]], timeout_s: float) -> float | None:
    """Seconds until `predicate()` is true, or None on timeout."""
    started = time.monotonic()
    deadline = started + timeout_s
    while time.monotonic() < deadline:
        if await predicate():
            return time.monotonic() - started
        await asyncio.sleep(0.2)
    return None


async def run_revoked_gateway(
    bench: Bench, out: TextIO, params: RevokedGatewayParams | None = None
) -> ScenarioResult:
    params = params or RevokedGatewayParams()
    result = ScenarioResult(f"revoked-gateway ({bench.transport})")
    result.checks.extend(site_devices(bench).requirements("pv"))
    if not bench.tls:
        result.checks.append(
            Check("runs with TLS", False, "revoked-gateway needs mTLS: run it with --tls")
        )
    if result.checks:
        return result
    await bench.start_gateway()
    await bench.wait_registered()
    async with SiteWatcher(bench, out) as watch:
        await bench.api.post(
            f"/sites/{bench.site_id}/intents",
            {
                "events": [
                    {
                        "event_id": "cap-before-revocation",
                        "start": iso(time.time()),
                        "duration_s": params.event_s,
                        "controls": {"max_gen_pct": params.pct},
                    }
                ]
            },
        )
        applied = await watch.wait_for(capped_at(params.pct), timeout_s=params.apply_timeout_s)
        result.checks.append(
            Check(
                "the enrolled gateway streams over mTLS and applies the cap",
                applied is not None,
                f"cap {params.pct:g} % {'applied' if applied else 'never applied'}",
            )
        )
        if applied is None:
            return result

        revoked_at = time.time()
        listing = await bench.admin_command("gateways", "revoke", bench.gateway_id)
        watch.note(f"revoked: {listing.splitlines()[0] if listing else bench.gateway_id}")

        async def offline() -> bool:
            return await _online(bench) is False

        took = await _wait(offline, params.offline_timeout_s)
        result.checks.append(
            Check(
                "the headend ends the revoked gateway's open stream",
                took is not None,
                f"offline {took:.1f} s after the revocation"
                if took is not None
                else f"still online after {params.offline_timeout_s:g} s",
            )
        )

        async def classified() -> bool:
            return REJECTED_LINE in _log(bench, "gateway")

        seen = await _wait(classified, params.offline_timeout_s)
        refused_before = _refusals(bench)
        await asyncio.sleep(params.observe_s)
        attempts = _refusals(bench) - refused_before
        result.checks.append(
            Check(
                "the gateway knows it is revoked and backs off instead of hammering",
                seen is not None and attempts <= params.max_attempts,
                ("classified 'revoked'" if seen is not None else "never classified 'revoked'")
                + f"; {attempts} refused attempts in the next {params.observe_s:g} s "
                f"(at most {params.max_attempts})",
            )
        )
        result.figures["refused_attempts"] = float(attempts)

        # The gateway's own renewal, asked for now (`dergw enroll --renew`) instead of at 2/3
        # of the certificate's lifetime.
        code, answer = await bench.gateway_command("enroll", "--renew")
        refused = code == 1 and "HTTP 403" in answer
        result.checks.append(
            Check("a revoked gateway cannot renew", refused, f"exit {code}: {answer.strip()}")
        )

        moved = watch.first(not_capped_at(params.pct), after=revoked_at)
        result.checks.append(
            Check(
                "the site keeps its cached intent: the cap holds after the revocation",
                moved is None,
                f"cap {params.pct:g} % held for {time.time() - revoked_at:.0f} s"
                if moved is None
                else f"cap moved {moved.wall - revoked_at:.1f} s after the revocation",
            )
        )
    return result

"""Issue 6's acceptance, run as the scenarios users run (`dergw hil scenario NAME --check`).

`forged-intent`: a compromised broker publishes forged, tampered, replayed, expired,
misaddressed and unsigned intents on the gateway's topic; none changes the site, each shows as
rejected at the headend, and a genuine intent is still applied afterwards.
`revoked-gateway` (mTLS, enrolled gateway): revoked mid-event, its stream is ended, it cannot
reconnect or renew and backs off; the site keeps its cached cap.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from hil.scenarios.runner import SCENARIOS, run_scenario
from tests.mqtt_support import mosquitto_binary

pytestmark = pytest.mark.hil  # real processes and sockets on loopback


async def test_forged_intents_change_nothing_and_show_as_rejected(tmp_path: Path) -> None:
    assert SCENARIOS["forged-intent"].transports == ("mqtt",)
    mosquitto_binary()
    out = io.StringIO()
    result = await run_scenario("forged-intent", workdir=tmp_path, out=out, transport="mqtt")
    failed = "\n".join(f"{c.name}: {c.detail}" for c in result.checks if not c.passed)
    assert result.passed, f"failed checks:\n{failed}\n--- output ---\n{out.getvalue()}"
    shown = [c.detail for c in result.checks if c.name.endswith("shown as rejected at the headend")]
    reasons = [detail.split("REJECTED: ")[1].split(":")[0] for detail in shown]
    assert reasons == [
        "BAD_SIGNATURE",
        "BAD_SIGNATURE",
        "REPLAYED",
        "EXPIRED",
        "MISADDRESSED",
        "UNSIGNED",
    ]


@pytest.mark.parametrize("transport", ["grpc", "mqtt"])
async def test_a_revoked_gateway_is_cut_off_and_the_site_keeps_its_cap(
    tmp_path: Path, transport: str
) -> None:
    assert SCENARIOS["revoked-gateway"].tls
    if transport == "mqtt":
        mosquitto_binary()  # the broker's mTLS listener with per-gateway ACLs
    out = io.StringIO()
    result = await run_scenario("revoked-gateway", workdir=tmp_path, out=out, transport=transport)
    failed = "\n".join(f"{c.name}: {c.detail}" for c in result.checks if not c.passed)
    assert result.passed, f"failed checks:\n{failed}\n--- output ---\n{out.getvalue()}"

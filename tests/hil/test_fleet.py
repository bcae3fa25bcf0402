"""The fleet simulator against a real `dergw headend run`: connects, acks, restarts, no seq lost."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from hil.fleet import Fleet, FleetSpec, Second, reconnect_curve
from hil.scenarios.harness import HeadendApi, ManagedProcess, spawn_dergw, wait_headend_ready
from tests.support import free_tcp_port

pytestmark = [pytest.mark.hil, pytest.mark.slow]

GATEWAYS = 50


class _Headend:
    """A plaintext headend child process on fixed ports (a restart keeps them)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.grpc = f"127.0.0.1:{free_tcp_port()}"
        self.http = f"127.0.0.1:{free_tcp_port()}"
        self.process: ManagedProcess | None = None

    async def start(self) -> None:
        args = ["headend", "run", "--grpc", self.grpc, "--http", self.http]
        args += ["--db", str(self.workdir / "headend.sqlite3"), "--log-level", "WARNING"]
        args += ["--admin-token-file", str(self.workdir / "admin-token")]
        self.process = await spawn_dergw(
            "headend", args, self.workdir / "headend.log", append=self.process is not None
        )
        await wait_headend_ready(self.process)

    async def stop(self) -> None:
        if self.process is not None:
            await self.process.stop()

    def api(self) -> HeadendApi:
        token = (self.workdir / "admin-token").read_text().strip()
        return HeadendApi(f"http://{self.http}", token)


@pytest.fixture
async def headend(tmp_path: Path) -> AsyncIterator[_Headend]:
    running = _Headend(tmp_path)
    await running.start()
    try:
        yield running
    finally:
        await running.stop()


def _acked(fleet: Fleet) -> int:
    return sum(second.acked for second in fleet.seconds)


async def test_fleet_connects_streams_and_survives_a_headend_restart(headend: _Headend) -> None:
    spec = FleetSpec(target=headend.grpc, gateways=GATEWAYS, batch_interval_s=0.5, points=5)
    async with Fleet(spec, processes=2, connect_over_s=0.5) as fleet:
        assert await fleet.wait_connected(GATEWAYS, 30.0), f"connected: {fleet.connected}"
        assert await fleet.wait_for(lambda: _acked(fleet) >= 2 * GATEWAYS, 20.0)
        latencies = [x for second in fleet.seconds for x in second.latencies_s]
        assert latencies
        assert max(latencies) < 5.0

        await headend.stop()
        stopped = time.time()
        assert await fleet.wait_for(lambda: fleet.connected == 0, 20.0)
        await headend.start()
        ready = time.time()
        assert await fleet.wait_connected(GATEWAYS, 60.0), f"reconnected: {fleet.connected}"
        acked_before = _acked(fleet)
        assert await fleet.wait_for(lambda: _acked(fleet) >= acked_before + GATEWAYS, 20.0)
        await fleet.stop(drain_s=10.0)

    final = fleet.final()
    assert final["gateways"] == GATEWAYS
    assert final["unacked"] == 0
    assert final["sessions"] >= 2 * GATEWAYS  # every gateway reconnected at least once
    curve, reached = reconnect_curve(fleet.window(stopped), ready, GATEWAYS)
    assert reached[100] is not None, curve

    # The headend committed every seq each gateway sent: none lost across the restart.
    gateways = await headend.api().get("/gateways")
    committed = {row["gateway_id"]: row["committed_seq"] for row in gateways}
    sent = {gateway_id: seqs[0] for gateway_id, seqs in final["seqs"].items()}
    assert committed == sent
    assert all(seq > 0 for seq in sent.values())


async def test_fleet_command_writes_its_timeline(headend: _Headend, tmp_path: Path) -> None:
    out = tmp_path / "fleet.json"
    argv = ["hil", "fleet", "--gateways", "10", "--headend", headend.grpc, "--duration", "3"]
    argv += ["--points", "3", "--json", str(out)]
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", *argv, stdout=asyncio.subprocess.PIPE
    )
    stdout, _ = await asyncio.wait_for(process.communicate(), 60.0)
    assert process.returncode == 0, stdout.decode()
    assert "connected=10" in stdout.decode()
    document = json.loads(out.read_text())
    assert document["final"]["gateways"] == 10
    assert document["final"]["unacked"] == 0
    seconds = [Second.from_json(s) for s in document["seconds"]]
    assert max(s.connected for s in seconds) == 10
    assert sum(s.acked for s in seconds) > 0

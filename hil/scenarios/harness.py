"""The HIL bench: a headend process, a simulated site and a gateway process, wired on loopback.

The simulator runs in this process (it is the test equipment: scenarios read its physics and
registers directly and inject faults); the headend and the gateway are real child processes
started through the `dergw` entry point, so everything between them crosses real sockets. The
bench imports nothing from gateway/, drivers/ or headend_min/: it only starts them by name.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hil.server import SiteSimulator
from hil.site import SiteSpec

__all__ = ["Bench", "BenchError", "HeadendApi", "ManagedProcess", "open_bench"]

READY_PATTERN = re.compile(r"headend ready grpc=(\S+) http=(\S+)")


class BenchError(RuntimeError):
    """The bench could not be brought up; the message says which part and where its log is."""


@dataclass
class ManagedProcess:
    name: str
    process: asyncio.subprocess.Process
    log_path: Path
    ready_lines_before: int = 0

    @property
    def running(self) -> bool:
        return self.process.returncode is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    async def stop(self, timeout_s: float = 10.0) -> int:
        """SIGTERM, then SIGKILL if it does not exit in time. Returns the exit code."""
        if self.running:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), timeout=timeout_s)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        return self.process.returncode if self.process.returncode is not None else -1

    async def kill(self) -> None:
        """SIGKILL (kill -9): no chance to clean up."""
        if self.running:
            self.process.kill()
            await self.process.wait()


class HeadendApi:
    """A minimal JSON client for the headend's HTTP API (urllib, run off the event loop)."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")

    def _request(self, method: str, path: str, body: object | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"{self.base_url}/api/v1{path}",
            data=data,
            method=method,
            headers={"content-type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            raise BenchError(f"{method} {path}: HTTP {exc.code}: {detail}") from None

    async def get(self, path: str) -> Any:
        return await asyncio.to_thread(self._request, "GET", path)

    async def post(self, path: str, body: object) -> Any:
        return await asyncio.to_thread(self._request, "POST", path, body)


@dataclass
class Bench:
    workdir: Path
    spec: SiteSpec
    sim: SiteSimulator
    headend: ManagedProcess | None
    api: HeadendApi
    grpc_target: str
    gateway_id: str
    site_id: str
    gateway: ManagedProcess | None = None
    gateway_config: Path | None = None
    started_mono: float = field(default_factory=time.monotonic)

    def elapsed_s(self) -> float:
        return time.monotonic() - self.started_mono

    async def restart_headend(self, *, down_s: float = 0.0) -> None:
        """Stop the headend and start it again on the same ports and database."""
        if self.headend is None:
            raise BenchError("this bench has no headend of its own")
        await self.headend.stop()
        if down_s:
            await asyncio.sleep(down_s)
        http_addr = self.api.base_url.removeprefix("http://")
        self.headend = await _start_headend(self.workdir, self.grpc_target, http_addr)
        await _wait_headend_ready(self.headend)

    async def stop_headend(self) -> None:
        """Stop the headend (an outage); `restart_headend()` brings it back on the same ports."""
        if self.headend is not None:
            await self.headend.stop()

    def signal_gateway(self, signum: int) -> None:
        """Send a signal to the gateway process (SIGSTOP freezes it, SIGCONT resumes it)."""
        if self.gateway is None or not self.gateway.running:
            raise BenchError("the gateway is not running")
        self.gateway.process.send_signal(signum)

    async def kill_gateway(self) -> None:
        """kill -9 the gateway: no chance to clean up."""
        if self.gateway is not None:
            await self.gateway.kill()

    async def restart_gateway(self) -> ManagedProcess:
        """Stop the gateway (SIGTERM; no-op if already dead) and start it again."""
        if self.gateway is not None:
            await self.gateway.stop()
        return await self.start_gateway()

    async def start_gateway(self) -> ManagedProcess:
        assert self.gateway_config is not None
        self.gateway = await _spawn(
            "gateway",
            ["gateway", "run", "--config", str(self.gateway_config)],
            self.workdir / "gateway.log",
            append=True,
        )
        return self.gateway

    async def wait_registered(self, timeout_s: float = 30.0) -> dict[str, Any]:
        """Wait until the headend shows our gateway online with every device discovered."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.gateway is not None and not self.gateway.running:
                raise BenchError(
                    f"gateway exited with {self.gateway.process.returncode}:\n"
                    + self.gateway.log_tail()
                )
            site = None
            with contextlib.suppress(BenchError):
                site = await self.api.get(f"/sites/{self.site_id}")
            if site is not None:
                online = any(g["online"] for g in site["gateways"])
                # A configured device appears with its points only once the gateway discovered it.
                discovered = [d for d in site["devices"] if d["points"]]
                if online and len(discovered) == len(self.spec.devices):
                    return site
            if time.monotonic() > deadline:
                raise BenchError(
                    f"gateway did not register all {len(self.spec.devices)} devices within "
                    f"{timeout_s:.0f} s; gateway log:\n"
                    + (self.gateway.log_tail() if self.gateway else "")
                )
            await asyncio.sleep(0.2)


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the bench process dies, however it dies."""
    if sys.platform == "linux":
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _dergw_command(args: list[str]) -> list[str]:
    # Started by module path, not imported: the bench keeps its independence from the code under
    # test while using exactly the entry point an installer would.
    return [sys.executable, "-m", "gateway.cli", *args]


async def _spawn(
    name: str, args: list[str], log_path: Path, *, append: bool = False
) -> ManagedProcess:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # Restarts append to the same log; remember how many ready lines were already there.
    previous = log_path.read_text(errors="replace") if append and log_path.exists() else ""  # noqa: ASYNC240
    # A local log file opens in microseconds; not worth a thread hop on the bench.
    with open(log_path, "ab" if append else "wb") as log_file:  # noqa: ASYNC230
        process = await asyncio.create_subprocess_exec(
            *_dergw_command(args),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log_file,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            preexec_fn=_die_with_parent,
        )
    return ManagedProcess(name, process, log_path, len(READY_PATTERN.findall(previous)))


async def _start_headend(workdir: Path, grpc_addr: str, http_addr: str) -> ManagedProcess:
    return await _spawn(
        "headend",
        [
            "headend",
            "run",
            "--grpc",
            grpc_addr,
            "--http",
            http_addr,
            "--db",
            str(workdir / "headend.sqlite3"),
        ],
        workdir / "headend.log",
        append=True,
    )


async def _wait_headend_ready(headend: ManagedProcess, timeout_s: float = 30.0) -> tuple[str, str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not headend.running:
            raise BenchError(f"headend exited early:\n{headend.log_tail()}")
        # The log may hold earlier runs (restarts append): the last ready line is ours.
        matches = READY_PATTERN.findall(headend.log_path.read_text(errors="replace"))
        if len(matches) > headend.ready_lines_before:
            return matches[-1][0], matches[-1][1]
        await asyncio.sleep(0.05)
    raise BenchError(f"headend not ready within {timeout_s:.0f} s:\n{headend.log_tail()}")


def gateway_config_text(
    bench: Bench,
    *,
    control_period_s: float = 0.5,
    poll_period_s: float = 0.5,
    revert_timeout_s: int = 30,
    refresh_s: float | None = None,
    raw_points: bool = False,
    extra_site: str = "",
    extra_control: str = "",
    extra_config: str = "",
    poll_periods: dict[str, float] | None = None,
) -> str:
    """A gateway config (TOML) for the bench's simulated site.

    extra_site / extra_control: TOML lines added to the [site] / [control] tables (e.g.
    "export_limit_w = 5000", "soc_min_pct = 20"); extra_config: whole tables appended at the
    end (e.g. "[control.fallback]" or "[[control.interlocks]]" with their keys);
    poll_periods: per-device poll periods overriding poll_period_s.
    """
    refresh = refresh_s if refresh_s is not None else max(1, revert_timeout_s // 3)
    lines = [
        "# Written by the HIL bench for one run.",
        "[gateway]",
        f'id = "{bench.gateway_id}"',
        f'state_dir = "{bench.workdir / "gateway-state"}"',
        "",
        "[site]",
        f'id = "{bench.site_id}"',
        f'name = "{bench.spec.name}"',
        'substation = "SUB-DEMO"',
        'feeder = "FDR-1"',
        extra_site,
        "",
        "[uplink]",
        'transport = "grpc"',
        f'target = "{bench.grpc_target}"',
        "keepalive_s = 10",
        "reconnect_max_s = 5",
        "",
        "[control]",
        f"period_s = {control_period_s}",
        f"revert_timeout_s = {revert_timeout_s}",
        f"refresh_s = {refresh}",
        extra_control,
        "",
    ]
    for device in bench.spec.devices:
        endpoint = bench.sim.endpoints[device.id]
        lines += [
            "[[devices]]",
            f'id = "{device.id}"',
            f'kind = "{device.kind}"',
            'driver = "sunspec-modbus"',
            f"poll_period_s = {(poll_periods or {}).get(device.id, poll_period_s)}",
        ]
        if device.role:
            lines.append(f'role = "{device.role}"')
        lines += [
            "[devices.params]",
            f'host = "{endpoint.host}"',
            f"port = {endpoint.port}",
            f"unit_id = {endpoint.unit_id}",
            f"raw_points = {'true' if raw_points else 'false'}",
            "",
        ]
    lines.append(extra_config)
    return "\n".join(lines)


def _fresh_state(workdir: Path) -> None:
    """A run starts from nothing: the headend's database and the gateway's state of an earlier
    run in the same workdir would otherwise carry its intents and events into this one."""
    for path in workdir.glob("headend.sqlite3*"):
        path.unlink()
    shutil.rmtree(workdir / "gateway-state", ignore_errors=True)


@contextlib.asynccontextmanager
async def open_bench(
    spec: SiteSpec,
    workdir: Path,
    *,
    gateway_id: str = "demo-gw",
    site_id: str = "demo-site",
    foreign_headend: str | None = None,
    **config_options: Any,
) -> AsyncIterator[Bench]:
    """Start headend and simulator, write the gateway config; stop everything on exit.

    `foreign_headend` ("host:port"): point the gateway at that gRPC endpoint instead of starting
    a headend (tests that play the headend themselves).
    """
    workdir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - local, before anything runs
    _fresh_state(workdir)
    sim = SiteSimulator(spec.with_overrides(port=0))
    await sim.start()
    headend: ManagedProcess | None = None
    bench: Bench | None = None
    try:
        if foreign_headend is None:
            headend = await _start_headend(workdir, "127.0.0.1:0", "127.0.0.1:0")
            grpc_addr, http_addr = await _wait_headend_ready(headend)
        else:
            grpc_addr, http_addr = foreign_headend, "127.0.0.1:9"
        bench = Bench(
            workdir=workdir,
            spec=spec,
            sim=sim,
            headend=headend,
            api=HeadendApi(f"http://{http_addr}"),
            grpc_target=grpc_addr,
            gateway_id=gateway_id,
            site_id=site_id,
        )
        bench.gateway_config = workdir / "gateway.toml"
        bench.gateway_config.write_text(gateway_config_text(bench, **config_options))
        yield bench
    finally:
        if bench is not None and bench.gateway is not None:
            await bench.gateway.stop()
        if bench is not None and bench.headend is not None:
            await bench.headend.stop()
        elif headend is not None:
            await headend.stop()
        await sim.stop()

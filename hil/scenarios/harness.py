"""The HIL bench: a headend process, a simulated site and a gateway process, wired on loopback.

The simulator runs in this process (it is the test equipment: scenarios read its physics and
registers directly and inject faults); the headend and the gateway are real child processes
started through the `dergw` entry point, so everything between them crosses real sockets. The
bench imports nothing from gateway/ or drivers/ (it starts them by name); from headend_min/ only
the CA and the signing key, to enroll a gateway and to play a compromised broker's forgeries.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from headend_min.pki import CertificateAuthority
from headend_min.signing import trust_file_path
from hil.mqtt_broker import BrokerTls, Mosquitto, MosquittoError, find_mosquitto
from hil.server import Endpoint, SiteSimulator
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
    """A minimal JSON client for the headend's HTTP API (urllib, run off the event loop);
    authenticates with `token` (the bench's admin token) when given; over HTTPS it trusts
    `ca_file` (the headend's CA)."""

    def __init__(
        self, base_url: str, token: str | None = None, ca_file: Path | None = None
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self._ssl = ssl.create_default_context(cafile=str(ca_file)) if ca_file else None

    @property
    def address(self) -> str:
        """ "host:port" of the API."""
        return self.base_url.split("://", 1)[-1]

    def _request(self, method: str, path: str, body: object | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        headers = {"content-type": "application/json"}
        if self.token is not None:
            headers["authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(
            f"{self.base_url}/api/v1{path}",
            data=data,
            method=method,
            headers=headers,
        )
        try:
            with urllib.request.urlopen(request, timeout=10, context=self._ssl) as response:
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
    transport: str = "grpc"  # the gateway's uplink: "grpc" or "mqtt"
    broker: Mosquitto | None = None  # the bench's own MQTT broker (transport "mqtt")
    db_url: str = ""  # the headend's --db ("" = the bench's SQLite file)
    tls: bool = False  # the gateway's `[uplink] tls` (mTLS needs an enrolled gateway)

    def elapsed_s(self) -> float:
        return time.monotonic() - self.started_mono

    @property
    def headend_db(self) -> str:
        """What the headend's `--db` names: a PostgreSQL URL or the SQLite file path."""
        return self.db_url or str(self.workdir / "headend.sqlite3")

    @property
    def admin_token_file(self) -> Path:
        """The headend's bootstrap admin API token (written by the first headend started)."""
        return self.workdir / "headend-admin-token"

    def admin_token(self) -> str:
        return self.admin_token_file.read_text().strip()

    @property
    def tls_dir(self) -> Path:
        """The headend's `--tls-dir` (its CA and certificates) when the bench runs with TLS."""
        return self.workdir / "headend-tls"

    def api_for(self, http_addr: str) -> HeadendApi:
        """A client for a headend of this bench listening on `http_addr`."""
        if self.tls:
            return HeadendApi(f"https://{http_addr}", self.admin_token(), self.tls_dir / "ca.pem")
        return HeadendApi(f"http://{http_addr}", self.admin_token())

    @property
    def signing_key(self) -> Path:
        """The headend's intent signing key; the gateway trusts its `.pub.json` trust file."""
        return self.workdir / "headend-signing-key.pem"

    def headend_args(self, grpc_addr: str, http_addr: str) -> list[str]:
        args = ["headend", "run", "--grpc", grpc_addr, "--http", http_addr]
        args += ["--db", self.headend_db, "--admin-token-file", str(self.admin_token_file)]
        args += ["--signing-key", str(self.signing_key)]
        if self.tls:
            args += ["--tls-dir", str(self.tls_dir)]
        if self.broker is not None:
            args += ["--mqtt", self.broker.address]
        return args

    async def restart_headend(self, *, down_s: float = 0.0, kill: bool = False) -> None:
        """Stop the headend (SIGTERM, or kill -9 with `kill`) and start it again on the same
        ports and database."""
        if self.headend is None:
            raise BenchError("this bench has no headend of its own")
        if kill:
            await self.headend.kill()
        else:
            await self.headend.stop()
        if down_s:
            await asyncio.sleep(down_s)
        http_addr = self.api.address
        self.headend = await spawn_dergw(
            "headend",
            self.headend_args(self.grpc_target, http_addr),
            self.workdir / "headend.log",
            append=True,
        )
        await wait_headend_ready(self.headend)

    async def start_extra_headend(self, name: str) -> tuple[ManagedProcess, HeadendApi]:
        """Another headend process on the same database (scale-out), on ports of its own."""
        process = await spawn_dergw(
            name,
            self.headend_args("127.0.0.1:0", "127.0.0.1:0"),
            self.workdir / f"{name}.log",
            append=True,
        )
        _, http_addr = await wait_headend_ready(process)
        return process, self.api_for(http_addr)

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

    async def admin_command(self, *args: str) -> str:
        """Run `dergw headend ARGS... --db <the bench's database>`; its stdout (exit 0) or a
        BenchError with its output."""
        process = await asyncio.create_subprocess_exec(
            *_dergw_command(["headend", *args, "--db", self.headend_db]),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await process.communicate()
        if process.returncode != 0:
            raise BenchError(
                f"dergw headend {' '.join(args)}: exit {process.returncode}: "
                f"{stderr.decode(errors='replace')}"
            )
        return stdout.decode().strip()

    async def gateway_command(self, *args: str) -> tuple[int, str]:
        """Run `dergw ARGS... --config <the bench's gateway config>`: (exit code, output)."""
        assert self.gateway_config is not None
        process = await asyncio.create_subprocess_exec(
            *_dergw_command([*args, "--config", str(self.gateway_config)]),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await process.communicate()
        return process.returncode or 0, output.decode(errors="replace")

    async def enroll_gateway(self) -> None:
        """Enroll the bench's gateway as an installer would: a one-time token from the headend
        admin command, then `dergw enroll` (key made on the "device", CSR over HTTPS)."""
        assert self.gateway_config is not None
        token = await self.admin_command(
            "enroll-token", "create", "--site", self.site_id, "--gateway", self.gateway_id
        )
        process = await asyncio.create_subprocess_exec(
            *_dergw_command(
                [
                    "enroll",
                    "--headend",
                    self.api.base_url,
                    "--token",
                    token,
                    "--ca-file",
                    str(self.tls_dir / "ca.pem"),
                    "--config",
                    str(self.gateway_config),
                ]
            ),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await process.communicate()
        if process.returncode != 0:
            raise BenchError(f"dergw enroll: exit {process.returncode}: {output.decode()}")

    async def start_gateway(self) -> ManagedProcess:
        assert self.gateway_config is not None
        self.gateway = await spawn_dergw(
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


# The product's processes run ahead of the bench's own work (and of whatever else shares a loaded
# test machine, e.g. property tests on other workers): a scenario measures the gateway's reaction
# time, not the scheduler's. Only possible with the privilege to raise priority (CI runs as root);
# elsewhere they keep the default.
PRODUCT_NICE = -10


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the bench process dies, however it dies; and
    run at the product's priority when allowed."""
    if sys.platform == "linux":
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    with contextlib.suppress(OSError):
        os.nice(PRODUCT_NICE)


def _dergw_command(args: list[str]) -> list[str]:
    # Started by module path, not imported: the bench keeps its independence from the code under
    # test while using exactly the entry point an installer would.
    return [sys.executable, "-m", "gateway.cli", *args]


async def spawn_dergw(
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


async def wait_headend_ready(headend: ManagedProcess, timeout_s: float = 30.0) -> tuple[str, str]:
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
    extra_uplink: str = "",
    extra_outbox: str = "",
    poll_periods: dict[str, float] | None = None,
    extra_params: dict[str, str] | None = None,
) -> str:
    """A gateway config (TOML) for the bench's simulated site.

    extra_site / extra_control: TOML lines added to the [site] / [control] tables (e.g.
    "export_limit_w = 5000", "soc_min_pct = 20"); extra_config: whole tables appended at the
    end (e.g. "[control.fallback]" or "[[control.interlocks]]" with their keys);
    poll_periods: per-device poll periods overriding poll_period_s; extra_params: TOML lines
    added to a device's [devices.params] table, by device id (e.g. a DNP3 restart backoff).

    Each device gets the driver of the protocol the simulator serves it over (see
    `device_driver_lines`).
    """
    refresh = refresh_s if refresh_s is not None else max(1, revert_timeout_s // 3)
    lines = [
        "# Written by the HIL bench for one run.",
        "[gateway]",
        f'id = "{bench.gateway_id}"',
        f'state_dir = "{bench.workdir / "gateway-state"}"',
        "",
        "[security]",
        f'intent_keys_file = "{trust_file_path(bench.signing_key)}"',
        "",
        "[site]",
        f'id = "{bench.site_id}"',
        f'name = "{bench.spec.name}"',
        'substation = "SUB-DEMO"',
        'feeder = "FDR-1"',
        extra_site,
        "",
        "[uplink]",
        *(
            ['transport = "mqtt"', f'broker = "{bench.broker.address}"']
            if bench.broker is not None
            else ['transport = "grpc"', f'target = "{bench.grpc_target}"']
        ),
        f"tls = {'true' if bench.tls else 'false'}",
        *([f'enroll_url = "{bench.api.base_url}"'] if bench.tls else []),
        "keepalive_s = 10",
        "reconnect_max_s = 5",
        "ack_timeout_s = 5",
        extra_uplink,
        "",
        "[control]",
        f"period_s = {control_period_s}",
        f"revert_timeout_s = {revert_timeout_s}",
        f"refresh_s = {refresh}",
        extra_control,
        "",
    ]
    for device in bench.spec.devices:
        driver, params = device_driver_lines(bench.sim.endpoints[device.id], raw_points=raw_points)
        lines += [
            "[[devices]]",
            f'id = "{device.id}"',
            f'kind = "{device.kind}"',
            f'driver = "{driver}"',
            f"poll_period_s = {(poll_periods or {}).get(device.id, poll_period_s)}",
        ]
        if device.role:
            lines.append(f'role = "{device.role}"')
        lines += ["[devices.params]", *params]
        if extra_params and device.id in extra_params:
            lines.append(extra_params[device.id])
        lines.append("")
    if extra_outbox:
        lines += ["[outbox]", extra_outbox, ""]
    lines.append(extra_config)
    return "\n".join(lines)


def device_driver_lines(endpoint: Endpoint, *, raw_points: bool = False) -> tuple[str, list[str]]:
    """The gateway driver and its [devices.params] lines for a device served at `endpoint`.

    modbus-tcp / modbus-rtu: the SunSpec driver over TCP or over the RTU bus's pty; opcua: the
    OPC UA driver on the simulator's endpoint without security (the bench is loopback test
    equipment; the simulator also offers Basic256Sha256 SignAndEncrypt); dnp3: the 1815.2
    master (outstation address = the site file's unit_id).
    """
    if endpoint.protocol == "modbus-rtu":
        return "sunspec-modbus", [
            'transport = "rtu"',
            f'serial_port = "{endpoint.serial_port}"',
            f"baudrate = {endpoint.baudrate}",
            f"unit_id = {endpoint.unit_id}",
            f"raw_points = {'true' if raw_points else 'false'}",
        ]
    if endpoint.protocol == "opcua":
        return "opcua", [
            f'url = "{endpoint.url}"',
            f'root = "{endpoint.root}"',
            'security = "none"',
        ]
    if endpoint.protocol == "dnp3":
        return "dnp3", [
            f'host = "{endpoint.host}"',
            f"port = {endpoint.port}",
            f"outstation_address = {endpoint.unit_id}",
        ]
    return "sunspec-modbus", [
        f'host = "{endpoint.host}"',
        f"port = {endpoint.port}",
        f"unit_id = {endpoint.unit_id}",
        f"raw_points = {'true' if raw_points else 'false'}",
    ]


DEFAULT_POSTGRES_URL = os.environ.get(
    "DERGW_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)


@contextlib.asynccontextmanager
async def fresh_postgres_database(server_url: str) -> AsyncIterator[str]:
    """A new, empty database on the server of `server_url` for one run (dropped afterwards), so a
    run never sees an earlier run's gateways and intents; yields its URL."""
    try:
        import psycopg
        from psycopg.conninfo import conninfo_to_dict
    except ImportError as exc:
        raise BenchError(
            "PostgreSQL scenarios need psycopg: pip install 'dergw[postgres]'"
        ) from exc
    name = f"dergw_hil_{os.getpid()}_{int(time.time() * 1000) % 10**9}"
    params = conninfo_to_dict(server_url)

    def admin(statement: str) -> None:
        with psycopg.connect(server_url, autocommit=True, connect_timeout=5) as conn:
            conn.execute(statement)

    try:
        await asyncio.to_thread(admin, f'CREATE DATABASE "{name}"')
    except psycopg.Error as exc:
        raise BenchError(f"PostgreSQL at {server_url} is not usable: {exc}") from exc
    try:
        yield "postgresql://" + _url_from_params({**params, "dbname": name})
    finally:
        with contextlib.suppress(psycopg.Error):
            await asyncio.to_thread(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _url_from_params(params: dict[str, Any]) -> str:
    user = params.get("user", "")
    password = params.get("password", "")
    auth = f"{user}:{password}@" if password else (f"{user}@" if user else "")
    host = params.get("host", "127.0.0.1")
    port = params.get("port", "5432")
    return f"{auth}{host}:{port}/{params['dbname']}"


def _broker_tls(workdir: Path) -> BrokerTls:
    """The broker's certificate from the headend's CA (created here first: the broker starts
    before the headend, which then finds and uses the same CA in its --tls-dir)."""
    ca = CertificateAuthority.open(workdir / "headend-tls", now=datetime.now(UTC))
    cert, key = ca.write_server_certificate(
        workdir / "broker-tls", ["127.0.0.1", "localhost"], now=datetime.now(UTC)
    )
    return BrokerTls(cafile=workdir / "headend-tls" / "ca.pem", certfile=cert, keyfile=key)


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
    transport: str = "grpc",
    db_url: str = "",
    tls: bool = False,
    **config_options: Any,
) -> AsyncIterator[Bench]:
    """Start headend and simulator, write the gateway config; stop everything on exit.

    `foreign_headend` ("host:port"): point the gateway at that gRPC endpoint instead of starting
    a headend (tests that play the headend themselves). `transport="mqtt"` starts the bench's
    own mosquitto (private port, persistence in the workdir) and connects both ends through it;
    `db_url` (postgresql://...) runs the headend on that database instead of a SQLite file.
    `tls=True` runs the product as installed: the headend with `--tls-dir` (mTLS gRPC, HTTPS
    API; a TLS broker with per-gateway ACLs for MQTT) and the gateway enrolled with a one-time
    token before the scenario starts it.
    """
    if transport not in ("grpc", "mqtt"):
        raise BenchError(f"transport {transport!r}: use grpc or mqtt")
    workdir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - local, before anything runs
    _fresh_state(workdir)
    broker: Mosquitto | None = None
    if transport == "mqtt":
        if find_mosquitto() is None:
            raise BenchError("transport mqtt needs mosquitto (apt install mosquitto)")
        shutil.rmtree(workdir / "broker", ignore_errors=True)
        broker_tls = _broker_tls(workdir) if tls else None
        broker = Mosquitto(workdir / "broker", tls=broker_tls)
        try:
            await asyncio.to_thread(broker.start)
        except MosquittoError as exc:
            raise BenchError(f"mosquitto did not start: {exc}") from exc
    sim = SiteSimulator(spec.with_overrides(port=0))
    await sim.start()
    headend: ManagedProcess | None = None
    bench: Bench | None = None
    try:
        bench = Bench(
            workdir=workdir,
            spec=spec,
            sim=sim,
            headend=None,
            api=HeadendApi("http://127.0.0.1:9"),
            grpc_target=foreign_headend or "",
            gateway_id=gateway_id,
            site_id=site_id,
            transport=transport,
            broker=broker,
            db_url=db_url,
            tls=tls,
        )
        if foreign_headend is None:
            headend = await spawn_dergw(
                "headend",
                bench.headend_args("127.0.0.1:0", "127.0.0.1:0"),
                workdir / "headend.log",
                append=True,
            )
            grpc_addr, http_addr = await wait_headend_ready(headend)
            bench.headend = headend
            bench.grpc_target = grpc_addr
            bench.api = bench.api_for(http_addr)
        bench.gateway_config = workdir / "gateway.toml"
        bench.gateway_config.write_text(gateway_config_text(bench, **config_options))
        if tls and foreign_headend is None:
            await bench.enroll_gateway()
        yield bench
    finally:
        if bench is not None and bench.gateway is not None:
            await bench.gateway.stop()
        if bench is not None and bench.headend is not None:
            await bench.headend.stop()
        elif headend is not None:
            await headend.stop()
        await sim.stop()
        if broker is not None:
            await asyncio.to_thread(broker.stop)

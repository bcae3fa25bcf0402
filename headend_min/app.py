"""Composition of the headend: store + notifier + gRPC server + uvicorn, in one event loop.

`Headend` starts and stops the pieces in order; `serve` runs one until SIGTERM/SIGINT. uvicorn
runs embedded (`Server.serve()` on our loop, on a socket we bind), with its own signal handling
switched off so the headend owns shutdown: stop HTTP, end gateway streams with UNAVAILABLE (they
reconnect elsewhere), stop gRPC, close the store.

With `config.tls_dir` (TLS on) the directory holds the headend CA (`ca.key`, `ca.pem`: what a
gateway trusts) and what is issued from it at start: `server.pem`/`server.key` (gRPC and HTTPS,
SANs = the listen hosts plus localhost and 127.0.0.1; kept while it fits) and
`headend-client.pem`/`headend-client.key` (CN=headend, the headend's own MQTT client). gRPC then
requires a client certificate from that CA and refuses revoked ones
(`grpc_tls.RevocationInterceptor`); the HTTP API is HTTPS and serves enrollment
(`/api/v1/enroll`, `/api/v1/renew`) on the enrollment tables of the headend database (SQLite
or PostgreSQL). Without it everything is plaintext (local development) and the enrollment
routes answer 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Protocol

import grpc
import uvicorn
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from fastapi import APIRouter, FastAPI

from dergw.v1 import dergw_pb2_grpc, grpc_channel_options
from dergw.v1.enrollment import build_csr, write_private_file
from headend_min.api import API_PREFIX, create_api
from headend_min.auth import BootstrapTokenError, TokenText, ensure_admin_token_file
from headend_min.clock import Clock, SystemClock, datetime_from_ns
from headend_min.config import (
    ConfigError,
    DatabaseLocation,
    Endpoint,
    HeadendConfig,
    PostgresUrl,
)
from headend_min.enroll_api import enrollment_router, enrollment_unavailable_router
from headend_min.enrollment import Enrollment, EnrollmentStore
from headend_min.enrollment_sqlite import SqliteEnrollmentStore, SqliteEnrollmentStoreError
from headend_min.grpc_tls import RevocationInterceptor, server_credentials
from headend_min.link import GatewayLinkService
from headend_min.metrics import ProcessSources
from headend_min.mqtt_link import MqttIntentNotifier, MqttLink, MqttTls
from headend_min.notify import InProcessNotifier, Notifier
from headend_min.pki import (
    HEADEND_IDENTITY,
    CaError,
    CertificateAuthority,
    PkiError,
    cert_pem,
    generate_key,
    key_pem,
    load_csr,
)
from headend_min.session import Admission, GatewaySessions
from headend_min.signing import (
    SigningKey,
    SigningKeyError,
    load_or_create_signing_key,
    trust_file_path,
)
from headend_min.sqlite_store import SqliteStore
from headend_min.store import Store, StoreError

__all__ = [
    "HEADEND_CLIENT_CERT_FILE",
    "HEADEND_CLIENT_KEY_FILE",
    "HEADEND_IDENTITY",
    "ClosableEnrollmentStore",
    "Headend",
    "HeadendStartError",
    "HeadendTls",
    "open_enrollment_store",
    "prepare_tls",
    "serve",
]

_log = logging.getLogger(__name__)
_STARTUP_TIMEOUT_S = 10.0
_GRPC_GRACE_S = 2.0
HEADEND_CLIENT_CERT_FILE = "headend-client.pem"
HEADEND_CLIENT_KEY_FILE = "headend-client.key"
# A certificate found in the TLS directory is reissued at start when less than this is left.
_REISSUE_BEFORE = timedelta(days=30)


class HeadendStartError(RuntimeError):
    """A listener could not be opened (the message names the address), or the TLS directory
    cannot be used."""


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn without its own SIGINT/SIGTERM capture: the headend decides when to stop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _listen_http(endpoint: Endpoint) -> socket.socket:
    """Bind the HTTP listener ourselves, so port 0 works and the real port is known up front."""
    family = socket.AF_INET6 if ":" in endpoint.host else socket.AF_INET
    # proto must say TCP explicitly: asyncio sets TCP_NODELAY on accepted connections only when
    # the socket's proto is IPPROTO_TCP, and without it every response waits ~40 ms on the
    # peer's delayed ACK (Nagle). socket.create_server() leaves proto 0.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((endpoint.host, endpoint.port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise HeadendStartError(f"cannot listen for HTTP on {endpoint}: {exc}") from exc
    return sock


async def _open_store(location: DatabaseLocation) -> Store:
    if isinstance(location, PostgresUrl):
        try:
            from headend_min.pg_store import PgStore  # the `postgres` extra
        except ImportError as exc:
            raise StoreError(
                f"--db {location}: PostgreSQL needs psycopg ({exc}); "
                "install it with: pip install 'dergw[postgres]'"
            ) from exc
        return await PgStore.open(location.url)
    return await SqliteStore.open(location)


# Public for the commands that work on the database directly (`dergw headend token`).
open_store = _open_store


class ClosableEnrollmentStore(EnrollmentStore, Protocol):
    async def close(self) -> None: ...


async def open_enrollment_store(location: DatabaseLocation) -> ClosableEnrollmentStore:
    """The enrollment tables of the headend database (SQLite file or PostgreSQL URL)."""
    if isinstance(location, PostgresUrl):
        try:
            from headend_min.enrollment_pg import PgEnrollmentStore  # the `postgres` extra
        except ImportError as exc:
            raise StoreError(
                f"--db {location}: PostgreSQL needs psycopg ({exc}); "
                "install it with: pip install 'dergw[postgres]'"
            ) from exc
        return await PgEnrollmentStore.open(location.url)
    try:
        return await SqliteEnrollmentStore.open(location)
    except SqliteEnrollmentStoreError as exc:
        raise StoreError(str(exc)) from exc


@dataclass(frozen=True)
class HeadendTls:
    """The TLS material of one start (see the module docstring for the files)."""

    directory: Path
    ca: CertificateAuthority
    server_cert: Path
    server_key: Path
    client_cert: Path  # the headend's MQTT client certificate (CN=headend)
    client_key: Path

    @property
    def ca_pem_path(self) -> Path:
        return self.directory / CertificateAuthority.CERT_FILE


def _load_certificate(path: Path) -> x509.Certificate | None:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None


def _server_cert_fits(
    path: Path, ca: CertificateAuthority, hosts: Sequence[str], now: datetime
) -> bool:
    """Whether server.pem was issued by this CA for exactly `hosts` and is not near expiry."""
    cert = _load_certificate(path)
    if cert is None or not path.with_suffix(".key").exists():
        return False
    try:
        cert.verify_directly_issued_by(ca.certificate)
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
        return False
    present = {str(n) for n in names.get_values_for_type(x509.DNSName)} | {
        str(ip) for ip in names.get_values_for_type(x509.IPAddress)
    }
    return present == set(hosts) and cert.not_valid_after_utc - now > _REISSUE_BEFORE


def _tls_hosts(config: HeadendConfig) -> list[str]:
    hosts: list[str] = []
    for host in (config.grpc.host, config.http.host, *config.tls_hosts, "localhost", "127.0.0.1"):
        # A wildcard listen address is no name a client dials: a deployment listening on
        # 0.0.0.0 names itself with --tls-host.
        if host not in hosts and host not in ("0.0.0.0", "::", ""):
            hosts.append(host)
    return hosts


def prepare_tls(config: HeadendConfig, now: datetime) -> HeadendTls:
    """Open (or create) the CA in `config.tls_dir` and issue what this start needs.

    Raises HeadendStartError when the directory cannot be used.
    """
    directory = config.tls_dir
    if directory is None:
        raise HeadendStartError("TLS is off: no tls_dir configured")
    try:
        ca = CertificateAuthority.open(directory, now=now)
        hosts = _tls_hosts(config)
        server_cert, server_key = directory / "server.pem", directory / "server.key"
        if not _server_cert_fits(server_cert, ca, hosts, now):
            server_cert, server_key = ca.write_server_certificate(directory, hosts, now=now)
            _log.info("issued the headend's TLS certificate for %s", ", ".join(hosts))
        client_cert, client_key = _write_headend_client_certificate(directory, ca, now)
    except PkiError as exc:
        raise HeadendStartError(f"--tls-dir {directory}: {exc}") from exc
    return HeadendTls(directory, ca, server_cert, server_key, client_cert, client_key)


def _write_headend_client_certificate(
    directory: Path, ca: CertificateAuthority, now: datetime
) -> tuple[Path, Path]:
    """CN=headend client certificate for the headend's MQTT connection (new key each start)."""
    key = generate_key()
    # The site SAN is required by the issuer; for the headend it names no site (the broker
    # goes by the CN only).
    cert = ca.issue_client_certificate(
        load_csr(build_csr(key, HEADEND_IDENTITY)),
        gateway_id=HEADEND_IDENTITY,
        site_id=HEADEND_IDENTITY,
        now=now,
    )
    cert_path, key_path = directory / HEADEND_CLIENT_CERT_FILE, directory / HEADEND_CLIENT_KEY_FILE
    try:
        write_private_file(key_path, key_pem(key))
        write_private_file(cert_path, cert_pem(cert), mode=0o644)
    except OSError as exc:
        raise CaError(f"cannot write the headend client certificate to {directory}: {exc}") from exc
    return cert_path, key_path


class Headend:
    """One headend instance. `async with Headend(config) as headend:` serves until the block ends.

    A `store` passed in stays owned by the caller (tests use that to wrap or share it); otherwise
    the database of `config.db_path` (a SQLite file or a PostgreSQL URL) is opened and closed
    here. On PostgreSQL the default notifier is a `PgNotifier`, so an intent posted to any
    instance reaches gateways connected to any other.
    """

    def __init__(
        self,
        config: HeadendConfig,
        *,
        store: Store | None = None,
        notifier: Notifier | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.config = config
        self.clock: Clock = clock or SystemClock()
        self.notifier: Notifier = notifier or InProcessNotifier()
        self._given_notifier = notifier
        self._given_store = store
        self._store: Store | None = None
        self._grpc: grpc.aio.Server | None = None
        self._http: _EmbeddedUvicorn | None = None
        self._http_task: asyncio.Task[None] | None = None
        self._presence_task: asyncio.Task[None] | None = None
        self._link: GatewayLinkService | None = None
        self._mqtt: MqttLink | None = None
        self.api: FastAPI | None = None
        # The bootstrap admin token of `config.admin_token_file` (None without one).
        self.admin_token: TokenText | None = None
        self.signing_key: SigningKey | None = None  # loaded (or created) at start
        self.grpc_endpoint = config.grpc
        self.http_endpoint = config.http
        # With config.tls_dir: the TLS material and enrollment (None in plaintext mode).
        self.tls: HeadendTls | None = None
        self._enrollment: Enrollment | None = None
        self._enrollment_store: ClosableEnrollmentStore | None = None
        self.revocation: RevocationInterceptor | None = None

    @property
    def store(self) -> Store:
        if self._store is None:
            raise RuntimeError("the headend is not started")
        return self._store

    @property
    def link(self) -> GatewayLinkService:
        if self._link is None:
            raise RuntimeError("the headend is not started")
        return self._link

    @property
    def tls_dir(self) -> Path | None:
        return self.config.tls_dir

    @property
    def ca_pem_path(self) -> Path | None:
        """The CA certificate gateways must trust (None in plaintext mode)."""
        return self.tls.ca_pem_path if self.tls is not None else None

    @property
    def enrollment(self) -> Enrollment:
        if self._enrollment is None:
            raise RuntimeError("enrollment needs a started headend with a TLS directory")
        return self._enrollment

    @property
    def mqtt_link(self) -> MqttLink | None:
        """The MQTT link (None without `config.mqtt`)."""
        return self._mqtt

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        config = self.config
        try:
            key_path = config.signing_key_path()
            signing_key = await asyncio.to_thread(load_or_create_signing_key, key_path)
        except (ConfigError, SigningKeyError) as exc:
            raise HeadendStartError(str(exc)) from exc
        self.signing_key = signing_key
        _log.info("signing intents with key %s (%s)", signing_key.key_id, key_path)
        if config.tls_dir is not None:
            now = datetime_from_ns(self.clock.wall_ns())
            self.tls = await asyncio.to_thread(prepare_tls, config, now)
        self._store = self._given_store or await _open_store(config.db_path)
        if self.tls is not None:
            self._enrollment_store = await open_enrollment_store(config.db_path)
            self._enrollment = Enrollment(self._enrollment_store, self.tls.ca, self.clock)
        if config.admin_token_file is not None:
            try:
                self.admin_token = await ensure_admin_token_file(
                    self._store, config.admin_token_file, now_ns=self.clock.wall_ns()
                )
            except BootstrapTokenError as exc:
                raise HeadendStartError(str(exc)) from exc
        await self._use_database_notifier(self._store)
        self.sessions = GatewaySessions(
            self._store,
            self.clock,
            signing_key=signing_key,
            intent_validity_s=config.intent_validity_s,
            admission=Admission(
                rate_per_s=config.admission_rate_per_s, burst=config.admission_burst
            ),
            backlog_records_per_s=config.backlog_records_per_s,
        )
        self._link = GatewayLinkService(
            self.sessions,
            self.notifier,
            self.clock,
            presence_interval_s=config.presence_interval_s,
            is_revoked=self._enrollment.is_revoked if self._enrollment is not None else None,
        )
        interceptors = []
        if self._enrollment is not None:
            self.revocation = RevocationInterceptor(self._enrollment.is_revoked)
            interceptors.append(self.revocation)
        # Same message bounds and keepalive as the gateway's channel (dergw.v1 helpers).
        self._grpc = grpc.aio.server(
            options=grpc_channel_options(keepalive_s=config.keepalive_s),
            interceptors=interceptors,
        )
        dergw_pb2_grpc.add_GatewayLinkServicer_to_server(self._link, self._grpc)
        try:
            if self.tls is None:
                grpc_port = self._grpc.add_insecure_port(str(config.grpc))
            else:
                grpc_port = self._grpc.add_secure_port(
                    str(config.grpc), await asyncio.to_thread(_grpc_credentials, self.tls)
                )
        except RuntimeError as exc:
            raise HeadendStartError(f"cannot listen for gRPC on {config.grpc}: {exc}") from exc
        if grpc_port == 0:
            raise HeadendStartError(f"cannot listen for gRPC on {config.grpc}")
        self.grpc_endpoint = Endpoint(config.grpc.host, grpc_port)
        await self._grpc.start()

        api_notifier = self.notifier
        if config.mqtt is not None:
            self._mqtt = MqttLink(
                self.sessions,
                config.mqtt.host,
                config.mqtt.port,
                share_group=config.mqtt_share_group,
                presence_interval_s=config.presence_interval_s,
                clock=self.clock,
                tls=None
                if self.tls is None
                else MqttTls(self.tls.ca_pem_path, self.tls.client_cert, self.tls.client_key),
                admitted=None
                if self._enrollment is None
                else self._enrollment.holds_valid_certificate,
            )
            try:
                await self._mqtt.start()
            except ConnectionError as exc:
                raise HeadendStartError(f"--mqtt {config.mqtt}: {exc}") from exc
            # Posted intents also go out over MQTT, from the instance that took the post.
            api_notifier = MqttIntentNotifier(self.notifier, self._mqtt)

        self.api = create_api(
            store=self._store,
            notifier=api_notifier,
            clock=self.clock,
            stale_after_s=config.stale_after_s,
            process=ProcessSources(self.sessions, self._link, self._mqtt),
        )
        self.api.include_router(self._enrollment_routes(key_path))
        sock = _listen_http(config.http)
        self.http_endpoint = Endpoint(config.http.host, sock.getsockname()[1])
        self._http = _EmbeddedUvicorn(
            uvicorn.Config(
                self.api,
                ssl_certfile=str(self.tls.server_cert) if self.tls is not None else None,
                ssl_keyfile=str(self.tls.server_key) if self.tls is not None else None,
                lifespan="off",
                log_config=None,  # keep uvicorn from reconfiguring the process's logging
                log_level="warning",
                access_log=False,
                timeout_graceful_shutdown=2,
            )
        )
        self._http_task = asyncio.create_task(self._http.serve(sockets=[sock]))
        await self._wait_http_started(self._http, self._http_task)
        self._presence_task = asyncio.create_task(self._link.run_presence())
        _log.info(
            "headend serving grpc=%s http=%s (%s)",
            self.grpc_endpoint,
            self.http_endpoint,
            f"TLS, CA {self.tls.ca_pem_path}" if self.tls else "plaintext: local development only",
        )

    def _enrollment_routes(self, signing_key_path: Path) -> APIRouter:
        if self._enrollment is None or self.tls is None:
            return enrollment_unavailable_router(
                "enrollment needs TLS: start the headend with --tls-dir DIR", prefix=API_PREFIX
            )
        trust_file = trust_file_path(signing_key_path)

        def intent_keys() -> str | None:
            try:
                return trust_file.read_text()
            except OSError:
                return None

        return enrollment_router(
            self._enrollment,
            clock=self.clock,
            ca_certificate=self.tls.ca.certificate,
            intent_keys=intent_keys,
            prefix=API_PREFIX,
        )

    async def _use_database_notifier(self, store: Store) -> None:
        """On PostgreSQL, intents wake streams in every instance (LISTEN/NOTIFY), not just here."""
        if self._given_notifier is not None or "headend_min.pg_store" not in sys.modules:
            return  # no PgStore can exist unless its module was imported
        from headend_min.pg_notify import PgNotifier
        from headend_min.pg_store import PgStore

        if isinstance(store, PgStore):
            notifier = PgNotifier(store)
            self.notifier = notifier
            await notifier.start()

    async def _wait_http_started(self, server: uvicorn.Server, task: asyncio.Task[None]) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _STARTUP_TIMEOUT_S
        while not server.started:
            if task.done():
                task.result()  # re-raises why uvicorn stopped
                raise HeadendStartError(f"HTTP server on {self.http_endpoint} stopped at startup")
            if loop.time() > deadline:
                raise HeadendStartError(f"HTTP server on {self.http_endpoint} did not start")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self._http is not None and self._http_task is not None:
            self._http.should_exit = True
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await self._http_task
            self._http_task = None
        if self._link is not None:
            self._link.end_all("the headend is shutting down; reconnect")
        if self._grpc is not None:
            await self._grpc.stop(grace=_GRPC_GRACE_S)
            self._grpc = None
        if self._link is not None:
            await self._link.wait_closed()
        if self._mqtt is not None:
            await self._mqtt.stop()
            self._mqtt = None
        if self._presence_task is not None:
            self._presence_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._presence_task
            self._presence_task = None
        await self.notifier.close()
        if self._enrollment_store is not None:
            await self._enrollment_store.close()
            self._enrollment_store = None
        if self._store is not None and self._given_store is None:
            await self._store.close()
        self._store = None

    async def __aenter__(self) -> Headend:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()


def _grpc_credentials(tls: HeadendTls) -> grpc.ServerCredentials:
    return server_credentials(
        tls.ca.certificate_pem, tls.server_cert.read_bytes(), tls.server_key.read_bytes()
    )


# Collect the youngest generation after this many net allocations instead of Python's 700: a
# headend holding thousands of streams allocates a few hundred objects per batch (messages,
# rows, futures); with the default the cyclic collector took ~8 % of the event loop thread.
_GC_THRESHOLDS = (20_000, 20, 20)
# The store's worker thread releases the GIL around every statement and must win it back from a
# busy event loop thread each time: at the default 5 ms switch interval a group commit of ~17k
# upserts (~0.03 s of CPU) took 0.11-0.47 s of wall time next to a busy thread, at 1 ms
# 0.09-0.13 s; with 2,000 gateways the ack p50 dropped from ~0.8-1.3 s to ~0.1 s (shared machine).
_SWITCH_INTERVAL_S = 0.001


def tune_runtime() -> None:
    """For a long-running headend process: fewer cyclic collections (none over what startup
    loaded, which lives until exit) and a shorter GIL switch interval."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*_GC_THRESHOLDS)
    sys.setswitchinterval(_SWITCH_INTERVAL_S)


async def serve(
    config: HeadendConfig, *, on_ready: Callable[[Headend], Awaitable[None] | None]
) -> None:
    """Run a headend until SIGTERM or SIGINT, then shut it down cleanly."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        async with Headend(config) as headend:
            tune_runtime()
            ready = on_ready(headend)
            if ready is not None:
                await ready
            await stop.wait()
            _log.info("signal received; shutting down")
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)

"""An in-process headend on free ports (real gRPC server + real uvicorn) and its clients."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from dergw.v1 import pb
from headend_min.app import Headend
from headend_min.auth import Role, create_token
from headend_min.clock import ManualClock
from headend_min.config import DatabaseLocation, Endpoint, HeadendConfig
from headend_min.store import Store
from tests.headend.fake_gateway import FakeGateway, device, site
from tests.support import free_tcp_port


@dataclass
class RunningHeadend:
    headend: Headend
    http: httpx.AsyncClient
    clock: ManualClock
    db_path: DatabaseLocation
    gateways: list[FakeGateway] = field(default_factory=list)

    @property
    def grpc_target(self) -> str:
        return str(self.headend.grpc_endpoint)

    def gateway(
        self,
        gateway_id: str = "gw-1",
        site_id: str = "site-1",
        devices: Sequence[pb.Device] | None = None,
        *,
        substation: str = "sub-1",
        feeder: str = "fdr-1",
        intent_version: int = 0,
    ) -> FakeGateway:
        """A FakeGateway for this headend (closed at teardown); not yet connected."""
        if devices is None:
            devices = [
                device("pv-1", pb.DEVICE_KIND_PV, max_w=5000.0),
                device("bat-1", pb.DEVICE_KIND_BATTERY, max_w=3000.0),
                device("meter-1", pb.DEVICE_KIND_METER, max_w=0.0, role="pcc"),
            ]
        fake = FakeGateway(
            self.grpc_target,
            gateway_id=gateway_id,
            site=site(site_id, substation=substation, feeder=feeder),
            devices=devices,
            intent_version=intent_version,
        )
        self.gateways.append(fake)
        return fake

    async def close_gateways(self) -> None:
        for fake in self.gateways:
            await fake.close()
        self.gateways.clear()


class HeadendRunner:
    """Starts in-process headends on one database (a SQLite file or a PostgresUrl); restart =
    stop + start on the same database."""

    def __init__(self, db_path: DatabaseLocation, *, signing_key: Path | None = None) -> None:
        self.db_path = db_path
        # The intent signing key (None: next to a SQLite database; PostgreSQL needs one).
        self.signing_key = signing_key
        self.clock = ManualClock(time.time_ns())
        self.running: RunningHeadend | None = None

    async def start(
        self, *, store: Store | None = None, keepalive_s: float = 20.0
    ) -> RunningHeadend:
        config = HeadendConfig(
            grpc=Endpoint("127.0.0.1", free_tcp_port()),
            http=Endpoint("127.0.0.1", free_tcp_port()),
            db_path=self.db_path,
            keepalive_s=keepalive_s,
            signing_key=self.signing_key,
        )
        headend = Headend(config, store=store, clock=self.clock)
        await headend.start()
        # The API refuses anonymous calls: the test client is an admin (tests of roles and
        # scopes make their own tokens, see tests/headend/test_auth.py).
        token = await self.admin_token(headend)
        http = httpx.AsyncClient(
            base_url=f"http://{headend.http_endpoint}/api/v1",
            timeout=5.0,
            headers={"Authorization": f"Bearer {token}"},
        )
        self.running = RunningHeadend(headend, http, self.clock, self.db_path)
        return self.running

    async def admin_token(self, headend: Headend) -> str:
        """An admin API token on the headend's database (one per start)."""
        text, _ = await create_token(
            headend.store,
            name="test-admin",
            role=Role.ADMIN,
            site_id=None,
            created_by="tests.headend.harness",
            now_ns=self.clock.wall_ns(),
        )
        return str(text)

    async def stop(self) -> None:
        if self.running is None:
            return
        await self.running.close_gateways()
        await self.running.http.aclose()
        await self.running.headend.stop()
        self.running = None

    async def restart(self) -> RunningHeadend:
        await self.stop()
        return await self.start()

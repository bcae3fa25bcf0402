"""The operators' HTTP API (FastAPI), under /api/v1.

Routes read from the `Store` and render with `schemas`; intent posts compose the next version
with the pure functions of `intents` inside the store's allocating transaction, then wake the
site's streams through the `Notifier`. Errors are 4xx with a `detail` that says what to fix.

Every route but `/healthz` (and the OpenAPI document, `/docs` and the operator page `/`, which
hold no data) needs an API token (`auth.require`): viewer to read, operator to post and cancel
intents, admin to manage tokens. A site-scoped token reads and commands its own site only:
per-site routes answer 403 for other sites, fleet-wide lists (`/sites`, `/gateways`, `/events`)
are filtered to its site, and the fleet-wide aggregate `/grid/feeders` is refused.
Intents and token changes record the principal that made them. Request bodies are limited to
`max_body_bytes` before anything decodes them (413); path and query ids are bounded like the
wire contract's, so hostile input is a 4xx and changes nothing.

`GET /metrics` is the Prometheus exposition of `metrics` (a viewer token: scrapers send it as a
bearer token). `GET /` (and `/ui`) serves the static operator page `ui/operator.html`, which
calls this API with a token the operator pastes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from datetime import datetime
from importlib import resources
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Path, Query, Request, status
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dergw.v1 import MAX_ID_LENGTH, pb
from headend_min.auth import (
    Authenticator,
    ForbiddenError,
    Principal,
    Role,
    TokenGrantError,
    check_site,
    create_token,
    require,
)
from headend_min.clock import Clock, datetime_from_ns, ns_from_datetime
from headend_min.fleet import (
    FLEXIBILITY_MAX_AGE_NS,
    flexibility_counts,
    intent_progress,
    is_online,
    summarize_feeders,
    summarize_flexibility,
)
from headend_min.intents import (
    EventConflictError,
    IntentRejected,
    UnknownEventError,
    cancel_event,
    compose_intent,
    for_device,
)
from headend_min.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from headend_min.metrics import ApiCounters, ProcessSources, process_metrics, render
from headend_min.model import (
    GatewayRecord,
    HistoryCursor,
    HistoryQuery,
    IntentBasis,
    StoredIntent,
)
from headend_min.notify import Notifier
from headend_min.schemas import (
    DeviceOut,
    ErrorOut,
    EventResponseOut,
    FeederOut,
    FlexibilityOut,
    FlexibilitySummaryOut,
    GapOut,
    GatewayIntentAckOut,
    GatewayIntentStatusOut,
    GatewayOut,
    HealthOut,
    HistoryPageOut,
    HistoryPointOut,
    IntentCreatedOut,
    IntentDocumentOut,
    IntentPostIn,
    IntentVersionOut,
    LatestPointOut,
    ReportedStateOut,
    SiteDetailOut,
    SiteFlexibilityOut,
    SiteOut,
    TokenCreatedOut,
    TokenCreateIn,
    TokenOut,
)
from headend_min.store import (
    DuplicateTokenError,
    IntentComposer,
    Store,
    StoreError,
    UnknownSiteError,
)

__all__ = [
    "API_PREFIX",
    "MAX_BODY_BYTES",
    "PUBLIC_PATHS",
    "BodyLimit",
    "create_api",
    "decode_cursor",
    "encode_cursor",
]

API_PREFIX = "/api/v1"
# The only operations served without an API token (read-only health). A route that authenticates
# its caller another way (enrollment's one-time token) belongs here too; tests/headend/test_auth.py
# checks that every other operation refuses anonymous calls.
# The operator page (`/`, `/ui`) is static HTML and script holding no data: it asks the operator
# for a token and sends it with each API call it makes.
PUBLIC_PATHS = frozenset(
    {f"{API_PREFIX}/healthz", f"{API_PREFIX}/enroll", f"{API_PREFIX}/renew", "/", "/ui"}
)
_OPERATOR_PAGE = "ui/operator.html"  # package data of headend_min
MAX_BODY_BYTES = 1024 * 1024
_HISTORY_MAX_LIMIT = 10_000
_INT64_MAX = 2**63 - 1
_ID_PATTERN = r"^[A-Za-z0-9._:~-]+$"

# Ids in paths and queries: the wire contract's bound and the characters ids are made of.
SiteId = Annotated[str, Path(min_length=1, max_length=MAX_ID_LENGTH, pattern=_ID_PATTERN)]
GatewayId = Annotated[str, Path(min_length=1, max_length=MAX_ID_LENGTH, pattern=_ID_PATTERN)]
DeviceId = Annotated[str, Path(min_length=1, max_length=MAX_ID_LENGTH, pattern=_ID_PATTERN)]
EventId = Annotated[str, Path(min_length=1, max_length=MAX_ID_LENGTH, pattern=_ID_PATTERN)]
TokenId = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[0-9a-f]+$")]
SiteIdQuery = Annotated[str, Query(min_length=1, max_length=MAX_ID_LENGTH, pattern=_ID_PATTERN)]
OptionalSiteIdQuery = Annotated[
    str | None, Query(min_length=1, max_length=MAX_ID_LENGTH, pattern=_ID_PATTERN)
]
OptionalIdQuery = Annotated[
    str | None, Query(min_length=1, max_length=MAX_ID_LENGTH, pattern=_ID_PATTERN)
]

# Who may call a route (auth.require); `site_id` of the path or query must be in the scope.
Viewer = Annotated[Principal, Depends(require(Role.VIEWER))]
SiteViewer = Annotated[Principal, Depends(require(Role.VIEWER, site_param="site_id"))]
SiteOperator = Annotated[Principal, Depends(require(Role.OPERATOR, site_param="site_id"))]
Admin = Annotated[Principal, Depends(require(Role.ADMIN))]


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorOut, "description": description}


# What any route may answer besides its success (documented, so clients and schemathesis know).
_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _error("the request cannot be parsed (a body that is not UTF-8, a foreign cursor)"),
    401: _error("no valid API token (missing, malformed, unknown or revoked)"),
    403: _error("the token's role or site scope does not cover this request"),
    404: _error("the site, gateway, device, intent version or token does not exist"),
    413: _error("the request body is over the size limit"),
    422: _error("the request is invalid; `detail` says which part and why"),
    503: _error("the database is unavailable; retry shortly"),
}
_CONFLICT: dict[int | str, dict[str, Any]] = {
    409: _error("the request conflicts with the current state")
}


class BodyLimit:
    """ASGI middleware: refuse a request body over `max_bytes` with 413 before any decoding.

    A declared Content-Length over the limit is refused without reading; a chunked body is
    read up to the limit and then replayed to the app (the API's bodies are small JSON).
    """

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and not (declared.isdigit() and int(declared) <= self.max_bytes):
            await self._refuse(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before its body arrived
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = JSONResponse(
            status_code=status.HTTP_413_CONTENT_TOO_LARGE,
            content={"detail": f"request body over {self.max_bytes} bytes; send less"},
        )
        await response(scope, receive, send)


class CursorError(ValueError):
    """A history cursor this server did not issue."""


def encode_cursor(cursor: HistoryCursor) -> str:
    raw = json.dumps([cursor.time_ns, cursor.gateway_id, cursor.seq, cursor.index]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(text: str) -> HistoryCursor:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        time_ns, gateway_id, seq, index = json.loads(raw)
    except (binascii.Error, ValueError, TypeError) as exc:
        raise CursorError(text) from exc
    if not (
        isinstance(time_ns, int)
        and isinstance(gateway_id, str)
        and isinstance(seq, int)
        and isinstance(index, int)
        and all(-_INT64_MAX <= n <= _INT64_MAX for n in (time_ns, seq, index))
    ):
        raise CursorError(text)
    return HistoryCursor(time_ns, gateway_id, seq, index)


def _not_found(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_404_NOT_FOUND, detail=detail)


def _forbidden_unless_sees(principal: Principal, site_id: str) -> None:
    try:
        check_site(principal, site_id)
    except ForbiddenError as exc:
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail=str(exc)) from None


def _ns_of(moment: datetime | None, name: str) -> int | None:
    if moment is None:
        return None
    wall_ns = ns_from_datetime(moment)
    if not -_INT64_MAX <= wall_ns <= _INT64_MAX:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            detail=f"{name} ({moment}) is out of range: give a time between 1678 and 2262",
        )
    return wall_ns


def _rejection(exc: IntentRejected) -> HTTPException:
    if isinstance(exc, UnknownEventError):
        return HTTPException(status.HTTP_404_NOT_FOUND, detail=str(exc))
    if isinstance(exc, EventConflictError):
        return HTTPException(status.HTTP_409_CONFLICT, detail=str(exc))
    return HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=str(exc))


def _page_security_headers(page: str) -> dict[str, str]:
    """A Content-Security-Policy that runs only the page's own inline script (by its hash) and
    lets it talk to this origin only: a token pasted into the page cannot leave for elsewhere,
    even if injected text slipped past the page's escaping. No framing (clickjacking)."""
    scripts = re.findall(r"<script>(.*?)</script>", page, flags=re.DOTALL)
    hashes = " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(script.encode()).digest()).decode() + "'"
        for script in scripts
    )
    script_src = hashes or "'none'"
    policy = (
        f"default-src 'none'; script-src {script_src}; "
        "style-src 'unsafe-inline'; connect-src 'self'; img-src 'self'; "
        "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    )
    return {
        "Content-Security-Policy": policy,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }


def create_api(
    *,
    store: Store,
    notifier: Notifier,
    clock: Clock,
    stale_after_s: float,
    new_event_id: Callable[[], str] = lambda: uuid.uuid4().hex,
    max_body_bytes: int = MAX_BODY_BYTES,
    process: ProcessSources | None = None,
) -> FastAPI:
    """The API app; `process` gives `/metrics` the sessions, link and MQTT counters."""
    stale_after_ns = int(stale_after_s * 1e9)
    app = FastAPI(
        title="dergw headend",
        version="1",
        summary="Fleet, telemetry and desired state (intent) of dergw site gateways.",
        openapi_url="/openapi.json",
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.authenticator = Authenticator(store, clock)
    api_counters = ApiCounters()
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    router = APIRouter(prefix=API_PREFIX, responses=_ERROR_RESPONSES)

    @app.exception_handler(StoreError)
    async def _store_failed(_request: Request, exc: StoreError) -> JSONResponse:
        return JSONResponse(
            status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
            content={"detail": f"the headend database is unavailable ({exc}); retry shortly"},
        )

    def online(gateway: GatewayRecord, now_ns: int) -> bool:
        return is_online(gateway, now_ns=now_ns, stale_after_ns=stale_after_ns)

    async def require_site(site_id: str) -> None:
        if await store.get_site(site_id) is None:
            raise _not_found(str(UnknownSiteError(site_id)))

    async def require_device(site_id: str, device_id: str) -> None:
        devices = await store.list_devices(site_id)
        if not any(record.device.device_id == device_id for record in devices):
            await require_site(site_id)
            known = ", ".join(sorted({r.device.device_id for r in devices})) or "none"
            raise _not_found(
                f"site {site_id!r} has no device {device_id!r} in its registered inventory "
                f"(known devices: {known})"
            )

    async def append_and_publish(
        site_id: str, compose: IntentComposer, now_ns: int, principal: Principal
    ) -> IntentCreatedOut:
        try:
            stored = await store.append_intent(site_id, compose, now_ns, posted_by=principal.label)
        except UnknownSiteError as exc:
            raise _not_found(str(exc)) from None
        except IntentRejected as exc:
            raise _rejection(exc) from None
        api_counters.intents_posted += 1
        await notifier.publish(site_id, stored.version)
        return IntentCreatedOut.of(stored)

    async def intent_versions(site_id: str, intents: list[StoredIntent]) -> list[IntentVersionOut]:
        versions = [stored.version for stored in intents]
        gateways = await store.list_gateways(site_id)
        deliveries = {
            (d.gateway_id, d.version): d for d in await store.intent_deliveries(site_id, versions)
        }
        statuses = {
            (s.gateway_id, s.version): s
            for s in await store.latest_intent_statuses(site_id, versions)
        }
        reported = {r.gateway_id: r for r in await store.latest_reported_states(site_id)}
        now_ns = clock.wall_ns()
        result: list[IntentVersionOut] = []
        for stored in intents:
            document = IntentDocumentOut.of(stored.document)
            progress = [
                GatewayIntentStatusOut.of(
                    intent_progress(
                        stored.version,
                        gateway,
                        deliveries.get((gateway.gateway_id, stored.version)),
                        statuses.get((gateway.gateway_id, stored.version)),
                        reported.get(gateway.gateway_id),
                    ),
                    online=online(gateway, now_ns),
                )
                for gateway in gateways
            ]
            result.append(
                IntentVersionOut(
                    site_id=stored.site_id,
                    version=stored.version,
                    issued_at=document.issued_at,
                    document=document,
                    gateways=progress,
                    posted_by=stored.posted_by,
                )
            )
        return result

    # -- health and fleet -----------------------------------------------------------------------

    @router.get("/healthz", response_model=HealthOut, tags=["health"])
    async def healthz() -> HealthOut:
        schema_version = await store.schema_version()
        return HealthOut(
            status="ok",
            server_time=datetime_from_ns(clock.wall_ns()),
            schema_version=schema_version,
        )

    @router.get("/gateways", response_model=list[GatewayOut], tags=["fleet"])
    async def list_gateways(
        principal: SiteViewer, site_id: OptionalSiteIdQuery = None
    ) -> list[GatewayOut]:
        """The gateways of the site, or of the fleet (a site-scoped token: of its site)."""
        if site_id is not None:
            await require_site(site_id)
        now_ns = clock.wall_ns()
        return [
            GatewayOut.of(gateway, online=online(gateway, now_ns))
            for gateway in await store.list_gateways(site_id or principal.site_id)
        ]

    @router.get("/gateways/{gateway_id}", response_model=GatewayOut, tags=["fleet"])
    async def get_gateway(principal: Viewer, gateway_id: GatewayId) -> GatewayOut:
        gateway = await store.get_gateway(gateway_id)
        if gateway is None:
            raise _not_found(
                f"unknown gateway {gateway_id!r}: it has never registered "
                "(GET /api/v1/gateways lists the known gateways)"
            )
        _forbidden_unless_sees(principal, gateway.site_id)
        return GatewayOut.of(gateway, online=online(gateway, clock.wall_ns()))

    @router.get("/gateways/{gateway_id}/gaps", response_model=list[GapOut], tags=["telemetry"])
    async def list_gaps(
        principal: Viewer,
        gateway_id: GatewayId,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> list[GapOut]:
        """What the gateway's outbox shed (quota reached) or could not store, newest first."""
        if principal.site_id is not None:
            gateway = await store.get_gateway(gateway_id)
            if gateway is None:
                return []
            _forbidden_unless_sees(principal, gateway.site_id)
        return [GapOut.of(gap) for gap in await store.gaps(gateway_id=gateway_id, limit=limit)]

    @router.get(
        "/gateways/{gateway_id}/intent-acks",
        response_model=list[GatewayIntentAckOut],
        tags=["intents"],
    )
    async def list_gateway_intent_acks(
        principal: Viewer,
        gateway_id: GatewayId,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> list[GatewayIntentAckOut]:
        """What the gateway answered to the intents it received, newest first, including
        refusals of intents this headend never issued (forged, tampered, replayed ...)."""
        if principal.site_id is not None:
            gateway = await store.get_gateway(gateway_id)
            if gateway is None:
                return []
            _forbidden_unless_sees(principal, gateway.site_id)
        acks = await store.gateway_intent_acks(gateway_id, limit)
        return [GatewayIntentAckOut.of(site_id, record) for site_id, record in acks]

    @router.get("/sites", response_model=list[SiteOut], tags=["fleet"])
    async def list_sites(principal: Viewer) -> list[SiteOut]:
        """The fleet's sites (a site-scoped token: its own site only)."""
        now_ns = clock.wall_ns()
        gateways = await store.list_gateways()
        gateways_of: defaultdict[str, list[GatewayRecord]] = defaultdict(list)
        for gateway in gateways:
            gateways_of[gateway.site_id].append(gateway)
        site_of_gateway = {g.gateway_id: g.site_id for g in gateways}
        device_count: Counter[str] = Counter(
            site_of_gateway.get(d.gateway_id, "") for d in await store.list_devices()
        )
        versions = await store.latest_intent_versions()
        result: list[SiteOut] = []
        for record in await store.list_sites():
            site_id = record.site.site_id
            if not principal.sees(site_id):
                continue
            site_gateways = gateways_of.get(site_id, [])
            result.append(
                SiteOut.of(
                    record,
                    gateway_ids=[g.gateway_id for g in site_gateways],
                    gateways_online=sum(online(g, now_ns) for g in site_gateways),
                    device_count=device_count[site_id],
                    intent_version=versions.get(site_id, 0),
                )
            )
        return result

    @router.get("/sites/{site_id}", response_model=SiteDetailOut, tags=["fleet"])
    async def get_site(_principal: SiteViewer, site_id: SiteId) -> SiteDetailOut:
        record = await store.get_site(site_id)
        if record is None:
            raise _not_found(str(UnknownSiteError(site_id)))
        now_ns = clock.wall_ns()
        gateways = await store.list_gateways(site_id)
        devices = await store.list_devices(site_id)
        latest = await store.get_intent(site_id)
        summary = SiteOut.of(
            record,
            gateway_ids=[g.gateway_id for g in gateways],
            gateways_online=sum(online(g, now_ns) for g in gateways),
            device_count=len(devices),
            intent_version=latest.version if latest is not None else 0,
        )
        return SiteDetailOut(
            **summary.model_dump(),
            gateways=[GatewayOut.of(g, online=online(g, now_ns)) for g in gateways],
            devices=[DeviceOut.of(d) for d in devices],
            reported_state=[
                ReportedStateOut.of(r) for r in await store.latest_reported_states(site_id)
            ],
        )

    @router.get("/sites/{site_id}/flexibility", response_model=SiteFlexibilityOut, tags=["grid"])
    async def get_site_flexibility(_principal: SiteViewer, site_id: SiteId) -> SiteFlexibilityOut:
        """The newest flexibility report of each gateway of the site, with its forecast."""
        await require_site(site_id)
        now_ns = clock.wall_ns()
        online_ids = {g.gateway_id for g in await store.list_gateways(site_id) if online(g, now_ns)}
        gateways: list[FlexibilityOut] = []
        counted = []
        for record in await store.latest_flexibility(site_id):
            is_up = record.gateway_id in online_ids
            counts = flexibility_counts(
                record, online=is_up, now_ns=now_ns, max_age_ns=FLEXIBILITY_MAX_AGE_NS
            )
            if counts:
                counted.append(record)
            gateways.append(FlexibilityOut.of(record, online=is_up, counted=counts))
        return SiteFlexibilityOut(
            site_id=site_id,
            totals=FlexibilitySummaryOut.of(summarize_flexibility(counted, now_ns=now_ns)),
            gateways=gateways,
        )

    @router.get("/sites/{site_id}/devices", response_model=list[DeviceOut], tags=["fleet"])
    async def list_site_devices(_principal: SiteViewer, site_id: SiteId) -> list[DeviceOut]:
        await require_site(site_id)
        return [DeviceOut.of(d) for d in await store.list_devices(site_id)]

    # -- telemetry ------------------------------------------------------------------------------

    @router.get("/telemetry/latest", response_model=list[LatestPointOut], tags=["telemetry"])
    async def latest_telemetry(
        _principal: SiteViewer, site_id: SiteIdQuery, device_id: OptionalIdQuery = None
    ) -> list[LatestPointOut]:
        if device_id is None:
            await require_site(site_id)
        else:
            await require_device(site_id, device_id)
        points = await store.latest_points(site_id=site_id, device_id=device_id)
        return [LatestPointOut.of(p) for p in points]

    @router.get("/telemetry/history", response_model=HistoryPageOut, tags=["telemetry"])
    async def telemetry_history(
        _principal: SiteViewer,
        site_id: SiteIdQuery,
        device_id: Annotated[
            str, Query(min_length=1, max_length=MAX_ID_LENGTH, pattern=_ID_PATTERN)
        ],
        point: Annotated[str | None, Query(min_length=1, max_length=MAX_ID_LENGTH)] = None,
        start: Annotated[
            datetime | None, Query(description="inclusive, ISO-8601 (no offset = UTC)")
        ] = None,
        end: Annotated[datetime | None, Query(description="exclusive, ISO-8601")] = None,
        limit: Annotated[int, Query(ge=1, le=_HISTORY_MAX_LIMIT)] = 1000,
        cursor: Annotated[
            str | None, Query(max_length=1024, description="next_cursor of the previous page")
        ] = None,
    ) -> HistoryPageOut:
        start_ns = _ns_of(start, "start")
        end_ns = _ns_of(end, "end")
        if start_ns is not None and end_ns is not None and start_ns >= end_ns:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT,
                detail=f"start ({start}) must be before end ({end})",
            )
        try:
            after = decode_cursor(cursor) if cursor is not None else None
        except CursorError:
            raise HTTPException(
                status.HTTP_400_BAD_REQUEST,
                detail="cursor is not one this API issued; repeat the query without `cursor` "
                "and follow `next_cursor` from its response",
            ) from None
        await require_device(site_id, device_id)
        page = await store.point_history(
            HistoryQuery(site_id, device_id, point, start_ns, end_ns, limit, after)
        )
        return HistoryPageOut(
            site_id=site_id,
            device_id=device_id,
            point=point,
            items=[HistoryPointOut.of(p) for p in page.points],
            next_cursor=encode_cursor(page.next_cursor) if page.next_cursor is not None else None,
        )

    @router.get("/events", response_model=list[EventResponseOut], tags=["telemetry"])
    async def list_event_responses(
        principal: SiteViewer,
        site_id: OptionalSiteIdQuery = None,
        event_id: OptionalIdQuery = None,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
    ) -> list[EventResponseOut]:
        """Gateways' responses to events (a site-scoped token: of its site)."""
        if site_id is not None:
            await require_site(site_id)
        records = await store.event_responses(
            site_id=site_id or principal.site_id, event_id=event_id, limit=limit
        )
        return [EventResponseOut.of(r) for r in records]

    # -- desired state --------------------------------------------------------------------------

    @router.post(
        "/sites/{site_id}/intents",
        response_model=IntentCreatedOut,
        status_code=status.HTTP_201_CREATED,
        tags=["intents"],
        responses=_CONFLICT,
    )
    async def post_site_intent(
        principal: SiteOperator, site_id: SiteId, body: IntentPostIn
    ) -> IntentCreatedOut:
        request = body.to_request()
        now_ns = clock.wall_ns()

        def compose(basis: IntentBasis) -> pb.IntentDocument:
            return compose_intent(basis, request, now_ns=now_ns, new_event_id=new_event_id)

        return await append_and_publish(site_id, compose, now_ns, principal)

    @router.post(
        "/sites/{site_id}/devices/{device_id}/intents",
        response_model=IntentCreatedOut,
        status_code=status.HTTP_201_CREATED,
        tags=["intents"],
        responses=_CONFLICT,
    )
    async def post_device_intent(
        principal: SiteOperator, site_id: SiteId, device_id: DeviceId, body: IntentPostIn
    ) -> IntentCreatedOut:
        try:
            request = for_device(body.to_request(), device_id)
        except IntentRejected as exc:
            raise _rejection(exc) from None
        if not request.events:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT,
                detail="a device intent needs at least one event",
            )

        now_ns = clock.wall_ns()

        def compose(basis: IntentBasis) -> pb.IntentDocument:
            return compose_intent(
                basis,
                request,
                now_ns=now_ns,
                new_event_id=new_event_id,
                scope_device_id=device_id,
            )

        return await append_and_publish(site_id, compose, now_ns, principal)

    @router.post(
        "/sites/{site_id}/events/{event_id}/cancel",
        response_model=IntentCreatedOut,
        status_code=status.HTTP_201_CREATED,
        tags=["intents"],
        responses=_CONFLICT,
    )
    async def cancel_site_event(
        principal: SiteOperator, site_id: SiteId, event_id: EventId
    ) -> IntentCreatedOut:
        now_ns = clock.wall_ns()

        def compose(basis: IntentBasis) -> pb.IntentDocument:
            return cancel_event(basis, event_id, now_ns=now_ns)

        return await append_and_publish(site_id, compose, now_ns, principal)

    @router.get("/sites/{site_id}/intents", response_model=list[IntentVersionOut], tags=["intents"])
    async def list_site_intents(
        _principal: SiteViewer,
        site_id: SiteId,
        limit: Annotated[int, Query(ge=1, le=100)] = 20,
    ) -> list[IntentVersionOut]:
        await require_site(site_id)
        return await intent_versions(site_id, await store.list_intents(site_id, limit))

    @router.get(
        "/sites/{site_id}/intents/{version}", response_model=IntentVersionOut, tags=["intents"]
    )
    async def get_site_intent(
        _principal: SiteViewer,
        site_id: SiteId,
        version: Annotated[int, Path(ge=1, le=_INT64_MAX)],
    ) -> IntentVersionOut:
        await require_site(site_id)
        stored = await store.get_intent(site_id, version)
        if stored is None:
            latest = await store.get_intent(site_id)
            raise _not_found(
                f"site {site_id!r} has no intent version {version} "
                f"(latest is {latest.version if latest is not None else 'none'})"
            )
        return (await intent_versions(site_id, [stored]))[0]

    # -- grid -----------------------------------------------------------------------------------

    @router.get("/grid/feeders", response_model=list[FeederOut], tags=["grid"])
    async def grid_feeders(principal: Viewer) -> list[FeederOut]:
        """Per-feeder aggregates over the whole fleet (not for site-scoped tokens)."""
        if principal.site_id is not None:
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                detail=f"token {principal.token_id} ({principal.name}) is scoped to site "
                f"{principal.site_id!r}; feeder aggregates span the fleet and need an unscoped "
                "token",
            )
        summaries = summarize_feeders(
            [record.site for record in await store.list_sites()],
            await store.list_gateways(),
            await store.list_devices(),
            await store.sample_status(),
            await store.latest_points(site_id=None, point="W"),
            now_ns=clock.wall_ns(),
            stale_after_ns=stale_after_ns,
            flexibility=await store.latest_flexibility(),
        )
        return [FeederOut.of(summary) for summary in summaries]

    # -- operator API tokens --------------------------------------------------------------------

    @router.post(
        "/tokens",
        response_model=TokenCreatedOut,
        status_code=status.HTTP_201_CREATED,
        tags=["admin"],
        responses=_CONFLICT,
    )
    async def create_api_token(principal: Admin, body: TokenCreateIn) -> TokenCreatedOut:
        """A new API token; the response holds its secret, which is not shown again."""
        try:
            text, record = await create_token(
                store,
                name=body.name,
                role=Role.parse(body.role),
                site_id=body.site_id,
                created_by=principal.label,
                now_ns=clock.wall_ns(),
            )
        except TokenGrantError as exc:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=str(exc)) from None
        except DuplicateTokenError as exc:  # 64 random bits collided: the caller may retry
            raise HTTPException(status.HTTP_409_CONFLICT, detail=f"{exc}; retry") from None
        return TokenCreatedOut(**TokenOut.of(record).model_dump(), token=str(text))

    @router.get("/tokens", response_model=list[TokenOut], tags=["admin"])
    async def list_api_tokens(_principal: Admin) -> list[TokenOut]:
        """Every token, revoked ones included, without secrets."""
        return [TokenOut.of(token) for token in await store.list_tokens()]

    @router.post("/tokens/{token_id}/revoke", response_model=TokenOut, tags=["admin"])
    async def revoke_api_token(principal: Admin, token_id: TokenId) -> TokenOut:
        """Refuse the token from now on (revoking twice keeps the first revocation)."""
        revoked = await store.revoke_token(token_id, principal.label, clock.wall_ns())
        if revoked is None:
            raise _not_found(
                f"unknown API token {token_id!r} (GET /api/v1/tokens lists the tokens)"
            )
        return TokenOut.of(revoked)

    app.include_router(router)

    # -- operators' page and Prometheus ---------------------------------------------------------

    @app.get(
        "/metrics",
        response_class=Response,
        tags=["health"],
        responses={
            **_ERROR_RESPONSES,
            200: {
                "description": "Prometheus text exposition format 0.0.4",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            },
        },
    )
    async def metrics(_principal: Viewer) -> Response:
        """Counters of this process and fleet gauges, for Prometheus (a viewer token)."""
        now_ns = clock.wall_ns()
        gateways = await store.list_gateways()
        counters, gauges = process_metrics(
            gateways_total=len(gateways),
            gateways_online=sum(online(g, now_ns) for g in gateways),
            api=api_counters,
            authenticator=app.state.authenticator,
            sources=process,
        )
        return Response(render(counters, gauges), media_type=METRICS_CONTENT_TYPE)

    page = (resources.files("headend_min") / _OPERATOR_PAGE).read_text(encoding="utf-8")
    page_headers = {"Cache-Control": "no-cache", **_page_security_headers(page)}

    async def operator_page() -> HTMLResponse:
        """The operator page (static; it asks for a token and calls this API with it)."""
        return HTMLResponse(page, headers=page_headers)

    for path, name in (("/", "operator_page"), ("/ui", "operator_page_ui")):
        app.add_api_route(
            path, operator_page, response_class=HTMLResponse, tags=["operator"], name=name
        )

    return app

"""The headend's storage contract: an async `Store` protocol and its errors.

Every piece of headend state lives behind this protocol, so the process itself is stateless and a
second implementation (PostgreSQL with psycopg 3) can replace `SqliteStore` without touching the
link or the HTTP API. Rules every implementation keeps:

* `commit_telemetry` is atomic per batch (all of it or none; batches of many gateways may share
  one transaction - group commit - but one batch's failure is its caller's alone) and idempotent
  per (gateway_id, seq): a replayed record is ignored, never stored twice. It returns only after
  the commit is durable, because the caller acks the batch to the gateway as soon as it returns.
  Concurrent calls commit in call order, so one gateway's batches stay ordered. Batches may
  arrive out of order (a live lane runs ahead of the backlog): the store keeps the contiguous
  watermark (`gateways.committed_seq`) and the committed ranges above it
  (`headend_min.seqranges.absorb`) in the same transaction, and applies ClockSync records to
  unsynced samples of that boot.
* `register_gateway` counts every seq below the gateway's `oldest_unacked_seq` (or `next_seq`
  when its outbox is empty) as committed: the gateway only deletes what was acked.
* `append_intent` allocates the site's next version and runs the composer *inside* the same
  transaction (PostgreSQL: `SELECT ... FOR UPDATE` on the site row), so versions are strictly
  increasing and a composer's exception leaves nothing behind.
* Times are UTC ns since the epoch and are passed in by the caller (the store reads no clock).
* Read methods never return protobuf for tables the HTTP API renders, except the intent document
  and reported state, which are stored as the exact wire messages.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from dergw.v1 import pb
from headend_min.model import (
    ApiToken,
    CommitResult,
    DeviceRecord,
    EventResponseRecord,
    FlexibilityRecord,
    GapRecord,
    GatewayRecord,
    HistoryPage,
    HistoryQuery,
    IntentAckInfo,
    IntentBasis,
    IntentDeliveryRecord,
    IntentStatusRecord,
    LatestPoint,
    RegisterOutcome,
    Registration,
    ReportedStateRecord,
    SampleStatus,
    SiteRecord,
    StoredIntent,
    StreamRef,
    TelemetryRows,
)

__all__ = [
    "DuplicateTokenError",
    "IntentComposer",
    "PendingCommit",
    "SchemaTooNewError",
    "Store",
    "StoreError",
    "UnknownGatewayError",
    "UnknownSiteError",
    "commit_row_count",
    "own_error",
]

# Builds the next document from what the allocating transaction read; may raise IntentRejected.
IntentComposer = Callable[[IntentBasis], pb.IntentDocument]


class StoreError(RuntimeError):
    """The database failed or refused; the operation did not happen."""


# -- group commit: what both stores' committers share ---------------------------------------


@dataclass(slots=True)
class PendingCommit:
    """A telemetry batch waiting for its store's next group commit."""

    rows: TelemetryRows
    now_ns: int
    future: asyncio.Future[CommitResult]


def own_error(exc: BaseException, delivered: set[int]) -> BaseException:
    """`exc` for the first caller it fails, a fresh StoreError caused by it for every other one:
    one exception object raised in many tasks would collect all their tracebacks."""
    if id(exc) not in delivered:
        delivered.add(id(exc))
        return exc
    error = StoreError(str(exc) or repr(exc))
    error.__cause__ = exc
    return error


def commit_row_count(rows: TelemetryRows) -> int:
    """Rows a batch writes, roughly: what bounds a group's statement time."""
    lists: tuple[Sequence[object], ...] = (
        rows.samples,
        rows.latest_points,
        rows.sample_status,
        rows.event_responses,
        rows.intent_statuses,
        rows.reported_states,
        rows.decisions,
        rows.flexibility,
        rows.gaps,
        rows.clock_syncs,
        rows.unknown,
    )
    return 1 + sum(len(rows) for rows in lists)


class SchemaTooNewError(StoreError):
    """The database was migrated by a newer headend than this one."""


class UnknownSiteError(LookupError):
    """No gateway has registered this site."""

    def __init__(self, site_id: str) -> None:
        super().__init__(
            f"unknown site {site_id!r}: no gateway has registered it "
            "(GET /api/v1/sites lists the known sites)"
        )
        self.site_id = site_id


class UnknownGatewayError(LookupError):
    """The gateway never registered."""


class DuplicateTokenError(ValueError):
    """An API token with this id is already stored."""


class Store(Protocol):
    async def close(self) -> None:
        """Finish pending work and release the database."""
        ...

    async def schema_version(self) -> int: ...

    # -- gateway link ---------------------------------------------------------------------------

    async def register_gateway(
        self, registration: Registration, stream: StreamRef, now_ns: int
    ) -> RegisterOutcome:
        """Upsert site, gateway and inventory; mark `stream` open; one transaction."""
        ...

    async def touch_streams(self, streams: Sequence[StreamRef], now_ns: int) -> None:
        """Refresh last_seen of gateways whose *current* stream is one of `streams`."""
        ...

    async def close_stream(self, stream: StreamRef, now_ns: int) -> None:
        """Mark the gateway's stream closed, unless a newer stream has replaced it."""
        ...

    async def commit_telemetry(self, rows: TelemetryRows, now_ns: int) -> CommitResult:
        """Store one batch (dedupe on gateway_id+seq); return what is committed for the gateway
        as of this batch, once that is durable."""
        ...

    async def record_intent_delivery(
        self, gateway_id: str, site_id: str, version: int, now_ns: int
    ) -> None: ...

    async def record_intent_ack(self, gateway_id: str, ack: IntentAckInfo, now_ns: int) -> None: ...

    # -- desired state --------------------------------------------------------------------------

    async def append_intent(
        self,
        site_id: str,
        compose: IntentComposer,
        now_ns: int,
        *,
        posted_by: str | None = None,
    ) -> StoredIntent:
        """Allocate the next version and store `compose(basis)` with who posted it;
        raises UnknownSiteError."""
        ...

    async def get_intent(self, site_id: str, version: int | None = None) -> StoredIntent | None:
        """One version, or the latest when `version` is None."""
        ...

    async def list_intents(self, site_id: str, limit: int) -> list[StoredIntent]:
        """Newest first."""
        ...

    async def latest_intent_versions(self) -> dict[str, int]:
        """site_id -> latest version, for every site with at least one version."""
        ...

    async def intent_deliveries(
        self, site_id: str, versions: Sequence[int]
    ) -> list[IntentDeliveryRecord]: ...

    async def gateway_intent_acks(
        self, gateway_id: str, limit: int
    ) -> list[tuple[str, IntentDeliveryRecord]]:
        """The gateway's newest intent acks as (site id, record), newest first: also for
        versions this headend never issued (a forged intent the gateway refused)."""
        ...

    async def latest_intent_statuses(
        self, site_id: str, versions: Sequence[int]
    ) -> list[IntentStatusRecord]:
        """The newest IntentStatus per (gateway, version) for the site's gateways."""
        ...

    # -- reads for the HTTP API -----------------------------------------------------------------

    async def list_gateways(self, site_id: str | None = None) -> list[GatewayRecord]: ...

    async def get_gateway(self, gateway_id: str) -> GatewayRecord | None: ...

    async def list_sites(self) -> list[SiteRecord]: ...

    async def get_site(self, site_id: str) -> SiteRecord | None: ...

    async def list_devices(self, site_id: str | None = None) -> list[DeviceRecord]: ...

    async def latest_points(
        self, *, site_id: str | None, device_id: str | None = None, point: str | None = None
    ) -> list[LatestPoint]: ...

    async def sample_status(self, site_id: str | None = None) -> list[SampleStatus]: ...

    async def point_history(self, query: HistoryQuery) -> HistoryPage:
        """Points in (time, gateway_id, seq, index) order, strictly after `query.after`."""
        ...

    async def event_responses(
        self, *, site_id: str | None, event_id: str | None, limit: int
    ) -> list[EventResponseRecord]:
        """Newest first."""
        ...

    async def latest_reported_states(self, site_id: str) -> list[ReportedStateRecord]:
        """The newest ReportedState of each gateway of the site."""
        ...

    async def gaps(
        self, *, site_id: str | None = None, gateway_id: str | None = None, limit: int = 100
    ) -> list[GapRecord]:
        """Gap records (what gateways shed), newest first."""
        ...

    async def latest_flexibility(self, site_id: str | None = None) -> list[FlexibilityRecord]:
        """The newest Flexibility report of each gateway (of the site, or of the fleet)."""
        ...

    # -- operator API tokens (headend_min.auth) ------------------------------------------------

    async def create_token(self, token: ApiToken) -> None:
        """Store a new token; raises DuplicateTokenError when its id exists."""
        ...

    async def get_token(self, token_id: str) -> ApiToken | None: ...

    async def list_tokens(self) -> list[ApiToken]:
        """Every token, revoked ones included, oldest first."""
        ...

    async def revoke_token(self, token_id: str, revoked_by: str, now_ns: int) -> ApiToken | None:
        """Mark the token revoked (a second revoke keeps the first time); None if unknown."""
        ...

    async def touch_token(self, token_id: str, now_ns: int) -> None:
        """Record that the token was used (`last_used_at_ns`)."""
        ...

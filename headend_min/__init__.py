"""headend_min: the small, stateless cloud headend.

One asyncio process serves a gRPC link for gateways (`link`) and an HTTP API for operators
(`api`). Every piece of state lives in the database behind the `store.Store` protocol (SQLite
today, PostgreSQL later), so any instance can serve any gateway and a restart loses nothing.

Modules:
  cli           `dergw headend run` (argparse)
  app           composition: store + notifier + gRPC server + uvicorn in one event loop
  config        listen addresses, database location, keepalive (pure parsing)
  link          gRPC `GatewayLink/Connect`: registration, telemetry ingest with acks, intent push
  api           FastAPI routes under /api/v1; `schemas` holds their pydantic models
  auth          operator API tokens (hashed at rest), roles, site scope, the routes' guard;
                token_cli is `dergw headend token create|list|revoke`
  store         the async `Store` protocol and the records it returns
  sqlite_store  the SQLite implementation (one worker thread, WAL); sqlite_schema its migrations
  notify        `Notifier`: wakes the streams of a site when a new intent version exists
  model         plain dataclasses shared by the modules above
  ingest        pure: wire messages -> validated registration and per-table telemetry rows
  intents       pure: intent validation, merge and cancellation (versioned documents)
  fleet         pure: presence, per-gateway intent progress, feeder aggregation
  clock         the injectable wall clock and time conversions
  signing       the intent signing key (Ed25519) and its trust file; signs each intent sent

It shares only the wire contract with the gateway: `dergw.v1`, including `dergw.v1.trust` (the
signed-intent key ids and trust file both ends must agree on, which `signing` writes) and
`dergw.v1.enrollment` (renewal headers, CSR, renewal time, key files). It imports nothing from
`gateway/`, `drivers/` or `hil/` (tests/test_boundaries.py).
"""

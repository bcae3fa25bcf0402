"""Operator authentication: token format and checks (pure), and the live API's refusals."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from headend_min.api import MAX_BODY_BYTES, PUBLIC_PATHS
from headend_min.app import Headend, HeadendStartError
from headend_min.auth import (
    ForbiddenError,
    MalformedTokenError,
    Principal,
    Role,
    TokenGrantError,
    TokenText,
    UnauthenticatedError,
    check_grant,
    check_role,
    check_site,
    hash_secret,
    new_token_text,
    parse_token,
    principal_of,
    secret_matches,
)
from headend_min.config import Endpoint, HeadendConfig
from headend_min.model import ApiToken
from headend_min.sqlite_store import SqliteStore
from headend_min.store import DuplicateTokenError
from tests.headend.harness import HeadendRunner, RunningHeadend

_EVENT = {"duration_s": 600, "controls": {"max_gen_pct": 50}}
_ROLES = st.sampled_from(list(Role))
_SITES = st.none() | st.sampled_from(["site-a", "site-b"])


def _record(token: TokenText, *, role: Role = Role.OPERATOR, revoked: bool = False) -> ApiToken:
    return ApiToken(
        token_id=token.token_id,
        name="ops",
        secret_sha256=hash_secret(token.secret),
        role=role.label,
        site_id=None,
        created_at_ns=1,
        created_by="test",
        revoked_at_ns=2 if revoked else None,
    )


# -- pure parts --------------------------------------------------------------------------------


def test_token_text_round_trips_and_hides_its_secret() -> None:
    token = new_token_text()
    text = str(token)
    assert text.startswith(f"dgw_{token.token_id}_")
    assert parse_token(text) == token
    assert parse_token(f"  {text}\n") == token  # as read from a file
    assert token.secret not in repr(token)
    assert new_token_text() != token


@given(st.text(max_size=80))
def test_parse_token_accepts_only_the_token_format(text: str) -> None:
    try:
        token = parse_token(text)
    except MalformedTokenError:
        return
    assert str(token) == text.strip()


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Bearer dgw_0123456789abcdef_" + "x" * 43,
        "dgw_0123456789ABCDEF_" + "x" * 43,  # upper-case id
        "dgw_0123456789abcde_" + "x" * 43,  # short id
        "dgw_0123456789abcdef_" + "x" * 31,  # short secret
        "dgw_0123456789abcdef_" + "x" * 42 + "=",
        "xyz_0123456789abcdef_" + "x" * 43,
    ],
)
def test_malformed_tokens_are_refused(text: str) -> None:
    with pytest.raises(MalformedTokenError, match="dergw headend token create"):
        parse_token(text)


@given(st.text(min_size=1, max_size=64), st.text(min_size=1, max_size=64))
def test_secret_matches_only_its_own_hash(secret: str, other: str) -> None:
    stored = hash_secret(secret)
    assert len(stored) == 64
    assert secret not in stored or len(secret) < 3
    assert secret_matches(secret, stored)
    assert secret_matches(other, stored) == (other == secret)


def test_principal_of_refuses_unknown_wrong_and_revoked_tokens() -> None:
    token = new_token_text()
    principal = principal_of(_record(token), token)
    assert principal == Principal(token.token_id, "ops", Role.OPERATOR, None)
    assert principal.label == f"ops (token {token.token_id})"
    with pytest.raises(UnauthenticatedError, match="unknown"):
        principal_of(None, token)
    with pytest.raises(UnauthenticatedError, match="unknown"):  # same answer as unknown
        principal_of(_record(token), TokenText(token.token_id, "y" * 43))
    with pytest.raises(UnauthenticatedError, match="revoked"):
        principal_of(_record(token, revoked=True), token)


def test_roles_are_ordered_and_parsed() -> None:
    assert Role.VIEWER < Role.OPERATOR < Role.ADMIN
    assert [Role.parse(r.label) for r in Role] == list(Role)
    assert Role.parse(" Admin ") is Role.ADMIN
    with pytest.raises(TokenGrantError, match="viewer, operator, admin"):
        Role.parse("root")


@given(_ROLES, _ROLES, _SITES)
def test_check_role_allows_exactly_the_roles_at_or_above(
    held: Role, needed: Role, site_id: str | None
) -> None:
    principal = Principal("0" * 16, "p", held, site_id)
    if held >= needed:
        check_role(principal, needed)
    else:
        with pytest.raises(ForbiddenError, match=needed.label):
            check_role(principal, needed)


@given(_ROLES, _SITES, st.sampled_from(["site-a", "site-b", "site-c"]))
def test_check_site_allows_the_scope_only(role: Role, scope: str | None, site_id: str) -> None:
    principal = Principal("0" * 16, "p", role, scope)
    if scope is None or scope == site_id:
        check_site(principal, site_id)
        assert principal.sees(site_id)
    else:
        with pytest.raises(ForbiddenError, match="scoped to site"):
            check_site(principal, site_id)


def test_grants_that_make_no_sense_are_refused() -> None:
    check_grant("ops-alice", Role.OPERATOR, "site-a")
    check_grant("root", Role.ADMIN, None)
    with pytest.raises(TokenGrantError, match="whole fleet"):
        check_grant("root", Role.ADMIN, "site-a")
    for bad_name in ("", "x" * 65, "tab\there"):
        with pytest.raises(TokenGrantError, match="printable"):
            check_grant(bad_name, Role.VIEWER, None)


# -- the live API ------------------------------------------------------------------------------


def _api_routes(headend: RunningHeadend) -> list[tuple[str, str]]:
    """Every operation the app serves, from its own OpenAPI document (which lists every route:
    none is registered with include_in_schema=False)."""
    app = headend.headend.api
    assert app is not None
    return [
        (method.upper(), path)
        for path, operations in app.openapi()["paths"].items()
        for method in operations
    ]


def _concrete(path: str) -> str:
    values = {
        "site_id": "site-1",
        "device_id": "pv-1",
        "gateway_id": "gw-1",
        "event_id": "ev-1",
        "version": "1",
        "token_id": "0123456789abcdef",
    }
    for name, value in values.items():
        path = path.replace("{" + name + "}", value)
    assert "{" not in path, f"add a value for the parameter of {path}"
    return path


async def _token(
    headend: RunningHeadend, role: str, site_id: str | None = None, name: str = "t"
) -> tuple[str, httpx.AsyncClient]:
    body: dict[str, object] = {"name": name, "role": role}
    if site_id is not None:
        body["site_id"] = site_id
    created = await headend.http.post("/tokens", json=body)
    assert created.status_code == 201, created.text
    token = created.json()["token"]
    client = httpx.AsyncClient(
        base_url=str(headend.http.base_url),
        timeout=5.0,
        headers={"Authorization": f"Bearer {token}"},
    )
    return token, client


async def test_every_route_but_healthz_refuses_anonymous_and_bad_tokens(
    headend: RunningHeadend,
) -> None:
    await headend.gateway().connect()
    routes = _api_routes(headend)
    assert len(routes) > 15
    public = []
    unknown = str(new_token_text())
    root = f"http://{headend.headend.http_endpoint}"
    async with httpx.AsyncClient(base_url=root, timeout=5.0) as anonymous:
        for method, path in routes:
            url = _concrete(path)
            body = {} if method == "POST" else None
            response = await anonymous.request(method, url, json=body)
            if response.status_code != 401:
                public.append(path)
                continue
            assert response.headers["www-authenticate"].startswith("Bearer"), path
            assert "token" in response.json()["detail"], path
            for bad in (unknown, "not-a-token", unknown[:-3]):
                refused = await anonymous.request(
                    method, url, json=body, headers={"Authorization": f"Bearer {bad}"}
                )
                assert refused.status_code == 401, (path, bad)
            basic = await anonymous.request(
                method, url, json=body, headers={"Authorization": "Basic dXNlcjpwYXNz"}
            )
            assert basic.status_code == 401, path
    assert set(public) == PUBLIC_PATHS
    app = headend.headend.api
    assert app is not None
    assert app.state.authenticator.refused[401] == 5 * (len(routes) - len(public))
    assert (await headend.http.get("/sites/site-1/intents")).json() == []  # nothing written


async def test_a_viewer_reads_but_every_write_is_refused(headend: RunningHeadend) -> None:
    await headend.gateway().connect()
    _, viewer = await _token(headend, "viewer")
    async with viewer:
        assert (await viewer.get("/sites/site-1")).status_code == 200
        assert (await viewer.get("/grid/feeders")).status_code == 200
        root = f"http://{headend.headend.http_endpoint}"
        for method, path in _api_routes(headend):
            if method == "GET" or path in PUBLIC_PATHS:
                continue
            response = await viewer.request(
                method, root + _concrete(path), json={"events": [_EVENT]}
            )
            assert response.status_code == 403, (path, response.text)
            assert "role" in response.json()["detail"]
        assert (await viewer.get("/tokens")).status_code == 403
    assert (await headend.http.get("/sites/site-1/intents")).json() == []


async def test_an_operator_scoped_to_one_site_neither_reads_nor_commands_another(
    headend: RunningHeadend,
) -> None:
    await headend.gateway("gw-a", "site-a").connect()
    await headend.gateway("gw-b", "site-b").connect()
    _, operator = await _token(headend, "operator", "site-a", name="ops-a")
    async with operator:
        posted = await operator.post("/sites/site-a/intents", json={"events": [_EVENT]})
        assert posted.status_code == 201, posted.text
        for refused in (
            await operator.post("/sites/site-b/intents", json={"events": [_EVENT]}),
            await operator.post("/sites/site-b/devices/pv-1/intents", json={"events": [_EVENT]}),
            await operator.post("/sites/site-b/events/x/cancel"),
            await operator.get("/sites/site-b"),
            await operator.get("/sites/site-b/intents"),
            await operator.get("/sites/site-b/devices"),
            await operator.get("/sites/site-b/flexibility"),
            await operator.get("/telemetry/latest", params={"site_id": "site-b"}),
            await operator.get(
                "/telemetry/history", params={"site_id": "site-b", "device_id": "pv-1"}
            ),
            await operator.get("/events", params={"site_id": "site-b"}),
            await operator.get("/gateways", params={"site_id": "site-b"}),
            await operator.get("/gateways/gw-b"),
            await operator.get("/gateways/gw-b/gaps"),
            await operator.get("/grid/feeders"),  # a fleet-wide aggregate
            await operator.post("/tokens", json={"name": "x", "role": "viewer"}),
        ):
            assert refused.status_code == 403, refused.request.url
        # Fleet-wide lists show its own site only.
        assert [s["site_id"] for s in (await operator.get("/sites")).json()] == ["site-a"]
        assert [g["gateway_id"] for g in (await operator.get("/gateways")).json()] == ["gw-a"]
        assert (await operator.get("/gateways/gw-a")).status_code == 200
        assert (await operator.get("/events")).status_code == 200
    assert (await headend.http.get("/sites/site-b/intents")).json() == []
    assert len((await headend.http.get("/sites")).json()) == 2


async def test_posts_record_the_principal(headend: RunningHeadend) -> None:
    await headend.gateway().connect()
    token, operator = await _token(headend, "operator", name="ops-alice")
    token_id = token.split("_")[1]
    async with operator:
        posted = await operator.post("/sites/site-1/intents", json={"events": [_EVENT]})
        assert posted.status_code == 201, posted.text
        event_id = posted.json()["document"]["events"][0]["event_id"]
        cancelled = await operator.post(f"/sites/site-1/events/{event_id}/cancel")
        assert cancelled.status_code == 201, cancelled.text
    label = f"ops-alice (token {token_id})"
    assert posted.json()["posted_by"] == label
    assert cancelled.json()["posted_by"] == label
    versions = (await headend.http.get("/sites/site-1/intents")).json()
    assert [v["posted_by"] for v in versions] == [label, label]
    assert (await headend.http.get("/sites/site-1/intents/1")).json()["posted_by"] == label


async def test_tokens_are_listed_without_secrets_and_revoked_ones_refused(
    headend: RunningHeadend,
) -> None:
    await headend.gateway().connect()
    token, viewer = await _token(headend, "viewer", name="dashboard")
    token_id = token.split("_")[1]
    async with viewer:
        assert (await viewer.get("/sites")).status_code == 200
        listed = {t["token_id"]: t for t in (await headend.http.get("/tokens")).json()}
        assert listed[token_id]["name"] == "dashboard"
        assert listed[token_id]["revoked"] is False
        assert listed[token_id]["last_used_at"] is not None
        assert listed[token_id]["created_by"].startswith("test-admin (token ")
        assert token.split("_", 2)[2] not in str(listed)
        assert "secret" not in str(listed)
        assert "token" not in listed[token_id]

        revoked = await headend.http.post(f"/tokens/{token_id}/revoke")
        assert revoked.status_code == 200, revoked.text
        assert revoked.json()["revoked"] is True
        assert revoked.json()["revoked_by"].startswith("test-admin (token ")
        refused = await viewer.get("/sites")
        assert refused.status_code == 401
        assert "revoked" in refused.json()["detail"]
    assert (await headend.http.post("/tokens/0123456789abcdef/revoke")).status_code == 404
    bad = await headend.http.post(
        "/tokens", json={"name": "x", "role": "admin", "site_id": "site-1"}
    )
    assert bad.status_code == 422
    assert "whole fleet" in bad.json()["detail"]


async def test_the_store_keeps_token_ids_unique_and_the_first_revocation(
    headend: RunningHeadend,
) -> None:
    store = headend.headend.store
    token = new_token_text()
    record = _record(token)
    await store.create_token(record)
    with pytest.raises(DuplicateTokenError, match=token.token_id):
        await store.create_token(record)
    assert await store.get_token(token.token_id) == record
    first = await store.revoke_token(token.token_id, "alice", 10)
    again = await store.revoke_token(token.token_id, "bob", 20)
    assert first is not None
    assert (first.revoked_at_ns, first.revoked_by) == (10, "alice")
    assert again == first
    assert await store.revoke_token("0123456789abcdef", "alice", 10) is None
    await store.touch_token(token.token_id, 50)
    await store.touch_token(token.token_id, 40)  # never moves back
    stored = await store.get_token(token.token_id)
    assert stored is not None
    assert stored.last_used_at_ns == 50
    assert token.token_id in [t.token_id for t in await store.list_tokens()]


async def test_the_secret_is_never_stored(headend: RunningHeadend) -> None:
    token, client = await _token(headend, "operator", "site-1", name="secret-check")
    await client.aclose()
    token_id, secret = token.split("_")[1], token.split("_", 2)[2]
    assert isinstance(headend.db_path, Path)
    with sqlite3.connect(headend.db_path) as db:
        row = db.execute("SELECT * FROM api_tokens WHERE token_id = ?", (token_id,)).fetchone()
    assert row is not None
    assert hash_secret(secret) in row
    assert not any(secret in str(value) for value in row)
    for path in headend.db_path.parent.glob(headend.db_path.name + "*"):  # db, -wal, -shm
        assert secret.encode() not in path.read_bytes(), path


async def _chunks(*chunks: bytes) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


async def test_bodies_over_the_limit_and_malformed_json_change_nothing(
    headend: RunningHeadend,
) -> None:
    await headend.gateway().connect()
    huge = b'{"events": [' + b" " * MAX_BODY_BYTES + b"]}"
    for send in (
        headend.http.post("/sites/site-1/intents", content=huge),
        # chunked: no Content-Length, the limit still holds
        headend.http.post("/sites/site-1/intents", content=_chunks(huge[:1000], huge[1000:])),
    ):
        response = await send
        assert response.status_code == 413, response.text
    for bad in (b"{", b'{"events": [}', b"\xff\xfe", b"[]", b'"x"', b"null"):
        response = await headend.http.post(
            "/sites/site-1/intents", content=bad, headers={"content-type": "application/json"}
        )
        assert response.status_code == 422, (bad, response.text)
    for unparsable in (b"[" * 200_000, b'{"events": "\xff"}'):  # too deep; not UTF-8
        response = await headend.http.post(
            "/sites/site-1/intents",
            content=unparsable,
            headers={"content-type": "application/json"},
        )
        assert response.status_code in (400, 422), response.text
    assert (await headend.http.get("/sites/site-1/intents")).json() == []
    # Anonymous oversized bodies are refused before anything reads them, too.
    async with httpx.AsyncClient(base_url=str(headend.http.base_url)) as anonymous:
        response = await anonymous.post("/sites/site-1/intents", content=huge)
        assert response.status_code == 413


# -- bootstrap and the CLI ---------------------------------------------------------------------


def _config(tmp_path: Path, token_file: Path) -> HeadendConfig:
    return HeadendConfig(
        grpc=Endpoint("127.0.0.1", 0),
        http=Endpoint("127.0.0.1", 0),
        db_path=tmp_path / "headend.sqlite3",
        admin_token_file=token_file,
    )


async def test_admin_token_file_is_created_once_then_reused(tmp_path: Path) -> None:
    token_file = tmp_path / "secrets" / "admin-token"
    async with Headend(_config(tmp_path, token_file)) as instance:
        first = instance.admin_token
        assert first is not None
        assert token_file.read_text().strip() == str(first)
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        async with httpx.AsyncClient(
            base_url=f"http://{instance.http_endpoint}/api/v1",
            headers={"Authorization": f"Bearer {first}"},
        ) as admin:
            assert (await admin.get("/tokens")).status_code == 200
    async with Headend(_config(tmp_path, token_file)) as instance:
        assert instance.admin_token == first
        tokens = await instance.store.list_tokens()
        assert [(t.token_id, t.role) for t in tokens] == [(first.token_id, "admin")]
        await instance.store.revoke_token(first.token_id, "test", 1)
    with pytest.raises(HeadendStartError, match="revoked"):
        await Headend(_config(tmp_path, token_file)).start()


async def test_a_token_file_is_stored_on_a_new_database(tmp_path: Path) -> None:
    token = new_token_text()
    token_file = tmp_path / "admin-token"
    token_file.write_text(f"{token}\n")
    async with Headend(_config(tmp_path, token_file)) as instance:
        assert instance.admin_token == token
    token_file.write_text("dgw_nonsense")
    with pytest.raises(HeadendStartError, match="not a dergw API token"):
        await Headend(_config(tmp_path, token_file)).start()
    token_file.write_text(str(TokenText(token.token_id, "z" * 43)))
    with pytest.raises(HeadendStartError, match="another secret"):
        await Headend(_config(tmp_path, token_file)).start()


def _dergw(*args: str) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).with_name("dergw")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "gateway.cli"]
    return subprocess.run(
        [*command, "headend", "token", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


async def test_cli_creates_lists_and_revokes_tokens(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'headend.sqlite3'}"
    created = _dergw(
        "create", "--role", "operator", "--name", "ops-bob", "--site", "s1", "--db", db
    )
    assert created.returncode == 0, created.stderr
    token = parse_token(created.stdout.strip())
    assert "ops-bob" in created.stderr
    assert "operator" in created.stderr

    listed = _dergw("list", "--db", db)
    assert listed.returncode == 0, listed.stderr
    assert token.token_id in listed.stdout
    assert "ops-bob" in listed.stdout
    assert "site=s1" in listed.stdout
    assert "active" in listed.stdout
    assert token.secret not in listed.stdout

    store = await SqliteStore.open(tmp_path / "headend.sqlite3")
    try:
        principal = principal_of(await store.get_token(token.token_id), token)
        assert principal == Principal(token.token_id, "ops-bob", Role.OPERATOR, "s1")
    finally:
        await store.close()

    revoked = _dergw("revoke", token.token_id, "--db", db)
    assert revoked.returncode == 0, revoked.stderr
    assert "REVOKED" in _dergw("list", "--db", db).stdout
    assert _dergw("revoke", "0123456789abcdef", "--db", db).returncode == 1
    refused = _dergw("create", "--role", "admin", "--name", "x", "--site", "s1", "--db", db)
    assert refused.returncode == 2
    assert "whole fleet" in refused.stderr

    store = await SqliteStore.open(tmp_path / "headend.sqlite3")
    try:
        with pytest.raises(UnauthenticatedError, match="revoked"):
            principal_of(await store.get_token(token.token_id), token)
    finally:
        await store.close()


async def test_runner_restart_gets_a_working_admin_client(runner: HeadendRunner) -> None:
    running = await runner.start()
    assert (await running.http.get("/tokens")).status_code == 200
    restarted = await runner.restart()
    assert (await restarted.http.get("/tokens")).status_code == 200
    assert len((await restarted.http.get("/tokens")).json()) == 2  # one admin per start

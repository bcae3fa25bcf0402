"""Signed intents end to end: a real headend and a real gateway (in process, no devices) over the
real gRPC link. A forged, tampered, misaddressed, expired or replayed intent changes nothing at
the gateway (its IntentStore keeps what it had), is counted there per reason, and shows as
rejected, with the reason, in the headend's intent progress.

The hostile intents are made by replacing the headend's `GatewaySessions.intent_message` (the one
place that signs): that is what a compromised signer, transport or broker could put on the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from dergw.v1 import pb
from gateway.audit import AuditKind, read_records, verify_file
from gateway.config import load_config
from gateway.runtime.app import Gateway
from headend_min.signing import SigningKey, sign_intent, trust_file_path
from tests.headend.harness import RunningHeadend
from tests.support import async_wait_until

DAY_NS = 24 * 3600 * 10**9

Hostile = Callable[[str, pb.IntentDocument], pb.DownMessage]


def _gateway_config(path: Path, *, grpc_target: str, keys_file: Path) -> Path:
    path.write_text(
        "\n".join(
            [
                "[gateway]",
                'id = "gw-1"',
                'state_dir = "gateway-state"',
                "[site]",
                'id = "site-1"',
                'name = "Signed"',
                'substation = "sub-1"',
                'feeder = "fdr-1"',
                "[uplink]",
                'transport = "grpc"',
                f'target = "{grpc_target}"',
                "reconnect_max_s = 1",
                "tls = false",  # the test headend is plaintext
                "[security]",
                f'intent_keys_file = "{keys_file}"',
                "",
            ]
        )
    )
    return path


@contextlib.asynccontextmanager
async def _running_gateway(config_path: Path) -> AsyncIterator[Gateway]:
    gateway = Gateway(load_config(config_path))
    stop = asyncio.Event()
    task = asyncio.create_task(gateway.run(stop))
    try:
        yield gateway
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def _post(headend: RunningHeadend, export_limit_w: float) -> int:
    response = await headend.http.post(
        "/sites/site-1/intents",
        json={"default_control": {"export_limit_w": export_limit_w}},
    )
    assert response.status_code == 201, response.text
    return int(response.json()["version"])


async def _progress(headend: RunningHeadend, version: int) -> dict[str, object]:
    response = await headend.http.get(f"/sites/site-1/intents/{version}")
    assert response.status_code == 200, response.text
    gateways = response.json()["gateways"]
    return dict(next(g for g in gateways if g["gateway_id"] == "gw-1"))


async def test_hostile_intents_change_nothing_and_show_as_rejected(
    headend: RunningHeadend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    signing_key = headend.headend.signing_key
    assert signing_key is not None
    keys_file = trust_file_path(tmp_path / "intent-signing-key.pem")  # next to the SQLite db
    assert keys_file.exists()
    config = _gateway_config(
        tmp_path / "gateway.toml", grpc_target=headend.grpc_target, keys_file=keys_file
    )
    sessions = headend.headend.sessions
    genuine: Callable[[str, pb.IntentDocument], pb.DownMessage] = sessions.intent_message
    now_ns = headend.clock.wall_ns

    async with _running_gateway(config) as gateway:

        def held() -> list[tuple[int, bytes]]:
            """Every intent the gateway's store keeps, newest (the one in force) first."""
            return [(kept.version, kept.document) for kept in gateway.store.history()]

        async def held_version_is(version: int) -> bool:
            kept = await asyncio.to_thread(held)
            return bool(kept) and kept[0][0] == version

        async def registered() -> bool:
            return (await headend.http.get("/gateways/gw-1")).status_code == 200

        await async_wait_until(registered, timeout_s=10, what="the gateway registered")
        # Two genuine intents go through: v1, then v2 (held).
        for version, limit in ((1, 1000.0), (2, 2000.0)):
            assert await _post(headend, limit) == version
            await async_wait_until(
                lambda v=version: held_version_is(v),  # type: ignore[misc]
                timeout_s=10,
                what=f"v{version} persisted at the gateway",
            )
        before = await asyncio.to_thread(held)
        first_document = pb.IntentDocument.FromString(
            (await asyncio.to_thread(gateway.store.history))[-1].document
        )
        assert first_document.version == 1

        def forged(gateway_id: str, document: pb.IntentDocument) -> pb.DownMessage:
            document.default_control.export_limit_w = 1e9
            stranger = SigningKey.generate()
            signed = sign_intent(document, gateway_id=gateway_id, key=stranger, now_ns=now_ns())
            return pb.DownMessage(signed_intent=signed)

        def tampered(gateway_id: str, document: pb.IntentDocument) -> pb.DownMessage:
            message = genuine(gateway_id, document)
            payload = pb.IntentPayload.FromString(message.signed_intent.payload)
            payload.document.default_control.export_limit_w = 1e9
            message.signed_intent.payload = payload.SerializeToString()
            return message

        def misaddressed(gateway_id: str, document: pb.IntentDocument) -> pb.DownMessage:
            return genuine("gw-other", document)

        def expired(gateway_id: str, document: pb.IntentDocument) -> pb.DownMessage:
            # Signed two days ago with a one-day accept-by time (a frozen, held-back delivery).
            signed = sign_intent(
                document, gateway_id=gateway_id, key=signing_key, now_ns=now_ns() - 2 * DAY_NS
            )
            return pb.DownMessage(signed_intent=signed)

        def replayed(gateway_id: str, document: pb.IntentDocument) -> pb.DownMessage:
            # A genuine, correctly signed old version sent again (rollback).
            return genuine(gateway_id, first_document)

        cases: list[tuple[str, Hostile, int | None]] = [
            ("UNKNOWN_KEY", forged, None),
            ("BAD_SIGNATURE", tampered, None),
            ("MISADDRESSED", misaddressed, None),
            ("EXPIRED", expired, None),
            ("REPLAYED", replayed, 1),  # the refusal names the version that was replayed
        ]
        for name, hostile, acked_version in cases:
            monkeypatch.setattr(sessions, "intent_message", hostile)
            posted = await _post(headend, 9999.0)
            shown_on = acked_version or posted

            async def rejected(version: int = shown_on, name: str = name) -> bool:
                progress = await _progress(headend, version)
                return progress["ack"] == "REJECTED" and str(progress["ack_reason"]).startswith(
                    name
                )

            await async_wait_until(rejected, timeout_s=10, what=f"{name} shown at the headend")
            if acked_version is None:
                assert (await _progress(headend, posted))["state"] == "rejected"
            assert await asyncio.to_thread(held) == before, f"{name} changed the gateway"

        counted = dict(gateway.uplink.health.intent_rejections)
        assert counted == {name: 1 for name, _, _ in cases}

        # The genuine signer again: the next version is accepted as usual.
        monkeypatch.setattr(sessions, "intent_message", genuine)
        latest = await _post(headend, 3000.0)
        await async_wait_until(
            lambda: held_version_is(latest), timeout_s=10, what="a genuine intent accepted again"
        )
        progress = await _progress(headend, latest)
        assert progress["ack"] == "PERSISTED"

        # A second delivery of the version in force (MQTT: the broker's queued copy and the push
        # after Register) is authentic: acknowledged STALE, not counted as a rejection.
        latest_document = pb.IntentDocument.FromString((await asyncio.to_thread(held))[0][1])

        def duplicate(gateway_id: str, document: pb.IntentDocument) -> pb.DownMessage:
            return genuine(gateway_id, latest_document)

        monkeypatch.setattr(sessions, "intent_message", duplicate)
        intents_before = gateway.uplink.health.intents_received
        await _post(headend, 4000.0)
        await async_wait_until(
            lambda: gateway.uplink.health.intents_received > intents_before,
            timeout_s=10,
            what="the duplicate delivered",
        )
        assert (await asyncio.to_thread(held))[0][0] == latest
        # Intents are handled one at a time: once the next genuine one is persisted, the
        # duplicate's handling is over.
        monkeypatch.setattr(sessions, "intent_message", genuine)
        after = await _post(headend, 5000.0)
        await async_wait_until(
            lambda: held_version_is(after), timeout_s=10, what="the next genuine intent"
        )
        assert gateway.uplink.health.intent_rejections == counted
        assert (await _progress(headend, latest))["ack"] == "PERSISTED"

        # Every verdict is in the tamper-evident audit log, in order, and the chain is intact.
        audit_path = gateway.config.gateway.state_dir / "audit.db"
        verdicts = [
            (r.kind, r.origin)
            for r in read_records(audit_path)
            if r.kind in (AuditKind.INTENT_ACCEPTED, AuditKind.INTENT_REJECTED)
        ]
        rejected = [v for v in verdicts if v[0] == AuditKind.INTENT_REJECTED]
        assert len(rejected) == len(cases)
        assert verdicts[-1][0] == AuditKind.INTENT_ACCEPTED
        assert verdicts[-1][1].startswith("headend (key ")
        assert verify_file(audit_path).ok

"""`forged-intent`: hostile intent documents against a live site, injected through the broker.

The threat is a compromised MQTT broker (or anyone who can publish on it): it can put any bytes on
a gateway's `down/intent` topic. The scenario plays that attacker with its own MQTT client on the
bench's broker. It first listens on the gateway's topic while the operator posts two genuine
intents (caps of `first_pct` then `held_pct`), capturing the signed deliveries as an attacker
would; then it publishes, one at a time:

- forged: a document lifting the cap, signed with the attacker's own Ed25519 key under the
  headend's key id;
- tampered: the captured delivery with its payload edited (cap lifted, version raised), the
  signature kept;
- replayed: the captured older delivery (the first cap) again;
- expired: a delivery signed with the headend's key two days ago (a delivery held back; the
  bench, as test equipment, signs it with the headend's key file);
- misaddressed: a delivery signed with the headend's key for another gateway of the site;
- unsigned: a bare IntentDocument lifting the cap.

Judged: after each, the PV cap at the registers stays at `held_pct` (nothing changed at the
site), and the gateway's refusal reaches the headend (its intent acks for this gateway show the
rejection with the check that failed). Finally a genuine intent is still applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any, TextIO

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion

from dergw.v1 import pb
from headend_min.signing import load_or_create_signing_key, sign_intent
from hil.scenarios.harness import Bench, BenchError
from hil.scenarios.probe import site_devices
from hil.scenarios.report import Check, ScenarioResult
from hil.scenarios.watch import SiteWatcher, capped_at, iso, not_capped_at

__all__ = ["ForgedIntentParams", "run_forged_intent"]

TOPIC_PREFIX = "dergw/v1"
DAY_NS = 86_400 * 1_000_000_000


@dataclass(frozen=True)
class ForgedIntentParams:
    first_pct: float = 70.0
    held_pct: float = 50.0
    final_pct: float = 30.0
    event_s: float = 900.0
    apply_timeout_s: float = 15.0
    # How long each attack is watched for an effect at the registers (several control cycles).
    observe_s: float = 2.0
    ack_timeout_s: float = 10.0


class _Attacker:
    """An MQTT client on the bench's broker: captures and publishes on a gateway's topics."""

    def __init__(self, bench: Bench) -> None:
        if bench.broker is None:
            raise BenchError("forged-intent needs the MQTT transport (a broker to attack)")
        self.topic = f"{TOPIC_PREFIX}/{bench.gateway_id}/down/intent"
        self.captured: list[pb.SignedIntent] = []
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id="attacker", protocol=mqtt.MQTTv5
        )
        self._client.on_message = self._on_message
        self._host, self._port = bench.broker.host, bench.broker.port

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with contextlib.suppress(Exception):  # whatever is on the topic, keep listening
            down = pb.DownMessage.FromString(bytes(message.payload))
            if down.HasField("signed_intent"):
                self.captured.append(down.signed_intent)

    async def start(self) -> None:
        await asyncio.to_thread(self._client.connect, self._host, self._port, 30, clean_start=True)
        self._client.loop_start()
        self._client.subscribe(self.topic, qos=1)

    async def publish(self, message: pb.DownMessage) -> None:
        info = self._client.publish(self.topic, message.SerializeToString(), qos=1)
        await asyncio.to_thread(info.wait_for_publish, 5.0)

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


def _payload(signed: pb.SignedIntent) -> pb.IntentPayload:
    return pb.IntentPayload.FromString(signed.payload)


def _uncapped(document: pb.IntentDocument, version: int) -> pb.IntentDocument:
    """The attacker's wish: the same site, a newer version, no events (no cap)."""
    lifted = pb.IntentDocument()
    lifted.CopyFrom(document)
    lifted.version = version
    del lifted.events[:]
    return lifted


async def _intent_acks(bench: Bench) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = await bench.api.get(f"/gateways/{bench.gateway_id}/intent-acks")
    return rows


async def _post_cap(bench: Bench, event_id: str, pct: float, duration_s: float) -> int:
    posted = await bench.api.post(
        f"/sites/{bench.site_id}/intents",
        {
            "events": [
                {
                    "event_id": event_id,
                    "start": iso(time.time()),
                    "duration_s": duration_s,
                    "controls": {"max_gen_pct": pct},
                }
            ]
        },
    )
    return int(posted["version"])


async def run_forged_intent(
    bench: Bench, out: TextIO, params: ForgedIntentParams | None = None
) -> ScenarioResult:
    params = params or ForgedIntentParams()
    result = ScenarioResult("forged-intent")
    result.checks.extend(site_devices(bench).requirements("pv"))
    if result.checks:
        return result
    attacker = _Attacker(bench)
    await attacker.start()
    try:
        await bench.start_gateway()
        await bench.wait_registered()
        async with SiteWatcher(bench, out) as watch:
            first = await _post_cap(bench, "genuine-1", params.first_pct, params.event_s)
            applied = await watch.wait_for(
                capped_at(params.first_pct), timeout_s=params.apply_timeout_s
            )
            held = await _post_cap(bench, "genuine-2", params.held_pct, params.event_s)
            applied_held = await watch.wait_for(
                capped_at(params.held_pct), timeout_s=params.apply_timeout_s
            )
            watch.note(f"genuine v{first} ({params.first_pct:g} %) and v{held} in force")
            result.checks.append(
                Check(
                    "genuine intents are applied",
                    applied is not None and applied_held is not None,
                    f"v{first} {'applied' if applied else 'not applied'}, "
                    f"v{held} {'applied' if applied_held else 'not applied'}",
                )
            )
            by_version = {_payload(s).version: s for s in attacker.captured}
            if first not in by_version or held not in by_version:
                result.checks.append(
                    Check("the attacker captured both deliveries", False, f"{sorted(by_version)}")
                )
                return result
            attacks = _attacks(bench, by_version[first], by_version[held], held)
            for name, version, message in attacks:
                started = time.time()
                await attacker.publish(message)
                await asyncio.sleep(params.observe_s)
                moved = watch.first(not_capped_at(params.held_pct), after=started)
                watch.note(f"{name}: {'CAP MOVED' if moved else 'nothing changed'}")
                result.checks.append(
                    Check(
                        f"{name} intent changes nothing at the site",
                        moved is None,
                        f"cap {params.held_pct:g} % held for {params.observe_s:g} s"
                        if moved is None
                        else f"cap moved at +{moved.wall - started:.2f} s",
                    )
                )
                shown = await _wait_rejection_shown(bench, version, name, params.ack_timeout_s)
                result.checks.append(
                    Check(
                        f"{name} intent is shown as rejected at the headend",
                        shown is not None,
                        shown or f"no rejection of v{version} at the headend",
                    )
                )
            final = await _post_cap(bench, "genuine-3", params.final_pct, params.event_s)
            done = await watch.wait_for(
                capped_at(params.final_pct), timeout_s=params.apply_timeout_s
            )
            result.checks.append(
                Check(
                    "a genuine intent is still applied afterwards",
                    done is not None,
                    f"v{final} {'applied' if done else 'not applied'}",
                )
            )
    finally:
        attacker.close()
    return result


def _attacks(
    bench: Bench, first: pb.SignedIntent, held: pb.SignedIntent, held_version: int
) -> list[tuple[str, int, pb.DownMessage]]:
    """(name, version the message claims, message) for each attack, in order."""
    held_payload = _payload(held)
    document = held_payload.document
    headend_key = load_or_create_signing_key(bench.signing_key)
    now_ns = time.time_ns()

    def signed_by(key: Ed25519PrivateKey, key_id: str, payload: pb.IntentPayload) -> pb.DownMessage:
        data = payload.SerializeToString()
        return pb.DownMessage(
            signed_intent=pb.SignedIntent(payload=data, key_id=key_id, signature=key.sign(data))
        )

    def payload_for(version: int, gateway_id: str) -> pb.IntentPayload:
        edited = pb.IntentPayload()
        edited.CopyFrom(held_payload)
        edited.version = version
        edited.gateway_id = gateway_id
        edited.document.CopyFrom(_uncapped(document, version))
        return edited

    forged_v, tampered_v, expired_v, misaddressed_v, unsigned_v = (
        held_version + n for n in range(1, 6)
    )
    forged = signed_by(
        Ed25519PrivateKey.generate(), held.key_id, payload_for(forged_v, bench.gateway_id)
    )
    tampered = pb.DownMessage(
        signed_intent=pb.SignedIntent(
            payload=payload_for(tampered_v, bench.gateway_id).SerializeToString(),
            key_id=held.key_id,
            signature=held.signature,
        )
    )
    expired = pb.DownMessage(
        signed_intent=sign_intent(
            _uncapped(document, expired_v),
            gateway_id=bench.gateway_id,
            key=headend_key,
            now_ns=now_ns - 2 * DAY_NS,
            validity_s=DAY_NS / 1e9,
        )
    )
    misaddressed = pb.DownMessage(
        signed_intent=sign_intent(
            _uncapped(document, misaddressed_v),
            gateway_id=f"{bench.gateway_id}-other",
            key=headend_key,
            now_ns=now_ns,
        )
    )
    unsigned = pb.DownMessage(intent=_uncapped(document, unsigned_v))
    replayed = pb.DownMessage(signed_intent=first)
    return [
        ("forged", forged_v, forged),
        ("tampered", tampered_v, tampered),
        ("replayed", _payload(first).version, replayed),
        ("expired", expired_v, expired),
        ("misaddressed", misaddressed_v, misaddressed),
        ("unsigned", unsigned_v, unsigned),
    ]


async def _wait_rejection_shown(
    bench: Bench, version: int, name: str, timeout_s: float
) -> str | None:
    """The headend's record of the gateway refusing `version`, as "vN REJECTED: reason"."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(BenchError, OSError):
            for row in await _intent_acks(bench):
                if row["version"] == version and row["ack"] == "REJECTED":
                    return f"v{version} REJECTED: {row['reason']}"
        await asyncio.sleep(0.2)
    return None

"""Signed intents: the gateway's verifier and the trusted-keys (trust file) format.

The headend signs each intent document it sends to a gateway (`headend_min.signing`): a
`pb.SignedIntent` carries a serialized `pb.IntentPayload` (gateway id, site id, version, issued
and expiry time, the document) and an Ed25519 signature over exactly those payload bytes, so no
canonical form is needed. A compromised broker or transport can drop or delay intents, but cannot
make a gateway run one it did not get from a holder of a trusted signing key.

`verify_signed_intent` (pure: plain values in, a value out, never raises on hostile bytes) checks,
in this order, and refuses with the first failure (`pb.IntentRejection`):

1. UNKNOWN_KEY     `key_id` is one of the trusted keys;
2. BAD_SIGNATURE   the signature verifies over `payload` with that key;
3. MALFORMED       the payload decodes, carries a document, issue and expiry times, a version
                   >= 1 equal to the document's, and the document's site equals the payload's;
4. MISADDRESSED    the payload names this gateway and this site;
5. REPLAYED        its version is newer than the one persisted (rollback / replay);
6. EXPIRED         it is not past its accept-by time (`expires_at`). Skipped while the gateway's
                   wall clock is not trusted (a Pi after a power cut offline): the version check
                   still holds, and a clock that is wrong must not make every intent "expired".

Nothing is decoded before the signature is checked, so an attacker without a key only ever
reaches the first two checks (a refused payload's claimed version is read afterwards, only to
label the ack). Expiry bounds when an intent may be *accepted*; an accepted intent
keeps running offline for as long as its events say.

The trusted keys come from the trust file (`dergw.v1.trust`, written by the headend next to its
signing key, installed on the gateway at enrollment; `[security] intent_keys_file`). It may list
several keys: rotation gives gateways the new key first, then switches the headend's signing key.
`TrustedKeysFile` re-reads the file when it changes, so enrollment (or a rotation) takes effect
without a restart. A gateway without the file (not enrolled) or with an invalid one still runs
its local control; it refuses every intent as UNKNOWN_KEY (fail closed). Signatures are checked
by `gateway.ed25519` (the process's libcrypto; no `cryptography` package loaded for it).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from google.protobuf.message import DecodeError

from dergw.v1 import ns_from_timestamp, pb
from dergw.v1.trust import TrustedKeys, TrustedKeysError, rejection_name
from gateway import ed25519

__all__ = [
    "IntentRefused",
    "TrustedKeysFile",
    "VerifiedIntent",
    "verify_signed_intent",
]

_log = logging.getLogger(__name__)

# Hostile strings are quoted in messages (logs, acks) only up to this many characters.
_QUOTE_MAX = 64


def _quote(text: str) -> str:
    return repr(text if len(text) <= _QUOTE_MAX else text[:_QUOTE_MAX] + "...")


# -- trusted keys -------------------------------------------------------------------------------


class TrustedKeysFile:
    """The trusted keys from a file, re-read when the file changes (enrollment, rotation).

    A missing file means "not enrolled yet" and an invalid one is reported (ERROR, once per
    change of the file): either way no key is trusted, so every intent is refused as
    UNKNOWN_KEY, while the gateway's local control carries on.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._keys = TrustedKeys()
        self.problem = "not read yet"

    def current(self) -> TrustedKeys:
        try:
            stat = os.stat(self.path)
        except OSError as exc:
            if self._stamp != (-1, -1, -1):
                self._stamp = (-1, -1, -1)
                self._keys = TrustedKeys()
                self.problem = f"{self.path}: no trust file ({exc.strerror}); not enrolled"
                _log.warning(
                    "%s: every intent is refused until the headend's trust file is installed",
                    self.problem,
                )
            return self._keys
        stamp = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                self._keys = TrustedKeys.load(self.path)
            except (OSError, TrustedKeysError) as exc:
                self._keys = TrustedKeys()
                self.problem = str(exc)
                _log.error("intent trust file unusable, every intent is refused: %s", exc)
            else:
                self.problem = "" if self._keys else f"{self.path}: lists no keys"
                _log.info(
                    "intent trust file %s: %d key(s): %s",
                    self.path,
                    len(self._keys),
                    ", ".join(sorted(self._keys)) or "none",
                )
        return self._keys


# -- verification -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VerifiedIntent:
    """A signed intent that passed every check; `payload.document` is safe to decode further."""

    payload: pb.IntentPayload
    key_id: str

    @property
    def document(self) -> pb.IntentDocument:
        return self.payload.document

    @property
    def version(self) -> int:
        return self.payload.version


@dataclass(frozen=True, slots=True)
class IntentRefused:
    """Why a signed intent was refused. `version` is the payload's version (0 if it has none):
    the ack names it so the headend can show the refusal against the version it sent. For a
    refusal before the signature verified it is only what the payload *claims*, read after the
    decision, as a label: an attacker can put any number there, and nothing relies on it."""

    rejection: int  # a pb.IntentRejection value
    message: str
    version: int = 0

    @property
    def name(self) -> str:
        return rejection_name(self.rejection)

    def __str__(self) -> str:
        return f"{self.name}: {self.message}"


def verify_signed_intent(
    signed: pb.SignedIntent,
    *,
    trusted_keys: Mapping[str, bytes],
    gateway_id: str,
    site_id: str,
    persisted_version: int,
    now_ns: int,
    clock_trusted: bool,
) -> VerifiedIntent | IntentRefused:
    """Verify `signed` for this gateway (see the module docstring for the order of checks)."""
    public_key = trusted_keys.get(signed.key_id)
    if public_key is None:
        return IntentRefused(
            pb.INTENT_REJECTION_UNKNOWN_KEY,
            f"key id {_quote(signed.key_id)} is not trusted "
            f"(trusted: {', '.join(sorted(trusted_keys)) or 'none; not enrolled'})",
            _claimed_version(signed.payload),
        )
    if not ed25519.verify(public_key, signed.signature, signed.payload):
        return IntentRefused(
            pb.INTENT_REJECTION_BAD_SIGNATURE,
            f"signature does not verify with key {signed.key_id}",
            _claimed_version(signed.payload),
        )
    try:
        payload = pb.IntentPayload.FromString(signed.payload)
    except DecodeError as exc:
        return IntentRefused(pb.INTENT_REJECTION_MALFORMED, f"payload does not decode: {exc}")
    version = payload.version
    problem = _payload_problem(payload)
    if problem:
        return IntentRefused(pb.INTENT_REJECTION_MALFORMED, problem, version)
    if payload.gateway_id != gateway_id or payload.site_id != site_id:
        return IntentRefused(
            pb.INTENT_REJECTION_MISADDRESSED,
            f"addressed to gateway {_quote(payload.gateway_id)} site {_quote(payload.site_id)}; "
            f"this is gateway {gateway_id!r} site {site_id!r}",
            version,
        )
    if version <= persisted_version:
        return IntentRefused(
            pb.INTENT_REJECTION_REPLAYED,
            f"version {version} is not newer than the persisted v{persisted_version}",
            version,
        )
    expires_ns = ns_from_timestamp(payload.expires_at)
    if clock_trusted and now_ns >= expires_ns:
        return IntentRefused(
            pb.INTENT_REJECTION_EXPIRED,
            f"expired {(now_ns - expires_ns) / 1e9:.0f} s ago (accept-by time passed)",
            version,
        )
    return VerifiedIntent(payload, signed.key_id)


def _claimed_version(data: bytes) -> int:
    """The version an unauthenticated payload claims (0 if it does not decode); a label only."""
    try:
        return pb.IntentPayload.FromString(data).version
    except DecodeError:
        return 0


def _payload_problem(payload: pb.IntentPayload) -> str:
    """Why a (signed, decoded) payload is not well formed, or ""."""
    if not payload.HasField("document"):
        return "payload carries no document"
    if not payload.HasField("issued_at") or not payload.HasField("expires_at"):
        return "payload lacks issued_at or expires_at"
    if payload.version < 1:
        return "payload version must be >= 1"
    if payload.document.version != payload.version:
        return (
            f"payload version {payload.version} differs from the document's "
            f"{payload.document.version}"
        )
    if payload.document.site_id != payload.site_id:
        return (
            f"payload site {_quote(payload.site_id)} differs from the document's "
            f"{_quote(payload.document.site_id)}"
        )
    return ""

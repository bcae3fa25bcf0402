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

Trust file (JSON, written by the headend next to its signing key, installed on the gateway at
enrollment; `[security] intent_keys_file`):

    {"keys": [{"key_id": "ed25519:0123456789abcdef", "public_key": "<base64 of 32 raw bytes>"}]}

It may list several keys: rotation gives gateways the new key first, then switches the headend's
signing key. `TrustedKeysFile` re-reads the file when it changes, so enrollment (or a rotation)
takes effect without a restart. A gateway without the file (not enrolled) or with an invalid one
still runs its local control; it refuses every intent as UNKNOWN_KEY (fail closed).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from google.protobuf.message import DecodeError

from dergw.v1 import ns_from_timestamp, pb

__all__ = [
    "MAX_TRUST_FILE_BYTES",
    "IntentRefused",
    "TrustedKeys",
    "TrustedKeysError",
    "TrustedKeysFile",
    "VerifiedIntent",
    "key_id_for",
    "rejection_name",
    "verify_signed_intent",
]

_log = logging.getLogger(__name__)

# A trust file is a handful of keys; anything much larger is not one (read no further).
MAX_TRUST_FILE_BYTES = 64 * 1024
# Hostile strings are quoted in messages (logs, acks) only up to this many characters.
_QUOTE_MAX = 64
_ED25519_KEY_BYTES = 32


def key_id_for(public_key: Ed25519PublicKey) -> str:
    """The key id the headend gives a key: "ed25519:" + 16 hex digits of sha256(raw key)."""
    raw = public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]


def rejection_name(rejection: int) -> str:
    """`pb.INTENT_REJECTION_UNKNOWN_KEY` -> "UNKNOWN_KEY" (unknown values as "REJECTION_<n>")."""
    try:
        return pb.IntentRejection.Name(rejection).removeprefix("INTENT_REJECTION_")  # type: ignore[arg-type]
    except ValueError:
        return f"REJECTION_{rejection}"


def _quote(text: str) -> str:
    return repr(text if len(text) <= _QUOTE_MAX else text[:_QUOTE_MAX] + "...")


# -- trusted keys -------------------------------------------------------------------------------


class TrustedKeysError(ValueError):
    """A trust file that cannot be used; the message names the file, the key and the reason."""


class TrustedKeys(Mapping[str, Ed25519PublicKey]):
    """The public keys a gateway accepts intent signatures from, by key id (immutable)."""

    __slots__ = ("_keys",)

    def __init__(self, keys: Mapping[str, Ed25519PublicKey] | None = None) -> None:
        self._keys: dict[str, Ed25519PublicKey] = dict(keys or {})

    def __getitem__(self, key_id: str) -> Ed25519PublicKey:
        return self._keys[key_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"TrustedKeys({sorted(self._keys)!r})"

    @classmethod
    def of(cls, *public_keys: Ed25519PublicKey) -> TrustedKeys:
        """Trust these keys under their derived ids (`key_id_for`)."""
        return cls({key_id_for(key): key for key in public_keys})

    @classmethod
    def parse(cls, text: str | bytes, *, source: str) -> TrustedKeys:
        """Parse the trust file format; raises TrustedKeysError naming `source`, key and reason."""
        try:
            document = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise TrustedKeysError(f"{source}: not valid JSON ({exc})") from None
        if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
            raise TrustedKeysError(
                f'{source}: expected {{"keys": [{{"key_id": ..., "public_key": ...}}, ...]}}'
            )
        keys: dict[str, Ed25519PublicKey] = {}
        for index, entry in enumerate(document["keys"]):
            where = f"{source}: keys[{index}]"
            key_id, public_key = _parse_entry(entry, where)
            if key_id in keys:
                raise TrustedKeysError(f"{where}: key_id {key_id!r} is listed twice")
            keys[key_id] = public_key
        return cls(keys)

    @classmethod
    def load(cls, path: Path) -> TrustedKeys:
        """Read and parse a trust file; raises TrustedKeysError (FileNotFoundError if missing)."""
        with path.open("rb") as file:
            data = file.read(MAX_TRUST_FILE_BYTES + 1)
        if len(data) > MAX_TRUST_FILE_BYTES:
            raise TrustedKeysError(
                f"{path}: larger than {MAX_TRUST_FILE_BYTES} bytes; not a trust file"
            )
        return cls.parse(data, source=str(path))

    def to_json(self) -> str:
        """The trust file text for these keys (sorted by key id, one key per line)."""
        entries = [
            {
                "key_id": key_id,
                "public_key": base64.b64encode(
                    self._keys[key_id].public_bytes(Encoding.Raw, PublicFormat.Raw)
                ).decode("ascii"),
            }
            for key_id in sorted(self._keys)
        ]
        lines = ",\n".join(f"    {json.dumps(entry)}" for entry in entries)
        return '{\n  "keys": [\n' + lines + "\n  ]\n}\n" if entries else '{"keys": []}\n'


def _parse_entry(entry: Any, where: str) -> tuple[str, Ed25519PublicKey]:
    if not isinstance(entry, dict):
        raise TrustedKeysError(f'{where}: expected {{"key_id": ..., "public_key": ...}}')
    unknown = sorted(set(entry) - {"key_id", "public_key"})
    if unknown:
        raise TrustedKeysError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))}")
    key_id = entry.get("key_id")
    if not isinstance(key_id, str) or not key_id or len(key_id) > 128:
        raise TrustedKeysError(f"{where}.key_id: expected a non-empty string (at most 128 chars)")
    encoded = entry.get("public_key")
    if not isinstance(encoded, str):
        raise TrustedKeysError(f"{where} ({key_id}).public_key: expected a base64 string")
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise TrustedKeysError(f"{where} ({key_id}).public_key: not valid base64") from None
    if len(raw) != _ED25519_KEY_BYTES:
        raise TrustedKeysError(
            f"{where} ({key_id}).public_key: {len(raw)} bytes; an Ed25519 public key is "
            f"{_ED25519_KEY_BYTES} raw bytes"
        )
    return key_id, Ed25519PublicKey.from_public_bytes(raw)


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
    trusted_keys: Mapping[str, Ed25519PublicKey],
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
    try:
        public_key.verify(signed.signature, signed.payload)
    except (InvalidSignature, ValueError):
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

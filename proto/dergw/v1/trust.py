"""The intent trust file: which Ed25519 keys a gateway accepts signed intents from.

Part of the wire contract the headend and the gateway share (`dergw.v1`): the headend signs
intents (`pb.SignedIntent`) and writes this file next to its signing key (`<key>.pub.json`);
enrollment installs it on gateways (`[security] intent_keys_file`), which verify with it.

    {"keys": [{"key_id": "ed25519:0123456789abcdef", "public_key": "<base64 of 32 raw bytes>"}]}

Keys are held as their raw 32 bytes (RFC 8032 encoding): neither side needs a crypto library to
read or write the file, and the gateway's verifier needs none loaded until it verifies.
A key's id is derived from it (`key_id_for`), so it is stable and needs no registry.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from dergw.v1 import pb

__all__ = [
    "ED25519_PUBLIC_KEY_BYTES",
    "MAX_TRUST_FILE_BYTES",
    "TrustedKeys",
    "TrustedKeysError",
    "key_id_for",
    "rejection_name",
]

# A trust file is a handful of keys; anything much larger is not one (read no further).
MAX_TRUST_FILE_BYTES = 64 * 1024
ED25519_PUBLIC_KEY_BYTES = 32


def key_id_for(raw_public_key: bytes) -> str:
    """The key id of a raw Ed25519 public key: "ed25519:" + 16 hex digits of sha256(raw key)."""
    if len(raw_public_key) != ED25519_PUBLIC_KEY_BYTES:
        raise ValueError(
            f"an Ed25519 public key is {ED25519_PUBLIC_KEY_BYTES} raw bytes, "
            f"not {len(raw_public_key)}"
        )
    return "ed25519:" + hashlib.sha256(raw_public_key).hexdigest()[:16]


def rejection_name(rejection: int) -> str:
    """`pb.INTENT_REJECTION_UNKNOWN_KEY` -> "UNKNOWN_KEY" (unknown values as "REJECTION_<n>")."""
    try:
        return pb.IntentRejection.Name(rejection).removeprefix("INTENT_REJECTION_")  # type: ignore[arg-type]
    except ValueError:
        return f"REJECTION_{rejection}"


class TrustedKeysError(ValueError):
    """A trust file that cannot be used; the message names the file, the key and the reason."""


class TrustedKeys(Mapping[str, bytes]):
    """Trusted Ed25519 public keys (raw 32 bytes each) by key id (immutable)."""

    __slots__ = ("_keys",)

    def __init__(self, keys: Mapping[str, bytes] | None = None) -> None:
        self._keys: dict[str, bytes] = dict(keys or {})
        for key_id, raw in self._keys.items():
            if len(raw) != ED25519_PUBLIC_KEY_BYTES:
                raise ValueError(
                    f"key {key_id!r}: {len(raw)} bytes; an Ed25519 public key is "
                    f"{ED25519_PUBLIC_KEY_BYTES} raw bytes"
                )

    def __getitem__(self, key_id: str) -> bytes:
        return self._keys[key_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"TrustedKeys({sorted(self._keys)!r})"

    @classmethod
    def of(cls, *raw_public_keys: bytes) -> TrustedKeys:
        """Trust these raw public keys under their derived ids (`key_id_for`)."""
        return cls({key_id_for(raw): raw for raw in raw_public_keys})

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
        keys: dict[str, bytes] = {}
        for index, entry in enumerate(document["keys"]):
            where = f"{source}: keys[{index}]"
            key_id, raw = _parse_entry(entry, where)
            if key_id in keys:
                raise TrustedKeysError(f"{where}: key_id {key_id!r} is listed twice")
            keys[key_id] = raw
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
            {"key_id": key_id, "public_key": base64.b64encode(self._keys[key_id]).decode("ascii")}
            for key_id in sorted(self._keys)
        ]
        lines = ",\n".join(f"    {json.dumps(entry)}" for entry in entries)
        return '{\n  "keys": [\n' + lines + "\n  ]\n}\n" if entries else '{"keys": []}\n'


def _parse_entry(entry: Any, where: str) -> tuple[str, bytes]:
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
    if len(raw) != ED25519_PUBLIC_KEY_BYTES:
        raise TrustedKeysError(
            f"{where} ({key_id}).public_key: {len(raw)} bytes; an Ed25519 public key is "
            f"{ED25519_PUBLIC_KEY_BYTES} raw bytes"
        )
    return key_id, raw

"""The headend's intent signing key, and signing an intent document for one gateway.

One active Ed25519 signing key per headend (every instance on a shared database must load the
same key file): a PEM file (PKCS#8, mode 0600), created on first start if missing. Its key id is
derived from the public key (`dergw.v1.trust.key_id_for`: "ed25519:" + 16 hex digits of
sha256 of the raw public key), so it is stable and needs no registry.

Next to the key the headend keeps its public trust file, `<key file>.pub.json`, in the format
gateways read (`dergw.v1.trust.TrustedKeys`); enrollment installs it on gateways as their
`[security] intent_keys_file`. Each start makes sure the active key is listed and keeps the other
keys listed there, so rotation is:

1. create the new key file and add its public key to the trust file the gateways get (the old
   and the new key are then both trusted);
2. once every gateway has it, restart the headend with `--signing-key NEW`;
3. later, remove the old key from the gateways' trust files.

`sign_intent` wraps a document in an `IntentPayload` addressed to one gateway (gateway id, site
id, version, issued and accept-by time) and signs exactly the serialized payload bytes. The
accept-by time (`validity_s`, default 24 h) defeats freezing or replaying old deliveries; it is
not an execution limit: an accepted intent keeps running offline.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
)

from dergw.v1 import pb, timestamp_from_ns
from dergw.v1.trust import TrustedKeys, TrustedKeysError, key_id_for

__all__ = [
    "DEFAULT_INTENT_VALIDITY_S",
    "SigningKey",
    "SigningKeyError",
    "load_or_create_signing_key",
    "sign_intent",
    "trust_file_path",
]

DEFAULT_INTENT_VALIDITY_S = 24 * 3600.0
_MAX_KEY_FILE_BYTES = 16 * 1024


class SigningKeyError(Exception):
    """The signing key file cannot be used; the message names the file and what to do."""


@dataclass(frozen=True, slots=True)
class SigningKey:
    key_id: str
    private_key: Ed25519PrivateKey

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()

    @property
    def public_key_raw(self) -> bytes:
        """The public key's 32 raw bytes, as the trust file and `key_id_for` take it."""
        return _raw(self.public_key)

    @classmethod
    def generate(cls) -> SigningKey:
        """A fresh key held only in memory (tests, benchmarks)."""
        private_key = Ed25519PrivateKey.generate()
        return cls(key_id_for(_raw(private_key.public_key())), private_key)

    @classmethod
    def from_private_key(cls, private_key: Ed25519PrivateKey) -> SigningKey:
        return cls(key_id_for(_raw(private_key.public_key())), private_key)


def trust_file_path(key_path: Path) -> Path:
    """Where the public trust file of the key at `key_path` lives: `<key file>.pub.json`."""
    return key_path.with_name(key_path.name + ".pub.json")


def _write_private(path: Path, data: bytes, *, mode: int) -> None:
    """Write `data` to `path` atomically (temp file in the same directory, fsync, rename),
    created with `mode` from the start (a key is never readable by others, even briefly)."""
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def _load(path: Path) -> SigningKey:
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise SigningKeyError(
            f"signing key {path}: readable by group or others (mode {mode:o}); "
            f"run: chmod 600 {path}"
        )
    with path.open("rb") as file:
        data = file.read(_MAX_KEY_FILE_BYTES + 1)
    try:
        private_key = load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(
            f"signing key {path}: not an unencrypted PEM private key ({exc}); "
            "point --signing-key at the headend's key file, or at a new path to create one"
        ) from None
    if not isinstance(private_key, Ed25519PrivateKey):
        raise SigningKeyError(
            f"signing key {path}: a {type(private_key).__name__}, not an Ed25519 key"
        )
    return SigningKey.from_private_key(private_key)


def load_or_create_signing_key(path: Path) -> SigningKey:
    """Load the signing key at `path`, creating it (0600) if the file does not exist; then make
    sure the trust file next to it lists the key. Raises SigningKeyError."""
    try:
        if path.exists():
            key = _load(path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            key = SigningKey.generate()
            pem = key.private_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
            _write_private(path, pem, mode=0o600)
        _refresh_trust_file(trust_file_path(path), key)
    except OSError as exc:
        raise SigningKeyError(f"signing key {path}: {exc}") from exc
    return key


def _refresh_trust_file(path: Path, key: SigningKey) -> None:
    """List `key` in the trust file at `path`, keeping the keys already listed (rotation)."""
    keys: dict[str, bytes] = {}
    if path.exists():
        try:
            keys.update(TrustedKeys.load(path))
        except TrustedKeysError as exc:
            raise SigningKeyError(f"{exc}; fix or delete it (it is rewritten at start)") from None
    if keys.get(key.key_id) == key.public_key_raw:
        return
    keys[key.key_id] = key.public_key_raw
    _write_private(path, TrustedKeys(keys).to_json().encode(), mode=0o644)


def _raw(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def sign_intent(
    document: pb.IntentDocument,
    *,
    gateway_id: str,
    key: SigningKey,
    now_ns: int,
    validity_s: float = DEFAULT_INTENT_VALIDITY_S,
) -> pb.SignedIntent:
    """`document` addressed to `gateway_id` (and the document's site), signed with `key`."""
    payload = pb.IntentPayload(
        gateway_id=gateway_id,
        site_id=document.site_id,
        version=document.version,
        issued_at=timestamp_from_ns(now_ns),
        expires_at=timestamp_from_ns(now_ns + int(validity_s * 1e9)),
        document=document,
    )
    data = payload.SerializeToString()
    return pb.SignedIntent(payload=data, key_id=key.key_id, signature=key.private_key.sign(data))

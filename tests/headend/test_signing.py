"""The headend's intent signing key: key file, key id, trust file, and `--signing-key`."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from dergw.v1 import ns_from_timestamp, pb
from dergw.v1.trust import TrustedKeys
from gateway.intent_verify import VerifiedIntent, verify_signed_intent
from headend_min import cli
from headend_min.config import (
    ConfigError,
    HeadendConfig,
    PostgresUrl,
    default_signing_key_path,
)
from headend_min.signing import (
    SigningKey,
    SigningKeyError,
    load_or_create_signing_key,
    sign_intent,
    trust_file_path,
)

NOW = 1_800_000_000 * 1_000_000_000


def test_key_file_is_created_0600_and_loads_back_with_the_same_id(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "signing.pem"
    created = load_or_create_signing_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    loaded = load_or_create_signing_key(path)
    assert loaded.key_id == created.key_id
    assert loaded.key_id.startswith("ed25519:")
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []  # no temp


def test_trust_file_lists_the_key_and_verifies_its_signatures(tmp_path: Path) -> None:
    path = tmp_path / "signing.pem"
    key = load_or_create_signing_key(path)
    trust = TrustedKeys.load(trust_file_path(path))
    assert trust_file_path(path).name == "signing.pem.pub.json"
    assert list(trust) == [key.key_id]
    doc = pb.IntentDocument(site_id="site-1", version=3)
    signed = sign_intent(doc, gateway_id="gw-1", key=key, now_ns=NOW, validity_s=60)
    result = verify_signed_intent(
        signed,
        trusted_keys=trust,
        gateway_id="gw-1",
        site_id="site-1",
        persisted_version=2,
        now_ns=NOW,
        clock_trusted=True,
    )
    assert isinstance(result, VerifiedIntent)
    assert result.document == doc
    assert ns_from_timestamp(result.payload.expires_at) == NOW + 60 * 10**9
    assert ns_from_timestamp(result.payload.issued_at) == NOW


def test_rotation_keeps_the_old_key_in_the_trust_file(tmp_path: Path) -> None:
    old = load_or_create_signing_key(tmp_path / "old.pem")
    # The new key shares the trust file: copy the old one's list next to the new key first.
    trust_file_path(tmp_path / "new.pem").write_text(
        trust_file_path(tmp_path / "old.pem").read_text()
    )
    new = load_or_create_signing_key(tmp_path / "new.pem")
    assert new.key_id != old.key_id
    assert sorted(TrustedKeys.load(trust_file_path(tmp_path / "new.pem"))) == sorted(
        [old.key_id, new.key_id]
    )


def test_a_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "signing.pem"
    load_or_create_signing_key(path)
    os.chmod(path, 0o644)
    with pytest.raises(SigningKeyError, match="chmod 600"):
        load_or_create_signing_key(path)


def test_a_file_that_is_not_an_ed25519_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "signing.pem"
    path.write_text("not a key")
    os.chmod(path, 0o600)
    with pytest.raises(SigningKeyError, match=str(path)):
        load_or_create_signing_key(path)


def test_a_corrupt_trust_file_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "signing.pem"
    trust_file_path(path).write_text("{")
    with pytest.raises(SigningKeyError, match=r"pub\.json"):
        load_or_create_signing_key(path)


def test_generated_keys_differ() -> None:
    assert SigningKey.generate().key_id != SigningKey.generate().key_id


def test_default_key_path_is_next_to_sqlite_and_required_for_postgres(tmp_path: Path) -> None:
    assert default_signing_key_path(tmp_path / "h.sqlite3") == tmp_path / "intent-signing-key.pem"
    with pytest.raises(ConfigError, match="--signing-key"):
        default_signing_key_path(PostgresUrl("postgresql://u:secret@db/dergw"))
    given = HeadendConfig(db_path=PostgresUrl("postgresql://db/x"), signing_key=tmp_path / "k")
    assert given.signing_key_path() == tmp_path / "k"


def test_cli_signing_key_option(tmp_path: Path) -> None:
    args = cli._parser().parse_args(["run", "--signing-key", str(tmp_path / "k.pem")])
    assert cli._config(args).signing_key == tmp_path / "k.pem"
    with pytest.raises(ConfigError, match="--signing-key"):
        cli._config(cli._parser().parse_args(["run", "--db", "postgresql://db/dergw"]))

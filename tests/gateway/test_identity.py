"""The gateway's identity on disk: key files, CSRs, staged renewal, TLS failure classification.

The headend side is the real CA (headend_min.pki) signing in-process; the HTTPS exchange itself
is covered end to end in tests/headend/test_enroll_e2e.py.
"""

from __future__ import annotations

import json
import os
import ssl
import stat
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from gateway.identity import (
    IDENTITY_DIRNAME,
    Identity,
    IdentityError,
    NotEnrolledError,
    TlsFailure,
    begin_renewal,
    build_csr,
    classify_tls_failure,
    commit_renewal,
    generate_key,
    renewal_headers,
    rollback_renewal,
    stage_certificate,
    write_private_file,
)
from headend_min.pki import CertificateAuthority, cert_pem, key_pem, load_csr

NOW = datetime.now(UTC)


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.create(tmp_path_factory.mktemp("ca"), now=NOW)


def _sign(ca: CertificateAuthority, csr_pem: bytes, gateway_id: str = "gw-1") -> bytes:
    cert = ca.issue_client_certificate(
        load_csr(csr_pem), gateway_id=gateway_id, site_id="site-a", now=NOW
    )
    return cert_pem(cert)


def _install(state_dir: Path, ca: CertificateAuthority, gateway_id: str = "gw-1") -> Identity:
    """A current identity written the way enroll() writes it (generation + pointer)."""
    directory = state_dir / IDENTITY_DIRNAME
    generation = directory / "g-0000000000000001"
    generation.mkdir(parents=True, mode=0o700)
    key = generate_key()
    write_private_file(generation / "key.pem", key_pem(key))
    write_private_file(generation / "cert.pem", _sign(ca, build_csr(key, gateway_id), gateway_id))
    write_private_file(generation / "ca.pem", ca.certificate_pem)
    write_private_file(directory / "current", b"g-0000000000000001\n")
    return Identity.load(state_dir)


def test_write_private_file_is_0600_even_with_a_loose_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        write_private_file(tmp_path / "key.pem", b"secret")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "key.pem").stat().st_mode) == 0o600
    assert (tmp_path / "key.pem").read_bytes() == b"secret"
    write_private_file(tmp_path / "key.pem", b"replaced")
    assert (tmp_path / "key.pem").read_bytes() == b"replaced"
    assert [p.name for p in tmp_path.iterdir()] == ["key.pem"]  # no temp files left


def test_csr_names_the_gateway_and_proves_the_key() -> None:
    key = generate_key()
    csr = x509.load_pem_x509_csr(build_csr(key, "gw-7"))
    assert csr.is_signature_valid
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "gw-7"
    assert csr.public_key() == key.public_key()


def test_identity_loads_paths_bytes_and_validity(tmp_path: Path, ca: CertificateAuthority) -> None:
    identity = _install(tmp_path, ca)
    assert identity.gateway_id == "gw-1"
    assert stat.S_IMODE(identity.key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(identity.key_path.parent.stat().st_mode) == 0o700
    cert = x509.load_pem_x509_certificate(identity.certificate_pem)
    assert identity.serial == format(cert.serial_number, "x")
    assert 29.9 < identity.days_left(NOW) <= 30.01
    assert not identity.renewal_due(NOW)
    assert identity.renewal_due(NOW + timedelta(days=20, minutes=1))
    ca_certs, certfile, keyfile = identity.tls_files()
    assert Path(ca_certs).read_bytes() == ca.certificate_pem
    assert (Path(certfile), Path(keyfile)) == (identity.cert_path, identity.key_path)
    assert isinstance(identity.ssl_context(), ssl.SSLContext)


def test_not_enrolled_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(NotEnrolledError, match="dergw enroll"):
        Identity.load(tmp_path)
    with pytest.raises(NotEnrolledError, match="no staged renewal"):
        Identity.load(tmp_path, staged=True)


def test_certificate_for_another_key_is_refused(tmp_path: Path, ca: CertificateAuthority) -> None:
    identity = _install(tmp_path, ca)
    identity.cert_path.write_bytes(_sign(ca, build_csr(generate_key(), "gw-1")))
    with pytest.raises(IdentityError, match="not for this device's key"):
        Identity.load(tmp_path)


def test_certificate_from_another_ca_is_refused(tmp_path: Path, ca: CertificateAuthority) -> None:
    identity = _install(tmp_path, ca)
    other = CertificateAuthority.create(tmp_path / "other-ca", now=NOW)
    identity.ca_path.write_bytes(other.certificate_pem)
    with pytest.raises(IdentityError, match="not signed by the CA"):
        Identity.load(tmp_path)


def test_pointer_cannot_escape_the_identity_directory(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    _install(tmp_path, ca)
    (tmp_path / IDENTITY_DIRNAME / "current").write_text("../../etc\n")
    with pytest.raises(IdentityError, match="not a generation name"):
        Identity.load(tmp_path)


def test_renewal_commit(tmp_path: Path, ca: CertificateAuthority) -> None:
    old = _install(tmp_path, ca)
    csr = begin_renewal(tmp_path)
    assert (
        load_csr(csr).public_key()
        != x509.load_pem_x509_certificate(old.certificate_pem).public_key()
    )  # a new key
    staged = stage_certificate(tmp_path, _sign(ca, csr), ca.certificate_pem)
    # Until committed, the old identity stays current and on disk.
    assert Identity.load(tmp_path) == old
    assert Identity.load(tmp_path, staged=True) == staged
    assert staged.serial != old.serial
    assert stat.S_IMODE(staged.key_path.stat().st_mode) == 0o600
    committed = commit_renewal(tmp_path)
    assert committed == staged
    assert not old.key_path.exists()  # the old key is gone once the new one has connected
    with pytest.raises(NotEnrolledError):
        Identity.load(tmp_path, staged=True)


def test_renewal_rollback_keeps_the_old_identity(tmp_path: Path, ca: CertificateAuthority) -> None:
    old = _install(tmp_path, ca)
    csr = begin_renewal(tmp_path)
    staged = stage_certificate(tmp_path, _sign(ca, csr), ca.certificate_pem)
    rollback_renewal(tmp_path)
    assert Identity.load(tmp_path) == old
    assert not staged.key_path.exists()
    rollback_renewal(tmp_path)  # nothing staged: a no-op
    assert sorted(p.name for p in (tmp_path / IDENTITY_DIRNAME).iterdir()) == [
        "current",
        old.key_path.parent.name,
    ]


def test_restarted_renewal_replaces_the_unfinished_one(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    _install(tmp_path, ca)
    begin_renewal(tmp_path)
    second = begin_renewal(tmp_path)
    staged = stage_certificate(tmp_path, _sign(ca, second), ca.certificate_pem)
    generations = [p for p in (tmp_path / IDENTITY_DIRNAME).iterdir() if p.name.startswith("g-")]
    assert len(generations) == 2  # current + the one staged; the abandoned one is gone
    assert staged.key_path.parent in generations


def test_renewed_certificate_must_match_the_staged_key_and_gateway(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    _install(tmp_path, ca)
    csr = begin_renewal(tmp_path)
    with pytest.raises(IdentityError, match="not for this device's key"):
        stage_certificate(
            tmp_path, _sign(ca, build_csr(generate_key(), "gw-1")), ca.certificate_pem
        )
    with pytest.raises(IdentityError, match="this gateway is 'gw-1'"):
        stage_certificate(tmp_path, _sign(ca, csr, "gw-2"), ca.certificate_pem)
    with pytest.raises(NotEnrolledError):
        Identity.load(tmp_path, staged=True)  # nothing usable was staged


def test_stage_without_begin_is_refused(tmp_path: Path, ca: CertificateAuthority) -> None:
    _install(tmp_path, ca)
    with pytest.raises(NotEnrolledError, match="begin_renewal"):
        stage_certificate(tmp_path, b"", ca.certificate_pem)


def test_renewal_headers_sign_the_body(tmp_path: Path, ca: CertificateAuthority) -> None:
    import base64

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    identity = _install(tmp_path, ca)
    headers = renewal_headers(identity, b'{"csr_pem": "x"}')
    cert = x509.load_der_x509_certificate(base64.b64decode(headers["X-Dergw-Certificate"]))
    public_key = cert.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    public_key.verify(
        base64.b64decode(headers["X-Dergw-Signature"]),
        b'{"csr_pem": "x"}',
        ec.ECDSA(hashes.SHA256()),
    )


# What grpc and Python's ssl actually report (grpcio 1.85.1 / BoringSSL, OpenSSL 3), and what
# the headend's interceptor says.
@pytest.mark.parametrize(
    ("failure", "expected"),
    [
        (
            "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Tls "
            "handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:SSL "
            "routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: unable to get local issuer "
            "certificate",
            TlsFailure.UNKNOWN_CA,
        ),
        (
            "[SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca (_ssl.c:2580)",
            TlsFailure.UNKNOWN_CA,
        ),
        (
            "[SSL: SSLV3_ALERT_CERTIFICATE_EXPIRED] sslv3 alert certificate expired",
            TlsFailure.EXPIRED,
        ),
        ("CERTIFICATE_VERIFY_FAILED: certificate has expired", TlsFailure.EXPIRED),
        (
            "[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert certificate required",
            TlsFailure.NO_CERTIFICATE,
        ),
        (
            "revoked: certificate 1a2b of gateway gw-1 is revoked; an admin must issue a new "
            "enrollment token",
            TlsFailure.REVOKED,
        ),
        (
            "failed to connect to all addresses; last error: UNAVAILABLE: Connection refused",
            TlsFailure.OTHER,
        ),
        (None, TlsFailure.OTHER),
    ],
)
def test_classify_tls_failure(failure: str | None, expected: TlsFailure) -> None:
    assert classify_tls_failure(failure) is expected
    assert expected.is_rejection is (expected is not TlsFailure.OTHER)


def test_classify_tls_failure_reads_ssl_verify_codes() -> None:
    error = ssl.SSLCertVerificationError(1, "certificate verify failed")
    error.verify_code = 10
    assert classify_tls_failure(error) is TlsFailure.EXPIRED


def test_classify_tls_failure_uses_what_the_gateway_knows(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    identity = _install(tmp_path, ca)
    closed = (
        "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:1.2.3.4:1: Socket closed"
    )
    assert classify_tls_failure(closed) is TlsFailure.OTHER
    assert classify_tls_failure(closed, identity=identity, now=NOW) is TlsFailure.OTHER
    later = identity.not_after + timedelta(seconds=1)
    assert classify_tls_failure(closed, identity=identity, now=later) is TlsFailure.EXPIRED
    assert classify_tls_failure(closed, identity=None, now=NOW) is TlsFailure.NO_CERTIFICATE


# -- loading without `cryptography` (cert.json) ---------------------------------------------------

# What a gateway with an enrolled identity does before each connection: load the identity (and
# the staged one), decide on renewal, build the TLS context. Prints the facts it read and whether
# `cryptography` got imported.
STEADY_STATE_PROBE = textwrap.dedent(
    """
    import asyncio, json, sys
    from pathlib import Path
    from gateway.clock import SystemClock
    from gateway.runtime.uplink_tls import UplinkCredentials

    async def main() -> None:
        credentials = UplinkCredentials(
            Path(sys.argv[1]), enroll_url="https://127.0.0.1:1", clock=SystemClock()
        )
        identity = await credentials.prepare()
        identity.ssl_context()
        assert credentials.renewal_check_in_s() > 0
        print(json.dumps({
            "gateway_id": identity.gateway_id,
            "serial": identity.serial,
            "not_before": identity.not_before.isoformat(),
            "not_after": identity.not_after.isoformat(),
            "cryptography": "cryptography" in sys.modules,
        }))

    asyncio.run(main())
    """
)


def _steady_state(state_dir: Path) -> dict[str, object]:
    result = subprocess.run(
        [sys.executable, "-c", STEADY_STATE_PROBE, str(state_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout.splitlines()[-1])
    assert isinstance(answer, dict)
    return answer


def _facts(identity: Identity) -> dict[str, object]:
    return {
        "gateway_id": identity.gateway_id,
        "serial": identity.serial,
        "not_before": identity.not_before.isoformat(),
        "not_after": identity.not_after.isoformat(),
    }


def test_an_installed_identity_loads_without_cryptography(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    _install(tmp_path, ca)
    # Installed the way a renewal (and enrollment: the same code) installs a certificate.
    staged = stage_certificate(tmp_path, _sign(ca, begin_renewal(tmp_path)), ca.certificate_pem)
    committed = commit_renewal(tmp_path)
    assert (committed.key_path.parent / "cert.json").is_file()
    assert stat.S_IMODE((committed.key_path.parent / "cert.json").stat().st_mode) == 0o644
    answer = _steady_state(tmp_path)
    assert answer == _facts(staged) | {"cryptography": False}


def test_an_identity_from_an_older_version_gains_its_facts_on_first_load(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    identity = _install(tmp_path, ca)
    facts_file = identity.key_path.parent / "cert.json"
    facts_file.unlink()  # as an older version left it: key, cert and CA only
    first = _steady_state(tmp_path)
    assert first == _facts(identity) | {"cryptography": True}  # the full check, once
    assert facts_file.is_file()
    assert _steady_state(tmp_path) == _facts(identity) | {"cryptography": False}


def test_unreadable_facts_are_recomputed(tmp_path: Path, ca: CertificateAuthority) -> None:
    identity = _install(tmp_path, ca)
    facts_file = identity.key_path.parent / "cert.json"
    for broken in (b"", b"{not json", b'{"format": 99}', b"[]"):
        facts_file.write_bytes(broken)
        assert Identity.load(tmp_path) == identity
        assert json.loads(facts_file.read_bytes())["serial"] == identity.serial


def test_facts_for_other_files_are_not_trusted(tmp_path: Path, ca: CertificateAuthority) -> None:
    """cert.json is only valid for the exact certificate and CA it was written for: facts copied
    from another identity (here: its other certificate, for another gateway) are not used."""
    identity = _install(tmp_path, ca)
    other = _install(tmp_path / "other", ca, gateway_id="gw-2")
    (identity.key_path.parent / "cert.json").write_bytes(
        (other.key_path.parent / "cert.json").read_bytes()
    )
    assert Identity.load(tmp_path) == identity


def test_a_key_swapped_under_matching_facts_is_refused(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    identity = _install(tmp_path, ca)
    assert (identity.key_path.parent / "cert.json").is_file()
    write_private_file(identity.key_path, key_pem(generate_key()))
    with pytest.raises(IdentityError, match="not for this device's key"):
        Identity.load(tmp_path)
    identity.key_path.write_bytes(b"-----BEGIN PRIVATE KEY-----\ngarbage\n")
    with pytest.raises(IdentityError, match="unreadable private key"):
        Identity.load(tmp_path)

"""Enrollment: one-time site-bound tokens, issuance from the headend's records, renewal, revocation.

Every test runs on both stores (in memory and SQLite), which must behave the same.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.identity import build_csr, generate_key
from headend_min.clock import ManualClock, datetime_from_ns
from headend_min.enrollment import (
    TOKEN_PREFIX,
    CertificateExpiredError,
    CertificateRevokedError,
    Enrollment,
    EnrollmentStore,
    InvalidCsrError,
    InvalidRequestError,
    KeyReuseError,
    MemoryEnrollmentStore,
    SiteMismatchError,
    TokenRejectedError,
    UnknownCertificateError,
    hash_token,
    renew_at,
)
from headend_min.enrollment_sqlite import SqliteEnrollmentStore
from headend_min.pki import HEADEND_IDENTITY, CertificateAuthority, gateway_id_of, serial_text


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.create(
        tmp_path_factory.mktemp("ca"), now=datetime_from_ns(ManualClock().wall_ns())
    )


@pytest.fixture(params=["memory", "sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[EnrollmentStore]:
    if request.param == "memory":
        yield MemoryEnrollmentStore()
        return
    sqlite_store = await SqliteEnrollmentStore.open(tmp_path / "headend.sqlite3")
    yield sqlite_store
    await sqlite_store.close()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def enrollment(store: EnrollmentStore, ca: CertificateAuthority, clock: ManualClock) -> Enrollment:
    return Enrollment(store, ca, clock, certificate_lifetime_s=30 * 86_400)


def _csr(gateway_id: str = "gw-1") -> bytes:
    return build_csr(generate_key(), gateway_id)


async def test_enroll_issues_a_certificate_from_the_token(enrollment: Enrollment) -> None:
    token = await enrollment.create_token("site-a", "gw-1")
    assert token.startswith(TOKEN_PREFIX)
    csr = _csr()
    result = await enrollment.enroll(token, csr, gateway_id="gw-1", site_id="site-a")
    cert = x509.load_pem_x509_certificate(result.certificate_pem.encode())
    assert (result.gateway_id, result.site_id) == ("gw-1", "site-a")
    assert gateway_id_of(cert) == "gw-1"
    assert result.serial == serial_text(cert)
    assert result.not_after == cert.not_valid_after_utc
    assert result.ca_pem == enrollment.ca_pem
    [issued] = await enrollment.certificates("gw-1")
    assert (issued.serial, issued.site_id, issued.revoked_at_ns) == (result.serial, "site-a", None)


async def test_token_is_stored_only_as_its_hash(
    enrollment: Enrollment, store: EnrollmentStore
) -> None:
    token = await enrollment.create_token("site-a", "gw-1")
    record = await store.get_token(hash_token(token))
    assert record is not None
    assert token not in repr(record)
    if isinstance(store, SqliteEnrollmentStore):
        # The secret never reaches the database file (nor its WAL).
        raw = await asyncio.to_thread(
            _file_bytes, store.path, store.path.with_name(store.path.name + "-wal")
        )
        assert hash_token(token).encode() in raw
        assert token.encode() not in raw


def _file_bytes(*paths: Path) -> bytes:
    return b"".join(p.read_bytes() for p in paths if p.exists())


async def test_token_is_one_time(enrollment: Enrollment) -> None:
    token = await enrollment.create_token("site-a", "gw-1")
    await enrollment.enroll(token, _csr())
    with pytest.raises(TokenRejectedError, match="already used"):
        await enrollment.enroll(token, _csr())


async def test_racing_enrollments_with_one_token_issue_one_certificate(
    enrollment: Enrollment,
) -> None:
    token = await enrollment.create_token("site-a", "gw-1")
    results = await asyncio.gather(
        *(enrollment.enroll(token, _csr()) for _ in range(4)), return_exceptions=True
    )
    assert sum(not isinstance(r, BaseException) for r in results) == 1
    assert all(isinstance(r, TokenRejectedError) for r in results if isinstance(r, BaseException))
    assert len(await enrollment.certificates("gw-1")) == 1


async def test_expired_token_is_refused(enrollment: Enrollment, clock: ManualClock) -> None:
    token = await enrollment.create_token("site-a", "gw-1", ttl_s=3600)
    clock.advance(3600)
    with pytest.raises(TokenRejectedError, match="expired"):
        await enrollment.enroll(token, _csr())
    assert await enrollment.certificates("gw-1") == []


async def test_default_token_lifetime_is_a_day(enrollment: Enrollment, clock: ManualClock) -> None:
    token = await enrollment.create_token("site-a", "gw-1")
    clock.advance(24 * 3600 - 1)
    await enrollment.enroll(token, _csr())
    late = await enrollment.create_token("site-a", "gw-2")
    clock.advance(24 * 3600)
    with pytest.raises(TokenRejectedError, match="expired"):
        await enrollment.enroll(late, _csr("gw-2"))


@pytest.mark.parametrize("token", ["", "nope", TOKEN_PREFIX + "x" * 43, "x" * 5000])
async def test_unknown_token_is_refused(enrollment: Enrollment, token: str) -> None:
    await enrollment.create_token("site-a", "gw-1")
    with pytest.raises(TokenRejectedError, match="unknown"):
        await enrollment.enroll(token, _csr())


async def test_token_for_another_site_or_gateway_is_refused(enrollment: Enrollment) -> None:
    token = await enrollment.create_token("site-a", "gw-1")
    with pytest.raises(SiteMismatchError, match="for site 'site-a'"):
        await enrollment.enroll(token, _csr(), gateway_id="gw-1", site_id="site-b")
    with pytest.raises(SiteMismatchError, match="for gateway 'gw-1'"):
        await enrollment.enroll(token, _csr("gw-2"), gateway_id="gw-2", site_id="site-a")
    # Refusals changed nothing: the token still works for the right gateway.
    await enrollment.enroll(token, _csr(), gateway_id="gw-1", site_id="site-a")


async def test_gateway_enrolled_elsewhere_must_be_revoked_first(enrollment: Enrollment) -> None:
    await enrollment.enroll(await enrollment.create_token("site-a", "gw-1"), _csr())
    moving = await enrollment.create_token("site-b", "gw-1")
    with pytest.raises(SiteMismatchError, match="revoke it before"):
        await enrollment.enroll(moving, _csr())
    await enrollment.revoke("gw-1")
    result = await enrollment.enroll(moving, _csr())
    assert result.site_id == "site-b"


async def test_csr_subject_is_ignored(enrollment: Enrollment) -> None:
    token = await enrollment.create_token("site-a", "gw-1")
    key = generate_key()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gw-victim")]))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("victim.example")]), critical=False
        )
        .sign(key, hashes.SHA256())
        .public_bytes(Encoding.PEM)
    )
    result = await enrollment.enroll(token, csr)
    cert = x509.load_pem_x509_certificate(result.certificate_pem.encode())
    assert gateway_id_of(cert) == "gw-1"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == []


async def test_csr_without_proof_of_possession_is_refused_and_keeps_the_token(
    enrollment: Enrollment,
) -> None:
    token = await enrollment.create_token("site-a", "gw-1")
    # The signature's last byte changed: the CSR parses, but nobody proved holding the key.
    der = x509.load_pem_x509_csr(_csr()).public_bytes(Encoding.DER)
    forged = der[:-1] + bytes([der[-1] ^ 0x01])
    forged_pem = x509.load_der_x509_csr(forged).public_bytes(Encoding.PEM)
    with pytest.raises(InvalidCsrError, match="proof of possession"):
        await enrollment.enroll(token, forged_pem)
    with pytest.raises(InvalidCsrError, match="not a PEM"):
        await enrollment.enroll(token, b"not a csr")
    await enrollment.enroll(token, _csr())  # still unused


async def test_renew_with_a_new_key(enrollment: Enrollment, clock: ManualClock) -> None:
    first = await enrollment.enroll(await enrollment.create_token("site-a", "gw-1"), _csr())
    clock.advance(20 * 86_400)
    renewed = await enrollment.renew("gw-1", first.serial, _csr())
    assert (renewed.gateway_id, renewed.site_id) == ("gw-1", "site-a")
    assert renewed.serial != first.serial
    assert renewed.not_after > first.not_after
    assert not await enrollment.is_revoked("gw-1", first.serial)  # kept until it expires


async def test_renew_with_the_same_key_is_refused(enrollment: Enrollment) -> None:
    csr = _csr()
    first = await enrollment.enroll(await enrollment.create_token("site-a", "gw-1"), csr)
    with pytest.raises(KeyReuseError, match="new key"):
        await enrollment.renew("gw-1", first.serial, csr)


async def test_revoked_certificate_cannot_renew(enrollment: Enrollment) -> None:
    first = await enrollment.enroll(await enrollment.create_token("site-a", "gw-1"), _csr())
    assert await enrollment.revoke("gw-1", first.serial.upper()) == [first.serial]
    assert await enrollment.is_revoked("gw-1", first.serial)
    with pytest.raises(CertificateRevokedError, match="revoked"):
        await enrollment.renew("gw-1", first.serial, _csr())
    assert await enrollment.revoke("gw-1", first.serial) == []  # idempotent


async def test_revoking_a_gateway_revokes_all_its_certificates(enrollment: Enrollment) -> None:
    first = await enrollment.enroll(await enrollment.create_token("site-a", "gw-1"), _csr())
    second = await enrollment.renew("gw-1", first.serial, _csr())
    other = await enrollment.enroll(await enrollment.create_token("site-a", "gw-2"), _csr())
    assert sorted(await enrollment.revoke("gw-1")) == sorted([first.serial, second.serial])
    for serial in (first.serial, second.serial):
        with pytest.raises(CertificateRevokedError):
            await enrollment.renew("gw-1", serial, _csr())
    assert not await enrollment.is_revoked("gw-2", other.serial)
    # Back only through a new token: a new certificate with a new serial.
    back = await enrollment.enroll(await enrollment.create_token("site-a", "gw-1"), _csr())
    assert not await enrollment.is_revoked("gw-1", back.serial)


async def test_unknown_or_expired_certificate_cannot_renew(
    enrollment: Enrollment, clock: ManualClock
) -> None:
    first = await enrollment.enroll(await enrollment.create_token("site-a", "gw-1"), _csr())
    with pytest.raises(UnknownCertificateError):
        await enrollment.renew("gw-2", first.serial, _csr())  # another gateway's serial
    with pytest.raises(UnknownCertificateError):
        await enrollment.renew("gw-1", "abc123", _csr())
    clock.advance(31 * 86_400)
    with pytest.raises(CertificateExpiredError, match="enroll again"):
        await enrollment.renew("gw-1", first.serial, _csr())


async def test_bad_admin_input_is_refused(enrollment: Enrollment) -> None:
    with pytest.raises(InvalidRequestError, match="site id"):
        await enrollment.create_token("Site A", "gw-1")
    with pytest.raises(InvalidRequestError, match="gateway id"):
        await enrollment.create_token("site-a", "../gw")
    with pytest.raises(InvalidRequestError, match="lifetime"):
        await enrollment.create_token("site-a", "gw-1", ttl_s=0)
    with pytest.raises(InvalidRequestError, match="hexadecimal"):
        await enrollment.revoke("gw-1", "zz")


def test_renew_at_is_two_thirds_of_the_lifetime() -> None:
    start = datetime_from_ns(ManualClock().wall_ns())
    assert renew_at(start, start + timedelta(days=30)) == start + timedelta(days=20)


@settings(max_examples=50, deadline=None)
@given(st.integers(min_value=1, max_value=10**9), st.integers(min_value=0, max_value=10**9))
def test_renew_at_lies_inside_the_lifetime(lifetime_s: int, offset_s: int) -> None:
    start = datetime_from_ns(ManualClock().wall_ns()) + timedelta(seconds=offset_s)
    end = start + timedelta(seconds=lifetime_s)
    moment = renew_at(start, end)
    assert start < moment < end
    assert abs((moment - start) / (end - start) - 2 / 3) < 1e-6


async def test_the_headends_own_identity_cannot_be_enrolled(enrollment: Enrollment) -> None:
    with pytest.raises(InvalidRequestError, match="reserved for the headend"):
        await enrollment.create_token("site-a", HEADEND_IDENTITY)

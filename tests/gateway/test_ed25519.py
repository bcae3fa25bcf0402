"""Ed25519 verification (gateway.ed25519): RFC 8032 vectors, agreement with `cryptography`,
every single-byte mutation refused, wrong lengths refused, and the backend choice."""

from __future__ import annotations

import ctypes.util
import logging
import subprocess
import sys
import textwrap

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import ed25519
from gateway.ed25519 import (
    Ed25519Backend,
    Ed25519BackendError,
    cryptography_backend,
    libcrypto_backend,
    select_backend,
)

# RFC 8032 section 7.1: (secret key, public key, message, signature), hex.
RFC8032 = {
    "TEST 1": (
        "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
        "",
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46b"
        "d25bf5f0595bbe24655141438e7a100b",
    ),
    "TEST 2": (
        "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
        "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
        "72",
        "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c"
        "387b2eaeb4302aeeb00d291612bb0c00",
    ),
    "TEST 3": (
        "c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
        "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
        "af82",
        "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac18ff9b538d16f290ae67f760984dc659"
        "4a7c15e9716ed28dc027beceea1ec40a",
    ),
    "TEST SHA(abc)": (
        "833fe62409237b9d62ec77587520911e9a759cec1d19755b7da901b96dca3d42",
        "ec172b93ad5e563bf4932c70e1245034c35467ef2efd4d64ebf819683467e2bf",
        "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a"
        "2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f",
        "dc2a4459e7369633a52b1bf277839a00201009a3efbf3ecb69bea2186c26b58909351fc9ac90b3ecfdfbc7c66431e030"
        "3dca179c138ac17ad9bef1177331a704",
    ),
}


def _libcrypto() -> Ed25519Backend:
    """The libcrypto backend (this test machine runs Debian's OpenSSL 3: it must be usable)."""
    chosen = ed25519.backend()
    assert chosen.name.startswith("libcrypto"), chosen.name
    return chosen


BACKENDS = {"libcrypto": _libcrypto, "cryptography": cryptography_backend}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest) -> Ed25519Backend:
    return BACKENDS[request.param]()


@pytest.mark.parametrize("test", sorted(RFC8032))
def test_rfc8032_vectors_verify(backend: Ed25519Backend, test: str) -> None:
    secret, public, message, signature = (bytes.fromhex(h) for h in RFC8032[test])
    # The vectors are self-consistent: the secret key derives the public key and the signature.
    private_key = Ed25519PrivateKey.from_private_bytes(secret)
    assert private_key.public_key().public_bytes_raw() == public
    assert private_key.sign(message) == signature
    assert backend.verify(public, signature, message)


@pytest.mark.parametrize("test", sorted(RFC8032))
def test_every_single_byte_mutation_is_refused(backend: Ed25519Backend, test: str) -> None:
    _, public, message, signature = (bytes.fromhex(h) for h in RFC8032[test])
    for index in range(len(message)):
        for flip in (0x01, 0x80, 0xFF):
            assert not backend.verify(public, signature, _mutate(message, index, flip))
    for index in range(len(signature)):
        for flip in (0x01, 0x80, 0xFF):
            assert not backend.verify(public, _mutate(signature, index, flip), message)
    for index in range(len(public)):
        for flip in (0x01, 0x80, 0xFF):
            assert not backend.verify(_mutate(public, index, flip), signature, message)
    # Appending or dropping a byte of the message is a different message.
    assert not backend.verify(public, signature, message + b"\0")
    if message:
        assert not backend.verify(public, signature, message[:-1])


def _mutate(data: bytes, index: int, flip: int) -> bytes:
    return data[:index] + bytes([data[index] ^ flip]) + data[index + 1 :]


def test_wrong_lengths_are_refused(backend: Ed25519Backend) -> None:
    _, public, message, signature = (bytes.fromhex(h) for h in RFC8032["TEST 2"])
    for bad_signature in (b"", signature[:63], signature + b"\0", signature * 2):
        assert not backend.verify(public, bad_signature, message)
    for bad_key in (b"", public[:31], public + b"\0", public * 2):
        assert not backend.verify(bad_key, signature, message)
    assert not backend.verify(b"", b"", b"")


def test_degenerate_keys_and_signatures_are_refused(backend: Ed25519Backend) -> None:
    _, public, message, signature = (bytes.fromhex(h) for h in RFC8032["TEST 1"])
    for key in (bytes(32), b"\xff" * 32, b"\x01" + bytes(31)):
        assert not backend.verify(key, signature, message)
    assert not backend.verify(public, bytes(64), message)
    assert not backend.verify(public, b"\xff" * 64, message)
    # S >= L (the group order) is malleability, refused by RFC 8032's verification.
    group_order = (2**252 + 27742317777372353535851937790883648493).to_bytes(32, "little")
    assert not backend.verify(public, signature[:32] + group_order, message)


@settings(max_examples=200, deadline=None)
@given(
    seed=st.binary(min_size=32, max_size=32),
    message=st.binary(max_size=2048),
    other=st.binary(max_size=2048),
    signature=st.binary(min_size=64, max_size=64),
)
def test_backends_agree_with_cryptography(
    seed: bytes, message: bytes, other: bytes, signature: bytes
) -> None:
    libcrypto, reference = _libcrypto(), cryptography_backend()
    private_key = Ed25519PrivateKey.from_private_bytes(seed)
    public = private_key.public_key().public_bytes_raw()
    good = private_key.sign(message)
    assert libcrypto.verify(public, good, message)
    assert reference.verify(public, good, message)
    for candidate in ((public, good, other), (public, signature, message), (seed, good, message)):
        assert libcrypto.verify(*candidate) == reference.verify(*candidate), candidate


def test_a_library_without_the_functions_is_not_a_backend() -> None:
    libc = ctypes.util.find_library("c")
    assert libc is not None
    with pytest.raises(Ed25519BackendError, match="EVP_PKEY_new_raw_public_key"):
        libcrypto_backend(libc)
    with pytest.raises(Ed25519BackendError, match="no-such-libcrypto"):
        libcrypto_backend("/nonexistent/no-such-libcrypto.so.3")


def test_without_a_usable_libcrypto_it_falls_back_to_cryptography(
    caplog: pytest.LogCaptureFixture,
) -> None:
    libc = ctypes.util.find_library("c")
    assert libc is not None
    with caplog.at_level(logging.INFO, logger="gateway.ed25519"):
        chosen = select_backend(["/nonexistent/libcrypto.so.3", libc])
    assert chosen.name == "cryptography"
    assert "Ed25519 verification: cryptography (libcrypto not usable:" in caplog.text
    assert "/nonexistent/libcrypto.so.3" in caplog.text
    _, public, message, signature = (bytes.fromhex(h) for h in RFC8032["TEST 3"])
    assert chosen.verify(public, signature, message)


def test_the_process_libcrypto_is_chosen_once_and_logged() -> None:
    # A fresh interpreter: the choice happens at first use, is logged once, and does not load
    # the cryptography package (the point of the module: ~7 MB resident saved).
    probe = textwrap.dedent(
        """
        import logging, sys
        logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
        from gateway import ed25519
        public = bytes.fromhex(sys.argv[1])
        signature = bytes.fromhex(sys.argv[2])
        assert ed25519.verify(public, signature, b"")
        assert not ed25519.verify(public, signature, b"x")
        assert "cryptography" not in sys.modules, "cryptography was imported"
        print(ed25519.backend().name)
        """
    )
    _, public, _, signature = RFC8032["TEST 1"]
    result = subprocess.run(
        [sys.executable, "-c", probe, public, signature],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("libcrypto via ctypes (")
    assert "libcrypto.so" in result.stdout
    assert result.stderr.count("gateway.ed25519 Ed25519 verification: libcrypto") == 1

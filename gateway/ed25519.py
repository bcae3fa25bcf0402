"""Ed25519 signature verification for the gateway, without loading the `cryptography` package.

The gateway verifies the headend's signature on every intent (`gateway.intent_verify`). The
`cryptography` package would cost ~7 MB resident for that one operation, while the process
already maps the system's OpenSSL libcrypto (Python's `ssl` module links it), and OpenSSL >= 1.1.1
implements Ed25519. So the verifier calls libcrypto's EVP interface through ctypes: the library
mapped in this process (found in /proc/self/maps after `import ssl`), else the one the linker
finds (`ctypes.util.find_library("crypto")`). Where neither loads or has the functions, it falls
back to `cryptography` (imported only then). The backend is chosen once, at first use, and logged.

`verify` never raises on hostile bytes: a key or signature of the wrong length, a key that is
not a curve point, a signature that does not verify are all just False.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "PUBLIC_KEY_BYTES",
    "SIGNATURE_BYTES",
    "Ed25519Backend",
    "Ed25519BackendError",
    "backend",
    "cryptography_backend",
    "libcrypto_backend",
    "select_backend",
    "verify",
]

_log = logging.getLogger(__name__)

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
_EVP_PKEY_ED25519 = 1087  # NID_ED25519 (OpenSSL's obj_mac.h); stable since 1.1.1


class Ed25519BackendError(Exception):
    """A backend cannot be used (library missing or too old); the message says which and why."""


@dataclass(frozen=True, slots=True)
class Ed25519Backend:
    """One implementation: `verify(public_key_raw, signature, message) -> bool`, never raising."""

    name: str
    verify: Callable[[bytes, bytes, bytes], bool]


def verify(public_key_raw: bytes, signature: bytes, message: bytes) -> bool:
    """True if `signature` is a valid Ed25519 signature of `message` by `public_key_raw` (the
    32-byte RFC 8032 encoding); False otherwise, including for malformed keys and signatures."""
    return backend().verify(public_key_raw, signature, message)


@functools.cache
def backend() -> Ed25519Backend:
    """The backend this process uses, chosen (and logged) at first use."""
    return select_backend(_libcrypto_candidates())


def select_backend(libcrypto_paths: Iterable[str]) -> Ed25519Backend:
    """The first libcrypto among `libcrypto_paths` that can verify, else `cryptography`."""
    problems = []
    for path in libcrypto_paths:
        try:
            chosen = libcrypto_backend(path)
        except Ed25519BackendError as exc:
            problems.append(str(exc))
            continue
        _log.info("Ed25519 verification: %s", chosen.name)
        return chosen
    chosen = cryptography_backend()
    _log.info(
        "Ed25519 verification: %s (libcrypto not usable: %s)",
        chosen.name,
        "; ".join(problems) or "not found",
    )
    return chosen


def _libcrypto_candidates() -> list[str]:
    """The libcrypto already mapped in this process (after `import ssl`), then the linker's."""
    import ssl  # noqa: F401  (maps libcrypto, if Python links OpenSSL dynamically)

    candidates = []
    try:
        with Path("/proc/self/maps").open() as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6:
                    path = fields[5].strip()
                    if Path(path).name.startswith("libcrypto.so") and path not in candidates:
                        candidates.append(path)
    except OSError:
        pass  # not Linux (no /proc): the linker's search below
    found = ctypes.util.find_library("crypto")
    if found and found not in candidates:
        candidates.append(found)
    return candidates


def libcrypto_backend(path: str) -> Ed25519Backend:
    """Verification through OpenSSL's EVP interface in the libcrypto at `path` (ctypes).

    Raises Ed25519BackendError if the library does not load or lacks the functions (OpenSSL
    before 1.1.1)."""
    try:
        lib = ctypes.CDLL(path)
        new_raw_public_key = lib.EVP_PKEY_new_raw_public_key
        pkey_free = lib.EVP_PKEY_free
        md_ctx_new = lib.EVP_MD_CTX_new
        md_ctx_free = lib.EVP_MD_CTX_free
        digest_verify_init = lib.EVP_DigestVerifyInit
        digest_verify = lib.EVP_DigestVerify
        err_clear_error = lib.ERR_clear_error
    except (OSError, AttributeError) as exc:
        raise Ed25519BackendError(f"{path}: {exc}") from None

    # Exact prototypes: without them ctypes would pass pointers as C ints (truncated on 64 bit).
    new_raw_public_key.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
    new_raw_public_key.restype = ctypes.c_void_p
    pkey_free.argtypes = [ctypes.c_void_p]
    pkey_free.restype = None
    md_ctx_new.argtypes = []
    md_ctx_new.restype = ctypes.c_void_p
    md_ctx_free.argtypes = [ctypes.c_void_p]
    md_ctx_free.restype = None
    digest_verify_init.argtypes = [ctypes.c_void_p] * 5
    digest_verify_init.restype = ctypes.c_int
    digest_verify.argtypes = [
        ctypes.c_void_p,
        ctypes.c_char_p,
        ctypes.c_size_t,
        ctypes.c_char_p,
        ctypes.c_size_t,
    ]
    digest_verify.restype = ctypes.c_int
    err_clear_error.argtypes = []
    err_clear_error.restype = None

    def verify_libcrypto(public_key_raw: bytes, signature: bytes, message: bytes) -> bool:
        if len(public_key_raw) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
            return False
        pkey = new_raw_public_key(_EVP_PKEY_ED25519, None, public_key_raw, PUBLIC_KEY_BYTES)
        ctx = md_ctx_new()
        try:
            valid = bool(
                pkey
                and ctx
                and digest_verify_init(ctx, None, None, None, pkey) == 1
                and digest_verify(ctx, signature, SIGNATURE_BYTES, message, len(message)) == 1
            )
        finally:
            md_ctx_free(ctx)  # both accept NULL
            pkey_free(pkey)
        if not valid:
            # A refusal leaves errors on this thread's OpenSSL error queue, which the `ssl`
            # module could later misreport as the cause of an unrelated TLS failure.
            err_clear_error()
        return valid

    # OpenSSL 1.1.1 has every function but may lack Ed25519 (no-ec builds): prove it works.
    if not verify_libcrypto(_SELF_TEST_KEY, _SELF_TEST_SIGNATURE, b""):
        raise Ed25519BackendError(f"{path}: Ed25519 self-test failed (built without Ed25519?)")
    return Ed25519Backend(f"libcrypto via ctypes ({path})", verify_libcrypto)


def cryptography_backend() -> Ed25519Backend:
    """Verification through the `cryptography` package (imported now: ~7 MB resident)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    def verify_cryptography(public_key_raw: bytes, signature: bytes, message: bytes) -> bool:
        if len(public_key_raw) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
            return False
        try:
            Ed25519PublicKey.from_public_bytes(public_key_raw).verify(signature, message)
        except (InvalidSignature, ValueError):
            return False
        return True

    return Ed25519Backend("cryptography", verify_cryptography)


# RFC 8032 section 7.1, TEST 1 (empty message).
_SELF_TEST_KEY = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
_SELF_TEST_SIGNATURE = bytes.fromhex(
    "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46b"
    "d25bf5f0595bbe24655141438e7a100b"
)

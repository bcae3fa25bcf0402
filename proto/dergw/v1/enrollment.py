"""The enrollment protocol's shared pieces: what the gateway and the headend must agree on.

Part of the wire contract (`dergw.v1`): the HTTP headers a renewal request is authenticated
with, the CSR a gateway sends (CN = its id; the headend sets the real subject), when a
certificate is renewed, and how both ends write key material (atomically, never readable by
others). X.509 comes from `cryptography`, imported only by the function that builds a CSR.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec

__all__ = [
    "CERTIFICATE_HEADER",
    "SIGNATURE_HEADER",
    "build_csr",
    "renew_at",
    "write_private_file",
]

# A renewal request carries the current certificate (base64 DER) and an ECDSA-SHA256 signature
# of the body by its key.
CERTIFICATE_HEADER = "X-Dergw-Certificate"
SIGNATURE_HEADER = "X-Dergw-Signature"


def write_private_file(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Write `data` to `path` atomically (temp file, fsync, rename, fsync dir) with `mode`.

    The temp file is created with `mode` already set, so a key is never readable by others,
    not even for a moment.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)  # the umask may have narrowed the mode given to os.open
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def build_csr(key: ec.EllipticCurvePrivateKey, gateway_id: str) -> bytes:
    """A PEM CSR with CN=<gateway_id>, signed by `key` (the headend sets the real subject)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, gateway_id)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def renew_at(not_before: datetime, not_after: datetime) -> datetime:
    """When to renew a certificate: at 2/3 of its lifetime (reference/appliance.md §4.2)."""
    return not_before + (not_after - not_before) * 2 / 3

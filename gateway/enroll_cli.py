"""`dergw enroll`: give this gateway its identity (key on the device, certificate from the headend).

    dergw enroll --headend https://HOST:PORT (--token TOKEN | --token-file F) [--ca-file CA]
                 --config FILE
    dergw enroll --renew --config FILE [--headend https://HOST:PORT]

`--headend` is the headend's HTTPS base URL (`https://HOST:PORT`, as served by
`dergw headend run --tls-dir DIR`); the request goes to `<base>/api/v1/enroll`. The same base URL
in `[uplink] enroll_url` lets the gateway renew its certificate by itself.

The key is generated here and never leaves the device; the headend checks the one-time token
(made for this gateway id at this site) and signs a certificate. `--ca-file` is the CA to trust
for the headend's HTTPS (default: the system store). The intent-signing keys the headend sends
are installed as the trust file (`[security] intent_keys_file`).

`--token-file` is for an unattended first boot: the token is read from the file, and the file is
deleted once enrollment succeeded (a one-time secret should not stay on a boot partition).

`--renew` renews now instead of at 2/3 of the certificate's lifetime: a new key, a request
signed with the current certificate (default URL: `[uplink] enroll_url`); the new certificate is
staged, and the gateway switches to it on its next connection (keeping the old one until the
headend accepted the new one). A revoked gateway is refused here (exit 1).

Exit codes: 0 enrolled (renewal staged); 1 refused or failed (the message says why and what
to do); 2 usage or config error.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path

from dergw.v1.trust import TrustedKeys, TrustedKeysError
from gateway.config import ConfigError, load_config
from gateway.identity import (
    EnrollmentRefusedError,
    HeadendUnreachableError,
    IdentityError,
    enroll,
    stage_renewal,
    write_private_file,
)

__all__ = ["EnrollUsageError", "main", "run_enroll", "run_renew"]

MAX_TOKEN_FILE_BYTES = 4096


class EnrollUsageError(ValueError):
    """Bad arguments: no token, unreadable token file, missing CA file."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dergw enroll", description=__doc__.split("\n\n")[0])
    parser.add_argument("--headend", help="the headend's base URL, https://...")
    parser.add_argument(
        "--renew", action="store_true", help="renew the certificate now (no token needed)"
    )
    token = parser.add_mutually_exclusive_group()
    token.add_argument("--token", help="the one-time enrollment token")
    token.add_argument("--token-file", type=Path, help="read the token from F, delete F on success")
    parser.add_argument("--ca-file", type=Path, help="CA certificate(s) to trust for the headend")
    parser.add_argument("--config", type=Path, required=True, help="the gateway config file")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds (default 30)")
    return parser


def _read_token(path: Path) -> str:
    try:
        raw = path.read_bytes()[: MAX_TOKEN_FILE_BYTES + 1]
    except OSError as exc:
        raise EnrollUsageError(
            f"{path}: cannot read the token file: {exc.strerror or exc}"
        ) from None
    if len(raw) > MAX_TOKEN_FILE_BYTES:
        raise EnrollUsageError(f"{path}: too large for a token file")
    token = raw.decode(errors="replace").strip()
    if not token:
        raise EnrollUsageError(f"{path}: the token file is empty")
    return token


def run_enroll(
    *,
    headend: str,
    config_path: Path,
    token: str | None = None,
    token_file: Path | None = None,
    ca_file: Path | None = None,
    timeout_s: float = 30.0,
) -> str:
    """Enroll per the arguments; returns a one-line summary. Raises IdentityError (failed),
    ConfigError or EnrollUsageError (usage)."""
    config = load_config(config_path)
    if token is None:
        if token_file is None:
            raise EnrollUsageError("give --token or --token-file")
        token = _read_token(token_file)
    if ca_file is not None and not ca_file.is_file():
        raise EnrollUsageError(f"{ca_file}: CA file not found")
    state_dir = config.gateway.state_dir
    state_dir.mkdir(parents=True, exist_ok=True)
    enrolled = enroll(
        state_dir,
        headend_url=headend,
        token=token,
        gateway_id=config.gateway.id,
        site_id=config.site.id,
        ca_bundle=ca_file,
        timeout_s=timeout_s,
    )
    keys_note = "no intent-signing keys received"
    if enrolled.intent_keys is not None:
        keys_path = config.security.intent_keys_path(state_dir)
        try:
            keys = TrustedKeys.parse(enrolled.intent_keys, source="the headend's answer")
        except TrustedKeysError as exc:
            raise IdentityError(f"the headend sent unusable intent keys: {exc}") from None
        keys_path.parent.mkdir(parents=True, exist_ok=True)
        write_private_file(keys_path, keys.to_json().encode(), mode=0o644)
        keys_note = f"{len(keys)} intent-signing key(s) in {keys_path}"
    if token_file is not None:
        token_file.unlink(missing_ok=True)
    identity = enrolled.identity
    days = identity.days_left(datetime.now(UTC))
    return (
        f"enrolled {identity.gateway_id} (site {config.site.id}): certificate {identity.serial}, "
        f"valid until {identity.not_after:%Y-%m-%d %H:%M} UTC ({days:.0f} days); {keys_note}"
    )


def run_renew(*, config_path: Path, headend: str | None = None, timeout_s: float = 30.0) -> str:
    """Stage a renewed certificate now; returns a one-line summary. Raises IdentityError
    (refused, e.g. revoked, or failed), ConfigError or EnrollUsageError."""
    config = load_config(config_path)
    url = headend or config.uplink.enroll_url
    if not url:
        raise EnrollUsageError("give --headend or set [uplink] enroll_url in the config")
    staged = stage_renewal(config.gateway.state_dir, headend_url=url, timeout_s=timeout_s)
    return (
        f"renewal staged for {staged.gateway_id}: certificate {staged.serial}, valid until "
        f"{staged.not_after:%Y-%m-%d %H:%M} UTC; the gateway switches on its next connection"
    )


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.renew:
            summary = run_renew(
                config_path=args.config, headend=args.headend, timeout_s=args.timeout
            )
        elif args.headend is None:
            raise EnrollUsageError("give --headend (the headend's https:// base URL)")
        else:
            summary = run_enroll(
                headend=args.headend,
                config_path=args.config,
                token=args.token,
                token_file=args.token_file,
                ca_file=args.ca_file,
                timeout_s=args.timeout,
            )
    except ConfigError as exc:
        print(f"dergw enroll: invalid config:\n{exc}", file=sys.stderr)
        return 2
    except EnrollUsageError as exc:
        print(f"dergw enroll: {exc}", file=sys.stderr)
        return 2
    except EnrollmentRefusedError as exc:
        print(f"dergw enroll: {exc}", file=sys.stderr)
        return 1
    except HeadendUnreachableError as exc:
        print(f"dergw enroll: cannot reach the headend: {exc}", file=sys.stderr)
        return 1
    except (IdentityError, OSError) as exc:
        print(f"dergw enroll: {exc}", file=sys.stderr)
        return 1
    print(summary)
    return 0

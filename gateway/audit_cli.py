"""`dergw audit verify|show`: check and read a gateway's audit log (read-only, safe while it runs).

    dergw audit verify (--config FILE | --db PATH) [--anchor SEQ:HEX]
        exit 0: intact (and reaching the anchor, if given); 1: tampered (which seq, what);
        2: usage error, or no readable audit log.
    dergw audit show (--config FILE | --db PATH) [--tail N]
        the records, oldest first (the last N with --tail), one per line.

The anchor is the head the headend received (ReportedState.audit_head; the headend's API shows
it as `audit_head_seq` and `audit_head_hash`); without one only the chain's own consistency is
checked, which does not catch a log rewritten consistently from an edited record onward.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

from gateway.audit import (
    AuditFileError,
    AuditHead,
    parse_anchor,
    read_records,
    verify_file,
)
from gateway.config import ConfigError, load_config

__all__ = ["AUDIT_FILE", "main"]

AUDIT_FILE = "audit.db"  # in the gateway's state_dir


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dergw audit", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("verify", "check the hash chain (and an anchored head)"),
        ("show", "list the records"),
    ):
        command = sub.add_parser(name, help=text)
        source = command.add_mutually_exclusive_group(required=True)
        source.add_argument("--config", type=Path, help="the gateway config (its state_dir)")
        source.add_argument("--db", type=Path, help="the audit file itself")
        if name == "verify":
            command.add_argument(
                "--anchor",
                type=_anchor,
                help="the head anchored upstream, SEQ:HEX (the headend's audit_head_seq:hash)",
            )
        else:
            command.add_argument("--tail", type=_positive, help="only the last N records")
    return parser


def _anchor(text: str) -> AuditHead:
    try:
        return parse_anchor(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _db_path(args: argparse.Namespace) -> Path:
    if args.db is not None:
        return Path(args.db)
    config = load_config(args.config)
    return Path(config.gateway.state_dir) / AUDIT_FILE


def _time(wall_ns: int) -> str:
    stamp = dt.datetime.fromtimestamp(wall_ns / 1e9, tz=dt.UTC)
    return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def main(argv: list[str]) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse exits on usage errors (2) and on --help (0)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        path = _db_path(args)
        if args.command == "verify":
            verdict = verify_file(path, args.anchor)
            print(f"{path}: {verdict.describe()}")
            if verdict.ok and args.anchor is None:
                print(
                    "(no --anchor: consistency only; pass the head the headend holds to detect a "
                    "log rewritten from an edit onward or cut short)"
                )
            elif verdict.ok:
                print(f"reaches the anchored head seq {args.anchor.seq}")
            return 0 if verdict.ok else 1
        records = list(read_records(path))
        for record in records[-args.tail :] if args.tail else records:
            print(
                f"{record.seq:>8} {_time(record.wall_ns)} {record.kind:<17} "
                f"{record.origin} {record.subject} {record.detail} {record.hash.hex()[:16]}"
            )
        return 0
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    except AuditFileError as exc:
        print(f"dergw audit: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # a row `show` cannot read: the log was tampered with
        print(f"dergw audit: {exc}", file=sys.stderr)
        return 1

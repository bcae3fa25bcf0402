"""`dergw metrics`: the running gateway's Prometheus metrics, from its local API socket.

Prints the text exposition, or with `--textfile FILE` writes it for node_exporter's textfile
collector: atomically (a temporary file in the same directory, then rename), so the collector
never reads a half-written file.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from pathlib import Path

from gateway.config import ConfigError, load_config
from gateway.localapi.client import LocalApiClient, LocalApiError

__all__ = ["main", "write_textfile"]

DEFAULT_SOCKET = "/run/dergw/dergw.sock"


def write_textfile(path: Path, text: str) -> None:
    """Replace `path` with `text` atomically (mode 0644: node_exporter runs as another user)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


async def _fetch(socket_path: str) -> str:
    async with await LocalApiClient.connect(socket_path) as api:
        return await api.metrics()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dergw metrics", description=__doc__)
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--socket", help=f"the gateway's local API socket (default {DEFAULT_SOCKET})"
    )
    where.add_argument(
        "--config", type=Path, help="gateway config: use its [local_api] socket instead"
    )
    parser.add_argument(
        "--textfile", type=Path, help="write to FILE atomically (node_exporter textfile)"
    )
    args = parser.parse_args(argv)
    socket_path = args.socket or DEFAULT_SOCKET
    if args.config is not None:
        try:
            config = load_config(args.config)
        except ConfigError as exc:
            print(exc, file=sys.stderr)
            return 1
        socket_path = str(config.local_api.socket_path(Path(config.gateway.state_dir)))
    try:
        text = asyncio.run(_fetch(socket_path))
    except (OSError, TimeoutError) as exc:
        print(
            f"dergw metrics: cannot reach the gateway at {socket_path}: {exc} "
            "(is it running? are you in the socket's group?)",
            file=sys.stderr,
        )
        return 1
    except LocalApiError as exc:
        print(f"dergw metrics: the gateway refused: {exc}", file=sys.stderr)
        return 1
    if args.textfile is None:
        sys.stdout.write(text)
    else:
        try:
            write_textfile(args.textfile, text)
        except OSError as exc:
            print(f"dergw metrics: cannot write {args.textfile}: {exc}", file=sys.stderr)
            return 1
    return 0

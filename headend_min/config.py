"""Headend configuration: listen endpoints, database location and link timing (pure parsing)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DEFAULT_DB_URL",
    "ConfigError",
    "Endpoint",
    "HeadendConfig",
    "parse_db_url",
    "parse_endpoint",
]

DEFAULT_DB_URL = "sqlite:///./var/headend.sqlite3"


class ConfigError(ValueError):
    """A command-line value the headend cannot use; the message says what to write instead."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_endpoint(text: str, *, flag: str) -> Endpoint:
    """'HOST:PORT' (IPv6 as '[::1]:PORT'); port 0 means 'any free port'."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"{flag} {text!r}: expected HOST:PORT, e.g. 127.0.0.1:8080")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"{flag} {text!r}: port must be 0..65535 (0 = any free port)")
    return Endpoint(host, port)


def parse_db_url(text: str) -> Path:
    """Database location -> SQLite file path.

    Accepts `sqlite:///relative/path`, `sqlite:////absolute/path` and a plain path. PostgreSQL
    URLs are recognised and refused with a clear message until that store exists.
    """
    if text.startswith(("postgresql://", "postgres://", "postgresql+psycopg://")):
        raise ConfigError(
            f"--db {text!r}: the PostgreSQL store is not implemented yet; "
            "use sqlite:///PATH or a plain file path"
        )
    if text.startswith("sqlite:"):
        prefix = "sqlite:///"
        if not text.startswith(prefix) or len(text) == len(prefix):
            raise ConfigError(
                f"--db {text!r}: write sqlite:///relative/path or sqlite:////absolute/path"
            )
        return Path(text[len(prefix) :])
    if "://" in text:
        raise ConfigError(f"--db {text!r}: unsupported scheme; use sqlite:///PATH or a file path")
    if not text:
        raise ConfigError("--db is empty; use sqlite:///PATH or a file path")
    return Path(text)


@dataclass(frozen=True, slots=True)
class HeadendConfig:
    grpc: Endpoint = Endpoint("127.0.0.1", 50051)
    http: Endpoint = Endpoint("127.0.0.1", 8080)
    db_path: Path = Path("./var/headend.sqlite3")
    # HTTP/2 keepalive of the gateway link. Presence follows from it: an open stream refreshes
    # last_seen every keepalive/2, and a row whose last_seen is older than 2 x keepalive reads
    # as offline (the stream died with its headend, or the network is gone).
    keepalive_s: float = 20.0

    @property
    def presence_interval_s(self) -> float:
        return self.keepalive_s / 2

    @property
    def stale_after_s(self) -> float:
        return self.keepalive_s * 2

"""Headend configuration: listen endpoints, database location and link timing (pure parsing)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

__all__ = [
    "DEFAULT_DB_URL",
    "SIGNING_KEY_FILE",
    "ConfigError",
    "DatabaseLocation",
    "Endpoint",
    "HeadendConfig",
    "PostgresUrl",
    "default_signing_key_path",
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


_PG_SCHEMES = ("postgresql://", "postgres://", "postgresql+psycopg://")


@dataclass(frozen=True, slots=True)
class PostgresUrl:
    """A PostgreSQL connection URL (libpq syntax); str() never shows the password."""

    url: str

    def __str__(self) -> str:
        parts = urlsplit(self.url)
        if parts.password is None:
            return self.url
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        return urlunsplit(parts._replace(netloc=netloc))

    def __repr__(self) -> str:
        return f"PostgresUrl({str(self)!r})"


# A SQLite file, or a PostgreSQL database shared by any number of headend instances.
DatabaseLocation = Path | PostgresUrl


def parse_db_url(text: str) -> DatabaseLocation:
    """Database location -> SQLite file path or PostgreSQL URL.

    Accepts `sqlite:///relative/path`, `sqlite:////absolute/path`, a plain path, and
    `postgresql://[USER[:PASSWORD]@]HOST[:PORT]/DBNAME[?PARAM=VALUE...]` (also `postgres://`
    and SQLAlchemy's `postgresql+psycopg://`).
    """
    if text.startswith(_PG_SCHEMES):
        url = "postgresql://" + text.split("://", 1)[1]
        parts = urlsplit(url)
        try:
            parts.port  # noqa: B018  # raises on a malformed port
        except ValueError:
            raise ConfigError(f"--db {text!r}: the port is not a number") from None
        if not parts.path.strip("/"):
            raise ConfigError(
                f"--db {text!r}: name the database, e.g. postgresql://USER@HOST:5432/dergw"
            )
        return PostgresUrl(url)
    if text.startswith("sqlite:"):
        prefix = "sqlite:///"
        if not text.startswith(prefix) or len(text) == len(prefix):
            raise ConfigError(
                f"--db {text!r}: write sqlite:///relative/path or sqlite:////absolute/path"
            )
        return Path(text[len(prefix) :])
    if "://" in text:
        raise ConfigError(
            f"--db {text!r}: unsupported scheme; use sqlite:///PATH, a file path or "
            "postgresql://USER@HOST:PORT/DBNAME"
        )
    if not text:
        raise ConfigError("--db is empty; use sqlite:///PATH or a file path")
    return Path(text)


SIGNING_KEY_FILE = "intent-signing-key.pem"


def default_signing_key_path(db_path: DatabaseLocation) -> Path:
    """`intent-signing-key.pem` next to a SQLite database. PostgreSQL has no default: every
    instance on the database must sign with the same key, so each must be given its file."""
    if isinstance(db_path, PostgresUrl):
        raise ConfigError(
            f"--db {db_path} needs --signing-key FILE: every headend instance on a shared "
            "database signs intents with the same key (copy one key file to each instance)"
        )
    return db_path.parent / SIGNING_KEY_FILE


@dataclass(frozen=True, slots=True)
class HeadendConfig:
    grpc: Endpoint = Endpoint("127.0.0.1", 50051)
    http: Endpoint = Endpoint("127.0.0.1", 8080)
    # A SQLite file, or a PostgresUrl (see parse_db_url).
    db_path: DatabaseLocation = Path("./var/headend.sqlite3")
    # HTTP/2 keepalive of the gateway link. Presence follows from it: an open stream refreshes
    # last_seen every keepalive/2, and a row whose last_seen is older than 2 x keepalive reads
    # as offline (the stream died with its headend, or the network is gone).
    keepalive_s: float = 20.0
    # Admission of new gateway sessions (token bucket): a fleet reconnecting at once after a
    # headend restart is spread out with RetryAfter instead of flattening the headend.
    admission_rate_per_s: float = 200.0
    admission_burst: int = 400
    # Pace of each gateway's backlog resend, records/s (0 = the gateway's own setting).
    backlog_records_per_s: int = 0
    # MQTT broker through which the headend also serves gateways (None = gRPC only). Several
    # instances split the gateways' messages with one shared subscription group.
    mqtt: Endpoint | None = None
    mqtt_share_group: str = "dergw-headend"
    # Bootstrap admin API token (headend_min.auth): the token in this file is ensured at start,
    # or a new one is minted and written here (0600) when the file does not exist.
    admin_token_file: Path | None = None
    # The Ed25519 key intents are signed with (headend_min.signing); created if missing. None =
    # `default_signing_key_path(db_path)`: next to a SQLite database; required for PostgreSQL.
    signing_key: Path | None = None
    # Accept-by time of a signed intent (not an execution limit): 24 h after it was sent.
    intent_validity_s: float = 24 * 3600.0
    # TLS on (gRPC with client certificates, HTTPS, enrollment, MQTT over TLS): the directory
    # of the headend CA (ca.key, ca.pem) and the certificates issued from it at start. None =
    # plaintext, the local development mode.
    tls_dir: Path | None = None
    # Further names (DNS or IP) gateways dial the headend by, for its TLS certificate: the
    # listen hosts, localhost and 127.0.0.1 are always in it (a wildcard listen host is not).
    tls_hosts: tuple[str, ...] = ()

    def signing_key_path(self) -> Path:
        """The signing key file to use; raises ConfigError when there is no default."""
        if self.signing_key is not None:
            return self.signing_key
        return default_signing_key_path(self.db_path)

    @property
    def presence_interval_s(self) -> float:
        return self.keepalive_s / 2

    @property
    def stale_after_s(self) -> float:
        return self.keepalive_s * 2

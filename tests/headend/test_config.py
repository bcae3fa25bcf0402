"""Parsing of listen endpoints and database locations."""

from __future__ import annotations

from pathlib import Path

import pytest

from headend_min.config import ConfigError, Endpoint, PostgresUrl, parse_db_url, parse_endpoint


def test_endpoints() -> None:
    assert parse_endpoint("127.0.0.1:0", flag="--grpc") == Endpoint("127.0.0.1", 0)
    assert parse_endpoint("[::1]:8080", flag="--http") == Endpoint("::1", 8080)
    assert str(Endpoint("::1", 8080)) == "[::1]:8080"
    for bad in ("8080", ":8080", "host:port", "host:70000"):
        with pytest.raises(ConfigError, match="--grpc"):
            parse_endpoint(bad, flag="--grpc")


def test_db_urls() -> None:
    assert parse_db_url("sqlite:///./var/headend.sqlite3") == Path("./var/headend.sqlite3")
    assert parse_db_url("sqlite:////tmp/h.db") == Path("/tmp/h.db")
    assert parse_db_url("/tmp/h.db") == Path("/tmp/h.db")
    assert parse_db_url("h.db") == Path("h.db")
    assert parse_db_url("postgres://u:pw@db:6432/headend") == PostgresUrl(
        "postgresql://u:pw@db:6432/headend"
    )
    assert str(parse_db_url("postgresql://u:pw@db/headend")) == "postgresql://u:***@db/headend"
    for bad in ("sqlite://h.db", "mysql://x", "", "postgresql://db/", "postgresql://db:x/h"):
        with pytest.raises(ConfigError):
            parse_db_url(bad)

"""Tests of headend_min: pure logic, the SQLite store, the gRPC link, the HTTP API, the CLI."""

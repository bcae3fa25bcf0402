"""Benchmarks held to ARCHITECTURE.md's budgets: `dergw bench` (bench.cli) runs what
bench.registry lists; bench.core is what a benchmark reports."""

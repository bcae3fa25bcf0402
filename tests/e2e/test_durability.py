"""Nothing acknowledged is lost: kill -9 of the gateway, twice, while telemetry flows during a
headend outage; afterwards the headend holds every record that was committed to the outbox,
exactly once (gap-free seq 1..N, deduped on (gateway_id, seq))."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from gateway.clock import SystemClock
from gateway.outbox import Outbox
from tests.e2e.conftest import BenchFactory, started, wait_api

pytestmark = pytest.mark.hil  # real processes and sockets on loopback

RECORD_TABLES = (
    "samples",
    "event_responses",
    "intent_statuses",
    "reported_states",
    "decisions",
    "flexibility",
    "unknown_records",
    "gaps",
    "clock_syncs",
)


def _outbox_stats(state_dir: Path) -> tuple[int, int]:
    """(highest committed seq, rows still unacknowledged) of a stopped gateway's outbox."""
    with Outbox(state_dir / "outbox.sqlite3", clock=SystemClock()) as outbox:
        stats = outbox.stats()
    return stats.next_seq - 1, stats.rows


def _headend_seqs(db_path: Path, gateway_id: str) -> list[int]:
    union = " UNION ALL ".join(f"SELECT seq FROM {t} WHERE gateway_id = ?" for t in RECORD_TABLES)
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as conn:
        rows = conn.execute(
            f"SELECT seq FROM ({union}) ORDER BY seq", (gateway_id,) * len(RECORD_TABLES)
        )
        return [row[0] for row in rows]


async def test_kill9_twice_during_an_outage_loses_nothing_and_duplicates_nothing(
    bench_factory: BenchFactory,
) -> None:
    async with bench_factory("twelve.toml", poll_period_s=0.2) as bench:
        await started(bench)
        assert bench.gateway is not None
        assert bench.headend is not None
        state_dir = bench.workdir / "gateway-state"
        await wait_api(
            bench,
            f"/gateways/{bench.gateway_id}",
            lambda g: g["committed_seq"] >= 50,
            what="telemetry flowing",
        )
        committed_at_kill = 0
        for _ in range(2):
            await bench.headend.stop()
            await asyncio.sleep(2.0)  # the outage itself: the outbox accumulates a backlog
            await bench.gateway.kill()  # kill -9 while polling and committing
            committed_at_kill, backlog = await asyncio.to_thread(_outbox_stats, state_dir)
            assert backlog > 0, "the kill should find unacknowledged rows in the outbox"
            await bench.start_gateway()
            await asyncio.sleep(1.0)  # the restarted gateway runs offline for a while
            await bench.restart_headend()
            await wait_api(
                bench,
                f"/gateways/{bench.gateway_id}",
                lambda g: g["online"],
                timeout_s=30,
                what="gateway back online",
            )

        gateway = await wait_api(
            bench,
            f"/gateways/{bench.gateway_id}",
            lambda g: g["committed_seq"] >= committed_at_kill,
            timeout_s=30,
            what=f"headend committed everything up to seq {committed_at_kill}",
        )
        seqs = await asyncio.to_thread(
            _headend_seqs, bench.workdir / "headend.sqlite3", bench.gateway_id
        )
        top = gateway["committed_seq"]
        held = [s for s in seqs if s <= top]
        # Every record committed to the outbox before each kill is there, exactly once.
        assert held[0] == 1
        assert held == list(range(1, top + 1)), "gap or duplicate in the headend's seqs"
        assert top >= committed_at_kill

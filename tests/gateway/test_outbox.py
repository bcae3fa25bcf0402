"""The outbox: gap-free seq, ack semantics, persistence, kill -9 durability, throughput figure."""

from __future__ import annotations

import os
import queue
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from dergw.v1 import pb, timestamp_from_ns
from gateway.clock import ManualClock, SystemClock
from gateway.outbox import (
    ROW_OVERHEAD_BYTES,
    AckBeyondHeadError,
    Outbox,
    OutboxClosedError,
    OutboxLockedError,
    OutboxNotEmptyError,
    OutboxRow,
    OutboxSchemaError,
    OutboxStats,
    RecordKind,
)

SAMPLE = int(RecordKind.SAMPLE)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "outbox.sqlite3"


@pytest.fixture
def outbox(path: Path, clock: ManualClock) -> Iterator[Outbox]:
    with Outbox(path, clock=clock) as ob:
        yield ob


def _batch(n: int, tag: str = "r") -> list[tuple[int, bytes]]:
    return [(SAMPLE, f"{tag}{i}".encode()) for i in range(n)]


def _stats(
    rows: int, oldest: int | None, next_seq: int, payload: int, created: int | None
) -> OutboxStats:
    """Stats of an outbox without a quota: held bytes are the payload plus the per-row overhead."""
    return OutboxStats(
        rows, oldest, next_seq, payload, created, held_bytes=payload + ROW_OVERHEAD_BYTES * rows
    )


def _meta(path: Path, key: str) -> int:
    with closing(sqlite3.connect(path)) as conn:
        return int(
            conn.execute("SELECT value FROM outbox_meta WHERE key = ?", (key,)).fetchone()[0]
        )


# -- basics ---------------------------------------------------------------------------------------


def test_record_kinds_are_the_record_oneof_field_numbers() -> None:
    fields = {f.name: f.number for f in pb.Record.DESCRIPTOR.oneofs_by_name["body"].fields}
    assert {kind.name.lower(): kind.value for kind in RecordKind} == fields


def test_append_assigns_consecutive_seqs_from_one(outbox: Outbox, clock: ManualClock) -> None:
    assert outbox.append(_batch(3)) == range(1, 4)
    clock.advance(1.5)
    assert outbox.append([(int(RecordKind.DECISION), b"d")]) == range(4, 5)
    rows = outbox.read_after(0, 100)
    assert [r.seq for r in rows] == [1, 2, 3, 4]
    assert rows[0] == OutboxRow(
        seq=1, kind=SAMPLE, payload=b"r0", created_wall_ns=rows[0].created_wall_ns
    )
    assert rows[3].kind == RecordKind.DECISION
    assert rows[3].created_wall_ns - rows[0].created_wall_ns == 1_500_000_000


def test_empty_batch_writes_nothing(outbox: Outbox) -> None:
    assert outbox.append([]) == range(1, 1)
    outbox.append(_batch(2))
    assert outbox.append([]) == range(3, 3)
    assert outbox.stats().next_seq == 3


def test_read_after_pages_oldest_first(outbox: Outbox) -> None:
    outbox.append(_batch(10))
    assert [r.seq for r in outbox.read_after(0, 4)] == [1, 2, 3, 4]
    assert [r.seq for r in outbox.read_after(4, 4)] == [5, 6, 7, 8]
    assert [r.seq for r in outbox.read_after(8, 4)] == [9, 10]
    assert outbox.read_after(10, 4) == []
    with pytest.raises(ValueError, match="limit"):
        outbox.read_after(0, 0)


def test_bad_kind_or_payload_appends_nothing(outbox: Outbox) -> None:
    with pytest.raises(ValueError, match="record kind 99"):
        outbox.append([(SAMPLE, b"ok"), (99, b"bad")])
    with pytest.raises(TypeError, match="bytes"):
        outbox.append([(SAMPLE, "text")])  # type: ignore[list-item]
    assert outbox.stats() == OutboxStats(0, None, 1, 0, None)


def test_stats(outbox: Outbox, clock: ManualClock) -> None:
    first_wall = clock.wall_ns()
    outbox.append([(SAMPLE, b"abc"), (SAMPLE, b"defg")])
    clock.advance(2)
    outbox.append([(SAMPLE, b"x" * 10)])
    assert outbox.stats() == _stats(3, 1, 4, 17, first_wall)
    outbox.ack(2)
    assert outbox.stats() == _stats(1, 3, 4, 10, first_wall + 2_000_000_000)


# -- ack ------------------------------------------------------------------------------------------


def test_ack_deletes_up_to_and_including(outbox: Outbox) -> None:
    outbox.append(_batch(5))
    assert outbox.ack(3) == 3
    assert [r.seq for r in outbox.read_after(0, 10)] == [4, 5]
    assert outbox.ack(3) == 0  # repeated ack
    assert outbox.ack(1) == 0  # late, older ack
    assert outbox.ack(0) == 0
    assert outbox.ack(5) == 2
    assert outbox.stats().rows == 0


def test_ack_beyond_head_raises_and_deletes_nothing(outbox: Outbox) -> None:
    outbox.append(_batch(3))
    with pytest.raises(AckBeyondHeadError, match=r"up to seq 4 .* below 4"):
        outbox.ack(4)
    assert outbox.stats().rows == 3
    outbox.ack(3)
    with pytest.raises(AckBeyondHeadError):
        outbox.ack(10)  # even when empty: the headend claims seqs we never assigned
    with pytest.raises(ValueError, match=">= 0"):
        outbox.ack(-1)


def test_ack_on_fresh_outbox_beyond_zero_raises(outbox: Outbox) -> None:
    assert outbox.ack(0) == 0
    with pytest.raises(AckBeyondHeadError):
        outbox.ack(1)


# -- persistence ----------------------------------------------------------------------------------


def test_rows_and_seq_survive_reopen(path: Path, clock: ManualClock) -> None:
    with Outbox(path, clock=clock) as ob:
        ob.append(_batch(4, "a"))
        ob.ack(1)
    with Outbox(path, clock=clock) as ob:
        assert [(r.seq, r.payload) for r in ob.read_after(0, 10)] == [
            (2, b"a1"),
            (3, b"a2"),
            (4, b"a3"),
        ]
        assert ob.stats() == _stats(3, 2, 5, 6, clock.wall_ns())
        assert ob.append(_batch(1)) == range(5, 6)


def test_seq_never_goes_backwards_after_everything_was_acked(
    path: Path, clock: ManualClock
) -> None:
    with Outbox(path, clock=clock) as ob:
        ob.append(_batch(7))
        ob.ack(7)
        assert ob.stats().rows == 0
    with Outbox(path, clock=clock) as ob:
        assert ob.stats() == OutboxStats(0, None, 8, 0, None)
        assert ob.append(_batch(1)) == range(8, 9)


def test_fast_forward(path: Path, clock: ManualClock) -> None:
    with Outbox(path, clock=clock) as ob:
        ob.fast_forward(1000)
        assert ob.stats().next_seq == 1000
        ob.fast_forward(10)  # never lowers
        assert ob.stats().next_seq == 1000
        assert ob.append(_batch(2)) == range(1000, 1002)
        with pytest.raises(OutboxNotEmptyError, match="2 unacknowledged rows"):
            ob.fast_forward(5000)
        ob.fast_forward(1001)  # not above next_seq: a no-op, allowed even when not empty
        ob.ack(1001)
        ob.fast_forward(5000)
    with Outbox(path, clock=clock) as ob:
        assert ob.stats().next_seq == 5000
        with pytest.raises(ValueError, match="storable"):
            ob.fast_forward(2**63)


def test_read_after_makes_shipped_rows_durable_once(path: Path, clock: ManualClock) -> None:
    # Each durable sync bumps a counter in the same FULL commit; rows already synced cost nothing.
    with Outbox(path, clock=clock) as ob:
        ob.append(_batch(3))
        ob.read_after(0, 2)
        ob.read_after(2, 2)
        ob.read_after(0, 3)
        assert ob.read_after(3, 10) == []
    assert _meta(path, "durable_syncs") == 1
    with Outbox(path, clock=clock) as ob:
        ob.append(_batch(1))
        ob.read_after(3, 10)
        ob.read_after(3, 10)
    assert _meta(path, "durable_syncs") == 2


def test_pragmas(outbox: Outbox) -> None:
    conn = outbox._conn
    assert conn is not None
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    outbox.append(_batch(1))
    outbox.read_after(0, 1)  # the durable commit switches to FULL and back
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1


# -- lifecycle and errors -------------------------------------------------------------------------


def test_closed_outbox_raises(path: Path, clock: ManualClock) -> None:
    ob = Outbox(path, clock=clock)
    ob.close()
    ob.close()  # idempotent
    with pytest.raises(OutboxClosedError, match="closed"):
        ob.append(_batch(1))
    with pytest.raises(OutboxClosedError):
        ob.stats()


def test_second_opener_is_refused(outbox: Outbox, path: Path, clock: ManualClock) -> None:
    with pytest.raises(OutboxLockedError, match="same state_dir"):
        Outbox(path, clock=clock)


def test_second_process_is_refused(outbox: Outbox, path: Path) -> None:
    code = (
        "import sys; from pathlib import Path\n"
        "from gateway.clock import SystemClock\n"
        "from gateway.outbox import Outbox, OutboxLockedError\n"
        "try:\n"
        "    Outbox(Path(sys.argv[1]), clock=SystemClock())\n"
        "except OutboxLockedError:\n"
        "    sys.exit(3)\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(path)], timeout=30, check=False)
    assert result.returncode == 3


def test_not_a_database(path: Path, clock: ManualClock) -> None:
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(OutboxSchemaError, match="not a SQLite database"):
        Outbox(path, clock=clock)


def test_unknown_schema_version(path: Path, clock: ManualClock) -> None:
    Outbox(path, clock=clock).close()
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("PRAGMA user_version=99")
    with pytest.raises(OutboxSchemaError, match="schema version 99"):
        Outbox(path, clock=clock)


def test_tampered_next_seq_is_refused(path: Path, clock: ManualClock) -> None:
    with Outbox(path, clock=clock) as ob:
        ob.append(_batch(5))
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("UPDATE outbox_meta SET value = 3 WHERE key = 'next_seq'")
    with pytest.raises(OutboxSchemaError, match="never be reused"):
        Outbox(path, clock=clock)


def test_threads_get_disjoint_gap_free_ranges(outbox: Outbox) -> None:
    ranges: list[range] = []
    lock = threading.Lock()

    def writer() -> None:
        for _ in range(50):
            got = outbox.append(_batch(7))
            with lock:
                ranges.append(got)

    def acker() -> None:
        for _ in range(50):
            head = outbox.stats().next_seq - 1
            outbox.ack(head // 2)

    threads = [threading.Thread(target=writer) for _ in range(4)] + [threading.Thread(target=acker)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    seqs = sorted(s for r in ranges for s in r)
    assert seqs == list(range(1, 4 * 50 * 7 + 1))
    stats = outbox.stats()
    assert stats.next_seq == seqs[-1] + 1
    held = [r.seq for r in outbox.read_after(0, 10_000)]
    assert held == list(range(held[0], stats.next_seq))


# -- model-based: any sequence of operations keeps seq gap-free and monotonic --------------------


class OutboxMachine(RuleBasedStateMachine):
    """Outbox vs. a dict model, through appends, acks, reads, fast-forwards and reopens."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.TemporaryDirectory()
        self.path = Path(self.dir.name) / "outbox.sqlite3"
        self.clock = ManualClock()
        self.ob = Outbox(self.path, clock=self.clock)
        self.rows: dict[int, tuple[int, bytes]] = {}
        self.next_seq = 1
        self.max_seq_ever = 0

    @rule(
        items=st.lists(
            st.tuples(st.sampled_from([int(k) for k in RecordKind]), st.binary(max_size=40)),
            max_size=30,
        )
    )
    def append(self, items: list[tuple[int, bytes]]) -> None:
        got = self.ob.append(items)
        assert got == range(self.next_seq, self.next_seq + len(items))
        for seq, item in zip(got, items, strict=True):
            self.rows[seq] = item
        self.next_seq += len(items)

    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        up_to = data.draw(st.integers(0, self.next_seq - 1))
        expected = [s for s in self.rows if s <= up_to]
        assert self.ob.ack(up_to) == len(expected)
        for s in expected:
            del self.rows[s]

    @rule(beyond=st.integers(0, 5))
    def ack_beyond_head(self, beyond: int) -> None:
        with pytest.raises(AckBeyondHeadError):
            self.ob.ack(self.next_seq + beyond)

    @rule(data=st.data())
    def read(self, data: st.DataObject) -> None:
        after = data.draw(st.integers(0, self.next_seq))
        limit = data.draw(st.integers(1, 50))
        expected = sorted(s for s in self.rows if s > after)[:limit]
        got = self.ob.read_after(after, limit)
        assert [r.seq for r in got] == expected
        assert [(r.kind, r.payload) for r in got] == [self.rows[s] for s in expected]

    @rule(jump=st.integers(0, 1000))
    def fast_forward(self, jump: int) -> None:
        target = self.next_seq + jump
        if self.rows and jump > 0:
            with pytest.raises(OutboxNotEmptyError):
                self.ob.fast_forward(target)
        else:
            self.ob.fast_forward(target)
            self.next_seq = target

    @rule()
    def reopen(self) -> None:
        self.ob.close()
        self.ob = Outbox(self.path, clock=self.clock)

    @precondition(lambda self: bool(self.rows))
    @rule()
    def drain_all(self) -> None:
        assert self.ob.ack(self.next_seq - 1) == len(self.rows)
        self.rows.clear()

    @invariant()
    def matches_model(self) -> None:
        stats = self.ob.stats()
        assert stats.next_seq == self.next_seq
        assert stats.rows == len(self.rows)
        assert stats.payload_bytes == sum(len(p) for _, p in self.rows.values())
        assert stats.oldest_seq == (min(self.rows) if self.rows else None)
        # Held rows are always one consecutive run; next_seq never decreases.
        if self.rows:
            assert sorted(self.rows) == list(range(min(self.rows), max(self.rows) + 1))
        assert stats.next_seq > self.max_seq_ever
        self.max_seq_ever = max(self.max_seq_ever, stats.next_seq - 1)

    def teardown(self) -> None:
        self.ob.close()
        self.dir.cleanup()


TestOutboxModel = OutboxMachine.TestCase
TestOutboxModel.settings = settings(
    max_examples=30,
    stateful_step_count=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# -- kill -9 --------------------------------------------------------------------------------------

_WRITER = """
import sys
from pathlib import Path
from gateway.clock import SystemClock
from gateway.outbox import Outbox

ob = Outbox(Path(sys.argv[1]), clock=SystemClock())
print("ready", flush=True)
batch = 0
while True:
    items = [(2, b"b%d-r%d" % (batch, i) + b"x" * 200) for i in range(100)]
    got = ob.append(items)
    print(batch, got.start, got.stop, flush=True)
    batch += 1
"""


def _lines(proc: subprocess.Popen[str]) -> tuple[queue.Queue[str], threading.Thread]:
    """The child's stdout lines, as a queue (so that the test can wait with a deadline)."""
    out: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            # A line without its newline was cut by the SIGKILL mid-print: it proves nothing.
            if line.endswith("\n"):
                out.put(line.strip())

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return out, thread


def _parse(line: str) -> tuple[int, int, int]:
    batch, start, stop = map(int, line.split())
    return batch, start, stop


@pytest.mark.parametrize("acked_batches", [0, 3])
def test_kill_9_loses_nothing_committed(path: Path, acked_batches: int) -> None:
    if acked_batches:
        # A pre-existing, partly acked outbox: the child must continue its seqs.
        with Outbox(path, clock=SystemClock()) as ob:
            ob.append(_batch(100 * acked_batches))
            ob.ack(100 * acked_batches - 10)
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True
    )
    lines, pump = _lines(proc)
    printed: list[tuple[int, int, int]] = []
    try:
        deadline = time.monotonic() + 20
        assert lines.get(timeout=20) == "ready"
        while len(printed) < 40:
            printed.append(_parse(lines.get(timeout=max(0.1, deadline - time.monotonic()))))
        os.kill(proc.pid, signal.SIGKILL)  # mid-stream: the child never pauses between commits
        proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=20)
    assert proc.returncode == -signal.SIGKILL
    pump.join(timeout=20)
    while not lines.empty():  # ranges printed after we stopped counting are committed too
        line = lines.get_nowait()
        if line:
            printed.append(_parse(line))

    with Outbox(path, clock=SystemClock()) as ob:
        rows = ob.read_after(0, 1_000_000)
        stats = ob.stats()
    by_seq = {r.seq: r.payload for r in rows}
    first_child_seq = 100 * acked_batches + 1
    assert printed[0][1] == first_child_seq
    for batch, start, stop in printed:
        for i, seq in enumerate(range(start, stop)):
            assert by_seq[seq].startswith(b"b%d-r%d" % (batch, i)), f"seq {seq} lost"
    # No gaps: held rows are consecutive, and next_seq follows the last one (a batch committed
    # after the last print may be present too, but nothing half-written).
    seqs = sorted(by_seq)
    assert seqs == list(range(seqs[0], seqs[-1] + 1))
    assert stats.next_seq == seqs[-1] + 1
    assert (stats.next_seq - first_child_seq) % 100 == 0
    assert stats.next_seq >= printed[-1][2]


# -- throughput figure (printed, not asserted) ----------------------------------------------------


def _sample_payload(points: int) -> bytes:
    sample = pb.DeviceSample(
        device_id="pv-1",
        time=timestamp_from_ns(1_700_000_000_000_000_000),
        monotonic_ns=123_456_789,
        names=[f"point_{i}" for i in range(points)],
        units=["W"] * points,
        values=[1234.5 + i for i in range(points)],
        quality=[pb.QUALITY_GOOD] * points,
    )
    return sample.SerializeToString()


def test_throughput_figure(
    tmp_path: Path,
    record_property: Callable[[str, object], None],
    capsys: pytest.CaptureFixture[str],
) -> None:
    points_per_row, batch_rows, batches = 50, 500, 40
    payload = _sample_payload(points_per_row)
    items = [(SAMPLE, payload)] * batch_rows
    with Outbox(tmp_path / "bench.sqlite3", clock=SystemClock()) as ob:
        t0 = time.perf_counter()
        for _ in range(batches):
            ob.append(items)
        t1 = time.perf_counter()
        after = 0
        while rows := ob.read_after(after, batch_rows):
            after = rows[-1].seq
            ob.ack(after)
        t2 = time.perf_counter()
        assert ob.stats().rows == 0
    total_rows = batch_rows * batches
    append_rows_s = total_rows / (t1 - t0)
    drain_rows_s = total_rows / (t2 - t1)
    record_property("outbox_append_rows_per_s", round(append_rows_s))
    record_property("outbox_append_points_per_s", round(append_rows_s * points_per_row))
    record_property("outbox_drain_rows_per_s", round(drain_rows_s))
    with capsys.disabled():
        print(
            f"\noutbox ({len(payload)} B DeviceSample rows of {points_per_row} points, "
            f"batches of {batch_rows}): append {append_rows_s:,.0f} rows/s = "
            f"{append_rows_s * points_per_row:,.0f} points/s; drain (read_after + ack) "
            f"{drain_rows_s:,.0f} rows/s = {drain_rows_s * points_per_row:,.0f} points/s"
        )

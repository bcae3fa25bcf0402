"""The intent store: strictly monotonic versions, one site, persisted event state, kill -9."""

from __future__ import annotations

import os
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dergw.v1 import pb
from gateway.clock import ManualClock, SystemClock
from gateway.intent_store import (
    EventState,
    IntentSiteMismatchError,
    IntentStore,
    IntentStoreClosedError,
    IntentStoreLockedError,
    IntentStoreSchemaError,
    OfferResult,
    StoredIntent,
)

SITE = "site-a"


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "intent.sqlite3"


@pytest.fixture
def store(path: Path, clock: ManualClock) -> Iterator[IntentStore]:
    with IntentStore(path, clock=clock) as s:
        yield s


def _state(start: int = 0, duration: int = 0, response: int = 0, wall: int = 1) -> EventState:
    return EventState(
        drawn_start_offset_s=start,
        drawn_duration_offset_s=duration,
        last_response=response,
        updated_wall_ns=wall,
    )


# -- intents --------------------------------------------------------------------------------------


def test_offer_results_are_the_wire_ack_statuses() -> None:
    assert int(OfferResult.PERSISTED) == int(pb.INTENT_ACK_STATUS_PERSISTED)
    assert int(OfferResult.STALE) == int(pb.INTENT_ACK_STATUS_STALE)


def test_empty_store(store: IntentStore) -> None:
    assert store.current() is None
    assert store.history() == []
    assert store.all_event_states() == {}


def test_newer_versions_replace_older_ones(store: IntentStore, clock: ManualClock) -> None:
    t0 = clock.wall_ns()
    assert store.offer(SITE, 3, b"doc3") is OfferResult.PERSISTED
    assert store.current() == StoredIntent(SITE, 3, b"doc3", t0)
    clock.advance(5)
    assert store.offer(SITE, 10, b"doc10") is OfferResult.PERSISTED
    assert store.current() == StoredIntent(SITE, 10, b"doc10", t0 + 5_000_000_000)
    assert [i.version for i in store.history()] == [10, 3]


def test_stale_offers_change_nothing(store: IntentStore, clock: ManualClock) -> None:
    store.offer(SITE, 5, b"doc5")
    before = store.current()
    clock.advance(1)
    assert store.offer(SITE, 5, b"doc5") is OfferResult.STALE  # the same document again
    assert store.offer(SITE, 4, b"older") is OfferResult.STALE
    assert store.offer(SITE, 1, b"oldest") is OfferResult.STALE
    assert store.current() == before
    assert [i.version for i in store.history()] == [5]


def test_same_version_different_content_is_stale_and_logged(
    store: IntentStore, caplog: pytest.LogCaptureFixture
) -> None:
    store.offer(SITE, 5, b"doc5")
    assert store.offer(SITE, 5, b"something else") is OfferResult.STALE
    current = store.current()
    assert current is not None
    assert current.document == b"doc5"
    assert "re-offered with different content" in caplog.text


def test_other_site_is_rejected(store: IntentStore) -> None:
    store.offer(SITE, 2, b"doc")
    before = store.current()
    with pytest.raises(IntentSiteMismatchError, match=r"holds intents for site 'site-a'.*'site-b'"):
        store.offer("site-b", 99, b"other")
    assert store.current() == before
    assert [i.version for i in store.history()] == [2]


@pytest.mark.parametrize("version", [0, -1, 2**63])
def test_version_out_of_range(store: IntentStore, version: int) -> None:
    with pytest.raises(ValueError, match="version must be in"):
        store.offer(SITE, version, b"doc")
    assert store.current() is None


def test_bad_arguments(store: IntentStore) -> None:
    with pytest.raises(ValueError, match="site_id"):
        store.offer("", 1, b"doc")
    with pytest.raises(TypeError, match="bytes"):
        store.offer(SITE, 1, "doc")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="event_id"):
        store.set_event_state("", _state())
    with pytest.raises(ValueError, match="history_limit"):
        IntentStore(Path("unused"), clock=ManualClock(), history_limit=-1)


def test_largest_version_is_storable(store: IntentStore) -> None:
    assert store.offer(SITE, 2**63 - 1, b"max") is OfferResult.PERSISTED
    assert store.offer(SITE, 2**63 - 2, b"lower") is OfferResult.STALE


@pytest.mark.parametrize("limit", [0, 1, 3])
def test_history_is_bounded(path: Path, clock: ManualClock, limit: int) -> None:
    with IntentStore(path, clock=clock, history_limit=limit) as store:
        for version in range(1, 8):
            store.offer(SITE, version, b"v%d" % version)
        assert [i.version for i in store.history()] == list(range(7, 7 - limit - 1, -1))
        current = store.current()
        assert current is not None
        assert current.version == 7


def test_intents_survive_reopen(path: Path, clock: ManualClock) -> None:
    with IntentStore(path, clock=clock) as store:
        store.offer(SITE, 7, b"doc7")
    with IntentStore(path, clock=clock) as store:
        assert store.current() == StoredIntent(SITE, 7, b"doc7", clock.wall_ns())
        assert store.offer(SITE, 6, b"doc6") is OfferResult.STALE
        with pytest.raises(IntentSiteMismatchError):
            store.offer("site-b", 8, b"doc8")
        assert store.offer(SITE, 8, b"doc8") is OfferResult.PERSISTED


@settings(max_examples=40, deadline=None)
@given(
    offers=st.lists(
        st.tuples(st.integers(1, 12), st.binary(max_size=8), st.booleans()), max_size=15
    )
)
def test_any_offer_sequence_holds_the_max_version(
    tmp_path_factory: pytest.TempPathFactory, offers: list[tuple[int, bytes, bool]]
) -> None:
    path = tmp_path_factory.mktemp("intents") / "intent.sqlite3"
    clock = ManualClock()
    store = IntentStore(path, clock=clock)
    try:
        held: tuple[int, bytes] | None = None
        for version, document, reopen in offers:
            before = store.current()
            result = store.offer(SITE, version, document)
            if held is None or version > held[0]:
                assert result is OfferResult.PERSISTED
                held = (version, document)
            else:
                assert result is OfferResult.STALE
                assert store.current() == before  # stale offers change nothing at all
            current = store.current()
            assert current is not None
            assert (current.version, current.document) == held
            clock.advance(1)
            if reopen:
                store.close()
                store = IntentStore(path, clock=clock)
        versions = [i.version for i in store.history()]
        assert versions == sorted(set(versions), reverse=True)
    finally:
        store.close()


# -- event state ----------------------------------------------------------------------------------


def test_event_state_round_trip(store: IntentStore) -> None:
    assert store.get_event_state("ev-1") is None
    state = _state(start=-42, duration=17, response=pb.RESPONSE_STATUS_RECEIVED, wall=123)
    store.set_event_state("ev-1", state)
    assert store.get_event_state("ev-1") == state
    later = _state(start=-42, duration=17, response=pb.RESPONSE_STATUS_STARTED, wall=456)
    store.set_event_state("ev-1", later)
    assert store.get_event_state("ev-1") == later
    store.set_event_state("ev-2", _state())
    assert store.all_event_states() == {"ev-1": later, "ev-2": _state()}


def test_prune_event_states(store: IntentStore) -> None:
    for event_id in ("a", "b", "c", "d"):
        store.set_event_state(event_id, _state())
    assert store.prune_event_states(iter(["b", "d", "not-there"])) == 2
    assert set(store.all_event_states()) == {"b", "d"}
    assert store.prune_event_states(["b", "d"]) == 0
    assert store.prune_event_states([]) == 2
    assert store.all_event_states() == {}


def test_event_state_validation() -> None:
    with pytest.raises(ValueError, match="last_response"):
        _state(response=-1)


def test_event_states_survive_reopen(path: Path, clock: ManualClock) -> None:
    with IntentStore(path, clock=clock) as store:
        store.set_event_state("ev-1", _state(start=5, duration=-3, response=2, wall=99))
    with IntentStore(path, clock=clock) as store:
        assert store.all_event_states() == {"ev-1": _state(5, -3, 2, 99)}


# -- lifecycle and durability settings ------------------------------------------------------------


def test_full_synchronous_wal(store: IntentStore) -> None:
    conn = store._conn
    assert conn is not None
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_closed_store_raises(path: Path, clock: ManualClock) -> None:
    store = IntentStore(path, clock=clock)
    store.close()
    store.close()
    with pytest.raises(IntentStoreClosedError):
        store.offer(SITE, 1, b"doc")
    with pytest.raises(IntentStoreClosedError):
        store.all_event_states()


def test_second_opener_is_refused(store: IntentStore, path: Path, clock: ManualClock) -> None:
    with pytest.raises(IntentStoreLockedError, match="same state_dir"):
        IntentStore(path, clock=clock)


def test_not_a_database(path: Path, clock: ManualClock) -> None:
    path.write_bytes(b"garbage" * 200)
    with pytest.raises(IntentStoreSchemaError, match="not a SQLite database"):
        IntentStore(path, clock=clock)


def test_unknown_schema_version(path: Path, clock: ManualClock) -> None:
    IntentStore(path, clock=clock).close()
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("PRAGMA user_version=7")
    with pytest.raises(IntentStoreSchemaError, match="schema version 7"):
        IntentStore(path, clock=clock)


# -- kill -9 --------------------------------------------------------------------------------------

_OFFERER = """
import sys
from pathlib import Path
from gateway.clock import SystemClock
from gateway.intent_store import EventState, IntentStore, OfferResult

store = IntentStore(Path(sys.argv[1]), clock=SystemClock())
print("ready", flush=True)
version = 0
while True:
    version += 1
    assert store.offer("site-a", version, b"doc-%d" % version) is OfferResult.PERSISTED
    store.set_event_state("ev-%d" % version, EventState(version, -version, 1, version))
    print(version, flush=True)
"""


def test_kill_9_after_offer_returned_loses_nothing(path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _OFFERER, str(path)], stdout=subprocess.PIPE, text=True
    )
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.strip())

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    acked: list[int] = []
    try:
        deadline = time.monotonic() + 20
        assert lines.get(timeout=20) == "ready"
        while len(acked) < 25:
            acked.append(int(lines.get(timeout=max(0.1, deadline - time.monotonic()))))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=20)
    reader.join(timeout=20)
    while not lines.empty():
        line = lines.get_nowait()
        if line:
            acked.append(int(line))
    assert acked == list(range(1, len(acked) + 1))

    with IntentStore(path, clock=SystemClock()) as store:
        current = store.current()
        states = store.all_event_states()
    assert current is not None
    # Every version reported as persisted is there; at most one more (committed, not printed).
    assert current.version in (acked[-1], acked[-1] + 1)
    assert current.document == b"doc-%d" % current.version
    for version in acked:
        assert states[f"ev-{version}"] == EventState(version, -version, 1, version)


def test_a_version_1_store_is_upgraded_in_place(tmp_path: Path) -> None:
    # Written by dergw before event_states.withdrawn_mask existed: nothing held may be lost.
    path = tmp_path / "intent.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.executescript(
            """
            CREATE TABLE intents (version INTEGER PRIMARY KEY, site_id TEXT NOT NULL,
                document BLOB NOT NULL, received_wall_ns INTEGER NOT NULL);
            CREATE TABLE event_states (event_id TEXT PRIMARY KEY,
                drawn_start_offset_s INTEGER NOT NULL, drawn_duration_offset_s INTEGER NOT NULL,
                last_response INTEGER NOT NULL, updated_wall_ns INTEGER NOT NULL);
            INSERT INTO intents VALUES (4, 'site-a', x'0a01', 123);
            INSERT INTO event_states VALUES ('e1', 7, -3, 2, 456);
            PRAGMA user_version = 1;
            """
        )
    with IntentStore(path, clock=ManualClock()) as store:
        held = store.current()
        assert held is not None
        assert (held.site_id, held.version) == ("site-a", 4)
        assert store.get_event_state("e1") == EventState(7, -3, 2, 456, withdrawn_mask=0)
        store.set_event_state("e1", EventState(7, -3, 7, 789, withdrawn_mask=0b101))
    with IntentStore(path, clock=ManualClock()) as store:
        state = store.get_event_state("e1")
        assert state is not None
        assert state.withdrawn_mask == 0b101

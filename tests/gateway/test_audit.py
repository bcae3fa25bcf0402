"""The tamper-evident audit log: the chain, the verifier against edits, gaps, truncation and a
consistently re-hashed forgery (CVE-2023-31439's kind), durability under kill -9, the CLI, and
the control loop's records of its writes and overrides.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dergw.v1 import pb
from drivers import registry
from gateway import audit as audit_module
from gateway.audit import (
    GENESIS_PREV,
    AuditHead,
    AuditKind,
    AuditLog,
    AuditProblem,
    AuditRecord,
    chain,
    parse_anchor,
    read_records,
    record_bytes,
    record_hash,
    verify_chain,
    verify_file,
)
from gateway.clock import ManualClock
from gateway.config import GatewayConfig
from gateway.intent import NS_PER_S, Controls
from gateway.intent_store import IntentStore
from gateway.outbox import Outbox, RecordKind
from gateway.runtime.control import ControlLoop
from gateway.runtime.recorder import Recorder
from gateway.snapshot import DeviceSlot, SiteSnapshot
from headend_min.model import ReportedStateRecord
from headend_min.schemas import ReportedStateOut
from tests.gateway.fakes import MemoryDriver, MemoryParams
from tests.support import async_wait_until

REPO = Path(__file__).resolve().parents[2]
T0 = 1_800_000_000 * NS_PER_S


def _log(path: Path, n: int, clock: ManualClock | None = None) -> AuditLog:
    clock = clock or ManualClock(wall_ns=T0)
    audit = AuditLog(path, clock=clock)
    for i in range(n):
        clock.advance(1.0)
        audit.append(
            AuditKind.DEVICE_WRITE, "control-loop", f"pv{i % 3}", {"i": i, "cap_w": 100 * i}
        )
    assert audit.flush()
    return audit


def _sql(path: Path, *statements: tuple[str, tuple[Any, ...]]) -> None:
    """An attacker with file access: drops the append-only guards and edits rows directly."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("DROP TRIGGER IF EXISTS audit_no_update")
        conn.execute("DROP TRIGGER IF EXISTS audit_no_delete")
        for statement, params in statements:
            conn.execute(statement, params)
    finally:
        conn.close()


# -- the encoding and the pure verifier -----------------------------------------------------------


def test_record_bytes_is_length_prefixed_and_unambiguous() -> None:
    a = record_bytes(1, 2, "k", "ab", "c", "{}", GENESIS_PREV)
    b = record_bytes(1, 2, "k", "a", "bc", "{}", GENESIS_PREV)
    assert a != b  # moving a byte across a field boundary changes the encoding
    assert a.startswith(b"dergw.audit.v1\x00" + (1).to_bytes(8, "big") + (2).to_bytes(8, "big"))
    assert a[-36:] == (32).to_bytes(4, "big") + GENESIS_PREV
    assert len(record_hash(1, 2, "k", "ab", "c", "{}", GENESIS_PREV)) == 32


def test_a_chain_verifies_and_links_from_genesis() -> None:
    records = chain(AuditHead(0, b""), [(T0 + i, "device_write", "o", "s", "{}") for i in range(5)])
    assert [r.seq for r in records] == [1, 2, 3, 4, 5]
    assert records[0].prev == GENESIS_PREV
    assert all(b.prev == a.hash for a, b in itertools.pairwise(records))
    verdict = verify_chain(records)
    assert verdict.ok
    assert verdict.records == 5
    assert verdict.head == AuditHead(5, records[-1].hash)
    assert verify_chain(records, AuditHead(5, records[-1].hash)).ok
    assert verify_chain(records, AuditHead(3, records[2].hash)).ok
    assert verify_chain([]).ok
    assert verify_chain([], AuditHead(0, b"")).ok


_FIELDS = ("seq", "wall_ns", "kind", "origin", "subject", "detail", "prev", "hash")


def _mutate(record: AuditRecord, field: str, position: int, xor: int) -> AuditRecord:
    value = getattr(record, field)
    if isinstance(value, int):
        raw = bytearray(value.to_bytes(8, "big", signed=True))
        raw[position % 8] ^= xor
        changed: object = int.from_bytes(raw, "big", signed=True)
    elif isinstance(value, str):
        raw = bytearray(value.encode("utf-8", "surrogateescape"))
        raw[position % len(raw)] ^= xor
        changed = raw.decode("utf-8", "surrogateescape")
    else:
        raw = bytearray(value)
        raw[position % len(raw)] ^= xor
        changed = bytes(raw)
    fields = {name: getattr(record, name) for name in _FIELDS}
    fields[field] = changed
    return AuditRecord(**fields)


_events = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=2**62),
        st.sampled_from([str(k) for k in AuditKind]),
        st.text(min_size=1, max_size=20),
        st.text(min_size=1, max_size=20),
        st.text(min_size=1, max_size=60),
    ),
    min_size=1,
    max_size=12,
)


@given(
    events=_events,
    index=st.integers(min_value=0),
    field=st.sampled_from(_FIELDS),
    position=st.integers(min_value=0),
    xor=st.integers(min_value=1, max_value=255),
    anchored=st.booleans(),
)
def test_any_single_byte_change_to_any_field_is_detected_at_its_record(
    events: list[tuple[int, str, str, str, str]],
    index: int,
    field: str,
    position: int,
    xor: int,
    anchored: bool,
) -> None:
    records = chain(AuditHead(0, b""), events)
    k = index % len(records)
    tampered = [*records[:k], _mutate(records[k], field, position, xor), *records[k + 1 :]]
    anchor = AuditHead(records[-1].seq, records[-1].hash) if anchored else None
    verdict = verify_chain(tampered, anchor)
    assert not verdict.ok
    assert verdict.first_bad_seq == records[k].seq
    assert verdict.problem in (AuditProblem.EDITED, AuditProblem.GAP)


@given(events=_events, cut=st.integers(min_value=1))
def test_any_truncation_is_detected_against_the_anchored_head(
    events: list[tuple[int, str, str, str, str]], cut: int
) -> None:
    records = chain(AuditHead(0, b""), events)
    keep = len(records) - 1 - (cut % len(records))  # drop 1..all records
    anchor = AuditHead(records[-1].seq, records[-1].hash)
    verdict = verify_chain(records[:keep], anchor)
    assert not verdict.ok
    assert verdict.problem is AuditProblem.TRUNCATED
    assert verdict.first_bad_seq == keep + 1
    assert verify_chain(records[:keep]).ok  # without an anchor a clean cut is undetectable


def test_parse_anchor() -> None:
    assert parse_anchor("7:" + "ab" * 32) == AuditHead(7, bytes.fromhex("ab" * 32))
    assert parse_anchor("0:") == AuditHead(0, b"")
    for bad in ("7", "x:ab", "7:zz", "7:abcd", "-1:" + "ab" * 32):
        with pytest.raises(ValueError, match="anchor"):
            parse_anchor(bad)


# -- the file ------------------------------------------------------------------------------------


def test_append_commit_reopen_continue_and_verify(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    with _log(path, 4) as audit:
        head = audit.head()
        assert head.seq == 4
        assert audit.pending == 0
        audit.intent(7, True, "headend", "persisted")
        audit.intent(8, False, "headend", "signature invalid")
        # Not committed yet: the head anchored upstream is the committed one.
        assert audit.head() == head
        assert audit.pending == 2
    with AuditLog(path, clock=ManualClock(wall_ns=T0)) as audit:
        assert audit.head().seq == 6
        audit.override_set("o1", origin="local:alice", scope="site", duration_s=60, controls="x")
        assert audit.flush()
        records = list(read_records(path))
    assert [r.kind for r in records[-3:]] == ["intent_accepted", "intent_rejected", "override_set"]
    assert records[4].origin == "headend"
    assert records[4].subject == "intent v7"
    verdict = verify_file(path, AuditHead(7, records[-1].hash))
    assert verdict.ok, verdict.describe()
    assert verdict.records == 7


def test_the_table_refuses_updates_and_deletes(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    _log(path, 2).close()
    conn = sqlite3.connect(path)
    for statement in ("UPDATE audit SET origin = 'x'", "DELETE FROM audit"):
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute(statement)
    conn.close()


def test_an_edited_record_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    _log(path, 5).close()
    _sql(path, ("UPDATE audit SET detail = ? WHERE seq = 3", ('{"cap_w":9999,"i":2}',)))
    verdict = verify_file(path)
    assert (verdict.ok, verdict.first_bad_seq, verdict.problem) == (False, 3, AuditProblem.EDITED)


def test_a_deleted_middle_record_is_a_gap(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    _log(path, 5).close()
    _sql(path, ("DELETE FROM audit WHERE seq = 3", ()))
    verdict = verify_file(path)
    assert (verdict.ok, verdict.first_bad_seq, verdict.problem) == (False, 3, AuditProblem.GAP)
    assert "seq 3 missing" in verdict.detail


def test_a_truncated_tail_is_detected_against_the_anchor(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    with _log(path, 6) as audit:
        anchor = audit.head()
    _sql(path, ("DELETE FROM audit WHERE seq >= 5", ()))
    assert verify_file(path).ok  # a clean cut is consistent on its own: the anchor catches it
    verdict = verify_file(path, anchor)
    assert (verdict.ok, verdict.first_bad_seq, verdict.problem) == (
        False,
        5,
        AuditProblem.TRUNCATED,
    )


def _forge_from(path: Path, seq: int, detail: str) -> None:
    """Edit record `seq` and re-compute every hash from there on, so the chain is consistent."""
    records = list(read_records(path))
    prev = records[seq - 2].hash if seq > 1 else GENESIS_PREV
    statements = []
    for record in records[seq - 1 :]:
        new_detail = detail if record.seq == seq else record.detail
        digest = record_hash(
            record.seq,
            record.wall_ns,
            record.kind,
            record.origin,
            record.subject,
            new_detail,
            prev,
        )
        statements.append(
            (
                "UPDATE audit SET detail = ?, prev = ?, hash = ? WHERE seq = ?",
                (new_detail, prev, digest, record.seq),
            )
        )
        prev = digest
    _sql(path, *statements)


def test_a_forgery_rehashed_forward_is_caught_by_the_anchored_head(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    with _log(path, 8) as audit:
        anchored_at_8 = audit.head()
    anchored_at_5 = AuditHead(5, list(read_records(path))[4].hash)
    _forge_from(path, 3, '{"cap_w":0,"i":2}')
    # The forged chain is internally consistent: without an anchor it cannot be told apart.
    assert verify_file(path).ok
    for anchor in (anchored_at_8, anchored_at_5):
        verdict = verify_file(path, anchor)
        assert not verdict.ok
        assert verdict.problem is AuditProblem.HEAD_MISMATCH
        assert verdict.first_bad_seq == anchor.seq
    # ...and even with extra forged records appended beyond the anchor.
    with AuditLog(path, clock=ManualClock(wall_ns=T0 + 100 * NS_PER_S)) as forger:
        forger.append(AuditKind.DEVICE_WRITE, "control-loop", "pv1", {})
        forger.flush()
    assert verify_file(path, anchored_at_8).problem is AuditProblem.HEAD_MISMATCH


@pytest.fixture(scope="module")
def template_db() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "audit.db"
        _log(path, 6).close()
        yield path


@settings(max_examples=60, deadline=None)
@given(
    seq=st.integers(min_value=1, max_value=6),
    column=st.sampled_from(("wall_ns", "kind", "origin", "subject", "detail", "prev", "hash")),
    position=st.integers(min_value=0),
    xor=st.integers(min_value=1, max_value=255),
)
def test_any_single_byte_change_in_the_file_is_detected(
    template_db: Path, seq: int, column: str, position: int, xor: int
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "audit.db"
        source, target = sqlite3.connect(template_db), sqlite3.connect(path)
        source.backup(target)
        source.close()
        target.close()
        conn = sqlite3.connect(path)
        conn.text_factory = bytes
        (value,) = conn.execute(f"SELECT {column} FROM audit WHERE seq = ?", (seq,)).fetchone()
        conn.close()
        if isinstance(value, int):
            raw = bytearray(value.to_bytes(8, "big", signed=True))
            raw[position % 8] ^= xor
            changed: object = int.from_bytes(raw, "big", signed=True)
            sql = f"UPDATE audit SET {column} = ? WHERE seq = ?"
        else:
            raw = bytearray(value)
            raw[position % len(raw)] ^= xor
            changed = bytes(raw)
            # Text columns get the raw bytes as TEXT (valid UTF-8 or not), blobs as BLOB.
            cast = "BLOB" if column in ("prev", "hash") else "TEXT"
            sql = f"UPDATE audit SET {column} = CAST(? AS {cast}) WHERE seq = ?"
        _sql(path, (sql, (changed, seq)))
        verdict = verify_file(path)
        assert not verdict.ok
        assert verdict.first_bad_seq == seq
        assert verdict.problem is AuditProblem.EDITED


def test_a_non_integer_seq_or_time_is_malformed(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    _log(path, 3).close()
    _sql(path, ("UPDATE audit SET wall_ns = 'yesterday' WHERE seq = 2", ()))
    verdict = verify_file(path)
    assert (verdict.ok, verdict.first_bad_seq, verdict.problem) == (
        False,
        2,
        AuditProblem.MALFORMED,
    )


def test_a_running_gateways_log_can_be_read(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    audit = _log(path, 3)
    try:
        assert verify_file(path, audit.head()).ok
        audit.append(AuditKind.OVERRIDE_CLEARED, "local:bob", "o1", {"reason": "done"})
        assert audit.flush()
        assert verify_file(path, audit.head()).records == 4
    finally:
        audit.close()


# -- storage trouble -----------------------------------------------------------------------------


def test_storage_trouble_keeps_records_in_memory_and_never_raises(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    path.mkdir()  # not a file: every open fails, as on a broken card
    audit = AuditLog(path, clock=ManualClock(wall_ns=T0))
    assert audit.storage_condition is not None
    audit.append(AuditKind.DEVICE_WRITE, "control-loop", "pv1", {"cap_w": 1})
    assert not audit.flush()
    assert audit.pending == 1
    assert audit.failed_commits >= 2
    assert audit.head().seq == 0
    path.rmdir()  # the storage recovers
    assert audit.flush()
    assert audit.storage_condition is None
    assert audit.pending == 0
    assert audit.head().seq == 1
    audit.close()
    assert verify_file(path).ok


def test_records_dropped_in_memory_are_themselves_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(audit_module, "MAX_PENDING_RECORDS", 3)
    path = tmp_path / "audit.db"
    path.mkdir()
    audit = AuditLog(path, clock=ManualClock(wall_ns=T0))
    for i in range(5):
        audit.append(AuditKind.DEVICE_WRITE, "control-loop", "pv1", {"i": i})
    assert audit.dropped_records == 2
    assert audit.pending == 3
    path.rmdir()
    assert audit.flush()
    audit.close()
    records = list(read_records(path))
    assert [r.kind for r in records] == ["records_lost", *["device_write"] * 3]
    assert '"records":2' in records[0].detail
    assert verify_file(path).ok


async def test_commit_is_awaitable_and_bounded(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "audit.db", clock=ManualClock(wall_ns=T0))
    assert await audit.commit()  # nothing queued
    audit.append(AuditKind.DEVICE_WRITE, "control-loop", "pv1", {})
    assert await audit.commit()
    assert audit.head().seq == 1
    audit.close()


async def test_a_stalled_commit_never_holds_control_up(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    audit = _log(path, 1)
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # another writer holds the file: the commit must wait
    try:
        audit.append(AuditKind.DEVICE_WRITE, "control-loop", "pv1", {})
        started = time.monotonic()
        assert not await audit.commit(timeout_s=0.2)
        assert not await audit.commit(timeout_s=0.2)  # still stuck: returns at once
        assert time.monotonic() - started < 1.0
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    await async_wait_until(lambda: audit.pending == 0, timeout_s=10, what="the stuck commit")
    assert await audit.commit()
    assert audit.head().seq == 2
    audit.close()
    assert verify_file(path).ok


# -- durability ----------------------------------------------------------------------------------

_WRITER = """
import sys
from pathlib import Path
from gateway.audit import AuditKind, AuditLog
from gateway.clock import SystemClock
audit = AuditLog(Path(sys.argv[1]), clock=SystemClock())
i = 0
while True:
    for _ in range(3):
        i += 1
        audit.append(AuditKind.DEVICE_WRITE, "control-loop", "pv1", {"i": i})
    audit.flush()
    print(audit.head().seq, audit.head().hash.hex(), flush=True)
"""


def test_kill_9_loses_no_committed_record_and_leaves_the_chain_intact(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    try:
        heads = [proc.stdout.readline() for _ in range(40)]
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    seq_text, hash_text = heads[-1].split()
    anchor = AuditHead(int(seq_text), bytes.fromhex(hash_text))  # as reported upstream
    verdict = verify_file(path, anchor)
    assert verdict.ok, verdict.describe()
    assert verdict.head.seq >= anchor.seq >= 120
    with AuditLog(path, clock=ManualClock(wall_ns=T0)) as audit:  # and it continues the chain
        audit.append(AuditKind.DEVICE_WRITE, "control-loop", "pv1", {})
        assert audit.flush()
    assert verify_file(path, anchor).ok


# -- the CLI -------------------------------------------------------------------------------------


def _dergw(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_exit_codes(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    with _log(path, 5) as audit:
        head = audit.head()
    anchor = f"{head.seq}:{head.hash.hex()}"

    ok = _dergw("audit", "verify", "--db", str(path), "--anchor", anchor)
    assert ok.returncode == 0, ok.stderr
    assert "intact: 5 records" in ok.stdout

    shown = _dergw("audit", "show", "--db", str(path), "--tail", "2")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["4", "5"]
    assert "device_write" in lines[0]
    assert "control-loop" in lines[0]

    _sql(path, ("DELETE FROM audit WHERE seq = 5", ()))
    cut = _dergw("audit", "verify", "--db", str(path), "--anchor", anchor)
    assert cut.returncode == 1
    assert "TAMPERED at seq 5: truncated below anchored head" in cut.stdout

    _sql(path, ("UPDATE audit SET origin = 'headend' WHERE seq = 2", ()))
    edited = _dergw("audit", "verify", "--db", str(path))
    assert edited.returncode == 1
    assert "TAMPERED at seq 2: edited record" in edited.stdout

    for usage in (
        ("audit",),
        ("audit", "verify"),
        ("audit", "verify", "--db", str(path), "--anchor", "5:nothex"),
        ("audit", "verify", "--db", str(tmp_path / "absent.db")),
        ("audit", "show", "--db", str(path), "--tail", "0"),
    ):
        result = _dergw(*usage)
        assert result.returncode == 2, (usage, result.stdout, result.stderr)


def test_cli_finds_the_log_through_the_config(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    _log(state / "audit.db", 2).close()
    config = tmp_path / "gateway.toml"
    config.write_text(
        '[gateway]\nid = "gw"\nstate_dir = "state"\n'
        '[site]\nid = "s"\nname = "S"\n'
        '[uplink]\ntransport = "grpc"\ntarget = "127.0.0.1:1"\n'
        '[[devices]]\nid = "pv1"\nkind = "pv"\ndriver = "sunspec-modbus"\n'
        '[devices.params]\nhost = "127.0.0.1"\n'
    )
    result = _dergw("audit", "verify", "--config", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "intact: 2 records" in result.stdout


# -- the control loop ----------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def memory_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(
        registry.DRIVERS,
        "memory",
        registry.DriverSpec("tests.gateway.fakes", "MemoryParams", "MemoryDriver", "memory"),
    )


class AuditedSite:
    """A control loop over in-memory drivers with a real outbox, intent store and audit log."""

    def __init__(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.clock = ManualClock(wall_ns=T0)
        self.config = GatewayConfig.model_validate(
            {
                "gateway": {"id": "gw-test", "state_dir": str(state_dir)},
                "site": {"id": "site", "name": "Site", "export_limit_w": 3000},
                "uplink": {"transport": "grpc", "target": "127.0.0.1:1"},
                "control": {"period_s": 1.0, "revert_timeout_s": 30, "refresh_s": 10},
                "devices": [
                    {"id": "pv1", "kind": "pv", "driver": "memory", "params": {}},
                    {"id": "meter1", "kind": "meter", "driver": "memory", "role": "pcc"},
                ],
            }
        )
        self.drivers = {
            d.id: MemoryDriver(d.id, d.kind, MemoryParams(), self.clock)
            for d in self.config.devices
        }
        self.snapshot = SiteSnapshot(
            (DeviceSlot(d.id, d.kind, d.poll_period_s, d.role) for d in self.config.devices),
            stale_periods=3,
        )
        self.outbox = Outbox(state_dir / "outbox.sqlite3", clock=self.clock)
        self.store = IntentStore(state_dir / "intent.sqlite3", clock=self.clock)
        self.recorder = Recorder(self.outbox, commit_interval_s=0.1)
        self.audit = AuditLog(state_dir / "audit.db", clock=self.clock)
        self.loop = ControlLoop(
            self.config,
            drivers=self.drivers,
            snapshot=self.snapshot,
            recorder=self.recorder,
            store=self.store,
            clock=self.clock,
            audit=self.audit,
        )

    async def cycle(self, advance_s: float = 1.0) -> None:
        self.clock.advance(advance_s)
        for driver in self.drivers.values():
            info = await driver.connect()
            if self.snapshot.slots[info.device_id].info is None:
                self.snapshot.set_info(info)
            self.snapshot.update(await driver.read())
        await self.loop.step()
        await self.recorder.flush()

    def writes(self) -> list[AuditRecord]:
        return [r for r in read_records(self.audit.path) if r.kind == AuditKind.DEVICE_WRITE]

    def reported(self) -> list[pb.ReportedState]:
        return [
            pb.ReportedState.FromString(row.payload)
            for row in self.outbox.read_after(0, 10_000)
            if row.kind == RecordKind.REPORTED_STATE
        ]

    def close(self) -> None:
        self.audit.close()
        self.outbox.close()
        self.store.close()


@pytest.fixture
def site(tmp_path: Path) -> Iterator[AuditedSite]:
    rig = AuditedSite(tmp_path / "site")
    yield rig
    rig.close()


async def test_a_device_write_is_audited_with_its_why_and_result(site: AuditedSite) -> None:
    await site.cycle()
    writes = site.writes()
    assert [w.subject for w in writes] == ["pv1"]
    record = writes[0]
    assert record.origin == "control-loop"
    detail = json.loads(record.detail)
    written = site.drivers["pv1"].writes[-1]
    assert detail["setpoint"]["max_active_power_w"] == written.max_active_power_w
    assert detail["bound_by"] == list(written.bound_by)
    assert detail["bound_by"]
    assert detail["result"]["verified"] is True
    assert detail["asked_by"] == {}  # no intent, no override: only the site's own limits
    # The head went upstream with the reported state, already committed.
    heads = [s.audit_head for s in site.reported()]
    assert heads
    assert heads[-1].seq == site.audit.head().seq == 1
    assert heads[-1].hash == site.audit.head().hash

    # Unchanged setpoints within refresh_s are not re-written, so not re-recorded...
    for _ in range(3):
        await site.cycle()
    assert len(site.writes()) == 1
    # ...a refresh is a real write and is recorded.
    await site.cycle(advance_s=10.0)
    assert len(site.writes()) == 2
    assert verify_file(site.audit.path, site.audit.head()).ok


async def test_overrides_are_audited_with_their_origin(site: AuditedSite) -> None:
    await site.cycle()
    override = site.loop.add_override(
        Controls(max_gen_pct=10.0), origin="local:alice", duration_s=5.0
    )
    await site.cycle()
    assert site.loop.clear_override(override.override_id, origin="local:bob")
    second = site.loop.add_override(Controls(max_gen_pct=20.0), origin="local:carol", duration_s=2)
    await site.cycle()
    await site.cycle(advance_s=3.0)  # the second one expires
    records = list(read_records(site.audit.path))
    overrides = [(r.kind, r.origin, r.subject) for r in records if r.kind.startswith("override")]
    assert overrides == [
        ("override_set", "local:alice", override.override_id),
        ("override_cleared", "local:bob", override.override_id),
        ("override_set", "local:carol", second.override_id),
        ("override_expired", "control-loop", second.override_id),
    ]
    # The override's own write follows its record, and names the override among its limits.
    after = records[[r.subject for r in records].index(override.override_id) + 1]
    assert after.kind == "device_write"
    asked_by = json.loads(after.detail)["asked_by"]
    assert asked_by == {"max_gen_pct": "local override (local:alice)"}
    assert any("local:alice" in limit for limit in json.loads(after.detail)["bound_by"])
    assert verify_file(site.audit.path, site.audit.head()).ok


async def test_audit_storage_trouble_never_stops_control(tmp_path: Path) -> None:
    state = tmp_path / "site"
    (state / "audit.db").mkdir(parents=True)  # the audit file cannot be opened
    rig = AuditedSite(state)
    try:
        await rig.cycle()
        assert rig.drivers["pv1"].writes  # control went on
        assert rig.audit.pending == 1
        notes = rig.reported()[-1].notes
        assert any(n.startswith("audit log storage:") for n in notes), notes
        (state / "audit.db").rmdir()
        await rig.cycle(advance_s=10.0)  # the next write commits the queue too
        assert [r.seq for r in rig.writes()] == [1, 2]
    finally:
        rig.close()


def test_the_headend_shows_the_anchored_head() -> None:
    digest = bytes(range(32))
    state = pb.ReportedState(intent_version=3, audit_head=pb.AuditHead(seq=42, hash=digest))
    out = ReportedStateOut.of(ReportedStateRecord("gw", 9, state))
    assert (out.audit_head_seq, out.audit_head_hash) == (42, digest.hex())
    assert parse_anchor(f"{out.audit_head_seq}:{out.audit_head_hash}") == AuditHead(42, digest)
    empty = ReportedStateOut.of(ReportedStateRecord("gw", 10, pb.ReportedState()))
    assert (empty.audit_head_seq, empty.audit_head_hash) == (0, "")


async def test_concurrent_commits_each_wait_on_their_own_transaction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Found by the console's live test: the control loop and the local API commit while a
    # transaction is in flight; the first to wake started the next transaction and the other
    # read that one's result before it was set (InvalidStateError).
    path = tmp_path / "audit.db"
    with AuditLog(path, clock=ManualClock(wall_ns=T0)) as audit:
        flush = audit.flush

        def slow_flush() -> bool:
            committed = flush()
            time.sleep(0.05)  # a slow fsync: later records and commits arrive meanwhile
            return committed

        monkeypatch.setattr(audit, "flush", slow_flush)
        for version in range(1, 31, 3):
            audit.intent(version, True, "headend")
            first = asyncio.create_task(audit.commit())
            await asyncio.sleep(0.01)  # its transaction is now running on the worker thread
            audit.intent(version + 1, False, "uplink (unverified)", "replayed")
            second = asyncio.create_task(audit.commit())
            await asyncio.sleep(0)
            audit.intent(version + 2, True, "headend")
            third = asyncio.create_task(audit.commit())
            assert await asyncio.gather(first, second, third) == [True, True, True]
        assert audit.head().seq == 30
    assert verify_file(path).ok

"""The wire contract: generated code matches the .proto, and domain enums match wire enums."""

from __future__ import annotations

import enum
import importlib.util
import sys
from pathlib import Path

import pytest

from dergw.v1 import pb
from drivers.contract import Quality
from gateway.intent import EventStatus
from gateway.lifecycle import ResponseStatus
from gateway.outbox import RecordKind
from gateway.schedule import ControlSource

ROOT = Path(__file__).resolve().parents[1]


def _load_generator():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(
        "dergw_proto_generate", ROOT / "proto/generate.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_committed_generated_code_is_not_stale(tmp_path: Path) -> None:
    generate = _load_generator().generate
    fresh = {p.name: p.read_bytes() for p in generate(tmp_path)}
    committed_dir = ROOT / "proto" / "dergw" / "v1"
    assert fresh, "protoc generated nothing"
    for name, content in fresh.items():
        committed = committed_dir / name
        assert committed.exists(), f"{name} is not committed: run `make proto`"
        assert committed.read_bytes() == content, f"{name} is stale: run `make proto`"


@pytest.mark.parametrize(
    ("domain", "wire", "prefix"),
    [
        (Quality, pb.Quality, "QUALITY_"),
        (ResponseStatus, pb.ResponseStatus, "RESPONSE_STATUS_"),
        (EventStatus, pb.EventStatus, "EVENT_STATUS_"),
        (ControlSource, pb.ControlSource, "CONTROL_SOURCE_"),
    ],
)
def test_domain_enums_equal_wire_enums(
    domain: type[enum.IntEnum], wire: object, prefix: str
) -> None:
    for member in domain:
        if member.value == 0 and member.name == "NONE":
            continue
        assert wire.Value(prefix + member.name) == member.value, member  # type: ignore[attr-defined]


def test_record_kinds_are_the_record_oneof_field_numbers() -> None:
    fields = pb.Record.DESCRIPTOR.oneofs_by_name["body"].fields
    assert {f.name.upper(): f.number for f in fields} == {k.name: k.value for k in RecordKind}

"""The wire contract: the committed generated code matches the .proto."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

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

"""Regenerate the Python wire contract (dergw.v1) from proto/dergw/v1/*.proto.

Run through `make proto`. tests/test_wire_contract.py calls `generate()` into a temporary folder
and fails when the committed files differ, so the generated code can never drift from the .proto.
Versions of grpcio-tools and mypy-protobuf are pinned in pyproject.toml for the same reason.
"""

from __future__ import annotations

import shutil
import sys
from importlib import resources
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
SOURCES = sorted((PROTO_ROOT / "dergw" / "v1").glob("*.proto"))
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def _plugin(name: str) -> str:
    found = Path(sys.executable).parent / name
    if found.exists():
        return str(found)
    which = shutil.which(name)
    if which is None:
        raise SystemExit(f"{name} not found: install the dev extra (pip install -e '.[dev]')")
    return which


def generate(out_dir: Path) -> list[Path]:
    """Generate code for every .proto under dergw/v1 into out_dir; return the files written."""
    from grpc_tools import protoc

    well_known = resources.files("grpc_tools") / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *[str(p.relative_to(PROTO_ROOT)) for p in SOURCES],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed; see the messages above")
    return sorted(
        p for p in (out_dir / "dergw" / "v1").iterdir() if p.name.endswith(GENERATED_SUFFIXES)
    )


if __name__ == "__main__":
    for path in generate(PROTO_ROOT):
        print(path.relative_to(PROTO_ROOT.parent))

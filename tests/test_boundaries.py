"""The import rules of docs/architecture.md, checked on the source (not on what happens to load).

* `headend_min/` and `gateway/` share only the wire contract (`dergw.v1` and its helpers);
* `drivers/` know devices, not the cloud: from `gateway/` only the safety kernel's type they
  accept and the clock, nothing of uplink, outbox or headend;
* `hil/` is independent test equipment: nothing from the code it tests.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package -> modules it must not import (a top-level package forbids all of its modules)
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "headend_min": ("gateway", "drivers", "hil", "bench"),
    "gateway": ("headend_min", "hil", "bench"),
    "drivers": ("headend_min", "hil", "bench"),
    "hil": ("gateway", "drivers", "bench"),
}
# What drivers may take from gateway/.
DRIVERS_MAY_IMPORT = ("gateway.safety", "gateway.clock")


def _imports(path: Path) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def _offenders(package: str) -> list[str]:
    offenders = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for lineno, name in _imports(path):
            top = name.split(".")[0]
            allowed = package == "drivers" and name in DRIVERS_MAY_IMPORT
            if (top in FORBIDDEN[package] or (package == "drivers" and top == "gateway")) and (
                not allowed
            ):
                offenders.append(f"{path.relative_to(ROOT)}:{lineno} imports {name}")
    return offenders


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_keeps_its_import_rules(package: str) -> None:
    assert _offenders(package) == []

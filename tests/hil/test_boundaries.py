"""hil/ is independent test equipment: it imports nothing from the code it tests."""

from __future__ import annotations

import ast
from pathlib import Path

HIL = Path(__file__).resolve().parents[2] / "hil"
FORBIDDEN = ("gateway", "drivers")


def test_hil_imports_nothing_from_gateway_or_drivers() -> None:
    offenders = []
    for path in sorted(HIL.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [
                f"{path.relative_to(HIL.parent)}:{node.lineno} imports {name}"
                for name in names
                if name.split(".")[0] in FORBIDDEN
            ]
    assert offenders == []

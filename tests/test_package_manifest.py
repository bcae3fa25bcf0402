"""Every Python package in the source tree ships in the wheel (and so in the Debian package).

The editable install used by the tests finds modules whether or not pyproject.toml lists them;
an installed gateway does not. This test is what keeps the list honest.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP_LEVEL = ("gateway", "drivers", "headend_min", "hil", "bench")


def _listed() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return set(project["tool"]["setuptools"]["packages"])


def test_every_package_with_python_modules_is_listed() -> None:
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for top in TOP_LEVEL
        for init in (ROOT / top).rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    missing = sorted(found - _listed())
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {missing}"


def test_shipped_profiles_are_package_data() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_data = project["tool"]["setuptools"]["package-data"]
    assert "profiles/*.toml" in package_data["drivers"]
    assert list((ROOT / "drivers" / "profiles").glob("*.toml"))

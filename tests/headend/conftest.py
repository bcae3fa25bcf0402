"""Fixtures of the headend tests (see harness.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.headend.harness import HeadendRunner, RunningHeadend


@pytest.fixture
async def runner(tmp_path: Path) -> AsyncIterator[HeadendRunner]:
    headend_runner = HeadendRunner(tmp_path / "headend.sqlite3")
    yield headend_runner
    await headend_runner.stop()


@pytest.fixture
async def headend(runner: HeadendRunner) -> RunningHeadend:
    return await runner.start()

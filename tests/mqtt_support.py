"""The mosquitto fixture: a private broker per test (own port and persistence directory).

    async def test_x(mosquitto_broker: Mosquitto) -> None:
        ... mosquitto_broker.port ... mosquitto_broker.restart() ... mosquitto_broker.kill()

Skipped when mosquitto is not installed, a failure with DERGW_REQUIRE_SERVICES=1 (CI). Import the
fixture into a test module (`from tests.mqtt_support import mosquitto_broker`) or a conftest.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from hil.mqtt_broker import Mosquitto, find_mosquitto
from tests.support import require_binary

__all__ = ["Mosquitto", "mosquitto_binary", "mosquitto_broker"]


def mosquitto_binary() -> str:
    """The broker binary; skips (or fails under DERGW_REQUIRE_SERVICES=1) when absent."""
    found = find_mosquitto()  # also looks in /usr/sbin, often not on a user's PATH
    if found is None:
        return require_binary("mosquitto", "MQTT transport tests need an MQTT v5 broker")
    return found


@pytest.fixture
def mosquitto_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    broker = Mosquitto(tmp_path / "mosquitto", binary=mosquitto_binary())
    broker.start()
    try:
        yield broker
    finally:
        broker.kill()

"""Clock trust and clock-step detection."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.timesync import ClockTrust, ClockTrustError, ClockWatch


def test_assume_is_always_trusted() -> None:
    trust = ClockTrust("assume")
    assert trust.trusted()
    assert trust.reason() == ""


def test_file_trust_latches_once_the_flag_appears(tmp_path: Path) -> None:
    flag = tmp_path / "synchronized"
    trust = ClockTrust(f"file:{flag}")
    assert not trust.trusted()
    assert "does not exist yet" in trust.reason()
    flag.touch()
    assert trust.trusted()
    flag.unlink()  # e.g. NTP lost later: a synchronised clock stays trusted
    assert trust.trusted()


def test_kernel_trust_answers_without_error() -> None:
    # This sandbox's kernel reports "unsynchronised"; a real appliance with NTP reports synced.
    assert isinstance(ClockTrust("kernel").trusted(), bool)


@pytest.mark.parametrize("setting", ["ntp", "file:", "always"])
def test_unknown_settings_are_refused(setting: str) -> None:
    with pytest.raises(ClockTrustError):
        ClockTrust(setting)


def test_clock_watch_reports_steps_not_drift() -> None:
    watch = ClockWatch(threshold_s=1.0)
    second = 1_000_000_000
    assert watch.observe(100 * second, 5 * second) is None  # first sample
    assert watch.observe(101 * second, 6 * second) is None  # both advanced by 1 s
    assert watch.observe(102 * second + second // 2, 7 * second) is None  # 0.5 s drift
    step = watch.observe(3702 * second, 8 * second)  # wall jumped by ~1 h
    assert step is not None
    assert step.step_s == pytest.approx(3598.5)  # measured against the last observation
    backwards = watch.observe(3000 * second, 9 * second)
    assert backwards is not None
    assert backwards.step_s < -700

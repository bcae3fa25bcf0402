"""The pi-gen stage: the scripts parse (bash -n) and pass shellcheck, the files pi-gen needs are
there, and the policy files say what rpi/README.md promises. The image build itself needs root,
loop devices and binfmt: it runs on a release builder (rpi/README.md)."""

from __future__ import annotations

import configparser
import subprocess
from pathlib import Path

import pytest

from tests.support import require_binary

ROOT = Path(__file__).resolve().parents[2]
STAGE = ROOT / "rpi/stage-dergw"
SCRIPTS = sorted(
    [
        *STAGE.rglob("*.sh"),
        ROOT / "packaging/build-deb",
        ROOT / "packaging/deb/libexec/enroll-first-boot",
        ROOT / "packaging/deb/dergw",
        *(ROOT / "packaging/deb/DEBIAN").glob("p*"),
    ]
)


def test_stage_layout() -> None:
    for path in (
        "prerun.sh",
        "EXPORT_IMAGE",
        "00-install/00-run.sh",
        "01-os-policy/00-run.sh",
        "01-os-policy/files/dergw-watchdog.conf",
        "01-os-policy/files/dergw-journald.conf",
    ):
        assert (STAGE / path).is_file(), path
    for script in STAGE.rglob("*.sh"):
        assert script.stat().st_mode & 0o111, f"{script} must be executable for pi-gen"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_script_parses(script: Path) -> None:
    shell = "bash" if "bash" in script.read_text().splitlines()[0] else "sh"
    result = subprocess.run([shell, "-n", str(script)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_shellcheck() -> None:
    shellcheck = require_binary("shellcheck", "lints the packaging and image scripts")
    # pi-gen provides ROOTFS_DIR and on_chroot/copy_previous to stage scripts.
    result = subprocess.run(
        [shellcheck, "--exclude=SC2154,SC2034", *map(str, SCRIPTS)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _ini(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser()
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(path)
    return parser


def test_hardware_watchdog_within_the_pi_maximum() -> None:
    manager = _ini(STAGE / "01-os-policy/files/dergw-watchdog.conf")["Manager"]
    seconds = int(manager["RuntimeWatchdogSec"].removesuffix("s"))
    assert 0 < seconds <= 15  # bcm2835_wdt tops out near 15 s


def test_journal_is_bounded() -> None:
    assert _ini(STAGE / "01-os-policy/files/dergw-journald.conf")["Journal"]["SystemMaxUse"]


def test_stage_installs_the_package_and_the_enrollment_template() -> None:
    text = (STAGE / "00-install/00-run.sh").read_text()
    assert "apt-get install -y --no-install-recommends /tmp/dergw.deb" in text
    assert "/boot/firmware/dergw/enroll.conf.example" in text
    # The template comes from the package, where the enrollment unit documents its keys.
    template = (ROOT / "packaging/deb/enroll.conf.example").read_text()
    assert "DERGW_HEADEND=" in template
    unit = (ROOT / "systemd/dergw-enroll.service").read_text()
    assert "ConditionPathExists=/boot/firmware/dergw/enroll.conf" in unit
    assert "--token-file" in (ROOT / "packaging/deb/libexec/enroll-first-boot").read_text()


def test_os_policy_noatime_and_no_swap() -> None:
    text = (STAGE / "01-os-policy/00-run.sh").read_text()
    assert "noatime" in text
    assert "dphys-swapfile" in text
    assert "systemctl mask swap.target" in text

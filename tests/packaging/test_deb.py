"""The Debian package: built by packaging/build-deb, inspected with dpkg-deb, lintian-clean (with
the justified overrides), and installed, upgraded and purged in a fresh minimal bookworm chroot
(mmdebstrap; never dpkg -i on the host: the package creates a user and enables units).

Wheels are cached in ~/.cache/dergw/deb-wheels and the chroot's base tarball in
~/.cache/dergw/chroot, so only the first run on a machine downloads anything."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.support import REQUIRE_SERVICES, require_binary

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "packaging/build-deb"
CACHE = Path.home() / ".cache/dergw"
CHROOT_PACKAGES = "python3,systemd"


def _run(*argv: str | Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=timeout, check=False
    )


def _ok(*argv: str | Path, timeout: float = 300) -> str:
    result = _run(*argv, timeout=timeout)
    assert result.returncode == 0, (
        f"{argv}: rc {result.returncode}\n{result.stdout}\n{result.stderr}"
    )
    return result.stdout


class Debs:
    """Packages built once per test module (11 s each with a warm wheel cache)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self._built: dict[str, Path] = {}

    def get(self, version: str) -> Path:
        if version not in self._built:
            require_binary("dpkg-deb", "builds the Debian package")
            path = (
                _ok(
                    BUILD,
                    "--fast",
                    "--arch",
                    "amd64",
                    "--version",
                    version,
                    "--out",
                    self.out,
                    timeout=600,
                )
                .strip()
                .splitlines()[-1]
            )
            self._built[version] = Path(path)
        return self._built[version]


@pytest.fixture(scope="module")
def debs(tmp_path_factory: pytest.TempPathFactory) -> Debs:
    return Debs(tmp_path_factory.mktemp("debs"))


def test_package_contents_and_control(debs: Debs) -> None:
    deb = debs.get("0.1.0-1")
    assert deb.name == "dergw_0.1.0-1_amd64.deb"
    listing = _ok("dpkg-deb", "-c", deb)
    paths = {line.split()[-1].removeprefix(".") for line in listing.splitlines()}
    for path in (
        "/usr/bin/dergw",
        "/etc/dergw/gateway.toml",
        "/usr/lib/systemd/system/dergw-gateway.service",
        "/usr/lib/systemd/system/dergw-enroll.service",
        "/usr/lib/sysusers.d/dergw.conf",
        "/usr/lib/dergw/libexec/enroll-first-boot",
        "/usr/lib/dergw/site-packages/gateway/cli.py",
        "/usr/lib/dergw/site-packages/dergw/v1/__init__.py",
        "/usr/lib/dergw/site-packages/textual/__init__.py",  # `dergw console` on the Pi
        "/usr/share/lintian/overrides/dergw",
        "/usr/share/doc/dergw/copyright",
    ):
        assert path in paths, path
    # Precompiled for the target's Python 3.11; nothing under /opt; the headend's web stack out.
    assert "/usr/lib/dergw/site-packages/gateway/__pycache__/cli.cpython-311.pyc" in paths
    assert not any(p.startswith("/opt") for p in paths)
    assert not any(p.startswith("/usr/lib/dergw/site-packages/fastapi/") for p in paths)
    assert not any(p.startswith("/usr/lib/dergw/site-packages/pip/") for p in paths)

    info = _ok("dpkg-deb", "-I", deb)
    assert "Package: dergw" in info
    assert "Architecture: amd64" in info
    assert "Depends: libc6 (>= 2.28), python3 (>= 3.11), python3 (<< 3.12), systemd" in info
    assert _ok("dpkg-deb", "-f", deb, "Version").strip() == "0.1.0-1"
    conffiles = subprocess.run(
        ["dpkg-deb", "--info", str(deb), "conffiles"], capture_output=True, text=True, check=True
    ).stdout
    assert conffiles.split() == ["/etc/dergw/gateway.toml"]


def test_maintainer_scripts_never_reach_the_network(debs: Debs, tmp_path: Path) -> None:
    _ok("dpkg-deb", "-e", debs.get("0.1.0-1"), tmp_path / "control")
    for script in ("postinst", "prerm", "postrm"):
        text = (tmp_path / "control" / script).read_text()
        for word in ("pip", "curl", "wget", "apt-get", "http"):
            assert word not in text, f"{script} mentions {word}"


def test_packaged_config_is_valid_and_appliance_shaped(debs: Debs, tmp_path: Path) -> None:
    _ok("dpkg-deb", "-x", debs.get("0.1.0-1"), tmp_path / "x")
    config = tmp_path / "x/etc/dergw/gateway.toml"
    text = config.read_text()
    assert 'state_dir = "/var/lib/dergw"' in text
    assert 'socket = "/run/dergw/dergw.sock"' in text
    assert "\ntls = true" in text
    out = _ok(sys.executable, "-m", "gateway.cli", "check-config", config)
    assert "OK" in out


def test_lintian_clean_with_justified_overrides(debs: Debs) -> None:
    lintian = require_binary("lintian", "checks the Debian package")
    result = _run(lintian, "--fail-on", "error,warning", debs.get("0.1.0-1"), timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr


# -- install, upgrade, purge in a chroot ------------------------------------------------------


def _base_tarball() -> Path:
    """A minimal bookworm (python3, systemd), built once per machine by mmdebstrap (~75 s)."""
    mmdebstrap = require_binary("mmdebstrap", "builds the chroot the package is installed into")
    key = hashlib.sha256(CHROOT_PACKAGES.encode()).hexdigest()[:12]
    tarball = CACHE / "chroot" / f"bookworm-minbase-{key}.tar"
    if not tarball.exists():
        tarball.parent.mkdir(parents=True, exist_ok=True)
        partial = tarball.with_suffix(".partial.tar")
        _ok(
            mmdebstrap,
            "--variant=minbase",
            f"--include={CHROOT_PACKAGES}",
            "bookworm",
            partial,
            timeout=900,
        )
        partial.rename(tarball)
    return tarball


@pytest.fixture
def chroot(tmp_path: Path) -> Path:
    if os.geteuid() != 0:
        message = "installing into a chroot needs root"
        if REQUIRE_SERVICES:
            pytest.fail(f"{message}; DERGW_REQUIRE_SERVICES=1 makes this a failure")
        pytest.skip(message)
    root = tmp_path / "chroot"
    root.mkdir()
    with tarfile.open(_base_tarball()) as tar:
        tar.extractall(root, filter="fully_trusted")
    return root


def _in(root: Path, *argv: str) -> str:
    return _ok("chroot", root, *argv)


def test_install_upgrade_purge_in_a_chroot(debs: Debs, chroot: Path) -> None:
    first, second = debs.get("0.1.0-1"), debs.get("0.1.0-2")
    for deb in (first, second):
        (chroot / "root" / deb.name).write_bytes(deb.read_bytes())

    _in(chroot, "dpkg", "-i", f"/root/{first.name}")
    # The user, in dialout for serial ports.
    assert _in(chroot, "getent", "passwd", "dergw").startswith("dergw:")
    assert "dialout" in _in(chroot, "id", "-nG", "dergw").split()
    # The unit is installed and enabled (no systemd runs in the chroot: nothing was started).
    wants = chroot / "etc/systemd/system/multi-user.target.wants/dergw-gateway.service"
    assert os.readlink(wants).endswith("/systemd/system/dergw-gateway.service")
    analyze = require_binary("systemd-analyze", "verifies the installed unit")
    verify = _run(analyze, "verify", "--man=no", f"--root={chroot}", "dergw-gateway.service")
    assert (verify.stdout + verify.stderr).strip() == ""
    assert verify.returncode == 0
    # The config: root:dergw 0640, valid for the packaged gateway on the chroot's own Python.
    config = chroot / "etc/dergw/gateway.toml"
    assert oct(config.stat().st_mode & 0o777) == "0o640"
    assert "OK" in _in(chroot, "dergw", "check-config", "/etc/dergw/gateway.toml")
    _in(chroot, "dergw", "--help")
    assert "console" in _in(chroot, "dergw", "console", "--help")

    # Upgrade: a locally edited conffile is kept.
    config.write_text(config.read_text().replace("Example Depot", "Edited Depot"))
    _in(chroot, "dpkg", "-i", f"/root/{second.name}")
    assert _in(chroot, "dpkg-query", "-W", "-f", "${Version}", "dergw") == "0.1.0-2"
    assert "Edited Depot" in config.read_text()
    assert "OK" in _in(chroot, "dergw", "check-config", "/etc/dergw/gateway.toml")

    # Purge: payload, state, conffile and the enablement symlink all go.
    (chroot / "var/lib/dergw").mkdir(exist_ok=True)
    (chroot / "var/lib/dergw/outbox.sqlite3").write_bytes(b"")
    _in(chroot, "dpkg", "-P", "dergw")
    for gone in (
        "usr/lib/dergw",
        "usr/bin/dergw",
        "etc/dergw/gateway.toml",
        "var/lib/dergw",
        "etc/systemd/system/multi-user.target.wants/dergw-gateway.service",
    ):
        assert not os.path.lexists(chroot / gone), gone


def test_arm64_flavour_builds_on_x86_without_emulation(debs: Debs, tmp_path: Path) -> None:
    """pip --platform fetches aarch64 wheels: the compiled extensions are ARM64 ELF files."""
    require_binary("dpkg-deb", "builds the Debian package")
    path = _ok(BUILD, "--fast", "--arch", "arm64", "--out", debs.out, timeout=600).split()[-1]
    deb = Path(path)
    assert deb.name == "dergw_0.1.0-1_arm64.deb"
    assert _ok("dpkg-deb", "-f", deb, "Architecture").strip() == "arm64"
    _ok("dpkg-deb", "-x", deb, tmp_path / "x")
    site = tmp_path / "x/usr/lib/dergw/site-packages"
    extensions = [
        *site.glob("grpc/_cython/cygrpc.*.so"),
        *site.glob("numpy/_core/_multiarray_umath.*.so"),
    ]
    assert len(extensions) == 2
    for extension in extensions:
        header = extension.read_bytes()[:20]
        assert header[:4] == b"\x7fELF"
        assert int.from_bytes(header[18:20], "little") == 183, extension  # EM_AARCH64

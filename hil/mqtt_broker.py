"""A private mosquitto broker for tests and HIL scenarios: own port, own persistence, kill -9.

    broker = Mosquitto(tmp_path)        # binary from PATH (or /usr/sbin/mosquitto)
    broker.start()                      # listener 127.0.0.1:<free port>, waits until it accepts
    broker.kill()                       # SIGKILL: in-memory state since the last autosave is lost
    broker.restart()                    # SIGTERM (persistence saved) + start on the same port
    broker.stop()

Persistence is on (`persistence_location` in the broker's directory, saved every second and on
exit), so persistent sessions and the QoS 1 messages queued for offline clients survive a
restart, as on a production broker. The broker's log is `<dir>/mosquitto.log`
(`Mosquitto.log_tail()` for error messages).

`Mosquitto(dir, tls=BrokerTls(cafile, certfile, keyfile))` makes the listener mTLS as in
production: a client certificate from the CA is required, its CN is the MQTT username, and the
ACL keeps each gateway to its own topics (`dergw/v1/<CN>/up/#` write, `.../down/#` read) while
the user `headend_user` (default "headend") may use every topic.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["BrokerTls", "Mosquitto", "MosquittoError", "find_mosquitto"]

_CANDIDATES = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto")


class MosquittoError(RuntimeError):
    """The broker could not be started (the message has the end of its log)."""


def find_mosquitto() -> str | None:
    """Path of the mosquitto binary (PATH first, then the usual sbin directories)."""
    found = shutil.which("mosquitto")
    if found is not None:
        return found
    return next((path for path in _CANDIDATES if os.access(path, os.X_OK)), None)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class BrokerTls:
    """The broker's mTLS listener: CA for client certificates, the broker's own certificate."""

    cafile: Path
    certfile: Path
    keyfile: Path
    headend_user: str = "headend"
    topic_prefix: str = "dergw/v1"

    def acl(self) -> str:
        return "\n".join(
            [
                f"user {self.headend_user}",
                "topic readwrite #",
                "",
                f"pattern write {self.topic_prefix}/%u/up/#",
                f"pattern read {self.topic_prefix}/%u/down/#",
                "",
            ]
        )


class Mosquitto:
    """One mosquitto process on 127.0.0.1; the port stays the same across restarts."""

    def __init__(
        self,
        directory: Path,
        *,
        binary: str | None = None,
        port: int | None = None,
        host: str = "127.0.0.1",
        max_queued_messages: int = 100_000,
        extra_config: str = "",
        tls: BrokerTls | None = None,
    ) -> None:
        found = binary or find_mosquitto()
        if found is None:
            raise MosquittoError("mosquitto not found (apt install mosquitto)")
        self.binary = found
        self.directory = Path(directory)
        self.host = host
        self.port = port or _free_port(host)
        self.max_queued_messages = max_queued_messages
        self.extra_config = extra_config
        self.tls = tls
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def address(self) -> str:
        """ "host:port", as the gateway config's `broker` and the headend's `--mqtt` take it."""
        return f"{self.host}:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.directory / "mosquitto.conf"

    @property
    def log_path(self) -> Path:
        return self.directory / "mosquitto.log"

    def _write_config(self) -> None:
        persistence = self.directory / "persistence"
        persistence.mkdir(parents=True, exist_ok=True)
        lines = [f"listener {self.port} {self.host}"]
        if self.tls is None:
            lines.append("allow_anonymous true")
        else:
            acl = self.directory / "acl"
            acl.write_text(self.tls.acl())
            lines += [
                f"cafile {self.tls.cafile}",
                f"certfile {self.tls.certfile}",
                f"keyfile {self.tls.keyfile}",
                "require_certificate true",
                "use_identity_as_username true",
                "allow_anonymous false",
                f"acl_file {acl}",
            ]
        lines += [
            "persistence true",
            f"persistence_location {persistence}/",
            "persistence_file mosquitto.db",
            "autosave_interval 1",
            "set_tcp_nodelay true",
            f"max_queued_messages {self.max_queued_messages}",
            "max_queued_bytes 0",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        ]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            # Run as root, mosquitto drops to user "mosquitto", who cannot write this directory.
            lines.append("user root")
        if self.extra_config:
            lines.append(self.extra_config)
        self.config_path.write_text("\n".join(lines) + "\n")

    def start(self, *, timeout_s: float = 10.0) -> None:
        if self.running:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        self._write_config()
        self.process = subprocess.Popen(
            [self.binary, "-c", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.starts += 1
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                code = self.process.returncode
                self.process = None
                raise MosquittoError(
                    f"mosquitto exited with {code} at start on {self.address}:\n{self.log_tail()}"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise MosquittoError(
                    f"mosquitto did not accept on {self.address} within {timeout_s:g} s:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.02)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, *, timeout_s: float = 10.0) -> None:
        """SIGTERM: the broker saves its persistence file and exits."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def kill(self) -> None:
        """SIGKILL: no goodbye to clients (their wills are not published by this broker) and
        only what the last autosave wrote survives."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.kill()
        process.wait()

    def restart(self, *, kill: bool = False) -> None:
        """Stop (or kill) and start again on the same port."""
        if kill:
            self.kill()
        else:
            self.stop()
        self.start()

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> Mosquitto:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

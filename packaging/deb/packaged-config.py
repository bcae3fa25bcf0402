"""Print the packaged /etc/dergw/gateway.toml: config.example.toml adapted to the appliance.

State in /var/lib/dergw (systemd's StateDirectory), the local API socket in /run/dergw
(RuntimeDirectory), mTLS on (identity from `dergw enroll`), the intent trust file at its default
place in the state directory, and events waiting for a synchronised clock. The devices stay the
example's: the installer edits them for the site. Fails when the example no longer has a line
this adapts, so the two cannot drift apart silently.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

HEADER = """\
# /etc/dergw/gateway.toml: this gateway's site config (a conffile of the dergw package).
# Edit [gateway] id, [site], [uplink] and the [[devices]] for this site, then check it with
#   dergw check-config /etc/dergw/gateway.toml && systemctl restart dergw-gateway
"""

RULES: tuple[tuple[str, str], ...] = (
    (
        r"This example talks to\n# a local `dergw headend run` without --tls-dir: plaintext, for "
        r"local development ONLY\.",
        "Enroll with\n# `dergw enroll` or the first-boot token on the boot partition "
        "(rpi/README.md).",
    ),
    (r'(?m)^state_dir = "[^"]*"[^\n]*$', 'state_dir = "/var/lib/dergw"   # systemd StateDirectory'),
    (r"(?m)^tls = false[^\n]*$", "tls = true                      # identity from `dergw enroll`"),
    (
        r"(?m)^intent_keys_file = [^\n]*$",
        "# intent_keys_file: default <state_dir>/intent-keys.json",
    ),
    (
        r'(?m)^clock_trust = "assume"',
        'clock_trust = "file:/run/systemd/timesync/synchronized"',
    ),
)


def adapt(text: str) -> str:
    for pattern, replacement in RULES:
        text, count = re.subn(pattern, replacement, text)
        if count != 1:
            raise SystemExit(f"packaged-config: {pattern!r} matched {count} times, expected 1")
    socket_line = 'socket = "/run/dergw/dergw.sock"   # systemd RuntimeDirectory'
    if re.search(r"(?m)^\[local_api\]", text):
        text, count = re.subn(r"(?m)^#?\s*socket = [^\n]*$", socket_line, text)
        if count != 1:
            raise SystemExit("packaged-config: [local_api] has no single socket line to adapt")
    else:
        text = text.rstrip("\n") + f"\n\n[local_api]\n{socket_line}\n"
    return HEADER + text


if __name__ == "__main__":
    sys.stdout.write(adapt(Path(sys.argv[1]).read_text()))

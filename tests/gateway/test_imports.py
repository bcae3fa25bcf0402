"""The gateway imports only what its config uses (ARCHITECTURE.md: resident memory ≤ 70 MB).

Each case runs a real gateway (`gateway.runtime.app.Gateway`, built from a config file and run
for a moment: drivers dial their devices, the uplink dials the headend; nothing answers) in a
fresh interpreter, then verifies one signed intent (its verifier loads on first use), and lists
the packages it imported. The `cryptography` package (~7 MB resident) is for TLS certificates
only: intent signatures are verified through the process's libcrypto (gateway.ed25519).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# Never in a gateway process, whatever the config.
NEVER = ("hil", "headend_min", "fastapi", "uvicorn", "starlette", "sqlite_utils", "click")

PROBE = textwrap.dedent(
    """
    import asyncio, json, sys
    from pathlib import Path
    from gateway.config import load_config
    from gateway.runtime.app import Gateway

    async def main() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(1.0, stop.set)
        await Gateway(load_config(Path(sys.argv[1]))).run(stop)

    asyncio.run(main())

    from dergw.v1 import pb
    from dergw.v1.trust import TrustedKeys
    from gateway.intent_verify import IntentRefused, verify_signed_intent

    key = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
    trusted = TrustedKeys.of(key)
    forged = pb.SignedIntent(payload=b"x", key_id=next(iter(trusted)), signature=bytes(64))
    refused = verify_signed_intent(
        forged, trusted_keys=trusted, gateway_id="gw-imports", site_id="site-imports",
        persisted_version=0, now_ns=0, clock_trusted=False,
    )
    assert isinstance(refused, IntentRefused) and refused.name == "BAD_SIGNATURE", refused
    print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
    """
)


def _config(tmp_path: Path, uplink: str) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(
        textwrap.dedent(
            f"""
            [gateway]
            id = "gw-imports"
            state_dir = "{tmp_path / "state"}"
            [site]
            id = "site-imports"
            name = "imports"
            [uplink]
            {uplink}
            reconnect_max_s = 1
            [[devices]]
            id = "pv1"
            kind = "pv"
            driver = "sunspec-modbus"
            [devices.params]
            host = "127.0.0.1"
            port = 9
            unit_id = 1
            [[devices]]
            id = "meter1"
            kind = "meter"
            role = "pcc"
            driver = "sunspec-modbus"
            [devices.params]
            host = "127.0.0.1"
            port = 9
            unit_id = 2
            """
        )
    )
    return path


def _imported(config: Path) -> set[str]:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout.splitlines()[-1]))


@pytest.mark.parametrize(
    ("uplink", "expected", "absent"),
    [
        # The gateway's gRPC client is grpclib (~3 MB resident); grpcio (~17 MB) is the
        # headend's server only.
        (
            'transport = "grpc"\ntarget = "127.0.0.1:9"',
            {"grpclib", "pymodbus", "numpy"},
            {"grpc", "paho", "asyncua", "dnp3", "pydnp3", "dnp3py"},
        ),
        (
            'transport = "mqtt"\nbroker = "127.0.0.1:9"',
            {"paho", "pymodbus"},
            {"grpc", "grpclib", "asyncua", "dnp3", "pydnp3", "dnp3py"},
        ),
        (
            'transport = "grpc"\ntarget = "127.0.0.1:9"\ntls = false',
            {"grpclib", "pymodbus"},
            {"grpc", "paho", "cryptography"},
        ),
        (
            'transport = "mqtt"\nbroker = "127.0.0.1:9"\ntls = false',
            {"paho", "pymodbus"},
            {"grpc", "grpclib", "cryptography"},
        ),
    ],
    ids=["grpc", "mqtt", "grpc-plaintext", "mqtt-plaintext"],
)
def test_gateway_imports_only_what_its_config_uses(
    tmp_path: Path, uplink: str, expected: set[str], absent: set[str]
) -> None:
    imported = _imported(_config(tmp_path, uplink))
    assert expected <= imported
    assert not (imported & (absent | set(NEVER))), sorted(imported & (absent | set(NEVER)))

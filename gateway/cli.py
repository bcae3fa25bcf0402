"""The `dergw` command: one front door, each part of the product behind its own subcommand.

Subcommands are imported lazily by module path, so running the gateway never loads the headend's
web stack or the simulator, and `gateway/` takes no code dependency on `headend_min/` or `hil/`.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence

# subcommand -> (module, function, one-line help). The function takes argv (after the subcommand)
# and returns a process exit code.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "gateway": (
        "gateway.runtime.app",
        "main",
        "run the site gateway (`dergw gateway run --config F`)",
    ),
    "check-config": ("gateway.config", "check_config_main", "validate a gateway config file"),
    "enroll": (
        "gateway.enroll_cli",
        "main",
        "get this gateway's certificate (`dergw enroll --headend URL --token T --config F`)",
    ),
    "scan": (
        "gateway.scan",
        "scan_main",
        "find devices (`dergw scan modbus HOST[:PORT]`, `dergw scan rtu /dev/ttyX`, "
        "`dergw scan opcua URL`)",
    ),
    "audit": (
        "gateway.audit_cli",
        "main",
        "check or list the gateway's audit log (`dergw audit verify|show --config F`)",
    ),
    "metrics": (
        "gateway.metrics_cli",
        "main",
        "the gateway's Prometheus metrics (`dergw metrics --socket S [--textfile F]`)",
    ),
    "console": (
        "gateway.console.cli",
        "main",
        "the site technician's terminal UI (`dergw console [--config F] [--allow-writes]`)",
    ),
    "headend": ("headend_min.cli", "main", "run the headend (`dergw headend run`)"),
    "hil": ("hil.cli", "main", "simulated sites and HIL scenarios (`dergw hil run|scenario`)"),
    "demo": ("hil.cli", "demo_main", "headend + simulated site + gateway on loopback"),
    "bench": (
        "bench.cli",
        "main",
        "benchmarks held to ARCHITECTURE.md's budgets (`dergw bench [NAME...] [--quick]`)",
    ),
}


def _usage() -> str:
    lines = ["usage: dergw COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<13} {help_text}" for name, (_, _, help_text) in COMMANDS.items()]
    lines += ["", "`dergw COMMAND --help` for the options of a command."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in {"-h", "--help", "help"}:
        print(_usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"dergw: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name, _ = COMMANDS[name]
    func: Callable[[list[str]], int] = getattr(importlib.import_module(module_name), func_name)
    return func(rest)


if __name__ == "__main__":
    sys.exit(main())

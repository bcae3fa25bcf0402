"""`dergw scan`: the commissioning scan. Find SunSpec devices on a Modbus TCP gateway or an RS-485
bus and print what they are, with a `[[devices]]` block ready to paste into the gateway config.

    dergw scan modbus HOST[:PORT] [--units 1-247] [--timeout S]
    dergw scan rtu /dev/ttyUSB0 --baud 9600 [--parity N|E|O] [--units 1-247] [--timeout S]
    dergw scan opcua opc.tcp://HOST:PORT/PATH [--security none|basic256sha256 --cert C --key K]

Discovery is the SunSpec driver's own (`drivers.sunspec.driver`): the same code that will talk to
the device in service, so a device the scan finds is one the gateway can run. A unit is tried as
a battery, then a PV inverter, then a meter (the first whose required models the device has);
a unit that does not answer, or answers without the SunSpec marker, is skipped at the first try.

On OPC UA (`browse_opcua`) the scan browses the Objects folder (outside namespace 0, up to
`--depth` levels) for objects whose variables carry the canonical SunSpec names the OPC UA driver
reads (`W` and at least one more of `SoC`, `WMaxLimPct`, `Hz`, ...), guesses the kind from them
(storage points -> battery, meter energy registers -> meter, else PV), and confirms each candidate
with the OPC UA driver's own discovery (`connect()` with the params it prints). Security is
Basic256Sha256 SignAndEncrypt with `--cert`/`--key` unless `--security none` is given.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from drivers.contract import DeviceInfo, DeviceKind, DriverError
from drivers.sunspec.driver import SunSpecModbusDriver, SunSpecModbusParams
from gateway.clock import SystemClock

__all__ = [
    "Found",
    "OpcUaFound",
    "browse_opcua",
    "opcua_toml_block",
    "parse_units",
    "scan",
    "scan_main",
]

# Tried in this order: a battery inverter also carries the PV inverter models.
_KINDS = (DeviceKind.BATTERY, DeviceKind.PV, DeviceKind.METER)
# The driver's message when the device answers but lacks the models of the kind it was given.
_WRONG_KIND = "is configured as"


class ScanUsageError(ValueError):
    """A bad argument; the message says what was expected."""


@dataclass(frozen=True)
class Found:
    unit_id: int
    info: DeviceInfo
    model_ids: tuple[int, ...]
    base_address: int | None


def parse_units(text: str) -> list[int]:
    """'1-247', '3', '1,3,10-12' -> unit ids (1..247), sorted, no duplicates."""
    units: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        low, _, high = part.partition("-")
        try:
            first, last = int(low), int(high or low)
        except ValueError:
            raise ScanUsageError(f"--units {text!r}: write ids like 1-247 or 1,3,10-12") from None
        if not 1 <= first <= last <= 247:
            raise ScanUsageError(f"--units {text!r}: unit ids are 1..247, low-high")
        units.update(range(first, last + 1))
    return sorted(units)


async def _probe(params: dict[str, Any], unit_id: int) -> Found | None:
    for kind in _KINDS:
        checked = SunSpecModbusParams.model_validate({**params, "unit_id": unit_id})
        driver = SunSpecModbusDriver(f"unit{unit_id}", kind, checked, SystemClock())
        try:
            info = await driver.connect()
        except DriverError as exc:
            if _WRONG_KIND in str(exc):
                continue  # a SunSpec device, just not this kind
            return None  # no answer, or not SunSpec
        finally:
            await driver.close()
        model_ids = tuple(model.model_id for model in driver.models)
        return Found(unit_id, info, model_ids, driver.base_address)
    return None


async def scan(params: dict[str, Any], units: list[int], *, out: Any = None) -> list[Found]:
    """Probe `units` one after the other (a serial bus takes one request at a time)."""
    found: list[Found] = []
    for unit_id in units:
        result = await _probe(params, unit_id)
        if result is not None:
            found.append(result)
            if out is not None:
                print(f"unit {unit_id}: {result.info.kind.value} found", file=out, flush=True)
    return found


def _toml_block(found: Found, params: dict[str, Any]) -> str:
    kind = found.info.kind.value
    lines = [
        "[[devices]]",
        f'id = "{kind}{found.unit_id}"',
        f'kind = "{kind}"',
        'driver = "sunspec-modbus"',
        "poll_period_s = 1.0",
    ]
    if found.info.kind is DeviceKind.METER:
        lines.append('# role = "pcc"            # if this meter measures the point of connection')
    lines.append("[devices.params]")
    for key in ("transport", "host", "port", "serial_port", "baudrate", "parity"):
        if key in params:
            value = params[key]
            lines.append(f'{key} = "{value}"' if isinstance(value, str) else f"{key} = {value}")
    lines.append(f"unit_id = {found.unit_id}")
    return "\n".join(lines)


def _describe(found: Found) -> str:
    info, plate = found.info, found.info.nameplate
    ratings = ", ".join(
        f"{label} {value:g}"
        for label, value in (
            ("max W", plate.max_w),
            ("max VA", plate.max_va),
            ("charge W", plate.max_charge_w),
            ("discharge W", plate.max_discharge_w),
            ("Wh", plate.energy_wh),
        )
        if value
    )
    return (
        f"unit {found.unit_id}: {info.kind.value} — {info.manufacturer} {info.model}, serial "
        f"{info.serial_number or '?'}; SunSpec base {found.base_address}, models "
        f"{', '.join(map(str, found.model_ids))}; {ratings or 'no ratings'}; "
        f"{len(info.schema)} points"
    )


# ---------------------------------------------------------------------------------- OPC UA

# The names the OPC UA driver reads (drivers.opcua.driver: the SunSpec canonical set).
_BATTERY_HINTS = frozenset(("SoC", "StorCtlMod", "InWRte", "OutWRte", "WHRtg", "BatState"))
_METER_HINTS = frozenset(("TotWhImp", "TotWhExp", "WphA", "WphB", "WphC"))
_CONTROL_HINTS = frozenset(("WMaxLimPct", "WMaxLimEna", "StorCtlMod", "Conn"))
_MAX_OBJECTS = 5_000  # browse budget: a big server is not walked forever


@dataclass(frozen=True)
class OpcUaFound:
    """One object that looks like a DER, with the driver params that reach it."""

    path: tuple[str, ...]  # browse names from the Objects folder down to the device object
    node_id: str
    namespace_uri: str
    kind: DeviceKind
    points: tuple[str, ...]  # the canonical names among its variables
    params: dict[str, Any]  # the `[devices.params]` of a driver = "opcua" device
    info: DeviceInfo | None = None  # the driver's discovery (None when it failed)
    error: str | None = None


def _guess_kind(points: frozenset[str]) -> DeviceKind:
    if points & _BATTERY_HINTS:
        return DeviceKind.BATTERY
    if points & _METER_HINTS and not points & _CONTROL_HINTS:
        return DeviceKind.METER
    return DeviceKind.PV


async def _opcua_client(
    url: str,
    *,
    security: str,
    cert: Path | None,
    key: Path | None,
    application_uri: str,
    timeout_s: float,
) -> Any:
    from asyncua import ua
    from asyncua.client.client import Client
    from asyncua.crypto import security_policies

    client = Client(url, timeout=timeout_s)
    client.application_uri = application_uri
    client.name = "dergw scan"
    if security != "none":
        await client.set_security(
            security_policies.SecurityPolicyBasic256Sha256,
            certificate=str(cert),
            private_key=str(key),
            mode=ua.MessageSecurityMode.SignAndEncrypt,
        )
    await client.connect()
    return client


async def _walk(client: Any, max_depth: int, canonical: frozenset[str]) -> list[tuple[Any, ...]]:
    """(path, path namespace indexes, node id, canonical names) of every DER-looking object."""
    from asyncua import ua

    hits: list[tuple[Any, ...]] = []
    queue: list[tuple[Any, tuple[str, ...], tuple[int, ...]]] = [(client.nodes.objects, (), ())]
    seen = {client.nodes.objects.nodeid}
    while queue and len(seen) <= _MAX_OBJECTS:
        node, path, ns = queue.pop(0)
        descriptions = await node.get_children_descriptions()
        variables = {
            d.BrowseName.Name for d in descriptions if d.NodeClass == ua.NodeClass.Variable
        }
        points = variables & canonical
        if path and "W" in points and len(points) >= 2:
            hits.append((path, ns, node.nodeid, frozenset(points)))
        if len(path) >= max_depth:
            continue
        for d in descriptions:
            if d.NodeClass != ua.NodeClass.Object or d.NodeId.NamespaceIndex == 0:
                continue  # namespace 0 holds the standard Server object, not devices
            if d.NodeId in seen:
                continue  # organised from two places (or a loop): browse it once
            seen.add(d.NodeId)
            child = client.get_node(d.NodeId)
            queue.append((child, (*path, d.BrowseName.Name), (*ns, d.BrowseName.NamespaceIndex)))
    return hits


def _slug(text: str, used: set[str]) -> str:
    base = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-._")[:56] or "device"
    slug, n = base, 2
    while slug in used:
        slug, n = f"{base}-{n}", n + 1
    used.add(slug)
    return slug


async def browse_opcua(
    url: str,
    *,
    security: str = "basic256sha256",
    cert: Path | None = None,
    key: Path | None = None,
    application_uri: str = "urn:dergw:gateway",
    timeout_s: float = 2.0,
    max_depth: int = 3,
    verify: bool = True,
) -> list[OpcUaFound]:
    """Browse `url` for DER-looking objects; with `verify`, run the driver's discovery on each."""
    from asyncua.ua.uaerrors import UaError

    from drivers.opcua.driver import OpcUaDriver, OpcUaParams, known_variable_names

    if security not in ("none", "basic256sha256"):
        raise ScanUsageError(f"--security {security!r}: none or basic256sha256")
    if security != "none" and (cert is None or key is None):
        raise ScanUsageError(
            "--security basic256sha256 needs --cert and --key (the gateway's client certificate "
            "and key); use --security none to browse without security"
        )
    try:
        client = await _opcua_client(
            url,
            security=security,
            cert=cert,
            key=key,
            application_uri=application_uri,
            timeout_s=timeout_s,
        )
    except (OSError, TimeoutError, UaError, ValueError) as exc:
        raise DriverError(
            f"cannot open an OPC UA session to {url}: {str(exc) or type(exc).__name__}"
        ) from exc
    try:
        namespaces = await client.get_namespace_array()
        hits = await _walk(client, max_depth, known_variable_names())
    except (OSError, TimeoutError, UaError) as exc:
        raise DriverError(f"browsing {url} failed: {str(exc) or type(exc).__name__}") from exc
    finally:
        try:
            await asyncio.wait_for(client.disconnect(), timeout_s)
        except Exception:  # the session is going anyway
            client.disconnect_socket()
    found: list[OpcUaFound] = []
    for path, ns, nodeid, points in hits:
        base: dict[str, Any] = {"url": url}
        plain = not any("/" in name or re.match(r"\d+:", name) for name in path)
        if len(set(ns)) == 1 and plain:
            base |= {"root": "/".join(path), "namespace_uri": namespaces[ns[0]]}
        else:  # a path across namespaces (or odd names): the NodeId says it in one string
            base |= {"root": nodeid.to_string()}
        if security == "none":
            base["security"] = "none"
        else:
            base |= {"client_cert": str(cert), "client_key": str(key)}
        if application_uri != "urn:dergw:gateway":
            base["application_uri"] = application_uri
        kind = _guess_kind(points)
        item = OpcUaFound(
            path=path,
            node_id=nodeid.to_string(),
            namespace_uri=namespaces[nodeid.NamespaceIndex],
            kind=kind,
            points=tuple(sorted(points)),
            params=base,
        )
        if verify:
            params = OpcUaParams.model_validate(base | {"timeout_s": timeout_s})
            driver = OpcUaDriver(path[-1], kind, params, SystemClock())
            try:
                item = replace(item, info=await driver.connect())
            except DriverError as exc:
                item = replace(item, error=str(exc))
            finally:
                await driver.close()
        found.append(item)
    return found


def opcua_toml_block(found: OpcUaFound, device_id: str) -> str:
    """The `[[devices]]` block of one found object (values as TOML basic strings)."""
    lines = [
        "[[devices]]",
        f'id = "{device_id}"',
        f'kind = "{found.kind.value}"',
        'driver = "opcua"',
        "poll_period_s = 1.0",
    ]
    if found.kind is DeviceKind.METER:
        lines.append('# role = "pcc"            # if this meter measures the point of connection')
    lines.append("[devices.params]")
    lines.extend(f"{k} = {json.dumps(v)}" for k, v in found.params.items())
    return "\n".join(lines)


def _describe_opcua(found: OpcUaFound) -> str:
    where = f"Objects/{'/'.join(found.path)} ({found.node_id} in {found.namespace_uri})"
    if found.info is None:
        state = f"driver discovery failed: {found.error}" if found.error else "not verified"
        return f"{where}: looks like a {found.kind.value} ({', '.join(found.points)}); {state}"
    info, plate = found.info, found.info.nameplate
    ratings = ", ".join(
        f"{label} {value:g}"
        for label, value in (
            ("max W", plate.max_w),
            ("charge W", plate.max_charge_w),
            ("discharge W", plate.max_discharge_w),
            ("Wh", plate.energy_wh),
        )
        if value
    )
    controls = ", ".join(sorted(c.value for c in info.controls)) or "none"
    return (
        f"{where}: {info.kind.value} — {info.manufacturer} {info.model}, serial "
        f"{info.serial_number or '?'}; {ratings or 'no ratings'}; {len(info.schema)} points; "
        f"controls {controls}"
    )


def _scan_opcua_main(args: argparse.Namespace) -> int:
    try:
        found = asyncio.run(
            browse_opcua(
                args.url,
                security=args.security,
                cert=args.cert,
                key=args.key,
                application_uri=args.application_uri,
                timeout_s=args.timeout,
                max_depth=args.depth,
            )
        )
    except ScanUsageError as exc:
        print(f"dergw scan: {exc}", file=sys.stderr)
        return 2
    except DriverError as exc:
        print(f"dergw scan: {exc}", file=sys.stderr)
        return 1
    if not found:
        print(f"no object with DER variables (W, SoC, WMaxLimPct, ...) under Objects on {args.url}")
        return 1
    used: set[str] = set()
    blocks = []
    for item in found:
        print(f"# {_describe_opcua(item)}")
        block = opcua_toml_block(item, _slug(item.path[-1], used))
        blocks.append(block if item.info is not None else "# " + block.replace("\n", "\n# "))
    print()
    print("\n\n".join(blocks))
    return 0 if any(item.info is not None for item in found) else 1


def scan_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dergw scan", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="bus", required=True)
    tcp = sub.add_parser("modbus", help="Modbus TCP: a device or a Modbus gateway")
    tcp.add_argument("target", help="HOST[:PORT] (port 502 by default)")
    rtu = sub.add_parser("rtu", help="Modbus RTU on a serial port (RS-485)")
    rtu.add_argument("serial_port", help="e.g. /dev/ttyUSB0")
    rtu.add_argument("--baud", type=int, default=9600)
    rtu.add_argument("--parity", choices=("N", "E", "O"), default="N")
    opcua = sub.add_parser("opcua", help="browse an OPC UA server for DER objects")
    opcua.add_argument("url", help="opc.tcp://HOST:PORT/PATH")
    opcua.add_argument("--security", choices=("none", "basic256sha256"), default="basic256sha256")
    opcua.add_argument("--cert", type=Path, help="client certificate (DER or PEM)")
    opcua.add_argument("--key", type=Path, help="client private key (PEM)")
    opcua.add_argument("--application-uri", default="urn:dergw:gateway")
    opcua.add_argument("--depth", type=int, default=3, help="levels below Objects to browse")
    opcua.add_argument("--timeout", type=float, default=2.0, help="per request, seconds")
    for command in (tcp, rtu):
        command.add_argument("--units", default="1-247", help="unit ids, e.g. 1-247 or 1,3,10-12")
        command.add_argument("--timeout", type=float, default=0.5, help="per request, seconds")
    args = parser.parse_args(argv)
    if args.bus == "opcua":
        return _scan_opcua_main(args)
    try:
        units = parse_units(args.units)
    except ScanUsageError as exc:
        print(f"dergw scan: {exc}", file=sys.stderr)
        return 2
    params: dict[str, Any]
    if args.bus == "modbus":
        host, _, port = args.target.rpartition(":") if ":" in args.target else (args.target, "", "")
        params = {"transport": "tcp", "host": host or args.target, "timeout_s": args.timeout}
        if port:
            params["port"] = int(port)
    else:
        params = {
            "transport": "rtu",
            "serial_port": args.serial_port,
            "baudrate": args.baud,
            "parity": args.parity,
            "timeout_s": args.timeout,
        }
    try:
        SunSpecModbusParams.model_validate({**params, "unit_id": 1})
    except ValueError as exc:
        print(f"dergw scan: {exc}", file=sys.stderr)
        return 2
    print(f"scanning {len(units)} unit ids ...", file=sys.stderr, flush=True)
    found = asyncio.run(scan(params, units, out=sys.stderr))
    if not found:
        print("no SunSpec device answered", file=sys.stderr)
        return 1
    for result in found:
        print(f"# {_describe(result)}")
    print()
    config_params = {k: v for k, v in params.items() if k != "timeout_s"}
    print("\n\n".join(_toml_block(result, config_params) for result in found))
    return 0

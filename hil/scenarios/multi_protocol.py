"""Scenarios on a mixed-protocol site (hil/sites/multi.toml): `multi-protocol` and `dnp3-crash`.

`multi-protocol`: the export-limit scenario (hil.scenarios.export_limit) on a site whose devices
speak Modbus TCP, Modbus RTU, OPC UA and DNP3, plus a check that the headend learned every device
over the protocol the simulator serves it on. The physics is shared, so the PCC meter (on RTU)
sees the PV on Modbus TCP and on DNP3 and the battery on OPC UA; the limit is only met if the
gateway curtails across protocols.

`dnp3-crash`: during an export-limit event, the DNP3 driver's master child process
(`drivers.dnp3.worker`, a child of the gateway process) is killed with SIGKILL, as a native crash
of a C++ stack would end it. Judged: the export limit holds at the PCC throughout (the other
devices keep being controlled, the plant keeps its last cap until its reversion timer), the
headend's reported state says the DNP3 device is unavailable, then available again, and the
gateway re-writes the plant's cap once its driver has a new child. The driver's restart backoff
is set longer than the gateway's periodic state report so the outage is visible at the headend.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from hil.scenarios.export_limit import ExportLimitParams, run_export_limit
from hil.scenarios.harness import Bench, gateway_config_text
from hil.scenarios.probe import reported_state, site_devices, wait_until
from hil.scenarios.report import Check, ScenarioResult
from hil.scenarios.watch import CapSample, SiteWatcher

__all__ = [
    "DNP3_WORKER_MODULE",
    "Dnp3CrashParams",
    "dnp3_worker_pids",
    "run_dnp3_crash",
    "run_multi_protocol",
]

DNP3_WORKER_MODULE = "drivers.dnp3.worker"
EVENT_ID = "export-limit-dnp3-crash"

# What the gateway's drivers report as DeviceInfo.protocol, by the site file's protocol.
DRIVER_PROTOCOL = {
    "modbus-tcp": "sunspec-modbus-tcp",
    "modbus-rtu": "sunspec-modbus-rtu",
    "opcua": "opcua",
    "dnp3": "dnp3-tcp",
}

MULTI_PROTOCOL_PARAMS = ExportLimitParams(
    limit_w=3000.0, baseline_s=6.0, event_s=25, after_s=14.0, settle_s=10.0, tolerance_w=300.0
)


async def _protocol_check(bench: Bench) -> Check:
    site = await bench.api.get(f"/sites/{bench.site_id}")
    learned = {d["device_id"]: d["protocol"] for d in site["devices"]}
    wanted = {d.id: DRIVER_PROTOCOL[d.protocol] for d in bench.spec.devices}
    return Check(
        "the headend learned every device over the protocol the site serves it on",
        learned == wanted,
        ", ".join(f"{i}: {learned.get(i, 'missing')}" for i in sorted(wanted)),
    )


async def run_multi_protocol(bench: Bench, out: TextIO) -> ScenarioResult:
    result = await run_export_limit(bench, out, MULTI_PROTOCOL_PARAMS)
    result.name = "multi-protocol"
    result.checks.append(await _protocol_check(bench))
    return result


@dataclass(frozen=True)
class Dnp3CrashParams:
    limit_w: float = 3000.0
    event_s: int = 300  # outlasts the scenario; the gateway is stopped while it is in force
    control_period_s: float = 0.5
    poll_period_s: float = 0.5
    revert_timeout_s: int = 60  # the plant's reversion timer: longer than the outage
    refresh_s: float = 5.0  # an unchanged cap is re-written at least this often
    restart_backoff_s: float = 12.0  # > the gateway's 10 s periodic state report
    settle_timeout_s: float = 30.0
    settle_hold_s: float = 3.0
    unavailable_timeout_s: float = 20.0
    recover_timeout_s: float = 45.0
    rewrite_timeout_s: float = 20.0
    tolerance_w: float = 300.0  # export over the limit allowed (noise, one poll of delay)


def dnp3_worker_pids(gateway_pid: int) -> list[int]:
    """The DNP3 master children of the gateway process (one per DNP3 device).

    psutil (a dev dependency) where installed, else /proc (the bench runs on Linux).
    """
    try:
        import psutil  # type: ignore[import-untyped,unused-ignore]
    except ImportError:
        return _proc_children(gateway_pid)
    try:
        children = psutil.Process(gateway_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    pids = []
    for child in children:
        try:
            if DNP3_WORKER_MODULE in " ".join(child.cmdline()):
                pids.append(int(child.pid))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return pids


def _proc_children(parent: int) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == parent and DNP3_WORKER_MODULE in cmdline:
            pids.append(int(stat.parent.name))
    return pids


def _availability(state: dict[str, Any] | None, device_id: str) -> tuple[bool | None, str]:
    if state is None:
        return None, ""
    entry = next((d for d in state["devices"] if d["device_id"] == device_id), None)
    if entry is None:
        return None, ""
    return bool(entry["available"]), str(entry["reason"])


async def run_dnp3_crash(
    bench: Bench, out: TextIO, params: Dnp3CrashParams | None = None
) -> ScenarioResult:
    params = params or Dnp3CrashParams()
    result = ScenarioResult("dnp3-crash")
    plants = [d for d in bench.spec.devices if d.protocol == "dnp3"]
    devices = site_devices(bench)
    result.checks.extend(devices.requirements("pv", "pcc meter"))
    if not plants:
        result.checks.append(
            Check(
                "this scenario needs a DNP3 device",
                False,
                "the site file has no device with protocol = 'dnp3'; use multi.toml",
            )
        )
    if result.checks:
        return result
    plant = plants[0]
    others = [d for d in devices.pv if d.id != plant.id]
    dnp3_sim: Any = bench.sim.protocol_sim(plant.id)
    assert bench.gateway_config is not None
    bench.gateway_config.write_text(
        gateway_config_text(
            bench,
            control_period_s=params.control_period_s,
            poll_period_s=params.poll_period_s,
            revert_timeout_s=params.revert_timeout_s,
            refresh_s=params.refresh_s,
            extra_params={plant.id: f"restart_backoff_s = {params.restart_backoff_s}"},
        )
    )
    gateway = await bench.start_gateway()
    await bench.wait_registered(timeout_s=60.0)
    limit, tol = params.limit_w, params.tolerance_w
    phase = ["free"]

    def label(wall: float) -> tuple[float | None, str]:
        return (None if phase[0] == "free" else limit), phase[0]

    def under_limit(sample: CapSample) -> bool:
        return sample.export_w <= limit + tol

    async with SiteWatcher(bench, out, label) as watch:
        posted = await bench.api.post(
            f"/sites/{bench.site_id}/intents",
            {
                "events": [
                    {
                        "event_id": EVENT_ID,
                        "duration_s": params.event_s,
                        "controls": {"export_limit_w": limit},
                    }
                ]
            },
        )
        phase[0] = "limit"
        watch.note(f"posted intent v{posted['version']}: export limit {limit:.0f} W")
        settled_since: list[float] = []

        def settled(sample: CapSample) -> bool:
            if not (under_limit(sample) and sample.caps_pct[plant.id] < 100.0):
                settled_since.clear()
                return False
            settled_since[:1] = settled_since[:1] or [sample.wall]
            return sample.wall - settled_since[0] >= params.settle_hold_s

        ok = await watch.wait_for(settled, timeout_s=params.settle_timeout_s)
        result.checks.append(
            Check(
                f"before the crash: export under the limit with the DNP3 plant {plant.id} capped",
                ok is not None,
                "settled" if ok else f"not within {params.settle_timeout_s:.0f} s",
            )
        )
        if ok is None:
            return result

        # -- the crash ----------------------------------------------------------------------
        victims = dnp3_worker_pids(gateway.process.pid)
        result.checks.append(
            Check(
                "found the DNP3 master child of the gateway process",
                len(victims) == 1,
                f"pids {victims}",
            )
        )
        if len(victims) != 1:
            return result
        controls_before = dnp3_sim.controls_applied
        kill_wall, kill_mono = time.time(), time.monotonic()
        os.kill(victims[0], signal.SIGKILL)
        phase[0] = "dnp3 crashed"
        watch.note(f"kill -9 of the DNP3 master child (pid {victims[0]})")

        async def unavailable() -> str | None:
            available, reason = _availability(await reported_state(bench), plant.id)
            if available is False:
                return reason or "unavailable"
            return None

        reason, waited = await wait_until(unavailable, timeout_s=params.unavailable_timeout_s)
        result.checks.append(
            Check(
                f"the headend's reported state says {plant.id} is unavailable",
                reason is not None,
                f"after {waited:.1f} s: {reason}" if reason else "never",
            )
        )
        if reason is not None:
            watch.note(f"headend: {plant.id} unavailable ({reason})")

        async def available_again() -> bool | None:
            available, _ = _availability(await reported_state(bench), plant.id)
            return True if available else None

        back, waited = await wait_until(available_again, timeout_s=params.recover_timeout_s)
        back_mono = time.monotonic()
        new_pids = dnp3_worker_pids(gateway.process.pid)
        result.checks.append(
            Check(
                f"{plant.id} is available again at the headend, with a new DNP3 master child",
                bool(back) and bool(new_pids) and victims[0] not in new_pids,
                f"after {time.monotonic() - kill_mono:.1f} s, child pids {new_pids}"
                if back
                else f"not within {params.recover_timeout_s:.0f} s",
            )
        )
        phase[0] = "limit"
        if back:
            watch.note(f"headend: {plant.id} available again")

        async def rewritten() -> float | None:
            last = dnp3_sim.last_control_mono
            if dnp3_sim.controls_applied > controls_before and last is not None:
                return float(last)
            return None

        rewrite_at, _ = await wait_until(rewritten, timeout_s=params.rewrite_timeout_s)
        capped_now = watch.sample().caps_pct[plant.id] < 100.0
        result.checks.append(
            Check(
                f"the gateway re-wrote {plant.id}'s cap after the crash (controls reached the "
                "outstation) and the cap is in force",
                rewrite_at is not None and capped_now,
                (
                    f"{rewrite_at - kill_mono:.1f} s after the kill "
                    f"({rewrite_at - back_mono:+.1f} s from available again)"
                    if rewrite_at is not None
                    else f"no control within {params.rewrite_timeout_s:.0f} s"
                )
                + f"; cap {watch.samples[-1].caps_pct[plant.id]:.1f} %",
            )
        )
        end_wall = time.time()

    window = watch.window(kill_wall, end_wall)
    worst = max((s.export_w for s in window), default=float("nan"))
    result.checks.append(
        Check(
            "export held within the limit at the PCC from the crash to the recovery",
            bool(window) and worst <= limit + tol,
            f"worst export {worst:.0f} W, limit {limit:.0f} W + {tol:.0f} W tolerance, "
            f"{len(window)} samples",
        )
    )
    if others:
        uncapped = [pv.id for pv in others if any(s.caps_pct[pv.id] >= 100.0 for s in window)]
        result.checks.append(
            Check(
                "the other PV inverters stayed under the gateway's control (capped) throughout",
                not uncapped,
                f"uncapped at some point: {', '.join(uncapped)}" if uncapped else "all capped",
            )
        )
    result.figures["outage_s"] = back_mono - kill_mono if back else float("nan")
    result.figures["worst_export_w"] = worst
    return result

"""Benchmark `control-decision`: one control decision (snapshot -> plan -> enforce), 50 devices.

Budget (ARCHITECTURE.md): p99 <= 5 ms for 50 devices. The site: 35 PV inverters and 15
batteries behind one PCC meter, PV making far more than the load, an export-limit event in force
(binding) on the closed loop, so that every cycle soaks surplus into the batteries and curtails
PV; a contract export limit, the SoC guard, BMS limits and a software ramp in force; the kernel
state threaded from cycle to cycle as the runtime does, and a crude plant following the
commands. Each iteration builds the DeviceStates from the cycle's readings (what gateway.snapshot
hands the control loop), plans and enforces; schedule resolution is not included (the
ActiveControls are given). 10,000 timed cycles (quick: 500) after 100 untimed ones: the budget is
about the steady state of a loop that runs for months, not its first cycle's cold caches.

    dergw bench control-decision [--quick]
"""

from __future__ import annotations

import gc
import time
from dataclasses import replace

import numpy as np

from bench.core import BenchOptions, Budget, Figure, latency_figure
from drivers.contract import DeviceKind
from gateway.intent import Controls
from gateway.plan import plan
from gateway.safety import DeviceState, KernelPolicy, KernelState, SiteConditions, enforce
from gateway.schedule import MODES, ActiveControls, ControlSource, ModeSource, ScopeControls

BENCH = "control-decision"
DEVICES = 50
WARMUP = 100  # untimed cycles first
NS = 1_000_000_000
PERIOD_NS = NS // 5  # a 200 ms control period


def _active() -> ActiveControls:
    controls = Controls(export_limit_w=20_000.0, max_gen_pct=90.0)
    source = ModeSource(ControlSource.EVENT, "event bench", "bench")
    modes = {m: source for m in MODES if getattr(controls, m) is not None}
    return ActiveControls(intent_version=7, site=ScopeControls(controls, modes))


async def run(options: BenchOptions) -> list[Figure]:
    iterations = 500 if options.quick else 10_000
    n_bat = max(1, DEVICES * 3 // 10)
    n_pv = DEVICES - n_bat
    rng = np.random.default_rng(7)
    pv_ids = [f"pv{i:02d}" for i in range(n_pv)]
    bat_ids = [f"bat{i:02d}" for i in range(n_bat)]
    pv_rating = rng.uniform(3_000.0, 12_000.0, n_pv)
    bat_rating = rng.uniform(5_000.0, 10_000.0, n_bat)
    load_w = 0.2 * float(pv_rating.sum())
    active = _active()
    policy = KernelPolicy(ramp_pct_per_s=20.0)
    state = KernelState()
    pv_w = pv_rating * 0.8
    bat_w = np.zeros(n_bat)
    soc = rng.uniform(30.0, 80.0, n_bat)
    timings: list[float] = []
    cpu_times: list[float] = []  # the same, in this thread's CPU time: robust to a busy machine
    budgets: list[float] = []
    gc.collect()
    for k in range(WARMUP + iterations):
        # A new snapshot each cycle: noisy readings, as the pollers would leave them.
        noise = rng.normal(0.0, 0.01, n_pv)
        pv_now = np.minimum(pv_w * (1.0 + noise), pv_rating)
        pcc_w = load_w - float(pv_now.sum()) - float(bat_w.sum())
        now_ns = (k + 1) * PERIOD_NS
        started = time.perf_counter_ns()
        cpu_started = time.thread_time_ns()
        devices: dict[str, DeviceState] = {}
        for i, device_id in enumerate(pv_ids):
            devices[device_id] = DeviceState(
                device_id, DeviceKind.PV, float(pv_rating[i]), measured_w=float(pv_now[i])
            )
        for i, device_id in enumerate(bat_ids):
            rating = float(bat_rating[i])
            devices[device_id] = DeviceState(
                device_id,
                DeviceKind.BATTERY,
                rating,
                max_charge_w=rating,
                max_discharge_w=rating,
                measured_w=float(bat_w[i]),
                soc_pct=float(soc[i]),
                bms_charge_max_w=rating,
                bms_discharge_max_w=rating,
            )
        the_plan = plan(active, devices, contract_export_limit_w=30_000.0)
        enforcement = enforce(
            the_plan.planned,
            devices,
            SiteConditions(
                pcc_w=pcc_w,
                export_limits=the_plan.export_limits,
                import_limits=the_plan.import_limits,
                grid_hz=50.0,
                now_mono_ns=now_ns,
                pcc_mono_ns=now_ns - PERIOD_NS,
            ),
            revert_after_s=60,
            policy=policy,
            state=state,
        )
        if k >= WARMUP:
            timings.append((time.perf_counter_ns() - started) / 1e9)
            cpu_times.append((time.thread_time_ns() - cpu_started) / 1e9)
        state = enforcement.state
        budgets.append(state.export_budget_w or 0.0)
        # The plant follows the commands (a crude one: outputs become the caps / setpoints).
        by_id = {s.device_id: s for s in enforcement.setpoints}
        for i, device_id in enumerate(pv_ids):
            cap = by_id[device_id].max_active_power_w
            pv_w[i] = pv_rating[i] * 0.8 if cap is None else min(cap, pv_rating[i] * 0.8)
        for i, device_id in enumerate(bat_ids):
            active_w = by_id[device_id].active_power_w
            bat_w[i] = 0.0 if active_w is None else active_w
    export_w = -(load_w - float(pv_w.sum()) - float(bat_w.sum()))
    figure = latency_figure(
        BENCH,
        f"snapshot -> enforced setpoints, {DEVICES} devices",
        timings,
        budget=Budget("<=", 5, checked="p99"),
        note=(
            f"n={iterations}, {n_pv} PV + {n_bat} batteries, export limit binding on the "
            f"closed loop, max {max(timings) * 1e3:.2f} ms"
        ),
    )
    last_cycle = {
        "export_budget_w": budgets[-1],
        "plant_export_w": export_w,
        "export_limit_w": 20_000.0,
        "batteries_w": float(bat_w.sum()),
        "pv_w": float(pv_w.sum()),
        "pv_available_w": 0.8 * float(pv_rating.sum()),
        "setpoints": len(by_id),
    }
    cpu = latency_figure(
        BENCH,
        "the same, CPU time of the deciding thread",
        cpu_times,
        note="wall time above minus time the thread was not running (a busy machine)",
    )
    return [replace(figure, extra={"max_ms": max(timings) * 1e3, "last_cycle": last_cycle}), cpu]

"""Benchmark: one control decision (snapshot -> plan -> enforce) for a 50-device site.

Not a test: it prints figures. Budget (docs/ARCHITECTURE.md): p99 <= 5 ms on the 2-core x86 dev
machine for 50 devices. The site: 35 PV inverters and 15 batteries behind one PCC meter, PV
making far more than the load, an export-limit event in force (binding) on the closed loop, so
that every cycle soaks surplus into the batteries and curtails PV; a contract export limit, the
SoC guard, BMS limits and a software ramp in force; the kernel state threaded from cycle to cycle
as the runtime does, and a crude plant following the commands. Each iteration builds the
DeviceStates from the cycle's readings (what gateway.snapshot hands the control loop), plans and
enforces; schedule resolution is not included (the ActiveControls are given).

    .venv/bin/python bench/control_decision.py [--iterations N] [--devices N]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import numpy as np

from drivers.contract import DeviceKind
from gateway.intent import Controls
from gateway.plan import plan
from gateway.safety import DeviceState, KernelPolicy, KernelState, SiteConditions, enforce
from gateway.schedule import MODES, ActiveControls, ControlSource, ModeSource, ScopeControls

NS = 1_000_000_000
PERIOD_NS = NS // 5  # a 200 ms control period


def _active() -> ActiveControls:
    controls = Controls(export_limit_w=20_000.0, max_gen_pct=90.0)
    source = ModeSource(ControlSource.EVENT, "event bench", "bench")
    modes = {m: source for m in MODES if getattr(controls, m) is not None}
    return ActiveControls(intent_version=7, site=ScopeControls(controls, modes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=10_000)
    parser.add_argument("--devices", type=int, default=50)
    args = parser.parse_args()
    n_bat = max(1, args.devices * 3 // 10)
    n_pv = args.devices - n_bat
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
    budgets: list[float] = []
    gc.collect()
    for k in range(args.iterations):
        # A new snapshot each cycle: noisy readings, as the pollers would leave them.
        noise = rng.normal(0.0, 0.01, n_pv)
        pv_now = np.minimum(pv_w * (1.0 + noise), pv_rating)
        pcc_w = load_w - float(pv_now.sum()) - float(bat_w.sum())
        now_ns = (k + 1) * PERIOD_NS
        started = time.perf_counter_ns()
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
        timings.append((time.perf_counter_ns() - started) / 1e6)
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
    timings.sort()
    p50 = statistics.median(timings)
    p99 = timings[int(0.99 * (len(timings) - 1))]
    print(
        f"control decision, {args.devices} devices ({n_pv} PV, {n_bat} batteries), "
        f"export limit on the closed loop, {args.iterations} iterations:"
    )
    print(
        f"  p50 {p50:.3f} ms   p99 {p99:.3f} ms   max {timings[-1]:.3f} ms   (budget p99 <= 5 ms)"
    )
    export_w = -(load_w - float(pv_w.sum()) - float(bat_w.sum()))
    print(
        f"  last cycle: export budget {budgets[-1]:.0f} W, plant export {export_w:.0f} W "
        f"(limit 20000 W), batteries {float(bat_w.sum()):.0f} W, "
        f"PV {float(pv_w.sum()):.0f} W of {0.8 * float(pv_rating.sum()):.0f} W available, "
        f"{len(by_id)} setpoints"
    )


if __name__ == "__main__":
    main()

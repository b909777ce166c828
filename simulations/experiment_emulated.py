"""The adaptive experiment on the real system (``splitinfer experiment adaptive --emulate``).

:func:`run_emulated_experiment` runs the same policies as the simulator's experiment on
the real system (:mod:`splitinfer.simulations.emulate`: the real edge agent and cloud
worker, tbf replaying the trace, the TUN delay line, a cgroup-slowed edge), as edge cuts:
edge-only ``--cut edge``, cloud-only ``--cut cloud``, static the fixed cut for the
trace's mean, adaptive ``--cut auto``. The oracle cannot run for real: its row comes from
the simulator. Every emulated row carries the simulator's figures for the same workload
(requests, rate, trace and time axis), so the table doubles as the simulator's
validation. Kept short: a few dozen requests per cell. With ``out``, ``results.json``,
``results.md`` and one plot per (model, trace) go into that folder.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from splitinfer.adapt.planner import cut_table
from splitinfer.errors import UserError
from splitinfer.simulations.emulate import Emulation, EmulationRun
from splitinfer.simulations.experiment import DEFAULT_MODELS, ExperimentConfig, fill_regret, load_model_profiles, variation
from splitinfer.simulations.experiment_report import emulated_markdown, plot_emulated, write_results
from splitinfer.simulations.linktrace import Trace
from splitinfer.simulations.simulator import SimConfig, Simulator
from splitinfer.simulations.traces import time_scaled
from splitinfer.util.stats import percentile

__all__ = ["EMULATED_POLICIES", "EMULATE_RATE", "EMULATE_REQUESTS", "emulated_cut", "run_emulated_experiment"]

log = logging.getLogger(__name__)

EMULATED_POLICIES = ("edge-only", "cloud-only", "static", "adaptive")
EMULATE_REQUESTS = 30  # per cell: a few dozen
EMULATE_RATE = 0.25  # per second: cloud-only keeps its uplink queue under ~10 s on the 3G traces


def emulated_cut(policy: str, sim: Simulator) -> str:
    """The edge agent's --cut for a policy: edge, cloud, the static cut's id, or auto."""
    if policy == "edge-only":
        return "edge"
    if policy == "cloud-only":
        return "cloud"
    if policy == "adaptive":
        return "auto"
    if policy == "static":
        return sim.make_policy("static").choose(0.0).id
    raise UserError(f"policy {policy!r} cannot run on the real system (use {', '.join(EMULATED_POLICIES)})")


def run_emulated_experiment(
    traces: Sequence[Trace],
    models: Sequence[str] = DEFAULT_MODELS,
    edge_slowdown: float = 10.0,
    *,
    config: ExperimentConfig = ExperimentConfig(rate_per_s=EMULATE_RATE, requests=EMULATE_REQUESTS),
    time_scale: float = 1.0,
    policies: Sequence[str] = EMULATED_POLICIES,
    profiles_dir: Path | None = None,
    out: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Policies x traces x models on the real system, each next to the simulator's result for
    the same workload (module docstring). ``time_scale`` > 1 plays every trace that many
    times faster, in the simulator too."""
    for p in policies:
        if p not in EMULATED_POLICIES:
            raise UserError(f"policy {p!r} cannot run on the real system (use {', '.join(EMULATED_POLICIES)})")
    n = config.requests or EMULATE_REQUESTS
    rows: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    calibrations: dict[str, Any] = {}
    started = time.perf_counter()
    cells = [(t.scaled(config.bandwidth_scale) if config.bandwidth_scale != 1.0 else t) for t in traces]
    cells = [time_scaled(t, time_scale) for t in cells]
    profiles = {model: load_model_profiles(model, profiles_dir) for model in models}  # every mistake before any run
    for model in models:
        edge0, cloud = profiles[model]
        edge = edge0.scaled(edge_slowdown)
        table = cut_table(edge0, cloud, edge_slowdown=edge_slowdown)
        idle_s = 1.0 / config.rate_per_s - edge.total_ms / 1e3  # between edge-only requests
        with Emulation(model, rtt_ms=config.rtt_ms, edge_slowdown=edge_slowdown, seed=config.seed, edge_profile=edge0,
                       cloud_profile=cloud, idle_s=idle_s, progress=progress) as emu:  # fmt: skip
            calibrations[model] = emu.calibration
            for trace in cells:
                sim_cfg = SimConfig(requests=n, rate_per_s=config.rate_per_s, rtt_ms=config.rtt_ms, seed=config.seed)
                sim = Simulator(edge, cloud, trace, sim_cfg, table=table)
                simulated = sim.run_all([*policies, "oracle"])
                sim_rows = simulated.to_json()["policies"]
                for policy in policies:
                    cut = emulated_cut(policy, sim)
                    if progress:
                        progress(f"{model} on {trace.name}: {policy} (--cut {cut[:40]}), {n} requests at {config.rate_per_s:g}/s")
                    summary = emu.run(EmulationRun(cut=cut, requests=n, rate_per_s=config.rate_per_s, trace=trace))
                    s_sim = sim_rows[policy]
                    lat = [r["total_ms"] for r in summary["records"] if "error" not in r]
                    mean = float(np.mean(lat)) if lat else float("nan")
                    cuts: dict[str, int] = {}
                    for r in summary["records"]:
                        cuts[r["cut"]] = cuts.get(r["cut"], 0) + 1
                    rows.append({
                        "model": model, "trace": trace.name, "policy": policy, "source": "emulated",
                        "mean_ms": round(mean, 3),
                        "p95_ms": round(percentile(lat, 0.95), 3) if lat else None,
                        "regret_vs_oracle": None,
                        "switches": int(summary["cut"].get("switches", 0)),
                        "answered": summary["answered"], "errors": summary["errors"], "by_source": summary["by_source"],
                        "cuts": cuts, "cut": cut, "head_ms": summary["emulation"]["head_ms_mean"],
                        "loadavg_1m": summary["emulation"]["loadavg_1m"],
                        "sim_mean_ms": s_sim["mean_ms"], "sim_p95_ms": s_sim["p95_ms"], "sim_switches": s_sim["switches"],
                        "emulated_over_simulated": round(mean / s_sim["mean_ms"] - 1.0, 4) if lat else None,
                    })  # fmt: skip
                    runs.append({"model": model, "trace": trace.name, "policy": policy,
                                 "latency_ms": [r.get("total_ms") for r in summary["records"]],
                                 "sim_latency_ms": [round(float(v), 3) for v in simulated.runs[policy].latency_ms],
                                 "link": summary["link"], "emulation": summary["emulation"]})  # fmt: skip
                o = sim_rows["oracle"]
                rows.append({"model": model, "trace": trace.name, "policy": "oracle", "source": "simulated",
                             "mean_ms": o["mean_ms"], "p95_ms": o["p95_ms"], "regret_vs_oracle": None,
                             "switches": o["switches"], "sim_mean_ms": o["mean_ms"], "sim_p95_ms": o["p95_ms"]})  # fmt: skip
    fill_regret(rows)
    out_json: dict[str, Any] = {
        "experiment": "adaptive",
        "emulated": True,
        "edge_slowdown": edge_slowdown,
        "config": {"rate_per_s": config.rate_per_s, "requests": n, "rtt_ms": config.rtt_ms, "seed": config.seed,
                   "bandwidth_scale": config.bandwidth_scale, "time_scale": time_scale},  # fmt: skip
        "traces": {t.name: {**t.summary(), "variation": round(variation(t), 3)} for t in cells},
        "rows": rows,
        "runs": runs,
        "calibration": calibrations,
        "elapsed_s": round(time.perf_counter() - started, 2),
    }
    if out is not None:
        out = Path(out)
        write_results(out, out_json, emulated_markdown(out_json))
        for model in models:
            for t in cells:
                plot_emulated(out_json, model, t, out / f"emulated-{model}-{t.name.split('/')[0]}.png")
    return out_json


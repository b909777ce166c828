"""Experiments on the simulator: policies x traces x models, with regret against the oracle.

- ``adaptive`` (:func:`run_experiment`): every policy on every trace and model; rows of
  ``{"model", "trace", "policy", "mean_ms", "p95_ms", "regret_vs_oracle", "switches"}``
  (regret = mean / oracle mean - 1), plus a ``best-static`` row: the best single cut
  in hindsight (every cut a policy can pick, run fixed, the lowest mean kept), which is
  at least as good as Neurosurgeon's ``static`` (the cut for the trace's mean).
  ``targets`` checks issue 7's: adaptive mean <= 1.10 x oracle on every trace, and below
  the best static cut on every trace whose bandwidth varies by more than 2x (max/min).
- ``estimators`` (:func:`run_estimator_experiment`): the adaptive policy with each
  bandwidth filter of :mod:`splitinfer.adapt.estimator`, to pick the default.
- ``hysteresis`` (:func:`run_hysteresis_experiment`): the adaptive policy at several margins.

- ``adaptive`` with ``--emulate`` (:func:`run_emulated_experiment`): the same policies on
  the real system (:mod:`splitinfer.simulations.emulate`: the real edge agent and cloud
  worker, tbf replaying the trace, the TUN delay line, a cgroup-slowed edge), as edge
  cuts: edge-only ``--cut edge``, cloud-only ``--cut cloud``, static the fixed cut for the
  trace's mean, adaptive ``--cut auto``. The oracle cannot run for real: its row comes
  from the simulator. Every emulated row carries the simulator's figures for the same
  workload (requests, rate, trace and time axis), so the table doubles as the
  simulator's validation. Kept short: a few dozen requests per cell.

Each writes, with ``out``, ``results.json``, ``results.md`` and plots into that folder.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from splitinfer.errors import UserError
from splitinfer.adapt.estimator import FILTERS, LinkEstimator
from splitinfer.core.partitioner import Partitioner
from splitinfer.adapt.policy import Adaptive, CutTable, Fixed, Policy
from splitinfer.core.profile import Profile
from splitinfer.simulations.simulator import _COLORS, PolicyRun, SimConfig, SimResult, Simulator, plot_result
from splitinfer.simulations.traces import Trace, bundled_trace_names, load_trace

__all__ = [
    "DEFAULT_MODELS",
    "ExperimentConfig",
    "load_model_profiles",
    "markdown_table",
    "resolve_traces",
    "run_emulated_experiment",
    "run_estimator_experiment",
    "run_experiment",
    "run_hysteresis_experiment",
]

log = logging.getLogger(__name__)

DEFAULT_MODELS = ("resnet18", "mobilenet_v2")
EXPERIMENT_POLICIES = ("edge-only", "cloud-only", "static", "adaptive", "oracle")
REGRET_TARGET = 0.10  # issue 7: adaptive mean <= 1.10 x oracle
VARIES_RATIO = 2.0  # issue 7: "bandwidth varies by more than 2x"


@dataclass(frozen=True)
class ExperimentConfig:
    """The workload every (model, trace) cell runs."""

    rate_per_s: float = 1.0  # arrivals per second: the 10x slower edge keeps up with edge-only
    requests: int | None = None  # None: one pass of the trace at the rate, at least min_requests
    min_requests: int = 300
    rtt_ms: float = 20.0
    poisson: bool = False
    seed: int = 0
    bandwidth_scale: float = 1.0  # every trace's bandwidth times this (e.g. 5: 3G traces at LTE-like rates)
    obs_noise: float = 0.0  # log-normal sigma on each observed network time (see SimConfig)

    def sim_config(self, trace: Trace) -> SimConfig:
        n = self.requests or max(self.min_requests, int(np.ceil(trace.duration_s * self.rate_per_s)))
        return SimConfig(requests=n, rate_per_s=self.rate_per_s, poisson=self.poisson, rtt_ms=self.rtt_ms,
                         seed=self.seed, obs_noise=self.obs_noise)  # fmt: skip


def resolve_traces(spec: str | Path | Sequence[str] | None) -> list[Trace]:
    """None: every bundled trace; a folder: its *.tsv files; else names/presets/files, comma-separated."""
    if spec is None:
        names: Sequence[str] = bundled_trace_names()
        if not names:
            raise UserError("no bundled traces found")
        return [load_trace(n) for n in names]
    if isinstance(spec, (str, Path)) and Path(spec).is_dir():
        files = sorted(Path(spec).glob("*.tsv"))
        if not files:
            raise UserError(f"no .tsv trace files in {spec}")
        return [load_trace(f) for f in files]
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    names = [n for n in names if n]
    if not names:
        raise UserError("--traces is empty")
    return [load_trace(n) for n in names]


def load_model_profiles(model: str, profiles_dir: Path | None = None) -> tuple[Profile, Profile]:
    """(edge, cloud) of a model: from profiles_dir/<model>/{edge,cloud}.json, else the bundled reference."""
    if profiles_dir is not None:
        d = Path(profiles_dir) / model
        return Profile.load(d / "edge.json"), Profile.load(d / "cloud.json")
    from splitinfer.adapt.reference import load_reference

    ref = load_reference(model)
    if ref is None:
        raise UserError(f"no reference profiles for {model!r}: pass --profiles DIR with {model}/edge.json, cloud.json")
    return ref


def variation(trace: Trace) -> float:
    """max / min of the trace's bandwidth: the "varies by more than 2x" of issue 7."""
    return trace.max_mbit() / trace.min_mbit()


def _row(model: str, trace: Trace, name: str, run_summary: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": model,
        "trace": trace.name,
        "policy": name,
        "mean_ms": run_summary["mean_ms"],
        "p95_ms": run_summary["p95_ms"],
        "regret_vs_oracle": None,
        "switches": run_summary["switches"],
        "bytes_sent": run_summary["bytes_sent"],
        "probes": run_summary["probes"],
        "cuts": run_summary["cuts"],
    }


def _fill_regret(rows: list[dict[str, Any]]) -> None:
    oracle = {(r["model"], r["trace"]): r["mean_ms"] for r in rows if r["policy"] == "oracle"}
    for r in rows:
        o = oracle.get((r["model"], r["trace"]))
        r["regret_vs_oracle"] = None if not o else round(r["mean_ms"] / o - 1.0, 4)


def _cells(
    traces: Sequence[Trace], models: Sequence[str], edge_slowdown: float, profiles_dir: Path | None,
    scale: float = 1.0,
) -> Iterable[tuple[str, CutTable, Profile, Profile, Trace]]:
    if scale != 1.0:
        traces = [t.scaled(scale) for t in traces]
    for model in models:
        edge, cloud = load_model_profiles(model, profiles_dir)
        edge = edge.scaled(edge_slowdown)
        table = CutTable(Partitioner(edge, cloud))
        for trace in traces:
            yield model, table, edge, cloud, trace


def best_fixed_cut(sim: Simulator, arrivals: np.ndarray) -> PolicyRun:
    """The best static cut in hindsight: every cut of the table run on the trace, the
    fastest on mean latency kept (named fixed:<cut id>)."""
    runs = [sim.run(Fixed(cut, f"fixed:{cut.id}"), arrivals) for cut in sim.table.cuts]
    return min(runs, key=lambda r: float(r.latency_ms.mean()))


def run_experiment(
    traces: Sequence[Trace],
    models: Sequence[str] = DEFAULT_MODELS,
    edge_slowdown: float = 10.0,
    *,
    config: ExperimentConfig = ExperimentConfig(),
    policies: Sequence[str] = EXPERIMENT_POLICIES,
    best_static: bool = True,
    profiles_dir: Path | None = None,
    out: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Policies x traces x models (see the module docstring)."""
    if "oracle" not in policies:
        policies = [*policies, "oracle"]
    rows: list[dict[str, Any]] = []
    results: list[SimResult] = []
    started = time.perf_counter()
    for model, table, edge, cloud, trace in _cells(traces, models, edge_slowdown, profiles_dir, config.bandwidth_scale):
        if progress:
            progress(f"{model} on {trace.name}")
        sim = Simulator(edge, cloud, trace, config.sim_config(trace), table=table)
        res = sim.run_all(policies)
        results.append(res)
        summaries = res.to_json()["policies"]
        for name, s in summaries.items():
            rows.append(_row(model, trace, name, s))
        if best_static:
            arrivals = sim.config.arrivals()
            best = best_fixed_cut(sim, arrivals)
            s = best.summary()
            row = _row(model, trace, "best-static", s)
            row["cut"] = best.cut_ids[0]
            rows.append(row)
    _fill_regret(rows)
    scaled = [t.scaled(config.bandwidth_scale) if config.bandwidth_scale != 1.0 else t for t in traces]
    out_json: dict[str, Any] = {
        "experiment": "adaptive",
        "edge_slowdown": edge_slowdown,
        "config": {"rate_per_s": config.rate_per_s, "requests": config.requests, "rtt_ms": config.rtt_ms,
                   "poisson": config.poisson, "seed": config.seed, "bandwidth_scale": config.bandwidth_scale},  # fmt: skip
        "traces": {t.name: {**t.summary(), "variation": round(variation(t), 3)} for t in scaled},
        "rows": rows,
        "targets": check_targets(rows, {t.name: variation(t) for t in scaled}),
        "elapsed_s": round(time.perf_counter() - started, 2),
    }
    if out is not None:
        _write(out, out_json, results, adaptive_markdown(out_json))
    return out_json


def check_targets(rows: list[dict[str, Any]], variations: dict[str, float]) -> list[dict[str, Any]]:
    """Issue 7's targets per (model, trace).

    ``status``: "met", "missed", or "n/a" for the second target where not even the
    oracle beats the best static cut by 1% (then no policy can be below it; the first
    target still decides)."""
    by: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for r in rows:
        by.setdefault((r["model"], r["trace"]), {})[r["policy"]] = r
    out = []
    for (model, trace), p in by.items():
        if "adaptive" not in p or "oracle" not in p:
            continue
        a, o = p["adaptive"]["mean_ms"], p["oracle"]["mean_ms"]
        bs = p.get("best-static", p.get("static"))
        bs_ms = None if bs is None else bs["mean_ms"]
        varies = variations.get(trace, 0.0) > VARIES_RATIO
        within = a <= (1 + REGRET_TARGET) * o
        below = bs_ms is not None and a < bs_ms
        status = _target_status(a, o, bs_ms, varies)
        out.append({
            "model": model,
            "trace": trace,
            "adaptive_over_oracle": round(a / o, 4),
            "within_oracle_target": within,
            "varies_more_than_2x": varies,
            "best_static_ms": bs_ms,
            "best_static_over_oracle": None if bs_ms is None else round(bs_ms / o, 4),
            "below_best_static": below,
            "status": status,
        })  # fmt: skip
    return out


def _target_status(mean_ms: float, oracle_ms: float, best_static_ms: float | None, varies: bool) -> str:
    """"met", "missed", or "n/a" (see check_targets)."""
    within = mean_ms <= (1 + REGRET_TARGET) * oracle_ms
    beatable = best_static_ms is not None and oracle_ms < 0.99 * best_static_ms
    below = best_static_ms is not None and mean_ms < best_static_ms
    if not within or (varies and beatable and not below):
        return "missed"
    return "n/a" if varies and not beatable else "met"


def _variant_experiment(
    name: str,
    variants: dict[str, Callable[[CutTable, float], Policy]],
    traces: Sequence[Trace],
    models: Sequence[str],
    edge_slowdown: float,
    config: ExperimentConfig,
    profiles_dir: Path | None,
    out: Path | None,
    progress: Callable[[str], None] | None,
) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    for model, table, edge, cloud, trace in _cells(traces, models, edge_slowdown, profiles_dir, config.bandwidth_scale):
        if progress:
            progress(f"{model} on {trace.name}")
        sim = Simulator(edge, cloud, trace, config.sim_config(trace), table=table)
        arrivals = sim.config.arrivals()
        oracle = sim.run(sim.make_policy("oracle"), arrivals)
        o_mean = float(oracle.latency_ms.mean())
        best_static = float(best_fixed_cut(sim, arrivals).latency_ms.mean())
        for vname, factory in variants.items():
            run = sim.run(factory(table, config.rtt_ms), arrivals)
            s = run.summary()
            row = _row(model, trace, vname, s)
            row["regret_vs_oracle"] = round(s["mean_ms"] / o_mean - 1.0, 4)
            row["oracle_mean_ms"] = round(o_mean, 3)
            row["best_static_ms"] = round(best_static, 3)
            row["target"] = _target_status(s["mean_ms"], o_mean, best_static, variation(trace) > VARIES_RATIO)
            if run.estimate_mbit is not None:
                true = np.array([trace.bandwidth_at(t) for t in run.start_s])
                est = run.estimate_mbit
                ok = np.isfinite(est)
                row["estimate_error"] = round(float(np.mean(np.abs(est[ok] - true[ok]) / true[ok])), 4) if ok.any() else None
                row["overestimates"] = round(float(np.mean(est[ok] > true[ok] * 1.1)), 4) if ok.any() else None
            rows.append(row)
    summary: dict[str, dict[str, float]] = {}
    for vname in variants:
        mine = [r for r in rows if r["policy"] == vname]
        summary[vname] = {
            "target_misses": sum(r["target"] == "missed" for r in mine),  # issue 7's targets, as check_targets
            "mean_regret": round(float(np.mean([r["regret_vs_oracle"] for r in mine])), 4),
            "max_regret": round(float(np.max([r["regret_vs_oracle"] for r in mine])), 4),
            "mean_over_best_static": round(float(np.mean([r["mean_ms"] / r["best_static_ms"] for r in mine])), 4),
            "switches": int(sum(r["switches"] for r in mine)),
        }
        errs = [r["estimate_error"] for r in mine if r.get("estimate_error") is not None]
        if errs:
            summary[vname]["mean_estimate_error"] = round(float(np.mean(errs)), 4)
    out_json = {"experiment": name, "edge_slowdown": edge_slowdown, "rows": rows, "summary": summary,
                "elapsed_s": round(time.perf_counter() - started, 2)}  # fmt: skip
    if out is not None:
        md = f"# experiment {name}\n\n" + markdown_table(rows, extra=("estimate_error",)) + "\n"
        md += ("| variant | target misses | mean regret | max regret | mean / best static | switches | mean estimate error |\n"
               "| --- | --- | --- | --- | --- | --- | --- |\n")  # fmt: skip
        for v, s in summary.items():
            md += (f"| {v} | {s['target_misses']} | {s['mean_regret']:.3f} | {s['max_regret']:.3f} | "
                   f"{s['mean_over_best_static']:.3f} | {s['switches']} | {s.get('mean_estimate_error', '-')} |\n")  # fmt: skip
        _write(out, out_json, [], md)
    return out_json


def run_estimator_experiment(
    traces: Sequence[Trace],
    models: Sequence[str] = DEFAULT_MODELS,
    edge_slowdown: float = 10.0,
    *,
    config: ExperimentConfig = ExperimentConfig(),
    profiles_dir: Path | None = None,
    out: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The adaptive policy with each bandwidth filter (the default's justification)."""
    variants = {
        f"adaptive[{f}]": (lambda table, rtt, f=f: Adaptive(table, LinkEstimator(f, initial_rtt_ms=rtt), rtt_ms=rtt,
                                                             name=f"adaptive[{f}]"))
        for f in FILTERS
    }  # fmt: skip
    return _variant_experiment("estimators", variants, traces, models, edge_slowdown, config, profiles_dir, out, progress)


def run_hysteresis_experiment(
    traces: Sequence[Trace],
    models: Sequence[str] = DEFAULT_MODELS,
    edge_slowdown: float = 10.0,
    *,
    margins: Sequence[float] = (0.0, 0.02, 0.05, 0.1, 0.2),
    config: ExperimentConfig = ExperimentConfig(),
    profiles_dir: Path | None = None,
    out: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The adaptive policy at several hysteresis margins."""
    variants = {
        f"adaptive[margin={m:g}]": (lambda table, rtt, m=m: Adaptive(
            table, LinkEstimator(initial_rtt_ms=rtt), rtt_ms=rtt, margin=m, margin_ms=0.0 if m == 0 else 1.0,
            name=f"adaptive[margin={m:g}]"))
        for m in margins
    }  # fmt: skip
    return _variant_experiment("hysteresis", variants, traces, models, edge_slowdown, config, profiles_dir, out, progress)


# ----------------------------------------------------------------- on the real system
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
    from splitinfer.simulations.emulate import Emulation, EmulationRun, time_scaled

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
        table = CutTable(Partitioner(edge, cloud))
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
                        "p95_ms": round(float(np.percentile(lat, 95)), 3) if lat else None,
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
    _fill_regret(rows)
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
        _write(out, out_json, [], emulated_markdown(out_json))
        for model in models:
            for t in cells:
                _plot_emulated(out_json, model, t, out / f"emulated-{model}-{t.name.split('/')[0]}.png")
    return out_json


def emulated_markdown(result: dict[str, Any]) -> str:
    """Simulated vs emulated mean latency per policy (the simulator's validation table)."""
    cfg = result["config"]
    lines = [
        f"Simulated vs emulated, edge {result['edge_slowdown']:g}x slower, {cfg['requests']} requests at "
        f"{cfg['rate_per_s']:g}/s, RTT {cfg['rtt_ms']:g} ms, trace bandwidth x{cfg['bandwidth_scale']:g}, "
        f"trace time /{cfg['time_scale']:g}. Emulated: real edge agent and cloud worker, tc tbf replaying the trace, "
        "TUN delay line, cgroup cpu quota. The oracle runs in the simulator only.\n",
        "| model | trace | policy | simulated mean ms | emulated mean ms | emulated / simulated | simulated p95 ms | "
        "emulated p95 ms | answered | switches (emulated) | head ms (emulated) | load (1 min) |",
        "|" + " --- |" * 12,
    ]
    for r in result["rows"]:
        if r.get("source") != "emulated":
            lines.append(f"| {r['model']} | {r['trace']} | {r['policy']} | {r['mean_ms']:.0f} | - | - | {r['p95_ms']:.0f} | - | - | - | - | - |")
            continue
        ratio = r.get("emulated_over_simulated")
        ratio_s = "-" if ratio is None else f"{ratio * 100:+.1f}%"
        p95_s = "-" if r["p95_ms"] is None else f"{r['p95_ms']:.0f}"
        head_s = "-" if r.get("head_ms") is None else f"{r['head_ms']:.0f}"
        load_s = "-" if not r.get("loadavg_1m") else "..".join(f"{v:.1f}" for v in r["loadavg_1m"])
        lines.append(
            f"| {r['model']} | {r['trace']} | {r['policy']} | {r['sim_mean_ms']:.0f} | {r['mean_ms']:.0f} | "
            f"{ratio_s} | {r['sim_p95_ms']:.0f} | {p95_s} | {r['answered']}/{r['answered'] + r['errors']} | {r['switches']} | "
            f"{head_s} | {load_s} |"
        )
    for model, cal in (result.get("calibration") or {}).items():
        if cal and cal.get("calibrated"):
            tried = ", ".join(f"{m['quota_us']} us: {m['mean_ms']:.0f} ms" for m in cal["measured"])
            lines.append(f"\nEdge cpu quota for {model}: {cal['quota_us']} us per {cal['period_us']} us period (1/K would be "
                         f"{cal['uncalibrated_quota_us']} us), calibrated to a {cal['target_ms']:.0f} ms forward pass ({tried}).")
        elif cal:
            lines.append(f"\nEdge cpu quota for {model}: period/K, not calibrated ({cal.get('why')}).")
    return "\n".join(lines) + "\n"


def _plot_emulated(result: dict[str, Any], model: str, trace: Trace, path: Path) -> None:
    """Per-request latency, emulated (solid) and simulated (dashed), with the trace under it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in result["runs"] if r["model"] == model and r["trace"] == trace.name]
    if not runs:
        return
    rate = result["config"]["rate_per_s"]
    fig, (ax, ax_bw) = plt.subplots(2, 1, figsize=(11, 6), sharex=True, gridspec_kw={"height_ratios": (2.2, 1)})
    for r in runs:
        color = _COLORS.get(r["policy"])
        xs = np.arange(len(r["latency_ms"])) / rate
        ax.plot(xs, [np.nan if v is None else v for v in r["latency_ms"]], color=color, lw=1, label=f"{r['policy']} (emulated)")
        ax.plot(xs[: len(r["sim_latency_ms"])], r["sim_latency_ms"], color=color, lw=1, ls="--", label=f"{r['policy']} (simulated)")
    ax.set_yscale("log")
    ax.set_ylabel("latency (ms)")
    ax.legend(fontsize=7, ncol=2)
    end = len(runs[0]["latency_ms"]) / rate
    ts = np.linspace(0, end, 1000)
    ax_bw.fill_between(ts, [trace.bandwidth_at(t) for t in ts], step="post", color="0.8")
    ax_bw.set_ylabel("Mbit/s")
    ax_bw.set_xlabel("arrival time (s)")
    fig.suptitle(f"{model}, edge x{result['edge_slowdown']:g}, {trace.name}: emulated vs simulated")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


# ------------------------------------------------------------------------- reports
def markdown_table(rows: list[dict[str, Any]], extra: Sequence[str] = ()) -> str:
    cols = ["model", "trace", "policy", "mean_ms", "p95_ms", "regret_vs_oracle", "switches", *extra]
    cols = [c for c in cols if c in ("model", "trace", "policy") or any(c in r for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            if v is None:
                cells.append("-")
            elif c == "regret_vs_oracle":
                cells.append(f"{v * 100:+.1f}%")
            elif isinstance(v, float):
                cells.append(f"{v:.1f}" if c.endswith("_ms") else f"{v:.3f}")
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def adaptive_markdown(result: dict[str, Any]) -> str:
    """Mean latency per policy, one line per (model, trace), and the targets."""
    policies: list[str] = []
    for r in result["rows"]:
        if r["policy"] not in policies:
            policies.append(r["policy"])
    cells: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for r in result["rows"]:
        cells.setdefault((r["model"], r["trace"]), {})[r["policy"]] = r
    targets = {(t["model"], t["trace"]): t for t in result["targets"]}
    cfg = result["config"]
    lines = [
        f"Mean latency (ms) per policy: edge {result['edge_slowdown']:g}x slower, {cfg['rate_per_s']:g} requests/s, "
        f"RTT {cfg['rtt_ms']:g} ms, trace bandwidth x{cfg.get('bandwidth_scale', 1.0):g}. Targets: adaptive <= 1.10 x "
        "oracle, and below the best static cut where the trace's max/min > 2 (n/a: even the oracle is within 1% "
        "of the best static cut).\n",
        "| model | trace | max/min | " + " | ".join(policies) + " | adaptive / oracle | adaptive switches | target |",
        "|" + " --- |" * (len(policies) + 6),
    ]
    for (model, trace), p in cells.items():
        t = targets.get((model, trace))
        var = result["traces"].get(trace, {}).get("variation", float("nan"))
        lat = " | ".join(f"{p[x]['mean_ms']:.0f}" if x in p else "-" for x in policies)
        a = p.get("adaptive")
        tail = f"{t['adaptive_over_oracle']:.3f} | {a['switches']} | {t['status']}" if a and t else "- | - | -"
        lines.append(f"| {model} | {trace} | {var:.1f} | {lat} | {tail} |")
    return "\n".join(lines) + "\n\n" + markdown_table(result["rows"])


def _write(out: Path, data: dict[str, Any], results: list[SimResult], md: str) -> None:
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {out}: {exc.strerror or exc}") from None
    (out / "results.json").write_text(json.dumps(data, indent=1) + "\n")
    (out / "results.md").write_text(md)
    for res in results:
        plot_result(res, out / f"{res.model}-{res.trace.name}.png")
    if results:
        _plot_regret(data, out / "regret.png")


def _plot_regret(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in data["rows"] if r["policy"] not in ("oracle",) and r["regret_vs_oracle"] is not None]
    cells = sorted({(r["model"], r["trace"]) for r in rows})
    policies = [p for p in ("static", "best-static", "adaptive", "edge-only") if any(r["policy"] == p for r in rows)]
    fig, ax = plt.subplots(figsize=(max(8, len(cells) * 0.9), 4.5))
    width = 0.8 / max(1, len(policies))
    x = np.arange(len(cells))
    for k, pol in enumerate(policies):
        vals = []
        for cell in cells:
            r = next((r for r in rows if (r["model"], r["trace"]) == cell and r["policy"] == pol), None)
            vals.append(np.nan if r is None else min(r["regret_vs_oracle"], 0.5) * 100)
        ax.bar(x + (k - (len(policies) - 1) / 2) * width, vals, width, label=pol)
    ax.axhline(REGRET_TARGET * 100, color="red", ls=":", lw=1, label="target (+10%)")
    ax.set_xticks(x, [f"{m}\n{t.split('.')[0][:12]}" for m, t in cells], fontsize=7, rotation=30, ha="right")
    ax.set_ylabel("mean latency over the oracle's (%, clipped at 50)")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)

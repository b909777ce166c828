"""`splitinfer simulate` and `splitinfer experiment`: command functions, registered on the
main app by splitinfer.cli (``app.command("simulate")(simulate_cmd)``,
``app.command("experiment")(experiment_cmd)``). Thin layers over the simulator and the
experiment runner; user mistakes raise UserError (one line, exit code 2)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from splitinfer.errors import UserError

__all__ = ["experiment_cmd", "simulate_cmd"]

log = logging.getLogger(__name__)

_console = Console(width=None if sys.stdout.isatty() else 120)  # piped: wide enough for the tables
_err = Console(stderr=True)

EXPERIMENTS = ("adaptive", "estimators", "hysteresis")


def _emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=1) + "\n")
    sys.stdout.flush()


def _check_positive(name: str, value: float | None) -> None:
    if value is not None and not value > 0:
        raise UserError(f"{name} must be positive, got {value:g}")


def _profiles(model: str, edge_profile: Path | None, cloud_profile: Path | None) -> tuple[Any, Any]:
    """The given profiles, or the bundled reference ones of a built-in model."""
    from splitinfer.profile import Profile
    from splitinfer.reference import load_reference

    if (edge_profile is None) != (cloud_profile is None):
        raise UserError("give both --edge-profile and --cloud-profile, or neither (bundled reference profiles)")
    if edge_profile is not None and cloud_profile is not None:
        edge, cloud = Profile.load(edge_profile), Profile.load(cloud_profile)
        if edge.model != model and ":" not in model:
            log.warning("--model %s but the profiles are of %s", model, edge.model)
    else:
        ref = load_reference(model)
        if ref is None:
            raise UserError(
                f"no bundled reference profiles for model {model!r}: pass --edge-profile and --cloud-profile"
            )
        edge, cloud = ref
    edge.check_compatible(cloud)
    return edge, cloud


def simulate_cmd(
    model: str = typer.Option(..., "--model", "-m", help="model name (built-in models have bundled profiles)"),
    edge_profile: Optional[Path] = typer.Option(None, "--edge-profile", help="profile JSON of the edge (default: bundled)"),
    cloud_profile: Optional[Path] = typer.Option(None, "--cloud-profile", help="profile JSON of the cloud (default: bundled)"),
    trace: Optional[str] = typer.Option(None, "--trace", help="trace file, bundled trace (bus, metro, ...) or preset (cat1, 3g, 4g, wifi)"),
    bandwidth: Optional[float] = typer.Option(None, "--bandwidth", help="a constant uplink, Mbit/s (instead of --trace)"),
    rtt: float = typer.Option(20.0, "--rtt", help="round-trip time, ms (a trace's own RTT column wins)"),
    rate: Optional[float] = typer.Option(None, "--rate", help="requests per second, evenly spaced (default 2)"),
    poisson: Optional[float] = typer.Option(None, "--poisson", help="requests per second, Poisson arrivals"),
    requests: int = typer.Option(1000, "--requests", "-n", help="how many requests"),
    policy: str = typer.Option(",".join(("edge-only", "cloud-only", "static", "adaptive", "oracle")), "--policy",
                               help="comma-separated: edge-only, cloud-only, static, adaptive, oracle"),
    edge_slowdown: float = typer.Option(1.0, "--edge-slowdown", help="the edge profile scaled K times slower"),
    deadline_ms: Optional[float] = typer.Option(None, "--deadline-ms", help="count requests slower than this"),
    seed: int = typer.Option(0, "--seed", help="seed of the Poisson arrivals"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="write latency-over-time and CDF plots to this PNG"),
) -> None:
    """Simulate requests through edge CPU, a time-varying uplink and the cloud, per policy."""
    from splitinfer.simulations.simulator import SimConfig, Simulator, parse_policies, plot_result
    from splitinfer.simulations.traces import constant, load_trace

    if (trace is None) == (bandwidth is None):
        raise UserError("give exactly one of --trace and --bandwidth")
    if rate is not None and poisson is not None:
        raise UserError("give at most one of --rate and --poisson")
    for name, value in (("--bandwidth", bandwidth), ("--rate", rate), ("--poisson", poisson),
                        ("--edge-slowdown", edge_slowdown), ("--deadline-ms", deadline_ms)):  # fmt: skip
        _check_positive(name, value)
    if requests < 1:
        raise UserError(f"--requests must be at least 1, got {requests}")
    if not rtt >= 0:
        raise UserError(f"--rtt must be >= 0, got {rtt:g}")
    if plot is not None and plot.suffix.lower() != ".png":
        raise UserError(f"--plot must name a .png file, got {plot}")
    names = parse_policies(policy)
    link = load_trace(trace) if trace is not None else constant(float(bandwidth or 0), name=f"constant-{bandwidth:g}mbit")
    edge, cloud = _profiles(model, edge_profile, cloud_profile)
    if edge_slowdown != 1.0:
        edge = edge.scaled(edge_slowdown)
    cfg = SimConfig(
        requests=requests,
        rate_per_s=poisson if poisson is not None else (rate if rate is not None else 2.0),
        poisson=poisson is not None,
        rtt_ms=rtt,
        deadline_ms=deadline_ms,
        seed=seed,
    )
    sim = Simulator(edge, cloud, link, cfg)
    result = sim.run_all(names)
    if plot is not None:
        plot_result(result, plot)
    data = result.to_json()
    if json_out:
        _emit_json(data)
        return
    t = data["trace"]
    table = Table(
        title=f"{edge.model} (edge x{edge.slowdown:g}), trace {t['name']} (mean {t['mean_mbit']:.2f} Mbit/s, "
        f"{t['min_mbit']:.2f}..{t['max_mbit']:.2f}), {requests} requests at {cfg.rate_per_s:g}/s"
        + (" Poisson" if cfg.poisson else "")
        + "; latency in ms"
    )
    for col in ("policy", "mean", "p50", "p95", "p99", "misses", "MB sent", "switches", "probes"):
        table.add_column(col, justify="left" if col == "policy" else "right", no_wrap=True)

    def ms(v: float) -> str:
        return f"{v:.1f}" if v < 10_000 else f"{v:,.0f}"

    for name, p in data["policies"].items():
        table.add_row(
            name, ms(p["mean_ms"]), ms(p["p50_ms"]), ms(p["p95_ms"]), ms(p["p99_ms"]),
            str(p["deadline_misses"]) if deadline_ms is not None else "-", f"{p['bytes_sent'] / 1e6:,.1f}",
            str(p["switches"]), str(p["probes"]),
        )  # fmt: skip
    _console.print(table)
    if plot is not None:
        _err.print(f"plot written to {plot}")


def experiment_cmd(
    name: str = typer.Argument(..., help="adaptive (policies vs the oracle), estimators or hysteresis"),
    traces: Optional[str] = typer.Option(None, "--traces", help="a folder of .tsv traces, or names/files, comma-separated (default: every bundled trace)"),
    models: str = typer.Option("resnet18,mobilenet_v2", "--models", help="comma-separated model names"),
    edge_slowdown: float = typer.Option(10.0, "--edge-slowdown", help="the edge profile scaled K times slower"),
    emulate: bool = typer.Option(False, "--emulate", help="run on the real system (network namespaces) instead of the simulator"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object"),
    out: Optional[Path] = typer.Option(None, "--out", help="folder for results.json, results.md and plots"),
    rate: float = typer.Option(1.0, "--rate", help="requests per second"),
    requests: Optional[int] = typer.Option(None, "--requests", help="requests per cell (default: one pass of the trace)"),
    rtt: float = typer.Option(20.0, "--rtt", help="round-trip time, ms"),
    bandwidth_scale: float = typer.Option(1.0, "--bandwidth-scale", help="multiply every trace's bandwidth (5: 3G traces at LTE-like rates)"),
    profiles: Optional[Path] = typer.Option(None, "--profiles", help="folder with <model>/edge.json, cloud.json (default: bundled)"),
    obs_noise: float = typer.Option(0.0, "--obs-noise", help="log-normal sigma of the noise on each observed transfer time"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Policies x traces x models on the simulator, against the oracle."""
    from splitinfer.simulations.experiment import (
        ExperimentConfig,
        adaptive_markdown,
        resolve_traces,
        run_estimator_experiment,
        run_experiment,
        run_hysteresis_experiment,
    )

    if name not in EXPERIMENTS:
        raise UserError(f"unknown experiment {name!r}: use one of {', '.join(EXPERIMENTS)}")
    if emulate:
        raise UserError("--emulate needs the emulation module (not built yet)")
    for label, value in (("--edge-slowdown", edge_slowdown), ("--rate", rate), ("--bandwidth-scale", bandwidth_scale)):
        _check_positive(label, value)
    if requests is not None and requests < 1:
        raise UserError(f"--requests must be at least 1, got {requests}")
    if not rtt >= 0:
        raise UserError(f"--rtt must be >= 0, got {rtt:g}")
    if not obs_noise >= 0:
        raise UserError(f"--obs-noise must be >= 0, got {obs_noise:g}")
    model_list = [m.strip() for m in models.split(",") if m.strip()]
    if not model_list:
        raise UserError("--models is empty")
    if profiles is not None and not profiles.is_dir():
        raise UserError(f"--profiles must be a folder: {profiles}")
    trace_list = resolve_traces(traces)
    cfg = ExperimentConfig(rate_per_s=rate, requests=requests, rtt_ms=rtt, seed=seed, bandwidth_scale=bandwidth_scale,
                           obs_noise=obs_noise)  # fmt: skip
    progress = (lambda msg: _err.print(msg, highlight=False)) if not json_out else None
    kw: dict[str, Any] = {"config": cfg, "profiles_dir": profiles, "out": out, "progress": progress}
    if name == "adaptive":
        result = run_experiment(trace_list, model_list, edge_slowdown, **kw)
    elif name == "estimators":
        result = run_estimator_experiment(trace_list, model_list, edge_slowdown, **kw)
    else:
        result = run_hysteresis_experiment(trace_list, model_list, edge_slowdown, **kw)
    if json_out:
        _emit_json(result)
        return
    if name == "adaptive":
        sys.stdout.write(adaptive_markdown(result).split("| model | trace | policy")[0].rstrip() + "\n")
    else:
        table = Table(title=f"experiment {name}: regret vs the oracle over {len(result['rows']) // max(1, len(result['summary']))} cells")
        for col in ("adaptive with", "mean regret", "max regret", "switches", "mean estimate error"):
            table.add_column(col, justify="left" if col == "adaptive with" else "right", no_wrap=True)
        for v, s in result["summary"].items():
            err = s.get("mean_estimate_error")
            table.add_row(v.removeprefix("adaptive[").removesuffix("]"), f"{s['mean_regret'] * 100:+.2f}%", f"{s['max_regret'] * 100:+.2f}%", str(s["switches"]),
                          "-" if err is None else f"{err * 100:.1f}%")  # fmt: skip
        _console.print(table)
    if out is not None:
        _err.print(f"results written to {out}/")

"""`splitinfer simulate`, `splitinfer emulate` and `splitinfer experiment`: command functions,
registered on the main app by splitinfer.cli (``app.command("simulate")(simulate_cmd)``,
``app.command("emulate")(emulate_cmd)``, ``app.command("experiment")(experiment_cmd)``).
Thin layers over the simulator, the emulation and the experiment runner; user mistakes
raise UserError (one line, exit code 2)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from splitinfer.adapt.policy import POLICY_NAMES
from splitinfer.errors import UserError
from splitinfer.util.output import emit_json

__all__ = ["emulate_cmd", "experiment_cmd", "simulate_cmd"]

log = logging.getLogger(__name__)

_console = Console(width=None if sys.stdout.isatty() else 120)  # piped: wide enough for the tables
_err = Console(stderr=True)

EXPERIMENTS = ("adaptive", "estimators", "hysteresis", "energy", "federated")


def _check_positive(name: str, value: float | None) -> None:
    if value is not None and not value > 0:
        raise UserError(f"{name} must be positive, got {value:g}")


def _profiles(model: str, edge_profile: Path | None, cloud_profile: Path | None) -> tuple[Any, Any]:
    """The given profiles, or the bundled reference ones of a built-in model."""
    from splitinfer.adapt.planner import load_pair, reference_pair

    if (edge_profile is None) != (cloud_profile is None):
        raise UserError("give both --edge-profile and --cloud-profile, or neither (bundled reference profiles)")
    if edge_profile is not None and cloud_profile is not None:
        edge, cloud = load_pair(edge_profile, cloud_profile)
        if edge.model != model and ":" not in model:
            log.warning("--model %s but the profiles are of %s", model, edge.model)
        return edge, cloud
    try:
        edge, cloud = reference_pair(model)
    except UserError:
        raise UserError(
            f"no bundled reference profiles for model {model!r}: pass --edge-profile and --cloud-profile"
        ) from None
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
    policy: str = typer.Option(",".join(POLICY_NAMES), "--policy",
                               help="comma-separated: edge-only, cloud-only, static, adaptive, oracle"),
    edge_slowdown: float = typer.Option(1.0, "--edge-slowdown", help="the edge profile scaled K times slower"),
    deadline_ms: Optional[float] = typer.Option(None, "--deadline-ms", help="count requests slower than this"),
    seed: int = typer.Option(0, "--seed", help="seed of the Poisson arrivals"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="write latency-over-time and CDF plots to this PNG"),
    objective: str = typer.Option("latency", "--objective", help="what the policies minimise: latency, energy or edp (with --deadline-ms: subject to it)"),
    power: Optional[str] = typer.Option(None, "--power", help="the edge's power profile: a JSON file or a device class (phone, jetson, rpi, laptop)"),
    link_type: Optional[str] = typer.Option(None, "--link-type", help="the radio the energy model charges: 3g, 4g, wifi, ethernet"),
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
    from splitinfer.adapt.planner import cut_table
    from splitinfer.core.energy import load_power

    pw = load_power(power) if power is not None else None
    if link_type is not None:
        pw = (pw or load_power(None)).on(link_type)
    table = cut_table(edge, cloud, objective=objective, power=pw,
                      deadline_ms=deadline_ms if objective != "latency" else None)  # fmt: skip
    sim = Simulator(edge, cloud, link, cfg, table=table)
    result = sim.run_all(names)
    if plot is not None:
        plot_result(result, plot)
    data = result.to_json()
    if json_out:
        emit_json(data)
        return
    t = data["trace"]
    table = Table(
        title=f"{edge.model} (edge x{edge.slowdown:g}), trace {t['name']} (mean {t['mean_mbit']:.2f} Mbit/s, "
        f"{t['min_mbit']:.2f}..{t['max_mbit']:.2f}), {requests} requests at {cfg.rate_per_s:g}/s"
        + (" Poisson" if cfg.poisson else "")
        + "; latency in ms"
    )
    for col in ("policy", "mean", "p50", "p95", "p99", "misses", "MB sent", "switches", "probes", "mJ/request"):
        table.add_column(col, justify="left" if col == "policy" else "right", no_wrap=True)

    def ms(v: float) -> str:
        return f"{v:.1f}" if v < 10_000 else f"{v:,.0f}"

    for name, p in data["policies"].items():
        table.add_row(
            name, ms(p["mean_ms"]), ms(p["p50_ms"]), ms(p["p95_ms"]), ms(p["p99_ms"]),
            str(p["deadline_misses"]) if deadline_ms is not None else "-", f"{p['bytes_sent'] / 1e6:,.1f}",
            str(p["switches"]), str(p["probes"]), f"{p['energy_mj']:.1f}" if "energy_mj" in p else "-",
        )  # fmt: skip
    _console.print(table)
    if plot is not None:
        _err.print(f"plot written to {plot}")


def emulate_cmd(
    model: str = typer.Option(..., "--model", "-m", help="model name (as for splitinfer edge)"),
    trace: Optional[str] = typer.Option(None, "--trace", help="trace file, bundled trace (bus, metro, ...) or preset (cat1, 3g, 4g, wifi), replayed live"),
    bandwidth: Optional[float] = typer.Option(None, "--bandwidth", help="a constant uplink, Mbit/s (instead of --trace)"),
    rtt: float = typer.Option(20.0, "--rtt", help="round-trip time added by the delay line, ms (a trace's own RTT column wins)"),
    loss: float = typer.Option(0.0, "--loss", help="packet loss probability in each direction (delay line), 0..1"),
    cut: str = typer.Option("auto", "--cut", help="auto (the adaptive policy, estimating the link itself), edge, cloud or a cut index"),
    requests: int = typer.Option(20, "--requests", "-n", help="timed requests (after one warm-up)"),
    rate: Optional[float] = typer.Option(None, "--rate", help="arrivals per second, open loop (default: one after another)"),
    edge_slowdown: float = typer.Option(1.0, "--edge-slowdown", help="the edge process K times slower than one CPU (cgroup cpu quota)"),
    deadline_ms: Optional[float] = typer.Option(None, "--deadline-ms", help="end-to-end budget per request"),
    time_scale: float = typer.Option(1.0, "--time-scale", help="play the trace this many times faster"),
    seed: int = typer.Option(0, "--seed", help="seed of the loss model"),
    calibrate: bool = typer.Option(True, "--calibrate/--no-calibrate", help="with --edge-slowdown: measure the quota that makes the model K times slower"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Real processes over an emulated link: cloud worker and edge agent in network namespaces,
    tc tbf replaying the trace, a TUN delay line for RTT and loss, a cgroup for a slow edge."""
    from splitinfer.simulations.emulate import emulate, emulation_unavailable
    from splitinfer.simulations.netns import install_signal_cleanup
    from splitinfer.simulations.traces import load_trace, time_scaled

    if (trace is None) == (bandwidth is None):
        raise UserError("give exactly one of --trace and --bandwidth")
    for name, value in (("--bandwidth", bandwidth), ("--rate", rate), ("--deadline-ms", deadline_ms),
                        ("--time-scale", time_scale)):  # fmt: skip
        _check_positive(name, value)
    if not edge_slowdown >= 1.0:
        raise UserError(f"--edge-slowdown must be >= 1 (the edge can only be slowed down), got {edge_slowdown:g}")
    if requests < 1:
        raise UserError(f"--requests must be at least 1, got {requests}")
    if not rtt >= 0:
        raise UserError(f"--rtt must be >= 0, got {rtt:g}")
    if not 0.0 <= loss < 1.0:
        raise UserError(f"--loss must be in [0, 1), got {loss:g}")
    link = time_scaled(load_trace(trace), time_scale) if trace is not None else None
    why = emulation_unavailable(edge_slowdown)
    if why:
        raise UserError(why)
    install_signal_cleanup()
    progress = (lambda msg: _err.print(msg, highlight=False)) if not json_out else None
    result = emulate(model, trace=link, bandwidth_mbit=bandwidth, rtt_ms=rtt, loss=loss, cut=cut, requests=requests,
                     rate_per_s=rate, edge_slowdown=edge_slowdown, deadline_ms=deadline_ms, seed=seed,
                     calibrate=calibrate, progress=progress)  # fmt: skip
    if json_out:
        emit_json(result)
        return
    lk, emu = result["link"], result["emulation"]
    where = f"trace {lk['trace']['name']} (mean {lk['trace']['mean_mbit']:.2f} Mbit/s)" if lk["trace"] else f"{lk['bandwidth_mbit']:g} Mbit/s"
    cutinfo = result["cut"]
    table = Table(title=f"{model} emulated: {where}, RTT {lk['rtt_ms']:g} ms, loss {lk['loss']:g}, edge x{emu['edge_slowdown']:g}, "
                        f"cut {cutinfo.get('kind', cutinfo.get('id'))} ({cutinfo.get('chosen_by')})")  # fmt: skip
    for col in ("answered", "errors", "cloud", "edge", "fallback", "mean ms", "p50 ms", "p95 ms", "max ms", "switches"):
        table.add_column(col, justify="right", no_wrap=True)
    lat = result["latency_ms"]

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    src = result["by_source"]
    table.add_row(f"{result['answered']}/{result['requests']}", str(result["errors"]), str(src.get("cloud", 0)), str(src.get("edge", 0)),
                  str(src.get("fallback", 0)), ms(lat["mean"]), ms(lat["p50"]), ms(lat["p95"]), ms(lat["max"]),
                  str(cutinfo.get("switches", 0)))  # fmt: skip
    _console.print(table)
    _err.print(f"bandwidth: {lk['shaper']}; delay and loss: {lk['delay']}", highlight=False)


def experiment_cmd(
    name: str = typer.Argument(..., help="adaptive (policies vs the oracle), estimators or hysteresis"),
    traces: Optional[str] = typer.Option(None, "--traces", help="a folder of .tsv traces, or names/files, comma-separated (default: every bundled trace)"),
    models: str = typer.Option("resnet18,mobilenet_v2", "--models", help="comma-separated model names"),
    edge_slowdown: float = typer.Option(10.0, "--edge-slowdown", help="the edge profile scaled K times slower"),
    emulate: bool = typer.Option(False, "--emulate", help="run on the real system (network namespaces) instead of the simulator"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object"),
    out: Optional[Path] = typer.Option(None, "--out", help="folder for results.json, results.md and plots"),
    rate: Optional[float] = typer.Option(None, "--rate", help="requests per second (default 1; 0.25 with --emulate)"),
    requests: Optional[int] = typer.Option(None, "--requests", help="requests per cell (default: one pass of the trace; 30 with --emulate)"),
    rtt: float = typer.Option(20.0, "--rtt", help="round-trip time, ms"),
    bandwidth_scale: float = typer.Option(1.0, "--bandwidth-scale", help="multiply every trace's bandwidth (5: 3G traces at LTE-like rates)"),
    profiles: Optional[Path] = typer.Option(None, "--profiles", help="folder with <model>/edge.json, cloud.json (default: bundled)"),
    obs_noise: float = typer.Option(0.0, "--obs-noise", help="log-normal sigma of the noise on each observed transfer time"),
    seed: int = typer.Option(0, "--seed"),
    time_scale: float = typer.Option(1.0, "--time-scale", help="play every trace this many times faster (simulator and emulation alike)"),
    power: Optional[str] = typer.Option(None, "--power", help="energy: the edge's power profile, a JSON file or a device class (default phone)"),
    deadline_ms: Optional[float] = typer.Option(None, "--deadline-ms", help="energy: also minimise energy subject to this latency"),
) -> None:
    """Policies x traces x models on the simulator (--emulate: on the real system), against the oracle;
    `energy`: energy per request per objective at Neurosurgeon's 3G/LTE/Wi-Fi rates."""
    from splitinfer.simulations.experiment import (
        ExperimentConfig,
        resolve_traces,
        run_estimator_experiment,
        run_experiment,
        run_hysteresis_experiment,
    )
    from splitinfer.simulations.experiment_report import adaptive_markdown

    if name not in EXPERIMENTS:
        raise UserError(f"unknown experiment {name!r}: use one of {', '.join(EXPERIMENTS)}")
    if emulate and name != "adaptive":
        raise UserError(f"--emulate runs the adaptive experiment only, not {name!r}")
    for label, value in (("--edge-slowdown", edge_slowdown), ("--rate", rate), ("--bandwidth-scale", bandwidth_scale),
                         ("--time-scale", time_scale)):  # fmt: skip
        _check_positive(label, value)
    if time_scale != 1.0 and not emulate:
        raise UserError("--time-scale goes with --emulate (the simulator has no wall clock to save)")
    if requests is not None and requests < 1:
        raise UserError(f"--requests must be at least 1, got {requests}")
    if not rtt >= 0:
        raise UserError(f"--rtt must be >= 0, got {rtt:g}")
    if not obs_noise >= 0:
        raise UserError(f"--obs-noise must be >= 0, got {obs_noise:g}")
    model_list = [m.strip() for m in models.split(",") if m.strip()]
    if not model_list:
        raise UserError("--models is empty")
    if name == "federated":  # issue 18: real Flower processes, see simulations/federated_cli.py
        from splitinfer.simulations.federated_cli import federated_experiment

        federated_experiment(out, json_out)
        return
    if name == "energy":
        _energy_experiment(model_list if models != "resnet18,mobilenet_v2" else None, edge_slowdown, rtt, power,
                           deadline_ms, out, json_out, emulate)  # fmt: skip
        return
    if profiles is not None and not profiles.is_dir():
        raise UserError(f"--profiles must be a folder: {profiles}")
    trace_list = resolve_traces(traces)
    progress = (lambda msg: _err.print(msg, highlight=False)) if not json_out else None
    if emulate:
        from splitinfer.simulations.emulate import emulation_unavailable
        from splitinfer.simulations.experiment_emulated import EMULATE_RATE, EMULATE_REQUESTS, run_emulated_experiment
        from splitinfer.simulations.experiment_report import emulated_markdown
        from splitinfer.simulations.netns import install_signal_cleanup

        if traces is None:
            raise UserError("--emulate needs --traces (each cell runs in real time: every bundled trace would take hours)")
        if not edge_slowdown >= 1.0:
            raise UserError(f"--edge-slowdown must be >= 1 with --emulate, got {edge_slowdown:g}")
        if obs_noise:
            raise UserError("--obs-noise is a simulator option: the real system has its own noise")
        why = emulation_unavailable(edge_slowdown)
        if why:
            raise UserError(why)
        install_signal_cleanup()
        ecfg = ExperimentConfig(rate_per_s=rate or EMULATE_RATE, requests=requests or EMULATE_REQUESTS, rtt_ms=rtt,
                                seed=seed, bandwidth_scale=bandwidth_scale)  # fmt: skip
        result = run_emulated_experiment(trace_list, model_list, edge_slowdown, config=ecfg, time_scale=time_scale,
                                         profiles_dir=profiles, out=out, progress=progress)  # fmt: skip
        if json_out:
            emit_json(result)
        else:
            sys.stdout.write(emulated_markdown(result))
            if out is not None:
                _err.print(f"results written to {out}/")
        return
    cfg = ExperimentConfig(rate_per_s=rate or 1.0, requests=requests, rtt_ms=rtt, seed=seed, bandwidth_scale=bandwidth_scale,
                           obs_noise=obs_noise)  # fmt: skip
    kw: dict[str, Any] = {"config": cfg, "profiles_dir": profiles, "out": out, "progress": progress}
    if name == "adaptive":
        result = run_experiment(trace_list, model_list, edge_slowdown, **kw)
    elif name == "estimators":
        result = run_estimator_experiment(trace_list, model_list, edge_slowdown, **kw)
    else:
        result = run_hysteresis_experiment(trace_list, model_list, edge_slowdown, **kw)
    if json_out:
        emit_json(result)
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


def _energy_experiment(
    models: list[str] | None, edge_slowdown: float, rtt: float, power: str | None, deadline_ms: float | None,
    out: Path | None, json_out: bool, emulate: bool,
) -> None:
    """`splitinfer experiment energy` (models None: every reference model of the experiment)."""
    from splitinfer.core.energy import load_power
    from splitinfer.simulations.experiment_energy import ENERGY_MODELS, check_models, energy_markdown, run_energy_experiment

    if emulate:
        raise UserError("--emulate runs the adaptive experiment only, not 'energy'")
    _check_positive("--deadline-ms", deadline_ms)
    model_list = list(models or ENERGY_MODELS)
    check_models(model_list)
    progress = (lambda msg: _err.print(msg, highlight=False)) if not json_out else None
    result = run_energy_experiment(model_list, edge_slowdown, rtt_ms=rtt, power=load_power(power), deadline_ms=deadline_ms,
                                   out=out, progress=progress)  # fmt: skip
    if json_out:
        emit_json(result)
        return
    sys.stdout.write(energy_markdown(result))
    if out is not None:
        _err.print(f"results written to {out}/")

"""Reports of the experiments: markdown tables, the results folder, the plots.

Pure rendering of the result dicts that :mod:`splitinfer.simulations.experiment` and
:mod:`splitinfer.simulations.experiment_emulated` return; nothing here runs anything.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from splitinfer.errors import UserError
from splitinfer.simulations.simulator import _COLORS

if TYPE_CHECKING:
    from splitinfer.simulations.linktrace import Trace

__all__ = ["adaptive_markdown", "emulated_markdown", "markdown_table", "plot_emulated", "plot_regret", "write_results"]

log = logging.getLogger(__name__)


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


def write_results(out: Path, data: dict[str, Any], md: str) -> None:
    """``results.json`` and ``results.md`` into the folder `out` (created)."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {out}: {exc.strerror or exc}") from None
    (out / "results.json").write_text(json.dumps(data, indent=1) + "\n")
    (out / "results.md").write_text(md)


def plot_regret(data: dict[str, Any], path: Path, target: float) -> None:
    """Mean latency over the oracle's per cell and policy, bars, with the target line."""
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
    ax.axhline(target * 100, color="red", ls=":", lw=1, label=f"target (+{target * 100:g}%)")
    ax.set_xticks(x, [f"{m}\n{t.split('.')[0][:12]}" for m, t in cells], fontsize=7, rotation=30, ha="right")
    ax.set_ylabel("mean latency over the oracle's (%, clipped at 50)")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_emulated(result: dict[str, Any], model: str, trace: Trace, path: Path) -> None:
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

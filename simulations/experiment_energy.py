"""``splitinfer experiment energy``: energy per request per objective, against Neurosurgeon.

For each reference model and each of Neurosurgeon's measured links (3G 1.1, LTE 5.85,
Wi-Fi 18.88 Mbit/s, each on its own radio's power model), the partitioner's best cut
under each objective (latency, energy, EDP; energy under ``deadline_ms`` too when given),
with its predicted latency and energy, against cloud-only (Neurosurgeon's status quo)
and edge-only. Rows also carry the latency cost of the energy objective (its cut's
latency over the latency objective's, minus 1). The summary sets the mean reductions
beside the ones Neurosurgeon (Kang et al., ASPLOS'17) published.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

from splitinfer.adapt.planner import reference_pair
from splitinfer.core.costmodel import Link
from splitinfer.core.energy import PowerProfile, load_power
from splitinfer.core.partitioner import CutPlan, Partitioner
from splitinfer.errors import UserError

__all__ = ["ENERGY_LINKS", "ENERGY_MODELS", "NEUROSURGEON", "energy_markdown", "run_energy_experiment"]

ENERGY_MODELS = ("alexnet", "vgg16", "resnet18", "resnet50", "mobilenet_v2")
# Neurosurgeon's measured average uplinks (Mbit/s) and the radio each was measured on
ENERGY_LINKS = ((1.1, "3g"), (5.85, "4g"), (18.88, "wifi"))
# Neurosurgeon ASPLOS'17 abstract: vs the status quo (cloud-only)
NEUROSURGEON = {"energy_reduction_mean": 0.595, "energy_reduction_max": 0.947, "latency_speedup_mean": 3.1,
                "latency_speedup_max": 40.7}  # fmt: skip


def _cell(cut: CutPlan) -> dict[str, Any]:
    return {"cut": cut.id, "kind": cut.kind, "latency_ms": round(cut.predicted_ms, 3), "energy_mj": round(cut.energy_mj, 3),
            "energy": cut.energy.to_json() if cut.energy is not None else None}  # fmt: skip


def run_energy_experiment(
    models: Sequence[str] = ENERGY_MODELS,
    edge_slowdown: float = 10.0,
    *,
    rtt_ms: float = 20.0,
    power: PowerProfile | None = None,
    deadline_ms: float | None = None,
    links: Sequence[tuple[float, str]] = ENERGY_LINKS,
    out: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Rows per (model, link, objective); see the module docstring."""
    power = power or load_power(None)
    objectives: list[tuple[str, str, float | None]] = [("latency", "latency", None), ("energy", "energy", None),
                                                       ("edp", "edp", None)]  # fmt: skip
    if deadline_ms is not None:
        objectives.append((f"energy<={deadline_ms:g}ms", "energy", deadline_ms))
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    for model in models:
        edge0, cloud = reference_pair(model)
        edge = edge0.scaled(edge_slowdown) if edge_slowdown != 1.0 else edge0
        for mbit, radio in links:
            if progress:
                progress(f"{model} at {mbit:g} Mbit/s ({radio})")
            pw = replace(power, link_type=radio)
            link = Link(uplink_mbit=mbit, rtt_ms=rtt_ms)
            base = Partitioner(edge, cloud, power=pw)
            g = base.graph
            cloud_only = base.describe(frozenset(g.placeholders), link)
            edge_only = base.describe(frozenset(g.names), link)
            lat_cut = base.best(link)
            for label, objective, deadline in objectives:
                cut = lat_cut if objective == "latency" else Partitioner(
                    edge, cloud, power=pw, objective=objective, deadline_ms=deadline).best(link)  # fmt: skip
                rows.append({
                    "model": model, "mbit": mbit, "link_type": radio, "objective": label, **_cell(cut),
                    "cloud_only_mj": round(cloud_only.energy_mj, 3), "edge_only_mj": round(edge_only.energy_mj, 3),
                    "cloud_only_ms": round(cloud_only.predicted_ms, 3),
                    "energy_vs_cloud_only": round(cut.energy_mj / cloud_only.energy_mj - 1.0, 4),
                    "latency_vs_latency_objective": round(cut.predicted_ms / lat_cut.predicted_ms - 1.0, 4),
                    "speedup_vs_cloud_only": round(cloud_only.predicted_ms / cut.predicted_ms, 3),
                })  # fmt: skip
    summary: dict[str, dict[str, float]] = {}
    for label, _, _ in objectives:
        rs = [r for r in rows if r["objective"] == label]
        red = [-r["energy_vs_cloud_only"] for r in rs]
        summary[label] = {
            "energy_reduction_vs_cloud_only_mean": round(sum(red) / len(red), 4),
            "energy_reduction_vs_cloud_only_max": round(max(red), 4),
            "latency_cost_mean": round(sum(r["latency_vs_latency_objective"] for r in rs) / len(rs), 4),
            "latency_cost_max": round(max(r["latency_vs_latency_objective"] for r in rs), 4),
            "speedup_vs_cloud_only_mean": round(sum(r["speedup_vs_cloud_only"] for r in rs) / len(rs), 3),
        }
    result = {
        "experiment": "energy", "edge_slowdown": edge_slowdown, "rtt_ms": rtt_ms, "deadline_ms": deadline_ms,
        "power": power.to_json(), "links": [{"mbit": m, "link_type": t} for m, t in links], "rows": rows,
        "summary": summary, "neurosurgeon": NEUROSURGEON, "elapsed_s": round(time.perf_counter() - started, 2),
    }  # fmt: skip
    if out is not None:
        import json

        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
        (out / "results.md").write_text(energy_markdown(result))
    return result


def energy_markdown(result: dict[str, Any]) -> str:
    """The rows as a markdown table, then the summary beside Neurosurgeon's figures."""
    lines = ["| model | Mbit/s | radio | objective | cut | ms | mJ | vs cloud-only | latency cost |",
             "| --- | ---: | --- | --- | --- | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for r in result["rows"]:
        lines.append(
            f"| {r['model']} | {r['mbit']:g} | {r['link_type']} | {r['objective']} | {r['cut'][:28]} | "
            f"{r['latency_ms']:.1f} | {r['energy_mj']:.1f} | {r['energy_vs_cloud_only'] * 100:+.1f}% | "
            f"{r['latency_vs_latency_objective'] * 100:+.1f}% |"
        )
    ns = result["neurosurgeon"]
    lines += ["", "| objective | energy vs cloud-only (mean) | (best) | latency cost (mean) | (max) | speedup vs cloud-only |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for label, s in result["summary"].items():
        lines.append(
            f"| {label} | -{s['energy_reduction_vs_cloud_only_mean'] * 100:.1f}% | -{s['energy_reduction_vs_cloud_only_max'] * 100:.1f}% | "
            f"{s['latency_cost_mean'] * 100:+.1f}% | {s['latency_cost_max'] * 100:+.1f}% | {s['speedup_vs_cloud_only_mean']:.2f}x |"
        )
    lines.append(f"| Neurosurgeon (published) | -{ns['energy_reduction_mean'] * 100:.1f}% | -{ns['energy_reduction_max'] * 100:.1f}% | "
                 f"| | {ns['latency_speedup_mean']:g}x (max {ns['latency_speedup_max']:g}x) |")  # fmt: skip
    return "\n".join(lines) + "\n"


def check_models(models: Sequence[str]) -> None:
    for m in models:
        try:
            reference_pair(m)
        except UserError:
            raise UserError(f"no reference profiles for {m!r}: the energy experiment uses partitions/<model>/") from None

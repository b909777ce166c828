"""Reference profiles and plans for the built-in models (the data in `partitions/`).

Edge = 1 torch thread, cloud = 2 threads of this machine: a stand-in for a real device
pair, stated in partitions/README.md. Users regenerate it for their own hardware with
`splitinfer reference --out DIR`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from splitinfer.core.costmodel import Link
from splitinfer.models.loader import builtin_models, load_model, weights_hash
from splitinfer.core.partitioner import Partitioner
from splitinfer.core.profile import Profile
from splitinfer.core.profiler import profile_model

# Uplinks of the split-computing literature (DADS' CAT1, Neurosurgeon's 3G/4G/Wi-Fi) and a LAN.
REFERENCE_MBIT = (0.13, 1.1, 5.85, 18.88, 100.0)
REFERENCE_RTT_MS = 20.0
PLAN_LINK = Link(uplink_mbit=5.85, rtt_ms=REFERENCE_RTT_MS)  # plan.json: 4G
SLOW_EDGE = 10.0


def reference_dir() -> Path:
    """Where the bundled partitions/ data lives (installed as splitinfer.partitions)."""
    import splitinfer.partitions

    return Path(splitinfer.partitions.__file__).parent


def load_reference(model: str, root: Path | None = None) -> tuple[Profile, Profile] | None:
    """The bundled (edge, cloud) profiles of a built-in model, if there are any."""
    d = (root or reference_dir()) / model
    if not (d / "edge.json").exists() or not (d / "cloud.json").exists():
        return None
    return Profile.load(d / "edge.json"), Profile.load(d / "cloud.json")


def build_reference(
    out: Path,
    models: list[str] | None = None,
    *,
    edge_threads: int = 1,
    cloud_threads: int = 2,
    repeats: int = 10,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Profile each model on both 'devices', write profiles and plans, return a summary."""
    names = models or [m.name for m in builtin_models()]
    summary: dict[str, Any] = {"rtt_ms": REFERENCE_RTT_MS, "models": {}}
    for name in names:
        lm = load_model(name)
        h = weights_hash(lm.module)
        d = out / name
        timings = {}
        profiles = {}
        for role, threads in (("edge", edge_threads), ("cloud", cloud_threads)):
            if progress:
                progress(f"profiling {name} ({role}, {threads} thread(s))")
            started = time.perf_counter()
            prof = profile_model(name, lm.module, lm.example_input, threads=threads, repeats=repeats, weights_hash=h)
            timings[role] = round(time.perf_counter() - started, 2)
            prof.save(d / f"{role}.json")
            profiles[role] = prof
        edge, cloud = profiles["edge"], profiles["cloud"]
        part = Partitioner(edge, cloud)
        plan = part.plan(PLAN_LINK, envelope=True)
        (d / "plan.json").write_text(_dumps(plan.to_json()))
        started = time.perf_counter()
        Partitioner(edge, cloud).plan(PLAN_LINK)
        partition_ms = (time.perf_counter() - started) * 1e3
        slow = Partitioner(edge.scaled(SLOW_EDGE), cloud)
        summary["models"][name] = {
            "nodes": len(edge.graph),
            "edge_ms": round(edge.total_ms, 2),
            "cloud_ms": round(cloud.total_ms, 2),
            "profile_s": timings,
            "partition_ms": round(partition_ms, 2),
            "cuts": {
                "edge_1_thread": [_cut_row(part, mbit) for mbit in REFERENCE_MBIT],
                f"edge_{SLOW_EDGE:g}x_slower": [_cut_row(slow, mbit) for mbit in REFERENCE_MBIT],
            },
        }
    return summary


def _cut_row(part: Partitioner, mbit: float) -> dict[str, Any]:
    best = part.best(Link(uplink_mbit=mbit, rtt_ms=REFERENCE_RTT_MS))
    return {
        "mbit": mbit,
        "kind": best.kind,
        "index": best.index,
        "tensors": list(best.tensors),
        "bytes": best.bytes,
        "predicted_ms": round(best.predicted_ms, 2),
    }


def _dumps(obj: Any) -> str:
    import json

    return json.dumps(obj, indent=1) + "\n"


def summary_markdown(summary: dict[str, Any]) -> str:
    """The chosen cut per model and uplink, as markdown tables."""
    lines = []
    for variant in ("edge_1_thread", f"edge_{SLOW_EDGE:g}x_slower"):
        title = "edge = 1 thread, cloud = 2 threads" if variant == "edge_1_thread" else (
            f"edge {SLOW_EDGE:g}x slower than 1 thread, cloud = 2 threads"
        )
        lines.append(f"Chosen cut, {title}, RTT {summary['rtt_ms']:g} ms (cut: index / tensors sent; predicted ms):\n")
        header = "| model | " + " | ".join(f"{m:g} Mbit/s" for m in REFERENCE_MBIT) + " |"
        lines += [header, "|" + " --- |" * (len(REFERENCE_MBIT) + 1)]
        for name, m in summary["models"].items():
            cells = []
            for row in m["cuts"][variant]:
                if row["kind"] == "split":
                    what = f"{row['index'] if row['index'] is not None else '*'} `{','.join(row['tensors'])[:28]}`"
                else:
                    what = row["kind"]
                cells.append(f"{what}; {row['predicted_ms']:.0f}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append("| model | nodes | edge ms (1 thread) | cloud ms (2 threads) | profile s (edge, cloud) | partition ms |")
    lines.append("| --- | --- | --- | --- | --- | --- |")
    for name, m in summary["models"].items():
        lines.append(
            f"| {name} | {m['nodes']} | {m['edge_ms']:.1f} | {m['cloud_ms']:.1f} | "
            f"{m['profile_s']['edge']}, {m['profile_s']['cloud']} | {m['partition_ms']:.1f} |"
        )
    return "\n".join(lines) + "\n"

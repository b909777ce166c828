"""`splitinfer experiment federated` (called from simulations.cli's experiment command) and its
markdown table."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from splitinfer.util.output import emit_json

__all__ = ["federated_experiment", "federated_markdown"]


def _pct(v: float) -> str:
    return f"{100 * v:.1f}"


def federated_markdown(r: dict[str, Any]) -> str:
    dp_keys = [k for k in r["table"][0] if k.startswith("dp_noise_")]
    head = ["edge", "buffer", "teacher", "shipped", "local-only", "federated", "fed. (avg BN)", *dp_keys,
            "local-only others", "federated others", "upload B/round"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in r["table"]:
        cells = [row["edge"], str(row["buffer"]), _pct(row["teacher"]["own"]), _pct(row["shipped"]["own"]),
                 _pct(row["local_only"]["own"]), _pct(row["federated"]["own"]), _pct(row["federated_global"]["own"]),
                 *(_pct(row[k]["own"]) for k in dp_keys), _pct(row["local_only"]["others"]),
                 _pct(row["federated"]["others"]), f"{row['upload_bytes_per_round']:,}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"targets: {json.dumps(r['targets'])}; DP cost (points, mean own accuracy): "
                 f"{json.dumps(r['dp']['accuracy_cost_points'])} at clip {r['dp']['clip']}; {r['elapsed_s']} s")  # fmt: skip
    return "\n".join(lines) + "\n"


def federated_experiment(out: Path | None, json_out: bool, rounds: int = 4) -> None:
    """Run it; with ``out``: results.json, results.md, accuracy_vs_round.png there."""
    from splitinfer.simulations.federated_experiment import run_federated_experiment, write_plot

    work = Path(tempfile.mkdtemp(prefix="splitinfer-federated-")) if out is None else out / "work"
    report = run_federated_experiment(work, rounds=rounds)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        report["plot"] = str(write_plot(report, out / "accuracy_vs_round.png"))
        (out / "results.json").write_text(json.dumps(report, indent=1))
        (out / "results.md").write_text(federated_markdown(report))
    if json_out:
        emit_json(report)
        return
    sys.stdout.write(federated_markdown(report))

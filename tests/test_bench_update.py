"""`splitinfer bench update --json` with small settings: a real worker and real following
edge through two rollouts; the keys its contract names, and no request lost. One edge: several
agents in one process race on torch.fx's process-wide patching (see updates-readme.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.timeout(300)


def test_bench_update_json_loses_nothing() -> None:
    proc = subprocess.run(
        [sys.executable, "-P", "-m", "splitinfer.cli", "bench", "update", "--edges", "1", "--rate", "4", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["model"] == "tinycnn" and out["edges"] == 1 and out["lost"] == 0
    assert set(out["updates"]) == {"classifier", "one_block"}
    for u in out["updates"].values():
        assert {"bytes_per_edge", "full_bytes", "share", "tensors_sent", "tensors", "publish_to_all_switched_s",
                "requests", "lost", "fallbacks", "model_mismatch"} <= set(u)  # fmt: skip
        assert u["lost"] == 0 and u["requests"] > 0 and 0 < u["bytes_per_edge"] < u["full_bytes"]
    fc, block = out["updates"]["classifier"], out["updates"]["one_block"]
    assert fc["tensors_sent"] == 2 and fc["share"] < 0.05 and block["bytes_per_edge"] > fc["bytes_per_edge"]

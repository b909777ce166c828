"""Benchmarks print the JSON their contract names (figures themselves are not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_json(*args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "splitinfer.cli", *args, "--json"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_bench_codec_json() -> None:
    out = run_json("bench", "codec", "--sizes", "1")
    codecs = {r["codec"] for r in out["results"]}
    assert codecs == {"splitinfer", "pickle5", "torch.save"}
    assert all(r["mb"] == 1 and r["encode_gbps"] > 0 and r["decode_gbps"] > 0 for r in out["results"])


def test_bench_cloud_json() -> None:
    out = run_json("bench", "cloud", "--model", "tinycnn", "--concurrency", "1,4", "--seconds", "0.5")
    rows = out["results"]
    assert {(r["batching"], r["concurrency"]) for r in rows} == {(False, 1), (False, 4), (True, 1), (True, 4)}
    for r in rows:
        assert r["throughput_rps"] > 0 and 0 < r["p50_ms"] <= r["p95_ms"]
        assert r["mean_batch"] >= 1
        if not r["batching"]:
            assert r["mean_batch"] == 1
    assert out["cut"]["index"] > 0 and out["speedup_at_max_concurrency"] > 0

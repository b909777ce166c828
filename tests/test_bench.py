"""Benchmarks print the JSON their contract names (figures themselves are not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_json(*args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-P", "-m", "splitinfer.cli", *args, "--json"], cwd=ROOT, capture_output=True, text=True, timeout=300
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
        cpu = r["cpu_ms_per_request"]  # the worker process did the tails, this one the clients
        assert cpu["worker"] > 0 and cpu["bench-clients"] > 0 and cpu["total"] >= cpu["worker"] + cpu["bench-clients"] - 0.01  # each rounded to 0.01
    assert out["cut"]["index"] > 0 and out["speedup_at_max_concurrency"] > 0


def test_bench_cloud_rounds_interleave_and_take_the_median() -> None:
    out = run_json("bench", "cloud", "--model", "tinycnn", "--concurrency", "2", "--seconds", "0.3",
                   "--rounds", "2", "--batching", "off")  # fmt: skip
    rows = out["results"]
    assert [(r["round"], r["batching"]) for r in rows] == [(0, False), (1, False)]
    assert out["rounds"] == 2 and all(len(v) == 2 for v in out["per_round"].values())
    assert out["speedup_at_max_concurrency"] is None  # no batching-on rows to compare with


def test_bench_ratios_are_taken_within_a_round() -> None:
    from splitinfer.bench.cloud import RATIOS, _by_round, _median, _round_order

    assert _round_order(["a", "b"], 0) == ["a", "b"] and _round_order(["a", "b"], 1) == ["b", "a"]
    # the machine is twice as fast in round 1: within a round 2 replicas answer 1.5x, while a
    # ratio across rounds would read 3.0 or 0.75
    rows = [{"backend": "ray", "replicas": n, "batching": False, "concurrency": 32, "round": k, "throughput_rps": rps}
            for k, n, rps in ((0, 1, 10.0), (0, 2, 15.0), (1, 2, 30.0), (1, 1, 20.0))]  # fmt: skip
    two_vs_one = RATIOS["two_vs_one_replica_at_max_concurrency"]
    per_round = [two_vs_one(r, 32, ("ray", 1)) for r in _by_round(rows)]
    assert per_round == [1.5, 1.5] and _median(per_round) == 1.5
    assert _median([None, 1.2, 1.6, 1.3]) == 1.3 and _median([None]) is None


@pytest.mark.parametrize("args, says", [(("--rounds", "0"), "--rounds"), (("--batching", "sometimes"), "--batching")])
def test_bench_cloud_refuses_bad_options_in_one_line(args: tuple[str, ...], says: str) -> None:
    proc = subprocess.run([sys.executable, "-P", "-m", "splitinfer.cli", "bench", "cloud", "--model", "tinycnn", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode != 0 and says in proc.stderr and "Traceback" not in proc.stderr


def test_process_cpu_counts_a_busy_process_per_request() -> None:
    from splitinfer.bench.process_cpu import cpu_ms_per_request, snapshot

    spin = "import sys, time\nt = time.process_time()\nwhile time.process_time() - t < 0.4: pass\nprint(flush=True)\nsys.stdin.read()"
    child = subprocess.Popen([sys.executable, "-c", spin], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "\n"  # it has spun its 0.4 s
        after = snapshot()
    finally:
        child.kill()
        child.wait()
    # the child's own ticks only (other processes on the machine would blur the bound); it
    # started after the empty "before", so it counts from zero
    before, after = {}, {child.pid: after[child.pid]}
    per = cpu_ms_per_request(before, after, answered=4)
    assert 100 - 15 <= per["other"] <= 100 + 60  # 400 ms of CPU over 4 answers (ticks are 10 ms)
    assert per["total"] >= per["other"]
    assert cpu_ms_per_request(before, after, answered=0) == {}


def test_bench_compression_on_digits() -> None:
    out = run_json("bench", "compression", "--cuts", "2", "--samples", "64")
    rows = out["results"]
    assert out["model"] == "tinycnn-digits" and out["reference_accuracy"] > 0.9
    by = {(r["index"], r["compression"]): r for r in rows}
    for (index, comp), r in by.items():
        none = by[(index, "none")]
        if comp.startswith("fp16"):
            assert r["wire_bytes"] < 0.6 * none["wire_bytes"]
        if comp.startswith("int8"):
            assert r["wire_bytes"] < 0.3 * none["wire_bytes"]
        assert r["top1_agreement"] >= 0.95  # digits survive fp16 and int8 activations
        assert 0.0 <= r["accuracy"] <= 1.0


def test_codec_cost_counts_compressed_bytes() -> None:
    import torch

    from splitinfer.bench.compression import codec_cost

    sample = {"a": torch.relu(torch.randn(1, 64, 28, 28))}
    assert codec_cost("none", sample).size_ratio == 1.0
    assert abs(codec_cost("fp16", sample).size_ratio - 0.5) < 0.01
    int8 = codec_cost("int8", sample)
    assert 0.2 < int8.size_ratio < 0.3 and int8.encode_ms_per_mb > 0


def test_bench_confidence_trades_cloud_traffic() -> None:
    out = run_json("bench", "confidence", "--p", "none,0.5,1.0", "--samples", "20")
    by = {r["p"]: r for r in out["results"]}
    assert by[None]["cloud_share"] == 1.0 and by[1.0]["cloud_share"] == 1.0
    assert by[0.5]["cloud_share"] < 1.0 and by[0.5]["bytes_per_request"] < by[None]["bytes_per_request"]
    assert all(0.8 <= r["accuracy"] <= 1.0 for r in out["results"])

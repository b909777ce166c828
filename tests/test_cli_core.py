"""The core commands as a user runs them: real processes, JSON contracts, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUSTOM = "tests/data/custom_model.py:build"


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-P", "-m", "splitinfer.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def tiny_profiles(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("prof")
    edge, cloud = d / "edge.json", d / "cloud.json"
    run("profile", "--model", "tinycnn", "--threads", "1", "--repeats", "3", "--slowdown", "10", "--out", str(edge))
    run("profile", "--model", "tinycnn", "--threads", "1", "--repeats", "3", "--out", str(cloud))
    return edge, cloud


def test_profile_records_what_it_measured(tiny_profiles) -> None:
    edge = json.loads(tiny_profiles[0].read_text())
    assert edge["model"] == "tinycnn" and edge["threads"] == 1 and edge["batch"] == 1
    assert edge["input_shape"] == [3, 32, 32] and edge["slowdown"] == 10
    assert edge["torch_version"].startswith("2.") and edge["device"].startswith("cpu")
    assert edge["input_bytes"] == 3 * 32 * 32 * 4 and edge["output_bytes"] == 10 * 4
    assert all(n["ms"] >= 0 and n["nbytes"] > 0 for n in edge["nodes"])
    assert abs(edge["total_ms"] - sum(n["ms"] for n in edge["nodes"])) < 1e-2


def test_partition_json_contract(tiny_profiles) -> None:
    edge, cloud = tiny_profiles
    out = run(
        "partition", "--model", "tinycnn", "--edge-profile", str(edge), "--cloud-profile", str(cloud),
        "--bandwidth", "5.85", "--rtt", "1", "--envelope", "--json",
    ).stdout
    plan = json.loads(out)
    assert set(plan["cut"]) >= {"index", "kind", "tensors", "bytes"}
    assert set(plan["breakdown"]) >= {"edge_ms", "transfer_ms", "rtt_ms", "cloud_ms", "return_ms"}
    assert abs(sum(plan["breakdown"].values()) - plan["predicted_ms"]) < 1e-2
    kinds = [c["kind"] for c in plan["candidates"]]
    assert kinds[0] == "cloud-only" and kinds[-1] == "edge-only"
    assert all(plan["predicted_ms"] <= c["predicted_ms"] + 1e-6 for c in plan["candidates"])
    env = plan["envelope"]
    assert env[0]["from_mbit"] == pytest.approx(0.05) and env[-1]["to_mbit"] == pytest.approx(10000)
    # a slow edge on a slow link keeps everything local; on a fast link the cloud wins
    assert env[0]["kind"] == "edge-only" and env[-1]["kind"] != "edge-only"


def test_inspect_user_model_json() -> None:
    report = json.loads(run("inspect", "--model", CUSTOM, "--json").stdout)
    assert report["candidates"] and all(c["max_abs_diff"] <= 1e-5 for c in report["candidates"])
    assert all(set(c) >= {"index", "tensors", "bytes", "max_abs_diff"} for c in report["candidates"])


def bad(*args: str) -> str:
    proc = run(*args, check=False)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) <= 2, proc.stderr  # one message (rich may wrap a long line once)
    return proc.stderr.replace("\n", " ")


def test_bad_input_is_one_clear_line(tiny_profiles, tmp_path) -> None:
    edge, cloud = tiny_profiles
    assert "unknown model" in bad("inspect", "--model", "nosuchnet")
    assert "not found" in bad("inspect", "--model", "missing/file.py:build")
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    assert "boom" in bad("inspect", "--model", f"{broken}:build")
    wrong = tmp_path / "wrong.py"
    wrong.write_text("def build():\n    return 42\n")
    assert "build" in bad("inspect", "--model", f"{wrong}:build")
    args = ["--edge-profile", str(edge), "--cloud-profile", str(cloud), "--rtt", "20"]
    assert "positive" in bad("partition", "--model", "tinycnn", *args, "--bandwidth", "0")
    assert "positive" in bad("partition", "--model", "tinycnn", *args, "--bandwidth", "-3")
    assert "not of" in bad("partition", "--model", CUSTOM, *args, "--bandwidth", "1")
    assert "not found" in bad(
        "partition", "--model", "tinycnn", "--edge-profile", str(tmp_path / "none.json"),
        "--cloud-profile", str(cloud), "--bandwidth", "1",
    )
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    assert "profile" in bad(
        "partition", "--model", "tinycnn", "--edge-profile", str(garbage), "--cloud-profile", str(cloud),
        "--bandwidth", "1",
    )


@pytest.mark.parametrize(
    "option", ["--max-request-samples", "--max-queued-mb", "--answer-cache-mb", "--idle-timeout-s", "--body-timeout-s"]
)
def test_worker_limit_options_refuse_non_positive_values(option: str) -> None:
    proc = run("cloud", "--model", "tinycnn", "--port", "0", "--no-advertise", option, "0", check=False)
    assert proc.returncode == 2 and "must be positive" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1

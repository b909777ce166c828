"""`splitinfer bench generate --quick --json`: emulated, small; behaviour, not speed.

Needs root, tc and /dev/net/tun (network namespaces + the delay line) and the cgroup v1
cpu controller; skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from splitinfer.bench.generate import DIAGONAL, FULL_GRID, MODES, parse_cells
from splitinfer.bench.generate_faults import check_chain, source_runs
from splitinfer.bench.generate_targets import judge_targets
from splitinfer.errors import UserError
from splitinfer.simulations.gen_emulation import gen_emulation_unavailable

WHY = gen_emulation_unavailable(10.0)

MODE_KEYS = {"mode", "ms_per_token", "ttft_ms", "tpot_ms", "acceptance", "bytes_up_per_token", "bytes_down_per_token",
             "token_ids", "equal_reference", "sources"}  # fmt: skip
TOP_KEYS = {"model", "draft", "weights", "grid", "cells_run", "modes", "prompt", "max_tokens", "reference", "results",
            "emulation", "sigkill", "concurrency", "targets"}  # fmt: skip
TARGETS = {"a_edge_slower_than_cloud_rtt20", "b_speculative_1_5x_cloud_rtt20_80", "c_auto_within_10pct",
           "d_greedy_equal", "e_sessions_32", "summary"}  # fmt: skip


def test_cells_parse() -> None:
    assert parse_cells("full") == FULL_GRID and len(FULL_GRID) == 9
    assert parse_cells("diagonal") == DIAGONAL
    assert parse_cells("20x5.85, 80x1.1") == ((20.0, 5.85), (80.0, 1.1))
    with pytest.raises(UserError):
        parse_cells("20-5")


def test_source_runs_and_targets_shape() -> None:
    assert source_runs(["cloud", "cloud", "draft", "cloud"]) == [["cloud", 2], ["draft", 1], ["cloud", 1]]
    t = judge_targets({"results": [], "concurrency": {"levels": []}})
    assert set(t) == TARGETS and all(v["status"] == "not_run" for k, v in t.items() if k != "summary")


def test_chain_catches_a_doubled_token() -> None:
    from splitinfer.bench.generate_cloud import greedy_reference
    from splitinfer.models.lmzoo import load_lm

    teacher, draft = load_lm("bytelm"), load_lm("bytelm-draft")
    prompt = list(b"def f(x):\n    return ")
    ref = greedy_reference(teacher, prompt, 8)
    good = check_chain(prompt, ref, ["cloud"] * 8, teacher, draft)
    assert good["inconsistent"] == 0
    doubled = ref[:3] + ref[2:3] + ref[3:7]
    if doubled != ref:
        assert check_chain(prompt, doubled, ["cloud"] * 8, teacher, draft)["inconsistent"] > 0


@pytest.mark.skipif(WHY is not None, reason=f"emulation unavailable: {WHY}")
def test_bench_generate_quick_json() -> None:
    from splitinfer.simulations.cpulimit import cgroup_leftovers
    from splitinfer.simulations.netns import leftovers

    proc = subprocess.run([sys.executable, "-P", "-m", "splitinfer.cli", "bench", "generate", "--quick", "--json"],
                          capture_output=True, text=True, timeout=240)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert TOP_KEYS <= set(result)
    assert set(result["targets"]) == TARGETS
    assert result["grid"].startswith("quick")
    (cell,) = result["results"]
    assert set(cell["modes"]) == set(MODES)
    for mode, m in cell["modes"].items():
        assert "error" not in m, (mode, m.get("error"))
        assert MODE_KEYS <= set(m), (mode, MODE_KEYS - set(m))
        assert m["tokens"] == result["max_tokens"]
        assert m["equal_reference"], (mode, m["token_ids"], result["reference"])
    assert result["targets"]["d_greedy_equal"]["status"] == "met"
    # the SIGKILL scenario: every token there, none lost, none doubled, the draft took over
    kill = result["sigkill"]
    assert kill["ok"], kill
    assert kill["no_token_lost"] and kill["no_token_doubled"] and kill["draft_took_over"]
    assert kill["cloud_restarted"]
    # 32 concurrent sessions on one worker
    levels = {lv["sessions"]: lv for lv in result["concurrency"]["levels"]}
    assert levels[32]["errors"] == 0 and levels[32]["sessions_equal_reference"] == 32
    # nothing left behind
    assert not leftovers() and not cgroup_leftovers()


def test_unavailable_reason_is_clear() -> None:
    why = gen_emulation_unavailable(10.0)
    assert why is None or any(w in why for w in ("root", "tc", "ip", "tun", "cgroup"))


def _gen_processes() -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [ln for ln in out.splitlines() if "splitinfer.simulations.gen_edge" in ln]


@pytest.mark.skipif(WHY is not None, reason=f"emulation unavailable: {WHY}")
def test_bench_generate_cleans_up_when_terminated() -> None:
    """SIGTERM in the middle of a run: no namespace, cpu group or edge process is left."""
    import signal
    import time

    from splitinfer.simulations.cpulimit import cgroup_leftovers
    from splitinfer.simulations.netns import leftovers

    proc = subprocess.Popen([sys.executable, "-P", "-m", "splitinfer.cli", "bench", "generate", "--quick", "--json",
                             "--no-kill"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # wait until the emulation is up and generating
            if "cell RTT" in line:
                break
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    deadline = time.monotonic() + 10
    while (_gen_processes() or leftovers() or cgroup_leftovers()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _gen_processes() and not leftovers() and not cgroup_leftovers()

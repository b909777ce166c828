"""`splitinfer bench soak` end to end, made short: a real worker process, real clients, an
attack, and the JSON report (errors, lost, p50/p99, RSS over time, the cap)."""

from __future__ import annotations

import json
import subprocess

import pytest

from splitinfer.bench.soak import SoakSettings, run_soak
from splitinfer.util.procs import python_module


@pytest.mark.slow
def test_short_soak_with_attack_stays_under_the_cap() -> None:
    r = run_soak(SoakSettings(clients=4, seconds=2.0, attack_s=4.0, heavy_requests=200, bombs=20,
                              never_read_frames=2000, settle_s=4.0))  # fmt: skip
    load = r["load"]
    assert load["answered"] > 0 and load["lost"] == 0 and load["wrong_answers"] == 0 and load["errors"] == 0
    assert load["p50_ms"] <= load["p99_ms"]
    attack = r["attack"]
    assert attack["bomb_codes"] == {"too_large": 20}
    assert set(attack["heavy_codes"]) <= {"ok", "overloaded"}
    assert attack["bystanders"]["wrong_answers"] == 0 and attack["bystanders"]["lost"] == 0
    assert r["within_cap"] and r["peak_rss_mb"] <= r["rss_cap_mb"]
    assert {s["phase"] for s in r["rss"]} >= {"baseline", "load", "attack"}


@pytest.mark.slow
def test_soak_cli_prints_json() -> None:
    out = subprocess.run(
        python_module("splitinfer.cli", "bench", "soak", "--clients", "2", "--seconds", "1", "--no-attack", "--json"),
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    r = json.loads(out.stdout)
    assert r["clients"] == 2 and r["load"]["errors"] == 0 and r["attack"] == {}
    assert {"p50_ms", "p99_ms", "lost", "errors"} <= set(r["load"]) and r["rss"]

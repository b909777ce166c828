"""The trace-driven simulator, the experiment runner and their commands.

The oracle is clairvoyant per request: it takes the cut with the lowest *actual*
latency for the request at hand, given the queues as they are. That is the optimum only
for requests that find the system empty; with queueing, a greedy choice can delay later
requests. So "oracle <= every policy" is tested where it holds by construction: requests
spaced wider than the oracle's slowest answer (never slower than edge-only), so the oracle
never queues; then every request of every other policy is at least as slow (queues only
delay), on every seed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from splitinfer.core.costmodel import transfer_ms
from splitinfer.errors import UserError
from splitinfer.simulations.cli import experiment_cmd, simulate_cmd
from splitinfer.simulations.experiment import ExperimentConfig, resolve_traces, run_experiment
from splitinfer.simulations.simulator import SimConfig, parse_policies, plot_result, simulate
from splitinfer.simulations.traces import constant, load_trace, markov_good_bad, steps

from toy_profiles import toy_profiles  # noqa: E402 (tests/ is on sys.path)

RTT_MS = 20.0
POLICIES = ("edge-only", "cloud-only", "static", "adaptive", "oracle")




@pytest.mark.parametrize("seed", range(8))
def test_oracle_is_never_slower_than_any_policy_at_low_load(seed: int) -> None:
    edge, cloud = toy_profiles()
    trace = markov_good_bad(40.0, 1.5, 0.2, 0.3, step_s=1.0, duration_s=300, seed=seed)
    rng = np.random.default_rng(seed)
    cfg = SimConfig(requests=150, rate_per_s=1 / 0.25, rtt_ms=RTT_MS, start_s=float(rng.uniform(0, 300)))
    assert 1 / cfg.rate_per_s > edge.total_ms / 1e3  # gaps wider than edge-only: the oracle never queues
    res = simulate(edge, cloud, trace, [*POLICIES, "oracle-instant", "adaptive-nohyst"], cfg)
    oracle = res.runs["oracle"].latency_ms
    assert oracle.max() <= edge.total_ms + 1e-9
    for name, run in res.runs.items():
        assert np.all(oracle <= run.latency_ms + 1e-9), name
        assert oracle.mean() <= run.latency_ms.mean() + 1e-9


def test_edge_only_latency_does_not_depend_on_the_link() -> None:
    edge, cloud = toy_profiles()
    cfg = SimConfig(requests=200, rate_per_s=3.0, rtt_ms=RTT_MS)
    runs = [
        simulate(edge, cloud, t, ["edge-only"], cfg).runs["edge-only"].latency_ms
        for t in (constant(0.2), constant(500.0), load_trace("bus"), steps([(1, 0.1), (1, 90.0)]))
    ]
    for r in runs[1:]:
        np.testing.assert_array_equal(r, runs[0])
    assert runs[0][0] == pytest.approx(edge.total_ms)


def test_cloud_only_latency_falls_as_bandwidth_rises() -> None:
    edge, cloud = toy_profiles()
    cfg = SimConfig(requests=100, rate_per_s=2.0, rtt_ms=RTT_MS, poisson=True, seed=3)
    means = []
    for mbit in (1.0, 2.0, 5.0, 20.0, 100.0, 1000.0):
        means.append(simulate(edge, cloud, constant(mbit), ["cloud-only"], cfg).runs["cloud-only"].latency_ms.mean())
    assert all(a > b for a, b in zip(means, means[1:]))
    # the same, request by request, for a varying trace scaled up
    trace = markov_good_bad(10.0, 1.0, 0.3, 0.3, step_s=0.5, duration_s=100, seed=1)
    slow = simulate(edge, cloud, trace, ["cloud-only"], cfg).runs["cloud-only"].latency_ms
    fast = simulate(edge, cloud, trace.scaled(2.0), ["cloud-only"], cfg).runs["cloud-only"].latency_ms
    assert np.all(fast <= slow + 1e-9) and fast.mean() < slow.mean()


def test_one_request_adds_up_from_the_cost_model_and_the_trace() -> None:
    """A cloud-only request over a link that changes mid-transfer."""
    edge, cloud = toy_profiles()
    trace = steps([(0.5, 2.0), (10.0, 8.0)])
    res = simulate(edge, cloud, trace, ["cloud-only"], SimConfig(requests=1, rtt_ms=RTT_MS))
    # 600 kB: 0.5 s at 2 Mbit/s carries 125 kB, the other 475 kB take 0.475 s at 8 Mbit/s
    up_end_s = 0.0 + 0.5 + 475_000 * 8 / 8e6
    assert trace.transfer_end(edge.node_ms["x"] / 1e3, 600_000) == pytest.approx(up_end_s)
    expected_ms = up_end_s * 1e3 + RTT_MS + cloud.total_ms - cloud.node_ms["x"] + transfer_ms(400, 8.0)
    assert res.runs["cloud-only"].latency_ms[0] == pytest.approx(expected_ms)


def test_the_edge_cpu_queues_requests() -> None:
    """Edge-only at 200 ms per request, arrivals every 150 ms: request i waits i * 50 ms."""
    edge, cloud = toy_profiles()
    run = simulate(edge, cloud, constant(5.0), ["edge-only"], SimConfig(requests=20, rate_per_s=1 / 0.15)).runs[
        "edge-only"
    ]
    np.testing.assert_allclose(run.latency_ms, 200.0 + 50.0 * np.arange(20))


def test_the_uplink_queues_transfers() -> None:
    """Cloud-only: 600 kB take 1.2 s at 4 Mbit/s, arrivals every second: each waits 0.2 s more."""
    edge, cloud = toy_profiles()
    run = simulate(edge, cloud, constant(4.0), ["cloud-only"], SimConfig(requests=10, rate_per_s=1.0, rtt_ms=0.0)).runs[
        "cloud-only"
    ]
    np.testing.assert_allclose(np.diff(run.latency_ms), 200.0)


def test_json_shape_and_counts() -> None:
    edge, cloud = toy_profiles()
    trace = markov_good_bad(40.0, 1.5, 0.1, 0.2, step_s=1.0, duration_s=200, seed=0)
    res = simulate(edge, cloud, trace, POLICIES, SimConfig(requests=400, deadline_ms=250.0, rtt_ms=RTT_MS))
    data = json.loads(json.dumps(res.to_json()))
    assert data["requests"] == 400
    assert data["trace"]["name"] == trace.name and "mean_mbit" in data["trace"]
    assert list(data["policies"]) == list(POLICIES)
    for name, p in data["policies"].items():
        for key in ("mean_ms", "p50_ms", "p95_ms", "p99_ms", "deadline_misses", "bytes_sent", "switches"):
            assert key in p, (name, key)
        assert p["p50_ms"] <= p["p95_ms"] <= p["p99_ms"]
        run = res.runs[name]
        assert p["deadline_misses"] == int((run.latency_ms > 250.0).sum())
    assert data["policies"]["edge-only"]["bytes_sent"] == 0 and data["policies"]["edge-only"]["deadline_misses"] == 0
    assert data["policies"]["cloud-only"]["bytes_sent"] == 400 * 600_000
    assert data["policies"]["static"]["switches"] == 0
    assert data["policies"]["adaptive"]["switches"] > 0 and data["policies"]["adaptive"]["probes"] > 0


def test_plot_is_a_png(tmp_path: Path) -> None:
    edge, cloud = toy_profiles()
    res = simulate(edge, cloud, load_trace("metro"), POLICIES, SimConfig(requests=100, deadline_ms=300.0))
    out = plot_result(res, tmp_path / "sub" / "sim.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_input_is_a_user_error() -> None:
    with pytest.raises(UserError):
        SimConfig(rate_per_s=0.0)
    with pytest.raises(UserError):
        SimConfig(requests=0)
    with pytest.raises(UserError):
        parse_policies("edge-only,fastest")
    with pytest.raises(UserError):
        parse_policies("oracle,oracle")
    assert parse_policies(" static , oracle ") == ["static", "oracle"]


def test_experiment_rows_targets_and_files(tmp_path: Path) -> None:
    edge, cloud = toy_profiles()
    root = tmp_path / "profiles"
    edge.save(root / "toy" / "edge.json")
    cloud.save(root / "toy" / "cloud.json")
    traces = [steps([(20, 30.0), (20, 2.0)], name="stepping"), constant(3.0, name="flat")]
    out = tmp_path / "out"
    result = run_experiment(traces, ["toy"], edge_slowdown=1.0, profiles_dir=root, out=out,
                            config=ExperimentConfig(rate_per_s=2.0, requests=200))  # fmt: skip
    rows = result["rows"]
    assert {r["policy"] for r in rows} == {*POLICIES, "best-static"}
    for r in rows:
        assert {"model", "trace", "policy", "mean_ms", "p95_ms", "regret_vs_oracle", "switches"} <= set(r)
        if r["policy"] == "oracle":
            assert r["regret_vs_oracle"] == 0.0
    targets = {t["trace"]: t for t in result["targets"]}
    assert targets["stepping"]["varies_more_than_2x"] and not targets["flat"]["varies_more_than_2x"]
    for name in ("results.json", "results.md", "toy-stepping.png", "toy-flat.png", "regret.png"):
        assert (out / name).exists(), name
    assert json.loads((out / "results.json").read_text())["rows"] == rows


def test_resolve_traces(tmp_path: Path) -> None:
    assert len(resolve_traces(None)) >= 6
    assert [t.name for t in resolve_traces("4g, metro")] == ["4g", "metro.kalbakken-jernbanetorget"]
    (tmp_path / "a.tsv").write_text("0 1.0\n1 2.0\n")
    assert [t.name for t in resolve_traces(str(tmp_path))] == ["a"]
    with pytest.raises(UserError):
        resolve_traces(str(tmp_path / "empty-dir-that-is-not-there"))
    (tmp_path / "none").mkdir()
    with pytest.raises(UserError):
        resolve_traces(str(tmp_path / "none"))


# ---------------------------------------------------------------------------- commands
def cli() -> typer.Typer:
    app = typer.Typer()
    app.command("simulate")(simulate_cmd)
    app.command("experiment")(experiment_cmd)
    return app


@pytest.fixture
def toy_files(tmp_path: Path) -> tuple[Path, Path]:
    edge, cloud = toy_profiles()
    edge.save(tmp_path / "edge.json")
    cloud.save(tmp_path / "cloud.json")
    return tmp_path / "edge.json", tmp_path / "cloud.json"


def test_simulate_command_json_and_plot(toy_files: tuple[Path, Path], tmp_path: Path) -> None:
    e, c = toy_files
    png = tmp_path / "p.png"
    args = ["simulate", "--model", "toy", "--edge-profile", str(e), "--cloud-profile", str(c), "--trace", "metro",
            "--poisson", "3", "--requests", "300", "--policy", "edge-only,adaptive,oracle", "--deadline-ms", "250",
            "--seed", "7", "--json", "--plot", str(png), "--edge-slowdown", "2"]  # fmt: skip
    result = CliRunner().invoke(cli(), args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["requests"] == 300 and list(data["policies"]) == ["edge-only", "adaptive", "oracle"]
    assert data["config"]["poisson"] and data["config"]["seed"] == 7 and data["edge_slowdown"] == 2.0
    assert data["policies"]["edge-only"]["p50_ms"] >= 400.0  # the edge is 2x slower: 400 ms a head, and it queues
    assert png.exists()
    table = CliRunner().invoke(cli(), ["simulate", "--model", "toy", "--edge-profile", str(e), "--cloud-profile",
                                       str(c), "--bandwidth", "5", "--requests", "50"])  # fmt: skip
    assert table.exit_code == 0 and "oracle" in table.stdout


@pytest.mark.parametrize(
    "extra",
    [
        ["--trace", "bus", "--bandwidth", "3"],
        [],
        ["--trace", "bus", "--policy", "edge-only,magic"],
        ["--trace", "bus", "--rate", "0"],
        ["--trace", "bus", "--rate", "1", "--poisson", "1"],
        ["--trace", "no-such-trace"],
        ["--bandwidth", "-1"],
        ["--trace", "bus", "--requests", "0"],
        ["--trace", "bus", "--plot", "x.jpg"],
    ],
)
def test_simulate_command_rejects_bad_input(toy_files: tuple[Path, Path], extra: list[str]) -> None:
    e, c = toy_files
    result = CliRunner().invoke(cli(), ["simulate", "--model", "toy", "--edge-profile", str(e),
                                        "--cloud-profile", str(c), *extra])  # fmt: skip
    assert isinstance(result.exception, UserError), result.output


def test_experiment_command(toy_files: tuple[Path, Path], tmp_path: Path) -> None:
    e, _ = toy_files
    root = e.parent
    (root / "toy").mkdir()
    for f in ("edge.json", "cloud.json"):
        (root / "toy" / f).write_bytes((root / f).read_bytes())
    result = CliRunner().invoke(cli(), ["experiment", "adaptive", "--models", "toy", "--traces", "4g,3g",
                                        "--profiles", str(root), "--edge-slowdown", "1", "--requests", "50",
                                        "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    assert {(r["trace"], r["policy"]) for r in rows} >= {("4g", "adaptive"), ("3g", "oracle")}
    for bad in (["adaptive", "--emulate"], ["nonsense"], ["adaptive", "--rate", "-1"], ["adaptive", "--models", ""]):
        res = CliRunner().invoke(cli(), ["experiment", *bad, "--profiles", str(root)])
        assert isinstance(res.exception, UserError), (bad, res.output)
    assert "--emulate needs --traces" in str(CliRunner().invoke(cli(), ["experiment", "adaptive", "--emulate"]).exception)


def test_simulate_command_energy_objective_and_energy_experiment(toy_files: tuple[Path, Path]) -> None:
    """Issue 19: --objective energy in simulate (energy per policy), and `experiment energy --json`."""
    e, c = toy_files
    base = ["simulate", "--model", "toy", "--edge-profile", str(e), "--cloud-profile", str(c), "--bandwidth", "4",
            "--rate", "0.25", "--requests", "40", "--policy", "static,adaptive", "--power", "laptop",
            "--link-type", "ethernet", "--json"]  # fmt: skip
    out = {}
    for objective in ("latency", "energy"):
        result = CliRunner().invoke(cli(), [*base, "--objective", objective])
        assert result.exit_code == 0, result.output
        out[objective] = json.loads(result.stdout)["policies"]
    assert out["energy"]["static"]["energy_mj"] < out["latency"]["static"]["energy_mj"]
    assert out["energy"]["static"]["mean_ms"] >= out["latency"]["static"]["mean_ms"]
    result = CliRunner().invoke(cli(), ["experiment", "energy", "--models", "tinycnn", "--deadline-ms", "50", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert {r["mbit"] for r in data["rows"]} == {1.1, 5.85, 18.88}
    assert set(data["summary"]) == {"latency", "energy", "edp", "energy<=50ms"}
    for r in data["rows"]:
        if r["objective"] == "energy":
            lat = next(x for x in data["rows"] if x["objective"] == "latency" and x["mbit"] == r["mbit"])
            assert r["energy_mj"] <= lat["energy_mj"] + 1e-6

"""Issue 19: the energy model, objectives (exact where additive, checked against brute
force), the memory budget, the simulator's energy, and the battery saver on a real agent."""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path

import pytest

from splitinfer.adapt.planner import cut_table, reference_pair
from splitinfer.adapt.policy import Adaptive
from splitinfer.adapt.estimator import LinkEstimator
from splitinfer.core.costmodel import Breakdown, Link
from splitinfer.core.energy import DEVICE_CLASSES, PowerProfile, RadioPower, energy_of, load_power
from splitinfer.core.graph import Graph, GraphNode
from splitinfer.core.memory import MemoryBudget, head_memory_bytes, peak_activation_bytes
from splitinfer.core.partitioner import Partitioner
from splitinfer.core.profile import Profile
from splitinfer.edge.battery import BatterySaver
from splitinfer.errors import UserError
from splitinfer.simulations.simulator import SimConfig, Simulator
from splitinfer.simulations.traces import constant
from toy_profiles import toy_profiles

LINK = Link(uplink_mbit=10.0, rtt_ms=20.0)


# ------------------------------------------------------------------------- the model
def test_energy_of_adds_up_compute_radio_idle_and_tail() -> None:
    radio = RadioPower(up_mw_per_mbit=100.0, down_mw_per_mbit=10.0, base_mw=50.0, tail_mw=20.0, tail_ms=500.0)
    p = PowerProfile("t", compute_w=2.0, idle_w=0.5, link_type="r", radios={"r": radio})
    bd = Breakdown(edge_ms=10.0, transfer_ms=8.0, rtt_ms=20.0, cloud_ms=5.0, return_ms=1.0)
    e = energy_of(bd, 1_000_000, 125_000, p)
    assert e.compute_mj == pytest.approx(20.0)  # 2 W x 10 ms
    assert e.transmit_mj == pytest.approx(100.0 * 8 + (0.05 + 0.5) * 8.0)  # 8 Mbit at 100 mJ/Mbit + base + idle
    assert e.idle_mj == pytest.approx((0.5 + 0.02) * 25.0)  # waiting RTT + cloud, radio held up
    assert e.receive_mj == pytest.approx(10.0 * 1 + (0.05 + 0.5) * 1.0)
    assert e.tail_mj == pytest.approx(10.0)
    assert e.total_mj == pytest.approx(e.compute_mj + e.transmit_mj + e.idle_mj + e.receive_mj + e.tail_mj)
    assert energy_of(bd, 0, 0, p, local=True).total_mj == pytest.approx(20.0)


def test_power_profiles_load_from_class_or_file(tmp_path: Path) -> None:
    assert load_power(None) == DEVICE_CLASSES["phone"]
    assert DEVICE_CLASSES["phone"].radios["4g"].up_mw_per_mbit == 438.39  # BottleNet / Huang MobiSys'12
    assert DEVICE_CLASSES["phone"].radios["3g"].up_mw_per_mbit == 868.98
    assert DEVICE_CLASSES["phone"].radios["wifi"].up_mw_per_mbit == 283.17
    f = tmp_path / "power.json"
    f.write_text(json.dumps({"device_class": "rpi", "compute_w": 7.0, "link_type": "4g"}))
    p = load_power(f)
    assert (p.compute_w, p.idle_w, p.link_type) == (7.0, DEVICE_CLASSES["rpi"].idle_w, "4g")
    assert PowerProfile.from_json(p.to_json()) == p
    with pytest.raises(UserError):
        load_power(tmp_path / "missing.json")
    with pytest.raises(UserError):
        PowerProfile(link_type="5g")


def test_every_cut_carries_energy_and_latency_is_unchanged() -> None:
    edge, cloud = toy_profiles()
    plan = Partitioner(edge, cloud).plan(LINK, envelope=True)
    d = plan.to_json()
    assert d["objective"] == "latency" and d["energy_mj"] > 0
    assert all("energy_mj" in c and "energy" in c for c in d["candidates"])
    for c in plan.candidates:  # latency numbers are the cost model's, as before
        assert c.breakdown.total_ms == pytest.approx(c.predicted_ms)


# -------------------------------------------------------------- exact vs brute force
def _random_graph(rng: random.Random, n: int, chain: bool) -> Graph:
    nodes = [GraphNode("x", "placeholder", "x", (), (1, 1000), "float32", 4000)]
    for i in range(1, n):
        names = [m.name for m in nodes]
        k = 1 if chain or i == 1 else rng.choice((1, 2))
        inputs = (names[-1],) if chain else tuple(sorted(set(rng.sample(names, min(k, len(names))))))
        nb = rng.choice((400, 4000, 40_000, 200_000))
        nodes.append(GraphNode(f"n{i}", "call_function", "f", inputs, (1, nb // 4), "float32", nb))
    consumed = {s for m in nodes for s in m.inputs}
    leaves = tuple(m.name for m in nodes if m.name not in consumed and m.op != "placeholder")
    nodes.append(GraphNode("out", "call_function", "cat", leaves or (nodes[-1].name,), (1, 10), "float32", 40))
    return Graph(nodes=tuple(nodes), outputs=("out",))


def _pair(graph: Graph, rng: random.Random) -> tuple[Profile, Profile]:
    def prof(ms: dict[str, float]) -> Profile:
        return Profile(model="rand", graph=graph, node_ms=ms, node_spread_ms={}, device="t", threads=1,
                       torch_version="", input_shape=(1000,), batch=1, repeats=1)  # fmt: skip

    edge = {n: (0.0 if n == "x" else rng.uniform(1, 60)) for n in graph.names}
    return prof(edge), prof({n: v * rng.uniform(0.02, 0.3) for n, v in edge.items()})


def _all_cuts(part: Partitioner, link: Link) -> list:
    g = part.graph
    inner = [n for n in g.names if n not in g.placeholders]
    out = []
    for r in range(len(inner) + 1):
        for combo in itertools.combinations(inner, r):
            head = frozenset(g.placeholders) | frozenset(combo)
            if g.is_downward_closed(head):
                out.append(part.describe(head, link))
    return out


@pytest.mark.parametrize("seed", range(12))
def test_energy_min_cut_is_exact_on_dags(seed: int) -> None:
    rng = random.Random(seed)
    graph = _random_graph(rng, 7, chain=False)
    edge, cloud = _pair(graph, rng)
    power = DEVICE_CLASSES["phone"].on(rng.choice(("3g", "4g", "wifi", "ethernet")))
    link = Link(uplink_mbit=rng.choice((0.5, 5.0, 50.0)), rtt_ms=10.0)
    part = Partitioner(edge, cloud, power=power, objective="energy")
    brute = min(c.energy_mj for c in _all_cuts(part, link))
    assert part.best(link).energy_mj == pytest.approx(brute, rel=1e-6)


@pytest.mark.parametrize("seed", range(8))
def test_edp_and_deadline_exact_on_chains_and_no_worse_than_the_pool_on_dags(seed: int) -> None:
    rng = random.Random(100 + seed)
    power = DEVICE_CLASSES["phone"].on("wifi")
    link = Link(uplink_mbit=rng.choice((1.0, 10.0)), rtt_ms=5.0)
    chain = _random_graph(rng, 6, chain=True)
    edge, cloud = _pair(chain, rng)
    part = Partitioner(edge, cloud, power=power, objective="edp")
    cuts = _all_cuts(part, link)
    assert part.best(link).energy_mj * part.best(link).predicted_ms == pytest.approx(
        min(c.energy_mj * c.predicted_ms for c in cuts), rel=1e-6)  # fmt: skip
    deadline = sorted(c.predicted_ms for c in cuts)[len(cuts) // 2]
    dpart = Partitioner(edge, cloud, power=power, objective="energy", deadline_ms=deadline)
    feasible = [c for c in cuts if c.predicted_ms <= deadline]
    got = dpart.best(link)
    assert got.predicted_ms <= deadline
    assert got.energy_mj == pytest.approx(min(c.energy_mj for c in feasible), rel=1e-6)
    dag = _random_graph(rng, 7, chain=False)
    e2, c2 = _pair(dag, rng)
    lat, en = Partitioner(e2, c2, power=power).best(link), Partitioner(e2, c2, power=power, objective="energy").best(link)
    best = Partitioner(e2, c2, power=power, objective="edp").best(link)
    assert best.energy_mj * best.predicted_ms <= min(c.energy_mj * c.predicted_ms for c in (lat, en)) + 1e-9


def test_energy_envelope_matches_pointwise_best() -> None:
    edge, cloud = reference_pair("resnet18")
    edge = edge.scaled(10)
    power = DEVICE_CLASSES["phone"].on("wifi")
    part = Partitioner(edge, cloud, power=power, objective="energy")
    table = cut_table(edge, cloud, objective="energy", power=power)
    for mbit in (0.3, 1.1, 5.85, 18.88, 100.0, 1000.0):
        link = Link(uplink_mbit=mbit, rtt_ms=20.0)
        assert table.score(table.best(link), link) == pytest.approx(part.best(link).energy_mj, rel=1e-6)


# ----------------------------------------------------------------------------- memory
def test_memory_budget_keeps_only_heads_that_fit() -> None:
    edge, cloud = toy_profiles()
    g = edge.graph
    weights = {"a": 1_000_000, "b": 2_000_000, "c": 4_000_000, "out": 100}
    assert peak_activation_bytes(g, {"x", "a"}) == 900_000  # x is still live while a is made
    full = head_memory_bytes(g, g.names, weights)
    budget = MemoryBudget(full - 1, weights)
    part = Partitioner(edge, cloud, memory=budget)
    slow = Link(uplink_mbit=0.1, rtt_ms=20.0)  # edge-only would win without the budget
    assert Partitioner(edge, cloud).best(slow).kind == "edge-only"
    plan = part.plan(slow, envelope=True)
    assert plan.cut.kind != "edge-only" and plan.cut.memory_bytes <= budget.limit_bytes
    assert all(c.memory_bytes <= budget.limit_bytes for c in plan.candidates)
    assert all(e.cut.memory_bytes <= budget.limit_bytes for e in plan.envelope or ())
    table = cut_table(edge, cloud, memory=budget)
    assert all(c.kind != "edge-only" for c in table.cuts) and table.start_cut.kind != "edge-only"
    with pytest.raises(UserError):
        Partitioner(edge, cloud, memory=MemoryBudget(1, weights)).best(slow)


# ------------------------------------------------------------------ policies, simulator
def test_simulator_reports_energy_and_the_energy_objective_saves_it() -> None:
    edge, cloud = toy_profiles()
    power = DEVICE_CLASSES["laptop"].on("ethernet")  # no radio cost: offloading saves compute
    trace = constant(4.0)
    cfg = SimConfig(requests=50, rate_per_s=0.25)  # no queues: each request alone on the link
    runs = {}
    for objective in ("latency", "energy"):
        table = cut_table(edge, cloud, objective=objective, power=power)
        res = Simulator(edge, cloud, trace, cfg, table=table).run_all(["static", "adaptive"]).to_json()
        runs[objective] = res["policies"]
        assert all("energy_mj" in p for p in res["policies"].values())
    assert runs["energy"]["static"]["energy_mj"] < runs["latency"]["static"]["energy_mj"]
    assert runs["energy"]["adaptive"]["energy_mj"] <= runs["latency"]["adaptive"]["energy_mj"] + 1e-6


def test_adaptive_policy_switches_objective_from_its_source() -> None:
    edge, cloud = toy_profiles()
    power = DEVICE_CLASSES["laptop"].on("ethernet")
    lat = cut_table(edge, cloud, power=power)
    en = cut_table(edge, cloud, objective="energy", power=power)
    want = ["latency"]
    policy = Adaptive(lat, LinkEstimator(initial_mbit=4.0, initial_rtt_ms=20.0), rtt_ms=20.0, tables={"energy": en},
                      objective_source=lambda: want[0])  # fmt: skip
    first = policy.choose(0.0)
    want[0] = "energy"
    second = policy.choose(1.0)
    assert policy.table is en and policy.objective_switches == 1
    assert second.id == en.best(Link(uplink_mbit=4.0, rtt_ms=20.0)).id != first.id


def test_battery_saver_reads_the_file_with_hysteresis(tmp_path: Path) -> None:
    f = tmp_path / "capacity"
    f.write_text("80\n")
    from splitinfer.edge.battery import battery_reader

    saver = BatterySaver(battery_reader(str(f)), 20.0, poll_s=0.0)
    try:
        assert saver() == "latency" and saver.level == 80
        f.write_text("15\n")
        assert _settle(saver, "energy")
        f.write_text("22\n")  # above the threshold, within the margin: still saving
        assert _wait_level(saver, 22.0)
        assert saver() == "energy"
        f.write_text("40\n")
        assert _settle(saver, "latency")
    finally:
        saver.close()
    with pytest.raises(UserError):
        battery_reader(str(tmp_path / "none"))


def _wait_level(saver: BatterySaver, level: float, tries: int = 2000) -> bool:
    import time

    for _ in range(tries):
        saver()  # starts a read when none is under way
        if saver.level == level:
            return True
        time.sleep(0.005)
    return False


def _settle(saver: BatterySaver, want: str, tries: int = 2000) -> bool:
    import time

    for _ in range(tries):
        if saver() == want:
            return True
        time.sleep(0.005)
    return False


def test_partition_json_is_backward_compatible_with_bundled_profiles() -> None:
    root = Path(__file__).resolve().parents[1] / "partitions"
    for d in sorted(p for p in root.iterdir() if (p / "edge.json").exists()):
        prof = Profile.load(d / "edge.json")
        assert prof.node_weight_bytes == {} or set(prof.node_weight_bytes) <= set(prof.graph.names)
        again = Profile.from_json(json.loads(json.dumps(prof.to_json())))
        assert again.node_ms == prof.node_ms
    assert not math.isnan(Partitioner(*reference_pair("tinycnn")).best(LINK).energy_mj)


# ------------------------------------------------------- a real agent and a real worker
@pytest.fixture(scope="module")
def cloud_url():
    from splitinfer.cloud.process import CloudProcess

    worker = CloudProcess("--model", "tinycnn", "--host", "127.0.0.1")
    try:
        yield worker.url
    finally:
        worker.kill()


async def test_battery_below_the_threshold_moves_the_agent_to_the_energy_cut(cloud_url: str, tmp_path: Path) -> None:
    import asyncio

    from splitinfer.edge.agent import AgentConfig, EdgeAgent, request_input
    from splitinfer.edge.hooks import AgentHooks

    battery = tmp_path / "capacity"
    battery.write_text("80\n")
    power = tmp_path / "power.json"  # a wired laptop: offloading saves its CPU's energy, latency says stay local
    power.write_text(json.dumps({"device_class": "laptop", "link_type": "ethernet"}))
    switches: list[tuple[str, str]] = []
    cfg = AgentConfig(model="tinycnn", cloud=cloud_url, cut="auto", bandwidth_mbit=100.0, rtt_ms=2.0, warmup=0,
                      power=str(power), battery_saver_below=20.0, battery_file=str(battery), battery_poll_s=0.0)  # fmt: skip
    async with EdgeAgent(cfg, AgentHooks(on_cut_switch=lambda old, new: switches.append((old, new)))) as agent:
        x = request_input(agent.runner.loaded, 0)  # type: ignore[union-attr]

        async def until(cut: str) -> str:
            for _ in range(40):
                answer = await agent.infer(x)
                assert answer.ok, answer.error
                if answer.cut == cut:
                    return answer.source
                await asyncio.sleep(0.01)
            raise AssertionError(f"never moved to {cut}: {switches}")

        assert agent.cut_id == "edge"
        battery.write_text("10\n")
        assert await until("cloud") == "cloud"
        battery.write_text("95\n")
        assert await until("edge") == "edge"
    assert switches[0] == ("edge", "cloud") and switches[-1] == ("cloud", "edge")


async def test_edge_memory_budget_drops_weights_and_reports_them(cloud_url: str) -> None:
    from splitinfer.core.graph import capture
    from splitinfer.core.memory import node_weight_bytes
    from splitinfer.edge.agent import AgentConfig, EdgeAgent, request_input
    from splitinfer.edge.status import agent_status
    from splitinfer.models.loader import load_model

    lm = load_model("tinycnn")
    gm, graph = capture(lm.module, lm.example_input)
    weights = node_weight_bytes(gm, graph)
    need = head_memory_bytes(graph, graph.names, weights)
    mb = need * 0.6 / 2**20  # the whole model does not fit
    cfg = AgentConfig(model="tinycnn", cloud=cloud_url, cut="auto", bandwidth_mbit=0.5, rtt_ms=2.0, warmup=0,
                      edge_memory_mb=mb, advertise=False)  # fmt: skip
    async with EdgeAgent(cfg) as agent:
        assert agent.cut_id != "edge"
        memory = agent.cut_info["memory"]  # type: ignore[index]
        assert memory["budget_mb"] == mb and memory["dropped_mb"] > 0 and memory["weights_mb"] * 2**20 <= need
        x = request_input(agent.runner.loaded, 0)  # type: ignore[union-attr]
        answer = await agent.infer(x)
        assert answer.ok and answer.source == "cloud", answer.error
        assert agent_status(agent)["memory"] == memory  # type: ignore[arg-type]
        summary = await agent.run(2)
    assert summary["cut"]["memory"]["deepest_cut"] == memory["deepest_cut"]

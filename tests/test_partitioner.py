"""The min-cut partitioner against brute force over every downward-closed cut."""

from __future__ import annotations

import itertools
import random

import pytest

from splitinfer.core.costmodel import CodecCost, Link, predict
from splitinfer.core.graph import Graph, GraphNode
from splitinfer.core.partitioner import Partitioner
from splitinfer.core.profile import Profile


def random_profiles(rng: random.Random, n: int) -> tuple[Profile, Profile]:
    """A random DAG of n nodes (one input, one output) with random costs and sizes."""
    nodes = [GraphNode("x", "placeholder", "x", (), (1, 8), "float32", rng.choice([400, 4000, 40000]))]
    chainy = rng.random() < 0.5  # half the graphs are mostly long chains
    for i in range(1, n):
        k = rng.choice([1, 1, 2, 2, 3])
        inputs = tuple(sorted(set(rng.choice(nodes[: i]).name for _ in range(k))))
        if chainy and rng.random() < 0.7:
            inputs = (nodes[i - 1].name,)
        nodes.append(GraphNode(f"n{i}", "call_function", "f", inputs, (1, 8), "float32", rng.randint(1, 60000)))
    consumed = {s for nd in nodes for s in nd.inputs}
    sinks = tuple(nd.name for nd in nodes if nd.name not in consumed)
    nodes.append(GraphNode("out", "call_function", "f", sinks, (1, 10), "float32", rng.randint(4, 4000)))
    graph = Graph(nodes=tuple(nodes), outputs=("out",))

    def prof(scale: float) -> Profile:
        ms = {nd.name: (0.0 if nd.op == "placeholder" else rng.uniform(0.1, 20.0) * scale) for nd in nodes}
        return Profile(model="random", graph=graph, node_ms=ms, node_spread_ms={}, device="test",
                       threads=1, torch_version="", input_shape=(8,), batch=1, repeats=1)

    return prof(1.0), prof(0.3)


def all_heads(graph: Graph):
    free = [nd.name for nd in graph.nodes if nd.op != "placeholder"]
    base = set(graph.placeholders)
    for r in range(len(free) + 1):
        for combo in itertools.combinations(free, r):
            head = base | set(combo)
            if graph.is_downward_closed(head):
                yield frozenset(head)


@pytest.mark.parametrize("seed", range(100))
def test_min_cut_matches_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    edge, cloud = random_profiles(rng, rng.randint(3, 11))
    link = Link(uplink_mbit=rng.choice([0.1, 1.0, 5.0, 50.0, 1000.0]), rtt_ms=rng.choice([0.0, 5.0, 40.0]))
    codec = CodecCost(size_ratio=rng.choice([1.0, 0.5]), encode_ms_per_mb=rng.choice([0.0, 2.0]))
    best_brute = min(predict(h, edge, cloud, link, codec).total_ms for h in all_heads(edge.graph))
    part = Partitioner(edge, cloud, codec)
    chosen = part.best(link)
    assert chosen.predicted_ms == pytest.approx(best_brute, rel=0, abs=1e-6)  # exact to a nanosecond
    # the reported figure is the cost model's own, and the head is a valid cut
    assert edge.graph.is_downward_closed(chosen.head)
    assert chosen.predicted_ms == pytest.approx(predict(chosen.head, edge, cloud, link, codec).total_ms)
    # never worse than any listed candidate, and candidates carry the cost model's numbers
    for cand in part.candidates(link):
        assert chosen.predicted_ms <= cand.predicted_ms + 1e-9
        assert cand.predicted_ms == pytest.approx(predict(cand.head, edge, cloud, link, codec).total_ms)


@pytest.mark.parametrize("seed", range(15))
def test_envelope_is_the_optimum_at_every_bandwidth(seed: int) -> None:
    rng = random.Random(1000 + seed)
    edge, cloud = random_profiles(rng, rng.randint(4, 10))
    part = Partitioner(edge, cloud)
    env = part.envelope(Link(1.0, rtt_ms=10.0))
    assert env[0].from_mbit == pytest.approx(0.05) and env[-1].to_mbit == pytest.approx(10_000)
    for a, b in zip(env, env[1:]):
        assert a.to_mbit == pytest.approx(b.from_mbit) and a.cut.id != b.cut.id
    for mbit in [0.05, 0.07, 0.2, 0.9, 3.0, 11.0, 70.0, 400.0, 3000.0, 10_000.0]:
        entry = next(e for e in env if e.from_mbit - 1e-9 <= mbit <= e.to_mbit + 1e-9)
        link = Link(mbit, rtt_ms=10.0)
        assert predict(entry.cut.head, edge, cloud, link).total_ms == pytest.approx(
            part.best(link).predicted_ms, rel=1e-6, abs=1e-6
        )


def test_non_prefix_optimum_is_found() -> None:
    """Two branches; the best head ends branch a after a2 but branch b before b2.

    In the topological order x, a1, b1, b2, a2, out no prefix holds a2 without b2."""
    mb = 1_000_000
    nodes = (
        GraphNode("x", "placeholder", "x", (), (1,), "float32", mb),
        GraphNode("a1", "call_function", "f", ("x",), (1,), "float32", mb),
        GraphNode("b1", "call_function", "f", ("x",), (1,), "float32", 100),
        GraphNode("b2", "call_function", "f", ("b1",), (1,), "float32", 100),
        GraphNode("a2", "call_function", "f", ("a1",), (1,), "float32", 100),
        GraphNode("out", "call_function", "f", ("a2", "b2"), (1,), "float32", 4),
    )
    graph = Graph(nodes=nodes, outputs=("out",))
    edge_ms = {"x": 0.0, "a1": 1.0, "b1": 1.0, "b2": 500.0, "a2": 1.0, "out": 500.0}
    cloud_ms = {k: v / 100 for k, v in edge_ms.items()}
    mk = lambda ms: Profile("p", graph, ms, {}, "t", 1, "", (1,), 1, 1)  # noqa: E731
    part = Partitioner(mk(edge_ms), mk(cloud_ms))
    link = Link(10.0, rtt_ms=1.0)
    best = part.best(link)
    assert best.head == frozenset({"x", "a1", "b1", "a2"})
    assert set(best.tensors) == {"b1", "a2"}
    assert best.index is None and best.kind == "split"
    assert all(best.predicted_ms < c.predicted_ms for c in part.candidates(link))

"""A hand-made chain model with known costs, shared by the policy and simulator tests."""

from __future__ import annotations

from splitinfer.core.graph import Graph, GraphNode
from splitinfer.core.profile import Profile


def toy_profiles(edge_scale: float = 1.0) -> tuple[Profile, Profile]:
    """x -> a -> b -> c -> out, 600/300/60/8 kB crossing; edge 200 ms, cloud 20 ms."""
    sizes = {"x": 600_000, "a": 300_000, "b": 60_000, "c": 8_000, "out": 400}
    nodes, prev = [], ()
    for name, nbytes in sizes.items():
        op = "placeholder" if name == "x" else "call_function"
        nodes.append(GraphNode(name, op, name, prev, (1, nbytes // 4), "float32", nbytes))
        prev = (name,)
    graph = Graph(nodes=tuple(nodes), outputs=("out",))
    edge_ms = {"x": 0.0, "a": 40.0, "b": 60.0, "c": 80.0, "out": 20.0}

    def prof(ms: dict[str, float]) -> Profile:
        return Profile(model="toy", graph=graph, node_ms=ms, node_spread_ms={}, device="test", threads=1,
                       torch_version="", input_shape=(150_000,), batch=1, repeats=1)  # fmt: skip

    return prof({k: v * edge_scale for k, v in edge_ms.items()}), prof({k: v / 10 for k, v in edge_ms.items()})

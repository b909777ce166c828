"""Capture: fx first when exact, torch.export otherwise; checks and ints never cross a cut;
the partitioner's plan is never worse than a cut it lists; a broken model does not take
its worker's other models down; `inspect` refuses in one line naming each tracer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
import torch
from splitinfer.core.costmodel import Link
from splitinfer.core.graph import capture
from splitinfer.core.partitioner import Partitioner
from splitinfer.core.profile import Profile
from splitinfer.core.split import max_abs_diff, split_model
from splitinfer.core.tracing import EXPORT, FX, CaptureError, flat_inputs
from splitinfer.core.verify import TOLERANCE, candidate_heads, inspect_model
from splitinfer.models.loader import builtin_models, load_model

DATA = Path(__file__).parent / "data"
sys.path.insert(0, str(DATA))
import capture_models as cm  # noqa: E402

BUILDERS = {
    "checked": cm.build_checked,
    "export_only": cm.build_export_only,
    "pair": cm.build_pair,
}


def _built(name: str):
    module, example = BUILDERS[name]()
    return module.eval(), example


def _call(module, example):
    return module(**example) if isinstance(example, dict) else module(*flat_inputs(example))


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_every_cut_of_the_test_models_verifies(name: str) -> None:
    module, example = _built(name)
    report = inspect_model(name, module, example)
    rows = report["candidates"]
    assert rows[0]["kind"] == "cloud-only" and rows[-1]["kind"] == "edge-only"
    assert len(rows) > 4, "mid cuts survive the ints and checks"
    assert max(r["max_abs_diff"] for r in rows) <= TOLERANCE


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_no_check_or_int_crosses_and_cut_ids_round_trip(name: str) -> None:
    module, example = _built(name)
    gm, graph = capture(module, example)
    for head in candidate_heads(graph):
        cut_id = graph.cut_id(head)
        tensors = graph.crossing(head)
        assert all(graph.node(t).is_tensor and not graph.is_check(t) for t in tensors)
        # the edge rebuilds a head from the cut's name: same cut, same name, checks kept
        rebuilt = graph.head_from_cut_id(cut_id)
        assert graph.cut_id(rebuilt) == cut_id
        split = split_model(gm, graph, head)
        assert split.cut_id == cut_id and set(split.tensors) == set(tensors)
        if split.head is not None:
            head_checks = [n.name for n in split.head.graph.nodes if graph.is_check(n.name) if n.name in graph._index]
            assert set(head_checks) == {c for c in graph.checks if c in rebuilt}


def test_fx_path_keeps_asserts_with_their_inputs() -> None:
    """A timm-like model with torch._assert on input sizes: the asserts stay on the edge."""

    class Asserts(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(6, 6), torch.nn.Linear(6, 2)

        def forward(self, x: torch.Tensor, unused: torch.Tensor | None = None) -> torch.Tensor:
            torch._assert(x.shape[1] == 6, "six features")
            return self.b(torch.relu(self.a(x)))

    module = Asserts().eval()
    x = torch.randn(1, 6)
    gm, graph = capture(module, x)
    assert gm.meta["splitinfer_tracer"] == FX
    assert graph.placeholders == ("x",), "the defaulted argument is bound, not an input"
    assert graph.checks, "the assert and the int it tests are in the graph"
    for head in candidate_heads(graph)[1:-1]:
        split = split_model(gm, graph, head)
        assert any(n.target is torch._assert for n in split.head.graph.nodes)
        assert not any(n.target is torch._assert for n in split.tail.graph.nodes)
        with torch.inference_mode():
            assert max_abs_diff(split(x), module(x)) <= TOLERANCE


def test_export_fallback_keeps_the_batch_dynamic() -> None:
    module, example = _built("pair")
    gm, graph = capture(module, example)
    assert gm.meta["splitinfer_tracer"] == EXPORT
    assert graph.placeholders == ("input_ids", "attention_mask")
    rows = inspect_model("pair", module, example)["candidates"]
    split = split_model(gm, graph, graph.head_from_cut_id(rows[len(rows) // 2]["id"]))
    ids = torch.randint(0, 20, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.int64)
    mask[1, 4:] = 0
    with torch.inference_mode():
        assert max_abs_diff(split(ids, mask), module(input_ids=ids, attention_mask=mask)) <= TOLERANCE


def test_zoo_keeps_fx_names_and_profile_fingerprints() -> None:
    """The bundled profiles were measured on fx graphs: capture must reproduce them."""
    root = Path(__file__).parent.parent / "partitions"
    for info in builtin_models():
        files = sorted((root / info.name).glob("*.json"))
        prof = next((Profile.load(f) for f in files if '"graph_fingerprint"' in f.read_text()), None)
        if prof is None:
            continue
        lm = load_model(info.name)
        gm, graph = capture(lm.module, lm.example_batch(prof.batch))
        assert gm.meta["splitinfer_tracer"] == FX
        assert graph.fingerprint() == prof.graph.fingerprint(), info.name


def test_uncapturable_model_is_refused_naming_both_tracers() -> None:
    module, example = cm.build_uncapturable()
    with pytest.raises(CaptureError) as info:
        capture(module.eval(), example)
    msg = str(info.value)
    assert "\n" not in msg
    assert "torch.export" in msg and "torch.fx" in msg and "Try:" in msg
    assert "capture_models.py:" in msg, "the line of the user's code that stopped the tracer"
    assert {f.tracer for f in info.value.failures} == {FX, EXPORT}


def test_non_tensor_example_is_refused() -> None:
    module, _ = _built("checked")
    with pytest.raises(Exception, match="not a tensor"):
        capture(module, (torch.randn(1, 3, 8, 8), 3))


@pytest.mark.parametrize("builder", ["build_uncapturable", "build_eval_raises"])
def test_inspect_cli_refuses_in_one_line(builder: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-P", "-m", "splitinfer.cli", "inspect", "--model", f"{DATA / 'capture_models.py'}:{builder}"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    if builder == "build_uncapturable":
        assert "torch.fx" in err and "torch.export" in err and "capture_models.py:" in err, err
    else:
        assert "eval" in err, err


# ------------------------------------------------------------------ the plan vs its list
def _fake_profiles(graph, seed: int) -> tuple[Profile, Profile]:
    gen = torch.Generator().manual_seed(seed)
    ms = torch.rand(len(graph), generator=gen).tolist()
    edge = {n.name: 10 * m for n, m in zip(graph.nodes, ms)}
    cloud = {n.name: m for n, m in zip(graph.nodes, ms)}

    def prof(node_ms):
        return Profile(
            model="m", graph=graph, node_ms=node_ms, node_spread_ms={}, device="cpu", threads=1,
            torch_version=torch.__version__, input_shape=(), batch=1, repeats=1,
        )

    return prof(edge), prof(cloud)


def _zoo_and_test_graphs():
    for name in sorted(BUILDERS):
        module, example = _built(name)
        yield name, capture(module, example)[1]
    for info in builtin_models():
        if info.name in ("resnet18", "tinycnn", "alexnet"):
            lm = load_model(info.name)
            yield info.name, capture(lm.module, lm.example_input)[1]


@pytest.mark.parametrize("mbit", [0.5, 5.85, 100.0, 1000.0])
def test_plan_is_never_worse_than_a_listed_candidate(mbit: float) -> None:
    for name, graph in _zoo_and_test_graphs():
        for seed in range(3):
            edge, cloud = _fake_profiles(graph, seed)
            plan = Partitioner(edge, cloud).plan(Link(uplink_mbit=mbit, rtt_ms=5.0))
            best_listed = min(c.predicted_ms for c in plan.candidates)
            assert plan.predicted_ms <= best_listed + 1e-6, (name, seed, plan.cut.id)
            assert graph.is_valid_cut(plan.cut.head), (name, plan.cut.id)
            assert plan.cut.id in {c.id for c in plan.candidates} or graph.cut_id(plan.cut.head) == plan.cut.id


# ------------------------------------------------------------------ a worker, one model broken
async def test_worker_serves_the_good_model_and_reports_the_broken_one(cloud_process) -> None:
    broken = f"{DATA / 'capture_models.py'}:build_uncapturable"
    cp = cloud_process("--model", "tinycnn", "--model", broken)
    async with aiohttp.ClientSession() as s:
        async with s.get(cp.url + "/v1/models") as resp:
            assert resp.status == 200
            body = await resp.json()
    by_id = {m["id"]: m for m in body["models"]}
    assert "cuts" in by_id["tinycnn"] and "error" not in by_id["tinycnn"]
    assert "cannot capture" in by_id[broken]["error"]


# ------------------------------------------------------------------ tensors without the batch
class _Folds(torch.nn.Module):
    """arange positions (batch-free, no data: recomputed) and a (B*L, C) view (never sent)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(8, 8)
        self.b = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        pos = torch.arange(n, dtype=x.dtype).unsqueeze(-1)
        flat = torch.relu(self.a(x + pos).reshape(-1, c))
        return self.b(flat.reshape(b, n, c)) + pos


def _folds():
    torch.manual_seed(0)
    module = _Folds().eval()
    gm, graph = capture(module, torch.randn(1, 6, 8))
    return module, gm, graph


def test_cuts_send_only_tensors_that_lead_with_the_batch() -> None:
    module, gm, graph = _folds()
    kinds = {n.batch for n in graph.nodes if n.is_tensor}
    assert {"batched", "const", "mixed"} <= kinds, kinds
    heads = candidate_heads(graph)
    assert len(heads) > 3
    x = torch.randn(3, 6, 8)  # another batch than the captured one
    for head in heads:
        assert graph.is_sendable(head)
        assert all(graph.node(t).batch == "batched" for t in graph.crossing(head))
        cut_id = graph.cut_id(head)
        assert graph.cut_id(graph.head_from_cut_id(cut_id)) == cut_id
        with torch.no_grad():
            assert max_abs_diff(split_model(gm, graph, head)(x), module(x)) <= TOLERANCE
    # the min-cut never picks a cut that sends a folded tensor, whatever the profile
    for seed in range(4):
        edge, cloud = _fake_profiles(graph, seed)
        for mbit in (0.5, 100.0, 10_000.0):
            plan = Partitioner(edge, cloud).plan(Link(uplink_mbit=mbit, rtt_ms=1.0))
            assert graph.is_sendable(plan.cut.head), plan.cut.id
            assert plan.predicted_ms <= min(c.predicted_ms for c in plan.candidates) + 1e-6


def test_a_cut_sending_a_folded_tensor_is_refused_as_unknown() -> None:
    from splitinfer.cloud.registry import HostedModel, LookupFailed, ModelRegistry
    from splitinfer.errors import ErrorCode, UserError

    _, gm, graph = _folds()
    mixed = next(n.name for n in graph.nodes if n.batch == "mixed")
    with pytest.raises(UserError, match="does not lead with the batch"):
        graph.head_from_cut_id(mixed)
    index = graph.index(mixed)
    assert not graph.is_candidate(index)
    registry = ModelRegistry([])
    registry.models["folds"] = HostedModel("folds", None, gm, graph, "h")  # type: ignore[arg-type]
    for cut in (mixed, str(index)):
        with pytest.raises(LookupFailed) as info:
            registry.tail("folds", "h", cut)
        assert info.value.code == ErrorCode.UNKNOWN_CUT and "does not lead with the batch" in info.value.message

"""Head then tail equals the full model, for every candidate cut of every built-in model."""

from __future__ import annotations

import pytest
import torch

from splitinfer.core.graph import capture
from splitinfer.models.loader import builtin_models, load_model
from splitinfer.core.split import max_abs_diff, split_model
from splitinfer.core.verify import TOLERANCE, candidate_heads, inspect_model

# The graph surgery does not depend on the spatial size, so the 224x224 models are
# checked on 32x32 or 64x64 inputs (their adaptive pools accept them): same cuts, far less work.
SMALL = {"alexnet": 64, "vgg16": 32, "resnet18": 32, "resnet50": 32, "mobilenet_v2": 32}


@pytest.mark.parametrize("name", [m.name for m in builtin_models()])
def test_every_candidate_split_equals_full_model(name: str) -> None:
    lm = load_model(name)
    x = lm.example_input
    if name in SMALL:
        x = torch.randn(1, 3, SMALL[name], SMALL[name], generator=torch.Generator().manual_seed(1))
    report = inspect_model(name, lm.module, lm.example_input, verify_input=x)
    rows = report["candidates"]
    assert rows[0]["kind"] == "cloud-only" and rows[-1]["kind"] == "edge-only"
    assert all(r["kind"] == "split" for r in rows[1:-1])
    assert len(rows) == report["nodes"]  # one prefix cut per node (a single input)
    worst = max(r["max_abs_diff"] for r in rows)
    assert worst <= TOLERANCE, [r for r in rows if r["max_abs_diff"] > TOLERANCE][:3]


def test_residual_cut_carries_two_tensors_and_halves_hold_their_own_weights() -> None:
    lm = load_model("resnet18")
    gm, graph = capture(lm.module, lm.example_input)
    heads = candidate_heads(graph)
    multi = [h for h in heads if len(graph.crossing(h)) >= 2]
    assert multi, "inside a residual block two tensors cross"
    split = split_model(gm, graph, multi[len(multi) // 2])
    assert len(split.tensors) >= 2
    head_params = {n for n, _ in split.head.named_parameters()}
    tail_params = {n for n, _ in split.tail.named_parameters()}
    assert head_params and tail_params and not head_params & tail_params
    with torch.inference_mode():
        sent = split.run_head(lm.example_input)
        assert set(sent) == set(split.tensors)
        assert max_abs_diff(split.run_tail(sent), lm.module(lm.example_input)) <= TOLERANCE


def test_user_model_split(tmp_path) -> None:
    lm = load_model("tests/data/custom_model.py:build")
    report = inspect_model(lm.name, lm.module, lm.example_input)
    assert report["candidates"] and max(r["max_abs_diff"] for r in report["candidates"]) <= TOLERANCE
    # a broken split would be caught: compare against a different model's output
    gm, graph = capture(lm.module, lm.example_input)
    split = split_model(gm, graph, candidate_heads(graph)[3])
    with torch.inference_mode():
        assert max_abs_diff(split(lm.example_input), lm.module(lm.example_input + 1)) > TOLERANCE

"""The models people bring: real architectures from ``transformers`` and ``timm``, end to end.

Each architecture is a user model file (tests/data/hf_models.py, timm_models.py), built
from a small config with random weights; nothing is downloaded (HF_HUB_OFFLINE=1). For
each: it captures, every candidate cut verifies head then tail == the model on a request's
inputs (realistic ids and padded masks for the text models), the partitioner plans a cut
at 5.85 Mbit/s for a 10x slower edge, and one real cloud worker + edge agent round trip
with --verify at a mid cut answers from the cloud with the model's own outputs.

timm is imported through ``splitinfer.models.timm_shim`` (no torchvision); its models are
full size (224x224, up to 11 M parameters), so they are marked slow.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Iterator

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported, here and in the worker

pytest.importorskip("transformers")

from splitinfer.cloud.process import CloudProcess  # noqa: E402
from splitinfer.core.costmodel import Link  # noqa: E402
from splitinfer.core.graph import capture  # noqa: E402
from splitinfer.core.partitioner import Partitioner  # noqa: E402
from splitinfer.core.profiler import profile_model  # noqa: E402
from splitinfer.core.verify import TOLERANCE, inspect_model  # noqa: E402
from splitinfer.edge.agent import AgentConfig, EdgeAgent  # noqa: E402
from splitinfer.edge.answers import request_input  # noqa: E402
from splitinfer.models.loader import LoadedModel, load_model  # noqa: E402

DATA = Path(__file__).parent / "data"
HF = str(DATA / "hf_models.py")
TIMM = str(DATA / "timm_models.py")
HF_NAMES = ["vit", "bert", "distilbert", "gpt2", "llama", "resnet", "convnext", "swin"]
TIMM_NAMES = ["resnet18", "mobilenetv3_small_100", "efficientnet_b0", "vit_tiny_patch16_224", "convnext_atto"]
HAS_TIMM = importlib.util.find_spec("timm") is not None
ROUND_TRIP_DIFF = 1e-4  # the cloud's tail may batch differently from the edge's full run


def _spec(name: str) -> str:
    return f"{TIMM}:{name}" if name in TIMM_NAMES else f"{HF}:{name}"


_loaded: dict[str, LoadedModel] = {}


def _load(name: str) -> LoadedModel:
    if name not in _loaded:
        _loaded[name] = load_model(_spec(name))
    return _loaded[name]


def _check_architecture(name: str) -> dict:
    """Capture, verify every candidate cut on a request's inputs, and plan; the inspect report."""
    lm = _load(name)
    report = inspect_model(lm.name, lm.module, lm.example_input, verify=True, verify_input=request_input(lm, 1))
    cands = report["candidates"]
    assert len(cands) >= 3 and cands[0]["kind"] == "cloud-only" and cands[-1]["kind"] == "edge-only"
    worst = max(c["max_abs_diff"] for c in cands)
    assert worst <= TOLERANCE, f"{name}: a split differs from the model by {worst}"
    for c in cands:  # a cut's name never carries a check (torch._assert, export's guards)
        assert not any("assert" in t for t in c["tensors"]), c["id"]

    cloud = profile_model(lm.name, lm.module, lm.example_input, threads=1, repeats=2, warmup=1)
    edge = cloud.scaled(10.0)
    for mbit in (5.85, 100.0):
        plan = Partitioner(edge, cloud).plan(Link(uplink_mbit=mbit, rtt_ms=20.0))
        assert plan.candidates and plan.cut.id
        best = min(c.predicted_ms for c in plan.candidates)
        assert plan.predicted_ms <= best + 1e-6, f"{name} at {mbit} Mbit/s: plan worse than a candidate it lists"
    return report


def _batch_free_tensors(name: str) -> set[str]:
    """Nodes that do not lead with the batch dimension (captured at batch 2: same names)."""
    lm = _load(name)
    _, graph = capture(lm.module, lm.example_batch(2))
    return {n.name for n in graph.nodes if not n.shape or n.shape[0] != 2}


def _mid_cut(name: str, report: dict) -> str:
    """A split cut about half way along the model (by candidate), of tensors that lead
    with the batch (the worker batches along dim 0; capture lists no other since issue 14)."""
    free = _batch_free_tensors(name)
    splits = [c["id"] for c in report["candidates"] if c["kind"] == "split" and not free & set(c["tensors"])]
    assert splits, f"{name}: no split cut sends only batched tensors"
    return splits[len(splits) // 2]


async def _round_trip(url: str, name: str, report: dict) -> None:
    cut = _mid_cut(name, report)
    cfg = AgentConfig(model=_spec(name), cloud=url, cut=cut, verify=True)
    async with EdgeAgent(cfg) as agent:
        summary = await agent.run(3)
    assert summary["answered"] == 3, summary["records"]
    for r in summary["records"]:
        assert r["source"] == "cloud" and r["cut"] == cut, r
        assert r["max_abs_diff"] <= ROUND_TRIP_DIFF, r


# ------------------------------------------------------------------------- transformers
@pytest.fixture(scope="module")
def hf_worker() -> Iterator[str]:
    """One real worker serving every transformers architecture of the zoo."""
    args = [a for n in HF_NAMES for a in ("--model", _spec(n))]
    with CloudProcess(*args, timeout_s=300.0, env={"HF_HUB_OFFLINE": "1"}) as worker:
        yield worker.url


@pytest.mark.slow
@pytest.mark.parametrize("name", HF_NAMES)
async def test_transformers_architecture_end_to_end(name: str, hf_worker: str) -> None:
    report = _check_architecture(name)
    await _round_trip(hf_worker, name, report)


@pytest.mark.parametrize("name", ["gpt2", "bert", "swin", "llama"])
def test_every_candidate_cut_sends_tensors_that_lead_with_the_batch(name: str) -> None:
    lm = _load(name)
    free = _batch_free_tensors(name)
    report = inspect_model(lm.name, lm.module, lm.example_input, verify=False)
    offending = sorted({t for c in report["candidates"] for t in c["tensors"] if t in free})
    assert not offending, f"{name}: {len(offending)} crossing tensors without the batch: {offending[:8]}"


def test_text_models_get_ids_in_their_vocabulary() -> None:
    for name in ("bert", "distilbert", "gpt2", "llama"):
        lm = _load(name)
        kinds = lm.input_kinds()
        assert kinds["input_ids"].kind == "ids" and kinds["input_ids"].high == 96, name
        ids = [request_input(lm, i) for i in range(3)]
        firsts = [x["input_ids"] if isinstance(x, dict) else (x[0] if isinstance(x, tuple) else x) for x in ids]
        assert len({tuple(t[0].tolist()) for t in firsts}) == 3, name
        assert all(int(t.max()) < 96 for t in firsts)


# --------------------------------------------------------------------------------- timm
@pytest.fixture(scope="module")
def timm_worker() -> Iterator[str]:
    args = [a for n in TIMM_NAMES for a in ("--model", _spec(n))]
    with CloudProcess(*args, timeout_s=300.0, env={"HF_HUB_OFFLINE": "1"}) as worker:
        yield worker.url


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TIMM, reason="timm is not installed (make setup installs it with --no-deps)")
@pytest.mark.parametrize("name", TIMM_NAMES)
async def test_timm_architecture_end_to_end(name: str, timm_worker: str) -> None:
    report = _check_architecture(name)
    await _round_trip(timm_worker, name, report)

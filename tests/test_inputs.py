"""Models of several inputs, end to end, and the values each request sends.

A spec may give its example as one tensor, a tuple (positional) or a dict (keyword
arguments); the loader, profiler, head runner, a real worker and the edge agent handle
all three. Integer inputs get realistic values (ids within the embedding's vocabulary,
masks of ones with padding at the end), distinct per request; one-tensor models keep
their inputs bit for bit. Also: the timm shim (timm without torchvision)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import aiohttp
import pytest
import torch
from torch import nn

from splitinfer.core.graph import capture
from splitinfer.core.inputs import as_named, call_module, input_names, positional
from splitinfer.core.profiler import profile_model
from splitinfer.core.split import max_abs_diff, outputs_dict
from splitinfer.edge.agent import AgentConfig, EdgeAgent
from splitinfer.edge.answers import request_input
from splitinfer.edge.head import EDGE_OUTPUT, HeadRunner
from splitinfer.errors import UserError
from splitinfer.models.loader import LoadedModel, load_model, weights_hash
from splitinfer.models.seeding import seeded_randn

DATA = Path(__file__).parent / "data"
TWO = str(DATA / "two_input_model.py")
VOCAB = 20
SPECS = [f"{TWO}:build_dict", f"{TWO}:build_tuple", f"{TWO}:build_bool", f"{TWO}:build_reversed"]


def _write(path: Path, source: str) -> str:
    path.write_text(source)
    return str(path)


# ------------------------------------------------------------------------------ loading
def test_dict_and_tuple_examples_load_with_names() -> None:
    d = load_model(f"{TWO}:build_dict")
    assert d.multi_input and isinstance(d.example_input, dict)
    assert d.input_names == ("input_ids", "attention_mask")
    assert list(d.example_inputs) == ["input_ids", "attention_mask"]
    assert d.input_shape == (8,)  # the first input's
    t = load_model(f"{TWO}:build_tuple")
    assert isinstance(t.example_input, tuple) and t.input_names == ("input_ids", "attention_mask")
    assert torch.equal(call_module(d.module, d.example_input), call_module(t.module, t.example_input))


def test_one_tensor_models_are_unchanged() -> None:
    lm = load_model("tinycnn")
    assert isinstance(lm.example_input, torch.Tensor) and not lm.multi_input
    assert torch.equal(lm.example_input, seeded_randn((1, 3, 32, 32)))
    assert torch.equal(lm.example_batch(2), seeded_randn((2, 3, 32, 32)))
    # the bundled profiles were measured on these weights
    assert weights_hash(lm.module) == "658d284c476a3cd6c4672ef541a69d5aa994290a17d4a0c8e7fc3651e4fe33f5"
    gen = torch.Generator().manual_seed(1_000 + 4)
    assert torch.equal(request_input(lm, 4), torch.randn((1, 3, 32, 32), generator=gen))
    assert list(lm.example_inputs) == ["x"] and lm.input_names == ("x",)


def test_examples_with_a_batch_keep_one_row_of_each(tmp_path: Path) -> None:
    src = (
        "import torch\nfrom torch import nn\n"
        "class M(nn.Module):\n    def forward(self, a, b):\n        return a + b\n"
        "def build():\n    return M(), {'a': torch.randn(3, 2), 'b': torch.randn(3, 2)}\n"
        "def bad():\n    return M(), (torch.randn(3, 2), torch.randn(2, 2))\n"
        "def bad_value():\n    return M(), {'a': torch.randn(1, 2), 'b': 1.0}\n"
        "def scalar():\n    return M(), (torch.randn(1, 2), torch.tensor(1.0))\n"
    )
    path = _write(tmp_path / "m.py", src)
    lm = load_model(f"{path}:build")
    assert {k: tuple(v.shape) for k, v in lm.example_inputs.items()} == {"a": (1, 2), "b": (1, 2)}
    cases = {"bad": "disagree on the batch size", "bad_value": "must be a str name with a torch.Tensor", "scalar": "batch dimension"}
    for fn, message in cases.items():
        with pytest.raises(UserError, match=message) as err:
            load_model(f"{path}:{fn}")
        assert "\n" not in str(err.value)


def test_a_module_whose_eval_raises_is_a_user_error(tmp_path: Path) -> None:
    src = (
        "import torch\nfrom torch import nn\n"
        "class M(nn.Linear):\n    def eval(self):\n        raise RuntimeError('no eval for me')\n"
        "def build():\n    return M(2, 2), torch.zeros(1, 2)\n"
    )
    with pytest.raises(UserError, match=r"raised on \.eval\(\): RuntimeError: no eval for me"):
        load_model(f"{_write(tmp_path / 'm.py', src)}:build")


def test_input_names_come_from_the_signature() -> None:
    class Star(nn.Module):
        def forward(self, *xs: torch.Tensor) -> torch.Tensor:
            return sum(xs)  # type: ignore[return-value]

    two = (torch.zeros(1), torch.zeros(1))
    assert input_names(Star(), two) == ("input", "input_1")
    assert list(as_named(nn.Linear(1, 1), torch.zeros(1, 1))) == ["input"]
    assert positional(("b", "a"), {"a": torch.zeros(1), "b": torch.ones(1)})[0].item() == 1.0
    with pytest.raises(ValueError, match="takes 2 inputs"):
        positional(("a", "b"), torch.zeros(1))


# ------------------------------------------------------------------- generated values
@pytest.mark.parametrize("spec", SPECS)
def test_requests_get_ids_in_the_vocabulary_and_padded_masks(spec: str) -> None:
    lm = load_model(spec)
    kinds = lm.input_kinds()
    assert (kinds["input_ids"].kind, kinds["input_ids"].high) == ("ids", VOCAB)
    assert kinds["attention_mask"].kind == "mask"
    seen_ids, padded = set(), 0
    for i in range(12):
        x = as_named(lm.module, request_input(lm, i))
        ids, mask = x["input_ids"], x["attention_mask"]
        assert ids.dtype == torch.int64 and ids.shape == (1, 8)
        assert 0 <= int(ids.min()) and int(ids.max()) < VOCAB
        assert mask.dtype == lm.example_inputs["attention_mask"].dtype and mask.shape == (1, 8)
        row = mask[0].to(torch.int64).tolist()
        ones = sum(row)
        assert ones >= 1 and row == [1] * ones + [0] * (8 - ones)  # padding only at the end
        padded += ones < 8
        seen_ids.add(tuple(ids[0].tolist()))
        assert torch.equal(ids, as_named(lm.module, request_input(lm, i))["input_ids"])  # same in every run
    assert len(seen_ids) == 12, "every request carries its own ids"
    assert padded > 0
    assert type(request_input(lm, 0)) is type(lm.example_input)  # the spec's structure


def test_example_batch_keeps_structure_and_repeats_integers() -> None:
    lm = load_model(f"{TWO}:build_dict")
    b = lm.example_batch(3)
    assert isinstance(b, dict) and b["input_ids"].shape == (3, 8)
    assert torch.equal(b["input_ids"], lm.example_inputs["input_ids"].expand(3, 8))
    assert torch.equal(b["attention_mask"], torch.ones(3, 8, dtype=torch.int64))


def test_embed_model_ids_stay_in_its_vocabulary() -> None:
    lm = load_model(str(DATA / "embed_model.py") + ":build")
    xs = [request_input(lm, i) for i in range(5)]
    assert all(isinstance(x, torch.Tensor) and int(x.max()) < 16 for x in xs)
    assert len({tuple(x[0].tolist()) for x in xs}) == 5


def test_integer_inputs_of_unknown_range_keep_the_example() -> None:
    lm = LoadedModel("ids", nn.Identity(), torch.tensor([[1, 2, 3]]))
    assert torch.equal(request_input(lm, 0), torch.tensor([[1, 2, 3]]))
    assert torch.equal(request_input(lm, 1), torch.tensor([[1, 2, 3]]))


# ------------------------------------------------------------------ capture and profile
@pytest.mark.parametrize("spec", SPECS)
def test_profile_and_every_cut_of_a_two_input_model(spec: str) -> None:
    lm = load_model(spec)
    prof = profile_model(lm.name, lm.module, lm.example_batch(2), threads=1, repeats=2, warmup=1)
    assert set(prof.graph.placeholders) == {"input_ids", "attention_mask"}
    assert prof.batch == 2 and prof.input_shape == (8,)
    assert all(ms >= 0 for ms in prof.node_ms.values())


async def test_head_runner_runs_every_cut_of_a_two_input_model() -> None:
    lm = load_model(f"{TWO}:build_dict")
    runner = HeadRunner(lm, threads=1)
    try:
        g = runner.graph
        for i in range(5):
            x = request_input(lm, i)
            reference, _ = await runner.run_full(x)
            for index in range(g.cloud_only_index, g.edge_only_index + 1):
                cut_id = runner.resolve_cut(index)
                sent, _ = await runner.run_head(cut_id, x)
                if cut_id == "edge":
                    out = outputs_dict(sent[EDGE_OUTPUT])
                else:
                    with torch.inference_mode():
                        out = outputs_dict(runner.split(cut_id).run_tail(sent))
                assert max_abs_diff(reference, out) <= 1e-6, cut_id
        assert set(runner.split("cloud").tensors) == {"input_ids", "attention_mask"}
    finally:
        runner.close()


# ------------------------------------------------------------------------- round trip
@pytest.mark.slow
@pytest.mark.parametrize("builder", ["build_dict", "build_tuple"])
async def test_worker_and_agent_round_trip_with_two_inputs(cloud_process, builder: str) -> None:  # type: ignore[no-untyped-def]
    spec = f"{TWO}:{builder}"
    worker = cloud_process("--model", spec)
    lm = load_model(spec)
    g = capture(lm.module, lm.example_input)[1]
    mid = str((g.cloud_only_index + g.edge_only_index) // 2)
    async with aiohttp.ClientSession() as session, session.get(f"{worker.url}/v1/models") as resp:
        assert resp.status == 200
        (served,) = (await resp.json())["models"]
    assert served["inputs"] == [
        {"name": "input_ids", "dtype": "int64", "shape": [8]},
        {"name": "attention_mask", "dtype": "int64", "shape": [8]},
    ]
    for cut in ("cloud", mid):
        cfg = AgentConfig(model=spec, cloud=worker.url, cut=cut, verify=True, fallback=None)
        async with EdgeAgent(cfg) as agent:
            summary = await agent.run(4)
        assert summary["answered"] == 4, summary
        assert {r["source"] for r in summary["records"]} == {"cloud"}
        assert all(r["max_abs_diff"] <= 1e-5 for r in summary["records"])


# ---------------------------------------------------------------------------- timm shim
def test_timm_imports_without_torchvision() -> None:
    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed (make setup installs it with --no-deps)")
    from splitinfer.models.timm_shim import import_timm

    timm = import_timm()
    assert not any(n == "torchvision" or n.startswith("torchvision.") for n in sys.modules), "the stub is gone"
    from timm.layers import norm_act  # bound to a placeholder class while the stub stood

    placeholder = norm_act.FrozenBatchNorm2d
    assert not isinstance(nn.BatchNorm2d(2), placeholder)
    with pytest.raises(ImportError, match="needs torchvision"):
        placeholder(2)
    model = timm.create_model("resnet18", pretrained=False, num_classes=4).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 4)
    assert import_timm() is timm

"""Built-in zoo and model loader: shapes, traceability, determinism, user-model errors."""

from __future__ import annotations

import copy
import operator
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.fx
from torch import nn

from splitinfer.errors import UserError
from splitinfer.models.loader import (
    LoadedModel,
    ModelInfo,
    builtin_models,
    count_flops,
    count_parameters,
    load_model,
    weights_hash,
)

DATA = Path(__file__).parent / "data"
CUSTOM_MODEL = DATA / "custom_model.py"

BUILTIN_NAMES = ["alexnet", "vgg16", "resnet18", "resnet50", "mobilenet_v2", "tinycnn", "tinycnn-digits"]

# torchvision's parameter counts for the same architectures.
TORCHVISION_PARAMS = {
    "alexnet": 61_100_840,
    "vgg16": 138_357_544,
    "resnet18": 11_689_512,
    "resnet50": 25_557_032,
    "mobilenet_v2": 3_504_872,
}


@pytest.fixture(scope="module")
def zoo_cache() -> Callable[[str], LoadedModel]:
    """Build each built-in model at most once for the whole module (vgg16 takes seconds)."""
    cache: dict[str, LoadedModel] = {}

    def get(name: str) -> LoadedModel:
        if name not in cache:
            cache[name] = load_model(name)
        return cache[name]

    return get


def _info(name: str) -> ModelInfo:
    return next(i for i in builtin_models() if i.name == name)


# --------------------------------------------------------------------------- built-ins


def test_builtin_models_lists_the_zoo() -> None:
    infos = builtin_models()
    assert [i.name for i in infos] == BUILTIN_NAMES
    assert _info("tinycnn").input_shape == (3, 32, 32) and _info("tinycnn").num_classes == 10
    assert _info("resnet50").input_shape == (3, 224, 224) and _info("resnet50").num_classes == 1000
    assert all(i.description for i in infos)


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_builtin_model_runs_and_traces(name: str, zoo_cache: Callable[[str], LoadedModel]) -> None:
    loaded = zoo_cache(name)
    info = _info(name)
    assert loaded.name == name
    assert not loaded.module.training
    assert loaded.input_shape == info.input_shape
    assert loaded.example_input.shape == (1, *info.input_shape)

    gm = torch.fx.symbolic_trace(loaded.module)
    with torch.no_grad():
        out = loaded.module(loaded.example_input)
        traced_out = gm(loaded.example_input)
    assert out.shape == (1, info.num_classes)
    assert torch.isfinite(out).all()
    # Random-weight activations must stay at a sane scale (fp16 codecs would lose 1e-9 logits).
    assert 1e-3 < out.abs().max().item() < 1e4
    torch.testing.assert_close(traced_out, out, rtol=0, atol=0)
    _assert_no_inplace_ops(gm)


def _assert_no_inplace_ops(gm: torch.fx.GraphModule) -> None:
    """A graph cut at any node needs every intermediate value intact."""
    for node in gm.graph.nodes:
        if node.op == "call_module":
            assert not getattr(gm.get_submodule(node.target), "inplace", False), node.format_node()
        elif node.op == "call_function":
            assert node.target not in (operator.iadd, operator.imul, operator.isub), node.format_node()
            assert not node.kwargs.get("inplace", False), node.format_node()
        elif node.op == "call_method":
            assert not node.target.endswith("_"), node.format_node()
            # x.view(x.size(0), -1) would bake the traced batch size into the graph.
            assert node.target != "size", node.format_node()


@pytest.mark.parametrize("name", [n for n in BUILTIN_NAMES if n in TORCHVISION_PARAMS])
def test_parameter_counts_match_torchvision(name: str, zoo_cache: Callable[[str], LoadedModel]) -> None:
    assert count_parameters(zoo_cache(name).module) == TORCHVISION_PARAMS[name]


def test_tinycnn_is_small_and_residual(zoo_cache: Callable[[str], LoadedModel]) -> None:
    loaded = zoo_cache("tinycnn")
    assert 50_000 <= count_parameters(loaded.module) <= 200_000
    gm = torch.fx.symbolic_trace(loaded.module)
    adds = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (operator.add, torch.add)]
    assert len(adds) >= 2


def test_count_flops(zoo_cache: Callable[[str], LoadedModel]) -> None:
    loaded = zoo_cache("resnet18")
    # ResNet-18 is ~1.82 G multiply-adds; FlopCounterMode counts each as 2 FLOPs.
    assert 3.4e9 < count_flops(loaded.module, loaded.example_input) < 3.9e9
    tiny = zoo_cache("tinycnn")
    assert count_flops(tiny.module, tiny.example_batch(4)) == 4 * count_flops(tiny.module, tiny.example_input)


def test_example_batch_is_deterministic(zoo_cache: Callable[[str], LoadedModel]) -> None:
    loaded = zoo_cache("tinycnn")
    b = loaded.example_batch(3)
    assert b.shape == (3, 3, 32, 32) and b.dtype == torch.float32
    assert torch.equal(b, loaded.example_batch(3))
    assert torch.equal(b[:1], loaded.example_input)
    with pytest.raises(UserError, match="batch size"):
        loaded.example_batch(0)


def test_example_batch_repeats_integer_inputs() -> None:
    loaded = LoadedModel("ids", nn.Identity(), torch.tensor([[1, 2, 3]]))
    assert torch.equal(loaded.example_batch(2), torch.tensor([[1, 2, 3], [1, 2, 3]]))


# --------------------------------------------------------------------------- determinism


def test_weights_hash_same_for_two_builds_and_changes_with_weights() -> None:
    a, b = load_model("tinycnn"), load_model("tinycnn")
    assert weights_hash(a.module) == weights_hash(b.module)
    assert weights_hash(load_model("resnet18").module) == weights_hash(load_model("resnet18").module)
    assert weights_hash(a.module) != weights_hash(load_model("mobilenet_v2").module)

    perturbed = copy.deepcopy(a.module)
    with torch.no_grad():
        w = perturbed.fc.weight
        w[0, 0] = torch.nextafter(w[0, 0], torch.tensor(float("inf")))
    assert weights_hash(perturbed) != weights_hash(a.module)


def test_weights_hash_covers_buffers() -> None:
    module = load_model("tinycnn").module
    before = weights_hash(module)
    other = copy.deepcopy(module)
    other.stem[1].running_mean.add_(1.0)
    assert weights_hash(other) != before


def test_weights_hash_same_in_another_process() -> None:
    """Edge and cloud build models separately; their weights must match bit for bit."""
    names = ["tinycnn", "mobilenet_v2"]
    script = textwrap.dedent(
        f"""
        import torch
        torch.set_num_threads(1)
        from splitinfer.models.loader import load_model, weights_hash
        for name in {names!r}:
            print(weights_hash(load_model(name).module))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert proc.stdout.split() == [weights_hash(load_model(n).module) for n in names]


def test_building_leaves_global_rng_alone() -> None:
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    load_model("tinycnn")
    load_model(f"{CUSTOM_MODEL}:build")  # the example builder calls torch.manual_seed itself
    assert torch.equal(torch.get_rng_state(), state)


# --------------------------------------------------------------------------- user models


def test_load_user_file() -> None:
    loaded = load_model(f"{CUSTOM_MODEL}:build")
    assert loaded.name == f"{CUSTOM_MODEL}:build"
    assert not loaded.module.training
    assert loaded.input_shape == (1, 16, 16)
    with torch.no_grad():
        assert loaded.module(loaded.example_input).shape == (1, 4)
    torch.fx.symbolic_trace(loaded.module)
    assert weights_hash(loaded.module) == weights_hash(load_model(f"{CUSTOM_MODEL}:build").module)


def _write(path: Path, source: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))
    return path


GOOD_SOURCE = """
    import torch
    from torch import nn

    def build():
        model = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5))
        return model, torch.randn(1, 4)
"""


def test_load_user_file_from_tmp_path(tmp_path: Path) -> None:
    path = _write(tmp_path / "model.py", GOOD_SOURCE)
    loaded = load_model(f"{path}:build")
    assert isinstance(loaded.module, nn.Sequential)
    assert not loaded.module.training  # the loader switched off dropout
    assert loaded.example_input.shape == (1, 4)
    # Unseeded user builders are seeded by the loader: same weights on every load.
    assert weights_hash(loaded.module) == weights_hash(load_model(f"{path}:build").module)


def test_two_files_with_the_same_name_do_not_collide(tmp_path: Path) -> None:
    a = _write(tmp_path / "a" / "model.py", GOOD_SOURCE)
    b = _write(tmp_path / "b" / "model.py", GOOD_SOURCE.replace("nn.Linear(4, 3)", "nn.Linear(4, 5)"))
    assert load_model(f"{a}:build").module(torch.zeros(1, 4)).shape == (1, 3)
    assert load_model(f"{b}:build").module(torch.zeros(1, 4)).shape == (1, 5)


def test_example_input_with_batch_keeps_one_row(tmp_path: Path) -> None:
    path = _write(tmp_path / "m.py", GOOD_SOURCE.replace("torch.randn(1, 4)", "torch.randn(8, 4)"))
    assert load_model(f"{path}:build").example_input.shape == (1, 4)


def test_load_package_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = f"userpkg_{uuid.uuid4().hex[:8]}"
    _write(tmp_path / pkg / "__init__.py", "")
    _write(tmp_path / pkg / "nets.py", GOOD_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    loaded = load_model(f"{pkg}.nets:build")
    assert loaded.name == f"{pkg}.nets:build"
    assert loaded.input_shape == (4,)


BAD_CASES: dict[str, tuple[str, str]] = {
    # case: (source of model.py, or "" for none; regex the error must match)
    "syntax error": ("def build(:\n", r"cannot import model file .*model\.py: SyntaxError"),
    "import raises": ("raise RuntimeError('no GPU here')\n", r"cannot import .*RuntimeError: no GPU here"),
    "import exits": ("import sys\nsys.exit(3)\n", r"cannot import .*SystemExit: 3"),
    "missing import": ("import not_a_real_package_xyz\n", r"cannot import .*not_a_real_package_xyz"),
    "function missing": ("def other():\n    pass\n", r"no function 'build'"),
    "not callable": ("build = 3\n", r"'build' is a int, not a function"),
    "function raises": ("def build():\n    raise ValueError('bad shape')\n", r"build\(\) raised ValueError: bad shape"),
    "returns module only": (
        "from torch import nn\ndef build():\n    return nn.Linear(2, 2)\n",
        r"must return \(nn.Module, example_input\), got a Linear",
    ),
    "returns 3-tuple": (
        "import torch\nfrom torch import nn\ndef build():\n    return nn.Linear(2, 2), torch.zeros(1, 2), 1\n",
        r"must return \(nn.Module, example_input\), got a tuple of 3 items",
    ),
    "first item not module": (
        "import torch\ndef build():\n    return 'net', torch.zeros(1, 2)\n",
        r"first item is a str",
    ),
    "example not tensor": (
        "from torch import nn\ndef build():\n    return nn.Linear(2, 2), [[0.0, 0.0]]\n",
        r"example input must be a torch.Tensor, got a list",
    ),
    "scalar example": (
        "import torch\nfrom torch import nn\ndef build():\n    return nn.Linear(2, 2), torch.tensor(1.0)\n",
        r"batch dimension",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_user_file_raises_user_error(case: str, tmp_path: Path) -> None:
    source, pattern = BAD_CASES[case]
    path = _write(tmp_path / "model.py", source)
    with pytest.raises(UserError, match=pattern) as err:
        load_model(f"{path}:build")
    _assert_one_line(err.value)


@pytest.mark.parametrize(
    ("spec", "pattern"),
    [
        ("resnet1000", r"unknown model 'resnet1000'.*alexnet, vgg16, resnet18, resnet50, mobilenet_v2, tinycnn"),
        ("no/such/file.py:build", r"model file not found: no/such/file\.py"),
        ("missing_model.py:build", r"model file not found: missing_model\.py"),
        ("no_such_pkg_xyz.mod:build", r"cannot import model module no_such_pkg_xyz\.mod: ModuleNotFoundError"),
        ("json:no_such_function", r"no function 'no_such_function'"),
        ("json:", r"bad model spec"),
        (":build", r"bad model spec"),
    ],
)
def test_bad_spec_raises_user_error(spec: str, pattern: str) -> None:
    with pytest.raises(UserError, match=pattern) as err:
        load_model(spec)
    _assert_one_line(err.value)


def test_failed_file_import_leaves_no_module_behind(tmp_path: Path) -> None:
    path = _write(tmp_path / "broken.py", "raise RuntimeError('boom')\n")
    before = set(sys.modules)
    with pytest.raises(UserError):
        load_model(f"{path}:build")
    assert set(sys.modules) == before


def _assert_one_line(exc: BaseException) -> None:
    message = str(exc)
    assert message and "\n" not in message and "Traceback" not in message
    # No chained exception for the CLI to print a traceback of.
    assert exc.__cause__ is None and (exc.__context__ is None or exc.__suppress_context__)


# --------------------------------------------------------------------------- package shape

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_export_resolves() -> None:
    """``splitinfer.__all__`` names load lazily, each from the module that defines it."""
    import importlib

    import splitinfer

    assert splitinfer.__all__
    for name in splitinfer.__all__:
        obj = getattr(splitinfer, name)
        module = splitinfer._EXPORTS[name]
        assert getattr(importlib.import_module(module), name) is obj
        assert getattr(obj, "__module__", module) == module, f"{name} lives in {obj.__module__}, not {module}"


def test_loader_keeps_its_import_names() -> None:
    """Moved names stay importable from the loader (callers across the tree use them)."""
    from splitinfer.models import catalog, spec

    assert LoadedModel is spec.LoadedModel and ModelInfo is spec.ModelInfo
    assert builtin_models is catalog.builtin_models


@pytest.mark.parametrize("name", ["tinycnn", "tinycnn-digits", "mobilenet_v2", "resnet18"])
def test_weights_hash_matches_shipped_profiles(name: str, zoo_cache: Callable[[str], LoadedModel]) -> None:
    """The profiles in partitions/ record the weights they measured: the same bits load today
    (random init drawn in the same order, trained weights read from the shipped file)."""
    import json

    recorded = json.loads((ROOT / "partitions" / name / "edge.json").read_text())["weights_hash"]
    assert weights_hash(zoo_cache(name).module) == recorded


@pytest.mark.parametrize(
    "spec, digest",
    [
        ("student:tinycnn", "07a196a71d4617c7e9555c1ce1bf1d2df4799b46efe7a04f67f60c7b4ad2298b"),
        ("student:tinycnn-digits", "970469cb5e69ca1743d3d4ec1999b3eda57d4491ba7a52879830facaf777fa48"),
        ("student:resnet18", "ebaa5fd13ef2349ddabea991d2c9b55a3b555a9d7347a180b5e41572ebb2817b"),
    ],
)
def test_student_weights_are_pinned(spec: str, digest: str) -> None:
    """Students are built from the zoo's blocks; their seeded init (and the shipped student) keep their bits."""
    assert weights_hash(load_model(spec).module) == digest

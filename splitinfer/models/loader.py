"""Model registry and loader: built-in zoo names and user models behind one call.

``load_model(spec)`` takes a built-in name (``resnet18``), a file
(``path/to/file.py:build``) or an importable module (``package.module:build``);
trained and derived models too: ``student:M``, ``int8:S`` and weights files
``path/to/file.pt`` (see ``splitinfer.models.pretrained``).
A user function takes no arguments and returns ``(nn.Module, example_input)``.
Anything the user can get wrong ends in a one-line ``UserError``.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import itertools
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from splitinfer.models import pretrained, zoo
from splitinfer.errors import UserError

__all__ = [
    "ModelInfo",
    "LoadedModel",
    "builtin_models",
    "load_model",
    "weights_hash",
    "count_parameters",
    "count_flops",
]

log = logging.getLogger(__name__)

# Seed for example inputs and user builders: fixed so every process gets the same tensors.
_INPUT_SEED = 0

_IMAGENET_SHAPE = (3, 224, 224)


@dataclass(frozen=True)
class ModelInfo:
    """What the zoo says about one built-in model."""

    name: str
    input_shape: tuple[int, ...]  # without the batch dimension
    num_classes: int
    description: str


@dataclass
class LoadedModel:
    """A model ready to trace and run, with an example input of batch size 1."""

    name: str  # zoo name, or the user's spec string
    module: nn.Module  # in eval mode
    example_input: torch.Tensor  # batch size 1

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input, without the batch dimension."""
        return tuple(self.example_input.shape[1:])

    def example_batch(self, batch: int) -> torch.Tensor:
        """A deterministic input of ``batch`` rows, same dtype as the example input.

        Float inputs are standard normal from a generator seeded with 0 (so the
        same on every call and in every process); other dtypes (token ids, masks)
        have no safe random range, so the example row is repeated.
        """
        if batch < 1:
            raise UserError(f"batch size must be at least 1, got {batch}")
        ex = self.example_input
        if ex.is_floating_point():
            gen = torch.Generator().manual_seed(_INPUT_SEED)
            return torch.randn((batch, *self.input_shape), generator=gen, dtype=ex.dtype)
        return ex[:1].expand(batch, *self.input_shape).clone()


@dataclass(frozen=True)
class _Builtin:
    info: ModelInfo
    build: Callable[[], nn.Module]


def _imagenet(name: str, description: str) -> ModelInfo:
    return ModelInfo(name, _IMAGENET_SHAPE, 1000, description)


_BUILTINS: dict[str, _Builtin] = {
    b.info.name: b
    for b in (
        _Builtin(_imagenet("alexnet", "AlexNet: a plain chain of 5 convs and 3 linears"), zoo.alexnet),
        _Builtin(_imagenet("vgg16", "VGG-16: 13 convs and 3 linears, heavy and wide"), zoo.vgg16),
        _Builtin(_imagenet("resnet18", "ResNet-18: basic residual blocks"), zoo.resnet18),
        _Builtin(_imagenet("resnet50", "ResNet-50 v1.5: bottleneck residual blocks"), zoo.resnet50),
        _Builtin(_imagenet("mobilenet_v2", "MobileNetV2: inverted residuals, depthwise convs"), zoo.mobilenet_v2),
        _Builtin(ModelInfo("tinycnn", (3, 32, 32), 10, "Small residual CNN for 32x32 inputs (digits)"), zoo.tinycnn),
        _Builtin(
            ModelInfo("tinycnn-digits", (3, 32, 32), 10, "tinycnn trained on scikit-learn's digits (shipped weights)"),
            pretrained.tinycnn_digits,
        ),
    )
}


def builtin_models() -> list[ModelInfo]:
    """The built-in models, in a stable order."""
    return [b.info for b in _BUILTINS.values()]


def load_model(spec: str) -> LoadedModel:
    """Load a built-in model by name, or a user model from ``file.py:fn`` / ``pkg.mod:fn``."""
    builtin = _BUILTINS.get(spec)
    if builtin is not None:
        module = builtin.build()
        gen = torch.Generator().manual_seed(_INPUT_SEED)
        example = torch.randn((1, *builtin.info.input_shape), generator=gen)
        return LoadedModel(name=spec, module=module, example_input=example)
    if pretrained.is_derived_spec(spec):
        return pretrained.load_derived(spec)

    if ":" not in spec:
        names = ", ".join(_BUILTINS)
        raise UserError(
            f"unknown model {spec!r}: use a built-in name ({names}) "
            "or a user model as path/to/file.py:function or package.module:function"
            " (or student:NAME, int8:SPEC, path/to/weights.pt)"
        )
    # rpartition: a Windows path ("C:\\m.py:build") has a colon of its own.
    target, _, func_name = spec.rpartition(":")
    if not target or not func_name:
        raise UserError(f"bad model spec {spec!r}: expected path/to/file.py:function or package.module:function")

    user_module = _import_file(target) if _looks_like_path(target) else _import_module(target)
    module, example = _call_builder(spec, user_module, func_name)
    return LoadedModel(name=spec, module=module.eval(), example_input=example)


def weights_hash(module: nn.Module) -> str:
    """SHA-256 hex digest of a module's state_dict (parameters and buffers).

    Keys are visited in sorted order; each entry contributes its name, dtype,
    shape and raw bytes, so equal weights give equal hashes in any process.
    """
    h = hashlib.sha256()
    state = module.state_dict()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        header = f"{key}\0{t.dtype}\0{tuple(t.shape)}\0{t.numel() * t.element_size()}\0"
        h.update(header.encode())
        # Viewing as bytes works for every dtype, bfloat16 included (numpy has none).
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def count_parameters(module: nn.Module) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in module.parameters())


def count_flops(module: nn.Module, example_input: torch.Tensor) -> int:
    """FLOPs of one forward pass, as FlopCounterMode counts them (a multiply-add is 2)."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        module(example_input)
    return int(counter.get_total_flops())


# --------------------------------------------------------------------------- user models

_file_counter = itertools.count()


def _looks_like_path(target: str) -> bool:
    return target.endswith(".py") or "/" in target or "\\" in target


def _one_line(exc: BaseException) -> str:
    """``Type: first line of message``: enough to act on, never a traceback."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _import_file(target: str) -> ModuleType:
    path = Path(target).expanduser()
    if not path.is_file():
        raise UserError(f"model file not found: {target}")
    # A unique name per load: two files called model.py must not share a module.
    name = f"splitinfer_user_model_{next(_file_counter)}_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UserError(f"cannot import model file {target}: not a Python source file")
    module = importlib.util.module_from_spec(spec)
    # Registered before exec, as importlib documents, so dataclasses and pickling
    # inside the user's file can find their own module.
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:  # SystemExit: a stray sys.exit() must not end us
        del sys.modules[name]
        raise UserError(f"cannot import model file {target}: {_one_line(exc)}") from None
    return module


def _import_module(target: str) -> ModuleType:
    try:
        return importlib.import_module(target)
    except (Exception, SystemExit) as exc:
        raise UserError(f"cannot import model module {target}: {_one_line(exc)}") from None


def _call_builder(spec: str, user_module: ModuleType, func_name: str) -> tuple[nn.Module, torch.Tensor]:
    fn = getattr(user_module, func_name, None)
    if fn is None:
        raise UserError(f"{spec}: no function {func_name!r} in {user_module.__file__ or user_module.__name__}")
    if not callable(fn):
        raise UserError(f"{spec}: {func_name!r} is a {type(fn).__name__}, not a function")
    try:
        # Seeded like the zoo: edge and cloud each build the model, and a builder
        # that draws random weights must give both the same ones. Forked, so the
        # caller's RNG state survives.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_INPUT_SEED)
            result = fn()
    except (Exception, SystemExit) as exc:
        raise UserError(f"{spec}: {func_name}() raised {_one_line(exc)}") from None

    if not isinstance(result, (tuple, list)) or len(result) != 2:
        raise UserError(
            f"{spec}: {func_name}() must return (nn.Module, example_input), got {_describe(result)}"
        )
    module, example = result
    if not isinstance(module, nn.Module):
        raise UserError(
            f"{spec}: {func_name}() must return (nn.Module, example_input); first item is {_describe(module)}"
        )
    if not isinstance(example, torch.Tensor):
        raise UserError(f"{spec}: example input must be a torch.Tensor, got {_describe(example)}")
    if example.dim() == 0:
        raise UserError(f"{spec}: example input must have a batch dimension, got a scalar tensor")
    if example.shape[0] != 1:
        # The rest of the system assumes the example is one sample; keep the first.
        log.info("%s: example input has batch %d, keeping the first row", spec, example.shape[0])
        example = example[:1]
    return module, example.detach()


def _describe(value: object) -> str:
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)} items"
    return f"a {type(value).__name__}"

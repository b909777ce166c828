"""Model loader: built-in names, derived models and user models behind one call.

``load_model(spec)`` takes a built-in name (``resnet18``; ``splitinfer.models.catalog``),
a file (``path/to/file.py:build``) or an importable module (``package.module:build``);
trained and derived models too: ``student:M`` (``splitinfer.models.students``),
``int8:S`` (``splitinfer.models.quantize``) and weights files ``path/to/file.pt``
(``splitinfer.models.pretrained``). This is the one module of the package that
imports the others; they import only what lies below them.
A user function takes no arguments and returns ``(nn.Module, example_input)``, where the
example is one tensor, a tuple of tensors (positional arguments) or a dict of tensors
(keyword arguments, e.g. ``{"input_ids": ..., "attention_mask": ...}``), each of batch 1.
Anything the user can get wrong ends in a one-line ``UserError``.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import itertools
import logging
import sys
from pathlib import Path
from types import ModuleType

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from splitinfer.core.inputs import Inputs, call_module, map_inputs, tensors_of
from splitinfer.errors import UserError
from splitinfer.models.catalog import builtin_models, builtin_names, load_builtin
from splitinfer.models.pretrained import (
    INT8_PREFIX,
    STUDENT_PREFIX,
    WEIGHTS_SUFFIX,
    is_derived_spec,
    load_weights_into,
    read_weights,
)
from splitinfer.models.seeding import seeded
from splitinfer.models.spec import LoadedModel, ModelInfo

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


def load_model(spec: str) -> LoadedModel:
    """Load a built-in model by name, or a user model from ``file.py:fn`` / ``pkg.mod:fn``."""
    builtin = load_builtin(spec)
    if builtin is not None:
        return builtin
    if is_derived_spec(spec):
        return _load_derived(spec)

    if ":" not in spec:
        names = ", ".join(builtin_names())
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
    try:
        module = module.eval()
    except Exception as exc:  # a user's eval() override, or train() that raises
        raise UserError(f"{spec}: {func_name}()'s module raised on .eval(): {_one_line(exc)}") from None
    if not isinstance(module, nn.Module):
        raise UserError(f"{spec}: {func_name}()'s module.eval() returned {_describe(module)}, not the module")
    return LoadedModel(name=spec, module=module, example_input=example)


def _load_derived(spec: str) -> LoadedModel:
    """Load ``student:M``, ``int8:S`` or a weights file ``path/to/file.pt``."""
    if spec.startswith(INT8_PREFIX):
        # Lazy: torch.ao.quantization is slow to import and only int8 specs need it.
        from splitinfer.models.quantize import quantize_model

        inner = load_model(spec[len(INT8_PREFIX) :])
        if inner.multi_input:
            raise UserError(f"{spec}: int8 quantization takes a model of one input; {inner.name} has {len(inner.input_names)}")
        module = quantize_model(inner.module, inner.input_shape)
        return LoadedModel(name=spec, module=module, example_input=inner.example_input)
    if spec.startswith(STUDENT_PREFIX):
        from splitinfer.models.students import load_student

        return load_student(spec[len(STUDENT_PREFIX) :])
    weights = read_weights(Path(spec).expanduser())
    if weights.arch.endswith(WEIGHTS_SUFFIX):
        raise UserError(f"{spec}: arch {weights.arch!r} is another weights file, not an architecture")
    base = load_model(weights.arch)
    load_weights_into(base.module, weights, spec)
    return LoadedModel(name=spec, module=base.module, example_input=base.example_input)


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


def count_flops(module: nn.Module, example_input: Inputs) -> int:
    """FLOPs of one forward pass, as FlopCounterMode counts them (a multiply-add is 2)."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        call_module(module, example_input)
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


def _call_builder(spec: str, user_module: ModuleType, func_name: str) -> tuple[nn.Module, Inputs]:
    fn = getattr(user_module, func_name, None)
    if fn is None:
        raise UserError(f"{spec}: no function {func_name!r} in {user_module.__file__ or user_module.__name__}")
    if not callable(fn):
        raise UserError(f"{spec}: {func_name!r} is a {type(fn).__name__}, not a function")
    try:
        # Seeded like the zoo: edge and cloud each build the model, and a builder
        # that draws random weights must give both the same ones.
        result = seeded(fn)
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
    return module, _check_example(spec, _example_structure(spec, example))


def _example_structure(spec: str, example: object) -> Inputs:
    """One tensor, a tuple of tensors, or a dict str -> tensor; anything else is refused."""
    if isinstance(example, torch.Tensor):
        return example
    several = "; several inputs: a tuple or a dict of tensors"
    if isinstance(example, (tuple, list)) and example and all(isinstance(t, torch.Tensor) for t in example):
        return tuple(example)
    if isinstance(example, dict) and example:
        bad = [k for k, v in example.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
        if bad:
            raise UserError(f"{spec}: example input {bad[0]!r} must be a str name with a torch.Tensor value{several}")
        if any(not k.isidentifier() for k in example):
            raise UserError(f"{spec}: example input names must be argument names, got {list(example)[:8]}")
        return dict(example)
    raise UserError(f"{spec}: example input must be a torch.Tensor, got {_describe(example)}{several}")


def _check_example(spec: str, example: Inputs) -> Inputs:
    """Every input has a batch dimension and they agree on it; keep one row of each."""
    tensors = tensors_of(example)
    if any(t.dim() == 0 for t in tensors):
        raise UserError(f"{spec}: example input must have a batch dimension, got a scalar tensor")
    batches = {int(t.shape[0]) for t in tensors}
    if len(batches) > 1:
        raise UserError(f"{spec}: the example inputs disagree on the batch size (first dimensions {sorted(batches)})")
    batch = batches.pop()
    if batch < 1:
        raise UserError(f"{spec}: example input has an empty batch")
    if batch != 1:
        # The rest of the system assumes the example is one sample; keep the first.
        log.info("%s: example input has batch %d, keeping the first row", spec, batch)
    return map_inputs(example, lambda _k, t: t[:1].detach())


def _describe(value: object) -> str:
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)} items"
    return f"a {type(value).__name__}"

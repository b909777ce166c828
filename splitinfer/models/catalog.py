"""The built-in models: their names, input shapes and builders, in a stable order.

A built-in is a zoo architecture with seeded random weights (``splitinfer.models.zoo``)
or one with trained weights shipped in the package (``tinycnn-digits``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from splitinfer.errors import UserError
from splitinfer.models import zoo
from splitinfer.models.pretrained import TRAINED, load_weights_into, read_weights, shipped_weights, weights_dir
from splitinfer.models.seeding import seeded_randn
from splitinfer.models.spec import LoadedModel, ModelInfo

__all__ = ["builtin_models", "builtin_names", "load_builtin", "tinycnn_digits"]

_IMAGENET_SHAPE = (3, 224, 224)


def tinycnn_digits() -> nn.Module:
    """tinycnn with the shipped weights trained on digits (``splitinfer train --model tinycnn``)."""
    path = shipped_weights("tinycnn-digits")
    if path is None:
        raise UserError(f"trained weights missing: {weights_dir() / 'tinycnn-digits.pt'} (reinstall splitinfer)")
    weights = read_weights(path)
    if weights.arch != TRAINED["tinycnn-digits"]:
        raise UserError(f"{path}: weights for {weights.arch!r}, expected 'tinycnn'")
    return load_weights_into(zoo.tinycnn(), weights, str(path))


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
            tinycnn_digits,
        ),
    )
}


def builtin_models() -> list[ModelInfo]:
    """The built-in models, in a stable order."""
    return [b.info for b in _BUILTINS.values()]


def builtin_names() -> list[str]:
    """The built-in model names, in the same order."""
    return list(_BUILTINS)


def load_builtin(name: str) -> LoadedModel | None:
    """Built-in model ``name`` with its seeded example input; None if there is none of that name."""
    builtin = _BUILTINS.get(name)
    if builtin is None:
        return None
    module = builtin.build()
    example = seeded_randn((1, *builtin.info.input_shape))
    return LoadedModel(name=name, module=module, example_input=example)

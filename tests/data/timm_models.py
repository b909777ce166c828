"""timm models as user model files (``timm_models.py:resnet18`` etc.), imported through
``splitinfer.models.timm_shim`` (timm is installed with --no-deps: no torchvision).

Random weights (pretrained=False; nothing is downloaded), 10 classes and 64x64 inputs
(ViT: ``img_size=64``, its position embedding sized to match) to keep the test suite's
time modest; the architectures are otherwise timm's own. Batch 1."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from splitinfer.models.timm_shim import import_timm  # noqa: E402


SIZE = 64


def _build(name: str, size: int = SIZE, **kw: object) -> tuple[nn.Module, torch.Tensor]:
    timm = import_timm()
    model = timm.create_model(name, pretrained=False, num_classes=10, **kw)
    return model, torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(7))


def resnet18() -> tuple[nn.Module, torch.Tensor]:
    return _build("resnet18")


def mobilenetv3_small_100() -> tuple[nn.Module, torch.Tensor]:
    return _build("mobilenetv3_small_100")


def efficientnet_b0() -> tuple[nn.Module, torch.Tensor]:
    return _build("efficientnet_b0")


def vit_tiny_patch16_224() -> tuple[nn.Module, torch.Tensor]:
    return _build("vit_tiny_patch16_224", img_size=SIZE)


def convnext_atto() -> tuple[nn.Module, torch.Tensor]:
    return _build("convnext_atto")


NAMES = ("resnet18", "mobilenetv3_small_100", "efficientnet_b0", "vit_tiny_patch16_224", "convnext_atto")

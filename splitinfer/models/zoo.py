"""Built-in models, defined in plain code (no torchvision, nothing downloaded).

The architectures follow torchvision's (AlexNet, VGG-16, ResNet-18/50 v1.5,
MobileNetV2) plus ``tinycnn``, a small residual CNN for 3x32x32 inputs.

Rules every model here keeps, because the graph is traced with
``torch.fx.symbolic_trace`` and then cut at arbitrary nodes:

* no in-place ops (``inplace=True``, ``+=``): a cut may need the pre-op value;
* ``torch.flatten(x, 1)`` instead of ``x.view(x.size(0), -1)``, which would
  bake a traced size into the graph;
* residual adds written as ``out = out + identity``;
* one activation module per use site, so every graph node has its own module.

Each public builder returns a fresh model in eval mode with weights drawn from a
private RNG stream seeded with 0: two processes building the same model get
bit-identical weights, and the caller's global RNG state is left untouched
(``splitinfer.models.seeding``). The blocks and the initialisation are public:
the students (``splitinfer.models.students``) are built from them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from torch import nn

from splitinfer.models.seeding import seeded

__all__ = [
    "alexnet", "vgg16", "resnet18", "resnet50", "mobilenet_v2", "tinycnn",
    "ConvBNAct", "InvertedResidual", "init_weights",
]  # fmt: skip


def _deterministic(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """Run ``build`` under a forked, seeded RNG and return its model in eval mode."""

    @functools.wraps(build)
    def wrapper() -> nn.Module:
        return seeded(build).eval()

    return wrapper


def init_weights(model: nn.Module, conv_mode: str = "fan_out") -> None:
    """torchvision's initialisation: He-normal convs, unit BN, small-normal linears.

    ``conv_mode="fan_in"`` keeps activations at their scale going forward (the students).
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode=conv_mode, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------- AlexNet


class AlexNet(nn.Module):
    """A plain chain: five convs then three linears (torchvision's layout)."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout),
            nn.Linear(256 * 6 * 6, 4096),
            nn.ReLU(),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


# --------------------------------------------------------------------------- VGG

# Channel counts per conv, "M" for a 2x2 max-pool (torchvision's configuration "D").
_VGG16_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
    512, 512, 512, "M", 512, 512, 512, "M",
)  # fmt: skip


class VGG(nn.Module):
    """VGG without batch norm: a conv stack then a three-layer classifier."""

    def __init__(self, cfg: Sequence[int | str], num_classes: int = 1000, dropout: float = 0.5) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                assert isinstance(v, int)
                layers += [nn.Conv2d(in_channels, v, kernel_size=3, padding=1), nn.ReLU()]
                in_channels = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096),
            nn.ReLU(),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(),
            nn.Dropout(p=dropout),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


# --------------------------------------------------------------------------- ResNet


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


def _downsample(in_planes: int, out_planes: int, stride: int) -> nn.Module | None:
    """Projection shortcut when the block changes shape, else None (identity)."""
    if stride == 1 and in_planes == out_planes:
        return None
    return nn.Sequential(_conv1x1(in_planes, out_planes, stride), nn.BatchNorm2d(out_planes))


class BasicBlock(nn.Module):
    """Two 3x3 convs with a shortcut (ResNet-18/34, and tinycnn)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _downsample(in_planes, planes, stride)
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + identity
        return self.relu2(out)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride: ResNet v1.5), 1x1 expand, shortcut."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = _conv1x1(in_planes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv3 = _conv1x1(planes, out_planes)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.downsample = _downsample(in_planes, out_planes, stride)
        self.relu3 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = out + identity
        return self.relu3(out)


class ResNet(nn.Module):
    """torchvision's ImageNet ResNet: 7x7 stem, four stages, global pool, linear."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: Sequence[int],
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_planes = 64
        stages: list[nn.Sequential] = []
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
            stride = 1 if i == 0 else 2
            stage: list[nn.Module] = []
            for j in range(blocks):
                stage.append(block(in_planes, planes, stride if j == 0 else 1))
                in_planes = planes * block.expansion
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


# --------------------------------------------------------------------------- MobileNetV2


class ConvBNAct(nn.Sequential):
    """Conv (optionally depthwise via ``groups``), BatchNorm, optional activation.

    ``act`` is ReLU6 for MobileNetV2; the students pass ReLU, which int8 fusion takes.
    """

    def __init__(
        self, in_planes: int, out_planes: int, kernel_size: int = 3, stride: int = 1,
        groups: int = 1, activation: bool = True, act: Callable[[], nn.Module] = nn.ReLU6,
    ) -> None:  # fmt: skip
        padding = (kernel_size - 1) // 2
        layers: list[nn.Module] = [
            nn.Conv2d(in_planes, out_planes, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_planes),
        ]
        if activation:
            layers.append(act())
        super().__init__(*layers)


class InvertedResidual(nn.Module):
    """Expand (1x1), depthwise 3x3, linear project (1x1); shortcut when shapes match."""

    def __init__(
        self, in_planes: int, out_planes: int, stride: int, expand_ratio: int,
        act: Callable[[], nn.Module] = nn.ReLU6,
    ) -> None:  # fmt: skip
        super().__init__()
        hidden = in_planes * expand_ratio
        self.use_res_connect = stride == 1 and in_planes == out_planes
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNAct(in_planes, hidden, kernel_size=1, act=act))
        layers.append(ConvBNAct(hidden, hidden, stride=stride, groups=hidden, act=act))
        layers.append(ConvBNAct(hidden, out_planes, kernel_size=1, activation=False))
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # use_res_connect is a plain bool fixed at construction, so fx resolves it while tracing.
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


# (expand ratio t, output channels c, repeats n, first stride s), as in the paper.
_MOBILENET_V2_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class MobileNetV2(nn.Module):
    """MobileNetV2 at width 1.0 (every channel count is already a multiple of 8)."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        in_planes, last_planes = 32, 1280
        features: list[nn.Module] = [ConvBNAct(3, in_planes, stride=2)]
        for t, c, n, s in _MOBILENET_V2_SETTINGS:
            for i in range(n):
                features.append(InvertedResidual(in_planes, c, s if i == 0 else 1, t))
                in_planes = c
        features.append(ConvBNAct(in_planes, last_planes, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(last_planes, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


# --------------------------------------------------------------------------- TinyCNN


class TinyCNN(nn.Module):
    """A small residual CNN for 3x32x32 inputs (digits upscaled), ~78k parameters.

    3x3 stem at 16 channels, then three residual stages at 16/32/64 channels
    (32x32 -> 16x16 -> 8x8), global average pool and a linear classifier.
    BatchNorm everywhere so it trains quickly on CPU from random init.
    """

    def __init__(self, num_classes: int = 10, widths: Sequence[int] = (16, 32, 64)) -> None:
        super().__init__()
        self.stem = nn.Sequential(_conv3x3(3, widths[0]), nn.BatchNorm2d(widths[0]), nn.ReLU())
        blocks: list[nn.Module] = []
        in_planes = widths[0]
        for i, width in enumerate(widths):
            blocks.append(BasicBlock(in_planes, width, stride=1 if i == 0 else 2))
            in_planes = width
        self.blocks = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


# --------------------------------------------------------------------------- builders


@_deterministic
def alexnet() -> nn.Module:
    """AlexNet (torchvision layout), 1000 classes, 3x224x224 input."""
    model = AlexNet()
    init_weights(model)
    return model


@_deterministic
def vgg16() -> nn.Module:
    """VGG-16 without batch norm, 1000 classes, 3x224x224 input."""
    model = VGG(_VGG16_CFG)
    init_weights(model)
    return model


@_deterministic
def resnet18() -> nn.Module:
    """ResNet-18, 1000 classes, 3x224x224 input."""
    model = ResNet(BasicBlock, (2, 2, 2, 2))
    init_weights(model)
    return model


@_deterministic
def resnet50() -> nn.Module:
    """ResNet-50 (v1.5: stride on the 3x3 conv), 1000 classes, 3x224x224 input."""
    model = ResNet(Bottleneck, (3, 4, 6, 3))
    init_weights(model)
    return model


def _init_mobilenet_scale_preserving(model: nn.Module) -> None:
    """Re-draw MobileNetV2's convs so activations keep their scale with random weights.

    With torchvision's fan-out init and untrained BN (an identity in eval mode),
    every inverted-residual block shrinks its input about 3x: the logits of a
    random MobileNetV2 come out around 1e-9, which fp16 or int8 codecs flush
    to zero. Fan-in init (ReLU gain before a ReLU6, unit gain before the linear
    projection) keeps activations near unit scale instead.
    """
    for m in model.modules():
        if isinstance(m, ConvBNAct):
            conv = m[0]
            assert isinstance(conv, nn.Conv2d)
            gain = "relu" if len(m) == 3 else "linear"
            nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity=gain)


@_deterministic
def mobilenet_v2() -> nn.Module:
    """MobileNetV2 (width 1.0), 1000 classes, 3x224x224 input."""
    model = MobileNetV2()
    init_weights(model)
    _init_mobilenet_scale_preserving(model)
    return model


@_deterministic
def tinycnn() -> nn.Module:
    """Small residual CNN, 10 classes, 3x32x32 input."""
    model = TinyCNN()
    init_weights(model)
    return model

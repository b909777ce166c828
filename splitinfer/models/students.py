"""Default students: for every built-in model, a small net that runs whole on the edge.

A student is the edge's fallback: when the cloud cannot answer in time, the edge
runs it instead of the split model. It takes the teacher's input and has the
teacher's number of outputs (1000 for the ImageNet zoo; on digits only the first
10 matter), and is trained by distillation (``splitinfer distill``).

Two student architectures, both with plain ReLU so conv, batch norm and ReLU
fuse for int8 quantization. The mapping, teacher -> student:

    teacher (its MFLOPs)                       student    input      params  MFLOPs
    tinycnn, tinycnn-digits (25)               micro32    3x32x32    19.5 k     1.3
    alexnet (1,430), vgg16 (30,900),           mini224    3x224x224  398 k     45
    resnet18 (3,630), resnet50 (8,180),
    mobilenet_v2 (600)

``micro32`` is three plain 3x3 convs (16/32/48 channels, each stride 2), pool,
linear. A MobileNet-style net of half the parameters was tried first: at 32x32
per-op overhead, not FLOPs, sets the latency, and its ~35 small ops (depthwise
convs, BN, ReLU) ran in 1.3 ms at one thread, barely below the teacher's 1.4 ms;
the three convs run in ~0.5 ms at the same held-out accuracy.

``mini224`` is a narrow MobileNetV2 (inverted residuals: 1x1 expand, depthwise
3x3, linear 1x1 project; 16..96 channels, 224 -> 7 in five stride-2 steps, a
1x1 conv to 256, pool, linear to 1000): ~4 ms at one thread. One student serves
all five ImageNet-style teachers: they share input and classes, and what limits
the edge is the student's own cost, not which teacher it copies.

Spec ``student:M`` loads M's student (``load_model("student:tinycnn-digits")``):
with the weights shipped in ``splitinfer/models/weights/student-M.pt`` when there
are any (there are for ``tinycnn-digits``), else with its seeded random init. Every
builder is deterministic: same weights in every process, caller's RNG untouched.
The blocks are the zoo's (``ConvBNAct``, ``InvertedResidual``) with ReLU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from splitinfer.errors import UserError
from splitinfer.models.catalog import builtin_models
from splitinfer.models.pretrained import STUDENT_PREFIX, TRAINED, load_weights_into, read_weights, shipped_weights
from splitinfer.models.seeding import seeded, seeded_randn
from splitinfer.models.spec import LoadedModel
from splitinfer.models.zoo import ConvBNAct, InvertedResidual, init_weights

__all__ = [
    "MICRO32",
    "MINI224",
    "StudentArch",
    "StudentNet",
    "build_student",
    "default_student",
    "load_student",
    "student_arch",
    "student_spec",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StudentArch:
    """The shape of a student net."""

    name: str
    input_size: int  # the H = W it is sized for (any size runs: the pool is adaptive)
    stem_width: int  # channels of the first 3x3 conv
    stem_stride: int
    # (expand ratio t, output channels c, repeats n, first stride s), as in MobileNetV2.
    # t = 0: a plain 3x3 conv + BN + ReLU instead of an inverted residual (fewer,
    # larger ops: at 32x32 per-op overhead, not FLOPs, sets the latency).
    stages: tuple[tuple[int, int, int, int], ...]
    head_width: int  # a 1x1 conv widens to this before the pool; 0: none
    description: str


MICRO32 = StudentArch(
    name="micro32",
    input_size=32,
    stem_width=16,
    stem_stride=2,  # 32 -> 16: digits are 8x8 upscaled, full resolution carries nothing more
    stages=((0, 32, 1, 2), (0, 48, 1, 2)),  # plain convs: 16 -> 8 -> 4
    head_width=0,
    description="three plain 3x3 convs for 32x32 inputs",
)

MINI224 = StudentArch(
    name="mini224",
    input_size=224,
    stem_width=16,
    stem_stride=2,  # 224 -> 112
    stages=((1, 16, 1, 2), (4, 24, 1, 2), (4, 32, 2, 2), (4, 64, 2, 2), (4, 96, 1, 1)),  # -> 56, 28, 14, 7
    head_width=256,
    description="narrow MobileNet-style net for 224x224 inputs",
)

# Built-in (random-init) architecture -> its student.
_STUDENT_OF: dict[str, StudentArch] = {
    "alexnet": MINI224,
    "vgg16": MINI224,
    "resnet18": MINI224,
    "resnet50": MINI224,
    "mobilenet_v2": MINI224,
    "tinycnn": MICRO32,
}


def _conv_bn_relu(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> ConvBNAct:
    return ConvBNAct(cin, cout, kernel, stride, act=nn.ReLU)


class StudentNet(nn.Module):
    """Stem, inverted-residual stages, optional 1x1 widening, global pool, linear."""

    def __init__(self, arch: StudentArch, num_classes: int) -> None:
        super().__init__()
        self.arch_name = arch.name
        layers: list[nn.Module] = [_conv_bn_relu(3, arch.stem_width, stride=arch.stem_stride)]
        width = arch.stem_width
        for t, c, n, s in arch.stages:
            for i in range(n):
                stride = s if i == 0 else 1
                if t == 0:
                    layers.append(_conv_bn_relu(width, c, stride=stride))
                else:
                    layers.append(InvertedResidual(width, c, stride, t, act=nn.ReLU))
                width = c
        if arch.head_width:
            layers.append(_conv_bn_relu(width, arch.head_width, kernel=1))
            width = arch.head_width
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.fc(torch.flatten(x, 1))


def _init(model: nn.Module) -> nn.Module:
    """He (fan-in) convs, unit BN, small linear: activations keep their scale at random init."""
    init_weights(model, conv_mode="fan_in")
    return model


def _base(teacher: str) -> str:
    """The random-init built-in architecture of a teacher name (tinycnn-digits -> tinycnn)."""
    return TRAINED.get(teacher, teacher)


def student_arch(teacher: str) -> StudentArch:
    """The student architecture of a built-in teacher; UserError for anything else."""
    arch = _STUDENT_OF.get(_base(teacher))
    if arch is None:
        names = ", ".join(i.name for i in builtin_models())
        raise UserError(
            f"no default student for {teacher!r}: built-in teachers are {names}; "
            "for another teacher pass --student with a model spec"
        )
    return arch


def _num_classes(teacher: str) -> int:
    return next(i.num_classes for i in builtin_models() if i.name == teacher)


def student_spec(teacher: str) -> str:
    """The model spec of a teacher's default student: ``student:<teacher>``."""
    return f"{STUDENT_PREFIX}{teacher}"


def default_student(teacher: str) -> str:
    """The spec to distill into by default: the student architecture with random init.

    For a trained teacher (``tinycnn-digits``) that is its base's student
    (``student:tinycnn``), so distillation starts from scratch, not from the
    shipped student.
    """
    student_arch(teacher)  # UserError for a teacher without a default student
    return student_spec(_base(teacher))


def build_student(teacher: str) -> nn.Module:
    """A fresh student of a built-in teacher, seeded init, in eval mode."""
    arch = student_arch(teacher)
    num_classes = _num_classes(teacher)
    return seeded(lambda: _init(StudentNet(arch, num_classes))).eval()


def load_student(teacher: str) -> LoadedModel:
    """``student:<teacher>``: the student with shipped weights if any, else random init."""
    module = build_student(teacher)
    path = shipped_weights(f"student-{teacher}")
    if path is not None:
        weights = read_weights(path)
        load_weights_into(module, weights, str(path))
        log.debug("loaded %s", path)
    arch = student_arch(teacher)
    example = seeded_randn((1, 3, arch.input_size, arch.input_size))
    return LoadedModel(name=student_spec(teacher), module=module, example_input=example)


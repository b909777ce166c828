"""int8 models for the edge: static post-training quantization with calibration on digits.

FX graph mode (``torch.ao.quantization.quantize_fx``): conv + batch norm + ReLU
are fused, weights are quantized per channel, activations per tensor with
ranges observed while running calibration images (the first
``CALIBRATION_IMAGES`` digits of the *training* split, never held-out ones).
The result is deterministic: the same float weights give the same int8 model.

Backend: ``x86`` where the CPU build has it (fbgemm + oneDNN kernels), else
``qnnpack`` (ARM edge devices). torch 2.13 marks ``torch.ao.quantization`` as
deprecated in favour of torchao, which is not installed here; its warnings are
silenced inside this module only.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from splitinfer.errors import UserError

__all__ = ["CALIBRATION_IMAGES", "quantize_model", "quantize_student", "quantized_engine"]

log = logging.getLogger(__name__)

CALIBRATION_IMAGES = 256  # digits training images run through the observers
_CALIBRATION_BATCH = 64


def quantized_engine() -> str:
    """The quantized backend to use on this CPU: x86, else fbgemm, else qnnpack."""
    engines = torch.backends.quantized.supported_engines
    for name in ("x86", "fbgemm", "qnnpack"):
        if name in engines:
            return name
    raise UserError(f"this torch build has no int8 CPU backend (engines: {engines})")


@contextmanager
def _quiet_ao() -> Iterator[None]:
    """Silence torch.ao.quantization's deprecation and observer warnings."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.ao\..*")
        warnings.filterwarnings("ignore", message=r".*quantize_per_tensor.*")
        warnings.filterwarnings("ignore", message=r".*reduce_range will be deprecated.*")
        yield


def quantize_model(
    module: nn.Module,
    input_shape: tuple[int, ...],
    calibration: torch.Tensor | None = None,
) -> nn.Module:
    """An int8 copy of ``module`` (float, eval mode), calibrated on ``calibration``.

    ``calibration`` defaults to the first ``CALIBRATION_IMAGES`` digits training
    images at ``input_shape``. The float module is not modified.
    """
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    if calibration is None:
        from splitinfer.models.data import digits_dataset

        calibration = digits_dataset(input_shape, max_train=CALIBRATION_IMAGES, max_test=1).x_train
    if any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in module.modules()):
        raise UserError("this model is already quantized to int8")
    engine = quantized_engine()
    torch.backends.quantized.engine = engine
    float_model = copy.deepcopy(module).eval()
    example = calibration[:1]
    # Forked RNG: preparing and converting draws from torch's global generator, and loading
    # a model must leave the caller's RNG state as it found it (as every other builder does).
    with _quiet_ao(), torch.no_grad(), torch.random.fork_rng(devices=[]):
        try:
            prepared = prepare_fx(float_model, get_default_qconfig_mapping(engine), (example,))
            for i in range(0, len(calibration), _CALIBRATION_BATCH):
                prepared(calibration[i : i + _CALIBRATION_BATCH])
            quantized = convert_fx(prepared)
        except Exception as exc:  # untraceable forward, an op without an int8 kernel, ...
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UserError(f"cannot quantize this model: {type(exc).__name__}: {first[:200]}") from None
    log.debug("quantized with %s on %d calibration images", engine, len(calibration))
    return quantized.eval()


def quantize_student(student: nn.Module, input_shape: tuple[int, ...] = (3, 32, 32)) -> nn.Module:
    """An int8 copy of a (float) student, calibrated on digits training images."""
    return quantize_model(student, input_shape)

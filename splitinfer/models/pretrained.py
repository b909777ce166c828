"""Trained weights: the weights file format, the files shipped in ``splitinfer/models/weights/``.

A weights file is what ``torch.save`` writes for a plain dict, loadable with
``torch.load(weights_only=True)`` (no pickled code, safe to load):

    {"format": "splitinfer-weights/1",
     "arch": "tinycnn",             # a model spec that builds the architecture
     "state_dict": {...},           # tensors only
     "meta": {...}}                 # str -> str | int | float: how it was made, its accuracy

``arch`` makes a file a model spec of its own: ``load_model("out/student.pt")``
builds ``arch`` and loads the state_dict into it (strictly: every key, every shape).

This module reads and writes files and names the spec prefixes; it builds no
model. Who loads what: ``splitinfer.models.catalog`` (``tinycnn-digits``: tinycnn
with ``weights/tinycnn-digits.pt``), ``splitinfer.models.students`` (``student:M``,
with ``weights/student-M.pt`` when it exists) and ``splitinfer.models.loader``
(``int8:S``, weights files).

Edge and cloud compare ``weights_hash`` of the loaded module, which covers every
trained tensor, so a different weights file on one side is detected.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from splitinfer.errors import UserError

__all__ = [
    "DERIVED_PREFIXES",
    "INT8_PREFIX",
    "STUDENT_PREFIX",
    "TRAINED",
    "WEIGHTS_FORMAT",
    "WEIGHTS_SUFFIX",
    "WeightsFile",
    "architecture_spec",
    "is_derived_spec",
    "load_weights_into",
    "read_weights",
    "save_weights",
    "shipped_weights",
    "weights_dir",
]

log = logging.getLogger(__name__)

WEIGHTS_FORMAT = "splitinfer-weights/1"
WEIGHTS_SUFFIX = ".pt"
STUDENT_PREFIX = "student:"
INT8_PREFIX = "int8:"
DERIVED_PREFIXES = (STUDENT_PREFIX, INT8_PREFIX)

# Built-in names with trained weights -> the architecture (a random-init built-in) they fill.
TRAINED: dict[str, str] = {"tinycnn-digits": "tinycnn"}


@dataclass(frozen=True)
class WeightsFile:
    """The contents of one weights file."""

    arch: str  # model spec that builds the architecture (random weights)
    state_dict: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)  # str -> str | int | float


def weights_dir() -> Path:
    """The folder of weights shipped inside the package (``splitinfer/models/weights``)."""
    return Path(__file__).parent / "weights"


def shipped_weights(name: str) -> Path | None:
    """``weights/<name>.pt`` if the package ships it."""
    path = weights_dir() / f"{name}{WEIGHTS_SUFFIX}"
    return path if path.is_file() else None


def save_weights(path: Path, arch: str, module: nn.Module, meta: dict[str, Any] | None = None) -> None:
    """Write ``module``'s state_dict as a weights file that rebuilds with spec ``arch``."""
    clean: dict[str, str | int | float | bool] = {}
    for key, value in (meta or {}).items():
        if not isinstance(key, str) or not isinstance(value, (str, int, float, bool)):
            raise TypeError(f"weights meta must map str to str/int/float/bool, got {key!r}: {type(value).__name__}")
        # Exact builtin types: weights_only loading refuses subclasses (torch.__version__ is one).
        for kind in (bool, int, float, str):
            if isinstance(value, kind):
                clean[key] = kind(value)
                break
    state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    payload = {"format": WEIGHTS_FORMAT, "arch": arch, "state_dict": state, "meta": clean}
    # Through a buffer: the zip's inner folder is then "archive", not the file's name.
    buf = io.BytesIO()
    torch.save(payload, buf)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)  # atomic: a reader never sees half a file
    log.info("wrote %s (%s, %d tensors)", path, arch, len(state))


def read_weights(path: Path) -> WeightsFile:
    """Read a weights file; anything wrong with it is a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt zip, pickled code refused by weights_only, ...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"cannot read weights file {path}: {first}") from None
    if not isinstance(payload, dict) or payload.get("format") != WEIGHTS_FORMAT:
        raise UserError(f"{path} is not a splitinfer weights file (expected format {WEIGHTS_FORMAT!r})")
    arch, state, meta = payload.get("arch"), payload.get("state_dict"), payload.get("meta", {})
    if not isinstance(arch, str) or not isinstance(state, dict) or not isinstance(meta, dict):
        raise UserError(f"{path}: malformed weights file (arch, state_dict or meta missing)")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise UserError(f"{path}: state_dict must map names to tensors")
    return WeightsFile(arch=arch, state_dict=state, meta=meta)


def load_weights_into(module: nn.Module, weights: WeightsFile, source: str) -> nn.Module:
    """Load ``weights`` into ``module`` strictly; a mismatch is a UserError naming ``source``."""
    own = module.state_dict()
    missing = sorted(set(own) - set(weights.state_dict))
    unexpected = sorted(set(weights.state_dict) - set(own))
    if missing or unexpected:
        raise UserError(
            f"{source} does not fit {weights.arch}: {len(missing)} missing and {len(unexpected)} unexpected "
            f"tensors (first: {(missing + unexpected)[0]})"
        )
    for key, tensor in weights.state_dict.items():
        if tuple(tensor.shape) != tuple(own[key].shape):
            raise UserError(
                f"{source} does not fit {weights.arch}: {key} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(own[key].shape)}"
            )
    module.load_state_dict(weights.state_dict, strict=True)
    return module.eval()


def architecture_spec(spec: str) -> str:
    """The spec that builds ``spec``'s architecture with fresh weights (what a weights file records).

    ``tinycnn-digits`` -> ``tinycnn``; ``student:tinycnn-digits`` -> ``student:tinycnn``;
    a weights file -> its ``arch``; other specs are their own architecture.
    """
    if spec.startswith(INT8_PREFIX):
        raise UserError(f"{spec}: an int8 model cannot be trained; train the float model and quantize it")
    if spec.startswith(STUDENT_PREFIX):
        teacher = spec[len(STUDENT_PREFIX) :]
        return STUDENT_PREFIX + TRAINED.get(teacher, teacher)
    if spec.endswith(WEIGHTS_SUFFIX):
        return read_weights(Path(spec).expanduser()).arch
    return TRAINED.get(spec, spec)


def is_derived_spec(spec: str) -> bool:
    """Whether ``spec`` names a derived model: ``student:M``, ``int8:S`` or a weights file."""
    return spec.startswith(DERIVED_PREFIXES) or spec.endswith(WEIGHTS_SUFFIX)

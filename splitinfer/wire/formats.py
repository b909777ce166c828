"""What may travel: the wire names of dtypes and of the compression steps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, cast

import torch

__all__ = ["DTYPES", "DTYPE_NAMES", "FP16_SOURCES", "FLOAT32_MAX", "MAX_NAME_LEN", "Compression", "Lossless", "Lossy", "parse_compression"]

Lossy = Literal["none", "fp16", "int8"]
Lossless = Literal["none", "lz4", "zstd"]

_LOSSY: tuple[str, ...] = ("none", "fp16", "int8")
_LOSSLESS: tuple[str, ...] = ("none", "lz4", "zstd")

# Wire names of the dtypes we carry. float64 is not on the hot path but costs nothing to allow.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "int32": torch.int32,
    "int64": torch.int64,
    "bool": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
FP16_SOURCES = (torch.float32, torch.float64)  # float16/bfloat16 are already 2 bytes wide
FLOAT32_MAX = torch.finfo(torch.float32).max

MAX_NAME_LEN = 256  # characters in a tensor name


@dataclass(frozen=True)
class Compression:
    """A lossy step (none/fp16/int8) optionally followed by a lossless one (none/lz4/zstd)."""

    lossy: Lossy = "none"
    lossless: Lossless = "none"

    def __post_init__(self) -> None:
        if self.lossy not in _LOSSY:
            raise ValueError(f"unknown lossy compression {self.lossy!r}; expected one of {', '.join(_LOSSY)}")
        if self.lossless not in _LOSSLESS:
            raise ValueError(
                f"unknown lossless compression {self.lossless!r}; expected one of {', '.join(_LOSSLESS)}"
            )

    def __str__(self) -> str:
        parts = [p for p in (self.lossy, self.lossless) if p != "none"]
        return "+".join(parts) or "none"


def parse_compression(spec: str | Compression) -> Compression:
    """Parse "none", "fp16", "int8", "lz4", "zstd" or "<fp16|int8>+<lz4|zstd>"; ValueError otherwise."""
    if isinstance(spec, Compression):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"compression must be a string, got {type(spec).__name__}")
    lossy, plus, lossless = spec.partition("+")
    if not plus:  # a single step, lossy or lossless
        lossy, lossless = (spec, "none") if spec in _LOSSY else ("none", spec)
    if lossy in _LOSSY and lossless in _LOSSLESS and not (plus and "none" in (lossy, lossless)):
        return Compression(cast(Lossy, lossy), cast(Lossless, lossless))
    raise ValueError(
        f"unknown compression {spec[:64]!r}; expected none, fp16, int8, lz4, zstd or e.g. fp16+lz4, int8+zstd"
    )


"""Hard limits for decoding untrusted bytes, and the one error every decoder raises."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["Buffer", "CodecError", "CodecLimits", "DEFAULT_LIMITS", "ErrorKind"]

ErrorKind = Literal["bad_tensor", "too_large", "bad_message"]
Buffer = bytes | bytearray | memoryview


class CodecError(ValueError):
    """Any failure to decode untrusted bytes. ``code`` is one of bad_tensor, too_large, bad_message."""

    def __init__(self, code: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.code: ErrorKind = code
        self.message = message


@dataclass(frozen=True)
class CodecLimits:
    """Hard limits for decoding untrusted input; everything is checked before allocating."""

    max_message_bytes: int = 256 * 2**20  # whole message as received
    max_tensors: int = 64  # tensor entries in one message
    max_tensor_bytes: int = 256 * 2**20  # one decoded tensor, in its final dtype
    max_total_tensor_bytes: int = 512 * 2**20  # all decoded tensors together (bounds decompression bombs)
    max_dims: int = 8  # rank of one tensor
    max_items: int = 100_000  # msgpack objects in one big message (bounds parse time and memory)


DEFAULT_LIMITS = CodecLimits()

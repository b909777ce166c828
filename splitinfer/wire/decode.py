"""Entries -> tensors, for untrusted input, in two steps.

:func:`declare_tensors` checks every entry's header (name, dtype, shape, compression, sizes)
without touching a payload, so a receiver can compare what is *declared* with what it
expects (a worker: the cut's shapes and its per-request caps) before a single byte is
decompressed. :func:`decode_tensors` then builds the tensors; decompression writes into a
buffer of exactly the declared size and stops there, so a 16 KB zstd "bomb" can never make
more than the declared (and already accepted) bytes. :func:`digest_entries` fingerprints
what was sent (header fields and payload bytes) without decoding, for de-duplication.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import dataclass, field
from typing import cast

import lz4.frame
import torch
import zstandard

from splitinfer.wire.formats import DTYPES, FLOAT32_MAX, FP16_SOURCES, MAX_NAME_LEN, Compression, Lossless, parse_compression
from splitinfer.wire.limits import DEFAULT_LIMITS, Buffer, CodecError, CodecLimits
from splitinfer.wire.reader import byte_view

__all__ = ["TensorDecl", "declare_tensors", "decode_declared", "decode_tensors", "digest_entries"]


@dataclass(frozen=True)
class TensorDecl:
    """One tensor entry as declared by its header, checked against the limits, not decoded."""

    name: str
    dtype: str  # wire dtype name of the decoded tensor
    shape: tuple[int, ...]
    nbytes: int  # size of the decoded tensor in its final dtype
    wire_bytes: int  # size of its payload as received
    compression: Compression
    entry: dict[object, object] = field(repr=False)  # the raw entry (scale, zero_point)
    payload: memoryview = field(repr=False)  # as received: a view of the message, not a copy

    @property
    def compressed(self) -> bool:
        return self.compression.lossless != "none"


def decode_tensors(entries: object, limits: CodecLimits = DEFAULT_LIMITS) -> dict[str, torch.Tensor]:
    """Validate and decode tensor entries from untrusted input; raises only :class:`CodecError`.

    Uncompressed payloads are not copied: the tensor is a view of the received buffer and
    keeps it alive. If that buffer is ``bytes`` the tensor is backed by read-only memory
    (torch warns once); writing to it mutates the message buffer, so pass a ``bytearray``
    (or ``.clone()``) if the tensor will be changed in place. Decompressed or dequantized
    tensors own fresh, writable memory.
    """
    return decode_declared(declare_tensors(entries, limits))


def declare_tensors(entries: object, limits: CodecLimits = DEFAULT_LIMITS) -> tuple[TensorDecl, ...]:
    """Check every entry's header against the limits; no payload is decoded. Raises CodecError."""
    if not isinstance(entries, list):
        raise CodecError("bad_message", f"tensors must be a list of entries, got {type(entries).__name__}")
    if len(entries) > limits.max_tensors:
        raise CodecError("too_large", f"{len(entries)} tensors exceed the limit of {limits.max_tensors}")
    out: list[TensorDecl] = []
    names: set[str] = set()
    budget = limits.max_total_tensor_bytes
    for index, entry in enumerate(entries):
        decl = _declare_one(index, entry, limits, budget)
        if decl.name in names:
            raise CodecError("bad_tensor", f"duplicate tensor name {decl.name!r}")
        names.add(decl.name)
        out.append(decl)
        budget -= decl.nbytes
    return tuple(out)


def decode_declared(decls: tuple[TensorDecl, ...]) -> dict[str, torch.Tensor]:
    """Build the tensors of entries that :func:`declare_tensors` accepted."""
    return {d.name: _decode_one(d) for d in decls}


def digest_entries(decls: tuple[TensorDecl, ...]) -> bytes:
    """A 16-byte BLAKE2b fingerprint of what was sent: each entry's header fields and payload.

    Two requests with the same digest carry the same tensors (up to a hash collision), so
    an answer computed for one is the right answer for the other."""
    h = hashlib.blake2b(digest_size=16)
    for d in decls:
        e = d.entry
        header = (d.name, d.dtype, d.shape, str(d.compression), e.get("scale"), e.get("zero_point"))
        h.update(repr(header).encode())
        h.update(d.payload.nbytes.to_bytes(8, "little"))
        h.update(d.payload)
    return h.digest()


def _field(entry: dict[object, object], key: str, kind: type | tuple[type, ...], where: str) -> object:
    if key not in entry:
        raise CodecError("bad_tensor", f"{where}: missing field {key!r}")
    value = entry[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise CodecError("bad_tensor", f"{where}: field {key!r} has the wrong type ({type(value).__name__})")
    return value


def _declare_one(index: int, entry: object, limits: CodecLimits, budget: int) -> TensorDecl:
    where = f"tensor #{index}"
    if not isinstance(entry, dict):
        raise CodecError("bad_tensor", f"{where}: entry must be a map, got {type(entry).__name__}")
    name = cast(str, _field(entry, "name", str, where))
    if not 0 < len(name) <= MAX_NAME_LEN:
        raise CodecError("bad_tensor", f"{where}: name must have 1 to {MAX_NAME_LEN} characters")
    where = f"tensor {name!r}"
    dtype_name = cast(str, _field(entry, "dtype", str, where))
    if dtype_name not in DTYPES:
        raise CodecError("bad_tensor", f"{where}: unknown dtype {dtype_name[:32]!r}")
    dtype = DTYPES[dtype_name]
    try:
        comp = parse_compression(cast(str, _field(entry, "compression", str, where)))
    except ValueError as exc:
        raise CodecError("bad_tensor", f"{where}: {exc}") from None

    shape = cast(list[object], _field(entry, "shape", list, where))
    if len(shape) > limits.max_dims:
        raise CodecError("too_large", f"{where}: {len(shape)} dimensions exceed the limit of {limits.max_dims}")
    numel = 1
    for dim in shape:
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 0:
            raise CodecError("bad_tensor", f"{where}: shape must be a list of non-negative integers")
        if dim > limits.max_tensor_bytes:
            raise CodecError("too_large", f"{where}: dimension {dim} exceeds the tensor size limit")
        numel *= dim
    size = numel * dtype.itemsize  # Python ints: no overflow
    if size > limits.max_tensor_bytes:
        raise CodecError("too_large", f"{where}: {size} bytes exceed the limit of {limits.max_tensor_bytes}")
    if size > budget:
        raise CodecError("too_large", f"{where}: tensors exceed {limits.max_total_tensor_bytes} bytes in total")

    if comp.lossy == "fp16" and dtype not in FP16_SOURCES:
        raise CodecError("bad_tensor", f"{where}: fp16 compression is only used for float32/float64 tensors")
    if comp.lossy == "int8" and not dtype.is_floating_point:
        raise CodecError("bad_tensor", f"{where}: int8 compression is only used for floating-point tensors")
    wire_dtype = _wire_dtype(comp, dtype)
    nbytes = cast(int, _field(entry, "nbytes", int, where))
    if nbytes != numel * wire_dtype.itemsize:
        raise CodecError(
            "bad_tensor", f"{where}: nbytes {nbytes} does not match shape {shape} × {wire_dtype.itemsize} bytes"
        )
    if "pad" in entry and not isinstance(entry["pad"], bytes | bytearray | memoryview):
        raise CodecError("bad_tensor", f"{where}: field 'pad' has the wrong type")
    data = _field(entry, "data", (bytes, bytearray, memoryview), where)
    try:
        payload = byte_view(cast(Buffer, data))
    except (TypeError, ValueError):
        raise CodecError("bad_tensor", f"{where}: payload is not a contiguous buffer") from None
    if comp.lossless == "none" and payload.nbytes != nbytes:
        raise CodecError("bad_tensor", f"{where}: payload has {payload.nbytes} bytes, expected {nbytes}")
    dims = tuple(cast(list[int], shape))
    return TensorDecl(name, dtype_name, dims, size, payload.nbytes, comp, entry, payload)


def _wire_dtype(comp: Compression, dtype: torch.dtype) -> torch.dtype:
    """The element type of the payload: float16 for fp16, uint8 for int8, else the dtype itself."""
    return {"fp16": torch.float16, "int8": torch.uint8}.get(comp.lossy, dtype)


def _decode_one(decl: TensorDecl) -> torch.Tensor:
    where = f"tensor {decl.name!r}"
    entry, comp, dtype = decl.entry, decl.compression, DTYPES[decl.dtype]
    wire_dtype = _wire_dtype(comp, dtype)
    numel = math.prod(decl.shape)
    wire_nbytes = numel * wire_dtype.itemsize
    payload = decl.payload
    if comp.lossless != "none":
        payload = memoryview(_decompress(comp.lossless, payload, wire_nbytes, where))
    try:
        tensor = _from_payload(payload, wire_dtype, numel, list(decl.shape), where)
        if comp.lossy == "fp16":
            tensor = tensor.to(dtype)
        elif comp.lossy == "int8":
            tensor = _dequantize(entry, tensor, dtype, where)
    except CodecError:
        raise
    except (RuntimeError, ValueError, TypeError, OverflowError, MemoryError) as exc:  # a safety net only
        raise CodecError("bad_tensor", f"{where}: cannot build tensor: {str(exc).splitlines()[0]}") from None
    return tensor


def _decompress(kind: Lossless, payload: memoryview, nbytes: int, where: str) -> bytearray:
    """Decompress into exactly ``nbytes`` (already checked against the limits) or fail."""
    try:
        if kind == "lz4":
            dec = lz4.frame.LZ4FrameDecompressor(return_bytearray=True)
            out = dec.decompress(payload, max_length=nbytes)
            complete = dec.eof and not dec.unused_data
        else:
            params = zstandard.get_frame_parameters(payload)
            # zstd trusts a declared content size over max_output_size, so check it first.
            if params.content_size not in (nbytes, zstandard.CONTENTSIZE_UNKNOWN):
                raise CodecError("bad_tensor", f"{where}: zstd frame declares {params.content_size} bytes")
            out = bytearray(nbytes)
            reader = zstandard.ZstdDecompressor().stream_reader(payload)
            got = 0
            while got < nbytes:
                n = reader.readinto(memoryview(out)[got:])
                if n == 0:
                    break
                got += n
            complete = got == nbytes and reader.read(1) == b""
    except CodecError:
        raise
    except Exception as exc:  # lz4/zstd raise assorted types (RuntimeError, ZstdError, ...)
        raise CodecError("bad_tensor", f"{where}: corrupt {kind} data ({str(exc)[:80]})") from None
    if not complete or len(out) != nbytes:
        raise CodecError("bad_tensor", f"{where}: {kind} data does not decompress to {nbytes} bytes")
    return cast(bytearray, out)


def _from_payload(
    payload: memoryview, dtype: torch.dtype, numel: int, shape: list[object], where: str
) -> torch.Tensor:
    dims = cast(list[int], shape)
    if numel == 0:
        return torch.empty(dims, dtype=dtype)  # frombuffer rejects empty buffers
    with warnings.catch_warnings():
        # Decoded tensors are views of the received message on purpose (zero-copy); the
        # message buffer belongs to this request alone, so torch's read-only warning is noise.
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        tensor = torch.frombuffer(payload, dtype=dtype, count=numel)
    if dtype == torch.bool and bool((tensor.view(torch.uint8) > 1).any()):
        raise CodecError("bad_tensor", f"{where}: bool payload holds values other than 0 and 1")
    if tensor.data_ptr() % dtype.itemsize:
        tensor = tensor.clone()  # misaligned (not made by pack()): some kernels assume alignment
    return tensor.reshape(dims)


def _dequantize(entry: dict[object, object], q: torch.Tensor, dtype: torch.dtype, where: str) -> torch.Tensor:
    scale = _field(entry, "scale", (int, float), where)
    zero_point = _field(entry, "zero_point", (int, float), where)
    scale_f, zero_f = float(cast(float, scale)), float(cast(float, zero_point))  # msgpack ints fit a float
    if not (math.isfinite(scale_f) and math.isfinite(zero_f)) or scale_f < 0:
        raise CodecError("bad_tensor", f"{where}: quantization parameters must be finite, scale ≥ 0")
    # float32 arithmetic unless q · scale could overflow it (ranges near float32's limits)
    work = torch.float32 if scale_f * 255 < FLOAT32_MAX else torch.float64
    return q.to(work).mul_(scale_f).add_(zero_f).to(dtype)

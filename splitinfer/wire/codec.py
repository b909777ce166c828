"""Tensors ⇄ bytes: msgpack framing, optional lossy/lossless compression, zero-copy decode.

Wire format of one tensor (a msgpack map, keys in this order)::

    {"name": str, "dtype": str, "shape": [int, ...], "compression": str,
     "nbytes": int,                          # raw payload size before lossless compression
     "scale": float, "zero_point": float,    # only when the lossy part is int8
     "pad": bin, "data": bin}                # pad only aligns data; its content is ignored

``dtype`` is the dtype the receiver gets back. The element type of the payload follows
from the lossy part of ``compression``: float16 for ``fp16``, uint8 for ``int8``, else
``dtype`` itself; ``nbytes`` must equal prod(shape) × that element size.

No pickle anywhere, and every declared length is checked against :class:`CodecLimits`
before anything is allocated. Messages of 256 KiB or more are parsed by a small msgpack
reader (:mod:`splitinfer.wire.reader`) that hands ``bin`` values out as memoryviews of the
received buffer, so their uncompressed tensors are decoded without a copy; smaller ones go through
msgpack's C parser (with its length limits), where a copy costs less than Python parsing.

This module is the codec's front door: it packs and unpacks messages and encodes tensors;
limits live in :mod:`~splitinfer.wire.limits`, names in :mod:`~splitinfer.wire.formats`,
and decoding (declare first, then decode) in :mod:`~splitinfer.wire.decode`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from typing import cast

import lz4.frame
import msgpack
import torch
import zstandard

from splitinfer.wire.decode import TensorDecl, declare_tensors, decode_declared, decode_tensors, digest_entries
from splitinfer.wire.formats import DTYPE_NAMES, FP16_SOURCES, MAX_NAME_LEN, Compression, Lossless, Lossy, parse_compression
from splitinfer.wire.limits import DEFAULT_LIMITS, Buffer, CodecError, CodecLimits
from splitinfer.wire.reader import MAX_DEPTH, InPlaceReader, byte_view, nbytes

log = logging.getLogger(__name__)

__all__ = [
    "CodecError",
    "CodecLimits",
    "Compression",
    "DEFAULT_LIMITS",
    "TensorDecl",
    "declare_tensors",
    "decode_declared",
    "decode_tensors",
    "digest_entries",
    "encode_tensors",
    "encoded_nbytes",
    "pack",
    "parse_compression",
    "unpack",
]

_ALIGN = 64  # payloads start at a multiple of this within a message made by pack()
_BIG_BIN = 1 << 16  # pack() takes its zero-copy path when the bins add up to this much
_IN_PLACE_MIN = 1 << 18  # unpack() parses messages at least this big in place (zero-copy bins)


# --------------------------------------------------------------------------- msgpack framing
#
# Two paths each way, chosen by size, because the copy a 100 MB payload costs dwarfs
# Python overhead while for a 2 KB message Python overhead dwarfs the copy:
# small messages go through msgpack's C code; big ones through the writer/reader below,
# which never copy a payload more than once (pack) or at all (unpack).


def pack(obj: object) -> bytes:
    """msgpack-encode ``obj`` (bytes-like values as msgpack ``bin``), copying payloads once.

    When the bins add up to 64 KiB or more, msgpack.packb would copy them into its growing
    buffer and again into the result; instead their bin headers are written here and the
    output is joined in one pass. In that mode a ``"pad"`` key holding ``b""`` right before
    a ``"data"`` bin (as in tensor entries) is sized so the payload starts 64-byte aligned
    within the message, so the receiver can use it in place.
    """
    if _bin_bytes(obj, 0) < _BIG_BIN:
        return cast(bytes, msgpack.packb(obj, use_bin_type=True))
    writer = _Writer()
    writer.write(obj)
    return writer.finish()


def _bin_bytes(obj: object, depth: int) -> int:
    """Total size of the bytes-like values in ``obj`` (stops descending where msgpack would)."""
    if isinstance(obj, _SCALAR_TYPES):  # the common leaves first: this runs on every pack()
        return 0
    if isinstance(obj, bytes | bytearray | memoryview):
        return nbytes(obj)
    if depth > MAX_DEPTH:
        return 0  # msgpack.packb will refuse it
    if isinstance(obj, dict | Mapping):
        return sum(_bin_bytes(v, depth + 1) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_bin_bytes(v, depth + 1) for v in obj)
    return 0


_SCALAR_TYPES = (str, int, float, type(None))


class _Writer:
    """Writes msgpack as a list of chunks: small pieces packed by msgpack, big bins by reference."""

    def __init__(self) -> None:
        # One Packer per call: Packer instances are not thread-safe.
        self._packer = msgpack.Packer(use_bin_type=True, autoreset=True)
        self._chunks: list[Buffer] = []
        self._small = bytearray()  # consecutive small pieces, flushed before each big buffer
        self._offset = 0  # bytes written so far (for alignment)

    def _emit(self, piece: bytes) -> None:
        self._small += piece
        self._offset += len(piece)

    def write(self, obj: object) -> None:
        if isinstance(obj, dict | Mapping):
            self._emit(self._packer.pack_map_header(len(obj)))
            items = list(obj.items())
            for i, (key, value) in enumerate(items):
                self._emit(self._packer.pack(key))
                if key == "pad" and isinstance(value, bytes) and not value and i + 1 < len(items):
                    self._emit_pad(items[i + 1])
                else:
                    self.write(value)
        elif isinstance(obj, list | tuple):
            self._emit(self._packer.pack_array_header(len(obj)))
            for item in obj:
                self.write(item)
        elif isinstance(obj, bytes | bytearray | memoryview) and nbytes(obj) >= _BIG_BIN:
            view = byte_view(obj)
            self._emit(_bin_header(view.nbytes))
            self._chunks += (self._small, view)
            self._small = bytearray()
            self._offset += view.nbytes
        else:
            self._emit(self._packer.pack(obj))

    def _emit_pad(self, following: tuple[object, object]) -> None:
        key, value = following
        if key != "data" or not isinstance(value, bytes | bytearray | memoryview):
            self._emit(b"\xc4\x00")  # an empty bin: nothing to align
            return
        # After the pad come the packed key "data" and the payload's bin header.
        ahead = len(self._packer.pack(key)) + len(_bin_header(nbytes(value)))
        pad = -(self._offset + 2 + ahead) % _ALIGN
        self._emit(b"\xc4" + bytes([pad]) + bytes(pad))

    def finish(self) -> bytes:
        self._chunks.append(self._small)
        return b"".join(self._chunks)


def _bin_header(n: int) -> bytes:
    if n < 1 << 8:
        return b"\xc4" + n.to_bytes(1, "big")
    if n < 1 << 16:
        return b"\xc5" + n.to_bytes(2, "big")
    if n < 1 << 32:
        return b"\xc6" + n.to_bytes(4, "big")
    raise ValueError(f"bin of {n} bytes is too large for msgpack")


def unpack(data: Buffer, limits: CodecLimits = DEFAULT_LIMITS) -> object:
    """Decode one msgpack object from untrusted bytes; raises only :class:`CodecError`.

    Messages of 256 KiB or more are parsed in place: their ``bin`` values come back as
    memoryviews of ``data`` (zero-copy; writable only if ``data`` is). Smaller ones go
    through msgpack's C parser and bins come back as ``bytes``. Either way: map keys must
    be str (or bytes), ext types other than msgpack's timestamp are rejected, trailing
    bytes are rejected, a repeated map key keeps its last value, and no declared length
    can make the parser allocate more than the message holds.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise CodecError("bad_message", f"expected bytes, got {type(data).__name__}")
    try:
        view = byte_view(data)
    except (TypeError, ValueError) as exc:
        raise CodecError("bad_message", f"unreadable buffer: {exc}") from None
    size = view.nbytes
    if size > limits.max_message_bytes:
        raise CodecError("too_large", f"message of {size} bytes exceeds the limit of {limits.max_message_bytes}")
    if size >= _IN_PLACE_MIN:
        reader = InPlaceReader(view, limits)
        obj = reader.read(0)
        if reader.pos != size:
            raise CodecError("bad_message", f"{size - reader.pos} trailing bytes after the message")
        return obj
    try:
        return msgpack.unpackb(
            view, raw=False, strict_map_key=True, ext_hook=_reject_ext, max_bin_len=size,
            max_str_len=size, max_array_len=size, max_map_len=size // 2, max_ext_len=size,
        )  # fmt: skip
    except Exception as exc:  # msgpack raises ValueError subclasses, UnicodeDecodeError, TypeError
        raise CodecError("bad_message", f"malformed msgpack: {str(exc)[:120] or type(exc).__name__}") from None


def _reject_ext(code: int, data: bytes) -> object:
    raise ValueError(f"msgpack ext type {code} is not accepted")

# --------------------------------------------------------------------------- tensors → entries


def encode_tensors(
    tensors: Mapping[str, torch.Tensor], compression: str | Compression = "none"
) -> list[dict[str, object]]:
    """Turn named tensors into msgpack-able entries (see the module docstring).

    Uncompressed payloads are memoryviews of the tensors' own memory (no copy), so do not
    modify the tensors until the entries are packed. Lossy steps apply only where they make
    sense (fp16 to float32/float64, int8 to floating tensors with finite values); lossless
    steps are dropped for a tensor when they would not shrink it. Each entry's
    ``compression`` says what was actually applied. Raises ValueError/TypeError for tensors
    that cannot be sent.
    """
    comp = parse_compression(compression)
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors must be a mapping of name to tensor, got {type(tensors).__name__}")
    return [_encode_one(name, tensor, comp) for name, tensor in tensors.items()]


def _encode_one(name: str, tensor: torch.Tensor, comp: Compression) -> dict[str, object]:
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_LEN:
        raise ValueError(f"tensor names must be non-empty strings of at most {MAX_NAME_LEN} characters")
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensor {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
    if tensor.dtype not in DTYPE_NAMES or tensor.layout != torch.strided:
        raise ValueError(f"tensor {name!r}: cannot send {tensor.dtype} ({tensor.layout}) tensors")
    t = tensor.detach().cpu().resolve_conj().resolve_neg()
    entry: dict[str, object] = {"name": name, "dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape)}

    lossy: Lossy = "none"
    wire = t
    if comp.lossy == "fp16" and t.dtype in FP16_SOURCES:
        lossy, wire = "fp16", t.to(torch.float16)
    elif comp.lossy == "int8" and t.is_floating_point() and t.numel() > 0:
        quantized = _quantize(t)
        if quantized is None:
            log.debug("tensor %r has non-finite values; sending it without int8 quantization", name)
        else:
            lossy, (wire, scale, zero_point) = "int8", quantized
            entry["scale"], entry["zero_point"] = scale, zero_point

    raw = _tensor_bytes(wire)
    payload: Buffer = raw
    lossless: Lossless = "none"
    if comp.lossless != "none" and raw.nbytes > 0:
        packed = _compress(comp.lossless, raw)
        if len(packed) < raw.nbytes:  # incompressible data (e.g. random floats) goes raw: faster to decode
            payload, lossless = packed, comp.lossless

    entry["compression"] = str(Compression(lossy, lossless))
    entry["nbytes"] = raw.nbytes
    entry["pad"] = b""
    entry["data"] = payload
    return entry


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's memory as a flat byte view (a copy only if it was not contiguous)."""
    flat = t.contiguous().reshape(-1).view(torch.uint8)  # via uint8: numpy has no bfloat16
    return memoryview(flat.numpy())


def _quantize(t: torch.Tensor) -> tuple[torch.Tensor, float, float] | None:
    """Per-tensor affine uint8: q = round((a − min) / (max − min) · 255); None if not finite."""
    x = t.to(torch.float32)
    lo, hi = torch.aminmax(x)
    lo_f, hi_f = float(lo), float(hi)
    if not (math.isfinite(lo_f) and math.isfinite(hi_f)):
        return None
    if hi_f == lo_f:  # constant tensor: every value maps to q = 0, restored as min
        return torch.zeros(t.shape, dtype=torch.uint8), 0.0, lo_f
    if not math.isfinite(float(hi - lo)):  # a range wider than float32 can hold
        x, lo, hi = x.double(), lo.double(), hi.double()
    x = x - lo  # a fresh tensor, so the in-place steps below never touch the caller's data
    q = x.div_(hi - lo).mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)
    return q, (hi_f - lo_f) / 255.0, lo_f


def _compress(kind: Lossless, raw: memoryview) -> bytes:
    if kind == "lz4":
        return cast(bytes, lz4.frame.compress(raw))
    return zstandard.ZstdCompressor(level=3).compress(raw)


def encoded_nbytes(entries: Iterable[Mapping[str, object]]) -> int:
    """Bytes the entries take on the wire: payloads plus their msgpack headers (padding excluded)."""
    total = 0
    for entry in entries:
        header = {k: v for k, v in entry.items() if k not in ("data", "pad")}
        data = entry.get("data", b"")
        size = nbytes(data) if isinstance(data, bytes | bytearray | memoryview) else 0
        total += len(msgpack.packb(header, use_bin_type=True)) + len(_bin_header(size)) + 5 + size
    return total


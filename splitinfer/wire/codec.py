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
reader in this module that hands ``bin`` values out as memoryviews of the received
buffer, so their uncompressed tensors are decoded without a copy; smaller ones go through
msgpack's C parser (with its length limits), where a copy costs less than Python parsing.
"""

from __future__ import annotations

import logging
import math
import struct
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal, cast

import lz4.frame
import msgpack
import torch
import zstandard

log = logging.getLogger(__name__)

__all__ = [
    "CodecError",
    "CodecLimits",
    "Compression",
    "DEFAULT_LIMITS",
    "decode_tensors",
    "encode_tensors",
    "encoded_nbytes",
    "pack",
    "parse_compression",
    "unpack",
]

ErrorKind = Literal["bad_tensor", "too_large", "bad_message"]
Lossy = Literal["none", "fp16", "int8"]
Lossless = Literal["none", "lz4", "zstd"]
Buffer = bytes | bytearray | memoryview

_LOSSY: tuple[str, ...] = ("none", "fp16", "int8")
_LOSSLESS: tuple[str, ...] = ("none", "lz4", "zstd")

# Wire names of the dtypes we carry. float64 is not on the hot path but costs nothing to allow.
_DTYPES: dict[str, torch.dtype] = {
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
_DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in _DTYPES.items()}
_FP16_SOURCES = (torch.float32, torch.float64)  # float16/bfloat16 are already 2 bytes wide
_FLOAT32_MAX = torch.finfo(torch.float32).max

_MAX_NAME_LEN = 256
_ALIGN = 64  # payloads start at a multiple of this within a message made by pack()
_BIG_BIN = 1 << 16  # pack() takes its zero-copy path when the bins add up to this much
_IN_PLACE_MIN = 1 << 18  # unpack() parses messages at least this big in place (zero-copy bins)
_MAX_DEPTH = 256  # nesting the in-place parser accepts (it recurses; msgpack's C parser stops near 1024)


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


# --------------------------------------------------------------------------- compression names


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
        return _nbytes(obj)
    if depth > _MAX_DEPTH:
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
        elif isinstance(obj, bytes | bytearray | memoryview) and _nbytes(obj) >= _BIG_BIN:
            view = _byte_view(obj)
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
        ahead = len(self._packer.pack(key)) + len(_bin_header(_nbytes(value)))
        pad = -(self._offset + 2 + ahead) % _ALIGN
        self._emit(b"\xc4" + bytes([pad]) + bytes(pad))

    def finish(self) -> bytes:
        self._chunks.append(self._small)
        return b"".join(self._chunks)


def _nbytes(buf: Buffer) -> int:
    return buf.nbytes if isinstance(buf, memoryview) else len(buf)


def _byte_view(buf: Buffer) -> memoryview:
    """A flat, contiguous byte view of ``buf``; ValueError if it is not contiguous."""
    view = memoryview(buf)
    if not view.c_contiguous:
        raise ValueError("buffer is not contiguous")
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


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
        view = _byte_view(data)
    except (TypeError, ValueError) as exc:
        raise CodecError("bad_message", f"unreadable buffer: {exc}") from None
    size = view.nbytes
    if size > limits.max_message_bytes:
        raise CodecError("too_large", f"message of {size} bytes exceeds the limit of {limits.max_message_bytes}")
    if size >= _IN_PLACE_MIN:
        reader = _Reader(view, limits)
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


_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_SCALARS: dict[int, struct.Struct] = {
    0xCA: struct.Struct(">f"), 0xCB: struct.Struct(">d"), 0xCD: _U16, 0xCE: _U32, 0xCF: struct.Struct(">Q"),
    0xD0: struct.Struct(">b"), 0xD1: struct.Struct(">h"), 0xD2: struct.Struct(">i"), 0xD3: struct.Struct(">q"),
}  # fmt: skip
_LENGTHS: dict[int, struct.Struct] = {0xC5: _U16, 0xC6: _U32, 0xC8: _U16, 0xC9: _U32, 0xDA: _U16, 0xDB: _U32, 0xDC: _U16,
                                      0xDD: _U32, 0xDE: _U16, 0xDF: _U32}  # fmt: skip
_FIXEXT = {0xD4: 1, 0xD5: 2, 0xD6: 4, 0xD7: 8, 0xD8: 16}


class _Reader:
    """In-place msgpack reader for untrusted input: every length is checked against what is left."""

    def __init__(self, view: memoryview, limits: CodecLimits) -> None:
        self.buf = view
        self.pos = 0
        self.end = view.nbytes
        self.items = 0
        self.max_items = limits.max_items

    def _take(self, n: int) -> int:
        """Reserve n bytes at the cursor and return their start."""
        start = self.pos
        if n > self.end - start:
            raise CodecError("bad_message", f"truncated message: needs {n} bytes at offset {start}")
        self.pos = start + n
        return start

    def _length(self, b: int) -> int:
        fmt = _LENGTHS.get(b)
        if fmt is None:  # the 8-bit forms: bin8, str8, ext8
            return self.buf[self._take(1)]
        return cast(int, fmt.unpack_from(self.buf, self._take(fmt.size))[0])

    def read(self, depth: int) -> object:
        self.items += 1
        if self.items > self.max_items:
            raise CodecError("too_large", f"message has more than {self.max_items} msgpack objects")
        b = self.buf[self._take(1)]
        if b <= 0x7F:
            return b
        if b >= 0xE0:
            return b - 0x100
        if 0xA0 <= b <= 0xBF or b in (0xD9, 0xDA, 0xDB):
            return self._str(b & 0x1F if b <= 0xBF else self._length(b))
        if 0x90 <= b <= 0x9F or b in (0xDC, 0xDD):
            n = b & 0x0F if b <= 0x9F else self._length(b)
            self._check_container(n, 1, depth)
            return [self.read(depth + 1) for _ in range(n)]
        if 0x80 <= b <= 0x8F or b in (0xDE, 0xDF):
            n = b & 0x0F if b <= 0x8F else self._length(b)
            self._check_container(n, 2, depth)
            return self._map(n, depth + 1)
        if b in (0xC4, 0xC5, 0xC6):
            n = self._length(b)
            start = self._take(n)
            return self.buf[start : start + n]
        if b == 0xC0:
            return None
        if b in (0xC2, 0xC3):
            return b == 0xC3
        if b == 0xCC:
            return self.buf[self._take(1)]
        if b in _SCALARS:
            fmt = _SCALARS[b]
            return fmt.unpack_from(self.buf, self._take(fmt.size))[0]
        if b in (0xC7, 0xC8, 0xC9) or b in _FIXEXT:
            return self._ext(_FIXEXT[b] if b in _FIXEXT else self._length(b))
        raise CodecError("bad_message", f"invalid msgpack byte 0xc1 at offset {self.pos - 1}")

    def _str(self, n: int) -> str:
        start = self._take(n)
        try:
            return str(self.buf[start : start + n], "utf-8")
        except UnicodeDecodeError:
            raise CodecError("bad_message", f"invalid UTF-8 in string at offset {start}") from None

    def _ext(self, n: int) -> msgpack.Timestamp:
        code = struct.unpack_from(">b", self.buf, self._take(1))[0]
        start = self._take(n)
        if code != -1:  # only the timestamp, which msgpack's own parser always decodes
            raise CodecError("bad_message", f"msgpack ext type {code} is not accepted")
        try:
            return msgpack.Timestamp.from_bytes(bytes(self.buf[start : start + n]))
        except ValueError:
            raise CodecError("bad_message", f"malformed msgpack timestamp at offset {start}") from None

    def _check_container(self, n: int, min_bytes_per_item: int, depth: int) -> None:
        if depth >= _MAX_DEPTH:
            raise CodecError("bad_message", f"message nests deeper than {_MAX_DEPTH} levels")
        if n * min_bytes_per_item > self.end - self.pos:
            raise CodecError("bad_message", f"truncated message: container of {n} items at offset {self.pos}")

    def _map(self, n: int, depth: int) -> dict[object, object]:
        out: dict[object, object] = {}
        for _ in range(n):
            key = self.read(depth)
            if isinstance(key, memoryview):
                key = bytes(key)  # as msgpack's strict_map_key allows
            elif not isinstance(key, str):
                raise CodecError("bad_message", f"map keys must be strings, got {type(key).__name__}")
            out[key] = self.read(depth)
        return out


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
    if not isinstance(name, str) or not 0 < len(name) <= _MAX_NAME_LEN:
        raise ValueError(f"tensor names must be non-empty strings of at most {_MAX_NAME_LEN} characters")
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensor {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
    if tensor.dtype not in _DTYPE_NAMES or tensor.layout != torch.strided:
        raise ValueError(f"tensor {name!r}: cannot send {tensor.dtype} ({tensor.layout}) tensors")
    t = tensor.detach().cpu().resolve_conj().resolve_neg()
    entry: dict[str, object] = {"name": name, "dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape)}

    lossy: Lossy = "none"
    wire = t
    if comp.lossy == "fp16" and t.dtype in _FP16_SOURCES:
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
        size = _nbytes(data) if isinstance(data, bytes | bytearray | memoryview) else 0
        total += len(msgpack.packb(header, use_bin_type=True)) + len(_bin_header(size)) + 5 + size
    return total


# --------------------------------------------------------------------------- entries → tensors


def decode_tensors(entries: object, limits: CodecLimits = DEFAULT_LIMITS) -> dict[str, torch.Tensor]:
    """Validate and decode tensor entries from untrusted input; raises only :class:`CodecError`.

    Uncompressed payloads are not copied: the tensor is a view of the received buffer and
    keeps it alive. If that buffer is ``bytes`` the tensor is backed by read-only memory
    (torch warns once); writing to it mutates the message buffer, so pass a ``bytearray``
    (or ``.clone()``) if the tensor will be changed in place. Decompressed or dequantized
    tensors own fresh, writable memory.
    """
    if not isinstance(entries, list):
        raise CodecError("bad_message", f"tensors must be a list of entries, got {type(entries).__name__}")
    if len(entries) > limits.max_tensors:
        raise CodecError("too_large", f"{len(entries)} tensors exceed the limit of {limits.max_tensors}")
    out: dict[str, torch.Tensor] = {}
    budget = limits.max_total_tensor_bytes
    for index, entry in enumerate(entries):
        name, tensor, size = _decode_one(index, entry, limits, budget)
        if name in out:
            raise CodecError("bad_tensor", f"duplicate tensor name {name!r}")
        out[name] = tensor
        budget -= size
    return out


def _field(entry: dict[object, object], key: str, kind: type | tuple[type, ...], where: str) -> object:
    if key not in entry:
        raise CodecError("bad_tensor", f"{where}: missing field {key!r}")
    value = entry[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise CodecError("bad_tensor", f"{where}: field {key!r} has the wrong type ({type(value).__name__})")
    return value


def _decode_one(
    index: int, entry: object, limits: CodecLimits, budget: int
) -> tuple[str, torch.Tensor, int]:
    where = f"tensor #{index}"
    if not isinstance(entry, dict):
        raise CodecError("bad_tensor", f"{where}: entry must be a map, got {type(entry).__name__}")
    name = cast(str, _field(entry, "name", str, where))
    if not 0 < len(name) <= _MAX_NAME_LEN:
        raise CodecError("bad_tensor", f"{where}: name must have 1 to {_MAX_NAME_LEN} characters")
    where = f"tensor {name!r}"
    dtype_name = cast(str, _field(entry, "dtype", str, where))
    if dtype_name not in _DTYPES:
        raise CodecError("bad_tensor", f"{where}: unknown dtype {dtype_name[:32]!r}")
    dtype = _DTYPES[dtype_name]
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

    if comp.lossy == "fp16" and dtype not in _FP16_SOURCES:
        raise CodecError("bad_tensor", f"{where}: fp16 compression is only used for float32/float64 tensors")
    if comp.lossy == "int8" and not dtype.is_floating_point:
        raise CodecError("bad_tensor", f"{where}: int8 compression is only used for floating-point tensors")
    wire_dtype = {"fp16": torch.float16, "int8": torch.uint8}.get(comp.lossy, dtype)
    nbytes = cast(int, _field(entry, "nbytes", int, where))
    if nbytes != numel * wire_dtype.itemsize:
        raise CodecError(
            "bad_tensor", f"{where}: nbytes {nbytes} does not match shape {shape} × {wire_dtype.itemsize} bytes"
        )
    if "pad" in entry and not isinstance(entry["pad"], bytes | bytearray | memoryview):
        raise CodecError("bad_tensor", f"{where}: field 'pad' has the wrong type")
    data = _field(entry, "data", (bytes, bytearray, memoryview), where)
    try:
        payload = _byte_view(cast(Buffer, data))
    except (TypeError, ValueError):
        raise CodecError("bad_tensor", f"{where}: payload is not a contiguous buffer") from None

    if comp.lossless == "none":
        if payload.nbytes != nbytes:
            raise CodecError("bad_tensor", f"{where}: payload has {payload.nbytes} bytes, expected {nbytes}")
    else:
        payload = memoryview(_decompress(comp.lossless, payload, nbytes, where))

    try:
        tensor = _from_payload(payload, wire_dtype, numel, shape, where)
        if comp.lossy == "fp16":
            tensor = tensor.to(dtype)
        elif comp.lossy == "int8":
            tensor = _dequantize(entry, tensor, dtype, where)
    except CodecError:
        raise
    except (RuntimeError, ValueError, TypeError, OverflowError, MemoryError) as exc:  # a safety net only
        raise CodecError("bad_tensor", f"{where}: cannot build tensor: {str(exc).splitlines()[0]}") from None
    return name, tensor, size


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
    work = torch.float32 if scale_f * 255 < _FLOAT32_MAX else torch.float64
    return q.to(work).mul_(scale_f).add_(zero_f).to(dtype)

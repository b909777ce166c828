"""An in-place msgpack reader for big untrusted messages: ``bin`` values come out as
memoryviews of the received buffer (zero-copy), every declared length is checked against
what is left, and the object count and nesting depth are bounded."""

from __future__ import annotations

import struct
from typing import cast

import msgpack

from splitinfer.wire.limits import Buffer, CodecError, CodecLimits

__all__ = ["MAX_DEPTH", "InPlaceReader", "byte_view", "nbytes"]

MAX_DEPTH = 256  # nesting accepted (the reader recurses; msgpack's C parser stops near 1024)


def nbytes(buf: Buffer) -> int:
    return buf.nbytes if isinstance(buf, memoryview) else len(buf)


def byte_view(buf: Buffer) -> memoryview:
    """A flat, contiguous byte view of ``buf``; ValueError if it is not contiguous."""
    view = memoryview(buf)
    if not view.c_contiguous:
        raise ValueError("buffer is not contiguous")
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_SCALARS: dict[int, struct.Struct] = {
    0xCA: struct.Struct(">f"), 0xCB: struct.Struct(">d"), 0xCD: _U16, 0xCE: _U32, 0xCF: struct.Struct(">Q"),
    0xD0: struct.Struct(">b"), 0xD1: struct.Struct(">h"), 0xD2: struct.Struct(">i"), 0xD3: struct.Struct(">q"),
}  # fmt: skip
_LENGTHS: dict[int, struct.Struct] = {0xC5: _U16, 0xC6: _U32, 0xC8: _U16, 0xC9: _U32, 0xDA: _U16, 0xDB: _U32, 0xDC: _U16,
                                      0xDD: _U32, 0xDE: _U16, 0xDF: _U32}  # fmt: skip
_FIXEXT = {0xD4: 1, 0xD5: 2, 0xD6: 4, 0xD7: 8, 0xD8: 16}


class InPlaceReader:
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
        if depth >= MAX_DEPTH:
            raise CodecError("bad_message", f"message nests deeper than {MAX_DEPTH} levels")
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


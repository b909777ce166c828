"""Versioned wire messages between edge and cloud: request, result, error.

Every message is one msgpack map with ``"v"`` (the protocol version) and ``"type"``;
tensors travel as codec entries (see :mod:`splitinfer.wire.codec`). Decoding untrusted bytes
raises only :class:`ProtocolError`, whose ``code`` maps to an HTTP status in
:data:`HTTP_STATUS` and whose ``request_id`` is set whenever the id could be read, so a
server can always answer with an :class:`ErrorMessage` for the right request.
Unknown extra keys are ignored, so a peer may add optional fields without a version bump.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from splitinfer.errors import HTTP_STATUS, ErrorCode
from splitinfer.wire.codec import (
    DEFAULT_LIMITS,
    CodecError,
    CodecLimits,
    Compression,
    TensorDecl,
    declare_tensors,
    decode_declared,
    decode_tensors,
    digest_entries,
    encode_tensors,
    pack,
    parse_compression,
    unpack,
)

__all__ = [
    "HTTP_STATUS",
    "PROTOCOL_VERSION",
    "SUPPORTED_VERSIONS",
    "ErrorCode",
    "ErrorMessage",
    "InferRequest",
    "InferResult",
    "Message",
    "PendingRequest",
    "ProtocolError",
    "decode_message",
    "check_version",
    "parse_message",
    "text_field",
    "encode_message",
    "read_request",
]

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS: tuple[int, ...] = (1,)
_MAX_ID_LEN = 256  # ids, model ids, hashes and cut ids are short strings
_MAX_TEXT_LEN = 4096  # error messages


# ErrorCode and HTTP_STATUS live in splitinfer.errors (one vocabulary); re-exported here
# because they are part of the protocol's surface.


class ProtocolError(ValueError):
    """A message could not be decoded or was rejected; carries the code and the request id if known."""

    def __init__(self, code: ErrorCode, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id

    def to_message(self) -> ErrorMessage:
        """The error reply for this failure."""
        return ErrorMessage(id=self.request_id, code=self.code, message=self.message)


@dataclass(frozen=True, eq=False)  # eq=False: comparing dicts of tensors has no single truth value
class InferRequest:
    """Edge → cloud: run the tail after cut ``cut_id`` of model ``model_id`` on ``tensors``."""

    TYPE: ClassVar[str] = "infer_request"

    id: str
    model_id: str
    model_hash: str  # hash of the model's weights, so both sides are sure they run the same model
    cut_id: str
    tensors: dict[str, torch.Tensor]
    deadline_ms: float | None = None  # budget relative to receipt; None means no deadline
    compression: str = "none"  # how `tensors` are encoded; the worker may answer in kind

    def __post_init__(self) -> None:
        parse_compression(self.compression)  # fail early, on the sending side, for a typo

    def to_dict(self, compression: str | Compression | None = None) -> dict[str, object]:
        comp = self.compression if compression is None else compression
        return {
            "v": PROTOCOL_VERSION,
            "type": self.TYPE,
            "id": self.id,
            "model_id": self.model_id,
            "model_hash": self.model_hash,
            "cut_id": self.cut_id,
            "deadline_ms": self.deadline_ms,
            "compression": str(parse_compression(comp)),
            "tensors": encode_tensors(self.tensors, comp),
        }

    @classmethod
    def from_dict(cls, d: dict[object, object], limits: CodecLimits = DEFAULT_LIMITS) -> InferRequest:
        return PendingRequest.from_dict(d, limits).decode()


@dataclass(frozen=True, eq=False)
class PendingRequest:
    """An infer_request whose fields are checked and whose tensors are declared, not decoded.

    A worker compares ``declared`` (names, dtypes, shapes, sizes) with what the cut expects
    before calling :meth:`decode`, so no payload is decompressed for a request it would
    refuse, and :meth:`digest` fingerprints the tensors as sent, without decoding them."""

    id: str
    model_id: str
    model_hash: str
    cut_id: str
    deadline_ms: float | None
    compression: str
    declared: tuple[TensorDecl, ...]

    @property
    def decoded_bytes(self) -> int:
        """Memory the decoded tensors will take."""
        return sum(t.nbytes for t in self.declared)

    @property
    def wire_bytes(self) -> int:
        return sum(t.wire_bytes for t in self.declared)

    @property
    def compressed(self) -> bool:
        return any(t.compressed for t in self.declared)

    def digest(self) -> bytes:
        """A fingerprint of the tensors as sent (see :func:`splitinfer.wire.codec.digest_entries`)."""
        return digest_entries(self.declared)

    def decode(self) -> InferRequest:
        """Decompress and build the tensors; raises ProtocolError (with this request's id)."""
        try:
            tensors = decode_declared(self.declared)
        except CodecError as exc:
            raise ProtocolError(ErrorCode(exc.code), exc.message, self.id) from None
        return InferRequest(self.id, self.model_id, self.model_hash, self.cut_id, tensors, self.deadline_ms,
                            self.compression)  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict[object, object], limits: CodecLimits = DEFAULT_LIMITS) -> PendingRequest:
        _check_header(d, InferRequest.TYPE)
        compression = text_field(d, "compression")
        try:
            parse_compression(compression)
        except ValueError as exc:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, str(exc)) from None
        deadline = d.get("deadline_ms")
        if deadline is not None:
            deadline = _number(d, "deadline_ms")
        ids = (text_field(d, "id"), text_field(d, "model_id"), text_field(d, "model_hash"), text_field(d, "cut_id"))
        if "tensors" not in d:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "message has no 'tensors'")
        try:
            declared = declare_tensors(d["tensors"], limits)
        except CodecError as exc:
            raise ProtocolError(ErrorCode(exc.code), exc.message) from None
        return cls(*ids, deadline_ms=deadline, compression=compression, declared=declared)


@dataclass(frozen=True, eq=False)
class InferResult:
    """Cloud → edge: the tail's outputs and where the time went on the worker."""

    TYPE: ClassVar[str] = "infer_result"

    id: str
    outputs: dict[str, torch.Tensor]
    queue_ms: float = 0.0  # waiting in the batcher
    compute_ms: float = 0.0  # running the tail (for the whole batch)
    batch_size: int = 1  # requests in the batch this one ran in

    def to_dict(self, compression: str | Compression | None = None) -> dict[str, object]:
        comp = "none" if compression is None else compression
        return {
            "v": PROTOCOL_VERSION,
            "type": self.TYPE,
            "id": self.id,
            "queue_ms": self.queue_ms,
            "compute_ms": self.compute_ms,
            "batch_size": self.batch_size,
            "outputs": encode_tensors(self.outputs, comp),
        }

    @classmethod
    def from_dict(cls, d: dict[object, object], limits: CodecLimits = DEFAULT_LIMITS) -> InferResult:
        _check_header(d, cls.TYPE)
        batch_size = d.get("batch_size")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "field 'batch_size' must be a positive integer")
        return cls(
            id=text_field(d, "id"),
            queue_ms=_number(d, "queue_ms"),
            compute_ms=_number(d, "compute_ms"),
            batch_size=batch_size,
            outputs=_tensors(d, "outputs", limits),
        )


@dataclass(frozen=True)
class ErrorMessage:
    """Either direction: a request failed. ``id`` is None when the request id was unreadable."""

    TYPE: ClassVar[str] = "error"

    id: str | None
    code: ErrorCode
    message: str  # one line for a human

    def __post_init__(self) -> None:
        object.__setattr__(self, "code", ErrorCode(self.code))  # accept the plain string too

    @property
    def http_status(self) -> int:
        return HTTP_STATUS[self.code]

    def to_dict(self, compression: str | Compression | None = None) -> dict[str, object]:
        return {"v": PROTOCOL_VERSION, "type": self.TYPE, "id": self.id, "code": self.code.value,
                "message": self.message}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict[object, object], limits: CodecLimits = DEFAULT_LIMITS) -> ErrorMessage:
        _check_header(d, cls.TYPE)
        request_id = d.get("id")
        if request_id is not None:
            request_id = text_field(d, "id")
        code = text_field(d, "code")
        try:
            error_code = ErrorCode(code)
        except ValueError:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"unknown error code {code[:64]!r}") from None
        return cls(id=request_id, code=error_code, message=text_field(d, "message", _MAX_TEXT_LEN))


Message = InferRequest | InferResult | ErrorMessage
_TYPES: dict[str, type[InferRequest] | type[InferResult] | type[ErrorMessage]] = {
    InferRequest.TYPE: InferRequest,
    InferResult.TYPE: InferResult,
    ErrorMessage.TYPE: ErrorMessage,
}


def encode_message(msg: Message, compression: str | Compression | None = None) -> bytes:
    """Serialize a message. ``compression`` overrides a request's own setting (results default to none)."""
    return pack(msg.to_dict(compression))


def decode_message(data: bytes | bytearray | memoryview, limits: CodecLimits = DEFAULT_LIMITS) -> Message:
    """Parse and validate untrusted bytes; raises only :class:`ProtocolError`.

    Uncompressed tensors are views of ``data`` (see :func:`splitinfer.wire.codec.decode_tensors`).
    """
    return parse_message(data, limits, _TYPES)


def read_request(data: bytes | bytearray | memoryview, limits: CodecLimits = DEFAULT_LIMITS) -> PendingRequest:
    """Parse an infer_request up to its tensor headers (no payload decoded); raises only ProtocolError.

    Any other message type is refused as ``bad_message``. Call :meth:`PendingRequest.decode`
    once the declared tensors are acceptable."""
    return parse_message(data, limits, {InferRequest.TYPE: PendingRequest}, _TYPES, "expected an infer_request")


def parse_message(data: bytes | bytearray | memoryview, limits: CodecLimits, types: dict,
                  known: dict | None = None, expected: str = "") -> Any:  # fmt: skip
    """Unpack a message and build it with ``types[its type].from_dict``; raises only ProtocolError,
    carrying the message's id when it is readable. A type outside ``known`` (default: ``types``)
    is unknown; one in ``known`` but not in ``types`` is refused with ``expected``."""
    known = types if known is None else known
    try:
        d = unpack(data, limits)
    except CodecError as exc:
        raise ProtocolError(ErrorCode(exc.code), exc.message) from None
    if not isinstance(d, dict):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"message must be a map, got {type(d).__name__}")
    request_id = d.get("id")
    request_id = request_id if isinstance(request_id, str) and len(request_id) <= _MAX_ID_LEN else None
    try:
        check_version(d)
        kind = d.get("type")
        if not isinstance(kind, str) or kind not in known:
            raise ProtocolError(
                ErrorCode.BAD_MESSAGE, f"unknown message type {str(kind)[:64]!r}; expected {', '.join(known)}"
            )
        if kind not in types:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, expected)
        return types[kind].from_dict(d, limits)
    except ProtocolError as exc:
        exc.request_id = request_id
        raise
    except CodecError as exc:
        raise ProtocolError(ErrorCode(exc.code), exc.message, request_id) from None


# --------------------------------------------------------------------------- field validation


def check_version(d: dict[object, object]) -> None:
    """Refuse a message without an integer ``v`` or with a version this peer does not speak."""
    version = d.get("v")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "message has no integer protocol version 'v'")
    if version not in SUPPORTED_VERSIONS:
        supported = ", ".join(map(str, SUPPORTED_VERSIONS))
        raise ProtocolError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"protocol version {version} is not supported; this peer speaks version {supported}",
        )


def _check_header(d: dict[object, object], kind: str) -> None:
    if not isinstance(d, dict):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "message must be a map")
    check_version(d)
    if d.get("type") != kind:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"message type is not {kind!r}")


def text_field(d: dict[object, object], key: str, max_len: int = _MAX_ID_LEN) -> str:
    """Field ``key`` of a message: a string of at most ``max_len`` characters (else bad_message)."""
    value = d.get(key)
    if not isinstance(value, str):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"field {key!r} must be a string")
    if len(value) > max_len:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"field {key!r} is longer than {max_len} characters")
    return value


def _number(d: dict[object, object], key: str) -> float:
    """A finite, non-negative number (milliseconds)."""
    value = d.get(key)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"field {key!r} must be a number")
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"field {key!r} must be finite and non-negative")
    return number


def _tensors(d: dict[object, object], key: str, limits: CodecLimits) -> dict[str, torch.Tensor]:
    if key not in d:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"message has no {key!r}")
    try:
        return decode_tensors(d[key], limits)
    except CodecError as exc:
        raise ProtocolError(ErrorCode(exc.code), exc.message) from None


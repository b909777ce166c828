"""Session messages of the generative-LM protocol: open/opened, step/result, close/closed.

Same rules as :mod:`splitinfer.wire.protocol`: one msgpack map with ``"v"`` (the protocol
version) and ``"type"``; every request carries the client's ``"id"``, echoed back; bounded
sizes, no pickle; decoding untrusted bytes raises only :class:`ProtocolError`, with the
request id whenever it could be read. Unknown extra keys are ignored.

- ``session_open`` {id, model, weights?, cut, temperature, seed} -> ``session_opened``
  {id, session, model, cut, n_layers, max_ctx, d_model (+ weights, max_step_tokens,
  max_verify)}.
- ``session_step`` {id, session, position, tokens (cut == 0) | hidden (cut > 0), verify,
  q?} -> ``session_result`` {id, session, tokens, accepted, length, server_ms}.
- ``session_close`` {id, session} -> ``session_closed`` {id, session}.

``hidden`` and ``q`` are single codec tensor entries (a map as made by
:func:`splitinfer.wire.codec.encode_tensors`, named "hidden"/"q"): ``hidden`` (1, T, D)
float32/float16, ``q`` (k, 256) float16/float32 probabilities. Both are checked finite
here (a NaN is ``bad_tensor``). :func:`read_message` parses a request the worker receives
(an ``infer_request`` comes back as a :class:`~splitinfer.wire.protocol.PendingRequest`);
:func:`decode_session_reply` parses what the edge receives (a reply or an error).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

import torch

from splitinfer.errors import ErrorCode
from splitinfer.wire.codec import DEFAULT_LIMITS, CodecError, CodecLimits, declare_tensors, decode_declared, encode_tensors, pack
from splitinfer.wire.protocol import (
    PROTOCOL_VERSION,
    ErrorMessage,
    InferRequest,
    PendingRequest,
    ProtocolError,
    parse_message,
    text_field,
)

__all__ = [
    "MAX_HIDDEN_BYTES",
    "MAX_STEP_TOKENS",
    "MAX_VERIFY",
    "SESSION_REQUESTS",
    "SessionClose",
    "SessionClosed",
    "SessionOpen",
    "SessionOpened",
    "SessionRequest",
    "SessionReply",
    "SessionResult",
    "SessionStep",
    "decode_session_reply",
    "encode_session",
    "read_message",
]

MAX_STEP_TOKENS = 4096  # new positions in one step (prefill); a worker also bounds it by its model's max_ctx
MAX_VERIFY = 64  # draft tokens in one verify step (a worker may allow fewer)
MAX_D_MODEL = 8192  # width of a hidden state on the wire
MAX_HIDDEN_BYTES = 16 * 2**20  # one decoded `hidden` (bounds what a small compressed message can expand to)
_MAX_SEED = 2**63 - 1
_MAX_TEMPERATURE = 1000.0
VOCAB = 256
_HIDDEN_DTYPES = ("float32", "float16")


def _header(kind: str, request_id: str) -> dict[str, object]:
    return {"v": PROTOCOL_VERSION, "type": kind, "id": request_id}


@dataclass(frozen=True)
class SessionOpen:
    """Edge -> cloud: open a session on ``model`` that runs blocks [cut, n)."""

    TYPE: ClassVar[str] = "session_open"
    id: str
    model: str
    cut: int = 0
    temperature: float = 0.0
    seed: int = 0
    weights: str | None = None  # the weights hash the edge expects; None: whatever the worker has

    def to_dict(self) -> dict[str, object]:
        d = _header(self.TYPE, self.id)
        d.update(model=self.model, cut=self.cut, temperature=self.temperature, seed=self.seed)
        if self.weights is not None:
            d["weights"] = self.weights
        return d

    @classmethod
    def from_dict(cls, d: dict[object, object], limits: CodecLimits = DEFAULT_LIMITS) -> SessionOpen:
        weights = d.get("weights")
        return cls(
            id=text_field(d, "id"),
            model=text_field(d, "model"),
            cut=_int(d, "cut", 0, 1 << 16, default=0),
            temperature=_float(d, "temperature", _MAX_TEMPERATURE, default=0.0),
            seed=_int(d, "seed", 0, _MAX_SEED, default=0),
            weights=None if weights is None else text_field(d, "weights"),
        )


@dataclass(frozen=True)
class SessionOpened:
    """Cloud -> edge: the session is open; ``session`` is its unguessable id."""

    TYPE: ClassVar[str] = "session_opened"
    id: str
    session: str
    model: str
    cut: int
    n_layers: int
    max_ctx: int
    d_model: int
    weights: str = ""
    max_step_tokens: int = MAX_STEP_TOKENS
    max_verify: int = MAX_VERIFY

    def to_dict(self) -> dict[str, object]:
        d = _header(self.TYPE, self.id)
        d.update(session=self.session, model=self.model, cut=self.cut, n_layers=self.n_layers, max_ctx=self.max_ctx,
                 d_model=self.d_model, weights=self.weights, max_step_tokens=self.max_step_tokens,
                 max_verify=self.max_verify)  # fmt: skip
        return d

    @classmethod
    def from_dict(cls, d: dict[object, object], limits: CodecLimits = DEFAULT_LIMITS) -> SessionOpened:
        big = 1 << 31
        return cls(
            id=text_field(d, "id"), session=text_field(d, "session"), model=text_field(d, "model"),
            cut=_int(d, "cut", 0, big), n_layers=_int(d, "n_layers", 1, big), max_ctx=_int(d, "max_ctx", 1, big),
            d_model=_int(d, "d_model", 1, big), weights=text_field(d, "weights") if "weights" in d else "",
            max_step_tokens=_int(d, "max_step_tokens", 1, big, default=MAX_STEP_TOKENS),
            max_verify=_int(d, "max_verify", 0, big, default=MAX_VERIFY),
        )  # fmt: skip


@dataclass(frozen=True, eq=False)
class SessionStep:
    """Edge -> cloud: run new positions (prefill, decode or verify-k) on the session's cache.

    ``position`` is the cloud cache length the edge believes (a mismatch is ``session_lost``).
    Exactly one of ``tokens`` (cut == 0) and ``hidden`` (cut > 0; (1, T, D)) is given.
    ``verify = k > 0``: the last k of the T positions are draft tokens to verify; ``q``
    (k, 256) the draft's probabilities there (sampled verify only)."""

    TYPE: ClassVar[str] = "session_step"
    id: str
    session: str
    position: int
    tokens: list[int] | None = None
    hidden: torch.Tensor | None = None
    verify: int = 0
    q: torch.Tensor | None = None
    compression: str = field(default="none", compare=False)  # how `hidden` is encoded when sent

    @property
    def n_new(self) -> int:
        """New positions this step runs."""
        if self.hidden is not None:
            return int(self.hidden.shape[1])
        return len(self.tokens or [])

    def to_dict(self) -> dict[str, object]:
        d = _header(self.TYPE, self.id)
        d.update(session=self.session, position=self.position, verify=self.verify)
        if self.tokens is not None:
            d["tokens"] = [int(t) for t in self.tokens]
        if self.hidden is not None:
            d["hidden"] = encode_tensors({"hidden": self.hidden}, self.compression)[0]
        if self.q is not None:
            d["q"] = encode_tensors({"q": self.q.to(torch.float16)})[0]
        return d

    @classmethod
    def from_dict(cls, d: dict[object, object], limits: CodecLimits = DEFAULT_LIMITS) -> SessionStep:
        verify = _int(d, "verify", 0, MAX_VERIFY, default=0)
        has_tokens, has_hidden = d.get("tokens") is not None, d.get("hidden") is not None
        if has_tokens == has_hidden:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "a session_step carries exactly one of 'tokens' and 'hidden'")
        tokens = _tokens(d["tokens"]) if has_tokens else None
        hidden = _hidden(d["hidden"], limits) if has_hidden else None
        n_new = len(tokens) if tokens is not None else int(hidden.shape[1])  # type: ignore[union-attr]
        if n_new < 1:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "a session_step needs at least one new position")
        if verify >= n_new:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"verify={verify} needs at least {verify + 1} new positions")
        if d.get("q") is not None and verify == 0:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "'q' is only sent with a verify step")
        q = _q(d["q"], verify, limits) if d.get("q") is not None else None
        return cls(id=text_field(d, "id"), session=text_field(d, "session"), position=_int(d, "position", 0, 1 << 31),
                   tokens=tokens, hidden=hidden, verify=verify, q=q)  # fmt: skip


@dataclass(frozen=True)
class SessionResult:
    """Cloud -> edge: the step's tokens and the cache length after it (rolled back on reject)."""

    TYPE: ClassVar[str] = "session_result"
    id: str
    session: str
    tokens: list[int]
    length: int
    accepted: int | None = None  # verify steps only: draft tokens accepted
    server_ms: float = 0.0
    batch_size: int = 1  # sessions in the batch this step ran in

    def to_dict(self) -> dict[str, object]:
        d = _header(self.TYPE, self.id)
        d.update(session=self.session, tokens=list(self.tokens), accepted=self.accepted, length=self.length,
                 server_ms=self.server_ms, batch_size=self.batch_size)  # fmt: skip
        return d

    @classmethod
    def from_dict(cls, d: dict[object, object], limits: CodecLimits = DEFAULT_LIMITS) -> SessionResult:
        accepted = d.get("accepted")
        return cls(
            id=text_field(d, "id"), session=text_field(d, "session"), tokens=_tokens(d.get("tokens")),
            length=_int(d, "length", 0, 1 << 31),
            accepted=None if accepted is None else _int(d, "accepted", 0, MAX_VERIFY),
            server_ms=_float(d, "server_ms", math.inf, default=0.0),
            batch_size=_int(d, "batch_size", 1, 1 << 20, default=1),
        )  # fmt: skip


@dataclass(frozen=True)
class _SessionRef:
    """A message that names only a session: close and its acknowledgement share one shape."""

    TYPE: ClassVar[str]
    id: str
    session: str

    def to_dict(self) -> dict[str, object]:
        d = _header(self.TYPE, self.id)
        d["session"] = self.session
        return d

    @classmethod
    def from_dict(cls, d: dict[object, object], limits: CodecLimits = DEFAULT_LIMITS) -> Self:
        return cls(id=text_field(d, "id"), session=text_field(d, "session"))


@dataclass(frozen=True)
class SessionClose(_SessionRef):
    """Edge -> cloud: free the session's caches."""

    TYPE: ClassVar[str] = "session_close"


@dataclass(frozen=True)
class SessionClosed(_SessionRef):
    """Cloud -> edge: the session is gone."""

    TYPE: ClassVar[str] = "session_closed"


SessionRequest = SessionOpen | SessionStep | SessionClose
SessionReply = SessionOpened | SessionResult | SessionClosed
SESSION_REQUESTS: dict[str, Any] = {c.TYPE: c for c in (SessionOpen, SessionStep, SessionClose)}
_REPLIES: dict[str, Any] = {c.TYPE: c for c in (SessionOpened, SessionResult, SessionClosed, ErrorMessage)}


def encode_session(msg: SessionRequest | SessionReply | ErrorMessage) -> bytes:
    """Serialize a session message (or an error reply)."""
    return pack(msg.to_dict())


def read_message(
    data: bytes | bytearray | memoryview, limits: CodecLimits = DEFAULT_LIMITS
) -> PendingRequest | SessionOpen | SessionStep | SessionClose:
    """Parse a request a worker received: an infer_request (tensors declared, not decoded)
    or a session request. Raises only :class:`ProtocolError` (with the id when readable)."""
    types: dict[str, Any] = {InferRequest.TYPE: PendingRequest, **SESSION_REQUESTS}
    return parse_message(data, limits, types)


def decode_session_reply(
    data: bytes | bytearray | memoryview, limits: CodecLimits = DEFAULT_LIMITS
) -> SessionOpened | SessionResult | SessionClosed | ErrorMessage:
    """Parse what the edge received for a session request; raises only ProtocolError."""
    return parse_message(data, limits, _REPLIES)


# --------------------------------------------------------------------------- field validation


_MISSING = object()


def _int(d: dict[object, object], key: str, lo: int, hi: int, default: object = _MISSING) -> int:
    value = d.get(key, default)
    if value is None and default is not _MISSING:
        value = default
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"field {key!r} must be an integer")
    if not lo <= value <= hi:
        code = ErrorCode.TOO_LARGE if value > hi else ErrorCode.BAD_MESSAGE
        raise ProtocolError(code, f"field {key!r} = {value} is outside [{lo}, {hi}]")
    return value


def _float(d: dict[object, object], key: str, hi: float, default: float) -> float:
    value = d.get(key, default)
    if value is None:
        value = default
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"field {key!r} must be a number")
    number = float(value)
    if not math.isfinite(number) or not 0 <= number <= hi:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"field {key!r} must be finite and in [0, {hi}]")
    return number


def _tokens(value: object) -> list[int]:
    if not isinstance(value, list):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "field 'tokens' must be a list of integers")
    if len(value) > MAX_STEP_TOKENS:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"{len(value)} tokens exceed the limit of {MAX_STEP_TOKENS}")
    for t in value:
        if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < VOCAB:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"tokens must be integers in [0, {VOCAB})")
    return list(value)


def _one_tensor(value: object, name: str, limits: CodecLimits) -> tuple[Any, ...]:
    """Declare a single codec entry (no payload decoded yet)."""
    if not isinstance(value, dict):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"field {name!r} must be one codec tensor entry (a map)")
    try:
        decls = declare_tensors([value], limits)
    except CodecError as exc:
        raise ProtocolError(ErrorCode(exc.code), exc.message) from None
    return decls


def _decode_finite(decls: tuple[Any, ...], name: str) -> torch.Tensor:
    try:
        t = next(iter(decode_declared(decls).values()))
    except CodecError as exc:
        raise ProtocolError(ErrorCode(exc.code), exc.message) from None
    if not bool(torch.isfinite(t).all()):
        raise ProtocolError(ErrorCode.BAD_TENSOR, f"{name!r} has non-finite values")
    return t


def _hidden(value: object, limits: CodecLimits) -> torch.Tensor:
    decls = _one_tensor(value, "hidden", limits)
    decl = decls[0]
    if decl.dtype not in _HIDDEN_DTYPES:
        raise ProtocolError(ErrorCode.BAD_TENSOR, f"'hidden' must be float32 or float16, not {decl.dtype}")
    if len(decl.shape) != 3 or decl.shape[0] != 1:
        raise ProtocolError(ErrorCode.BAD_TENSOR, f"'hidden' must have shape (1, T, d_model), not {list(decl.shape)}")
    if decl.shape[1] > MAX_STEP_TOKENS:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"{decl.shape[1]} positions exceed the limit of {MAX_STEP_TOKENS}")
    if decl.shape[2] > MAX_D_MODEL:
        raise ProtocolError(ErrorCode.BAD_TENSOR, f"'hidden' is {decl.shape[2]} wide, more than {MAX_D_MODEL}")
    if decl.nbytes > MAX_HIDDEN_BYTES:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"'hidden' of {decl.nbytes} bytes exceeds {MAX_HIDDEN_BYTES}")
    return _decode_finite(decls, "hidden").float()


def _q(value: object, verify: int, limits: CodecLimits) -> torch.Tensor:
    decls = _one_tensor(value, "q", limits)
    decl = decls[0]
    if decl.dtype not in _HIDDEN_DTYPES:
        raise ProtocolError(ErrorCode.BAD_TENSOR, f"'q' must be float16 or float32, not {decl.dtype}")
    if tuple(decl.shape) != (verify, VOCAB):
        raise ProtocolError(ErrorCode.BAD_TENSOR, f"'q' must have shape ({verify}, {VOCAB}), not {list(decl.shape)}")
    q = _decode_finite(decls, "q").float()
    if bool((q < 0).any()):
        raise ProtocolError(ErrorCode.BAD_TENSOR, "'q' has negative probabilities")
    return q

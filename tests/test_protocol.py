"""Wire protocol: message round trips, versioning, error codes, and fuzzing of untrusted input."""

from __future__ import annotations

import math
from unittest import mock

import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from splitinfer.wire import codec
from splitinfer.wire.codec import CodecError, CodecLimits
from splitinfer.wire.protocol import (
    HTTP_STATUS,
    PROTOCOL_VERSION,
    ErrorCode,
    ErrorMessage,
    InferRequest,
    InferResult,
    ProtocolError,
    decode_message,
    encode_message,
)

pytestmark = pytest.mark.filterwarnings("ignore:The given buffer is not writable")


def request(tensors: dict[str, torch.Tensor] | None = None, **kwargs: object) -> InferRequest:
    fields: dict[str, object] = dict(id="req-1", model_id="resnet18", model_hash="ab12", cut_id="layer2",
                                     deadline_ms=150.0, compression="none")  # fmt: skip
    fields.update(kwargs)
    return InferRequest(tensors=tensors if tensors is not None else {"x": torch.randn(2, 8, 4, 4)}, **fields)  # type: ignore[arg-type]


def expect(code: ErrorCode, data: bytes, limits: CodecLimits = CodecLimits()) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode_message(data, limits)
    assert info.value.code == code, info.value
    assert "\n" not in info.value.message
    return info.value


def doctored(msg: InferRequest | InferResult | ErrorMessage, **changes: object) -> bytes:
    d = msg.to_dict()
    for key, value in changes.items():
        if value is ...:
            del d[key]
        else:
            d[key] = value
    return msgpack.packb(d)


@pytest.mark.parametrize("compression", ["none", "fp16", "int8+lz4", "zstd"])
def test_request_round_trip(compression):
    msg = request({"x": torch.randn(2, 3), "mask": torch.ones(4, dtype=torch.bool)}, compression=compression)
    out = decode_message(encode_message(msg))
    assert isinstance(out, InferRequest)
    assert (out.id, out.model_id, out.model_hash, out.cut_id) == ("req-1", "resnet18", "ab12", "layer2")
    assert out.deadline_ms == 150.0 and out.compression == compression
    assert torch.equal(out.tensors["mask"], msg.tensors["mask"])
    assert torch.allclose(out.tensors["x"], msg.tensors["x"], atol=0.05)


def test_request_without_deadline_and_compression_override():
    msg = request(deadline_ms=None)
    out = decode_message(encode_message(msg, compression="fp16"))
    assert isinstance(out, InferRequest)
    assert out.deadline_ms is None and out.compression == "fp16"
    with pytest.raises(ValueError):
        request(compression="gzip")


def test_result_round_trip():
    msg = InferResult(id="req-1", outputs={"logits": torch.randn(2, 10)}, queue_ms=1.5, compute_ms=7, batch_size=4)
    out = decode_message(encode_message(msg, compression="lz4"))
    assert isinstance(out, InferResult)
    assert (out.id, out.queue_ms, out.compute_ms, out.batch_size) == ("req-1", 1.5, 7.0, 4)
    assert torch.equal(out.outputs["logits"], msg.outputs["logits"])


@pytest.mark.parametrize("request_id", ["req-9", None])
def test_error_round_trip(request_id):
    out = decode_message(encode_message(ErrorMessage(request_id, ErrorCode.OVERLOADED, "queue is full")))
    assert out == ErrorMessage(request_id, ErrorCode.OVERLOADED, "queue is full")
    assert isinstance(out, ErrorMessage) and out.http_status == 503
    assert ErrorMessage("a", "unknown_model", "m").code is ErrorCode.UNKNOWN_MODEL  # type: ignore[arg-type]


def test_every_message_carries_version_and_type():
    msgs = [request(), InferResult("r", {}), ErrorMessage(None, ErrorCode.INTERNAL, "boom")]
    for msg, kind in zip(msgs, ["infer_request", "infer_result", "error"], strict=True):
        d = msgpack.unpackb(encode_message(msg))
        assert d["v"] == PROTOCOL_VERSION and d["type"] == kind


def test_http_status_for_every_code():
    assert set(HTTP_STATUS) == set(ErrorCode)
    assert HTTP_STATUS[ErrorCode.BAD_MESSAGE] == 400
    assert HTTP_STATUS[ErrorCode.TOO_LARGE] == 413
    assert HTTP_STATUS[ErrorCode.UNKNOWN_MODEL] == 404
    assert HTTP_STATUS[ErrorCode.MODEL_MISMATCH] == 409
    assert HTTP_STATUS[ErrorCode.BAD_TENSOR] == 422
    assert HTTP_STATUS[ErrorCode.OVERLOADED] == 503
    assert HTTP_STATUS[ErrorCode.DEADLINE_EXCEEDED] == 504
    assert HTTP_STATUS[ErrorCode.UNAUTHORIZED] == 401
    assert HTTP_STATUS[ErrorCode.INTERNAL] == 500
    assert all(code.http_status == HTTP_STATUS[code] for code in ErrorCode)
    assert ErrorCode("bad_tensor") is ErrorCode.BAD_TENSOR and str(ErrorCode.BAD_TENSOR) == "bad_tensor"


@pytest.mark.parametrize("version", [0, 2, 99])
def test_version_mismatch(version):
    err = expect(ErrorCode.UNSUPPORTED_VERSION, doctored(request(), v=version))
    assert "version 1" in err.message and str(version) in err.message
    assert err.request_id == "req-1"
    reply = err.to_message()
    assert (reply.id, reply.code) == ("req-1", ErrorCode.UNSUPPORTED_VERSION)


@pytest.mark.parametrize("version", [..., "1", 1.0, True, None])
def test_missing_or_non_integer_version(version):
    expect(ErrorCode.BAD_MESSAGE, doctored(request(), v=version))


def test_unknown_or_missing_type():
    expect(ErrorCode.BAD_MESSAGE, doctored(request(), type="infer_batch"))
    expect(ErrorCode.BAD_MESSAGE, doctored(request(), type=...))
    expect(ErrorCode.BAD_MESSAGE, msgpack.packb([1, 2, 3]))
    expect(ErrorCode.BAD_MESSAGE, b"\xc1")
    expect(ErrorCode.BAD_MESSAGE, b"")


@pytest.mark.parametrize(
    "changes",
    [
        {"id": ...}, {"id": 5}, {"id": "x" * 1000}, {"model_id": None}, {"model_hash": b"ab"},
        {"cut_id": ...}, {"deadline_ms": "soon"}, {"deadline_ms": math.nan}, {"deadline_ms": -1.0},
        {"deadline_ms": math.inf}, {"compression": "gzip"}, {"compression": ...}, {"tensors": ...},
        {"tensors": {"x": 1}},
    ],
)  # fmt: skip
def test_bad_request_fields(changes):
    expect(ErrorCode.BAD_MESSAGE, doctored(request(), **changes))


@pytest.mark.parametrize(
    "changes",
    [{"batch_size": 0}, {"batch_size": True}, {"batch_size": 1.5}, {"queue_ms": -1}, {"compute_ms": None},
     {"outputs": ...}],
)  # fmt: skip
def test_bad_result_fields(changes):
    expect(ErrorCode.BAD_MESSAGE, doctored(InferResult("r", {"y": torch.ones(2)}), **changes))


@pytest.mark.parametrize("changes", [{"code": "teapot"}, {"code": 7}, {"message": ...}, {"id": 3}])
def test_bad_error_fields(changes):
    expect(ErrorCode.BAD_MESSAGE, doctored(ErrorMessage("r", ErrorCode.INTERNAL, "x"), **changes))


def test_bad_tensor_keeps_the_request_id():
    d = request().to_dict()
    d["tensors"][0]["shape"] = [1, 2, 3]  # type: ignore[index]
    err = expect(ErrorCode.BAD_TENSOR, msgpack.packb(d))
    assert err.request_id == "req-1" and "tensor 'x'" in err.message


def test_too_large_message_and_tensor():
    data = encode_message(request({"x": torch.zeros(1000)}))
    expect(ErrorCode.TOO_LARGE, data, CodecLimits(max_message_bytes=1000))
    err = expect(ErrorCode.TOO_LARGE, data, CodecLimits(max_tensor_bytes=3999))
    assert err.request_id == "req-1"
    expect(ErrorCode.TOO_LARGE, data, CodecLimits(max_tensors=0))


def test_big_request_decodes_in_place():
    t = torch.randn(200_000)
    data = bytearray(encode_message(request({"x": t})))
    out = decode_message(data)
    assert isinstance(out, InferRequest) and torch.equal(out.tensors["x"], t)
    out.tensors["x"][0] = 42.0  # writable because the buffer is
    assert decode_message(data).tensors["x"][0] == 42.0  # type: ignore[union-attr]


# --------------------------------------------------------------------------- fuzzing

msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=10)
    | st.binary(max_size=32),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=15,
)  # fmt: skip

TOP_KEYS = ["v", "type", "id", "model_id", "model_hash", "cut_id", "deadline_ms", "compression", "tensors",
            "outputs", "queue_ms", "compute_ms", "batch_size", "code", "message"]  # fmt: skip
ENTRY_KEYS = ["name", "dtype", "shape", "nbytes", "compression", "data", "scale", "zero_point", "pad"]


def valid_dicts() -> list[dict[str, object]]:
    t = {"x": torch.linspace(-1, 1, 12).reshape(3, 4)}
    return [
        request(t, compression="int8+zstd").to_dict(),
        request(t).to_dict(),
        InferResult("r", t, 1.0, 2.0, 3).to_dict("fp16+lz4"),
        ErrorMessage("r", ErrorCode.BAD_TENSOR, "nope").to_dict(),
    ]


def decode_only_protocol_errors(data: bytes) -> None:
    for in_place in (False, True):  # through msgpack's parser and through the in-place one
        with mock.patch.object(codec, "_IN_PLACE_MIN", 0 if in_place else 1 << 30):
            try:
                decode_message(data, CodecLimits(max_items=2000))
            except ProtocolError as exc:
                assert isinstance(exc.code, ErrorCode) and exc.message
            except CodecError as exc:  # allowed by the contract, though decode_message wraps these
                pytest.fail(f"unwrapped CodecError {exc}")


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_bytes(data):
    decode_only_protocol_errors(data)


@settings(max_examples=400, deadline=None)
@given(
    st.integers(0, 3),
    st.lists(
        st.tuples(st.booleans(), st.booleans(), st.sampled_from(TOP_KEYS + ENTRY_KEYS + ["extra"]), msgpack_values),
        min_size=1, max_size=4,
    ),
)  # fmt: skip
def test_mutated_valid_messages(which, mutations):
    d = valid_dicts()[which]
    for in_entry, delete, key, value in mutations:
        entries = d.get("tensors", d.get("outputs"))
        target = entries[0] if in_entry and isinstance(entries, list) and entries else d
        if isinstance(target, dict):
            if delete:
                target.pop(key, None)
            else:
                target[key] = value
    try:
        data = msgpack.packb(d, use_bin_type=True)
    except (ValueError, TypeError, OverflowError):
        return
    decode_only_protocol_errors(data)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 3), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4),
       st.integers(0, 10**6))  # fmt: skip
def test_corrupted_and_truncated_bytes(which, flips, cut):
    data = bytearray(msgpack.packb(valid_dicts()[which], use_bin_type=True))
    for position, byte in flips:
        data[position % len(data)] = byte
    decode_only_protocol_errors(bytes(data))
    decode_only_protocol_errors(bytes(data[: cut % len(data)]))

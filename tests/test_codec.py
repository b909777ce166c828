"""Tensor codec: round trips, lossy error bounds, limits, zero-copy decode, and fuzzing."""

from __future__ import annotations

import math
import tracemalloc
from unittest import mock

import lz4.frame
import msgpack
import numpy as np
import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splitinfer.wire import codec
from splitinfer.wire.codec import (
    CodecError,
    CodecLimits,
    Compression,
    decode_tensors,
    encode_tensors,
    encoded_nbytes,
    pack,
    parse_compression,
    unpack,
)

pytestmark = pytest.mark.filterwarnings("ignore:The given buffer is not writable")

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8,
          torch.int32, torch.int64, torch.bool]  # fmt: skip
SHAPES = [(), (0,), (2, 0, 3), (7,), (3, 4), (2, 3, 4, 5)]
BIG = 1 << 19  # bytes: big enough for the in-place (zero-copy) parsing path


def sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 10).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=g, dtype=torch.int64).to(dtype)


def round_trip(tensors: dict[str, torch.Tensor], compression: str = "none", **limits: int) -> dict[str, torch.Tensor]:
    data = pack({"tensors": encode_tensors(tensors, compression)})
    lim = CodecLimits(**limits)
    return decode_tensors(unpack(data, lim)["tensors"], lim)  # type: ignore[index]


def entry_for(t: torch.Tensor, compression: str = "none", name: str = "x") -> dict[str, object]:
    return encode_tensors({name: t}, compression)[0]


def decode_entry(entry: dict[str, object], **limits: int) -> dict[str, torch.Tensor]:
    """Send a (possibly doctored) entry through real msgpack bytes, then decode it."""
    lim = CodecLimits(**limits)
    return decode_tensors(unpack(msgpack.packb([entry]), lim), lim)


def expect(code: str, fn, *args, **kwargs) -> CodecError:
    with pytest.raises(CodecError) as info:
        fn(*args, **kwargs)
    assert info.value.code == code, info.value
    assert "\n" not in str(info.value)
    return info.value


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("compression", ["none", "lz4", "zstd"])
def test_lossless_round_trip_every_dtype_and_shape(dtype, shape, compression):
    t = sample(dtype, shape)
    out = round_trip({"x": t}, compression)["x"]
    assert out.dtype == dtype and out.shape == t.shape
    assert torch.equal(out, t)


@pytest.mark.parametrize("compression", ["none", "lz4", "zstd"])
def test_big_round_trip_through_in_place_parser(compression):
    tensors = {"a": torch.randn(BIG // 4), "b": torch.zeros(300, 500, dtype=torch.int64), "c": torch.ones(3, 3)}
    out = round_trip(tensors, compression)
    assert list(out) == ["a", "b", "c"]
    for name, t in tensors.items():
        assert torch.equal(out[name], t)


def test_non_contiguous_grad_and_sliced_tensors_are_sent_as_values():
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors = {"t": base.t(), "slice": base[1:3, ::2], "grad": torch.ones(3, requires_grad=True)}
    out = round_trip(tensors)
    for name, t in tensors.items():
        assert torch.equal(out[name], t.detach())


def test_encode_rejects_what_it_cannot_send():
    with pytest.raises(ValueError):
        encode_tensors({"x": torch.zeros(2, dtype=torch.complex64)})
    with pytest.raises(TypeError):
        encode_tensors({"x": np.zeros(2)})  # type: ignore[dict-item]
    with pytest.raises(ValueError):
        encode_tensors({"": torch.zeros(2)})
    with pytest.raises(ValueError):
        encode_tensors({"x": torch.zeros(2)}, "gzip")


def test_fp16_error_bound_and_restored_dtype():
    t = torch.randn(10_000) * 100
    entry = entry_for(t, "fp16")
    assert entry["compression"] == "fp16" and entry["nbytes"] == 2 * t.numel()
    out = decode_entry(entry)["x"]
    assert out.dtype == torch.float32
    assert torch.all((out - t).abs() <= t.abs() * 2**-11 + 1e-7)


def test_fp16_leaves_non_float32_tensors_alone():
    for t in (torch.arange(5), torch.randn(5).half(), torch.randn(5).bfloat16()):
        entry = entry_for(t, "fp16")
        assert entry["compression"] == "none"
        assert torch.equal(decode_entry(entry)["x"], t)


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e4])
def test_int8_error_bound(scale):
    t = torch.randn(20_000) * scale + scale
    entry = entry_for(t, "int8")
    assert entry["compression"] == "int8" and entry["nbytes"] == t.numel()
    out = decode_entry(entry)["x"]
    assert out.dtype == torch.float32 and out.shape == t.shape
    lo, hi = float(t.min()), float(t.max())
    bound = (hi - lo) / 255 / 2 + 1e-5 * (hi - lo) + 1e-6 * max(abs(lo), abs(hi))
    assert float((out - t).abs().max()) <= bound


def test_int8_constant_tensor_and_other_float_dtypes():
    out = round_trip({"c": torch.full((4, 4), 3.25)}, "int8")["c"]
    assert torch.equal(out, torch.full((4, 4), 3.25))
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        t = torch.linspace(-1, 1, 101).to(dtype)
        out = round_trip({"x": t}, "int8")["x"]
        assert out.dtype == dtype
        assert float((out.double() - t.double()).abs().max()) <= 2 / 255 / 2 + 1e-2


def test_int8_with_non_finite_values_falls_back_to_lossless():
    t = torch.tensor([1.0, float("nan"), float("inf"), -2.0])
    entry = entry_for(t, "int8")
    assert entry["compression"] == "none"
    out = decode_entry(entry)["x"]
    assert torch.equal(out.isnan(), t.isnan()) and out[2] == math.inf and out[3] == -2.0


def test_int8_leaves_integer_tensors_alone():
    t = torch.arange(10)
    assert entry_for(t, "int8+lz4")["compression"] in ("none", "lz4")
    assert torch.equal(round_trip({"x": t}, "int8+lz4")["x"], t)


def test_lossless_is_skipped_when_it_does_not_shrink():
    random = entry_for(torch.randn(10_000), "lz4")
    assert random["compression"] == "none"
    zeros = entry_for(torch.zeros(10_000), "zstd")
    assert zeros["compression"] == "zstd"
    assert len(zeros["data"]) < zeros["nbytes"]  # type: ignore[arg-type]


@pytest.mark.parametrize("compression", ["fp16+lz4", "fp16+zstd", "int8+lz4", "int8+zstd"])
def test_lossy_plus_lossless(compression):
    t = torch.linspace(0, 1, 500).repeat(100, 1)
    entry = entry_for(t, compression)
    assert entry["compression"] == compression
    out = decode_entry(entry)["x"]
    assert out.shape == t.shape and out.dtype == torch.float32
    assert float((out - t).abs().max()) <= 1 / 255 / 2 + 1e-5


def test_parse_compression():
    assert parse_compression("none") == Compression()
    assert parse_compression("fp16") == Compression("fp16", "none")
    assert parse_compression("zstd") == Compression("none", "zstd")
    assert parse_compression("int8+lz4") == Compression("int8", "lz4")
    assert str(Compression("fp16", "zstd")) == "fp16+zstd" and str(Compression()) == "none"
    for bad in ["", "gzip", "fp16+int8", "lz4+fp16", "none+lz4", "FP16", "int8+lz4+zstd", "fp16+"]:
        with pytest.raises(ValueError):
            parse_compression(bad)
    with pytest.raises(ValueError):
        Compression("int4", "none")  # type: ignore[arg-type]


def test_encoded_nbytes_counts_payload_and_headers():
    entries = encode_tensors({"a": torch.randn(1000), "b": torch.zeros(1000)}, "lz4")
    wire = len(pack(entries))
    assert 4000 < encoded_nbytes(entries) <= wire + 16
    assert encoded_nbytes(encode_tensors({"a": torch.randn(1000)}, "fp16")) < 2100


# --------------------------------------------------------------------------- zero copy and packing


def buffer_address(data: bytes | bytearray) -> int:
    return np.frombuffer(data, dtype=np.uint8).ctypes.data


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.uint8])
def test_decode_is_zero_copy_and_aligned(dtype):
    t = sample(dtype, (BIG // dtype.itemsize,))
    data = pack({"tensors": encode_tensors({"x": t, "y": torch.ones(3, dtype=dtype)})})
    out = decode_tensors(unpack(data)["tensors"])  # type: ignore[index]
    base = buffer_address(data)
    for name in ("x", "y"):
        offset = out[name].data_ptr() - base
        assert 0 <= offset < len(data), name
        assert offset % 64 == 0, name  # pack() pads payloads to 64-byte alignment
    assert torch.equal(out["x"], t)


def test_decode_from_bytearray_gives_writable_views():
    data = bytearray(pack({"tensors": encode_tensors({"x": torch.zeros(BIG // 4)})}))
    out = decode_tensors(unpack(data)["tensors"])["x"]  # type: ignore[index]
    out[0] = 1.0
    assert np.shares_memory(out.numpy(), np.frombuffer(data, dtype=np.uint8))


@pytest.mark.parametrize("shift", range(8))
def test_misaligned_payload_is_still_decoded_correctly(shift):
    t = torch.arange(BIG // 8, dtype=torch.int64)
    entry = entry_for(t)
    del entry["pad"]
    data = bytes(shift) + msgpack.packb({"id": "z", "tensors": [entry]})  # no padding, any offset
    out = decode_tensors(unpack(memoryview(data)[shift:])["tensors"])["x"]  # type: ignore[index]
    assert out.data_ptr() % 8 == 0  # copied where the view would have been misaligned
    assert torch.equal(out, t)


def test_pack_is_plain_msgpack_both_ways():
    small = {"a": [1, -2, 3.5, None, True, "é"], "b": b"xyz", "c": {"d": []}}
    assert msgpack.unpackb(pack(small)) == small
    t = torch.randn(BIG // 4)
    big = {"id": "q", "tensors": encode_tensors({"x": t})}
    via_msgpack = msgpack.unpackb(pack(big))
    assert np.array_equal(np.frombuffer(via_msgpack["tensors"][0]["data"], np.float32), t.numpy())
    ours = unpack(msgpack.packb(big))
    assert torch.equal(decode_tensors(ours["tensors"])["x"], t)  # type: ignore[index]


def test_pack_copies_a_big_payload_only_once():
    t = torch.randn(5_000_000)  # 20 MB
    entries = encode_tensors({"x": t})
    tracemalloc.start()
    try:
        data = pack({"tensors": entries})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(data) > 20_000_000
    assert peak < 20_000_000 * 1.05 + 100_000  # the output, and no second copy


# --------------------------------------------------------------------------- limits


def test_message_size_limit():
    data = pack({"tensors": encode_tensors({"x": torch.zeros(1000)})})
    expect("too_large", unpack, data, CodecLimits(max_message_bytes=len(data) - 1))
    unpack(data, CodecLimits(max_message_bytes=len(data)))


def test_tensor_count_limit():
    entries = msgpack.unpackb(pack(encode_tensors({f"t{i}": torch.zeros(1) for i in range(5)})))
    expect("too_large", decode_tensors, entries, CodecLimits(max_tensors=4))
    assert len(decode_tensors(entries, CodecLimits(max_tensors=5))) == 5


def test_tensor_size_limits_apply_to_the_decoded_dtype():
    expect("too_large", decode_entry, entry_for(torch.zeros(100)), max_tensor_bytes=399)
    decode_entry(entry_for(torch.zeros(100)), max_tensor_bytes=400)
    # 100 bytes on the wire as int8, 400 once dequantized to float32
    expect("too_large", decode_entry, entry_for(torch.randn(100), "int8"), max_tensor_bytes=399)


def test_total_size_limit():
    entries = msgpack.unpackb(pack(encode_tensors({"a": torch.zeros(100), "b": torch.zeros(100)})))
    expect("too_large", decode_tensors, entries, CodecLimits(max_total_tensor_bytes=799))
    decode_tensors(entries, CodecLimits(max_total_tensor_bytes=800))


def test_dims_limit():
    entry = entry_for(torch.zeros([1] * 5))
    expect("too_large", decode_entry, entry, max_dims=4)
    decode_entry(entry, max_dims=5)


def test_huge_dimension_is_rejected_before_allocating():
    entry = entry_for(torch.zeros(0, 3))
    entry["shape"] = [0, 2**62]
    expect("too_large", decode_entry, entry)
    entry["shape"] = [2**32, 2**32]
    expect("too_large", decode_entry, entry)
    entry["shape"] = [2**16] * 4  # each dimension fine, the product not
    expect("too_large", decode_entry, entry)


def test_object_count_limit_in_place_parser():
    data = pack({"pad": b"\x00" * BIG, "list": list(range(2000))})
    expect("too_large", unpack, data, CodecLimits(max_items=1000))
    assert len(unpack(data, CodecLimits(max_items=3000))["list"]) == 2000  # type: ignore[index]


# --------------------------------------------------------------------------- malformed input


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("shape", [3, 4]),  # 12 elements but the payload holds 10
        ("shape", [-10]),
        ("shape", "10"),
        ("shape", [10.0]),
        ("shape", [True, 10]),  # would hold 10 elements if bools counted as ints
        ("nbytes", 41),
        ("nbytes", True),
        ("nbytes", "40"),
        ("dtype", "complex64"),
        ("dtype", 7),
        ("compression", "gzip"),
        ("compression", "int8"),  # int8 needs scale/zero_point and a 10-byte payload
        ("name", ""),
        ("name", 3),
        ("name", "x" * 300),
        ("data", "not bytes"),
        ("pad", 5),
    ],
)
def test_bad_header_fields_are_rejected(field, value):
    entry = entry_for(torch.zeros(10))
    entry[field] = value
    err = expect("bad_tensor", decode_entry, entry)
    assert str(err)


@pytest.mark.parametrize("field", ["name", "dtype", "shape", "nbytes", "compression", "data"])
def test_missing_fields_are_rejected(field):
    entry = entry_for(torch.zeros(10))
    del entry[field]
    expect("bad_tensor", decode_entry, entry)


def test_payload_length_must_match_nbytes():
    entry = entry_for(torch.zeros(10))
    entry["data"] = bytes(39)
    expect("bad_tensor", decode_entry, entry)


def test_lossy_kinds_must_fit_the_dtype():
    entry = entry_for(torch.arange(4, dtype=torch.int32))
    entry["compression"] = "fp16"
    expect("bad_tensor", decode_entry, entry)
    entry["compression"] = "int8"
    expect("bad_tensor", decode_entry, entry)


@pytest.mark.parametrize("params", [{"scale": math.nan}, {"scale": -1.0}, {"zero_point": math.inf},
                                    {"scale": "1"}, {"scale": None}])  # fmt: skip
def test_bad_quantization_parameters(params):
    entry = entry_for(torch.randn(10), "int8")
    entry.update(params)
    expect("bad_tensor", decode_entry, entry)


def test_bool_payload_must_be_zero_or_one():
    entry = entry_for(torch.tensor([True, False, True]))
    entry["data"] = b"\x01\x02\x00"
    expect("bad_tensor", decode_entry, entry)


def test_duplicate_tensor_names_are_rejected():
    entry = entry_for(torch.zeros(2))
    expect("bad_tensor", decode_tensors, [entry, entry])


def test_entries_must_be_a_list_of_maps():
    expect("bad_message", decode_tensors, {"x": 1})
    expect("bad_message", decode_tensors, None)
    expect("bad_tensor", decode_tensors, [1])


@pytest.mark.parametrize("kind", ["lz4", "zstd"])
def test_decompression_bombs_and_corrupt_streams(kind):
    t = torch.zeros(1000)
    entry = entry_for(t, kind)
    assert entry["compression"] == kind
    bomb = bytes(4000 * 1000)
    if kind == "lz4":
        entry["data"] = lz4.frame.compress(bomb)
    else:
        entry["data"] = zstandard.ZstdCompressor().compress(bomb)  # declares 4 MB in its header
    expect("bad_tensor", decode_entry, entry)
    if kind == "zstd":  # without a declared size: bounded by nbytes while decompressing
        entry["data"] = zstandard.ZstdCompressor(write_content_size=False).compress(bomb)
        expect("bad_tensor", decode_entry, entry)
    entry["data"] = b"\x00garbage" * 10
    expect("bad_tensor", decode_entry, entry)
    good = entry_for(t, kind)
    good["data"] = good["data"][:-3]  # type: ignore[index]
    expect("bad_tensor", decode_entry, good)
    short = entry_for(t, kind)
    short["nbytes"], short["shape"] = 3996, [999]  # stream holds 4000 bytes
    expect("bad_tensor", decode_entry, short)


@pytest.mark.parametrize("size", [100, BIG])
def test_truncated_and_trailing_bytes_are_rejected(size):
    data = pack({"tensors": encode_tensors({"x": torch.zeros(size // 4)})})
    for cut in (1, 2, 7, len(data) // 2, len(data) - 1):
        expect("bad_message", unpack, data[:cut])
    expect("bad_message", unpack, data + b"\x00")
    expect("bad_message", unpack, b"")


@pytest.mark.parametrize("in_place", [False, True])
def test_bad_msgpack_is_rejected_on_both_paths(in_place):
    cases = [
        b"\xc1",  # never used
        msgpack.packb(msgpack.ExtType(5, b"abc")),
        msgpack.packb({1.5: 2}),  # float key
        b"\xa2\xff\xfe",  # invalid UTF-8
        b"\xdd\xff\xff\xff\xff",  # array declaring 4 billion items
        b"\xc6\xff\xff\xff\xff",  # bin declaring 4 GB
        b"\x91" * 2000 + b"\x01",  # nesting
    ]
    with mock.patch.object(codec, "_IN_PLACE_MIN", 0 if in_place else 1 << 30):
        for data in cases:
            expect("bad_message", unpack, data)
    expect("bad_message", unpack, "a string")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- fuzzing

msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=12) | st.binary(max_size=40),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=25,
)  # fmt: skip


def normalize(obj: object) -> object:
    if isinstance(obj, memoryview | bytes):
        return bytes(obj)
    if isinstance(obj, dict):
        return {k: normalize(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [normalize(v) for v in obj]
    return obj


@settings(max_examples=200, deadline=None)
@given(msgpack_values)
def test_in_place_parser_agrees_with_msgpack(obj):
    data = msgpack.packb(obj, use_bin_type=True)
    expected = msgpack.unpackb(data, raw=False, strict_map_key=False)
    with mock.patch.object(codec, "_IN_PLACE_MIN", 0):
        assert normalize(unpack(data)) == normalize(expected)
    assert normalize(unpack(pack(obj))) == normalize(expected)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300), st.booleans())
def test_unpack_arbitrary_bytes_raises_only_codec_error(data, in_place):
    with mock.patch.object(codec, "_IN_PLACE_MIN", 0 if in_place else 1 << 30):
        try:
            unpack(data, CodecLimits(max_items=1000))
        except CodecError:
            pass


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from(["none", "fp16", "int8+lz4", "zstd"]),
    st.sampled_from(["name", "dtype", "shape", "nbytes", "compression", "data", "scale", "zero_point", "pad"]),
    st.one_of(msgpack_values, st.integers(-(2**70), 2**70), st.lists(st.integers(-5, 2**40), max_size=10)),
    st.booleans(),
)
def test_decode_mutated_entries_raises_only_codec_error(compression, field, value, delete):
    entry = entry_for(torch.linspace(-1, 1, 24).reshape(2, 3, 4), compression)
    if delete:
        entry.pop(field, None)
    else:
        entry[field] = value
    try:  # as an in-process object (values msgpack could not even carry included) ...
        assert all(isinstance(t, torch.Tensor) for t in decode_tensors([entry]).values())
    except CodecError:
        pass
    try:
        data = msgpack.packb([entry])
    except (OverflowError, ValueError, TypeError):
        return
    for in_place in (False, True):  # ... and as bytes, through both parsers
        with mock.patch.object(codec, "_IN_PLACE_MIN", 0 if in_place else 1 << 30):
            try:
                assert all(isinstance(t, torch.Tensor) for t in decode_tensors(unpack(data)).values())
            except CodecError:
                pass


def test_non_contiguous_payload_view_is_rejected():
    entry = entry_for(torch.zeros(4, dtype=torch.uint8))
    entry["data"] = memoryview(bytes(8))[::2]
    expect("bad_tensor", decode_tensors, [entry])


def test_int8_with_a_range_wider_than_float32():
    t = torch.tensor([-3e38, 0.0, 3e38])
    out = round_trip({"x": t}, "int8")["x"]
    assert torch.isfinite(out).all()
    assert float((out.double() - t.double()).abs().max()) <= 6e38 / 255 / 2 * 1.001

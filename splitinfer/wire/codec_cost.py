"""What a compression costs, measured: the CodecCost the cost model plans with.

``codec_cost`` round-trips sample activations through the wire codec (encode, pack,
unpack, decode) and reports the size ratio and ms per MB each way; ``model_codec_cost``
takes the sample from the middle of a model, the figure ``splitinfer partition
--compression`` and the edge agent use. The benchmark around it is
``splitinfer.bench.compression``.
"""

from __future__ import annotations

import statistics
import time

import torch

from splitinfer.core.costmodel import CodecCost
from splitinfer.core.graph import capture
from splitinfer.core.inputs import positional
from splitinfer.core.split import split_model
from splitinfer.core.verify import candidate_heads
from splitinfer.models.spec import LoadedModel
from splitinfer.wire.codec import decode_tensors, encode_tensors, encoded_nbytes, pack, unpack

__all__ = ["codec_cost", "model_codec_cost", "roundtrip"]


def roundtrip(tensors: dict[str, torch.Tensor], compression: str) -> tuple[dict[str, torch.Tensor], int, float, float]:
    """Encode and decode as the wire does: (decoded tensors, wire bytes, encode ms, decode ms)."""
    t0 = time.perf_counter()
    entries = encode_tensors(tensors, compression)
    blob = pack({"t": entries})
    t1 = time.perf_counter()
    decoded = decode_tensors(unpack(blob)["t"])  # type: ignore[index]
    decoded = {k: v.clone() for k, v in decoded.items()}  # as a tail would hold them
    t2 = time.perf_counter()
    return decoded, encoded_nbytes(entries), (t1 - t0) * 1e3, (t2 - t1) * 1e3


def codec_cost(compression: str, sample: dict[str, torch.Tensor], repeats: int = 3) -> CodecCost:
    """The cost model's view of a compression, measured on representative activations."""
    raw = sum(t.numel() * t.element_size() for t in sample.values())
    if compression == "none" or raw == 0:
        return CodecCost(name=compression)
    ratios, enc, dec = [], [], []
    for _ in range(repeats):
        _, wire, e_ms, d_ms = roundtrip(sample, compression)
        ratios.append(wire / raw)
        enc.append(e_ms)
        dec.append(d_ms)
    mb = raw / 1e6
    return CodecCost(
        name=compression,
        size_ratio=statistics.median(ratios),
        encode_ms_per_mb=statistics.median(enc) / mb,
        decode_ms_per_mb=statistics.median(dec) / mb,
    )


def model_codec_cost(lm: LoadedModel, compression: str) -> CodecCost:
    """`codec_cost` on a mid-network activation of the model (ReLU zeros included, which
    the lossless stages like): the figure `partition --compression` and the edge use."""
    if compression == "none":
        return CodecCost()
    gm, graph = capture(lm.module, lm.example_input)
    heads = candidate_heads(graph)
    split = split_model(gm, graph, heads[len(heads) // 2])
    with torch.inference_mode():
        sample = split.run_head(*positional(graph.placeholders, lm.example_batch(1)))
    return codec_cost(compression, sample)

"""What activation compression costs and saves, measured: `splitinfer bench compression`.

For a model and a few cuts: bytes on the wire relative to raw float32, encode+decode time,
and the top-1 agreement of head -> codec -> tail with the uncompressed model. The same
measurement gives the CodecCost the cost model uses for a compression (`codec_cost`).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from splitinfer.wire.codec import decode_tensors, encode_tensors, encoded_nbytes, pack, unpack
from splitinfer.core.costmodel import CodecCost
from splitinfer.core.graph import capture
from splitinfer.models.loader import LoadedModel
from splitinfer.core.split import split_model
from splitinfer.core.verify import candidate_heads

COMPRESSIONS = ("none", "fp16", "int8", "int8+zstd", "fp16+lz4")


def _roundtrip(tensors: dict[str, torch.Tensor], compression: str) -> tuple[dict[str, torch.Tensor], int, float, float]:
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
        _, wire, e_ms, d_ms = _roundtrip(sample, compression)
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


def run_compression_bench(
    lm: LoadedModel,
    inputs: torch.Tensor,
    *,
    cuts: int = 4,
    compressions: tuple[str, ...] = COMPRESSIONS,
    labels: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Per cut and compression: wire bytes, ratio, codec ms, top-1 agreement (and accuracy with labels)."""
    gm, graph = capture(lm.module, lm.example_input)
    heads = candidate_heads(graph)[:-1]  # every cut that sends something
    step = max(1, (len(heads) - 1) // max(1, cuts - 1))
    chosen = heads[::step][:cuts]
    rows = []
    with torch.inference_mode():
        reference = lm.module(inputs).argmax(dim=1)
        for head in chosen:
            split = split_model(gm, graph, head)
            sent = split.run_head(inputs)
            raw = sum(t.numel() * t.element_size() for t in sent.values())
            for comp in compressions:
                decoded, wire, enc_ms, dec_ms = _roundtrip(sent, comp)
                top1 = split.run_tail(decoded).argmax(dim=1)
                row = {
                    "cut": graph.cut_id(head)[:60],
                    "index": graph.prefix_index_of(head),
                    "compression": comp,
                    "raw_bytes": raw,
                    "wire_bytes": wire,
                    "ratio": round(wire / raw, 4) if raw else 1.0,
                    "encode_ms": round(enc_ms, 3),
                    "decode_ms": round(dec_ms, 3),
                    "top1_agreement": round(float((top1 == reference).float().mean()), 4),
                }
                if labels is not None:
                    row["accuracy"] = round(float((top1 == labels).float().mean()), 4)
                rows.append(row)
    out: dict[str, Any] = {"model": lm.name, "samples": int(inputs.shape[0]), "results": rows}
    if labels is not None:
        out["reference_accuracy"] = round(float((reference == labels).float().mean()), 4)
    return out


def model_codec_cost(lm: LoadedModel, compression: str) -> CodecCost:
    """`codec_cost` on a mid-network activation of the model (ReLU zeros included, which
    the lossless stages like): the figure `partition --compression` and the edge use."""
    if compression == "none":
        return CodecCost()
    gm, graph = capture(lm.module, lm.example_input)
    heads = candidate_heads(graph)
    split = split_model(gm, graph, heads[len(heads) // 2])
    with torch.inference_mode():
        sample = split.run_head(lm.example_batch(1))
    return codec_cost(compression, sample)

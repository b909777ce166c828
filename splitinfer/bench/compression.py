"""What activation compression costs and saves, measured: `splitinfer bench compression`.

For a model and a few cuts: bytes on the wire relative to raw float32, encode+decode time,
and the top-1 agreement of head -> codec -> tail with the uncompressed model. The round
trip is the one the cost model's CodecCost is measured with (`splitinfer.wire.codec_cost`,
whose `codec_cost` and `model_codec_cost` are re-exported here for older imports).
"""

from __future__ import annotations

from typing import Any

import torch

from splitinfer.core.graph import capture
from splitinfer.models.loader import LoadedModel
from splitinfer.core.split import split_model
from splitinfer.core.verify import candidate_heads
from splitinfer.wire.codec_cost import codec_cost, model_codec_cost, roundtrip as _roundtrip

__all__ = ["COMPRESSIONS", "codec_cost", "model_codec_cost", "run_compression_bench"]

COMPRESSIONS = ("none", "fp16", "int8", "int8+zstd", "fp16+lz4")


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

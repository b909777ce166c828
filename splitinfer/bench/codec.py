"""Codec throughput benchmark: splitinfer's wire path against pickle protocol 5 and torch.save.

Each codec turns one float32 tensor of ``mb`` megabytes (10^6 bytes) into bytes and back.
For splitinfer that is the full path: ``encode_message`` of an InferRequest to bytes, and
``decode_message`` back to the tensor (which is a zero-copy view of the bytes). Results are
medians over ``repeats`` runs after one warm-up; outputs are freed outside the timed region
so that returning 100 MB to the OS is not billed to the next step.
"""

from __future__ import annotations

import gc
import io
import logging
import pickle
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch

from splitinfer.util.output import emit_json
from splitinfer.wire.protocol import InferRequest, decode_message, encode_message

log = logging.getLogger(__name__)

Encoder = Callable[[torch.Tensor], bytes]
Decoder = Callable[[bytes], torch.Tensor]


def _splitinfer_encode(t: torch.Tensor) -> bytes:
    request = InferRequest(id="bench", model_id="bench", model_hash="0", cut_id="0", tensors={"x": t})
    return encode_message(request, "none")


def _splitinfer_decode(data: bytes) -> torch.Tensor:
    message = decode_message(data)
    assert isinstance(message, InferRequest)
    return message.tensors["x"]


def _pickle_encode(t: torch.Tensor) -> bytes:
    return pickle.dumps(t.numpy(), protocol=5)  # in-band: the array's bytes are inside the pickle


def _pickle_decode(data: bytes) -> torch.Tensor:
    return torch.from_numpy(pickle.loads(data))  # trusted, self-made data only: this is the baseline


def _torch_encode(t: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    torch.save(t, buf)
    return buf.getvalue()


def _torch_decode(data: bytes) -> torch.Tensor:
    return torch.load(io.BytesIO(data), weights_only=True)


CODECS: dict[str, tuple[Encoder, Decoder]] = {
    "splitinfer": (_splitinfer_encode, _splitinfer_decode),
    "pickle5": (_pickle_encode, _pickle_decode),
    "torch.save": (_torch_encode, _torch_decode),
}


def _time_codec(encode: Encoder, decode: Decoder, t: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Median encode and decode seconds."""
    encode_s: list[float] = []
    decode_s: list[float] = []
    for i in range(repeats + 1):  # the first round is a warm-up
        start = time.perf_counter()
        data = encode(t)
        mid = time.perf_counter()
        out = decode(data)
        end = time.perf_counter()
        if out.shape != t.shape:
            raise RuntimeError("codec round trip changed the tensor's shape")
        del data, out
        gc.collect()
        if i:
            encode_s.append(mid - start)
            decode_s.append(end - mid)
    return statistics.median(encode_s), statistics.median(decode_s)


def run_codec_bench(sizes_mb: Sequence[int] = (1, 10, 100), repeats: int = 5) -> dict[str, list[dict[str, object]]]:
    """Encode/decode throughput (GB/s, 10^9 bytes per second) per codec and tensor size."""
    results: list[dict[str, object]] = []
    for mb in sizes_mb:
        nbytes = int(mb * 1_000_000)
        t = torch.randn(nbytes // 4)
        for name, (encode, decode) in CODECS.items():
            # Fewer rounds for big tensors keeps the whole run well under 30 s.
            rounds = max(2, repeats if nbytes <= 20_000_000 else repeats // 2)
            enc_s, dec_s = _time_codec(encode, decode, t, rounds)
            row = {
                "codec": name,
                "mb": mb,
                "encode_gbps": nbytes / 1e9 / enc_s,
                "decode_gbps": nbytes / 1e9 / dec_s,
            }
            log.info("%s", row)
            results.append(row)
        del t
    return {"results": results}


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    emit_json(run_codec_bench())

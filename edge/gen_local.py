"""The edge's own LM work for generation: a model with its KV cache, on one torch thread.

:class:`LocalLM` holds one sequence's cache for blocks ``[0, hi)`` of a
:class:`~splitinfer.models.lm.CausalLM` (all blocks: the teacher in mode ``edge``, the
draft; the head's blocks: mode ``split``). It catches up with a token history by feeding
what its cache lacks, so any caller (a first prefill, a rebuild after the cloud lost its
session, a return from fallback) uses the same call. Torch never runs on the event loop:
every call goes through :class:`TorchThread` (one thread, so steps stay in order).
"""

from __future__ import annotations

import asyncio
import codecs
import concurrent.futures
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch

from splitinfer.models.fastdecode import FastDecoder
from splitinfer.models.kvcache import KVCache, run_step, step_positions
from splitinfer.models.lm import CausalLM
from splitinfer.models.speculative import next_token, probabilities, sample

__all__ = ["LocalLM", "Token", "TorchThread", "Utf8Stream"]

T = TypeVar("T")


@dataclass(frozen=True)
class Token:
    """One generated token: its byte id, the text it completes, and which side made it."""

    id: int
    text: str
    source: str  # edge | cloud | split | speculative | draft

    @property
    def token(self) -> int:
        return self.id

    def to_json(self) -> dict[str, Any]:
        return {"token": self.id, "text": self.text, "source": self.source}


class Utf8Stream:
    """Bytes -> text as they come: a token that ends a multi-byte character yields it."""

    def __init__(self) -> None:
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self._dec.decode(bytes([token]))

    def flush(self) -> str:
        return self._dec.decode(b"", final=True)


class TorchThread:
    """One worker thread for every torch call of a generator (``threads``: torch's intra-op count)."""

    def __init__(self, threads: int | None = None) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="gen-torch")
        if threads is not None:
            self._pool.submit(torch.set_num_threads, threads).result()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class LocalLM:
    """A model and one sequence's cache for blocks [0, hi) (hi None: the whole model).

    A whole model decodes through :class:`~splitinfer.models.fastdecode.FastDecoder`
    (preallocated cache, little per-step overhead: the draft's rounds are most of the
    edge's CPU in speculative mode); a head (``split``) through the general
    :func:`~splitinfer.models.kvcache.run_step`, which returns every position's hidden state."""

    def __init__(self, model: CausalLM, hi: int | None = None) -> None:
        self.model = model
        self.hi = model.n_layers if hi is None else hi
        self.whole = self.hi == model.n_layers
        self.cache: KVCache | FastDecoder = self._new_cache()
        self.tokens: list[int] = []  # what the cache holds: a catch-up keeps only a prefix of the history

    def _new_cache(self) -> KVCache | FastDecoder:
        return FastDecoder(self.model) if self.whole else KVCache(self.model, 0, self.hi)

    @property
    def length(self) -> int:
        return self.cache.length

    @property
    def max_ctx(self) -> int:
        return self.model.cfg.max_ctx

    def reset(self) -> None:
        self.cache = self._new_cache()
        self.tokens = []

    def truncate(self, length: int) -> None:
        keep = max(0, min(length, self.cache.length))
        self.cache.truncate(keep)
        del self.tokens[keep:]

    @torch.no_grad()
    def _run(self, tokens: list[int]) -> torch.Tensor:
        """Feed ``tokens`` after a head's cache; the (1, T, D) hidden state after block hi-1."""
        assert isinstance(self.cache, KVCache), "a whole model feeds through FastDecoder"
        self.tokens.extend(tokens)
        tok = torch.tensor([tokens], dtype=torch.long)
        positions, _ = step_positions([self.cache], [len(tokens)])
        return run_step(self.model, [self.cache], self.model.embed(tok, positions), [len(tokens)])

    def _catch_up(self, history: list[int]) -> list[int]:
        """The tokens of ``history`` the cache lacks (at least the last one, for its logits).

        The cache keeps only its longest prefix shared with the history: drafts that were
        never verified, or a history that moved on elsewhere (fallback), are dropped."""
        same = 0
        for a, b in zip(self.tokens, history):
            if a != b:
                break
            same += 1
        self.truncate(min(same, len(history) - 1))
        return history[self.cache.length :]

    @torch.no_grad()
    def next_logits(self, history: list[int]) -> torch.Tensor:
        """Catch up with ``history``: the (256,) logits of the token after it (whole model)."""
        new = self._catch_up(history)
        if isinstance(self.cache, FastDecoder):
            self.tokens.extend(new)
            return self.cache.feed(new)
        h = self._run(new)
        return self.model.logits(h[:, -1:])[0, 0]

    def head_hidden(self, history: list[int]) -> torch.Tensor:
        """Catch up with ``history``: the (1, T, D) hidden states of the positions fed (a head)."""
        return self._run(self._catch_up(history))

    def next_token(self, history: list[int], temperature: float, generator: torch.Generator | None) -> int:
        return next_token(self.next_logits(history), temperature, generator)

    def propose(
        self, history: list[int], k: int, temperature: float, generator: torch.Generator | None
    ) -> tuple[list[int], torch.Tensor | None]:
        """k draft tokens after ``history`` and, sampled, their (k, 256) float16 probabilities.

        A sampled draft token is drawn from the float16-rounded distribution it sends, so
        the cloud's rejection test judges it against the very q it was drawn from."""
        drafts: list[int] = []
        qs: list[torch.Tensor] = []
        logits = self.next_logits(history)
        for i in range(k):
            if temperature <= 0:
                d = int(torch.argmax(logits))
            else:
                q = probabilities(logits, temperature).to(torch.float16)
                d = sample(q.double(), generator)
                qs.append(q)
            drafts.append(d)
            if i + 1 < k:
                logits = self.next_logits(history + drafts)
        return drafts, (torch.stack(qs) if qs else None)

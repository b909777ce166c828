"""Cost model of a generative LM across an edge and a cloud: per-token and first-token time.

A decoded token costs compute on each side plus what crosses the link. The compute comes
from an :class:`LMProfile`: milliseconds per part (``embed``, each block, ``logits``: the
final norm + LM head) of a :class:`~splitinfer.models.lm.CausalLM` at batch 1, measured on
this machine for

- ``prefill[T]``: a prompt of T tokens, empty cache (time to first token);
- ``decode[C]``: one new token at a context (cache length) of C;
- ``verify[K][C]``: K = k+1 new tokens at a context of C (speculative verification).

Other lengths are interpolated linearly between measured points (extrapolated with the
last slope, never decreasing). ``profile.slowdown(k)`` is the same profile on an edge k
times slower (the emulated 10x edge: ``cloud.slowdown(10)``).

API (small on purpose; ``splitinfer.adapt.genpolicy`` codes against it)::

    cloud = profile_lm(model, name="gpt17m")            # or LMProfile.load(path), cached_profile(m, name, path)
    edge = cloud.slowdown(10)
    draft = profile_lm(draft_model, name="bytelm-draft").slowdown(10)
    cost = LMCost(edge, cloud, context=128)             # context: cache length to price at
    cost.edge_ms_per_token()
    cost.cloud_ms_per_token(rtt_ms, mbit)
    cost.split_ms_per_token(cut, rtt_ms, mbit)          # 0 < cut < n_layers: blocks [0,cut) on the edge
    cost.speculative_ms_per_token(k, acceptance, rtt_ms, mbit, draft)
    cost.draft_ms_per_token(draft)
    cost.ttft_ms(prompt_len, mode, rtt_ms, mbit, cut=None, draft=None)  # mode: edge|cloud|split|speculative|draft
    cost.best_cut(rtt_ms, mbit) -> (cut, ms_per_token)
    cost.ms_per_token(mode, rtt_ms, mbit, cut=None, k=4, acceptance=0.7, draft=None)
    expected_tokens_per_round(k, acceptance) == (1 - a**(k+1)) / (1 - a)

Every method takes an optional ``context=`` (overrides the default) and ``down_mbit=``
(downlink; default: the uplink). Link terms: bytes * 8 / bandwidth, plus one RTT per round
trip; every message also pays ``MSG_BYTES`` of framing. What crosses per decoded token:

- cloud: one token id up, one token down;
- split: the hidden state after block cut-1, ``d_model * hidden_bytes`` bytes (4 for fp32;
  the KV caches never cross: each side keeps its own, see ``splitinfer.core.state``) up,
  one token down;
- speculative (per round of k drafts): k+1 token ids up (and the draft's (k, 256) fp16
  probabilities when ``sampled``), up to k+1 tokens down; a round yields on average
  ``expected_tokens_per_round(k, a)`` tokens, so ms/token = round ms / that.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from splitinfer.errors import UserError
from splitinfer.models.kvcache import KVCache, run_step, step_positions
from splitinfer.models.lm import CausalLM

__all__ = [
    "MODES",
    "MSG_BYTES",
    "TOKEN_BYTES",
    "LMCost",
    "LMProfile",
    "PartMs",
    "expected_tokens_per_round",
    "cached_profile",
    "profile_lm",
]

MODES = ("edge", "cloud", "split", "speculative", "draft")
MSG_BYTES = 64  # framing of one message (msgpack map, WebSocket header), each way
TOKEN_BYTES = 4  # one token id in a message
PROB_BYTES = 256 * 2  # one draft position's fp16 probabilities (sampled verify only)

DEFAULT_PROMPTS = (16, 64, 128)
DEFAULT_CONTEXTS = (64, 128, 256)
DEFAULT_VERIFY = (3, 5, 9)  # k + 1 for k = 2, 4, 8


@dataclass(frozen=True)
class PartMs:
    """ms of each part of the model for one step shape: embed, blocks[i], logits."""

    embed: float
    blocks: tuple[float, ...]
    logits: float

    def range_ms(self, lo: int, hi: int, *, embed: bool = False, logits: bool = False) -> float:
        return (self.embed if embed else 0.0) + sum(self.blocks[lo:hi]) + (self.logits if logits else 0.0)

    @property
    def total(self) -> float:
        return self.range_ms(0, len(self.blocks), embed=True, logits=True)

    def scaled(self, k: float) -> "PartMs":
        return PartMs(self.embed * k, tuple(b * k for b in self.blocks), self.logits * k)

    def to_json(self) -> dict:
        return {"embed": round(self.embed, 5), "blocks": [round(b, 5) for b in self.blocks],
                "logits": round(self.logits, 5)}  # fmt: skip

    @staticmethod
    def from_json(d: dict) -> "PartMs":
        return PartMs(float(d["embed"]), tuple(float(b) for b in d["blocks"]), float(d["logits"]))


def _interp(points: dict[int, PartMs], x: float) -> PartMs:
    """Exact at measured points, linear between them; past the ends, the end segment's
    slope when it grows (else flat): a longer step is never predicted cheaper than a
    measured shorter one."""
    if not points:
        raise UserError("the LM profile has no measurements for this kind of step")
    xs = sorted(points)
    if len(xs) == 1 or x == xs[0]:
        return points[xs[0]]
    if x < xs[0] or x > xs[-1]:
        a, b = (xs[0], xs[1]) if x < xs[0] else (xs[-2], xs[-1])
        base = points[xs[0]] if x < xs[0] else points[xs[-1]]
        dx = x - (xs[0] if x < xs[0] else xs[-1])

        def ext(at: float, u: float, v: float) -> float:
            return max(at + max((v - u) / (b - a), 0.0) * dx, 0.0)

        pa, pb = points[a], points[b]
        return PartMs(ext(base.embed, pa.embed, pb.embed),
                      tuple(ext(z, u, v) for z, u, v in zip(base.blocks, pa.blocks, pb.blocks)),
                      ext(base.logits, pa.logits, pb.logits))  # fmt: skip
    i = next(i for i in range(1, len(xs)) if xs[i] >= x)
    a, b = xs[i - 1], xs[i]
    t = (x - a) / (b - a)
    pa, pb = points[a], points[b]

    def mix(u: float, v: float) -> float:
        return u + (v - u) * t

    return PartMs(mix(pa.embed, pb.embed), tuple(mix(u, v) for u, v in zip(pa.blocks, pb.blocks)),
                  mix(pa.logits, pb.logits))  # fmt: skip


@dataclass(frozen=True)
class LMProfile:
    """Measured ms per part of one LM on one machine (see the module docstring)."""

    model: str
    n_layers: int
    d_model: int
    prefill: dict[int, PartMs]
    decode: dict[int, PartMs]
    verify: dict[int, dict[int, PartMs]] = field(default_factory=dict)  # new tokens -> context -> ms
    device: str = "cpu"
    threads: int = 1
    slowdown_factor: float = 1.0

    # -- lookups ---------------------------------------------------------------------
    def prefill_ms(self, prompt_len: int) -> PartMs:
        return _interp(self.prefill, prompt_len)

    def decode_ms(self, context: int) -> PartMs:
        return _interp(self.decode, context)

    def verify_ms(self, new_tokens: int, context: int) -> PartMs:
        """k+1 new tokens at a context: measured sizes interpolated; none measured -> decode x n."""
        if not self.verify:
            return self.decode_ms(context).scaled(new_tokens)
        by_n = {n: _interp(ctxs, context) for n, ctxs in self.verify.items()}
        by_n.setdefault(1, self.decode_ms(context))
        return _interp(by_n, new_tokens)

    def slowdown(self, k: float) -> "LMProfile":
        """This profile on a machine k times slower (every part takes k times as long)."""
        if not k > 0:
            raise UserError(f"slowdown must be positive, got {k}")
        return LMProfile(
            model=self.model, n_layers=self.n_layers, d_model=self.d_model,
            prefill={t: p.scaled(k) for t, p in self.prefill.items()},
            decode={c: p.scaled(k) for c, p in self.decode.items()},
            verify={n: {c: p.scaled(k) for c, p in v.items()} for n, v in self.verify.items()},
            device=self.device, threads=self.threads, slowdown_factor=self.slowdown_factor * k,
        )  # fmt: skip

    # -- JSON ------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "model": self.model, "n_layers": self.n_layers, "d_model": self.d_model,
            "device": self.device, "threads": self.threads, "slowdown": self.slowdown_factor,
            "prefill": {str(t): p.to_json() for t, p in sorted(self.prefill.items())},
            "decode": {str(c): p.to_json() for c, p in sorted(self.decode.items())},
            "verify": {str(n): {str(c): p.to_json() for c, p in sorted(v.items())}
                       for n, v in sorted(self.verify.items())},
        }  # fmt: skip

    @staticmethod
    def from_json(d: dict) -> "LMProfile":
        try:
            return LMProfile(
                model=str(d["model"]), n_layers=int(d["n_layers"]), d_model=int(d["d_model"]),
                prefill={int(t): PartMs.from_json(p) for t, p in d["prefill"].items()},
                decode={int(c): PartMs.from_json(p) for c, p in d["decode"].items()},
                verify={int(n): {int(c): PartMs.from_json(p) for c, p in v.items()}
                        for n, v in d.get("verify", {}).items()},
                device=str(d.get("device", "cpu")), threads=int(d.get("threads", 1)),
                slowdown_factor=float(d.get("slowdown", 1.0)),
            )  # fmt: skip
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"not an LM profile: {exc}") from exc

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @staticmethod
    def load(path: str | Path) -> "LMProfile":
        try:
            return LMProfile.from_json(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"cannot read LM profile {path}: {exc}") from exc


# ------------------------------------------------------------------------ profiling
MIN_WINDOW_MS = 25.0  # each part is timed over at least this long (several CFS periods)


def _time_ms(fn: Any, repeats: int) -> float:
    """Mean ms of ``fn`` over at least ``repeats`` calls and ``MIN_WINDOW_MS`` of wall time.

    Not the median of a few sub-millisecond calls: on a CPU-quota-limited device (a cgroup's
    CFS quota, the emulated slow edge) short calls run at full speed on unspent quota and the
    throttling lands between them, so a median of short timings says the device is several
    times faster than it is. A mean over a window of several quota periods includes the waits."""
    fn()  # warm-up (allocator, kernels)
    calls = 0
    t0 = time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = (time.perf_counter() - t0) * 1e3
        if calls >= repeats and elapsed >= MIN_WINDOW_MS:
            return elapsed / calls


@torch.inference_mode()
def _measure(model: CausalLM, new: int, context: int, repeats: int) -> PartMs:
    """ms of each part for `new` tokens after `context` cached ones, timed as the split
    runtime runs them (``models.kvcache``): positions + embed (with its check); each block as
    its own cache's ``run_step`` (attention over the cache, then the append); the final norm,
    LM head and the argmax that picks the token. Random cache contents, batch 1."""
    cfg = model.cfg
    if context + new > cfg.max_ctx:
        raise UserError(f"context {context} + {new} new tokens is past the model's {cfg.max_ctx}")
    tokens = torch.randint(0, 256, (1, new))
    caches = [KVCache(model, i, i + 1) for i in range(cfg.n_layers)]
    h = torch.randn(1, context, cfg.d_model, dtype=model.tok.weight.dtype)
    for cache in caches:  # fill each block's cache to `context` positions
        if context:
            run_step(model, [cache], h, [context])
    h = h[:, :new] if new <= context else torch.randn(1, new, cfg.d_model, dtype=h.dtype)

    def embed() -> None:
        positions, _ = step_positions(caches[:1], [new])
        model.embed(tokens, positions)

    def block(cache: KVCache) -> None:
        run_step(model, [cache], h, [new])
        cache.truncate(context)

    def logits() -> None:
        int(model.logits(h)[0, -1].argmax())

    return PartMs(_time_ms(embed, repeats), tuple(_time_ms(lambda c=c: block(c), repeats) for c in caches),
                  _time_ms(logits, repeats))  # fmt: skip


def profile_lm(
    model: CausalLM,
    name: str = "lm",
    *,
    prompt_lens: Iterable[int] = DEFAULT_PROMPTS,
    contexts: Iterable[int] = DEFAULT_CONTEXTS,
    verify_tokens: Iterable[int] = DEFAULT_VERIFY,
    repeats: int = 5,
) -> LMProfile:
    """Measure `model` on this machine at batch 1 (current torch thread count; median of
    `repeats` runs per part). verify_tokens are k+1 values, each measured at every context."""
    ctxs = tuple(contexts)
    return LMProfile(
        model=name, n_layers=model.n_layers, d_model=model.cfg.d_model,
        prefill={t: _measure(model, t, 0, repeats) for t in prompt_lens},
        decode={c: _measure(model, 1, c, repeats) for c in ctxs},
        verify={n: {c: _measure(model, n, c, repeats) for c in ctxs} for n in verify_tokens},
        device="cpu", threads=torch.get_num_threads(),
    )  # fmt: skip


def cached_profile(model: CausalLM, name: str, path: str | Path, **kwargs: Any) -> LMProfile:
    """The profile saved at `path` when it is of this model's shape, else measured and saved
    there (profiling a 17M model takes seconds: an edge does it once per machine)."""
    p = Path(path)
    if p.exists():
        try:
            prof = LMProfile.load(p)
            if (prof.model, prof.n_layers, prof.d_model) == (name, model.n_layers, model.cfg.d_model):
                return prof
        except UserError:
            pass  # unreadable or of another model: measure again
    prof = profile_lm(model, name, **kwargs)
    p.parent.mkdir(parents=True, exist_ok=True)
    prof.save(p)
    return prof


# ------------------------------------------------------------------------ predictions
def expected_tokens_per_round(k: int, acceptance: float) -> float:
    """Tokens one speculative round yields: accepted drafts + the correction/bonus token,
    with each draft accepted independently with probability a: (1 - a^(k+1)) / (1 - a)."""
    a = min(max(acceptance, 0.0), 1.0)
    if a >= 1.0:
        return float(k + 1)
    return (1.0 - a ** (k + 1)) / (1.0 - a)


def _wire_ms(nbytes: float, mbit: float) -> float:
    if not mbit > 0:
        raise UserError(f"bandwidth must be positive, got {mbit} Mbit/s")
    return 0.0 if math.isinf(mbit) else nbytes * 8 / (mbit * 1e3)


class LMCost:
    """Predicted ms per token and time to first token of each mode (module docstring)."""

    def __init__(self, edge: LMProfile, cloud: LMProfile, *, context: int = 128, hidden_bytes: int = 4) -> None:
        if (edge.n_layers, edge.d_model) != (cloud.n_layers, cloud.d_model):
            raise UserError(f"edge profile of {edge.model} does not match the cloud's {cloud.model}")
        self.edge, self.cloud = edge, cloud
        self.context = context
        self.hidden_bytes = hidden_bytes  # bytes per value of the hidden state on the wire
        self.n_layers = cloud.n_layers

    def _ctx(self, context: int | None) -> int:
        return self.context if context is None else context

    def _check_cut(self, cut: int) -> None:
        if not 0 < cut < self.n_layers:
            raise UserError(f"split cut must be in 1..{self.n_layers - 1}, got {cut}")

    def _link_ms(self, up_bytes: float, down_bytes: float, rtt_ms: float, mbit: float, down_mbit: float | None) -> float:
        return _wire_ms(up_bytes + MSG_BYTES, mbit) + rtt_ms + _wire_ms(down_bytes + MSG_BYTES, down_mbit or mbit)

    def hidden_state_bytes(self, tokens: int = 1) -> int:
        """What a split sends per step: (1, tokens, d_model) hidden state."""
        return tokens * self.cloud.d_model * self.hidden_bytes

    # -- ms per decoded token ----------------------------------------------------------
    def edge_ms_per_token(self, *, context: int | None = None) -> float:
        return self.edge.decode_ms(self._ctx(context)).total

    def draft_ms_per_token(self, draft: LMProfile, *, context: int | None = None) -> float:
        """The draft alone on the edge (mode `draft`); `draft` is an edge-speed profile."""
        return draft.decode_ms(self._ctx(context)).total

    def cloud_ms_per_token(self, rtt_ms: float, mbit: float, *, context: int | None = None,
                           down_mbit: float | None = None) -> float:  # fmt: skip
        cloud = self.cloud.decode_ms(self._ctx(context)).total
        return cloud + self._link_ms(TOKEN_BYTES, TOKEN_BYTES, rtt_ms, mbit, down_mbit)

    def split_ms_per_token(self, cut: int, rtt_ms: float, mbit: float, *, context: int | None = None,
                           down_mbit: float | None = None) -> float:  # fmt: skip
        """Edge embed + blocks [0, cut), hidden state up, RTT, cloud blocks [cut, n) + logits, token down."""
        self._check_cut(cut)
        ctx = self._ctx(context)
        head = self.edge.decode_ms(ctx).range_ms(0, cut, embed=True)
        tail = self.cloud.decode_ms(ctx).range_ms(cut, self.n_layers, logits=True)
        return head + tail + self._link_ms(self.hidden_state_bytes(), TOKEN_BYTES, rtt_ms, mbit, down_mbit)

    def speculative_round_ms(self, k: int, rtt_ms: float, mbit: float, draft: LMProfile, *,
                             context: int | None = None, down_mbit: float | None = None,
                             sampled: bool = False) -> float:  # fmt: skip
        """One round: k draft decodes on the edge, k+1 tokens verified in one cloud step."""
        if k < 1:
            raise UserError(f"draft length must be >= 1, got {k}")
        ctx = self._ctx(context)
        drafting = k * draft.decode_ms(ctx).total
        verify = self.cloud.verify_ms(k + 1, ctx).total
        up = (k + 1) * TOKEN_BYTES + (k * PROB_BYTES if sampled else 0)
        return drafting + verify + self._link_ms(up, (k + 1) * TOKEN_BYTES, rtt_ms, mbit, down_mbit)

    def speculative_ms_per_token(self, k: int, acceptance: float, rtt_ms: float, mbit: float,
                                 draft: LMProfile, *, context: int | None = None,
                                 down_mbit: float | None = None, sampled: bool = False) -> float:  # fmt: skip
        round_ms = self.speculative_round_ms(k, rtt_ms, mbit, draft, context=context, down_mbit=down_mbit,
                                             sampled=sampled)  # fmt: skip
        return round_ms / expected_tokens_per_round(k, acceptance)

    def best_cut(self, rtt_ms: float, mbit: float, *, context: int | None = None,
                 down_mbit: float | None = None) -> tuple[int, float]:  # fmt: skip
        """The split cut (1..n-1) with the least ms per token, and that figure."""
        if self.n_layers < 2:
            raise UserError("a model of one block has no split cut")
        best = min(range(1, self.n_layers),
                   key=lambda c: (self.split_ms_per_token(c, rtt_ms, mbit, context=context, down_mbit=down_mbit), c))
        return best, self.split_ms_per_token(best, rtt_ms, mbit, context=context, down_mbit=down_mbit)

    def ms_per_token(self, mode: str, rtt_ms: float = 0.0, mbit: float = math.inf, *, cut: int | None = None,
                     k: int = 4, acceptance: float = 0.7, draft: LMProfile | None = None,
                     context: int | None = None, down_mbit: float | None = None) -> float:  # fmt: skip
        """Any mode by name (MODES); split without a cut takes best_cut."""
        kw: dict[str, Any] = {"context": context}
        if mode == "edge":
            return self.edge_ms_per_token(**kw)
        if mode in ("draft", "speculative") and draft is None:
            raise UserError(f"mode {mode!r} needs the draft's profile")
        if mode == "draft":
            return self.draft_ms_per_token(draft, **kw)  # type: ignore[arg-type]
        kw["down_mbit"] = down_mbit
        if mode == "cloud":
            return self.cloud_ms_per_token(rtt_ms, mbit, **kw)
        if mode == "split":
            c = cut if cut is not None else self.best_cut(rtt_ms, mbit, **kw)[0]
            return self.split_ms_per_token(c, rtt_ms, mbit, **kw)
        if mode == "speculative":
            return self.speculative_ms_per_token(k, acceptance, rtt_ms, mbit, draft, **kw)  # type: ignore[arg-type]
        raise UserError(f"unknown generation mode {mode!r}: one of {', '.join(MODES)}")

    # -- time to first token -----------------------------------------------------------
    def ttft_ms(self, prompt_len: int, mode: str, rtt_ms: float = 0.0, mbit: float = math.inf, *,
                cut: int | None = None, draft: LMProfile | None = None,
                down_mbit: float | None = None) -> float:  # fmt: skip
        """Prefill of the prompt and the first token, in `mode` (speculative: the cloud's
        prefill, with the draft's own prefill on the edge in parallel)."""
        t = max(int(prompt_len), 1)
        if mode == "edge":
            return self.edge.prefill_ms(t).total
        if mode == "draft":
            if draft is None:
                raise UserError("mode 'draft' needs the draft's profile")
            return draft.prefill_ms(t).total
        if mode in ("cloud", "speculative"):
            cloud = self.cloud.prefill_ms(t).total + self._link_ms(t * TOKEN_BYTES, TOKEN_BYTES, rtt_ms, mbit, down_mbit)
            if mode == "cloud":
                return cloud
            if draft is None:
                raise UserError("mode 'speculative' needs the draft's profile")
            return max(cloud, draft.prefill_ms(t).total)
        if mode == "split":
            c = cut if cut is not None else self.best_cut(rtt_ms, mbit, down_mbit=down_mbit)[0]
            self._check_cut(c)
            head = self.edge.prefill_ms(t).range_ms(0, c, embed=True)
            tail = self.cloud.prefill_ms(t).range_ms(c, self.n_layers, logits=True)
            return head + tail + self._link_ms(self.hidden_state_bytes(t), TOKEN_BYTES, rtt_ms, mbit, down_mbit)
        raise UserError(f"unknown generation mode {mode!r}: one of {', '.join(MODES)}")

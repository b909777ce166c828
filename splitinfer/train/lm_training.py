"""Training and measuring the byte LMs: next-byte cross-entropy, optional distillation.

AdamW with linear warm-up then cosine decay, gradient clipping, seeded batch order
(random windows of the train bytes from a private generator) and a fixed set of
held-out windows, so one config + seed + thread count gives the same run. ``bf16``
runs forward/backward under CPU bf16 autocast (2-3x faster matmuls on CPUs with
AVX512-BF16; weights and optimizer stay fp32). With a teacher the loss is
``alpha * CE + (1 - alpha) * T^2 * KL(teacher || student)`` on the teacher's logits,
which makes a draft agree with its teacher's greedy choice more often.

Measures: :func:`bits_per_byte` (held-out cross-entropy in bits) and
:func:`greedy_agreement` (how often a draft's argmax equals the teacher's: the
acceptance rate of greedy speculative decoding, one position at a time).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from splitinfer.models.lm import CausalLM, LMConfig
from splitinfer.models.lmzoo import build_lm
from splitinfer.train.lm_data import LMCorpus, eval_windows, random_windows

__all__ = [
    "LMTrainConfig",
    "LMTrainResult",
    "train_lm",
    "bits_per_byte",
    "greedy_agreement",
    "held_out_windows",
    "speculative_acceptance",
]

log = logging.getLogger(__name__)

Progress = Callable[[int, float], None]  # (step done, smoothed loss)
Checkpoint = Callable[[CausalLM, int, float], None]  # (model, step, held-out bpb)


@dataclass(frozen=True)
class LMTrainConfig:
    """One training run's recipe (all of it goes into the weights' metadata)."""

    steps: int = 2000
    batch_size: int = 16
    ctx: int = 256
    lr: float = 2e-3
    min_lr_frac: float = 0.1  # cosine decays to lr * this
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    threads: int = 1
    bf16: bool = False
    eval_every: int = 0  # 0: only at the end
    eval_windows: int = 48
    alpha: float = 1.0  # weight of the next-byte CE; 1 - alpha weighs the teacher (if any)
    temperature: float = 1.0

    def check(self) -> None:
        """Refuse recipes that cannot run."""
        if self.steps < 1 or self.batch_size < 1 or self.ctx < 2 or self.lr <= 0:
            raise ValueError("steps, batch size, lr must be positive and ctx >= 2")
        if not 0.0 <= self.alpha <= 1.0 or self.temperature <= 0:
            raise ValueError("alpha must be in [0, 1] and temperature > 0")
        if self.threads < 1:
            raise ValueError("threads must be >= 1")


@dataclass
class LMTrainResult:
    """What a run did: the trained model, its curve and its held-out bits per byte."""

    model: CausalLM
    steps: int
    losses: list[float] = field(default_factory=list)  # per step (training loss)
    held_out_bpb: float = float("nan")
    init_bpb: float = float("nan")
    seconds: float = 0.0
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out bpb)

    def summary(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "first_loss": round(self.losses[0], 4) if self.losses else None,
            "last_loss": round(self.losses[-1], 4) if self.losses else None,
            "held_out_bpb": round(self.held_out_bpb, 4),
            "init_bpb": round(self.init_bpb, 4),
            "seconds": round(self.seconds, 1),
            "curve": [[s, round(b, 4)] for s, b in self.curve],
        }


def lr_at(cfg: LMTrainConfig, step: int) -> float:
    """Linear warm-up to ``lr``, then cosine down to ``lr * min_lr_frac`` at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def held_out_windows(corpus: LMCorpus, ctx: int = 256, n: int = 48) -> torch.Tensor:
    """The fixed held-out windows every measurement uses: (n, ctx + 1) int64."""
    return eval_windows(corpus.held_out, ctx, n)


def _autocast(bf16: bool) -> Any:
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()


@torch.no_grad()
def bits_per_byte(model: CausalLM, windows: torch.Tensor, *, batch: int = 16) -> float:
    """Mean next-byte cross-entropy in bits over every position of ``windows`` (fp32)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch):
        w = windows[i : i + batch]
        logits = model(w[:, :-1]).float()
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1), reduction="sum"))
        count += w[:, 1:].numel()
    model.train(was_training)
    return total / count / math.log(2)


@torch.no_grad()
def greedy_agreement(draft: CausalLM, teacher: CausalLM, windows: torch.Tensor, *, batch: int = 16) -> float:
    """Fraction of positions where the draft's greedy next byte equals the teacher's."""
    same, count = 0, 0
    for i in range(0, windows.shape[0], batch):
        x = windows[i : i + batch, :-1]
        a, b = draft(x).argmax(-1), teacher(x).argmax(-1)
        same += int((a == b).sum())
        count += a.numel()
    return same / count


@torch.no_grad()
def speculative_acceptance(draft: CausalLM, teacher: CausalLM, prompts: torch.Tensor, new_tokens: int = 64) -> float:
    """Greedy speculative decoding's per-token acceptance: the teacher decodes ``new_tokens``
    greedily from each prompt (B, P); the share of those tokens the draft's argmax (given the
    same accepted prefix) also picks. Equals the chance a proposed draft token is accepted."""
    from splitinfer.models.kvcache import KVCache, run_step

    b, p = prompts.shape
    caches = [KVCache(teacher, 0, teacher.n_layers) for _ in range(b)]
    h = teacher.embed(prompts, torch.arange(p).expand(b, p))
    nxt = teacher.logits(run_step(teacher, caches, h, [p] * b))[:, -1].argmax(-1)
    out = [nxt]
    for i in range(p, p + new_tokens - 1):
        h = teacher.embed(nxt[:, None], torch.full((b, 1), i))
        nxt = teacher.logits(run_step(teacher, caches, h, [1] * b))[:, -1].argmax(-1)
        out.append(nxt)
    seq = torch.cat([prompts, torch.stack(out, 1)], 1)
    guess = draft(seq[:, :-1])[:, p - 1 :].argmax(-1)  # the draft's pick for every generated token
    return float((guess == seq[:, p:]).float().mean())


def _loss(
    model: CausalLM, x: torch.Tensor, teacher: CausalLM | None, cfg: LMTrainConfig
) -> torch.Tensor:
    """Next-byte CE on ``x`` (B, T+1), plus the distillation term when a teacher is given."""
    logits = model(x[:, :-1]).float()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    if teacher is None or cfg.alpha >= 1.0:
        return ce
    with torch.no_grad():
        t_logits = teacher(x[:, :-1]).float()
    tau = cfg.temperature
    kl = F.kl_div(
        F.log_softmax(logits / tau, -1).reshape(-1, logits.shape[-1]),
        F.log_softmax(t_logits / tau, -1).reshape(-1, logits.shape[-1]),
        log_target=True,
        reduction="batchmean",
    )
    return cfg.alpha * ce + (1 - cfg.alpha) * tau * tau * kl


def train_lm(
    arch: str | LMConfig,
    cfg: LMTrainConfig,
    corpus: LMCorpus,
    *,
    teacher: CausalLM | None = None,
    progress: Progress | None = None,
    checkpoint: Checkpoint | None = None,
) -> LMTrainResult:
    """Train a fresh (seeded) model of ``arch`` on ``corpus``; returns it in eval mode.

    ``checkpoint`` is called at every evaluation (``eval_every`` steps and the end) so a
    long run leaves usable weights behind if it is stopped."""
    cfg.check()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _train(arch, cfg, corpus, teacher, progress, checkpoint)
    finally:
        torch.set_num_threads(old_threads)


def _train(
    arch: str | LMConfig,
    cfg: LMTrainConfig,
    corpus: LMCorpus,
    teacher: CausalLM | None,
    progress: Progress | None,
    checkpoint: Checkpoint | None,
) -> LMTrainResult:
    model = build_lm(arch)
    if cfg.ctx > model.cfg.max_ctx:
        raise ValueError(f"ctx {cfg.ctx} is past the model's context {model.cfg.max_ctx}")
    if teacher is not None:
        teacher.eval()
    evals = held_out_windows(corpus, cfg.ctx, cfg.eval_windows)
    result = LMTrainResult(model=model, steps=cfg.steps, init_bpb=bits_per_byte(model, evals))
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95),
    )  # fmt: skip
    gen = torch.Generator().manual_seed(cfg.seed)
    model.train()
    start = time.perf_counter()
    smooth = float("nan")
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step)
        x = random_windows(corpus.train, cfg.batch_size, cfg.ctx, gen)
        with _autocast(cfg.bf16):
            loss = _loss(model, x, teacher, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        value = float(loss.detach())
        result.losses.append(value)
        smooth = value if math.isnan(smooth) else 0.95 * smooth + 0.05 * value
        if progress is not None:
            progress(step + 1, smooth)
        last = step + 1 == cfg.steps
        if last or (cfg.eval_every and (step + 1) % cfg.eval_every == 0):
            bpb = bits_per_byte(model, evals)
            result.curve.append((step + 1, bpb))
            log.info("step %d/%d loss %.4f held-out %.4f bpb (%.0f s)", step + 1, cfg.steps, smooth, bpb,
                     time.perf_counter() - start)  # fmt: skip
            if checkpoint is not None:
                checkpoint(model, step + 1, bpb)
    result.seconds = time.perf_counter() - start
    result.held_out_bpb = result.curve[-1][1]
    model.eval()
    return result


def config_meta(cfg: LMTrainConfig) -> dict[str, Any]:
    """The recipe as plain JSON for the weights' metadata."""
    return asdict(cfg)

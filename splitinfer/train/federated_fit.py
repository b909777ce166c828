"""One client's round of federated distillation, and the checks an update must pass.

``local_fit`` fine-tunes a student on a buffer's soft labels only (the cloud teacher's
logits; ground truth is never read):

    loss = T^2 * KL(softmax(t / T) || softmax(s / T))  +  mu / 2 * ||w - w_global||^2

the second term being FedProx's proximal term (mu = 0: plain FedAvg). With differential
privacy the update ``w - w_global`` of the float tensors is clipped to L2 norm ``clip`` and
Gaussian noise of standard deviation ``noise * clip`` is added to every coordinate, on the
device, before anything is sent (local DP on the client update: the server never sees an
un-noised update). Only float tensors travel (``shared_state``); integer buffers such as
BatchNorm's ``num_batches_tracked`` stay local. ``screen_update`` is what the server
applies to every reply: same names, same shapes, all finite.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DPConfig", "FitConfig", "accuracy", "adapt_batchnorm", "load_shared", "local_fit", "screen_update", "shared_state"]


@dataclass(frozen=True)
class DPConfig:
    """Clip the update to L2 norm ``clip``, add N(0, (noise * clip)^2) per coordinate."""

    clip: float = 1.0
    noise: float = 0.0


@dataclass(frozen=True)
class FitConfig:
    """Local training of one round (kept small: the edge is a small CPU)."""

    epochs: int = 2
    batch: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    temperature: float = 2.0
    mu: float = 0.0  # FedProx proximal weight
    seed: int = 0
    dp: DPConfig | None = None


def shared_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors that travel: every floating-point entry of the state_dict."""
    return {k: v.detach().clone() for k, v in module.state_dict().items() if v.is_floating_point()}


def load_shared(module: nn.Module, shared: dict[str, torch.Tensor]) -> None:
    """Copy ``shared`` (float tensors by name) into ``module``; the rest of its state stays."""
    state = module.state_dict()
    for k, v in shared.items():
        state[k].copy_(torch.as_tensor(v, dtype=state[k].dtype).reshape(state[k].shape))


def screen_update(reference: dict[str, tuple[int, ...]], update: dict[str, object]) -> str | None:
    """Why an update must be refused (None: it is usable): names, shapes, finiteness."""
    if set(update) != set(reference):
        missing, extra = sorted(set(reference) - set(update)), sorted(set(update) - set(reference))
        return f"wrong tensors (missing {missing[:3]}, extra {extra[:3]})"
    for name, shape in reference.items():
        t = torch.as_tensor(update[name])
        if tuple(t.shape) != tuple(shape):
            return f"wrong shape for {name}: {tuple(t.shape)}, expected {tuple(shape)}"
        if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
            return f"non-finite or non-float values in {name}"
    return None


def _kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    t = temperature
    n = min(student.shape[1], teacher.shape[1])  # digits: the first 10 logits are the classes
    return F.kl_div(F.log_softmax(student[:, :n] / t, 1), F.softmax(teacher[:, :n] / t, 1), reduction="batchmean") * t * t


def _privatize(new: dict[str, torch.Tensor], base: dict[str, torch.Tensor], dp: DPConfig, gen: torch.Generator) -> tuple[dict[str, torch.Tensor], float]:
    """Clip the update to dp.clip and add Gaussian noise; returns the new state and the update's norm."""
    delta = {k: new[k] - base[k] for k in new}
    norm = math.sqrt(sum(float((d.double() ** 2).sum()) for d in delta.values()))
    scale = min(1.0, dp.clip / norm) if norm > 0 else 1.0
    out = {}
    for k, d in delta.items():
        noise = torch.randn(d.shape, generator=gen) * (dp.noise * dp.clip) if dp.noise > 0 else 0.0
        out[k] = base[k] + d * scale + noise
    return out, norm


def local_fit(module: nn.Module, x: torch.Tensor, logits: torch.Tensor, cfg: FitConfig) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Fine-tune ``module`` (its current weights are the global ones) on (x, teacher logits);
    returns the shared state to send and metrics (loss, update norm). Deterministic per seed."""
    gen = torch.Generator().manual_seed(cfg.seed)
    base = shared_state(module)
    params = dict(module.named_parameters())
    anchor = {k: v.detach().clone() for k, v in params.items()}
    opt = torch.optim.SGD(module.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    module.train()
    total, steps = 0.0, 0
    n = x.shape[0]
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=gen)
        for i in range(0, n, cfg.batch):
            idx = order[i : i + cfg.batch]
            if len(idx) < 2:
                continue  # BatchNorm needs two samples
            loss = _kd_loss(module(x[idx]), logits[idx], cfg.temperature)
            if cfg.mu > 0:
                loss = loss + cfg.mu / 2 * sum(((p - anchor[k]) ** 2).sum() for k, p in params.items())
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach())
            steps += 1
    module.eval()
    new = shared_state(module)
    metrics = {"train-loss": total / max(steps, 1), "steps": float(steps)}
    if cfg.dp is not None:
        new, norm = _privatize(new, base, cfg.dp, gen)
        metrics["update-norm"] = norm
        load_shared(module, new)
    return new, metrics


@torch.no_grad()
def accuracy(module: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> float:
    """Top-1 accuracy over the first 10 logits (the digit classes)."""
    module.eval()
    hits = 0
    for i in range(0, x.shape[0], batch):
        out = module(x[i : i + batch])
        hits += int((out[:, :10].argmax(1) == y[i : i + batch]).sum())
    return hits / max(x.shape[0], 1)


@torch.no_grad()
def adapt_batchnorm(module: nn.Module, x: torch.Tensor, batch: int = 256) -> nn.Module:
    """Re-estimate BatchNorm's running statistics on this edge's own inputs (AdaBN / FedBN's
    idea): label-free, local, nothing sent. An averaged student's statistics are the mean
    of every edge's; an edge whose camera changes the input's contrast needs its own."""
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches
    module.train()
    for i in range(0, x.shape[0], batch):
        module(x[i : i + batch])
    module.eval()
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    return module

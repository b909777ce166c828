"""Training on digits: teachers (``splitinfer train``), students by distillation
(``splitinfer distill``), and the measurements of ``splitinfer evaluate``.

Training is deterministic: a forked RNG seeded from the config, batches drawn
from a seeded generator, one torch thread and ``torch.use_deterministic_algorithms``
while it runs. On one machine and torch build the same command writes the same
weights (the same ``weights_hash``); another CPU may pick other kernels and
differ in the last bits, which is why the trained weights are shipped as files.

Distillation loss (Hinton et al., 2015), for student logits s, teacher logits t,
labels y, weight alpha and temperature T:

    alpha * CE(y, s) + (1 - alpha) * T^2 * KL(softmax(t / T) || softmax(s / T))

with the KL averaged over the batch. On digits a 1000-class model's first 10
logits are the digit classes: CE and accuracy use labels 0..9 over all its
logits / its first 10, the KL compares the full distributions.
"""

from __future__ import annotations

import io
import logging
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from splitinfer.models.data import NUM_DIGIT_CLASSES, DigitsData, digits_dataset
from splitinfer.errors import UserError
from splitinfer.models.loader import LoadedModel, count_parameters, load_model, weights_hash
from splitinfer.core.profiler import torch_threads

__all__ = [
    "DistillConfig",
    "Distilled",
    "EvalResult",
    "TrainConfig",
    "TrainResult",
    "accuracy",
    "distill",
    "distillation_loss",
    "edge_latency_ms",
    "evaluate",
    "fit",
    "serialized_size",
    "train_teacher",
]

log = logging.getLogger(__name__)

# (epoch index from 0, mean training loss of that epoch, seconds since start)
Progress = Callable[[int, float, float], None]


@dataclass(frozen=True)
class TrainConfig:
    """How a model is trained on digits; the defaults train tinycnn to ~99 % in ~30 s."""

    epochs: int = 8  # passes over the 1,438 training images
    batch_size: int = 64  # images per optimiser step
    lr: float = 1e-2  # peak learning rate of the one-cycle schedule (AdamW)
    weight_decay: float = 1e-4  # AdamW's decoupled weight decay
    seed: int = 0  # seeds the weights' RNG stream and the batch order
    threads: int = 1  # torch intra-op threads; 1 keeps runs bit-reproducible
    max_train: int | None = None  # keep only this many training images (224x224 models)
    max_test: int | None = None  # keep only this many held-out images for the accuracy

    def check(self) -> None:
        """UserError for a value out of range."""
        for name in ("epochs", "batch_size", "threads"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise UserError(f"--lr must be positive, got {self.lr}")
        if self.weight_decay < 0:
            raise UserError(f"--weight-decay must not be negative, got {self.weight_decay}")


@dataclass(frozen=True)
class DistillConfig(TrainConfig):
    """Distillation adds the loss weights; the defaults distill the tinycnn student to ~99 % in ~10 s."""

    epochs: int = 30  # the student is small: more passes, each one fast
    lr: float = 2e-2  # peak learning rate of the one-cycle schedule
    alpha: float = 0.3  # weight of the label loss; 1 - alpha weighs the teacher's soft targets
    temperature: float = 4.0  # softens both distributions; the KL term is scaled by T^2

    def check(self) -> None:
        super().check()
        if not 0.0 <= self.alpha <= 1.0:
            raise UserError(f"--alpha must be in [0, 1], got {self.alpha}")
        if not self.temperature > 0:
            raise UserError(f"--temperature must be positive, got {self.temperature}")


@dataclass(frozen=True)
class TrainResult:
    """What a training run did."""

    epochs: int
    losses: tuple[float, ...]  # mean training loss per epoch
    train_accuracy: float  # after the last epoch, eval mode
    test_accuracy: float  # on the held-out split
    seconds: float  # wall time of the optimisation (data and teacher logits excluded)


@dataclass(frozen=True)
class EvalResult:
    """``splitinfer evaluate``: accuracy, size and edge latency of one model."""

    model: str
    accuracy: float  # top-1 on the held-out digits (first 10 logits)
    held_out: int  # images it was measured on
    params: int  # parameter elements (for int8: weights and biases after BN folding)
    size_kb: float  # bytes of its serialized state_dict / 1024
    latency_ms: float  # median of batch-1 forward passes
    threads: int  # torch threads the latency was measured with
    int8: bool  # whether the model is quantized


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    alpha: float,
    temperature: float,
) -> torch.Tensor:
    """alpha * CE(y, s) + (1 - alpha) * T^2 * KL(softmax(t/T) || softmax(s/T)), batch mean."""
    ce = F.cross_entropy(student_logits, labels)
    if alpha >= 1.0 or teacher_logits is None:
        return ce
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    # kl_div(input=log q, target=log p, log_target) = sum p (log p - log q) = KL(p || q).
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return alpha * ce + (1.0 - alpha) * temperature**2 * kl


@contextmanager
def _deterministic(threads: int) -> Iterator[None]:
    """One thread count and deterministic algorithms while training; restored after."""
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with torch_threads(threads):
            yield
    finally:
        torch.use_deterministic_algorithms(was)


def accuracy(module: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> float:
    """Top-1 accuracy over the first 10 logits, eval mode, in batches."""
    if len(y) == 0:
        return float("nan")
    was_training = module.training
    module.eval()
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(y), batch):
            logits = module(x[i : i + batch])
            correct += int((logits[:, :NUM_DIGIT_CLASSES].argmax(1) == y[i : i + batch]).sum())
    module.train(was_training)
    return correct / len(y)


def _logits(module: nn.Module, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    module.eval()
    with torch.no_grad():  # not inference_mode: these logits feed the student's autograd graph
        return torch.cat([module(x[i : i + batch]) for i in range(0, len(x), batch)])


def fit(
    module: nn.Module,
    data: DigitsData,
    cfg: TrainConfig,
    *,
    teacher_logits: torch.Tensor | None = None,
    progress: Progress | None = None,
) -> TrainResult:
    """Train ``module`` in place on ``data`` (AdamW, one-cycle LR), then leave it in eval mode.

    With ``teacher_logits`` (one row per training image) and a DistillConfig the
    loss is ``distillation_loss``; otherwise cross-entropy.
    """
    cfg.check()
    alpha = cfg.alpha if isinstance(cfg, DistillConfig) else 1.0
    temperature = cfg.temperature if isinstance(cfg, DistillConfig) else 1.0
    x, y = data.x_train, data.y_train
    n = len(y)
    if teacher_logits is not None and len(teacher_logits) != n:
        raise ValueError(f"{len(teacher_logits)} teacher rows for {n} training images")
    steps_per_epoch = max(1, sum(1 for i in range(0, n, cfg.batch_size) if n - i >= 2))
    losses: list[float] = []
    with _deterministic(cfg.threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        order = torch.Generator().manual_seed(cfg.seed)
        params = [p for p in module.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
        started = time.perf_counter()
        for epoch in range(cfg.epochs):
            module.train()
            perm = torch.randperm(n, generator=order)
            total, seen = 0.0, 0
            for i in range(0, n, cfg.batch_size):
                idx = perm[i : i + cfg.batch_size]
                if len(idx) < 2:  # batch norm cannot train on one image
                    continue
                out = module(x[idx])
                t = teacher_logits[idx] if teacher_logits is not None else None
                loss = distillation_loss(out, t, y[idx], alpha, temperature)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach()) * len(idx)
                seen += len(idx)
            losses.append(total / max(seen, 1))
            elapsed = time.perf_counter() - started
            log.info("epoch %d/%d: loss %.4f (%.1f s)", epoch + 1, cfg.epochs, losses[-1], elapsed)
            if progress is not None:
                progress(epoch, losses[-1], elapsed)
        seconds = time.perf_counter() - started
        module.eval()
        train_acc = accuracy(module, x, y)
        test_acc = accuracy(module, data.x_test, data.y_test)
    return TrainResult(cfg.epochs, tuple(losses), train_acc, test_acc, seconds)


def _check_classes(lm: LoadedModel, role: str) -> int:
    with torch.inference_mode():
        out = lm.module.eval()(lm.example_input)
    if out.dim() != 2 or out.shape[1] < NUM_DIGIT_CLASSES:
        raise UserError(
            f"{role} {lm.name!r} must output (batch, classes) logits with at least "
            f"{NUM_DIGIT_CLASSES} classes for digits, got shape {tuple(out.shape)}"
        )
    return int(out.shape[1])


def _data_for(lm: LoadedModel, cfg: TrainConfig) -> DigitsData:
    shape = lm.input_shape
    if len(shape) != 3:
        raise UserError(f"{lm.name!r} takes input {shape}: digits need an image input (channels, height, width)")
    data = digits_dataset(shape, max_train=cfg.max_train, max_test=cfg.max_test)
    if shape[1] * shape[2] <= 64 * 64:
        # Small images: one contiguous copy makes batch gathers cheap. Large ones stay
        # expanded views (3 channels for the memory of one) and are gathered per batch.
        data = DigitsData(*(t.contiguous() for t in data))
    return data


def train_teacher(spec: str, cfg: TrainConfig = TrainConfig(), progress: Progress | None = None) -> tuple[LoadedModel, TrainResult]:
    """Train model ``spec`` (its weights as loaded are the start) with cross-entropy on digits."""
    lm = load_model(spec)
    _check_classes(lm, "model")
    data = _data_for(lm, cfg)
    result = fit(lm.module, data, cfg, progress=progress)
    return lm, result


@dataclass(frozen=True)
class Distilled:
    """What ``distill`` made."""

    student: LoadedModel  # trained in place, eval mode
    result: TrainResult
    teacher_accuracy: float  # teacher's held-out accuracy
    teacher_hash: str  # weights_hash of the teacher it learned from


def distill(
    teacher_spec: str,
    student_spec: str,
    cfg: DistillConfig = DistillConfig(),
    progress: Progress | None = None,
) -> Distilled:
    """Distill model ``teacher_spec`` into model ``student_spec`` (its weights as loaded are the start)."""
    cfg.check()
    teacher = load_model(teacher_spec)
    student = load_model(student_spec)
    t_classes = _check_classes(teacher, "teacher")
    s_classes = _check_classes(student, "student")
    if t_classes != s_classes:
        raise UserError(f"teacher {teacher_spec!r} has {t_classes} outputs, student {student_spec!r} has {s_classes}")
    if teacher.input_shape != student.input_shape:
        raise UserError(
            f"teacher {teacher_spec!r} takes {teacher.input_shape}, student {student_spec!r} takes {student.input_shape}"
        )
    data = _data_for(teacher, cfg)
    with torch_threads(cfg.threads):
        teacher_logits = _logits(teacher.module, data.x_train)
        teacher_acc = accuracy(teacher.module, data.x_test, data.y_test)
    teacher_hash = weights_hash(teacher.module)
    del teacher  # a 224x224 teacher can be hundreds of MB; only its logits are needed
    result = fit(student.module, data, cfg, teacher_logits=teacher_logits, progress=progress)
    return Distilled(student, result, teacher_acc, teacher_hash)


# --------------------------------------------------------------------------- measurements


def serialized_size(module: nn.Module) -> int:
    """Bytes of ``torch.save(module.state_dict())``: what shipping the weights costs."""
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    return buf.tell()


def _param_count(module: nn.Module) -> int:
    n = count_parameters(module)
    if n:
        return n
    # Quantized modules keep weights in packed form, not as Parameters.
    for m in module.modules():
        w = getattr(m, "weight", None)
        b = getattr(m, "bias", None)
        if callable(w) and callable(b) and type(m).__module__.startswith("torch.ao.nn"):
            n += w().numel() + (b().numel() if b() is not None else 0)
    return n


def _is_quantized(module: nn.Module) -> bool:
    return any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in module.modules())


def edge_latency_ms(
    module: nn.Module, example: torch.Tensor, threads: int = 1, budget_s: float = 2.0, min_runs: int = 10
) -> float:
    """Median wall time of one batch-1 forward pass at ``threads`` torch threads."""
    x = example[:1].contiguous()
    module.eval()
    with torch_threads(threads), torch.inference_mode():
        for _ in range(3):
            module(x)
        t0 = time.perf_counter()
        module(x)
        one = max(time.perf_counter() - t0, 1e-6)
        runs = max(min_runs, min(500, int(budget_s / one)))
        samples = []
        for _ in range(runs):
            t0 = time.perf_counter_ns()
            module(x)
            samples.append((time.perf_counter_ns() - t0) / 1e6)
    return statistics.median(samples)


def evaluate(spec: str, threads: int = 1, max_test: int | None = None, budget_s: float = 2.0) -> EvalResult:
    """Held-out accuracy, size and edge latency of model ``spec``."""
    if threads < 1:
        raise UserError(f"--threads must be at least 1, got {threads}")
    lm = load_model(spec)
    _check_classes(lm, "model")
    data = _data_for(lm, replace(TrainConfig(), max_train=1, max_test=max_test))
    with torch_threads(threads):
        acc = accuracy(lm.module, data.x_test, data.y_test)
    return EvalResult(
        model=lm.name,
        accuracy=acc,
        held_out=len(data.y_test),
        params=_param_count(lm.module),
        size_kb=serialized_size(lm.module) / 1024,
        latency_ms=edge_latency_ms(lm.module, data.x_test[:1], threads=threads, budget_s=budget_s),
        threads=threads,
        int8=_is_quantized(lm.module),
    )

"""``splitinfer train --model bytelm|bytelm-draft``: the LM branch of the train command.

:func:`splitinfer.train.cli.train_cmd` calls :func:`train_lm_command` when ``--model``
names a zoo LM. Every option left unset takes the model's shipped recipe
(:data:`RECIPES`), so ``splitinfer train --model bytelm`` remakes the shipped weights
(bit for bit on the same CPU, torch and Python stdlib; elsewhere the file is the
reference, as for the image models). A run writes its weights at every evaluation, so a
stopped run leaves the last checkpoint behind.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from splitinfer.errors import UserError
from splitinfer.models.lmzoo import build_lm, is_lm, lm_spec, lm_weights_hash, load_lm, read_lm_weights, save_lm_weights
from splitinfer.train.lm_data import load_corpus
from splitinfer.train.lm_training import (
    LMTrainConfig,
    bits_per_byte,
    config_meta,
    greedy_agreement,
    held_out_windows,
    speculative_acceptance,
    train_lm,
)

__all__ = ["RECIPES", "DISTILL_FROM", "train_lm_command", "lm_report"]

log = logging.getLogger(__name__)

# The shipped weights' recipes (what an unset option means).
RECIPES: dict[str, LMTrainConfig] = {
    "bytelm": LMTrainConfig(steps=1000, batch_size=8, ctx=256, lr=3e-3, warmup=40, bf16=True, threads=1,
                            eval_every=100),
    "bytelm-draft": LMTrainConfig(steps=500, batch_size=8, ctx=256, lr=3e-3, warmup=40, bf16=True, threads=1,
                                  eval_every=100, alpha=0.2, temperature=1.0),
}  # fmt: skip
# model -> the teacher its recipe distils from (the default --teacher; its shipped weights must exist)
DISTILL_FROM: dict[str, str] = {"bytelm-draft": "bytelm"}

AGREEMENT_WINDOWS = LMTrainConfig().eval_windows  # held-out windows of every measurement


def lm_report(name: str, teacher: str | None = None, *, ctx: int = 256) -> dict[str, Any]:
    """Held-out bits per byte of a zoo LM (and of its random init), plus greedy agreement with ``teacher``."""
    corpus = load_corpus()
    windows = held_out_windows(corpus, ctx, AGREEMENT_WINDOWS)
    model = load_lm(name)
    out: dict[str, Any] = {
        "model": name,
        "held_out_bpb": round(bits_per_byte(model, windows), 4),
        "random_init_bpb": round(bits_per_byte(load_lm(name, weights=False), windows), 4),
        "weights_hash": lm_weights_hash(model),
    }
    if teacher is not None:
        out["teacher"] = teacher
        target = load_lm(teacher)
        out["greedy_agreement"] = round(greedy_agreement(model, target, windows), 4)
        out["speculative_acceptance"] = round(speculative_acceptance(model, target, windows[:8, :64]), 4)
    return out


def _agreement_pair(name: str) -> tuple[str, str] | None:
    """(draft, teacher) names pairing ``name`` with its draft or teacher, when the other has weights."""
    draft = lm_spec(name).draft
    if draft is not None:
        return (draft, name) if lm_spec(draft).weights is not None else None
    for teacher in RECIPES:
        if lm_spec(teacher).draft == name and lm_spec(teacher).weights is not None:
            return (name, teacher)
    return None


def _recipe(name: str, overrides: dict[str, Any]) -> LMTrainConfig:
    base = RECIPES.get(name)
    if base is None:
        raise UserError(f"{name} is not trainable (random weights only); trainable: {', '.join(RECIPES)}")
    cfg = replace(base, **{k: v for k, v in overrides.items() if v is not None})
    try:
        cfg.check()
    except ValueError as e:
        raise UserError(str(e)) from None
    return cfg


def _command(name: str, cfg: LMTrainConfig, teacher: str | None) -> str:
    """The command line that remakes this recipe (``--out`` left to the user: not part of it)."""
    base = RECIPES[name]
    parts = [f"splitinfer train --model {name}"]
    for key, flag in (("steps", "--steps"), ("batch_size", "--batch-size"), ("ctx", "--ctx"), ("lr", "--lr"),
                      ("seed", "--seed"), ("threads", "--threads"), ("alpha", "--alpha"),
                      ("temperature", "--temperature")):  # fmt: skip
        if getattr(cfg, key) != getattr(base, key):
            parts.append(f"{flag} {getattr(cfg, key)}")
    if cfg.bf16 != base.bf16:
        parts.append("--bf16" if cfg.bf16 else "--no-bf16")
    if teacher != DISTILL_FROM.get(name):
        parts.append(f"--teacher {teacher or 'none'}")
    return " ".join(parts)


def train_lm_command(
    name: str,
    *,
    out: Path | None,
    overrides: dict[str, Any],
    teacher: str | None,
) -> dict[str, Any]:
    """Train zoo LM ``name`` (recipe + ``overrides``), write its weights; returns the JSON summary.

    ``teacher``: None = the recipe's (``DISTILL_FROM``), "none" = plain next-byte training."""
    import torch

    if not is_lm(name):
        raise UserError(f"{name} is not a zoo LM")
    cfg = _recipe(name, overrides)
    teacher = DISTILL_FROM.get(name) if teacher is None else (None if teacher == "none" else teacher)
    if teacher is not None and not is_lm(teacher):
        raise UserError(f"teacher {teacher} is not a zoo LM")
    if teacher is None and overrides.get("alpha") is not None and overrides["alpha"] < 1:
        raise UserError("--alpha < 1 needs a --teacher")
    if teacher is None:
        cfg = replace(cfg, alpha=1.0)
    out = out or Path(f"{name}.pt")
    corpus = load_corpus()
    teacher_model = load_lm(teacher) if teacher else None
    if teacher_model is not None and lm_spec(teacher).weights is None:
        raise UserError(f"teacher {teacher} has no trained weights to distil from")
    command = _command(name, cfg, teacher)
    head: dict[str, Any] = {"model": name, "cfg": build_lm(name).cfg.to_json(), "recipe": config_meta(cfg),
                            "data": corpus.describe(), "torch": str(torch.__version__), "command": command}  # fmt: skip
    if teacher_model is not None:
        head.update(teacher=teacher, teacher_hash=lm_weights_hash(teacher_model))
    started = time.perf_counter()

    def progress(step: int, loss: float) -> None:
        if step == 1 or step % 25 == 0:
            sys.stderr.write(f"{name}: step {step}/{cfg.steps} loss {loss:.4f} ({time.perf_counter() - started:.0f} s)\n")
            sys.stderr.flush()

    def checkpoint(model: Any, step: int, bpb: float) -> None:
        sys.stderr.write(f"{name}: step {step} held-out {bpb:.4f} bits/byte, wrote {out}\n")
        meta = {**head, "partial": step < cfg.steps, "steps_done": step, "held_out_bpb": bpb,
                "train_seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
        save_lm_weights(out, name, model, meta)

    torch.set_num_threads(cfg.threads)  # the measurements after training too (a CLI process: no caller to restore)
    result = train_lm(name, cfg, corpus, teacher=teacher_model, progress=progress, checkpoint=checkpoint)
    # The shipped model runs on the fp16-rounded weights: measure those.
    saved = build_lm(name)
    saved.load_state_dict({k: v.float() for k, v in read_lm_weights(out)["state_dict"].items()})
    windows = held_out_windows(corpus, 256, AGREEMENT_WINDOWS)
    summary: dict[str, Any] = {
        "model": name,
        "out": str(out),
        **result.summary(),
        "held_out_bpb_fp16": round(bits_per_byte(saved, windows), 4),
        "weights_hash": lm_weights_hash(saved),
        "data_digest": corpus.digest,
        "teacher": teacher,
        "command": command,
    }
    pair = _agreement_pair(name)
    if pair is not None:
        draft, target = (saved if n == name else load_lm(n) for n in pair)
        summary["greedy_agreement"] = round(greedy_agreement(draft, target, windows), 4)
        summary["speculative_acceptance"] = round(speculative_acceptance(draft, target, windows[:8, :64]), 4)
        summary["agreement_with"] = pair[1] if pair[0] == name else pair[0]
    meta = {**head, "partial": False, "steps_done": cfg.steps, "held_out_bpb": summary["held_out_bpb_fp16"],
            "init_bpb": result.init_bpb, "train_seconds": round(result.seconds, 1),
            "curve": summary["curve"],
            **{k: summary[k] for k in ("greedy_agreement", "speculative_acceptance", "agreement_with") if k in summary}}  # fmt: skip
    save_lm_weights(out, name, saved, meta)
    return summary

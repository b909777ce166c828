"""Command functions for ``splitinfer train``, ``distill`` and ``evaluate``.

Plain functions with typer options, no app of their own: ``splitinfer.cli``
registers them (``app.command("train")(train_cmd)``). Results go to stdout (a
rich table, or one JSON object with ``--json``), progress to stderr. User
mistakes raise ``UserError``, which the CLI prints as one line.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from splitinfer.util.output import emit_json

if TYPE_CHECKING:
    from splitinfer.train.training import TrainConfig, TrainResult

__all__ = ["train_cmd", "distill_cmd", "evaluate_cmd"]

_console = Console()
_err_console = Console(stderr=True)

_SPEC_HELP = "model spec: built-in name, student:NAME, int8:SPEC, path/to/weights.pt, or file.py:function"
_DATA = "sklearn digits, fixed 80/20 stratified split (splitinfer.models.data)"


# Options the commands share: a fresh OptionInfo per use, same flags and help everywhere.
def _epochs_opt(default: int, help: str) -> Any:
    return typer.Option(default, "--epochs", help=help)


def _lr_opt(default: float) -> Any:
    return typer.Option(default, "--lr", help="peak learning rate (AdamW, one-cycle schedule)")


def _batch_size_opt() -> Any:
    return typer.Option(64, "--batch-size", help="images per step")


def _threads_opt(help: str = "torch threads; 1 keeps the result bit-reproducible") -> Any:
    return typer.Option(1, "--threads", help=help)


def _max_train_opt() -> Any:
    return typer.Option(None, "--max-train", help="use only this many training images")


def _max_test_opt() -> Any:
    return typer.Option(None, "--max-test", help="measure on only this many held-out images")


def _json_opt() -> Any:
    return typer.Option(False, "--json", help="print one JSON object")


@contextmanager
def _epoch_bar(total: int, what: str) -> Iterator[Callable[[int, float, float], None]]:
    """A progress bar on stderr for ``total`` epochs; yields the training progress callback."""
    bar = Progress(
        TextColumn(what),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        console=_err_console,
        transient=True,
    )
    task = bar.add_task(what, total=total, loss="-")
    with bar:
        yield lambda epoch, loss, _s: bar.update(task, completed=epoch + 1, loss=f"{loss:.4f}")


def _meta(
    head: dict[str, Any], cfg: TrainConfig, result: TrainResult, command: str, loss: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A weights file's meta: what made it (``head``, the config, the loss terms) and how well it does."""
    import torch

    return {
        **head,
        "data": _DATA,
        "epochs": cfg.epochs,
        **(loss or {}),
        "lr": cfg.lr,
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
        "threads": cfg.threads,
        "max_train": cfg.max_train or 0,
        "train_accuracy": result.train_accuracy,
        "test_accuracy": result.test_accuracy,
        "torch": torch.__version__,
        "command": command,
    }


def _default_out(model: str) -> Path:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(model).stem if model.endswith(".pt") else model).strip("_.")
    return Path(f"{stem or 'model'}-digits.pt")


def _pct(x: float) -> str:
    return f"{100 * x:.2f} %"


# ----------------------------------------------------------------------------- train
def train_cmd(
    model: str = typer.Option("tinycnn", "--model", "-m", help=_SPEC_HELP + " (its current weights are the start)"),
    epochs: int = _epochs_opt(8, "passes over the 1,438 training digits"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="weights file to write (default: MODEL-digits.pt)"),
    lr: Optional[float] = typer.Option(None, "--lr", help="peak learning rate (AdamW, one-cycle; default 1e-2, LMs: recipe)"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="images per step (default 64; LMs: windows, recipe)"),
    seed: Optional[int] = typer.Option(None, "--seed", help="seeds the batch order (and any randomness in training; default 0)"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads; 1 keeps the result bit-reproducible (default 1)"),
    max_train: Optional[int] = _max_train_opt(),
    json_out: bool = _json_opt(),
    steps: Optional[int] = typer.Option(None, "--steps", help="LMs: optimizer steps (default: the shipped recipe's)"),
    ctx: Optional[int] = typer.Option(None, "--ctx", help="LMs: bytes of context per training window"),
    bf16: Optional[bool] = typer.Option(None, "--bf16/--no-bf16", help="LMs: bf16 autocast on the CPU"),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="LMs: distil from this zoo LM ('none': plain)"),
    alpha: Optional[float] = typer.Option(None, "--alpha", help="LMs with --teacher: weight of the next-byte CE"),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="LMs with --teacher: softmax temperature"),
) -> None:
    """Train a model on scikit-learn's digits (fixed 80/20 split) and write its weights.

    A zoo LM (bytelm, bytelm-draft) trains on Python stdlib source instead: unset options
    take its shipped recipe, --epochs/--max-train do not apply."""
    import torch

    from splitinfer.models.lmzoo import is_lm

    if is_lm(model):
        _train_lm(model, out, json_out, steps=steps, batch_size=batch_size, ctx=ctx, lr=lr, seed=seed,
                  threads=threads, bf16=bf16, teacher=teacher, alpha=alpha, temperature=temperature)  # fmt: skip
        return
    lr = 1e-2 if lr is None else lr
    batch_size = 64 if batch_size is None else batch_size
    seed = 0 if seed is None else seed
    threads = 1 if threads is None else threads

    from splitinfer.models.loader import weights_hash
    from splitinfer.models.pretrained import architecture_spec, read_weights, save_weights, shipped_weights
    from splitinfer.train.training import TrainConfig, train_teacher

    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, threads=threads, max_train=max_train)
    cfg.check()
    arch = architecture_spec(model)
    out = out or _default_out(model)
    with _epoch_bar(epochs, f"training {model}") as progress:
        lm, result = train_teacher(model, cfg, progress=progress)
    h = weights_hash(lm.module)
    command = f"splitinfer train --model {model} --epochs {epochs} --out {out}"
    meta = _meta({"kind": "trained", "model": model}, cfg, result, command)
    # Reproduced the shipped weights? Read before writing: --out may be the shipped file itself.
    shipped = shipped_weights(f"{model}-digits")
    same_as_shipped: bool | None = None
    if shipped is not None:
        ref = read_weights(shipped)
        if ref.arch == arch and set(ref.state_dict) == set(lm.module.state_dict()):
            same_as_shipped = all(torch.equal(ref.state_dict[k], v) for k, v in lm.module.state_dict().items())
    save_weights(out, arch, lm.module, meta)
    summary = {
        "model": model,
        "arch": arch,
        "out": str(out),
        "epochs": epochs,
        "losses": [round(x, 6) for x in result.losses],
        "train_accuracy": result.train_accuracy,
        "test_accuracy": result.test_accuracy,
        "seconds": round(result.seconds, 2),
        "weights_hash": h,
        "same_as_shipped": same_as_shipped,
    }
    if json_out:
        emit_json(summary)
        return
    _console.print(
        f"[bold]{model}[/] trained {epochs} epochs in {result.seconds:.1f} s: held-out accuracy "
        f"[bold]{_pct(result.test_accuracy)}[/] (train {_pct(result.train_accuracy)}), "
        f"loss {result.losses[0]:.3f} -> {result.losses[-1]:.4f}"
    )
    _console.print(f"wrote {out} (arch {arch}, weights {h[:12]})")
    if same_as_shipped is not None:
        _console.print(f"identical to the shipped {shipped.name}: {'yes' if same_as_shipped else 'no'}")  # type: ignore[union-attr]


def _train_lm(model: str, out: Optional[Path], json_out: bool, *, teacher: Optional[str], **overrides: Any) -> None:
    """``splitinfer train`` for a zoo LM (splitinfer.train.lm_cli does the work)."""
    from splitinfer.train.lm_cli import train_lm_command

    s = train_lm_command(model, out=out, overrides=overrides, teacher=teacher)
    if json_out:
        emit_json(s)
        return
    _console.print(
        f"[bold]{model}[/] trained {s['steps']} steps in {s['seconds']:.0f} s: held-out "
        f"[bold]{s['held_out_bpb_fp16']:.4f}[/] bits/byte (random init {s['init_bpb']:.4f})"
        + (f", greedy agreement with {s['agreement_with']} {_pct(s['greedy_agreement'])}" if "greedy_agreement" in s else "")
    )
    _console.print(f"wrote {s['out']} (weights {s['weights_hash']}, data {s['data_digest']})")


# ---------------------------------------------------------------------------- distill
def distill_cmd(
    teacher: str = typer.Option(..., "--teacher", "-t", help=_SPEC_HELP),
    student: Optional[str] = typer.Option(
        None, "--student", "-s", help="student spec (default: student:TEACHER's architecture, fresh init)"
    ),
    out: Path = typer.Option(..., "--out", "-o", help="weights file to write"),
    epochs: int = _epochs_opt(30, "passes over the training digits"),
    alpha: float = typer.Option(0.3, "--alpha", help="weight of the label loss; 1 - alpha weighs the teacher"),
    temperature: float = typer.Option(4.0, "--temperature", "-T", help="softmax temperature of both models"),
    lr: float = _lr_opt(2e-2),
    batch_size: int = _batch_size_opt(),
    seed: int = typer.Option(0, "--seed", help="seeds the batch order"),
    threads: int = _threads_opt(),
    max_train: Optional[int] = _max_train_opt(),
    max_test: Optional[int] = _max_test_opt(),
    int8: bool = typer.Option(False, "--int8", help="also quantize the student to int8 and report its accuracy"),
    json_out: bool = _json_opt(),
) -> None:
    """Distill a teacher into a small student on digits: alpha*CE + (1-alpha)*T^2*KL."""
    from splitinfer.models.loader import weights_hash
    from splitinfer.models.pretrained import architecture_spec, save_weights
    from splitinfer.models.students import default_student
    from splitinfer.train.training import DistillConfig, accuracy, distill

    cfg = DistillConfig(
        epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, threads=threads, max_train=max_train,
        max_test=max_test, alpha=alpha, temperature=temperature,
    )  # fmt: skip
    cfg.check()
    student_spec = student or default_student(teacher)
    arch = architecture_spec(student_spec)
    with _epoch_bar(epochs, f"distilling {teacher} -> {student_spec}") as progress:
        made = distill(teacher, student_spec, cfg, progress=progress)
    lm, result, teacher_acc = made.student, made.result, made.teacher_accuracy
    int8_acc: float | None = None
    if int8:
        from splitinfer.models.data import digits_dataset
        from splitinfer.models.quantize import quantize_model

        q = quantize_model(lm.module, lm.input_shape)
        data = digits_dataset(lm.input_shape, max_train=1, max_test=max_test)
        int8_acc = accuracy(q, data.x_test.contiguous(), data.y_test)
    head = {
        "kind": "distilled",
        "teacher": teacher,
        "teacher_hash": made.teacher_hash,
        "teacher_accuracy": teacher_acc,
        "student": student_spec,
    }
    command = f"splitinfer distill --teacher {teacher} --out {out} --epochs {epochs}"
    meta = _meta(head, cfg, result, command, loss={"alpha": alpha, "temperature": temperature})
    if int8_acc is not None:
        meta["int8_test_accuracy"] = int8_acc
    save_weights(out, arch, lm.module, meta)
    summary = {
        "teacher": teacher,
        "student": student_spec,
        "arch": arch,
        "out": str(out),
        "epochs": epochs,
        "alpha": alpha,
        "temperature": temperature,
        "losses": [round(x, 6) for x in result.losses],
        "teacher_accuracy": teacher_acc,
        "student_accuracy": result.test_accuracy,
        "int8_accuracy": int8_acc,
        "seconds": round(result.seconds, 2),
        "weights_hash": weights_hash(lm.module),
    }
    if json_out:
        emit_json(summary)
        return
    table = Table(title=f"distilled {teacher} -> {student_spec} ({epochs} epochs, {result.seconds:.1f} s)")
    for col in ("model", "held-out accuracy"):
        table.add_column(col)
    table.add_row(f"teacher {teacher}", _pct(teacher_acc))
    table.add_row(f"student {arch}", _pct(result.test_accuracy))
    if int8_acc is not None:
        table.add_row("student int8", _pct(int8_acc))
    _console.print(table)
    _console.print(f"wrote {out}: load it as a model spec (--model {out}, or int8:{out})")


# --------------------------------------------------------------------------- evaluate
def evaluate_cmd(
    model: list[str] = typer.Option(..., "--model", "-m", help=_SPEC_HELP + " (repeat for several)"),
    threads: int = _threads_opt("torch threads for the latency (1: the edge)"),
    max_test: Optional[int] = _max_test_opt(),
    json_out: bool = _json_opt(),
) -> None:
    """Held-out digits accuracy, size and batch-1 edge latency of models."""
    from splitinfer.models.data import HELD_OUT_FRACTION, SPLIT_SEED
    from splitinfer.train.training import evaluate

    rows = [evaluate(spec, threads=threads, max_test=max_test) for spec in model]
    if json_out:
        emit_json(
            {
                "data": {"name": "sklearn digits", "held_out_fraction": HELD_OUT_FRACTION, "split_seed": SPLIT_SEED},
                "models": [{**asdict(r), "size_kb": round(r.size_kb, 1), "latency_ms": round(r.latency_ms, 4)} for r in rows],
            }
        )
        return
    table = Table(title=f"digits held-out accuracy, size and edge latency ({threads} thread(s), batch 1)")
    for col in ("model", "accuracy", "params", "size KB", "latency ms"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        table.add_row(r.model, _pct(r.accuracy), f"{r.params:,}", f"{r.size_kb:.1f}", f"{r.latency_ms:.3f}")
    _console.print(table)

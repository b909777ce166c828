"""Digits data, shipped weights, distillation, int8 students and their commands."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import typer
from typer.testing import CliRunner

from splitinfer.models.data import DIGITS_MEAN, DIGITS_STD, digits_dataset, preprocess, split_indices
from splitinfer.errors import UserError
from splitinfer.models.loader import builtin_models, load_model, weights_hash
from splitinfer.models.pretrained import read_weights, save_weights, weights_dir
from splitinfer.models.quantize import quantize_student
from splitinfer.models.students import MICRO32, MINI224, build_student, default_student, student_arch
from splitinfer.train.training import (
    DistillConfig,
    TrainConfig,
    accuracy,
    distill,
    distillation_loss,
    evaluate,
    fit,
)
from splitinfer.train.cli import distill_cmd, evaluate_cmd, train_cmd

# What the shipped weights reach on the held-out split (98.9 % each), minus a margin.
TEACHER_MIN_ACC = 0.97
STUDENT_MIN_ACC = 0.96
INT8_MIN_ACC = 0.95


@pytest.fixture(scope="module")
def digits32():
    return digits_dataset((3, 32, 32))


@pytest.fixture(scope="module")
def teacher():
    return load_model("tinycnn-digits")


@pytest.fixture(scope="module")
def student():
    return load_model("student:tinycnn-digits")


# --------------------------------------------------------------------------- data


def test_split_is_fixed_stratified_and_disjoint() -> None:
    train, test = split_indices()
    assert len(train) == 1438 and len(test) == 359
    assert not set(train.tolist()) & set(test.tolist())
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(1797))
    # Pinned: a change here changes every accuracy in the README.
    digest = hashlib.sha256(np.sort(test).astype(np.int64).tobytes()).hexdigest()
    assert digest[:16] == "3530be80b9605f4c"
    data = digits_dataset((1, 8, 8))
    counts = np.bincount(data.y_test.numpy(), minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # 20 % of every class


def test_dataset_shapes_normalisation_and_preprocess(digits32) -> None:
    x_train, y_train, x_test, y_test = digits32
    assert x_train.shape == (1438, 3, 32, 32) and x_test.shape == (359, 3, 32, 32)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert set(y_train.tolist()) == set(range(10))
    torch.testing.assert_close(x_train[:, 0], x_train[:, 2])  # grey replicated
    assert abs(float(x_train.mean())) < 0.05 and 0.7 < float(x_train.std()) < 1.1
    # One image preprocessed alone gets exactly its values inside the data set.
    from sklearn.datasets import load_digits

    images = load_digits().images
    i = int(split_indices()[1][5])
    torch.testing.assert_close(preprocess(images[i : i + 1], (3, 32, 32)), x_test[5:6], rtol=0, atol=0)
    raw = digits_dataset((1, 8, 8)).x_test[5, 0]
    torch.testing.assert_close(raw, torch.tensor((images[i] / 16 - DIGITS_MEAN) / DIGITS_STD, dtype=torch.float32))
    with pytest.raises(UserError, match="image input"):
        digits_dataset((10,))


# ------------------------------------------------------------------------- weights


def test_shipped_teacher_and_student_reach_their_accuracy(digits32, teacher, student) -> None:
    _, _, x_test, y_test = digits32
    t_acc = accuracy(teacher.module, x_test, y_test)
    s_acc = accuracy(student.module, x_test, y_test)
    assert t_acc >= TEACHER_MIN_ACC, t_acc
    assert s_acc >= STUDENT_MIN_ACC, s_acc
    # The files record what they reached when made; measuring again agrees.
    for name, acc in (("tinycnn-digits", t_acc), ("student-tinycnn-digits", s_acc)):
        meta = read_weights(weights_dir() / f"{name}.pt").meta
        assert abs(meta["test_accuracy"] - acc) <= 1 / len(y_test), (name, meta)
    assert read_weights(weights_dir() / "student-tinycnn-digits.pt").meta["teacher_hash"] == weights_hash(teacher.module)


def test_model_hash_covers_the_trained_weights(teacher) -> None:
    random_tinycnn = load_model("tinycnn")
    assert weights_hash(teacher.module) != weights_hash(random_tinycnn.module)
    assert weights_hash(teacher.module) == weights_hash(load_model("tinycnn-digits").module)
    # The same weights through a file spec hash the same.
    by_file = load_model(str(weights_dir() / "tinycnn-digits.pt"))
    assert weights_hash(by_file.module) == weights_hash(teacher.module)
    assert "tinycnn-digits" in [i.name for i in builtin_models()]
    assert weights_hash(load_model("student:tinycnn").module) != weights_hash(load_model("student:tinycnn-digits").module)


def test_weights_file_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        load_model(str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="cannot read weights file"):
        load_model(str(tmp_path / "junk.pt"))
    # Pickled code is refused by weights_only loading, never executed.
    torch.save({"format": "splitinfer-weights/1", "evil": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="cannot read weights file"):
        load_model(str(tmp_path / "evil.pt"))
    torch.save({"a": torch.ones(1)}, tmp_path / "plain.pt")
    with pytest.raises(UserError, match="not a splitinfer weights file"):
        load_model(str(tmp_path / "plain.pt"))
    save_weights(tmp_path / "wrong.pt", "student:tinycnn", load_model("tinycnn").module)
    with pytest.raises(UserError, match="does not fit student:tinycnn"):
        load_model(str(tmp_path / "wrong.pt"))
    with pytest.raises(UserError, match="no default student"):
        load_model("student:nope")


class _Evil:
    def __reduce__(self):  # pragma: no cover - must never run
        return (print, ("pwned",))


# --------------------------------------------------------------------------- students


def test_every_builtin_has_a_student_with_its_outputs() -> None:
    for info in builtin_models():
        arch = student_arch(info.name)
        assert arch is (MICRO32 if info.input_shape == (3, 32, 32) else MINI224)
        assert default_student(info.name).startswith("student:")
    s = load_model("student:resnet18")
    assert s.module(s.example_input).shape == (1, 1000)
    assert s.input_shape == (3, 224, 224)
    assert sum(p.numel() for p in s.module.parameters()) < 500_000
    # Deterministic init, caller's RNG untouched.
    state = torch.get_rng_state()
    assert weights_hash(build_student("tinycnn")) == weights_hash(build_student("tinycnn"))
    assert torch.equal(state, torch.get_rng_state())


# ------------------------------------------------------------------------ distillation


def test_distillation_loss_matches_the_formula() -> None:
    s = torch.tensor([[2.0, -1.0, 0.5], [0.0, 1.0, -2.0]])
    t = torch.tensor([[1.0, 0.0, 3.0], [-1.0, 2.0, 0.0]])
    y = torch.tensor([0, 2])
    alpha, T = 0.25, 3.0
    # By hand: CE is the mean of -log softmax(s)[y]; KL(p || q) = sum p (log p - log q), batch mean.
    ce = -(torch.log_softmax(s, 1)[0, 0] + torch.log_softmax(s, 1)[1, 2]) / 2
    p = torch.exp(t / T) / torch.exp(t / T).sum(1, keepdim=True)
    q = torch.exp(s / T) / torch.exp(s / T).sum(1, keepdim=True)
    kl = (p * (p.log() - q.log())).sum() / 2
    expected = alpha * ce + (1 - alpha) * T**2 * kl
    torch.testing.assert_close(distillation_loss(s, t, y, alpha, T), expected)
    torch.testing.assert_close(distillation_loss(s, t, y, 1.0, T), F.cross_entropy(s, y))
    torch.testing.assert_close(distillation_loss(s, t, y, 0.0, T), T**2 * kl)
    assert distillation_loss(s, s, y, 0.0, T).item() == pytest.approx(0.0, abs=1e-6)


def test_one_epoch_reduces_the_loss_and_is_deterministic(digits32) -> None:
    x, y = digits32.x_train, digits32.y_train

    def train_loss(module: torch.nn.Module) -> float:
        with torch.no_grad():
            return F.cross_entropy(module.eval()(x), y).item()

    model = build_student("tinycnn")
    before = train_loss(model)
    result = fit(model, digits32, TrainConfig(epochs=1, lr=2e-2))
    assert train_loss(model) < 0.8 * before
    assert len(result.losses) == 1 and not model.training
    again = build_student("tinycnn")
    fit(again, digits32, TrainConfig(epochs=1, lr=2e-2))
    assert weights_hash(again) == weights_hash(model)  # seeded, one thread, deterministic algorithms


def test_distill_runs_from_a_teacher_spec() -> None:
    cfg = DistillConfig(epochs=2, max_train=256, max_test=64)
    made = distill("tinycnn-digits", "student:tinycnn", cfg)
    assert made.teacher_accuracy >= 0.9 and made.result.losses[1] < made.result.losses[0]
    assert made.student.name == "student:tinycnn" and not made.student.module.training
    assert made.teacher_hash == weights_hash(load_model("tinycnn-digits").module)
    with pytest.raises(UserError, match="outputs"):
        distill("tinycnn-digits", "student:resnet18", cfg)
    with pytest.raises(UserError, match="alpha"):
        distill("tinycnn-digits", "student:tinycnn", DistillConfig(alpha=1.5))


# ------------------------------------------------------------------------------- int8


def test_int8_student_agrees_with_the_float_student(digits32, student) -> None:
    q = quantize_student(student.module)
    _, _, x_test, y_test = digits32
    with torch.no_grad():
        float_top1 = student.module(x_test).argmax(1)
        int8_top1 = q(x_test).argmax(1)
    assert (float_top1 == int8_top1).float().mean().item() >= 0.95
    assert accuracy(q, x_test, y_test) >= INT8_MIN_ACC
    # Also as a spec, and the float student is left as it was.
    spec = load_model("int8:student:tinycnn-digits")
    assert torch.equal(spec.module(x_test[:8]).argmax(1), int8_top1[:8])
    assert weights_hash(student.module) == weights_hash(load_model("student:tinycnn-digits").module)


def test_quantizing_leaves_the_callers_rng_alone(student) -> None:
    """Like every other model build, int8 conversion must not move torch's global RNG."""
    before = torch.random.get_rng_state()
    quantize_student(student.module)
    assert torch.equal(torch.random.get_rng_state(), before)


def test_evaluate_reports_accuracy_size_and_latency() -> None:
    r = evaluate("int8:student:tinycnn-digits", max_test=64, budget_s=0.1)
    assert r.int8 and r.held_out == 64 and r.accuracy >= 0.9
    f = evaluate("student:tinycnn-digits", max_test=64, budget_s=0.1)
    assert not f.int8 and r.size_kb < f.size_kb and f.params > 10_000
    assert r.latency_ms > 0 and f.latency_ms > 0 and r.threads == 1


# -------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def cli() -> typer.Typer:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command("train")(train_cmd)
    app.command("distill")(distill_cmd)
    app.command("evaluate")(evaluate_cmd)
    return app


def test_cli_evaluate_json(cli: typer.Typer) -> None:
    res = CliRunner().invoke(cli, ["evaluate", "--model", "student:tinycnn-digits", "--max-test", "32", "--json"])
    assert res.exit_code == 0, res.output
    row = json.loads(res.stdout)["models"][0]
    assert row["model"] == "student:tinycnn-digits" and row["held_out"] == 32
    assert {"accuracy", "params", "size_kb", "latency_ms", "threads", "int8"} <= set(row)


def test_cli_train_writes_a_loadable_weights_file(cli: typer.Typer, tmp_path: Path) -> None:
    out = tmp_path / "s.pt"
    args = ["train", "--model", "student:tinycnn", "--epochs", "1", "--max-train", "128", "--out", str(out), "--json"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["arch"] == "student:tinycnn" and summary["same_as_shipped"] is None
    assert weights_hash(load_model(str(out)).module) == summary["weights_hash"]
    assert read_weights(out).meta["epochs"] == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["distill", "--teacher", "tinycnn-digits", "--out", "x.pt", "--alpha", "2"], "alpha"),
        (["distill", "--teacher", "tinycnn-digits", "--out", "x.pt", "--temperature", "0"], "temperature"),
        (["distill", "--teacher", "nope", "--out", "x.pt"], "no default student"),
        (["train", "--model", "int8:student:tinycnn", "--out", "x.pt"], "cannot be trained"),
        (["train", "--model", "tinycnn", "--epochs", "0"], "epochs"),
        (["evaluate", "--model", "nope"], "unknown model"),
    ],
)
def test_cli_bad_input_is_a_user_error(
    cli: typer.Typer, args: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # nothing may be written, but never into the repo
    res = CliRunner().invoke(cli, args)
    assert isinstance(res.exception, UserError), res.output
    assert message in str(res.exception) and "\n" not in str(res.exception)
